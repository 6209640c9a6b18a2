"""The provider DHT over real UDP on loopback: announce, find, withdraw, expire, hand off."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from collections.abc import Callable, Iterable

import pytest
from harness.dht import cluster, make_node, provider, raw_peer
from kademlia.node import Node

from mirror.routing import wire
from mirror.routing.dht import DhtNode
from mirror.routing.errors import DhtNotRunning, Malformed
from mirror.routing.keys import dht_key, distance, stable_node_id
from mirror.routing.router import Provider
from mirror.routing.rpc import LATE_GRACE_TIMEOUTS
from mirror.routing.table import EVICT_AFTER_FAILURES


async def wait_until(condition: Callable[[], bool], *, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def eventually_found(
    node: DhtNode, text: str, expected: Iterable[Provider], *, within: float = 3.0
) -> list[Provider]:
    wanted = set(expected)
    deadline = time.monotonic() + within
    while True:
        found = await node.find_providers(text, want=len(wanted), timeout=0.5)
        if set(found) >= wanted or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.01)


def gauge(node: DhtNode, name: str) -> float:
    metrics = node._metrics
    assert metrics is not None
    value = metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


def test_keys_and_node_ids_are_stable_and_distinct() -> None:
    digest = "sha256:" + "ab" * 32
    assert dht_key(digest) == dht_key(digest)
    assert len(dht_key(digest)) == 20
    assert dht_key(digest) != dht_key("docker.io/library/alpine:3.20")
    assert stable_node_id("10.0.0.1:5000") == stable_node_id("10.0.0.1:5000")
    assert len(stable_node_id("10.0.0.1:5000")) == 20
    assert stable_node_id("10.0.0.1:5000") != stable_node_id("10.0.0.2:5000")
    # Keys and node ids live in separate hash domains.
    assert dht_key("10.0.0.1:5000") != stable_node_id("10.0.0.1:5000")


async def test_operations_before_listen_raise_a_typed_error() -> None:
    node = make_node(0)
    with pytest.raises(DhtNotRunning):
        await node.provide("sha256:x")
    with pytest.raises(DhtNotRunning):
        await node.find_providers("sha256:x")
    await node.withdraw("sha256:x")  # best effort: never raises
    await node.close()


async def test_provide_then_find_from_other_nodes() -> None:
    async with cluster(5) as nodes:
        text = "sha256:" + "01" * 32
        assert await nodes[1].provide(text)
        for node in nodes[2:] + nodes[:1]:
            assert await eventually_found(node, text, [provider(nodes[1])]) == [provider(nodes[1])]
        assert await nodes[1].find_providers(text) == []  # never this node itself


async def test_many_providers_per_key_and_never_self() -> None:
    async with cluster(7) as nodes:
        text = "docker.io/library/alpine:3.20"
        for node in nodes[:6]:
            assert await node.provide(text)
        everyone = {provider(node) for node in nodes[:6]}
        found = await eventually_found(nodes[6], text, everyone)
        assert set(found) == everyone
        for node in nodes[:6]:
            found = await eventually_found(node, text, everyone - {provider(node)})
            assert set(found) == everyone - {provider(node)}


async def test_withdraw_removes_the_record() -> None:
    async with cluster(5) as nodes:
        text = "sha256:" + "02" * 32
        await nodes[0].provide(text)
        await nodes[1].provide(text)
        assert set(await eventually_found(nodes[2], text, map(provider, nodes[:2]))) == {
            provider(nodes[0]),
            provider(nodes[1]),
        }
        await nodes[0].withdraw(text)
        assert await nodes[2].find_providers(text, want=2, timeout=0.5) == [provider(nodes[1])]
        for node in nodes:
            assert provider(nodes[0]) not in node.local_providers(text)


async def test_a_key_announced_moments_ago_is_not_announced_again() -> None:
    """A node announces a blob when it starts fetching it and again when its runtime stored it:
    the second, within a quarter of the record TTL, costs no DHT traffic. A withdrawal in
    between (the fetch failed) makes the next announcement go out."""
    async with cluster(5) as nodes:
        text = "sha256:" + "0a" * 32
        sent = count_calls(nodes[1], "add_providers")
        assert await nodes[1].provide(text)
        first = len(sent)
        assert first > 0
        assert await nodes[1].provide(text)
        assert len(sent) == first
        await nodes[1].withdraw(text)
        assert await nodes[1].provide(text)
        assert len(sent) > first
        assert await eventually_found(nodes[2], text, [provider(nodes[1])]) == [provider(nodes[1])]


def count_calls(node: DhtNode, name: str) -> list[tuple[object, ...]]:
    """The arguments of every `name` call `node`'s client makes from now on."""
    calls: list[tuple[object, ...]] = []
    original = getattr(node._client, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return original(*args, **kwargs)

    setattr(node._client, name, counted)
    return calls


async def test_a_burst_of_announcements_reaches_each_peer_in_one_message() -> None:
    """An image's keys announced together cost each peer one datagram, not one per key."""
    async with cluster(6) as nodes:
        announcer = nodes[2]
        batches = count_calls(announcer, "add_providers")
        texts = [f"sha256:{index:064x}" for index in range(9)]
        assert all(await asyncio.gather(*(announcer.provide(text) for text in texts)))
        peers_messaged = [node for node, *_ in batches]
        assert sorted(node.id for node in peers_messaged) == sorted(
            node.node_id for node in nodes if node is not announcer
        )
        assert len(peers_messaged) == len(set(node.id for node in peers_messaged))
        assert all(len(keys) == len(texts) for _, keys, *_ in batches)
        for node in nodes:
            for text in texts:
                assert provider(announcer) in node.local_providers(text)


async def test_keys_for_a_peer_that_has_not_answered_yet_wait_and_go_together() -> None:
    """A starved peer answers late: what this node announces meanwhile waits for that answer
    and then goes to it in one message, not one per key."""
    async with cluster(4) as nodes:
        announcer = nodes[1]
        gate = asyncio.Event()
        sent: list[tuple[Node, list[bytes]]] = []
        add_providers = announcer._client.add_providers

        def answered_at_the_gate(
            node: Node, keys: list[bytes], address: str, ttl: float, *, timeout: float
        ) -> asyncio.Future[int | None]:
            sent.append((node, keys))
            reply = add_providers(node, keys, address, ttl, timeout=timeout)

            async def held() -> int | None:
                await gate.wait()
                return await reply

            return asyncio.ensure_future(held())

        announcer._client.add_providers = answered_at_the_gate  # type: ignore[method-assign]
        first = asyncio.create_task(announcer.provide("sha256:" + "31" * 32))
        await wait_until(lambda: len(sent) == 3)  # one message to each peer, unanswered
        later = [f"sha256:{n:064x}" for n in (0x32, 0x33, 0x34)]
        providing = [asyncio.create_task(announcer.provide(text)) for text in later]
        await wait_until(lambda: sum(len(b.keys) for b in announcer._announcer._held.values()) == 9)
        assert len(sent) == 3  # held while the first burst is unanswered
        gate.set()
        assert await first and all(await asyncio.gather(*providing))
        assert len(sent) == 6
        assert all(sorted(keys) == sorted(dht_key(text) for text in later) for _, keys in sent[3:])
        for node in nodes:
            assert all(provider(announcer) in node.local_providers(text) for text in later)


async def test_an_announcement_reaches_a_node_that_answers_its_walk_late() -> None:
    """A CPU-starved node answers the announcer's walk after the call's timeout: it is alive
    (in the routing table), so the record still goes to it. Before, only the nodes that
    answered in time got it."""
    async with cluster(4, rpc_timeout=0.05) as nodes:
        announcer, slow = nodes[0], nodes[3]
        await wait_until(lambda: announcer.contact_count() == 3)
        serve = slow._rpc._serve
        loop = asyncio.get_running_loop()

        def walks_answered_late(msg_id: bytes, data: object, address: object) -> None:
            if isinstance(data, list) and data and data[0] == "find_node":
                loop.call_later(0.5, serve, msg_id, data, address)
            else:
                serve(msg_id, data, address)

        slow._rpc._serve = walks_answered_late  # type: ignore[method-assign,assignment]
        text = "sha256:" + "35" * 32
        assert await announcer.provide(text)
        assert provider(announcer) in slow.local_providers(text)


async def test_a_lone_announcement_is_not_held_back() -> None:
    """Nothing else to gather: the records go out as soon as the lookup ends, and a lookup
    running elsewhere holds a burst back no longer than the gather bound."""
    async with cluster(4) as nodes:
        started = time.monotonic()
        assert await nodes[0].provide("sha256:" + "1d" * 32)
        assert time.monotonic() - started < 0.5
        with nodes[0]._announcer.looking_up():  # a lookup that never ends
            started = time.monotonic()
            assert await nodes[0].provide("sha256:" + "1e" * 32)
            assert time.monotonic() - started < 0.5
        for node in nodes[1:]:
            assert provider(nodes[0]) in node.local_providers("sha256:" + "1e" * 32)


async def test_a_node_that_predates_batches_still_finds_the_records() -> None:
    """A rolling upgrade: an older node drops `add_providers` as malformed and stores nothing
    of the upgraded node's, yet its lookups find the records on the upgraded nodes, and the
    single `add_provider` it announces with is still stored by them."""
    async with cluster(4) as nodes:
        older = nodes[3]
        serve = older._rpc._serve

        def as_older_node(msg_id: bytes, data: object, address: object) -> None:
            if isinstance(data, list) and data and data[0] == "add_providers":
                raise Malformed("unknown RPC 'add_providers'")
            serve(msg_id, data, address)

        older._rpc._serve = as_older_node  # type: ignore[method-assign,assignment]
        text = "sha256:" + "2a" * 32
        assert await nodes[0].provide(text)
        assert older.local_providers(text) == []
        assert provider(nodes[0]) in await eventually_found(older, text, [provider(nodes[0])])
        theirs = "sha256:" + "2b" * 32
        own = older.node_id
        for node in nodes[:3]:
            args = [own, dht_key(theirs), own, older.http_address, 60.0]
            stored = older._rpc.request(node.router_address, "add_provider", args, wire.boolean)
            assert await stored is True
            assert node.local_providers(theirs) == [provider(older)]


async def test_keys_announced_long_ago_are_forgotten_as_new_ones_come() -> None:
    """The memory of what was announced holds only fresh keys (it stays as small as the
    announcements of the last quarter TTL), and a key no longer fresh is announced again."""
    async with cluster(3) as nodes:
        old, new = "sha256:" + "0b" * 32, "sha256:" + "0c" * 32
        assert await nodes[0].provide(old)
        fresh = nodes[0]._settings.record_ttl / 4
        # As if `old` had been announced a quarter TTL ago.
        nodes[0]._provided[dht_key(old)] -= fresh
        assert await nodes[0].provide(new)
        assert list(nodes[0]._provided) == [dht_key(new)]
        assert await nodes[0].provide(old)
        assert list(nodes[0]._provided) == [dht_key(new), dht_key(old)]


async def test_records_expire_unless_reannounced() -> None:
    async with cluster(4, record_ttl=0.3) as nodes:
        text = "sha256:" + "03" * 32
        await nodes[0].provide(text)
        assert await eventually_found(nodes[1], text, [provider(nodes[0])]) == [provider(nodes[0])]
        assert sum(gauge(node, "mirror_dht_provider_records") for node in nodes) >= 1

        async def gone() -> bool:
            return await nodes[1].find_providers(text, want=1, timeout=0.2) == []

        deadline = time.monotonic() + 3
        while not await gone():
            assert time.monotonic() < deadline, "record never expired"
            await asyncio.sleep(0.01)
        # The expiry timer, not only reads, drops records: the gauges return to zero.
        await wait_until(
            lambda: all(gauge(node, "mirror_dht_provider_records") == 0 for node in nodes)
        )
        # The owner announcing again brings it back.
        await nodes[0].provide(text)
        assert await eventually_found(nodes[1], text, [provider(nodes[0])]) == [provider(nodes[0])]


async def test_records_are_handed_to_a_closer_node_that_joins_later() -> None:
    text = "sha256:" + "04" * 32
    key = dht_key(text)
    async with cluster(5, ksize=2) as nodes:
        await nodes[0].provide(text)
        holders = [node for node in nodes if provider(nodes[0]) in node.local_providers(text)]
        assert holders, "nobody stored the record"
        # An id one bit away from the key: closer to it than every existing node.
        newcomer = make_node(99, node_id=key[:-1] + bytes([key[-1] ^ 1]), ksize=2)
        assert all(distance(newcomer.node_id, key) < distance(node.node_id, key) for node in nodes)
        # The hand-off decision is by the key itself: a node at the far end of the id space
        # gets nothing, the newcomer next to the key gets the record.
        far = Node(bytes(byte ^ 0xFF for byte in key), "127.0.0.1", 9)
        near = Node(newcomer.node_id, "127.0.0.1", 9)
        for holder in holders:
            table = holder._table
            assert [r.key for r in table._records_for(far)] == []
            assert [r.provider for r in table._records_for(near)] == [provider(nodes[0])]
        await newcomer.listen("127.0.0.1", 0)
        try:
            await newcomer.bootstrap([nodes[0].router_address])
            await wait_until(lambda: provider(nodes[0]) in newcomer.local_providers(text))
            # Local records first: no network round needed to answer.
            assert await newcomer.find_providers(text, want=1) == [provider(nodes[0])]
        finally:
            await newcomer.close()


async def test_restarted_node_keeps_its_id_and_its_place() -> None:
    async with cluster(4) as nodes:
        text = "sha256:" + "05" * 32
        await nodes[0].provide(text)
        old = nodes[2]
        host, port = old.router_address
        assert old.node_id == stable_node_id(old.http_address)
        await old.close()
        restarted = make_node(2)
        nodes[2] = restarted  # closed by the cluster context
        assert restarted.node_id == old.node_id
        await restarted.listen(host, port)
        await restarted.bootstrap([nodes[0].router_address, (host, port)])
        assert restarted.contact_count() == 3
        assert await eventually_found(restarted, text, [provider(nodes[0])]) == [provider(nodes[0])]


async def test_waiting_for_a_contact_ends_when_the_first_peer_is_welcomed() -> None:
    async with cluster(1) as (alone,):
        waiting = asyncio.create_task(alone.wait_for_contact())
        await asyncio.sleep(0)
        assert not waiting.done()
        newcomer = make_node(1)
        await newcomer.listen("127.0.0.1", 0)
        try:
            await newcomer.bootstrap([alone.router_address])  # its ping welcomes it there
            await asyncio.wait_for(waiting, timeout=5)
            await newcomer.wait_for_contact()  # it knows one too, and says so at once
        finally:
            await newcomer.close()


async def test_own_address_in_the_bootstrap_list_is_never_a_contact() -> None:
    async with cluster(3) as nodes:
        for node in nodes:
            # Each node's seed list named itself (the first three are the seeds).
            assert node.contact_count() == 2
            router = node._table.routing
            ids = {contact.id for bucket in router.buckets for contact in bucket.get_nodes()}
            assert node.node_id not in ids
            assert gauge(node, "mirror_dht_contacts") == 2


async def test_bootstrap_with_dead_addresses_is_bounded() -> None:
    node = make_node(0, rpc_timeout=0.05)
    await node.listen("127.0.0.1", 0)
    try:
        started = time.monotonic()
        dead = [("127.0.0.1", 9), ("127.0.0.1", 1), ("no-such-host.invalid", 7000)]
        assert await node.bootstrap(dead) == 0
        assert time.monotonic() - started < 1.0
    finally:
        await node.close()


async def test_sixty_four_nodes_find_and_miss_within_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    rng = random.Random(7)
    async with cluster(64) as nodes:
        texts = [f"sha256:{index:064x}" for index in range(64)]
        for node, text in zip(nodes, texts, strict=True):
            assert await node.provide(text)
        for index, text in enumerate(texts):
            asker = nodes[(index + rng.randrange(1, 64)) % 64]
            found = await asker.find_providers(text, want=1, timeout=0.5)
            assert found == [provider(nodes[index])], f"node {index}'s key not found"

        # Eight nodes die without telling anyone: they stay in the others' routing tables.
        dead = set(rng.sample(range(8, 64), 8))
        for index in dead:
            await nodes[index].close()
        alive = [node for index, node in enumerate(nodes) if index not in dead]
        resolve_timeout = 0.02
        # Generous for a loaded 2-CPU machine, and still below the 0.25 s RPC timeout a lookup
        # without its deadline would wait on a dead node.
        slack = 0.2
        durations = []
        for attempt in range(12):
            asker = alive[attempt]
            started = time.perf_counter()
            assert await asker.find_providers(f"sha256:missing-{attempt}") == []
            durations.append(time.perf_counter() - started)
        assert max(durations) < resolve_timeout + slack, durations
        # The misses did run into dead nodes and were cut by the deadline, not by luck.
        assert max(durations) >= 0.8 * resolve_timeout, durations
        # Keys of live providers are still found past the dead ones.
        for index in range(8):
            found = await alive[-1 - index].find_providers(texts[index], want=1, timeout=0.5)
            assert provider(nodes[index]) in found

        # Abandoned RPCs then time out quietly: no "InvalidStateError", no stray task errors.
        await wait_until(lambda: not any(node._rpc._pending for node in alive), within=8.0)
        gc.collect()
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []


async def test_an_announcement_in_a_small_cluster_asks_alpha_nodes_and_reaches_all() -> None:
    async with cluster(9) as nodes:
        announcer = nodes[4]
        # The cluster bootstraps from three seeds: the announcer learns of the rest as they
        # come, and its table holds all eight others once each has asked it something.
        for node in nodes:
            await node.find_providers("sha256:" + "0b" * 32, timeout=0.5)
        await wait_until(lambda: announcer._table.contact_count() == 8)
        asked = count_calls(announcer, "find_node")
        text = "sha256:" + "0c" * 32
        assert await announcer.provide(text)
        # Nine nodes, fewer than k: every node knows every other, so three answers suffice...
        assert len(asked) == announcer._settings.alpha
        # ...and the record still went to every other node, each now answering from its own store.
        for node in nodes:
            if node is not announcer:
                held = node._store.providers(dht_key(text), exclude=(), limit=10)
                assert provider(announcer) in held


async def test_a_small_network_known_whole_announces_and_finds_without_asking() -> None:
    """Fewer than k nodes, all in the table, as a walk found lately: every record was sent to
    every node, so an announcement goes to the table's nodes without a walk, and a lookup of a
    key with a local record asks nobody. A miss is still asked (the records may predate a
    restart), and a contact the table did not hold means a walk again."""
    async with cluster(6) as nodes:
        announcer, finder = nodes[4], nodes[1]
        for node in nodes:
            await node.find_providers("sha256:" + "0d" * 32, timeout=0.5)
        await wait_until(lambda: all(node.contact_count() == 5 for node in nodes))
        assert await announcer.provide("sha256:" + "0e" * 32)  # one walk: the table is whole
        walks = count_calls(announcer, "find_node")
        text = "sha256:" + "0f" * 32
        assert await announcer.provide(text)
        assert walks == []
        assert provider(announcer) in finder.local_providers(text)
        finder_walks = count_calls(finder, "find_node")
        await finder.provide("sha256:" + "10" * 32)  # the finder's table is vouched for too
        asked = count_calls(finder, "get_providers")
        assert await finder.find_providers(text, want=3, timeout=0.5) == [provider(announcer)]
        assert asked == []
        assert await finder.find_providers("sha256:" + "11" * 32, timeout=0.5) == []
        assert asked != []  # nothing here: asked
        assert await finder.claim("sha256:" + "12" * 32) is None
        assert len(finder_walks) <= finder._settings.alpha  # its first walk, none for the claim

        newcomer = make_node(6)
        await newcomer.listen("127.0.0.1", 0)
        try:
            await newcomer.bootstrap([nodes[0].router_address])
            await wait_until(lambda: announcer.contact_count() == 6)
            assert await announcer.provide("sha256:" + "13" * 32)
            assert walks != []  # somebody new: walked again
            assert provider(announcer) in newcomer.local_providers("sha256:" + "13" * 32)
        finally:
            await newcomer.close()


async def test_a_contact_that_answers_late_stays_and_one_that_never_answers_leaves() -> None:
    """A CPU-starved node answers after its caller's timeout: the reply still counts (its round
    trip as measured), and the node stays in the table however many calls it answers late.
    Only calls never answered within the grace count towards eviction."""
    rpc_timeout = 0.05
    node = make_node(0, rpc_timeout=rpc_timeout)
    await node.listen("127.0.0.1", 0)
    try:
        peer = await raw_peer(node)
        peer_id = stable_node_id("10.9.9.9:5000")
        await peer.call("ping", [peer_id])  # its request makes it a contact
        assert node.contact_count() == 1
        (contact,) = node._table.contacts()
        for _ in range(EVICT_AFTER_FAILURES + 1):
            asked = node._client.ping_contact(contact)
            msg_id, name, _ = await peer.next_request()
            assert name == "ping"
            assert await asked is None  # the caller stopped waiting...
            peer.answer(msg_id, peer_id)  # ...and the answer comes after
            await peer.barrier(node)
            assert node.contact_count() == 1
        round_trip = node._table.round_trips.get(peer_id)
        assert round_trip is not None and round_trip >= rpc_timeout
        silence_began = time.monotonic()
        for _ in range(EVICT_AFTER_FAILURES):
            assert await node._client.ping_contact(contact) is None
            await peer.next_request()  # asked, never answered
        assert node.contact_count() == 1  # not yet: a late answer may still come
        await wait_until(lambda: node.contact_count() == 0)
        assert time.monotonic() - silence_began >= LATE_GRACE_TIMEOUTS * rpc_timeout
        peer.transport.close()
    finally:
        await node.close()
