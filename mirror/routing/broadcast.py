"""Cluster-wide broadcast of small messages: epidemic flooding over the routing table.

The origin sends a message to every contact in its routing table. A node receiving a message id
for the first time keeps it, hands it to its subscribers and passes it on to every contact of
its own but the sender and the origin; every later copy of that id is acknowledged and dropped.
Each copy carries its hop count, and one that made `HOP_LIMIT` hops is not passed on. The union
of the routing tables reaches every live node, so the flood does too as long as each node is in
some live node's table; a lost copy is made up for by the others (a node receives one copy from
each node that knows it, about as many as it has contacts).

Why every contact and not a bounded random fanout (`DhtSettings.broadcast_fanout`), measured
with bench/broadcast.py (docs/benchmarks.md): at 64 nodes a fanout of 8 missed a live node in 9
of 340 broadcasts (44 of 300 at 128 nodes), and a node missed while up never catches up; 16
missed none of 300, but by probability; every contact reached every live node in all of them,
with 6 of 64 nodes dead too, by construction. It costs about as many copies per node as it has
contacts (32 at 64 nodes, 36 at 128), two datagrams each with the reply: ~16 KB sent per node
for a 300-byte message, nothing at the rate images are pushed. Clusters of several hundred
nodes may set a fanout of 16 to halve that.

Every send is fire and forget: a request whose future nobody awaits, resolved by its reply (True
when the message was new there) or by the RPC timeout. A dead contact costs one pending timer
and delays nobody. Silence is not held against a contact: a node that predates broadcast drops
the request as malformed (`rpc.REQUESTS` has no such name there) and never replies, and must
not be evicted from routing tables for that.

Each node keeps the last messages of each topic with their age (messages.py) and answers the
`recent` RPC with them, one datagram per page, newest first. `Flooder.recent` asks a few random
contacts, pages through what each keeps and merges by message id: how a node that was down
during a broadcast catches up.

From kademlia it uses only `Node` (the contacts, as the routing table gives them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kademlia.node import Node

from mirror.routing import wire
from mirror.routing.client import DhtClient
from mirror.routing.messages import (
    MESSAGE_ID_BYTES,
    RECENT_PER_TOPIC,
    RecentLog,
    SeenIds,
    check_message,
    check_topic,
)
from mirror.routing.table import ContactTable
from mirror.routing.wire import RecentEntry

log = logging.getLogger(__name__)

# A copy that made this many hops is delivered but not passed on: a bound in case ids are
# forgotten mid-flood (`SeenIds` is bounded), never reached otherwise. The first copy a node
# handled had made 1-2 hops (median), at most 5 at 64 nodes and 7 at 128 sharing one core (the
# copy handled first is the one that queued least, not the one with the shortest path); a node
# whose first copy arrives at the limit relays nothing, so the limit is kept well above that.
HOP_LIMIT = 16
# `recent()` asks this many random contacts, pages through what each keeps, and merges.
RECENT_CONTACTS = 3
# ... within this many RPC timeouts in all.
_RECENT_TIMEOUTS = 4

Handler = Callable[[bytes], None]


class Flooder:
    """Node `own_id`'s side of broadcast: originating, relaying, keeping, catching up."""

    def __init__(
        self,
        own_id: bytes,
        *,
        client: DhtClient,
        table: ContactTable,
        fanout: int | None,
        rpc_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._own = own_id
        self._client = client
        self._table = table
        self._fanout = fanout
        self._rpc_timeout = rpc_timeout
        self._clock = clock
        self._log = RecentLog(clock=clock)
        self._seen = SeenIds(clock=clock)
        self._subscribers: dict[str, list[Handler]] = {}
        self._in_flight: set[asyncio.Future[bool | None]] = set()
        # Broadcast requests this node sent (originated and relayed): for benchmarks and tests.
        self.sent = 0

    def subscribe(self, topic: str, handler: Handler) -> None:
        check_topic(topic)
        self._subscribers.setdefault(topic, []).append(handler)

    def originate(self, topic: str, body: bytes) -> int:
        """Send a new message to every contact; returns how many it went to."""
        check_message(topic, body)
        message_id = os.urandom(MESSAGE_ID_BYTES)
        self._seen.first_sight(message_id)
        self._log.keep(topic, message_id, self._own, body, age=0.0)
        return self._send(self._table.contacts(), message_id, self._own, topic, 1, body)

    def received(
        self, sender: Node, message_id: bytes, origin: bytes, topic: str, hops: int, body: bytes
    ) -> bool:
        """A copy from `sender`: on first sight keep, relay and deliver it; True if it was new.

        Relaying happens here, before the reply leaves, so that a sender seeing the reply knows
        the copies passed on are already in flight (what `settle` relies on). Subscribers run
        later, each in a callback of its own: a slow or failing one holds up no datagram.
        """
        if not self._seen.first_sight(message_id):
            return False
        self._log.keep(topic, message_id, origin, body, age=0.0)
        if hops < HOP_LIMIT:
            targets = [
                node for node in self._table.contacts() if node.id not in (sender.id, origin)
            ]
            if self._fanout is not None and len(targets) > self._fanout:
                targets = random.sample(targets, self._fanout)
            self._send(targets, message_id, origin, topic, hops + 1, body)
        if origin != self._own:  # a copy of our own from before a restart: relay only
            self._deliver(topic, body)
        return True

    def page(self, topic: str, before: int) -> wire.Packed:
        """The `recent` reply: what this node keeps of `topic`, newest first, from `before`."""
        kept = self._log.newest_first(topic, before=before)
        entries = (
            (
                entry.seq,
                wire.recent_entry(
                    RecentEntry(entry.message_id, entry.origin, self._log.age(entry), entry.body)
                ),
            )
            for entry in kept
        )
        return wire.recent_reply(entries)

    async def recent(self, topic: str) -> list[bytes]:
        """Messages of `topic` from other nodes that this node or `RECENT_CONTACTS` contacts
        keep, oldest first, within `_RECENT_TIMEOUTS` RPC timeouts.

        Ages are turned into times on this node's clock as each page arrives, so messages from
        different contacts sort together. What comes back counts as seen: a copy of it still in
        flight is not delivered again.
        """
        check_topic(topic)
        contacts = self._table.contacts()
        asked = random.sample(contacts, min(RECENT_CONTACTS, len(contacts)))
        found = _Found()
        for entry in self._log.newest_first(topic):
            found.add(entry.message_id, entry.origin, entry.body, entry.at)
        tasks = [asyncio.ensure_future(self._page_through(node, topic, found)) for node in asked]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=_RECENT_TIMEOUTS * self._rpc_timeout)
            for task in late:
                task.cancel()  # the endpoint ignores replies to a cancelled call
            if late:
                await asyncio.wait(late)
        now = self._clock()
        messages = [kept for kept in found.oldest_first() if kept.origin != self._own]
        for kept in messages:
            if self._seen.first_sight(kept.message_id):
                age = max(0.0, now - kept.at)
                self._log.keep(topic, kept.message_id, kept.origin, kept.body, age=age)
        return [kept.body for kept in messages]

    async def settle(self) -> None:
        """Return once every broadcast request this node sent so far was answered or timed out."""
        while self._in_flight:
            await asyncio.wait(list(self._in_flight))

    # ----------------------------------------------------------------- internals

    def _send(
        self,
        targets: Iterable[Node],
        message_id: bytes,
        origin: bytes,
        topic: str,
        hops: int,
        body: bytes,
    ) -> int:
        sent = 0
        for node in targets:
            future = self._client.broadcast(node, message_id, origin, topic, hops, body)
            self._in_flight.add(future)
            future.add_done_callback(self._in_flight.discard)
            sent += 1
        self.sent += sent
        return sent

    def _deliver(self, topic: str, body: bytes) -> None:
        handlers = self._subscribers.get(topic)
        if not handlers:
            return
        loop = asyncio.get_running_loop()
        for handler in handlers:
            loop.call_soon(_call, handler, topic, body)

    async def _page_through(self, node: Node, topic: str, found: _Found) -> None:
        before = 0
        for _ in range(RECENT_PER_TOPIC):  # a page carries at least one message
            page = await self._client.recent(node, topic, before)
            if page is None:
                return
            arrived = self._clock()
            for entry in page.entries:
                found.add(entry.message_id, entry.origin, entry.body, arrived - entry.age)
            if page.next is None or page.next == 0 or (before and page.next >= before):
                return
            before = page.next


@dataclass(slots=True)
class _Message:
    message_id: bytes
    origin: bytes
    body: bytes
    at: float  # when it was broadcast, on this node's clock (as early as anyone says)


class _Found:
    """Messages gathered by `recent`, merged by id (bounded: a few contacts, each's pages)."""

    def __init__(self) -> None:
        self._by_id: dict[bytes, _Message] = {}

    def add(self, message_id: bytes, origin: bytes, body: bytes, at: float) -> None:
        known = self._by_id.get(message_id)
        if known is None:
            self._by_id[message_id] = _Message(message_id, origin, body, at)
        elif at < known.at:
            known.at = at

    def oldest_first(self) -> list[_Message]:
        return sorted(self._by_id.values(), key=lambda message: message.at)


def _call(handler: Handler, topic: str, body: bytes) -> None:
    try:
        handler(body)
    except Exception:
        log.exception("a subscriber of broadcast topic %r failed", topic)
