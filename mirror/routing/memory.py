"""An in-memory `Router` and `Broadcaster`: a whole cluster's records, claims and broadcast
messages in one process.

For unit tests of whatever depends on routing (the content service, the advertiser, the peer
fetcher, the distributor): no sockets, no timers, answers at once and deterministically. Several
routers sharing one `MemoryCluster` see each other's records, as nodes of one DHT do. A router
can be taken down (`down = True`) to stand for a node the cluster cannot reach: its records are
still listed (as a dead node's are until they expire) but it answers nothing itself, sends no
broadcast and receives none.

A broadcast reaches every other router of the cluster that is up, once, each in a callback of
its own (`loop.call_soon`, so after `broadcast` returns, as over the network); the cluster keeps
the recent messages (messages.py: the same limits and retention as the DHT's nodes) for
`recent`, which is how a router added later, or brought back up, catches up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mirror.routing.messages import MESSAGE_ID_BYTES, RecentLog, check_message, check_topic
from mirror.routing.router import Provider

log = logging.getLogger(__name__)


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
    # Every router made on this cluster, by node id: whom a broadcast goes to.
    members: dict[bytes, MemoryRouter] = field(default_factory=dict)
    messages: RecentLog = field(init=False)

    def __post_init__(self) -> None:
        self.messages = RecentLog(clock=self.clock)

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
        # Every call in order, as (operation, key or topic): what a test asserts the caller did.
        self.calls: list[tuple[str, str]] = []
        self._subscribers: dict[str, list[Callable[[bytes], None]]] = {}
        cluster.members[me.node_id] = self

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
        if holder is None:  # a node that holds it is named, as the DHT's arbiter does
            held = self.cluster.providers.get(key, {})
            others = [p for node_id, p in held.items() if node_id != self.me.node_id]
            if others:
                return others[-1]
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

    # ----------------------------------------------------------------- Broadcaster

    async def broadcast(self, topic: str, message: bytes) -> None:
        check_message(topic, message)
        self.calls.append(("broadcast", topic))
        if self.down:
            return  # nobody hears a node the cluster cannot reach
        message_id = os.urandom(MESSAGE_ID_BYTES)
        self.cluster.messages.keep(topic, message_id, self.me.node_id, message, age=0.0)
        loop = asyncio.get_running_loop()
        for member in self.cluster.members.values():
            if member is not self and not member.down:
                loop.call_soon(member._receive, topic, message)

    def subscribe(self, topic: str, handler: Callable[[bytes], None]) -> None:
        check_topic(topic)
        self._subscribers.setdefault(topic, []).append(handler)

    async def recent(self, topic: str) -> list[bytes]:
        check_topic(topic)
        self.calls.append(("recent", topic))
        if self.down:
            return []
        kept = self.cluster.messages.newest_first(topic)
        return [entry.body for entry in reversed(kept) if entry.origin != self.me.node_id]

    def _receive(self, topic: str, message: bytes) -> None:
        if self.down:
            return  # went down after the broadcast
        for handler in list(self._subscribers.get(topic, ())):
            try:
                handler(message)
            except Exception:
                log.exception("a subscriber of broadcast topic %r failed", topic)
