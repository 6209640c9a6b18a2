"""The tunables one DHT node runs with, checked once where they are made.

Nothing from kademlia: these are plain numbers, and every other routing module reads them from
here rather than taking its own copy of each, so one `DhtSettings` describes a node entirely.
"""

from __future__ import annotations

from dataclasses import dataclass

from mirror.errors import ConfigError


@dataclass(frozen=True, slots=True)
class DhtSettings:
    """What each number bounds.

    `ksize` copies of each record are kept (on the nodes closest to its key), `alpha` queries run
    in parallel per lookup, `rpc_timeout` bounds one RPC, `resolve_timeout` one provider lookup
    for a pull, `record_ttl` how long a record (or a claim) lives unless announced again. The two
    reply caps keep every reply inside one datagram (the byte budget in wire.py trims further if
    addresses are long). `broadcast_fanout` is how many contacts a node passes a broadcast
    message on to (None: all of them; the origin always sends to all, see broadcast.py).
    """

    ksize: int = 20
    alpha: int = 3
    rpc_timeout: float = 0.25
    resolve_timeout: float = 0.02
    record_ttl: float = 600.0
    max_providers_per_reply: int = 8
    max_contacts_per_reply: int = 12
    broadcast_fanout: int | None = None

    def __post_init__(self) -> None:
        # A bad value here would not fail at once but make every lookup empty or endless:
        # refuse it when the node is built, as a configuration error the operator can read.
        for name, value in (("ksize", self.ksize), ("alpha", self.alpha)):
            if value < 1:
                raise ConfigError(f"DHT {name} must be at least 1")
        for name, number in (
            ("rpc_timeout", self.rpc_timeout),
            ("resolve_timeout", self.resolve_timeout),
            ("record_ttl", self.record_ttl),
        ):
            if not number > 0:
                raise ConfigError(f"DHT {name} must be positive")
        if self.max_providers_per_reply < 1 or self.max_contacts_per_reply < 1:
            raise ConfigError("DHT reply caps must be at least 1")
        if self.broadcast_fanout is not None and self.broadcast_fanout < 1:
            raise ConfigError("DHT broadcast fanout must be at least 1")
