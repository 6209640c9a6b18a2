"""The DHT's datagram RPC endpoint: one UDP socket, sealed requests and replies.

An `asyncio.DatagramProtocol` of our own. It keeps rpcudp's framing (``type (1 byte) || msg id
(20) || msgpack``, see wire.py) so the wire is what kademlia nodes spoke, but none of its code:
rpcudp turns any attribute into a remote call, answers every request in a task of its own,
waits 5 s for a reply and leaves "InvalidStateError" behind when a caller gave up. Here:

- Every datagram is sealed on the way out (`SealedTransport`, so no path can send one unsealed)
  and opened, checked for freshness and replay, decoded and type-checked on the way in, all
  before any handler runs. A rejected datagram is counted by reason and dropped: it never
  raises, never reaches the routing table.
- Requests are served synchronously from `datagram_received` (no task per datagram) against
  the literal table `REQUESTS` of names and argument validators; anything else is malformed.
- Outgoing calls time out after `rpc_timeout` (milliseconds scale), resolve to ``None`` on no or
  bad reply, and resolving a future a caller already abandoned is a no-op.
- A timeout ends the caller's wait, not the call: the reply of a contact is still awaited for
  `LATE_GRACE_TIMEOUTS` more timeouts, and only a contact silent that long is reported silent.
  A CPU-starved node answers seconds late but answers. Reported silent at its first timeout,
  it was evicted from the routing table by the third while its replies were on the way, then
  welcomed back as new by the next datagram and handed every record again: in a 16-node
  rollout at 0.1 CPU per node, 60-70% of the calls timed out, every one was answered late, and
  each node evicted 7-16 live contacts and sent 15-43 hand-offs (docs/benchmarks.md).

From kademlia it uses only `Node`, as the contact a call reports to the routing table
(`ContactEvents`) when it is answered or times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar, cast

import umsgpack
from kademlia.node import Node

from mirror.clusterkey import ReplayGuard
from mirror.metrics import Metrics
from mirror.routing import wire
from mirror.routing.auth import SEAL_OVERHEAD, DatagramSealer, SealedTransport
from mirror.routing.errors import DatagramRejected, DatagramTooLarge, Malformed, Replayed

log = logging.getLogger(__name__)

T = TypeVar("T")
Address = tuple[str, int]
Validator = Callable[[object], object]

_RECEIVE_BUFFER_BYTES = 1 << 20
# How many more timeouts a contact's late reply is awaited after its caller stopped waiting.
LATE_GRACE_TIMEOUTS = 8

# RPC name -> validators of its positional arguments (after the sender's address). The handler
# object has one method per name, called as ``method(sender, *validated_args)``.
REQUESTS: Final[dict[str, tuple[Validator, ...]]] = {
    "ping": (wire.node_id,),
    "find_node": (wire.node_id, wire.node_id),
    "find_value": (wire.node_id, wire.node_id),
    "store": (wire.node_id, wire.node_id, wire.anything),
    "add_provider": (wire.node_id, wire.node_id, wire.node_id, wire.http_address, wire.ttl),
    # [sender, keys, provider id, address, ttl]: a burst of announcements (announce.py). A node
    # without it drops it as malformed and does not reply; the sender then goes key by key.
    "add_providers": (wire.node_id, wire.keys, wire.node_id, wire.http_address, wire.ttl),
    "remove_provider": (wire.node_id, wire.node_id, wire.node_id),
    "get_providers": (wire.node_id, wire.node_id),
    "hand_off": (wire.node_id, wire.hand_off_records),
    "claim": (wire.node_id, wire.node_id, wire.node_id, wire.http_address, wire.ttl),
    "release": (wire.node_id, wire.node_id, wire.node_id),
    # Broadcast (broadcast.py): [sender, message id, origin, topic, hops, message] and
    # [sender, topic, before]. A node without them drops them as malformed and does not reply.
    "broadcast": (wire.node_id, wire.message_id, wire.node_id, wire.topic, wire.hops, wire.message),
    "recent": (wire.node_id, wire.topic, wire.count),
}


class ContactEvents(Protocol):
    """What the routing table hears from the endpoint about the contacts it called."""

    def answered(self, node: Node, round_trip: float) -> None:
        """`node` replied (with a well-formed reply) to a call sent `round_trip` seconds ago,
        perhaps after the caller stopped waiting."""

    def silent(self, node: Node) -> None:
        """`node` did not reply to a call, not even late (`LATE_GRACE_TIMEOUTS`)."""


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Any]
    timer: asyncio.TimerHandle
    parse: Callable[[object], Any]
    contact: Node | None  # the contact asked, if its answer should update the routing table
    sent: float  # the loop's time when the request went out
    name: str  # the RPC's, for the log
    late: bool = False  # the caller's timeout passed: only the contact awaits the reply now


class RpcEndpoint(asyncio.DatagramProtocol):
    """One node's UDP endpoint: serves requests through a handler, issues calls with timeouts."""

    def __init__(
        self, sealer: DatagramSealer, *, rpc_timeout: float, metrics: Metrics | None = None
    ) -> None:
        self._sealer = sealer
        self._replays = ReplayGuard(sealer.window)
        self._rpc_timeout = rpc_timeout
        self._metrics = metrics
        self._handler: object | None = None
        self._contacts: ContactEvents | None = None
        self._raw: asyncio.DatagramTransport | None = None
        self._transport: SealedTransport | None = None
        self._pending: dict[bytes, _Pending] = {}
        self._closed = True
        # Set once the socket is really closed (asyncio closes it a loop iteration later).
        self._connection_closed = asyncio.Event()

    def attach(self, handler: object, contacts: ContactEvents) -> None:
        """Who serves requests (one method per `REQUESTS` name) and who hears of contacts.

        Not constructor arguments: both send through this endpoint (hand-offs, pings of a full
        bucket's head), so they are built after it.
        """
        self._handler = handler
        self._contacts = contacts

    # ----------------------------------------------------------------- the socket

    @property
    def listening(self) -> bool:
        return self._transport is not None and not self._closed

    def extra_info(self, name: str) -> Any:
        """The socket's ``sockname``, ``socket``, ... (None when not listening)."""
        return None if self._raw is None else self._raw.get_extra_info(name)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._handler is None:
            raise RuntimeError("RpcEndpoint.attach() must be called before listening")
        self._raw = cast(asyncio.DatagramTransport, transport)
        self._transport = SealedTransport(self._raw, self._sealer)
        self._closed = False
        self._connection_closed = asyncio.Event()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # asyncio reads one datagram per loop iteration: a burst of replies (an advertiser
            # announcing many keys at once) must wait in the kernel, not overflow its buffer.
            # The kernel caps this at net.core.rmem_max; best effort.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER_BYTES)

    def connection_lost(self, exc: Exception | None) -> None:
        self.shutdown()
        self._transport = None
        self._connection_closed.set()

    def error_received(self, exc: Exception) -> None:
        # A send that failed at once (unreachable network, address family): the call times out.
        log.debug("DHT socket error: %s", exc)

    def shutdown(self) -> None:
        """Resolve every outstanding call with None, so waiting lookups end now."""
        self._closed = True
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            entry.timer.cancel()
            if not entry.future.done():
                entry.future.set_result(None)

    async def close(self) -> None:
        """Stop serving and calling, and close the socket (waiting up to 1 s for it to go)."""
        self.shutdown()
        raw = self._raw
        if raw is None:
            return
        raw.close()
        # The port is free only once asyncio has closed the socket (a restart rebinds it).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self._connection_closed.wait()
        self._raw = None

    # ----------------------------------------------------------------- receiving

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self._receive(data, addr)
        except DatagramRejected as exc:
            self._dropped(exc, addr)
        except Exception:  # a bug in a handler must not take the endpoint down
            log.exception("DHT datagram from %s failed in its handler", addr)

    def _receive(self, data: bytes, addr: Any) -> None:
        now = self._sealer.now()
        payload, sent_at = self._sealer.open(data, now=now)
        if len(payload) < wire.HEADER_BYTES:
            raise Malformed("datagram shorter than its header")
        kind, msg_id = payload[:1], payload[1 : wire.HEADER_BYTES]
        if kind == wire.REQUEST:
            if not self._replays.first_use(msg_id, sent_at, now):
                raise Replayed("request id already seen")
            self._serve(msg_id, wire.decode(payload[wire.HEADER_BYTES :]), addr)
        elif kind == wire.RESPONSE:
            self._accept_response(msg_id, payload[wire.HEADER_BYTES :], addr)
        else:
            raise Malformed("unknown message type")

    def _dropped(self, exc: DatagramRejected, addr: Any) -> None:
        log.debug("dropped DHT datagram from %s (%s): %s", addr, exc.reason, exc)
        if self._metrics is not None:
            self._metrics.dht_dropped.labels(exc.reason).inc()

    def _serve(self, msg_id: bytes, data: object, address: Any) -> None:
        if not isinstance(data, list) or len(data) != 2:
            raise Malformed("a request is [name, args]")
        name, args = data
        if not isinstance(name, str) or not isinstance(args, list):
            raise Malformed("a request is [name, args]")
        validators = REQUESTS.get(name)
        if validators is None:
            raise Malformed(f"unknown RPC {name[:40]!r}")
        if len(args) != len(validators):
            raise Malformed(f"RPC {name} takes {len(validators)} arguments")
        values = [check(arg) for check, arg in zip(validators, args, strict=True)]
        sender: Address = (address[0], address[1])
        response = getattr(self._handler, name)(sender, *values)
        body = response.data if isinstance(response, wire.Packed) else umsgpack.packb(response)
        if wire.HEADER_BYTES + len(body) + SEAL_OVERHEAD > wire.MAX_DATAGRAM_BYTES:
            log.warning(
                "DHT reply to %s for %s exceeds the datagram budget; not sent", name, sender
            )
            return
        if self._transport is not None and not self._closed:
            self._transport.sendto(wire.RESPONSE + msg_id + body, address)

    def _accept_response(self, msg_id: bytes, body: bytes, address: Any) -> None:
        pending = self._pending.pop(msg_id, None)
        if pending is None:
            log.debug("unsolicited (or very late) DHT reply from %s", address)
            return
        pending.timer.cancel()
        round_trip = asyncio.get_running_loop().time() - pending.sent
        if pending.late:
            log.debug(
                "late DHT reply to %s from %s after %.3f s", pending.name, address, round_trip
            )
        try:
            value = pending.parse(wire.decode(body))
        except DatagramRejected as exc:
            self._dropped(exc, address)
            value = None
        else:
            if pending.contact is not None and self._contacts is not None:
                self._contacts.answered(pending.contact, round_trip)
        if not pending.future.done():
            pending.future.set_result(value)

    # ----------------------------------------------------------------- calling

    def request(
        self,
        address: Address,
        name: str,
        args: list[object],
        parse: Callable[[object], T],
        *,
        contact: Node | None = None,
        timeout: float | None = None,
    ) -> asyncio.Future[T | None]:
        """Send one request; the future resolves to the parsed reply, or None on no/bad reply.

        The future never carries an exception and is safe to abandon: nothing but the reply,
        the timeout (`rpc_timeout` unless given) or `shutdown` resolves it, and each checks it
        is still pending. A `contact` hears of the outcome through `ContactEvents`.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T | None] = loop.create_future()
        if self._closed or self._transport is None:
            future.set_result(None)
            return future
        msg_id = os.urandom(wire.MSG_ID_BYTES)
        datagram = wire.REQUEST + msg_id + umsgpack.packb([name, args])
        if len(datagram) + SEAL_OVERHEAD > wire.MAX_DATAGRAM_BYTES:
            raise DatagramTooLarge(f"{name} request of {len(datagram)} bytes")
        timer = loop.call_later(timeout or self._rpc_timeout, self._timeout, msg_id)
        self._pending[msg_id] = _Pending(future, timer, parse, contact, loop.time(), name)
        log.debug("calling %s on %s", name, address)
        self._transport.sendto(datagram, address)
        return future

    def _timeout(self, msg_id: bytes) -> None:
        pending = self._pending.get(msg_id)
        if pending is None:
            return
        if not pending.future.done():
            pending.future.set_result(None)
        if pending.contact is not None and not pending.late:
            log.debug("no DHT reply to %s within its timeout; awaiting it a while", pending.name)
            pending.late = True
            grace = LATE_GRACE_TIMEOUTS * self._rpc_timeout
            pending.timer = asyncio.get_running_loop().call_later(grace, self._timeout, msg_id)
            return
        del self._pending[msg_id]
        log.debug("no DHT reply to %s from %s", pending.name, pending.contact or "a peer")
        if pending.contact is not None and self._contacts is not None:
            self._contacts.silent(pending.contact)
