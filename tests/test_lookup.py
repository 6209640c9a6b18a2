"""The iterative lookup on its own: which nodes it asks, and when it may stop early.

The "network" here is a table of who knows whom, answered at once through futures: the walk's
decisions are what is tested, the real UDP lookups are in test_dht.py.
"""

from __future__ import annotations

import asyncio

from kademlia.node import Node

from mirror.routing.keys import stable_node_id
from mirror.routing.lookup import IterativeLookup
from mirror.routing.wire import Found

K, ALPHA = 20, 3


def nodes(count: int, start: int = 0) -> list[Node]:
    return [
        Node(stable_node_id(f"10.0.0.{i}:5000"), f"10.0.0.{i}", 5000)
        for i in range(start, start + count)
    ]


class Network:
    """Each node answers a query with the contacts it is told to name."""

    def __init__(self, names: dict[bytes, list[Node]]) -> None:
        self._names = names
        self.asked: list[bytes] = []

    def query(self, node: Node) -> asyncio.Future[Found | None]:
        self.asked.append(node.id)
        future: asyncio.Future[Found | None] = asyncio.get_running_loop().create_future()
        future.set_result(Found(self._names.get(node.id, []), []))
        return future


def lookup(network: Network, *, k: int = K, settle: bool = True) -> IterativeLookup:
    return IterativeLookup(
        b"\x42" * 20,
        self_id=stable_node_id("10.0.0.250:5000"),
        query=network.query,
        k=k,
        alpha=ALPHA,
        settle_below=k if settle else 0,
    )


async def test_a_small_network_known_whole_is_asked_alpha_times() -> None:
    everyone = nodes(10)
    network = Network({node.id: everyone for node in everyone})
    walk = lookup(network)
    await walk.run(everyone)
    assert walk.asked == ALPHA
    # The nodes it did not need to ask still count among the closest (announcements go there).
    assert {node.id for node in walk.closest()} == {node.id for node in everyone}


async def test_without_settling_every_node_of_a_small_network_is_asked() -> None:
    everyone = nodes(10)
    network = Network({node.id: everyone for node in everyone})
    walk = lookup(network, settle=False)
    await walk.run(everyone)
    assert walk.asked == 10
    assert len(walk.closest()) == 10


async def test_an_answer_naming_someone_new_makes_it_walk_on() -> None:
    known, stranger = nodes(10), nodes(1, start=100)[0]
    # Every node names the stranger, which this node did not know: it is not known whole.
    names = {node.id: [*known, stranger] for node in known}
    network = Network(names)
    walk = lookup(network)
    await walk.run(known)
    assert walk.asked == 11
    assert stranger.id in network.asked


async def test_k_nodes_known_is_walked_as_usual() -> None:
    everyone = nodes(8)
    network = Network({node.id: everyone for node in everyone})
    walk = lookup(network, k=5)  # fewer than the known nodes: a large network, walked in full
    await walk.run(everyone)
    assert walk.asked == 5
    assert len(walk.closest()) == 5


async def test_silent_nodes_do_not_count_towards_settling() -> None:
    everyone = nodes(10)
    # Only the last three answer; the first ones asked time out (None).
    answering = everyone[7:]
    names = {node.id: everyone for node in answering}

    class Lossy(Network):
        def query(self, node: Node) -> asyncio.Future[Found | None]:
            future = super().query(node)
            if node.id not in names:
                future = asyncio.get_running_loop().create_future()
                future.set_result(None)
            return future

    network = Lossy(names)
    walk = lookup(network)
    await walk.run(everyone)
    assert sum(1 for node_id in network.asked if node_id in names) >= ALPHA
    assert not set(walk.silent()) & {node.id for node in walk.closest()}
