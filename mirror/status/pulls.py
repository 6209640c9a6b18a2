"""The recent pulls: the last manifest and blob requests the registry front answered.

A ring buffer fed by the front (`registry/api.py` calls `observe` for each such request once it
is answered), so memory stays bounded however busy the node is. A pull served from a peer is
noted with the peer's address while the peer fetcher still remembers which one it took.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from mirror.metrics import SOURCE_PEER
from mirror.registry.api import ObservedPull

DEFAULT_KEPT = 128


class PeerAttribution(Protocol):
    """Which peer served a key (a digest or a tag) last: the peer fetcher's `served_by`."""

    def served_by(self, key: str) -> str | None: ...


@dataclass(frozen=True, slots=True)
class PullRecord:
    pull: ObservedPull
    peer: str | None  # the peer that sent the bytes, when the source is a peer and it is known

    def as_json(self) -> dict[str, object]:
        pull = self.pull
        return {
            "at": pull.at,
            "method": pull.method,
            "kind": pull.kind,
            "ref": pull.ref,
            "digest": pull.digest,
            "source": pull.source,
            "status": pull.status,
            "bytes": pull.body_bytes,
            "seconds": pull.seconds,
            "caller": pull.caller,
            "client": pull.client,
            "peer": self.peer,
        }


class PullLog:
    """The last `kept` pulls, newest last; implements the front's `PullObserver`."""

    def __init__(self, kept: int = DEFAULT_KEPT, peers: PeerAttribution | None = None) -> None:
        if kept < 1:
            raise ValueError("a pull log keeps at least one pull")
        self._records: deque[PullRecord] = deque(maxlen=kept)
        self._peers = peers

    def observe(self, pull: ObservedPull) -> None:
        peer = None
        if pull.source == SOURCE_PEER and self._peers is not None:
            for key in (pull.digest, pull.ref):
                peer = self._peers.served_by(key) if key else None
                if peer is not None:
                    break
        self._records.append(PullRecord(pull, peer))

    def recent(self) -> list[PullRecord]:
        """Newest first."""
        return list(reversed(self._records))

    def __len__(self) -> int:
        return len(self._records)
