"""kademlia's protocol, extended with provider records and hardened for a shared network.

What changes from `KademliaProtocol` (all by overriding, kademlia itself is untouched):

- Datagrams are sealed on the way out (`SealedTransport`) and opened, checked for freshness and
  replay, decoded and type-checked on the way in, all before any handler runs. A rejected
  datagram is counted by reason and dropped: it never raises, never reaches the routing table.
- Requests are dispatched synchronously from `datagram_received` (no task per datagram) against
  a fixed table of RPCs and argument validators; rpcudp's "call any attribute" magic is off.
- Outstanding calls time out after `rpc_timeout` (milliseconds scale, not rpcudp's 5 s), resolve
  to ``None`` instead of ``(False, None)``, and resolving a future that a caller already gave up
  on is a no-op, so a lookup cancelled at its deadline leaves no "InvalidStateError" behind.
- Plain values are refused (`rpc_store` answers False); provider records replace them.
- Claims (`rpc_claim`, `rpc_release`): the node closest to a key records which one node is
  fetching it from upstream right now, so that the others stream from that one instead.
- `welcome_if_new` hands records to a new node by their real key (kademlia re-hashes keys that
  are already hashes), and never lets this node's own id into its routing table.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, cast

import umsgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.storage import IStorage

from mirror.metrics import Metrics
from mirror.routing import wire
from mirror.routing.auth import SEAL_OVERHEAD, DatagramSealer, ReplayGuard, SealedTransport
from mirror.routing.errors import (
    DatagramRejected,
    DatagramTooLarge,
    Malformed,
    UnsupportedOperation,
)
from mirror.routing.keys import ID_BYTES, distance
from mirror.routing.providers import ClaimStore, Provider, ProviderStore
from mirror.routing.wire import Found, HandOffRecord

log = logging.getLogger(__name__)

T = TypeVar("T")

_RECEIVE_BUFFER_BYTES = 1 << 20
# Consecutive unanswered calls before a contact leaves the routing table. kademlia evicts on the
# first one; with timeouts of a few hundred milliseconds, one lost datagram or one busy moment
# on the peer would then cost the table a live node.
EVICT_AFTER_FAILURES = 3
Address = tuple[str, int]
Validator = Callable[[object], object]


@dataclass(frozen=True, slots=True)
class DhtSettings:
    """The tunables one node runs with (see `DhtNode` for what each one bounds)."""

    ksize: int
    alpha: int
    rpc_timeout: float
    record_ttl: float
    max_providers_per_reply: int
    max_contacts_per_reply: int


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Any]
    timer: asyncio.TimerHandle
    parse: Callable[[object], Any]
    node: Node | None  # the contact asked, if its answer should update the routing table


class NoValueStorage(IStorage):
    """kademlia's value storage, disabled: this DHT only keeps provider records."""

    def __setitem__(self, key: bytes, value: object) -> None:
        raise UnsupportedOperation("plain DHT values are disabled; use provider records")

    def __getitem__(self, key: bytes) -> object:
        raise KeyError(key)

    def get(self, key: bytes, default: object = None) -> object:
        return default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, object]]:
        return []

    def __iter__(self) -> Any:
        return iter(())


class ProviderProtocol(KademliaProtocol):
    """One node's DHT endpoint: serves provider RPCs and issues them with short timeouts."""

    # RPC name -> validators of its positional arguments (after the sender's address).
    REQUESTS: ClassVar[dict[str, tuple[Validator, ...]]] = {
        "ping": (wire.node_id,),
        "find_node": (wire.node_id, wire.node_id),
        "find_value": (wire.node_id, wire.node_id),
        "store": (wire.node_id, wire.node_id, wire.anything),
        "add_provider": (wire.node_id, wire.node_id, wire.node_id, wire.http_address, wire.ttl),
        "remove_provider": (wire.node_id, wire.node_id, wire.node_id),
        "get_providers": (wire.node_id, wire.node_id),
        "hand_off": (wire.node_id, wire.hand_off_records),
        "claim": (wire.node_id, wire.node_id, wire.node_id, wire.http_address, wire.ttl),
        "release": (wire.node_id, wire.node_id, wire.node_id),
    }

    def __init__(
        self,
        source_node: Node,
        storage: IStorage,
        ksize: int,
        *,
        settings: DhtSettings,
        sealer: DatagramSealer,
        providers: ProviderStore,
        claims: ClaimStore,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(source_node, storage, ksize)
        self._wait_timeout = settings.rpc_timeout
        self.settings = settings
        self.providers = providers
        self.claims = claims
        self._sealer = sealer
        self._replays = ReplayGuard(sealer.window)
        self._metrics = metrics
        self._pending: dict[bytes, _Pending] = {}
        self._failures: dict[bytes, int] = {}
        # Stored key -> XOR distance of its k-th closest contact (see `_records_for`).
        self._kth_distance: dict[bytes, int] = {}
        self._closed = False
        # Set once the socket is really closed (asyncio closes it a loop iteration later).
        self.connection_closed = asyncio.Event()

    # ----------------------------------------------------------------- transport and receiving

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = SealedTransport(cast(asyncio.DatagramTransport, transport), self._sealer)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # asyncio reads one datagram per loop iteration: a burst of replies (an advertiser
            # announcing many keys at once) must wait in the kernel, not overflow its buffer.
            # The kernel caps this at net.core.rmem_max; best effort.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER_BYTES)

    def connection_lost(self, exc: Exception | None) -> None:
        self.shutdown()
        self.connection_closed.set()

    def error_received(self, exc: Exception) -> None:
        # A send that failed at once (unreachable network, address family): the call times out.
        log.debug("DHT socket error: %s", exc)

    def __getattr__(self, name: str) -> Any:
        # rpcudp turns every unknown attribute into a remote call, so a typo would silently send
        # a datagram. Remote calls here are the explicit `request_*` methods.
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self._receive(data, addr)
        except DatagramRejected as exc:
            self._dropped(exc, addr)
        except Exception:  # a bug in a handler must not take the endpoint down
            log.exception("DHT datagram from %s failed in its handler", addr)

    async def _solve_datagram(self, datagram: bytes, address: Any) -> None:
        """rpcudp's entry point, routed through the same checks (nothing here calls it)."""
        self.datagram_received(datagram, address)

    def _receive(self, data: bytes, addr: Any) -> None:
        now = self._sealer.now()
        payload, sent_at = self._sealer.open(data, now=now)
        if len(payload) < wire.HEADER_BYTES:
            raise Malformed("datagram shorter than its header")
        kind, msg_id = payload[:1], payload[1 : wire.HEADER_BYTES]
        if kind == wire.REQUEST:
            self._replays.check(msg_id, sent_at, now)
            self._serve(msg_id, wire.decode(payload[wire.HEADER_BYTES :]), addr)
        elif kind == wire.RESPONSE:
            self._accept_response(msg_id, payload[wire.HEADER_BYTES :], addr)
        else:
            raise Malformed("unknown message type")

    def _dropped(self, exc: DatagramRejected, addr: Any) -> None:
        log.debug("dropped DHT datagram from %s (%s): %s", addr, exc.reason, exc)
        if self._metrics is not None:
            self._metrics.dht_dropped.labels(exc.reason).inc()

    # ----------------------------------------------------------------- serving requests

    async def _accept_request(self, msg_id: bytes, data: object, address: Any) -> None:
        """rpcudp's request entry point, routed through validation (nothing here calls it)."""
        try:
            self._serve(msg_id, data, address)
        except DatagramRejected as exc:
            self._dropped(exc, address)

    def _serve(self, msg_id: bytes, data: object, address: Any) -> None:
        if not isinstance(data, list) or len(data) != 2:
            raise Malformed("a request is [name, args]")
        name, args = data
        if not isinstance(name, str) or not isinstance(args, list):
            raise Malformed("a request is [name, args]")
        validators = self.REQUESTS.get(name)
        if validators is None:
            raise Malformed(f"unknown RPC {name[:40]!r}")
        if len(args) != len(validators):
            raise Malformed(f"RPC {name} takes {len(validators)} arguments")
        values = [check(arg) for check, arg in zip(validators, args, strict=True)]
        sender: Address = (address[0], address[1])
        response = getattr(self, f"rpc_{name}")(sender, *values)
        body = response.data if isinstance(response, wire.Packed) else umsgpack.packb(response)
        if wire.HEADER_BYTES + len(body) + SEAL_OVERHEAD > wire.MAX_DATAGRAM_BYTES:
            log.warning(
                "DHT reply to %s for %s exceeds the datagram budget; not sent", name, sender
            )
            return
        if not self._closed:
            self.transport.sendto(wire.RESPONSE + msg_id + body, address)

    def rpc_ping(self, sender: Address, nodeid: bytes) -> bytes:
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        return bytes(self.source_node.id)

    def rpc_store(self, sender: Address, nodeid: bytes, key: bytes, value: object) -> bool:
        log.debug("refused a plain store from %s", sender)
        return False

    def rpc_find_node(self, sender: Address, nodeid: bytes, key: bytes) -> wire.Packed:
        source = Node(nodeid, sender[0], sender[1])
        self.welcome_if_new(source)
        # Capped like get_providers replies: the lookup converges as well on 12 contacts per
        # reply as on k, and each contact costs pure-Python msgpack time on both ends.
        neighbours = self._neighbours(key, self.settings.max_contacts_per_reply, source)
        contacts, _ = wire.fit_packed(map(wire.contact_entry, neighbours), wire.MAX_BODY_BYTES)
        return wire.Packed(contacts)

    def rpc_find_value(self, sender: Address, nodeid: bytes, key: bytes) -> wire.Packed:
        return self.rpc_find_node(sender, nodeid, key)  # there are no plain values to return

    def rpc_add_provider(
        self,
        sender: Address,
        nodeid: bytes,
        key: bytes,
        provider_id: bytes,
        address: str,
        ttl: float,
    ) -> bool:
        """Store the sender as a provider of `key`: a node can only ever announce itself."""
        if provider_id != nodeid or nodeid == self.source_node.id:
            log.debug("refused add_provider from %s for another node's id", sender)
            return False
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        self.providers.put(key, Provider(provider_id, address), min(ttl, self.settings.record_ttl))
        return True

    def rpc_remove_provider(
        self, sender: Address, nodeid: bytes, key: bytes, provider_id: bytes
    ) -> bool:
        if provider_id != nodeid:
            return False
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        return self.providers.remove(key, provider_id)

    def rpc_get_providers(self, sender: Address, nodeid: bytes, key: bytes) -> wire.Packed:
        """Up to N providers of `key` and the closest contacts we know, in one datagram."""
        source = Node(nodeid, sender[0], sender[1])
        self.welcome_if_new(source)
        found = self.providers.providers(
            key, exclude=(nodeid,), limit=self.settings.max_providers_per_reply
        )
        budget = wire.MAX_BODY_BYTES - 1  # the outer [providers, contacts] header
        providers, used = wire.fit_packed(map(wire.provider_entry, found), budget - 3)
        neighbours = self._neighbours(key, self.settings.max_contacts_per_reply, source)
        contacts, _ = wire.fit_packed(map(wire.contact_entry, neighbours), budget - used)
        return wire.Packed(wire.array_header(2) + providers + contacts)

    def rpc_hand_off(self, sender: Address, nodeid: bytes, records: list[HandOffRecord]) -> int:
        """Records a peer passes on because this node is now among the closest to their keys."""
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        own = self.source_node.id
        stored = 0
        for record in records:
            if record.provider.node_id == own:
                continue  # our own records are ours to announce
            self.providers.put(
                record.key, record.provider, min(record.ttl, self.settings.record_ttl)
            )
            stored += 1
        return stored

    def rpc_claim(
        self,
        sender: Address,
        nodeid: bytes,
        key: bytes,
        provider_id: bytes,
        address: str,
        ttl: float,
    ) -> list[object] | None:
        """Record the sender as the node fetching `key`, unless another node's claim is live.

        Replies with the holder after this call (the sender when it won or renewed), or nil
        when refused: a node can only ever claim for itself. Claims are not provider records:
        never served by get_providers, never handed off.
        """
        if provider_id != nodeid or nodeid == self.source_node.id:
            log.debug("refused a claim from %s for another node's id", sender)
            return None
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        holder = self.claims.claim(
            key, Provider(provider_id, address), min(ttl, self.settings.record_ttl)
        )
        return wire.claim_reply(holder)

    def rpc_release(self, sender: Address, nodeid: bytes, key: bytes, provider_id: bytes) -> bool:
        """Drop the sender's claim of `key`; True if it held a live one."""
        if provider_id != nodeid:
            return False
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        return self.claims.release(key, provider_id)

    def _neighbours(self, key: bytes, limit: int, source: Node) -> list[Node]:
        return [
            node
            for node in self.router.find_neighbors(Node(key), k=limit, exclude=source)
            if node.id != source.id
        ]

    # ----------------------------------------------------------------- routing table

    def contact_count(self) -> int:
        return sum(len(bucket) for bucket in self.router.buckets)

    def welcome_if_new(self, node: Node) -> None:
        """Add (or refresh) a contact; a new one gets the records it is now responsible for."""
        if node.id == self.source_node.id or node.ip is None:
            return  # static bootstrap lists usually name this node itself
        self._failures.pop(node.id, None)
        bucket = self.router.buckets[self.router.get_bucket_for(node)]
        if node.id in bucket.replacement_nodes:
            # kademlia treats these as new every time: each message from one would re-send
            # its hand-off and ping the bucket's head again. It waits for a free slot instead.
            return
        if node.id not in bucket.nodes:
            records = self._records_for(node)
            if records:
                self._hand_off(node, records)
        self.router.add_contact(node)  # also moves a known contact to the recent end
        self._contacts_changed()

    def _records_for(self, node: Node) -> list[HandOffRecord]:
        """Records whose key `node` is closer to than the furthest of our k closest contacts.

        kademlia hashes the stored key again here (`digest(key)`), which points at an unrelated
        part of the id space; provider keys are used as they are. It also searches the routing
        table once per stored key for every new contact; here the k-th closest distance of each
        key is cached, so a new contact costs one XOR per key. A key's entry only changes when
        a contact enters its k closest (exactly the keys handed off: their entry is dropped and
        recomputed when next needed) or leaves the table (`_forget` clears them all).
        """
        records: list[HandOffRecord] = []
        keys = self.providers.stored_keys()
        if len(self._kth_distance) > 2 * len(keys) + 64:
            self._kth_distance.clear()  # entries of keys no longer stored
        contacts: list[int] | None = None
        for key in keys:
            kth = self._kth_distance.get(key)
            if kth is None:
                if contacts is None:
                    contacts = [
                        contact.long_id
                        for bucket in self.router.buckets
                        for contact in bucket.nodes.values()
                    ]
                kth = self._compute_kth_distance(key, contacts)
                self._kth_distance[key] = kth
            if distance(node.id, key) >= kth:
                continue
            del self._kth_distance[key]
            records.extend(
                HandOffRecord(key, provider, remaining)
                for provider, remaining in self.providers.remaining(key)
                if provider.node_id != node.id
            )
        return records

    def _compute_kth_distance(self, key: bytes, contacts: list[int]) -> int:
        """Distance from `key` to the k-th closest contact (beyond the id space if fewer)."""
        if len(contacts) < self.settings.ksize:
            return 1 << (8 * ID_BYTES)
        target = int.from_bytes(key, "big")
        return heapq.nsmallest(self.settings.ksize, (c ^ target for c in contacts))[-1]

    def _hand_off(self, node: Node, records: list[HandOffRecord]) -> None:
        budget = wire.MAX_BODY_BYTES - wire.packed_size(["hand_off", [self.source_node.id, []]])
        entries = [wire.hand_off_entry(record) for record in records]
        for batch in wire.batches(entries, budget):
            log.debug("handing %d provider records to new contact %s", len(batch), node)
            # Fire and forget: the future resolves (reply or timeout) without anyone awaiting it.
            self._request(
                (node.ip, node.port), "hand_off", [self.source_node.id, batch], wire.count
            )

    def handle_call_response(self, result: tuple[bool, object], node: Node) -> tuple[bool, object]:
        """kademlia's bookkeeping after a call, kept for its callers, without INFO logs."""
        if result[0]:
            self.welcome_if_new(node)
        else:
            self._forget(node)
        return result

    def _forget(self, node: Node) -> None:
        failures = self._failures.get(node.id, 0) + 1
        if failures < EVICT_AFTER_FAILURES:
            self._failures[node.id] = failures
            return
        self._failures.pop(node.id, None)
        log.debug("no reply from %s %d times, removing it from the routing table", node, failures)
        self.router.remove_contact(node)
        self._kth_distance.clear()  # the k closest of some keys now reach further
        self._contacts_changed()

    def _contacts_changed(self) -> None:
        if self._metrics is not None:
            self._metrics.dht_contacts.set(self.contact_count())

    # ----------------------------------------------------------------- issuing requests

    def _request(
        self,
        address: Address,
        name: str,
        args: list[object],
        parse: Callable[[object], T],
        *,
        node: Node | None = None,
        timeout: float | None = None,
    ) -> asyncio.Future[T | None]:
        """Send one request; the future resolves to the parsed reply, or None on no/bad reply.

        The future never carries an exception and is safe to abandon: nothing but the reply
        or the timeout resolves it, and both check that it is still pending.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T | None] = loop.create_future()
        if self._closed or self.transport is None:
            future.set_result(None)
            return future
        msg_id = os.urandom(wire.MSG_ID_BYTES)
        datagram = wire.REQUEST + msg_id + umsgpack.packb([name, args])
        if len(datagram) + SEAL_OVERHEAD > wire.MAX_DATAGRAM_BYTES:
            raise DatagramTooLarge(f"{name} request of {len(datagram)} bytes")
        timer = loop.call_later(timeout or self._wait_timeout, self._timeout, msg_id)
        self._pending[msg_id] = _Pending(future, timer, parse, node)
        log.debug("calling %s on %s", name, address)
        self.transport.sendto(datagram, address)
        return future

    def _accept_response(self, msg_id: bytes, data: object, address: Any) -> None:
        pending = self._pending.pop(msg_id, None)
        if pending is None:
            log.debug("late or unsolicited DHT reply from %s", address)
            return
        pending.timer.cancel()
        try:
            if not isinstance(data, bytes):
                raise Malformed("reply body is not bytes")
            value = pending.parse(wire.decode(data))
        except DatagramRejected as exc:
            self._dropped(exc, address)
            value = None
        else:
            if pending.node is not None:
                self.welcome_if_new(pending.node)
        if not pending.future.done():
            pending.future.set_result(value)

    def _timeout(self, msg_id: bytes) -> None:
        pending = self._pending.pop(msg_id, None)
        if pending is None:
            return
        log.debug("no DHT reply for a call within %.3f s", self._wait_timeout)
        if pending.node is not None:
            self._forget(pending.node)
        if not pending.future.done():
            pending.future.set_result(None)

    def shutdown(self) -> None:
        """Resolve every outstanding call with None, so waiting lookups end now."""
        self._closed = True
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            entry.timer.cancel()
            if not entry.future.done():
                entry.future.set_result(None)

    def request_ping(self, address: Address) -> asyncio.Future[bytes | None]:
        return self._request(address, "ping", [self.source_node.id], wire.node_id)

    def request_find_node(self, node: Node, target: bytes) -> asyncio.Future[Found | None]:
        return self._request(
            (node.ip, node.port),
            "find_node",
            [self.source_node.id, target],
            lambda value: Found(contacts=wire.contacts(value), providers=[]),
            node=node,
        )

    def request_get_providers(self, node: Node, key: bytes) -> asyncio.Future[Found | None]:
        return self._request(
            (node.ip, node.port), "get_providers", [self.source_node.id, key], wire.found, node=node
        )

    def request_add_provider(
        self, node: Node, key: bytes, address: str, ttl: float
    ) -> asyncio.Future[bool | None]:
        own = self.source_node.id
        return self._request(
            (node.ip, node.port),
            "add_provider",
            [own, key, own, address, ttl],
            wire.boolean,
            node=node,
        )

    def request_remove_provider(self, node: Node, key: bytes) -> asyncio.Future[bool | None]:
        own = self.source_node.id
        return self._request(
            (node.ip, node.port), "remove_provider", [own, key, own], wire.boolean, node=node
        )

    def request_claim(
        self, node: Node, key: bytes, address: str, ttl: float, *, timeout: float | None = None
    ) -> asyncio.Future[Provider | None]:
        own = self.source_node.id
        return self._request(
            (node.ip, node.port),
            "claim",
            [own, key, own, address, ttl],
            wire.claim_holder,
            node=node,
            timeout=timeout,
        )

    def request_release(self, node: Node, key: bytes) -> asyncio.Future[bool | None]:
        own = self.source_node.id
        return self._request(
            (node.ip, node.port), "release", [own, key, own], wire.boolean, node=node
        )

    # kademlia's own call_* helpers, for kademlia code paths that still use them.

    def call_ping(self, node_to_ask: Node) -> asyncio.Future[bytes | None]:
        """Returns a future, not a coroutine: `RoutingTable` passes it to `ensure_future`,
        which then schedules no task that could outlive this protocol."""
        return self._request(
            (node_to_ask.ip, node_to_ask.port),
            "ping",
            [self.source_node.id],
            wire.node_id,
            node=node_to_ask,
        )

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, object]:
        found = await asyncio.shield(self.request_find_node(node_to_ask, node_to_find.id))
        if found is None:
            return (False, None)
        return (True, [tuple(contact) for contact in found.contacts])

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, object]:
        return await self.call_find_node(node_to_ask, node_to_find)

    async def call_store(self, node_to_ask: Node, key: bytes, value: object) -> tuple[bool, object]:
        raise UnsupportedOperation("plain DHT values are disabled; use provider records")
