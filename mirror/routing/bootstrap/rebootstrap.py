"""Asking every source at once, and the loop that keeps a node connected to the cluster.

Kept apart from the sources: the loop only needs the ``BootstrapSource`` interface, so it
neither knows nor imports which kinds exist.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from collections.abc import Set as AbstractSet

from mirror.routing.bootstrap.base import BootstrapSource, Peer, dedup, format_peer, normalise

log = logging.getLogger(__name__)


async def gather_addresses(
    sources: Sequence[BootstrapSource], *, exclude: AbstractSet[Peer] = frozenset()
) -> list[Peer]:
    """The union of all sources in their order, without ``exclude`` (our own router address).

    Sources are asked concurrently so a slow one does not add to the others' time. One
    that raises (a bug, since lookups must not) is logged and counted as empty, so it does
    not cut a node off from peers the other sources know.
    """
    excluded = {normalise(peer) for peer in exclude}
    results = await asyncio.gather(*(_ask(source) for source in sources))
    return [peer for peer in dedup(p for ps in results for p in ps) if peer not in excluded]


async def _ask(source: BootstrapSource) -> list[Peer]:
    try:
        return await source.addresses()
    except Exception:
        log.exception("bootstrap %s: source failed", source)
        return []


class Rebootstrapper:
    """Bootstrap at start, again whenever the routing table is empty, and every so often.

    An empty table means the node lost every peer (it started first, or the cluster
    restarted under it); a periodic refresh also pulls in peers that joined while the table
    was merely small. Attempts that end with no contacts back off exponentially (up to
    ``refresh_interval``) so a lone first node does not query DNS every ``check_interval``.
    """

    def __init__(
        self,
        sources: Sequence[BootstrapSource],
        bootstrap: Callable[[list[Peer]], Awaitable[int]],
        contact_count: Callable[[], int],
        *,
        own_address: Peer,
        check_interval: float = 1.0,
        refresh_interval: float = 60.0,
    ) -> None:
        self._sources = tuple(sources)
        self._bootstrap = bootstrap
        self._contact_count = contact_count
        self._own_address = own_address
        self._check_interval = check_interval
        self._refresh_interval = refresh_interval

    async def bootstrap_once(self) -> int:
        """Gather addresses and bootstrap from them; the contact count after.

        With no addresses the bootstrap callable is not called. Its exceptions propagate:
        ``run`` is the place that shrugs them off.
        """
        peers = await gather_addresses(self._sources, exclude={self._own_address})
        if not peers:
            log.info("bootstrap: no peers found besides ourselves")
            return self._contact_count()
        log.debug("bootstrap: contacting %s", ", ".join(format_peer(*p) for p in peers))
        return await self._bootstrap(peers)

    async def run(self) -> None:
        """Keep the node connected until cancelled; a failing attempt is logged and retried."""
        loop = asyncio.get_running_loop()
        failures = 0
        next_attempt = loop.time()  # the first round bootstraps, whatever the table holds
        while True:
            now = loop.time()
            if now >= next_attempt or (failures == 0 and self._contact_count() == 0):
                contacts = await self._attempt()
                now = loop.time()
                if contacts > 0:
                    failures = 0
                    next_attempt = now + self._refresh_interval
                else:
                    failures += 1
                    backoff = self._check_interval * 2 ** (failures - 1)
                    next_attempt = now + min(backoff, self._refresh_interval)
            await asyncio.sleep(self._check_interval)

    async def _attempt(self) -> int:
        try:
            return await self.bootstrap_once()
        except Exception:
            log.exception("bootstrap failed; retrying")
            return 0
