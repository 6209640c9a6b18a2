"""The iterative lookup: walk towards a key, alpha queries in flight, under a caller's deadline.

Unlike kademlia's `SpiderCrawl`, which sends alpha queries and waits for the whole round (so one
dead node stalls every round for a full RPC timeout), this keeps up to alpha queries in flight
among the k closest candidates and reacts to each reply as it lands. A dead node holds one slot
until it times out while the others keep walking. The lookup never cancels the RPC futures it
waits on; the caller's deadline simply stops it waiting, and whatever was found so far stays
readable on the object.

**A small network known whole** (`settle_below`, k for the callers that use it). While a
cluster has fewer than k nodes, the k closest to any key are all of them, so a plain lookup asks
every node, and each node's announcements cost every other node a query: O(N) per node, O(N^2)
for the cluster. But an answer names its node's contacts closest to the key. So when fewer than
`settle_below` nodes are known and alpha of them answered without naming a single node this
one did not know, the nodes nearest the key are known here already, and asking the others
could only repeat the same names: the lookup settles, and `closest` counts the known nodes it
did not ask (they are in this node's routing table, so they answered it recently) with the
ones that answered. An answer naming anyone new, or that many nodes known, and the walk goes
on as usual, so a large network, or a newcomer that knows only its seeds, is walked in full.
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
        settle_below: int = 0,
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
        self._settle_below = settle_below
        self._seeds: set[bytes] = set()
        self._named_new = False  # an answer named a node that was not among the seeds
        self._settled = False  # stopped early: the network is small and known whole

    def satisfied(self) -> bool:
        return self._want is not None and len(self.providers) >= self._want

    def closest(self) -> list[Node]:
        """Nodes that answered, closest to the target first, at most k (after settling early,
        the known nodes nobody had to ask as well)."""
        if self._settled:
            return self._frontier()
        return heapq.nsmallest(self._k, self._responded.values(), key=self._distance)

    @property
    def asked(self) -> int:
        """How many nodes this lookup queried."""
        return len(self._queried)

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
        self._seeds = set(self._known)
        in_flight: dict[asyncio.Future[Found | None], Node] = {}
        while not self.satisfied():
            if self._known_whole():
                self._settled = True
                return
            frontier = self._frontier()
            flying = {node.id for node in in_flight.values()}
            busy = sum(1 for node in frontier if node.id in flying)
            for node in frontier:
                if busy >= self._alpha or self._waiting_to_settle():
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

    def _waiting_to_settle(self) -> bool:
        """Alpha queries asked (not counting the failed ones) while the lookup may still
        settle: their answers decide whether anyone else is worth asking."""
        return self._may_settle() and len(self._queried) - len(self._failed) >= self._alpha

    def _may_settle(self) -> bool:
        return not self._named_new and len(self._known) < self._settle_below

    def _known_whole(self) -> bool:
        """Fewer than `settle_below` nodes known, and alpha answers (or all there are) named no
        new one."""
        if not self._may_settle():
            return False
        return len(self._responded) >= min(self._alpha, len(self._known))

    def _learn(self, nodes: Iterable[Node]) -> None:
        for node in nodes:
            if node.id != self._self_id and node.id not in self._known:
                self._known[node.id] = node
                if self._seeds and node.id not in self._seeds:
                    self._named_new = True

    def _frontier(self) -> list[Node]:
        """The k closest known nodes that have not failed: the only ones worth asking."""
        alive = (node for node_id, node in self._known.items() if node_id not in self._failed)
        return heapq.nsmallest(self._k, alive, key=self._distance)

    def _distance(self, node: Node) -> int:
        return int(node.long_id) ^ self._target
