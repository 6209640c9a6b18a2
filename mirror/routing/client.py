"""What this node asks of others: one method per outgoing RPC, arguments in wire order.

The counterpart of handlers.py (what this node answers). Each method returns the endpoint's
future: it resolves to the parsed reply, or None when the peer did not answer in time or
answered nonsense, and never raises, so callers can abandon it at their own deadline.

From kademlia it uses only `Node`: the contact asked (its address, and the routing-table entry
that the answer, or the silence, updates).

A call that credits a contact (`contact=`) reports its answer, late ones too, or its silence
to the routing table through the endpoint (rpc.py), which also times it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TypeVar

from kademlia.node import Node

from mirror.routing import wire
from mirror.routing.router import Provider
from mirror.routing.rpc import Address, RpcEndpoint
from mirror.routing.wire import Found, RecentPage

T = TypeVar("T")


class DhtClient:
    """Typed calls to other nodes over `endpoint`, always sent as node `own_id`."""

    def __init__(self, endpoint: RpcEndpoint, own_id: bytes) -> None:
        self._endpoint = endpoint
        self._own = own_id

    @property
    def own_id(self) -> bytes:
        """The id every call is sent as."""
        return self._own

    def ping(self, address: Address) -> asyncio.Future[bytes | None]:
        """The id of whoever answers at `address` (bootstrap: no contact to credit yet)."""
        return self._endpoint.request(address, "ping", [self._own], wire.node_id)

    def ping_contact(self, node: Node) -> asyncio.Future[bytes | None]:
        """Whether a known contact is still there: its answer or silence updates the table."""
        return self._endpoint.request(
            (node.ip, node.port), "ping", [self._own], wire.node_id, contact=node
        )

    def find_node(self, node: Node, target: bytes) -> asyncio.Future[Found | None]:
        return self._endpoint.request(
            (node.ip, node.port),
            "find_node",
            [self._own, target],
            lambda value: Found(contacts=wire.contacts(value), providers=[]),
            contact=node,
        )

    def get_providers(self, node: Node, key: bytes) -> asyncio.Future[Found | None]:
        return self._endpoint.request(
            (node.ip, node.port), "get_providers", [self._own, key], wire.found, contact=node
        )

    def add_providers(
        self, node: Node, keys: list[bytes], address: str, ttl: float, *, timeout: float
    ) -> asyncio.Future[int | None]:
        """Announce this node as a provider of every one of `keys`; replies how many stored.

        The contact is neither credited nor blamed: silence may be a node that predates this
        RPC (it drops it as malformed, see announce.py), not a dead one.
        """
        own = self._own
        return self._endpoint.request(
            (node.ip, node.port),
            "add_providers",
            [own, keys, own, address, ttl],
            wire.count,
            timeout=timeout,
        )

    def remove_provider(self, node: Node, key: bytes) -> asyncio.Future[bool | None]:
        own = self._own
        return self._endpoint.request(
            (node.ip, node.port), "remove_provider", [own, key, own], wire.boolean, contact=node
        )

    def hand_off(self, node: Node, batch: list[list[object]]) -> asyncio.Future[int | None]:
        """Records `node` is now among the closest to; entries as `wire.hand_off_entry` makes.

        The reply (how many it stored) only matters to tests: callers fire and forget, and the
        contact is not credited either way (it was just welcomed).
        """
        return self._endpoint.request(
            (node.ip, node.port), "hand_off", [self._own, batch], wire.count
        )

    def claim(
        self, node: Node, key: bytes, address: str, ttl: float, *, timeout: float
    ) -> asyncio.Future[Provider | None]:
        """Ask arbiter `node` to record this node as the fetcher of `key`; replies the holder."""
        own = self._own
        return self._endpoint.request(
            (node.ip, node.port),
            "claim",
            [own, key, own, address, ttl],
            wire.claim_holder,
            contact=node,
            timeout=timeout,
        )

    def release(self, node: Node, key: bytes) -> asyncio.Future[bool | None]:
        own = self._own
        return self._endpoint.request(
            (node.ip, node.port), "release", [own, key, own], wire.boolean, contact=node
        )

    def broadcast(
        self, node: Node, message_id: bytes, origin: bytes, topic: str, hops: int, body: bytes
    ) -> asyncio.Future[bool | None]:
        """Pass on a broadcast message; the reply says whether it was new to `node`.

        Fire and forget, and the contact is neither credited nor blamed: silence may be a node
        that predates broadcast (it drops the request as malformed), not a dead one.
        """
        return self._endpoint.request(
            (node.ip, node.port),
            "broadcast",
            [self._own, message_id, origin, topic, hops, body],
            wire.boolean,
        )

    def recent(self, node: Node, topic: str, before: int) -> asyncio.Future[RecentPage | None]:
        """One page of the messages of `topic` that `node` keeps, newest first (0: the newest)."""
        return self._endpoint.request(
            (node.ip, node.port), "recent", [self._own, topic, before], wire.recent_page
        )


async def settle(futures: Iterable[asyncio.Future[T]]) -> list[T]:
    """Results of RPC futures once all resolve; unlike gather, cancelling the caller spares them."""
    pending = list(futures)
    if pending:
        await asyncio.wait(pending)
    return [future.result() for future in pending]
