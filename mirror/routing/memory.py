"""An in-memory `Router`: a whole cluster's provider records and claims in one process.

For unit tests of whatever depends on routing (the content service, the advertiser, the peer
fetcher): no sockets, no timers, answers at once and deterministically. Several routers
sharing one `MemoryCluster` see each other's records, as nodes of one DHT do. A router can be
taken down (`down = True`) to stand for a node the cluster cannot reach: its records are still
listed (as a dead node's are until they expire) but it answers nothing itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mirror.routing.router import Provider


@dataclass(slots=True)
class _Claim:
    holder: Provider
    expires_at: float


@dataclass(slots=True)
class MemoryCluster:
    """The records every `MemoryRouter` of one test cluster shares."""

    clock: Callable[[], float] = time.monotonic
    providers: dict[str, dict[bytes, Provider]] = field(default_factory=dict)
    claims: dict[str, _Claim] = field(default_factory=dict)

    def router(self, node_id: bytes, address: str) -> MemoryRouter:
        """A new node of this cluster."""
        return MemoryRouter(self, Provider(node_id, address))

    def holder(self, key: str) -> Provider | None:
        """The live claim of `key`, if any (for tests to inspect)."""
        claim = self.claims.get(key)
        if claim is None or claim.expires_at <= self.clock():
            return None
        return claim.holder


class MemoryRouter:
    """One node's view of a `MemoryCluster`; implements `Router`."""

    def __init__(self, cluster: MemoryCluster, me: Provider) -> None:
        self.cluster = cluster
        self.me = me
        self.down = False
        # Every call in order, as (operation, key): what a test asserts the caller did.
        self.calls: list[tuple[str, str]] = []

    async def find_providers(self, key: str, want: int = 2) -> list[Provider]:
        self.calls.append(("find_providers", key))
        if self.down:
            return []
        found = self.cluster.providers.get(key, {})
        return [provider for node_id, provider in found.items() if node_id != self.me.node_id]

    async def provide(self, key: str) -> bool:
        self.calls.append(("provide", key))
        if self.down:
            return False
        self.cluster.providers.setdefault(key, {})[self.me.node_id] = self.me
        return True

    async def withdraw(self, key: str) -> None:
        self.calls.append(("withdraw", key))
        held = self.cluster.providers.get(key, {})
        held.pop(self.me.node_id, None)
        if not held:
            self.cluster.providers.pop(key, None)

    async def claim(self, key: str, ttl: float) -> Provider | None:
        self.calls.append(("claim", key))
        if self.down:
            return None  # no arbiter answers: the node fetches alone, as the DHT's does
        holder = self.cluster.holder(key)
        if holder is not None and holder.node_id != self.me.node_id:
            return holder
        self.cluster.claims[key] = _Claim(self.me, self.cluster.clock() + ttl)
        return None

    async def release(self, key: str) -> None:
        self.calls.append(("release", key))
        claim = self.cluster.claims.get(key)
        if claim is not None and claim.holder.node_id == self.me.node_id:
            del self.cluster.claims[key]

    def ready(self) -> bool:
        return not self.down

    def announced(self) -> set[str]:
        """Keys this node is a provider of now."""
        return {
            key for key, providers in self.cluster.providers.items() if self.me.node_id in providers
        }
