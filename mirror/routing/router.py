"""The routing seam: the few things the rest of the node asks of the cluster.

Everything above routing (the content service, the peer fetcher, the advertiser, and whatever
distributes content later) depends on these protocols only, never on the DHT: `Router` for
records and claims, `Broadcaster` for small messages to the whole cluster. Two
implementations of both: `DhtNode` (the Kademlia DHT of provider records, `routing/dht.py`) and
`MemoryRouter` (`routing/memory.py`), which keeps a whole cluster's records in one process for
fast, socket-free tests.

Keys are texts: a digest (``sha256:...``) or a tag reference (``registry/repo:tag``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Provider:
    """A node that holds some content, and where peers fetch it from."""

    node_id: bytes  # 20 bytes
    address: str  # HTTP "host:port" of that node's registry


class Router(Protocol):
    """Who holds what, and who fetches what from upstream, across the cluster."""

    async def find_providers(self, key: str, want: int = 2) -> list[Provider]:
        """Nodes other than this one that announced `key`, within the router's deadline.

        Returns what was found by then (possibly nothing, possibly more than `want`); never
        raises for a lookup that found nothing.
        """
        ...

    async def provide(self, key: str) -> bool:
        """Announce this node as a provider of `key`; False if no node stored the record."""
        ...

    async def withdraw(self, key: str) -> None:
        """Best effort: stop announcing `key` (records left elsewhere expire on their own)."""
        ...

    async def claim(self, key: str, ttl: float) -> Provider | None:
        """Claim the upstream fetch of `key` for `ttl` seconds, cluster-wide.

        None: this node holds the claim (it won, or renewed its own) and should fetch. A
        provider: that node already fetches `key`, or announced it holds it; stream from it
        instead. Every node of the cluster gets the same answer while a claim is live.
        """
        ...

    async def release(self, key: str) -> None:
        """Best effort: drop this node's claim of `key` once its fetch ended either way."""
        ...

    def ready(self) -> bool:
        """Whether the router can take requests now (for readiness probes)."""
        ...


class Broadcaster(Protocol):
    """Small messages to every live node of the cluster ("image X:tag was pushed").

    Messages are at most 1 KiB and topics at most 64 bytes (`routing/messages.py`): one
    datagram each over the DHT. Delivery is best effort (no acknowledgement reaches the
    sender); a node down at the time catches up with `recent` when it comes back.
    """

    async def broadcast(self, topic: str, message: bytes) -> None:
        """Send `message` to every live node of the cluster (not this one), best effort;
        returns once the first hop is sent. `ValueError` if too large or a bad topic."""
        ...

    def subscribe(self, topic: str, handler: Callable[[bytes], None]) -> None:
        """`handler(message)` for each message of `topic` from another node, once per message
        (never for this node's own)."""
        ...

    async def recent(self, topic: str) -> list[bytes]:
        """Messages of `topic` the cluster saw lately (asked from a few contacts), oldest
        first: what a node that just (re)started missed."""
        ...
