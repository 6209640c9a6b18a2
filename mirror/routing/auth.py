"""Datagram sealing: every DHT datagram carries a timestamp and an HMAC under the cluster key.

Sealed layout: ``payload || timestamp (8 bytes, signed big-endian milliseconds) || MAC (32)``.
The MAC covers payload and timestamp, and is checked before a single byte of the payload is
parsed, so an outsider can neither inject records nor reach the msgpack decoder. The timestamp
bounds how long a captured datagram stays usable; inside that window a replayed request is
recognised by its message id (`clusterkey.ReplayGuard`, checked in `rpc.py`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from mirror.clusterkey import FRESHNESS_SECONDS, MAC_BYTES, PurposeKey
from mirror.routing.errors import Stale, Unauthenticated

TIMESTAMP_BYTES = 8
SEAL_OVERHEAD = TIMESTAMP_BYTES + MAC_BYTES


class DatagramSealer:
    """Seals outgoing and opens incoming datagrams with the cluster's "dht" purpose key."""

    def __init__(
        self,
        key: PurposeKey,
        *,
        window: float = FRESHNESS_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self.window = window
        self._clock = clock

    def now(self) -> float:
        return self._clock()

    def seal(self, payload: bytes, *, now: float | None = None) -> bytes:
        """`payload` with its timestamp and MAC appended (`now` overrides the clock for tests)."""
        stamp = round((self._clock() if now is None else now) * 1000)
        stamp_bytes = stamp.to_bytes(TIMESTAMP_BYTES, "big", signed=True)
        return payload + stamp_bytes + self._key.mac(payload, stamp_bytes)

    def open(self, datagram: bytes, *, now: float | None = None) -> tuple[bytes, float]:
        """The payload and its send time; raises `Unauthenticated` or `Stale`.

        The MAC is verified first: a datagram without a valid MAC is never looked at further,
        whatever its timestamp says.
        """
        if len(datagram) < SEAL_OVERHEAD:
            raise Unauthenticated("datagram too short to carry a seal")
        body, mac = datagram[:-MAC_BYTES], datagram[-MAC_BYTES:]
        payload, stamp_bytes = body[:-TIMESTAMP_BYTES], body[-TIMESTAMP_BYTES:]
        if not self._key.verify(mac, payload, stamp_bytes):
            raise Unauthenticated("bad MAC")
        sent_at = int.from_bytes(stamp_bytes, "big", signed=True) / 1000
        current = self._clock() if now is None else now
        if abs(current - sent_at) > self.window:
            raise Stale(f"sealed {current - sent_at:+.1f} s ago")
        return payload, sent_at


class SealedTransport:
    """Wraps the UDP transport so that everything sent through it, by any layer, is sealed.

    The endpoint (rpc.py) only ever holds this wrapper, never the raw transport, for sending:
    wrapping the transport rather than each call site means no code path can send an unsealed
    datagram.
    """

    def __init__(self, transport: asyncio.DatagramTransport, sealer: DatagramSealer) -> None:
        self._transport = transport
        self._sealer = sealer

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self._transport.sendto(self._sealer.seal(data), addr)

    def close(self) -> None:
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)
