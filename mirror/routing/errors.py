"""Error types of the DHT. Rejected datagrams carry the reason they are counted under."""

from __future__ import annotations

from typing import ClassVar

from mirror.errors import MirrorError


class DhtError(MirrorError):
    """Base of every error the routing package raises on purpose."""


class DhtNotRunning(DhtError):
    """The node was asked to talk to the network before `listen()` or after `close()`."""


class DatagramTooLarge(DhtError):
    """An outgoing message would not fit in one datagram under the MTU budget (a bug here)."""


class DatagramRejected(DhtError):
    """An incoming datagram dropped before any handler saw it; `reason` labels the counter."""

    reason: ClassVar[str] = "malformed"


class Unauthenticated(DatagramRejected):
    """Missing or wrong MAC: not sealed with this cluster's key."""

    reason = "unauthenticated"


class Stale(DatagramRejected):
    """Sealed too long ago (or too far in the future) to be checked against replays."""

    reason = "stale"


class Replayed(DatagramRejected):
    """A request whose message id was already accepted inside the freshness window."""

    reason = "replayed"


class Malformed(DatagramRejected):
    """Authentic but unreadable: bad framing, bad msgpack, unknown RPC or wrong argument types."""

    reason = "malformed"
