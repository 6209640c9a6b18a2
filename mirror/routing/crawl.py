"""Maintenance walks: joining the DHT, finding a key's closest nodes, refreshing lonely buckets.

These run off the request path (bootstrap, announcing and withdrawing records, the hourly
refresh), so they get a few RPC timeouts (`_CRAWL_TIMEOUTS`) rather than a pull's
`resolve_timeout`, and a walk cut by its deadline returns what it found so far.

From kademlia it uses only `Node` (contacts, as the routing table and the lookup give them);
the walk is ours (lookup.py) and bucket refresh ids come from `ContactTable`.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import logging
import socket
from collections.abc import Iterable

from kademlia.node import Node

from mirror.routing.client import DhtClient
from mirror.routing.keys import distance
from mirror.routing.lookup import IterativeLookup
from mirror.routing.rpc import Address, RpcEndpoint
from mirror.routing.settings import DhtSettings
from mirror.routing.table import ContactTable

log = logging.getLogger(__name__)

# Maintenance lookups (provide, withdraw, bootstrap crawl) may take this many RPC timeouts.
_CRAWL_TIMEOUTS = 4
# How often buckets not touched for an hour (kademlia's "lonely" ones) are refreshed.
_REFRESH_INTERVAL = 600.0


class Crawler:
    """Walks of node `own_id` through `client`, seeded from `table`."""

    def __init__(
        self,
        own_id: bytes,
        *,
        settings: DhtSettings,
        endpoint: RpcEndpoint,
        client: DhtClient,
        table: ContactTable,
    ) -> None:
        self._own = own_id
        self._settings = settings
        self._endpoint = endpoint
        self._client = client
        self._table = table

    async def bootstrap(self, addresses: list[Address], own: Address) -> int:
        """Ping `addresses` (skipping `own`), then crawl towards our own id.

        Returns the number of contacts known afterwards. Dead or unresolvable addresses are
        skipped; the whole call takes at most about `_CRAWL_TIMEOUTS + 2` RPC timeouts.
        """
        targets = [address for address in await self._resolve(addresses) if address != own]
        pings = {self._client.ping(address): address for address in targets}
        if pings:
            await asyncio.wait(pings)
        for future, (host, port) in pings.items():
            peer_id = future.result()
            if peer_id is not None and peer_id != self._own:
                self._table.welcome(Node(peer_id, host, port))
        await self.closest_nodes(self._own)
        count = self._table.contact_count()
        log.debug(
            "DHT bootstrap: %d of %d addresses answered, %d contacts",
            len(pings),
            len(addresses),
            count,
        )
        return count

    async def closest_nodes(
        self, target: bytes, *, timeout: float | None = None, settle_small: bool = False
    ) -> list[Node]:
        """The k live nodes closest to `target` (not this one), closest first.

        Found within `timeout` (by default the crawl deadline), among the nodes that answered
        and those in the routing table, whether they answered this walk in time or not
        (`_closest_alive`). Nothing when the endpoint is closed.
        `settle_small`: stop early in a network of fewer than k nodes known whole (lookup.py),
        or do not walk at all while the table is known whole (table.py), for announcements; the
        bootstrap and refresh walks leave it off, since the nodes they ask learn of this one by
        being asked. Such a walk that ends before its deadline vouches for the table; a bootstrap
        walk does not, as it runs while the cluster is still forming.
        """
        if not self._endpoint.listening:
            return []
        if settle_small and self._table.known_whole():
            return self._table.closest(target)
        client = self._client
        lookup = IterativeLookup(
            target,
            self_id=self._own,
            query=lambda node: client.find_node(node, target),
            k=self._settings.ksize,
            alpha=self._settings.alpha,
            settle_below=self._settings.ksize if settle_small else 0,
        )
        seeds = self._table.closest(target)
        try:
            async with asyncio.timeout(
                _CRAWL_TIMEOUTS * self._settings.rpc_timeout if timeout is None else timeout
            ):
                await lookup.run(seeds)
        except TimeoutError:
            log.debug("node lookup for %s hit its deadline", target.hex())
        else:
            if settle_small:  # not a bootstrap walk: it ends while others are still joining
                self._table.mark_whole()  # a no-op once the network has k nodes
        return self._closest_alive(target, lookup)

    def _closest_alive(self, target: bytes, lookup: IterativeLookup) -> list[Node]:
        """The k closest to `target` of the nodes that answered the walk and those the table
        holds (alive, as far as this node knows: the table drops only nodes that never answer).

        On CPU-starved nodes (a rollout at 0.1 CPU each) many answer a walk after its call's
        timeout, or after its deadline, yet answer: an announcement sent only to the nodes that
        answered in time left a quarter of a 16-node cluster without the holder's records, and
        their pulls went upstream.
        """
        alive = {node.id: node for node in [*lookup.closest(), *self._table.closest(target)]}
        return heapq.nsmallest(
            self._settings.ksize, alive.values(), key=lambda node: distance(node.id, target)
        )

    async def refresh_forever(self) -> None:
        """Refresh buckets nobody looked into for an hour (kademlia's section 2.3).

        kademlia's own refresh ran unbounded lookups; these are ordinary crawls, one at a time.
        Returns when the endpoint is closed (the caller also cancels it then).
        """
        while True:
            await asyncio.sleep(_REFRESH_INTERVAL)
            if not self._endpoint.listening:
                return
            for refresh_id in self._table.refresh_ids():
                await self.closest_nodes(refresh_id)

    async def _resolve(self, addresses: Iterable[Address]) -> list[Address]:
        """IP literals pass through; names are resolved concurrently within one RPC timeout.

        Unresolvable names are skipped: bootstrap must not fail because one seed is gone.
        """
        family = self._endpoint.extra_info("socket").family
        loop = asyncio.get_running_loop()

        async def one(host: str, port: int) -> Address | None:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                pass
            else:
                return (host, port)
            try:
                async with asyncio.timeout(self._settings.rpc_timeout):
                    infos = await loop.getaddrinfo(
                        host, port, family=family, type=socket.SOCK_DGRAM
                    )
            except (OSError, TimeoutError) as exc:
                log.debug("DHT bootstrap address %s:%s does not resolve: %s", host, port, exc)
                return None
            return (str(infos[0][4][0]), int(infos[0][4][1])) if infos else None

        results = await asyncio.gather(*(one(host, port) for host, port in addresses))
        return [address for address in results if address is not None]
