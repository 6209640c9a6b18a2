"""The wire format: message framing, argument validation and the per-datagram byte budget.

rpcudp frames a message as ``type (1 byte) || msg id (20) || msgpack body`` and the body of a
request is ``[name, args]``. Everything read off the network goes through the validators here
before it reaches a handler or the routing table, and every reply is trimmed to fit one datagram
under a typical MTU, so no message ever relies on IP fragmentation.
"""

from __future__ import annotations

import functools
import io
import ipaddress
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import umsgpack
from kademlia.node import Node

from mirror.ports import port_number
from mirror.routing.auth import SEAL_OVERHEAD
from mirror.routing.errors import DatagramTooLarge, Malformed
from mirror.routing.keys import ID_BYTES
from mirror.routing.messages import MAX_MESSAGE_BYTES, MESSAGE_ID_BYTES, check_topic
from mirror.routing.router import Provider

E = TypeVar("E")

REQUEST = b"\x00"
RESPONSE = b"\x01"
MSG_ID_BYTES = 20
HEADER_BYTES = 1 + MSG_ID_BYTES

# Whole sealed datagram, below a 1500-byte Ethernet MTU minus IP/UDP headers and tunnel overhead
# (VXLAN, WireGuard) that cluster networks commonly add.
MAX_DATAGRAM_BYTES = 1380
MAX_BODY_BYTES = MAX_DATAGRAM_BYTES - HEADER_BYTES - SEAL_OVERHEAD
MAX_ADDRESS_CHARS = 255


@dataclass(frozen=True, slots=True)
class Found:
    """What one lookup step learns from a peer: closer contacts, and providers if it had any."""

    contacts: list[Node]
    providers: list[Provider]


@dataclass(frozen=True, slots=True)
class HandOffRecord:
    key: bytes
    provider: Provider
    ttl: float


@dataclass(frozen=True, slots=True)
class RecentEntry:
    """One broadcast message a `recent` reply carries, `age` seconds after its broadcast."""

    message_id: bytes
    origin: bytes
    age: float
    body: bytes


@dataclass(frozen=True, slots=True)
class RecentPage:
    """A `recent` reply: newest first, and the cursor to ask for older ones (None: no more)."""

    entries: list[RecentEntry]
    next: int | None


def decode(body: bytes) -> object:
    """One msgpack object that must span all of `body`; raises `Malformed` on anything else."""
    stream = io.BytesIO(body)
    try:
        value = umsgpack.unpack(stream)
    except Exception as exc:  # umsgpack raises several families, RecursionError included
        raise Malformed(f"undecodable body: {type(exc).__name__}") from exc
    if stream.tell() != len(body):
        raise Malformed("trailing bytes after the message body")
    return value


def node_id(value: object) -> bytes:
    """A node id or key: exactly 20 bytes."""
    if not isinstance(value, bytes) or len(value) != ID_BYTES:
        raise Malformed("expected a 20-byte id")
    return value


def keys(value: object) -> list[bytes]:
    """A non-empty list of keys (an `add_providers` batch; its datagram bounds its length)."""
    if not isinstance(value, list) or not value:
        raise Malformed("expected a non-empty list of keys")
    return [node_id(key) for key in value]


def port(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise Malformed("expected a port number")
    return value


def http_address(value: object) -> str:
    """A ``host:port`` text (host may be a bracketed IPv6 literal)."""
    if not isinstance(value, str) or not 2 < len(value) <= MAX_ADDRESS_CHARS:
        raise Malformed("expected a host:port address")
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not host.isprintable() or " " in host:
        raise Malformed("expected a host:port address")
    if port_number(port_text) is None:
        raise Malformed("expected a host:port address")
    return value


def ip_literal(value: object) -> str:
    """An IP address literal: contacts are sent to directly, never resolved by name."""
    if not isinstance(value, str) or len(value) > 45 or not _is_ip(value):
        raise Malformed("expected an IP address")
    return value


@functools.lru_cache(maxsize=4096)
def _is_ip(text: str) -> bool:
    # Cached: the same few hundred peer addresses arrive in every reply, and parsing them with
    # ipaddress each time cost as much as decoding the reply.
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def ttl(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise Malformed("expected a TTL in seconds")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise Malformed("expected a positive TTL")
    return seconds


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise Malformed("expected a boolean")
    return value


def count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise Malformed("expected a count")
    return value


def anything(value: object) -> object:
    return value


def _items(value: object, width: int) -> list[list[object]]:
    if not isinstance(value, list):
        raise Malformed("expected a list")
    for item in value:
        if not isinstance(item, list) or len(item) != width:
            raise Malformed(f"expected entries of {width} fields")
    return value


def contacts(value: object) -> list[Node]:
    return [Node(node_id(i), ip_literal(h), port(p)) for i, h, p in _items(value, 3)]


def providers(value: object) -> list[Provider]:
    return [Provider(node_id(i), http_address(a)) for i, a in _items(value, 2)]


def hand_off_records(value: object) -> list[HandOffRecord]:
    return [
        HandOffRecord(node_id(k), Provider(node_id(i), http_address(a)), ttl(t))
        for k, i, a, t in _items(value, 4)
    ]


def found(value: object) -> Found:
    """A get_providers reply: ``[providers, contacts]``."""
    if not isinstance(value, list) or len(value) != 2:
        raise Malformed("expected [providers, contacts]")
    return Found(contacts=contacts(value[1]), providers=providers(value[0]))


def claim_holder(value: object) -> Provider | None:
    """A claim reply: the holder as ``[node id, address]``, or nil when the claim was refused."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise Malformed("expected [holder id, holder address]")
    return Provider(node_id(value[0]), http_address(value[1]))


def claim_reply(holder: Provider) -> list[object]:
    return [holder.node_id, holder.address]


def message_id(value: object) -> bytes:
    """A broadcast message's id: exactly `MESSAGE_ID_BYTES` random bytes."""
    if not isinstance(value, bytes) or len(value) != MESSAGE_ID_BYTES:
        raise Malformed(f"expected a {MESSAGE_ID_BYTES}-byte message id")
    return value


def topic(value: object) -> str:
    if not isinstance(value, str):
        raise Malformed("expected a topic")
    try:
        check_topic(value)
    except ValueError as exc:
        raise Malformed(str(exc)) from exc
    return value


def hops(value: object) -> int:
    """How many hops a broadcast message made to get here (the origin's send is the first)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 256:
        raise Malformed("expected a hop count")
    return value


def message(value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) > MAX_MESSAGE_BYTES:
        raise Malformed(f"expected a message of at most {MAX_MESSAGE_BYTES} bytes")
    return value


def age(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise Malformed("expected an age in seconds")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise Malformed("expected a non-negative age")
    return seconds


def recent_page(value: object) -> RecentPage:
    """A `recent` reply: ``[[[message id, origin, age, body], ...], next cursor or nil]``."""
    if not isinstance(value, list) or len(value) != 2:
        raise Malformed("expected [entries, next]")
    entries = [
        RecentEntry(message_id(i), node_id(o), age(a), message(b))
        for i, o, a, b in _items(value[0], 4)
    ]
    cursor = None if value[1] is None else count(value[1])
    return RecentPage(entries, cursor)


# ---------------------------------------------------------------- encoding within the budget

# An array header takes 1 byte up to 15 items, 3 bytes up to 65535: budget the larger.
_ARRAY_HEADER = 3


@dataclass(frozen=True, slots=True)
class Packed:
    """A reply already encoded as msgpack: sent as it is instead of packed again."""

    data: bytes


def contact_entry(node: Node) -> bytes:
    return _packed_entry(node.id, node.ip, node.port)


def provider_entry(provider: Provider) -> bytes:
    return _packed_entry(provider.node_id, provider.address)


@functools.lru_cache(maxsize=8192)
def _packed_entry(*fields: object) -> bytes:
    # The same contacts and providers go into reply after reply, and umsgpack is pure Python:
    # encoding each once and assembling replies from bytes halved the cost of serving them.
    return bytes(umsgpack.packb(list(fields)))


def array_header(length: int) -> bytes:
    if length < 16:
        return bytes([0x90 | length])
    if length < 65536:
        return b"\xdc" + length.to_bytes(2, "big")
    return b"\xdd" + length.to_bytes(4, "big")


def fit_packed(entries: Iterable[bytes], budget: int) -> tuple[bytes, int]:
    """The leading encoded `entries` that fit in `budget` bytes, as one encoded array.

    Returns the array with its size, so a caller can spend the rest on another array.
    """
    kept: list[bytes] = []
    used = _ARRAY_HEADER
    for entry in entries:
        if used + len(entry) > budget:
            break
        kept.append(entry)
        used += len(entry)
    array = array_header(len(kept)) + b"".join(kept)
    return array, len(array)


def recent_entry(entry: RecentEntry) -> bytes:
    return bytes(umsgpack.packb([entry.message_id, entry.origin, entry.age, entry.body]))


def recent_reply(entries: Iterable[tuple[int, bytes]], budget: int = MAX_BODY_BYTES) -> Packed:
    """A `recent` reply from ``(seq, recent_entry(...))`` pairs, newest first.

    Carries the leading entries that fit in `budget` and, when some did not, the seq of the last
    one carried: the asker's next ``before``. One entry always fits (messages.py sizes them), so
    paging always advances.
    """
    kept: list[bytes] = []
    used = 1 + _ARRAY_HEADER + 9  # [entries, next]: outer header, entries header, a uint64
    last_seq: int | None = None
    cursor: int | None = None
    for seq, entry in entries:
        if used + len(entry) > budget:
            cursor = last_seq
            break
        kept.append(entry)
        used += len(entry)
        last_seq = seq
    body = array_header(2) + array_header(len(kept)) + b"".join(kept) + umsgpack.packb(cursor)
    return Packed(body)


def hand_off_entry(record: HandOffRecord) -> list[object]:
    return [record.key, record.provider.node_id, record.provider.address, record.ttl]


def batches(
    entries: Iterable[E], budget: int, *, size: Callable[[E], int] | None = None
) -> list[list[E]]:
    """Split `entries` into arrays of at most `budget` packed bytes each (an entry never splits).

    `size` gives an entry's packed size when the entry is not itself what is packed (a key
    with the future that waits on it); by default the entry's own packed size.
    """
    measure: Callable[[E], int] = packed_size if size is None else size
    out: list[list[E]] = []
    current: list[E] = []
    used = _ARRAY_HEADER
    for entry in entries:
        entry_size = measure(entry)
        if used + entry_size > budget and current:
            out.append(current)
            current, used = [], _ARRAY_HEADER
        if used + entry_size > budget:
            raise DatagramTooLarge("a single entry exceeds the datagram budget")
        current.append(entry)
        used += entry_size
    if current:
        out.append(current)
    return out


def packed_size(value: object) -> int:
    """Bytes `value` takes in msgpack, computed without packing it, for the types sent here."""
    if isinstance(value, bytes):
        return len(value) + _length_header(len(value), small=0)
    if isinstance(value, str):
        size = len(value.encode())
        return size + _length_header(size, small=32)
    if value is None or isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return _int_size(value)
    if isinstance(value, float):
        return 9  # umsgpack packs floats as doubles
    if isinstance(value, list | tuple):
        return _length_header(len(value), small=16, byte=False) + sum(map(packed_size, value))
    return len(umsgpack.packb(value))


def _length_header(length: int, *, small: int, byte: bool = True) -> int:
    if length < small:
        return 1
    if byte and length < 256:
        return 2
    return 3 if length < 65536 else 5


def _int_size(value: int) -> int:
    if -32 <= value < 128:
        return 1
    for size, low, high in ((2, -(2**7), 2**8), (3, -(2**15), 2**16), (5, -(2**31), 2**32)):
        if low <= value < high:
            return size
    return 9
