"""Broadcast over the DHT (real UDP on loopback) and over the in-memory cluster.

Nothing here sleeps to synchronise: a test waits on the subscribers' futures, and checks that a
message came exactly once only after every node's sends were answered or timed out
(`Flooder.settle`), so no copy is still on its way. Times are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Iterable, Sequence

import pytest
import umsgpack
from harness.dht import SEALER, RawPeer, cluster, make_node, raw_peer
from kademlia.node import Node

from mirror.clusterkey import ClusterKey
from mirror.routing.auth import DatagramSealer
from mirror.routing.broadcast import HOP_LIMIT, Flooder
from mirror.routing.dht import DhtNode
from mirror.routing.errors import DhtNotRunning
from mirror.routing.memory import MemoryCluster
from mirror.routing.messages import MAX_MESSAGE_BYTES, MAX_TOPIC_BYTES, RecentLog, SeenIds
from mirror.routing.router import Broadcaster
from mirror.routing.wire import REQUEST

TOPIC = "push"


class Inboxes:
    """What each of `routers` received on `topic`, in order, and waiting for a message."""

    def __init__(self, routers: Sequence[Broadcaster], topic: str = TOPIC) -> None:
        self.received: list[list[bytes]] = [[] for _ in routers]
        # (message, indexes yet to receive it, resolved with the time the last one did)
        self._waiting: list[tuple[bytes, set[int], asyncio.Future[float]]] = []
        for index, router in enumerate(routers):
            router.subscribe(topic, lambda message, i=index: self._got(i, message))

    def _got(self, index: int, message: bytes) -> None:
        self.received[index].append(message)
        for expected, missing, future in self._waiting:
            if expected == message and index in missing:
                missing.discard(index)
                if not missing and not future.done():
                    future.set_result(time.perf_counter())

    async def all_got(self, message: bytes, indexes: Iterable[int], within: float = 10.0) -> float:
        """Wait until each of `indexes` received `message`; returns when the last one did."""
        missing = {index for index in indexes if message not in self.received[index]}
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if not missing:
            return time.perf_counter()
        self._waiting.append((message, missing, future))
        return await asyncio.wait_for(future, within)


async def settled(nodes: Sequence[DhtNode]) -> None:
    """Every broadcast request of every node answered or timed out: no copy left in flight."""
    for node in nodes:
        await node._flooder.settle()


def dropped(node: DhtNode, reason: str) -> float:
    metrics = node._metrics
    assert metrics is not None
    value = metrics.registry.get_sample_value(
        "mirror_dht_dropped_datagrams_total", {"reason": reason}
    )
    return value or 0.0


# ----------------------------------------------------------------- the DHT


async def test_a_broadcast_reaches_each_of_64_nodes_exactly_once() -> None:
    async with cluster(64) as nodes:
        inboxes = Inboxes(nodes)
        origin = random.randrange(64)
        others = [index for index in range(64) if index != origin]
        message = b"registry.test/app:1 pushed"
        started = time.perf_counter()
        await nodes[origin].broadcast(TOPIC, message)
        last = await inboxes.all_got(message, others)
        print(f"\n64 nodes: the last of 63 got it {(last - started) * 1000:.1f} ms after the call")
        await settled(nodes)
        assert inboxes.received[origin] == []
        assert [inboxes.received[index] for index in others] == [[message]] * 63


async def test_dead_nodes_do_not_stop_a_broadcast() -> None:
    async with cluster(64, rpc_timeout=0.1) as nodes:
        dead = set(random.sample(range(3, 64), 6))
        for index in dead:
            await nodes[index].close()  # without a word: they stay in every routing table
        alive = [index for index in range(64) if index not in dead]
        inboxes = Inboxes(nodes)
        origin = random.choice(alive)
        others = [index for index in alive if index != origin]
        started = time.perf_counter()
        await nodes[origin].broadcast(TOPIC, b"with 6 dead")
        assert nodes[origin]._flooder._in_flight  # returned with every send still in flight
        last = await inboxes.all_got(b"with 6 dead", others)
        print(f"\n58 live of 64: the last of 57 got it {(last - started) * 1000:.1f} ms after")
        await settled([nodes[index] for index in alive])
        assert [inboxes.received[index] for index in others] == [[b"with 6 dead"]] * 57
        assert all(inboxes.received[index] == [] for index in dead)


async def test_the_largest_message_fits_and_a_larger_one_is_refused() -> None:
    async with cluster(3) as nodes:
        inboxes = Inboxes(nodes, topic="t" * MAX_TOPIC_BYTES)
        largest = os.urandom(MAX_MESSAGE_BYTES)
        await nodes[0].broadcast("t" * MAX_TOPIC_BYTES, largest)
        await inboxes.all_got(largest, [1, 2])
        with pytest.raises(ValueError, match="at most 1024 bytes"):
            await nodes[0].broadcast(TOPIC, largest + b"!")
        for topic in ("", "t" * (MAX_TOPIC_BYTES + 1), "\u00e9" * 33, "line\nbreak"):
            with pytest.raises(ValueError):
                await nodes[0].broadcast(topic, b"x")
            with pytest.raises(ValueError):
                nodes[0].subscribe(topic, lambda message: None)
        # The largest message also travels in a `recent` page on its own.
        assert await nodes[1].recent("t" * MAX_TOPIC_BYTES) == [largest]
        await settled(nodes)
        assert inboxes.received == [[], [largest], [largest]]


async def test_broadcast_before_listen_raises_a_typed_error() -> None:
    node = make_node(0)
    with pytest.raises(DhtNotRunning):
        await node.broadcast(TOPIC, b"x")
    with pytest.raises(DhtNotRunning):
        await node.recent(TOPIC)
    await node.close()


async def test_a_node_that_joins_later_catches_up_with_recent() -> None:
    async with cluster(16) as nodes:
        inboxes = Inboxes(nodes)
        sent = []
        for number in range(5):  # 600 bytes each: two to a page, so three pages per contact
            message = number.to_bytes(1, "big") * 600
            origin = number % 3
            await nodes[origin].broadcast(TOPIC, message)
            await inboxes.all_got(message, [index for index in range(16) if index != origin])
            sent.append(message)
        await nodes[4].broadcast("other", b"another topic")
        late = make_node(16)
        caught = Inboxes([late])
        await late.listen("127.0.0.1", 0)
        try:
            await late.bootstrap([node.router_address for node in nodes[:3]])
            assert await late.recent(TOPIC) == sent  # oldest first
            assert await late.recent("nothing here") == []
            # It keeps what it caught up on, for the next node that asks.
            kept = late._flooder._log.newest_first(TOPIC)
            assert [entry.body for entry in reversed(kept)] == sent
            assert await nodes[5].recent(TOPIC) == sent
            await settled([*nodes, late])
            assert caught.received == [[]]  # it joined after: nothing was pushed to it
        finally:
            await late.close()


async def test_recent_leaves_out_the_nodes_own_messages() -> None:
    async with cluster(4) as nodes:
        inboxes = Inboxes(nodes)
        await nodes[0].broadcast(TOPIC, b"from 0")
        await inboxes.all_got(b"from 0", [1, 2, 3])
        await nodes[1].broadcast(TOPIC, b"from 1")
        await inboxes.all_got(b"from 1", [0, 2, 3])
        assert await nodes[0].recent(TOPIC) == [b"from 1"]
        assert await nodes[2].recent(TOPIC) == [b"from 0", b"from 1"]


@pytest.fixture
async def lone_node() -> AsyncIterator[DhtNode]:
    node = make_node(100, rpc_timeout=0.05)
    await node.listen("127.0.0.1", 0)
    yield node
    await node.close()


@pytest.fixture
async def peer(lone_node: DhtNode) -> AsyncIterator[RawPeer]:
    peer = await raw_peer(lone_node)
    yield peer
    peer.transport.close()


def broadcast_request(sender: bytes, message: bytes, *, hops: int = 1) -> bytes:
    """An unsealed broadcast request, as a node sends it before sealing."""
    body = umsgpack.packb(["broadcast", [sender, os.urandom(16), sender, TOPIC, hops, message]])
    return REQUEST + os.urandom(20) + body


async def test_a_forged_broadcast_delivers_nothing(lone_node: DhtNode, peer: RawPeer) -> None:
    inboxes = Inboxes([lone_node])
    sender = os.urandom(20)
    other = DatagramSealer(ClusterKey(b"some other cluster's key, 32 b!!").purpose("dht"))
    peer.send(broadcast_request(sender, b"unsealed"))  # plain, as kademlia spoke
    peer.send(other.seal(broadcast_request(sender, b"another cluster's key")))
    peer.send(SEALER.seal(broadcast_request(sender, b"x" * (MAX_MESSAGE_BYTES + 1))))
    peer.send(SEALER.seal(broadcast_request(sender, b"no hops", hops=0)))
    peer.send(SEALER.seal(broadcast_request(sender, b"genuine")))
    # Datagrams are handled in the order sent: the forged ones were handled before this.
    await inboxes.all_got(b"genuine", [0])
    await peer.barrier(lone_node)
    assert inboxes.received == [[b"genuine"]]
    assert dropped(lone_node, "unauthenticated") == 2
    assert dropped(lone_node, "malformed") == 2
    assert lone_node.contact_count() == 1  # only the genuine sender was welcomed


async def test_a_node_without_broadcast_is_neither_blamed_nor_waited_for(
    lone_node: DhtNode, peer: RawPeer
) -> None:
    """An older node drops both RPCs as malformed and never replies (see rpc.REQUESTS): here
    a raw socket that never answers stands for it. It stays in the routing table however often
    it is silent, and `recent` ends within its deadline with nothing."""
    old_id = os.urandom(20)
    assert await peer.call("ping", [old_id]) == lone_node.node_id
    assert [node.id for node in lone_node._table.contacts()] == [old_id]
    for number in range(5):  # more silences than evict a contact that misses pings
        await lone_node.broadcast(TOPIC, bytes([number]))
    await lone_node._flooder.settle()
    started = time.perf_counter()
    assert await lone_node.recent(TOPIC) == []
    print(f"\nrecent from a silent contact: {(time.perf_counter() - started) * 1000:.0f} ms")
    assert [node.id for node in lone_node._table.contacts()] == [old_id]
    requests = 0
    while not peer.inbox.queue.empty():
        payload, _ = SEALER.open(peer.inbox.queue.get_nowait())
        requests += payload[:1] == REQUEST
    assert requests == 6  # five broadcasts and one page of recent


async def test_a_relayed_copy_goes_to_every_contact_but_its_sender_and_origin() -> None:
    sent: list[tuple[bytes, int]] = []

    class Client:
        def broadcast(
            self, node: Node, message_id: bytes, origin: bytes, topic: str, hops: int, body: bytes
        ) -> asyncio.Future[bool | None]:
            sent.append((node.id, hops))
            future: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
            future.set_result(True)
            return future

    class Table:
        def contacts(self) -> list[Node]:
            return [Node(bytes([n]) * 20, "127.0.0.1", 1000 + n) for n in range(1, 6)]

    flooder = Flooder(
        b"\x00" * 20,
        client=Client(),  # type: ignore[arg-type]
        table=Table(),  # type: ignore[arg-type]
        fanout=None,
        rpc_timeout=0.1,
    )
    sender = Node(b"\x01" * 20, "127.0.0.1", 1001)
    origin = b"\x02" * 20
    assert flooder.received(sender, b"m" * 16, origin, TOPIC, 1, b"x")
    assert sorted(sent) == [(bytes([n]) * 20, 2) for n in (3, 4, 5)]
    assert not flooder.received(sender, b"m" * 16, origin, TOPIC, 1, b"x")  # seen
    sent.clear()
    assert flooder.received(sender, b"n" * 16, origin, TOPIC, HOP_LIMIT, b"x")
    assert sent == []  # delivered, not passed on


# ----------------------------------------------------------------- bookkeeping


def test_recent_log_is_bounded_and_expires() -> None:
    now = [1000.0]
    log = RecentLog(clock=lambda: now[0])
    for number in range(70):
        log.keep("a", bytes([number]) * 16, b"o" * 20, bytes([number]), age=0.0)
    kept = log.newest_first("a")
    assert len(kept) == 64
    assert kept[0].body == bytes([69]) and kept[-1].body == bytes([6])
    assert [entry.body for entry in log.newest_first("a", before=kept[1].seq)][:1] == [b"\x43"]
    log.keep("a", b"z" * 16, b"o" * 20, b"old", age=3500.0)
    now[0] += 200.0  # the old one is past an hour now, the others are not
    assert b"old" not in [entry.body for entry in log.newest_first("a")]
    now[0] += 3600.0
    assert log.newest_first("a") == []
    for topic in range(100):
        log.keep(f"t{topic}", bytes([topic]) * 16, b"o" * 20, b"x", age=0.0)
    assert log.newest_first("t0") == []  # only the 64 topics heard of last are kept
    assert len(log.newest_first("t99")) == 1


def test_seen_ids_are_bounded_and_forgotten_after_an_hour() -> None:
    now = [0.0]
    seen = SeenIds(limit=3, clock=lambda: now[0])
    assert seen.first_sight(b"a")
    assert not seen.first_sight(b"a")
    for name in (b"b", b"c", b"d"):
        assert seen.first_sight(name)
    assert len(seen) == 3
    assert seen.first_sight(b"a")  # the oldest went to make room
    now[0] = 3601.0
    assert seen.first_sight(b"d")


# ----------------------------------------------------------------- the in-memory cluster


async def test_memory_routers_broadcast_like_the_dht() -> None:
    cluster = MemoryCluster()
    routers = [cluster.router(bytes([n + 1]) * 20, f"10.0.0.{n + 1}:5000") for n in range(4)]
    inboxes = Inboxes(routers)
    routers[3].down = True
    await routers[0].broadcast(TOPIC, b"one")
    assert inboxes.received == [[], [], [], []]  # delivered after broadcast returns
    await inboxes.all_got(b"one", [1, 2])
    with pytest.raises(ValueError):
        await routers[0].broadcast(TOPIC, b"x" * (MAX_MESSAGE_BYTES + 1))
    await routers[1].broadcast(TOPIC, b"two")
    await inboxes.all_got(b"two", [0, 2])
    routers[3].down = False
    assert await routers[3].recent(TOPIC) == [b"one", b"two"]
    assert await routers[0].recent(TOPIC) == [b"two"]  # never its own
    late = cluster.router(b"\x09" * 20, "10.0.0.9:5000")
    assert await late.recent(TOPIC) == [b"one", b"two"]
    assert await late.recent("other") == []
    # A barrier: a broadcast's deliveries run in order, so once this one is in, no other is due.
    barrier = Inboxes(routers, topic="barrier")
    await late.broadcast("barrier", b"")
    await barrier.all_got(b"", range(4))
    assert inboxes.received == [[b"two"], [b"one"], [b"one", b"two"], []]
    assert ("broadcast", TOPIC) in routers[0].calls and ("recent", TOPIC) in routers[3].calls
