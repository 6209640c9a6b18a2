"""The routing table and its upkeep: who this node knows, and what a newcomer is owed.

kademlia's `RoutingTable` (k-buckets, splitting, replacement lists, neighbour search) and its
`Node` are the only parts of the kademlia package still in use, here and as the contact type
elsewhere: they are the well-tested core of the algorithm and carry no I/O of their own. What
kademlia built around them is replaced, because it got these wrong for us:

- Welcoming a contact hands it the records it is now responsible for by their real key
  (kademlia hashes keys that are already hashes, so its hand-off went to the wrong nodes), and
  never lets this node's own id into its table (static seed lists usually name the node itself).
- A contact leaves the table after `EVICT_AFTER_FAILURES` consecutive calls it never answered,
  not on the first one, and not on calls it answered late (the endpoint awaits a late reply
  before it calls a contact silent, rpc.py).
- When a bucket is full, `RoutingTable` pings its head through ``protocol.call_ping(node)`` and
  hands the result to `asyncio.ensure_future`: `_HeadPinger` is that "protocol", and returns the
  endpoint's future, so no task is scheduled that could outlive the endpoint.
- Refresh ids of lonely buckets are drawn inside the id space (kademlia can draw 2**160).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass

from kademlia.node import Node
from kademlia.routing import RoutingTable

from mirror.metrics import Metrics
from mirror.routing import wire
from mirror.routing.client import DhtClient
from mirror.routing.keys import ID_BYTES, distance
from mirror.routing.providers import ProviderStore
from mirror.routing.wire import HandOffRecord

log = logging.getLogger(__name__)

# Consecutive unanswered calls before a contact leaves the routing table. kademlia evicts on the
# first one; with timeouts of a few hundred milliseconds, one lost datagram or one busy moment
# on the peer would then cost the table a live node.
EVICT_AFTER_FAILURES = 3
# A bucket nobody looked into for this long is "lonely" (kademlia's section 2.3).
_LONELY_AFTER = 3600.0
_ID_SPACE = 1 << (8 * ID_BYTES)
# Last-seen times are pruned to the table's members when they are kept for more nodes than this.
_SEEN_KEPT = 4096
# How long a walk that found every node of a small network vouches for the table (`known_whole`).
KNOWN_WHOLE_SECONDS = 30.0
# Weight of the newest answer in a contact's round-trip average (EWMA).
_ROUND_TRIP_WEIGHT = 0.3
# Round trips are kept for this many nodes at most, the least recently answering dropped.
_ROUND_TRIPS_KEPT = 1024


@dataclass(frozen=True, slots=True)
class Contact:
    """One contact as the status page shows it: read-only, a copy of what the table knows."""

    node_id: bytes
    host: str
    port: int  # its DHT (UDP) port
    last_seen: float | None  # wall-clock time of its last request or answer to this node
    round_trip: float | None  # seconds its answers take (EWMA), None until one was timed


class RoundTrips:
    """How long each node's answers take (seconds, EWMA), for the nodes heard from lately.

    Timed by the endpoint from the send to the reply's arrival, late replies included, so a
    starved node's average shows how slow it is rather than only its answers that were quick.
    """

    def __init__(self) -> None:
        self._seconds: OrderedDict[bytes, float] = OrderedDict()

    def get(self, node_id: bytes) -> float | None:
        return self._seconds.get(node_id)

    def record(self, node_id: bytes, seconds: float) -> None:
        known = self._seconds.get(node_id)
        if known is not None:
            seconds = known + _ROUND_TRIP_WEIGHT * (seconds - known)
        self._seconds[node_id] = seconds
        self._seconds.move_to_end(node_id)
        while len(self._seconds) > _ROUND_TRIPS_KEPT:
            self._seconds.popitem(last=False)


class _HeadPinger:
    """The one thing `RoutingTable` asks of its protocol: ``call_ping(node)``, when full."""

    def __init__(self, client: DhtClient) -> None:
        self._client = client

    def call_ping(self, node: Node) -> asyncio.Future[bytes | None]:
        # A future, not a coroutine: `ensure_future` returns it as it is. The answer (or the
        # silence) reaches `ContactTable` through the endpoint, as for every call to a contact.
        return self._client.ping_contact(node)


class ContactTable:
    """This node's contacts; implements the endpoint's `ContactEvents`."""

    def __init__(
        self,
        own_id: bytes,
        *,
        ksize: int,
        records: ProviderStore,
        client: DhtClient,
        metrics: Metrics | None = None,
    ) -> None:
        self._own = own_id
        self._ksize = ksize
        self._records = records
        self._client = client
        self._metrics = metrics
        self.routing = RoutingTable(_HeadPinger(client), ksize, Node(own_id))
        self._failures: dict[bytes, int] = {}
        self.round_trips = RoundTrips()
        # Stored key -> XOR distance of its k-th closest contact (see `_records_for`).
        self._kth_distance: dict[bytes, int] = {}
        # Node id -> wall-clock time it last sent a request or an answer (`peers`).
        self._seen: dict[bytes, float] = {}
        # Set once the table holds a contact: what waits for the cluster waits on it.
        self._first_contact = asyncio.Event()
        # When a walk last found this table to hold every node there is (`known_whole`).
        self._whole_at: float | None = None

    def contact_count(self) -> int:
        return sum(len(bucket) for bucket in self.routing.buckets)

    async def wait_for_contact(self) -> None:
        """Return once the table has held a contact (at once if it ever did)."""
        await self._first_contact.wait()

    def known_whole(self) -> bool:
        """Whether this table holds every node of the network, as a walk found it lately.

        In a network of fewer than k nodes every node is among the k closest to any key, so it
        is sent every record and asked every claim: the table answers "who is closest" as well
        as a walk, and the local records "who provides" as well as a lookup (dht.py). An
        announcement's walk vouches for it (`mark_whole`) for `KNOWN_WHOLE_SECONDS`, until a
        contact the table did not hold appears (a newcomer, which then is walked for), or once
        it holds k contacts. A contact leaving does not undo it: the rest are still all there
        is. A newcomer that never spoke to this node misses what it announces meanwhile, but
        holds nothing of those keys, and a key with no record here is still looked up.
        """
        return (
            self._whole_at is not None
            and time.monotonic() - self._whole_at < KNOWN_WHOLE_SECONDS
            and self.contact_count() < self._ksize
        )

    def mark_whole(self) -> None:
        """A walk just ended among nodes all held here, in a network of fewer than k nodes."""
        if self.contact_count() < self._ksize:
            self._whole_at = time.monotonic()

    def closest(self, target: bytes, limit: int | None = None) -> list[Node]:
        """Up to `limit` (default k) known contacts closest to `target`: a lookup's seeds."""
        return list(self.routing.find_neighbors(Node(target), k=limit or self._ksize))

    def contacts(self) -> list[Node]:
        """Every contact in the table (not the replacement lists): whom a broadcast goes to."""
        return [node for bucket in self.routing.buckets for node in bucket.nodes.values()]

    def peers(self) -> list[Contact]:
        """Every contact with when it was last heard from and its round trip (read-only)."""
        return [
            Contact(
                node.id,
                node.ip,
                node.port,
                self._seen.get(node.id),
                self.round_trips.get(node.id),
            )
            for node in self.contacts()
        ]

    def heard_from_since(self, node_id: bytes, since: float) -> bool:
        """Whether `node_id` sent a request or an answer at or after wall-clock time `since`."""
        seen = self._seen.get(node_id)
        return seen is not None and seen >= since

    def neighbours(self, key: bytes, limit: int, source: Node) -> list[Node]:
        """The contacts closest to `key` to tell `source` of (never `source` itself)."""
        return [
            node
            for node in self.routing.find_neighbors(Node(key), k=limit, exclude=source)
            if node.id != source.id
        ]

    def refresh_ids(self) -> list[bytes]:
        """One random id in the range of each bucket nobody looked into for an hour."""
        lonely_before = time.monotonic() - _LONELY_AFTER  # the clock KBucket stamps with
        return [
            random.randint(low, min(high, _ID_SPACE - 1)).to_bytes(ID_BYTES, "big")
            for low, high in (
                bucket.range
                for bucket in self.routing.buckets
                if bucket.last_updated < lonely_before
            )
        ]

    # ----------------------------------------------------------------- ContactEvents

    def answered(self, node: Node, round_trip: float) -> None:
        self.round_trips.record(node.id, round_trip)
        self.welcome(node)

    def silent(self, node: Node) -> None:
        failures = self._failures.get(node.id, 0) + 1
        if failures < EVICT_AFTER_FAILURES:
            self._failures[node.id] = failures
            return
        self._failures.pop(node.id, None)
        log.debug("no reply from %s %d times, removing it from the routing table", node, failures)
        self.routing.remove_contact(node)
        self._kth_distance.clear()  # the k closest of some keys now reach further
        self._contacts_changed()

    # ----------------------------------------------------------------- welcoming

    def welcome(self, node: Node) -> None:
        """Add (or refresh) a contact; a new one gets the records it is now responsible for."""
        if node.id == self._own or node.ip is None:
            return  # static bootstrap lists usually name this node itself
        self._failures.pop(node.id, None)
        self._note_seen(node.id)
        bucket = self.routing.buckets[self.routing.get_bucket_for(node)]
        if node.id in bucket.replacement_nodes:
            # kademlia treats these as new every time: each message from one would re-send
            # its hand-off and ping the bucket's head again. It waits for a free slot instead.
            return
        if node.id not in bucket.nodes:
            self._whole_at = None  # there was somebody the walks did not find
            records = self._records_for(node)
            if records:
                self._hand_off(node, records)
        self.routing.add_contact(node)  # also moves a known contact to the recent end
        self._contacts_changed()

    def _note_seen(self, node_id: bytes) -> None:
        self._seen[node_id] = time.time()
        if len(self._seen) > _SEEN_KEPT:
            members = {node.id for node in self.contacts()}
            self._seen = {key: at for key, at in self._seen.items() if key in members}

    def _records_for(self, node: Node) -> list[HandOffRecord]:
        """Records whose key `node` is closer to than the furthest of our k closest contacts.

        kademlia hashes the stored key again here (`digest(key)`), which points at an unrelated
        part of the id space; provider keys are used as they are. It also searches the routing
        table once per stored key for every new contact; here the k-th closest distance of each
        key is cached, so a new contact costs one XOR per key. A key's entry only changes when
        a contact enters its k closest (exactly the keys handed off: their entry is dropped and
        recomputed when next needed) or leaves the table (`silent` clears them all).
        """
        records: list[HandOffRecord] = []
        keys = self._records.stored_keys()
        if len(self._kth_distance) > 2 * len(keys) + 64:
            self._kth_distance.clear()  # entries of keys no longer stored
        contacts: list[int] | None = None
        for key in keys:
            kth = self._kth_distance.get(key)
            if kth is None:
                if contacts is None:
                    contacts = [
                        contact.long_id
                        for bucket in self.routing.buckets
                        for contact in bucket.nodes.values()
                    ]
                kth = self._compute_kth_distance(key, contacts)
                self._kth_distance[key] = kth
            if distance(node.id, key) >= kth:
                continue
            del self._kth_distance[key]
            records.extend(
                HandOffRecord(key, provider, remaining)
                for provider, remaining in self._records.remaining(key)
                if provider.node_id != node.id
            )
        return records

    def _compute_kth_distance(self, key: bytes, contacts: list[int]) -> int:
        """Distance from `key` to the k-th closest contact (beyond the id space if fewer)."""
        if len(contacts) < self._ksize:
            return _ID_SPACE
        target = int.from_bytes(key, "big")
        return heapq.nsmallest(self._ksize, (c ^ target for c in contacts))[-1]

    def _hand_off(self, node: Node, records: list[HandOffRecord]) -> None:
        budget = wire.MAX_BODY_BYTES - wire.packed_size(["hand_off", [self._own, []]])
        entries = [wire.hand_off_entry(record) for record in records]
        for batch in wire.batches(entries, budget):
            log.debug("handing %d provider records to new contact %s", len(batch), node)
            # Fire and forget: the future resolves (reply or timeout) without anyone awaiting it.
            self._client.hand_off(node, batch)

    def _contacts_changed(self) -> None:
        count = self.contact_count()
        if count:
            self._first_contact.set()
        if self._metrics is not None:
            self._metrics.dht_contacts.set(count)
