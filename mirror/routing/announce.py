"""Announcing in batches: the keys a node announces together reach each peer in one message.

Why: while a cluster has fewer than k nodes, every record goes to every node, so a node
announcing an image's keys one `add_provider` at a time sent (and was answered) once per key per
peer, and received as many from each other node. The advertiser announces a pulled image's keys
at once, so each peer now gets one `add_providers` message carrying every key of such a burst.
(The blobs a runtime is sent to fetch are announced as it asks for each, which a CPU-starved
16-node rollout spread 0.3-0.7 s apart: those mostly go alone; docs/benchmarks.md.)

A burst is held while any of its announcements is still looking up its closest nodes, and for
at most `_GATHER_SECONDS` after its first key: a lone announcement goes out at once.

And no peer has two bursts of this node's in flight: keys for a peer that has not answered the
last one yet wait for that answer (or its timeout) and go together, as TCP's Nagle holds small
segments. On a quick network nothing waits; on a CPU-starved one, where a 16-node rollout's
answers took 0.4-0.7 s, the blobs a runtime is sent to fetch one after another mostly share a
datagram per peer instead of taking one each (docs/benchmarks.md). An answer is awaited
a few RPC timeouts (`answer_within`): nobody on a pull's path waits for it, and
the longer a burst is out, the more the next one gathers.

A peer that predates `add_providers` (a rolling upgrade) drops it as malformed and never replies,
so it keeps no records of upgraded nodes until it is upgraded too; lookups still find them, from
the upgraded nodes among the closest. Not answered with single `add_provider`s: a peer that is
merely slow (CPU-starved, its socket backed up) would then get the same keys once more, one
datagram each.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from kademlia.node import Node

from mirror.routing import wire
from mirror.routing.client import DhtClient, settle

# The longest a key waits for the other announcements of its burst to finish their lookups.
_GATHER_SECONDS = 0.05


@dataclass(slots=True)
class _Outgoing:
    """The keys waiting to go to one peer, each with the future its announcer awaits."""

    node: Node
    keys: list[tuple[bytes, asyncio.Future[bool]]] = field(default_factory=list)


class Announcer:
    """Sends this node's provider records to the peers that keep them, a burst at a time."""

    def __init__(
        self, client: DhtClient, *, address: str, ttl: float, answer_within: float
    ) -> None:
        self._client = client
        self._address = address
        self._ttl = ttl
        self._answer_within = answer_within
        self._outgoing: dict[bytes, _Outgoing] = {}
        # Peer id -> its bursts not yet answered, and the keys waiting for those answers.
        self._unanswered: dict[bytes, int] = {}
        self._held: dict[bytes, _Outgoing] = {}
        self._looking_up = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._keys_budget = wire.MAX_BODY_BYTES - wire.packed_size(
            ["add_providers", [client.own_id, [], client.own_id, address, ttl]]
        )

    @contextlib.contextmanager
    def looking_up(self) -> Iterator[None]:
        """Around an announcement's lookup: the burst waits for it (up to the gather bound)."""
        self._looking_up += 1
        try:
            yield
        finally:
            self._looking_up -= 1
            if self._looking_up == 0 and self._outgoing:
                asyncio.get_running_loop().call_soon(self._flush)

    async def announce(self, key: bytes, nodes: list[Node]) -> int:
        """Send this node's record of `key` to `nodes` with the current burst; returns how many
        stored it (a node that did not answer in time counts as not)."""
        if not nodes:
            return 0
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[bool]] = []
        for node in nodes:
            future: asyncio.Future[bool] = loop.create_future()
            self._outgoing.setdefault(node.id, _Outgoing(node)).keys.append((key, future))
            futures.append(future)
        if self._looking_up == 0:
            loop.call_soon(self._flush)
        elif self._deadline is None:
            self._deadline = loop.call_later(_GATHER_SECONDS, self._flush)
        return sum(await settle(futures))

    def close(self) -> None:
        """Resolve every key still waiting as not stored (the node is stopping)."""
        waiting = [*self._outgoing.values(), *self._held.values()]
        self._outgoing, self._held = {}, {}
        self._cancel_deadline()
        for batch in waiting:
            for _, future in batch.keys:
                if not future.done():
                    future.set_result(False)

    def _flush(self) -> None:
        self._cancel_deadline()
        outgoing, self._outgoing = self._outgoing, {}
        for node_id, batch in outgoing.items():
            if self._unanswered.get(node_id):
                self._held.setdefault(node_id, _Outgoing(batch.node)).keys.extend(batch.keys)
            else:
                self._send_all(batch)

    def _send_all(self, batch: _Outgoing) -> None:
        for chunk in wire.batches(batch.keys, self._keys_budget, size=_key_size):
            self._send(batch.node, chunk)

    def _send(self, node: Node, chunk: list[tuple[bytes, asyncio.Future[bool]]]) -> None:
        keys = [key for key, _ in chunk]
        sent = self._client.add_providers(
            node, keys, self._address, self._ttl, timeout=self._answer_within
        )
        self._unanswered[node.id] = self._unanswered.get(node.id, 0) + 1

        def answered(done: asyncio.Future[int | None]) -> None:
            stored = done.result()
            for _, future in chunk:
                if not future.done():
                    future.set_result(stored is not None and stored > 0)
            self._answered(node.id)

        sent.add_done_callback(answered)

    def _answered(self, node_id: bytes) -> None:
        """One burst to `node_id` answered (or timed out): its held keys go once none is left."""
        left = self._unanswered.pop(node_id) - 1
        if left > 0:
            self._unanswered[node_id] = left
            return
        held = self._held.pop(node_id, None)
        if held is not None:
            self._send_all(held)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def _key_size(entry: tuple[bytes, asyncio.Future[bool]]) -> int:
    return wire.packed_size(entry[0])
