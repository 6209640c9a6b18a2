"""DHT datagram authentication and hygiene, probed from a raw UDP socket.

The raw peer speaks the wire format directly (sealed or not), so each test shows what a node
does with exactly one crafted datagram: drop it under the right reason, or answer it.
A sealed ping carrying the node's own id serves as a barrier: loopback delivers in order and the
node handles datagrams in order, so its reply means every datagram sent before was processed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator

import pytest
import umsgpack
from harness.dht import KEY, SEALER, RawPeer, raw_peer

from mirror.clusterkey import FRESHNESS_SECONDS as FRESHNESS_WINDOW
from mirror.clusterkey import ClusterKey, ReplayGuard
from mirror.metrics import Metrics
from mirror.routing.auth import SEAL_OVERHEAD, DatagramSealer
from mirror.routing.dht import DhtNode
from mirror.routing.errors import Stale, Unauthenticated
from mirror.routing.keys import dht_key, stable_node_id
from mirror.routing.router import Provider
from mirror.routing.wire import (
    HEADER_BYTES,
    MAX_BODY_BYTES,
    MAX_DATAGRAM_BYTES,
    REQUEST,
    HandOffRecord,
    batches,
    hand_off_entry,
    packed_size,
)

OTHER_KEY = ClusterKey(b"some other cluster's key, 32 b!!")
REASONS = ("unauthenticated", "stale", "replayed", "malformed")


@pytest.fixture
async def node() -> AsyncIterator[DhtNode]:
    address = "10.9.0.1:5000"
    node = DhtNode(
        node_id=stable_node_id(address),
        http_address=address,
        cluster_key=KEY,
        metrics=Metrics(),
    )
    await node.listen("127.0.0.1", 0)
    yield node
    await node.close()


@pytest.fixture
async def peer(node: DhtNode) -> AsyncIterator[RawPeer]:
    peer = await raw_peer(node)
    yield peer
    peer.transport.close()


def dropped(node: DhtNode) -> dict[str, float]:
    metrics = node._metrics
    assert metrics is not None
    return {
        reason: metrics.registry.get_sample_value(
            "mirror_dht_dropped_datagrams_total", {"reason": reason}
        )
        or 0.0
        for reason in REASONS
    }


def fake_id() -> bytes:
    return os.urandom(20)


def test_sealer_round_trip_and_tampering() -> None:
    sealed = SEALER.seal(b"payload")
    assert SEALER.open(sealed)[0] == b"payload"
    tampered = bytes([sealed[0] ^ 1]) + sealed[1:]
    for bad in (tampered, sealed[:-1], b"", DatagramSealer(OTHER_KEY.purpose("dht")).seal(b"x")):
        with pytest.raises(Unauthenticated):
            SEALER.open(bad)
    # Same key, another purpose: a MAC made for HTTP signatures is no DHT seal.
    with pytest.raises(Unauthenticated):
        SEALER.open(DatagramSealer(KEY.purpose("http")).seal(b"payload"))
    now = time.time()
    for skew in (-FRESHNESS_WINDOW - 1, FRESHNESS_WINDOW + 1):
        with pytest.raises(Stale):
            SEALER.open(SEALER.seal(b"payload", now=now + skew), now=now)


def test_replay_guard_forgets_ids_once_they_would_be_stale() -> None:
    guard = ReplayGuard(window=30)
    assert guard.first_use(b"a" * 20, sent_at=100.0, now=100.0)
    assert not guard.first_use(b"a" * 20, sent_at=100.0, now=120.0)
    assert guard.first_use(b"b" * 20, sent_at=131.0, now=131.0)  # prunes "a" (stale from 130 on)
    assert len(guard) == 1


def test_packed_size_matches_umsgpack() -> None:
    values: list[object] = [b"", b"x" * 20, b"x" * 255, b"x" * 256, b"x" * 70000, "", "a" * 31]
    values += ["a" * 32, "\u00e9" * 20, "a" * 255, "a" * 256, "a" * 70000, 1.5, True, None]
    values += [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, -1, -32, -33, -128, -129]
    values += [-(2**15), -(2**15) - 1, -(2**31), -(2**31) - 1, [], [1] * 15, [1] * 16]
    values += [[[b"x" * 20, "127.0.0.1", 40000]] * 12, list(range(70000))]
    for value in values:
        assert packed_size(value) == len(umsgpack.packb(value)), repr(value)[:40]


def test_hand_off_batches_each_fit_one_datagram() -> None:
    sender = fake_id()
    records = [
        HandOffRecord(fake_id(), Provider(fake_id(), "h" * 240 + f".{n}:5000"), 600.0)
        for n in range(40)
    ]
    budget = MAX_BODY_BYTES - packed_size(["hand_off", [sender, []]])
    split = batches([hand_off_entry(record) for record in records], budget)
    assert len(split) > 1
    assert sum(map(len, split)) == len(records)
    for batch in split:
        body = umsgpack.packb(["hand_off", [sender, batch]])
        assert HEADER_BYTES + len(body) + SEAL_OVERHEAD <= MAX_DATAGRAM_BYTES


async def test_bad_mac_and_unsealed_datagrams_are_dropped(node: DhtNode, peer: RawPeer) -> None:
    before = node.contact_count()
    other = DatagramSealer(OTHER_KEY.purpose("dht"))
    intruder = fake_id()
    text = "sha256:" + "aa" * 32
    body = umsgpack.packb(
        ["add_provider", [intruder, dht_key(text), intruder, "6.6.6.6:80", 600.0]]
    )
    peer.send(other.seal(REQUEST + os.urandom(20) + body))  # wrong key
    peer.send(REQUEST + os.urandom(20) + body)  # kademlia's plain format: no seal at all
    peer.send(REQUEST + os.urandom(20) + body + os.urandom(40))  # a seal of random bytes
    peer.send(b"\x00")  # (asyncio never sends an empty datagram)
    # What broke plain kademlia: a spoofed store with a fake node id.
    peer.send(REQUEST + os.urandom(20) + umsgpack.packb(["store", [intruder, b"k" * 20, 1]]))
    await peer.barrier(node)
    assert dropped(node)["unauthenticated"] == 5
    assert node.contact_count() == before
    assert node.local_providers(text) == []


async def test_replayed_request_is_dropped(node: DhtNode, peer: RawPeer) -> None:
    sender = fake_id()
    datagram = SEALER.seal(REQUEST + os.urandom(20) + umsgpack.packb(["ping", [sender]]))
    peer.send(datagram)
    _, _, body = await peer.reply()
    assert body == node.node_id
    assert node.contact_count() == 1  # a genuine first ping is welcome
    peer.send(datagram)
    barrier = peer.request("ping", [node.node_id])
    _, reply_id, _ = await peer.reply()
    assert reply_id == barrier  # the first reply after the replay is the barrier's: it got none
    assert dropped(node)["replayed"] == 1
    assert node.contact_count() == 1


async def test_stale_datagrams_are_dropped(node: DhtNode, peer: RawPeer) -> None:
    now = time.time()
    peer.request("ping", [fake_id()], now=now - FRESHNESS_WINDOW - 5)
    peer.request("ping", [fake_id()], now=now + FRESHNESS_WINDOW + 5)
    await peer.barrier(node)
    assert dropped(node)["stale"] == 2
    assert node.contact_count() == 0


async def test_malformed_authentic_datagrams_are_dropped(
    node: DhtNode, peer: RawPeer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sender = fake_id()
    key = dht_key("sha256:" + "bb" * 32)
    bodies = [
        b"\xc1",  # reserved msgpack code
        b"\x92\x01",  # truncated array
        b"\x91" * 3000 + b"\xc0",  # nesting deep enough to blow the recursion limit
        umsgpack.packb(["ping", [sender]]) + b"\x00",  # trailing bytes
        umsgpack.packb("ping"),  # not [name, args]
        umsgpack.packb(["ping", sender]),  # args not a list
        umsgpack.packb(["stun", []]),  # rpcudp built-in, not served
        umsgpack.packb(["no_such_rpc", []]),
        umsgpack.packb(["ping", [sender, sender]]),  # wrong arity
        umsgpack.packb(["ping", [b"short id"]]),
        umsgpack.packb(["ping", ["a text id of twenty!"]]),
        umsgpack.packb(["find_node", [sender, "not a key"]]),
        umsgpack.packb(["get_providers", [sender, [key]]]),
        umsgpack.packb(["add_provider", [sender, key, sender, 5000, 600.0]]),  # address int
        umsgpack.packb(["add_provider", [sender, key, sender, "no-port", 600.0]]),
        umsgpack.packb(["add_provider", [sender, key, sender, "h:70000", 600.0]]),
        umsgpack.packb(["add_provider", [sender, key, sender, "h:80", "600"]]),  # ttl str
        umsgpack.packb(["add_provider", [sender, key, sender, "h:80", -1.0]]),
        umsgpack.packb(["add_provider", [sender, key, sender, "h:80", True]]),
        umsgpack.packb(["add_providers", [sender, [], sender, "h:80", 600.0]]),  # no keys
        umsgpack.packb(["add_providers", [sender, key, sender, "h:80", 600.0]]),  # not a list
        umsgpack.packb(["add_providers", [sender, [key, b"short"], sender, "h:80", 600.0]]),
        umsgpack.packb(["add_providers", [sender, [key, [key]], sender, "h:80", 600.0]]),
        umsgpack.packb(["add_providers", [sender, [key], sender, "h:80", 0]]),
        umsgpack.packb(["add_providers", [sender, [key], sender, "h:80"]]),  # arity
        umsgpack.packb(["hand_off", [sender, [[key, sender, "h:80"]]]]),  # 3 fields, not 4
        umsgpack.packb(["hand_off", [sender, [[key, sender, "h:80", 1.0, 2]]]]),
    ]
    for body in bodies:
        peer.send(SEALER.seal(REQUEST + os.urandom(20) + body))
    peer.send(SEALER.seal(b"\x00short"))  # shorter than the header
    peer.send(SEALER.seal(b"\x07" + os.urandom(20) + umsgpack.packb(["ping", [sender]])))
    await peer.barrier(node)
    assert dropped(node) == {
        "unauthenticated": 0,
        "stale": 0,
        "replayed": 0,
        "malformed": len(bodies) + 2,
    }
    assert node.contact_count() == 0
    assert node._store.stored_keys() == []
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


async def test_a_node_can_only_announce_itself(node: DhtNode, peer: RawPeer) -> None:
    text = "sha256:" + "cc" * 32
    key = dht_key(text)
    sender, victim = fake_id(), fake_id()
    assert await peer.call("add_provider", [sender, key, victim, "6.6.6.6:80", 600.0]) is False
    assert await peer.call("add_providers", [sender, [key], victim, "6.6.6.6:80", 600.0]) == 0
    assert await peer.call("remove_provider", [sender, key, victim]) is False
    assert await peer.call(
        "add_provider", [node.node_id, key, node.node_id, "6.6.6.6:80", 9.0]
    ) is (False)
    assert node.local_providers(text) == []
    assert node.contact_count() == 0
    # Plain kademlia values are refused outright.
    assert await peer.call("store", [sender, key, b"value"]) is False
    # The honest form is accepted.
    assert await peer.call("add_provider", [sender, key, sender, "10.1.1.1:5000", 600.0]) is True
    assert node.local_providers(text) == [Provider(sender, "10.1.1.1:5000")]
    other = "sha256:" + "ce" * 32
    both = [key, dht_key(other)]
    assert await peer.call("add_providers", [sender, both, sender, "h:1", 9.0]) == 2
    assert node.local_providers(other) == [Provider(sender, "h:1")]


@pytest.mark.parametrize(
    "address",
    ["10.1.{i}.1:5000", "node-{i}." + "x" * 230 + ".example:5000"],
    ids=["ip", "255-char-hostname"],
)
async def test_get_providers_reply_fits_one_datagram(
    node: DhtNode, peer: RawPeer, address: str
) -> None:
    text = "sha256:" + "dd" * 32
    key = dht_key(text)
    for index in range(50):
        provider_id = fake_id()
        record = [provider_id, key, provider_id, address.format(i=index)[-255:], 600.0]
        assert await peer.call("add_provider", record) is True
    assert len(node.local_providers(text)) == 50
    assert node.contact_count() >= 12
    # Another socket asks, so the announcers (all at the first peer's address) count as contacts.
    asker = await raw_peer(node)
    try:
        msg_id = asker.request("get_providers", [fake_id(), key])
        raw, reply_id, body = await asker.reply()
    finally:
        asker.transport.close()
    assert reply_id == msg_id
    assert len(raw) <= MAX_DATAGRAM_BYTES < 1400
    assert isinstance(body, list)
    providers, contacts = body
    assert 1 <= len(providers) <= 8
    assert len(contacts) <= 12
    if address.startswith("10."):
        assert (len(providers), len(contacts)) == (8, 12)


async def test_the_nodes_own_traffic_is_sealed(node: DhtNode) -> None:
    """A second node with another key cannot join: every datagram of it is dropped."""
    stranger = DhtNode(
        node_id=stable_node_id("10.9.0.2:5000"),
        http_address="10.9.0.2:5000",
        cluster_key=OTHER_KEY,
        rpc_timeout=0.05,
    )
    await stranger.listen("127.0.0.1", 0)
    try:
        assert await stranger.bootstrap([node.router_address]) == 0
        assert node.contact_count() == 0
        assert dropped(node)["unauthenticated"] >= 1
    finally:
        await stranger.close()
