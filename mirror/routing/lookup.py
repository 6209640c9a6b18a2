"""The iterative lookup: walk towards a key, alpha queries in flight, under a caller's deadline.

Unlike kademlia's `SpiderCrawl`, which sends alpha queries and waits for the whole round (so one
dead node stalls every round for a full RPC timeout), this keeps up to alpha queries in flight
among the k closest candidates and reacts to each reply as it lands. A dead node holds one slot
until it times out while the others keep walking. The lookup never cancels the RPC futures it
waits on; the caller's deadline simply stops it waiting, and whatever was found so far stays
readable on the object.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable, Iterable

from kademlia.node import Node

from mirror.routing.router import Provider
from mirror.routing.wire import Found

Query = Callable[[Node], "asyncio.Future[Found | None]"]


class IterativeLookup:
    """One lookup of `target`: finds its k closest live nodes, and providers along the way."""

    def __init__(
        self,
        target: bytes,
        *,
        self_id: bytes,
        query: Query,
        k: int,
        alpha: int,
        want: int | None = None,
        accept: Callable[[Provider], bool] = lambda provider: True,
        providers: Iterable[Provider] = (),
    ) -> None:
        self._target = int.from_bytes(target, "big")
        self._self_id = self_id
        self._query = query
        self._k = k
        self._alpha = alpha
        self._want = want
        self._accept = accept
        self._known: dict[bytes, Node] = {}
        self._queried: set[bytes] = set()
        self._failed: set[bytes] = set()
        self._responded: dict[bytes, Node] = {}
        self.providers: dict[bytes, Provider] = {p.node_id: p for p in providers if accept(p)}

    def satisfied(self) -> bool:
        return self._want is not None and len(self.providers) >= self._want

    def closest(self) -> list[Node]:
        """Nodes that answered, closest to the target first, at most k."""
        return heapq.nsmallest(self._k, self._responded.values(), key=self._distance)

    def silent(self) -> set[bytes]:
        """Ids of the nodes that were asked and did not answer (in time)."""
        return set(self._failed)

    def heard_of(self) -> list[Node]:
        """Every node the lookup learned of, answered or not (for callers that must not
        mistake a late reply for a dead node)."""
        return list(self._known.values())

    async def run(self, seeds: Iterable[Node]) -> None:
        """Walk until the k closest known nodes have all answered, or enough providers."""
        self._learn(seeds)
        in_flight: dict[asyncio.Future[Found | None], Node] = {}
        while not self.satisfied():
            frontier = self._frontier()
            flying = {node.id for node in in_flight.values()}
            busy = sum(1 for node in frontier if node.id in flying)
            for node in frontier:
                if busy >= self._alpha:
                    break
                if node.id not in self._queried:
                    self._queried.add(node.id)
                    in_flight[self._query(node)] = node
                    busy += 1
            if busy == 0:
                return  # every one of the k closest has answered (or none is known)
            done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                node = in_flight.pop(future)
                self._absorb(node, future.result())

    def _absorb(self, node: Node, found: Found | None) -> None:
        if found is None:
            self._failed.add(node.id)
            return
        self._responded[node.id] = node
        self._learn(found.contacts)
        for provider in found.providers:
            if self._accept(provider):
                self.providers.setdefault(provider.node_id, provider)

    def _learn(self, nodes: Iterable[Node]) -> None:
        for node in nodes:
            if node.id != self._self_id and node.id not in self._known:
                self._known[node.id] = node

    def _frontier(self) -> list[Node]:
        """The k closest known nodes that have not failed: the only ones worth asking."""
        alive = (node for node_id, node in self._known.items() if node_id not in self._failed)
        return heapq.nsmallest(self._k, alive, key=self._distance)

    def _distance(self, node: Node) -> int:
        return int(node.long_id) ^ self._target
