"""Broadcast messages: their limits, the ids a node has seen, and the recent ones it keeps.

Shared by the DHT's epidemic broadcast (broadcast.py) and the in-memory cluster (memory.py), so
both refuse the same messages and answer `recent` the same way. Pure bookkeeping: no I/O, no
timers (expiry applies on read and on write), bounded in memory whatever peers send.

Sizes: a message rides in one datagram (wire.py's 1380-byte budget, sealed, under a typical MTU
with tunnel overhead), beside its id, origin, topic and hop count, and one message must fit a
`recent` reply page on its own. 1 KiB leaves ~150 bytes of room for the rest; a push event
(``registry/repository:tag`` and a digest) takes a few hundred bytes.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

MAX_MESSAGE_BYTES = 1024
MAX_TOPIC_BYTES = 64
MESSAGE_ID_BYTES = 16
# Kept per topic, and for how long (seconds): what a node that restarts can catch up on.
RECENT_PER_TOPIC = 64
RECENT_TTL = 3600.0
# Topics kept at once: past this the topic whose latest message is oldest is dropped whole.
MAX_TOPICS = 64
# Message ids remembered against duplicates: a flood ends within seconds (hop limit), so an
# hour is ample; the count bounds memory under any rate (~100 bytes each).
SEEN_IDS = 8192


def check_message(topic: str, message: bytes) -> None:
    """Raise `ValueError` unless `topic` and `message` can be broadcast."""
    check_topic(topic)
    if not isinstance(message, bytes):
        raise ValueError("a broadcast message is bytes")
    if len(message) > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"a broadcast message is at most {MAX_MESSAGE_BYTES} bytes, not {len(message)}"
        )


def check_topic(topic: str) -> None:
    if not isinstance(topic, str) or not topic or not topic.isprintable():
        raise ValueError("a broadcast topic is a non-empty printable text")
    if len(topic.encode()) > MAX_TOPIC_BYTES:
        raise ValueError(f"a broadcast topic is at most {MAX_TOPIC_BYTES} bytes (UTF-8)")


@dataclass(frozen=True, slots=True)
class Kept:
    """One message a node keeps: `seq` orders a node's own log (the `recent` page cursor)."""

    seq: int
    message_id: bytes
    origin: bytes  # node id of the node that broadcast it
    body: bytes
    at: float  # when it was broadcast, on this node's clock


class RecentLog:
    """The last `RECENT_PER_TOPIC` messages of each topic, each for `RECENT_TTL` seconds."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._topics: dict[str, deque[Kept]] = {}
        self._seq = 0

    def keep(self, topic: str, message_id: bytes, origin: bytes, body: bytes, age: float) -> None:
        """Keep a message first seen now that was broadcast `age` seconds ago."""
        now = self._clock()
        if age >= RECENT_TTL:
            return
        kept = self._topics.get(topic)
        if kept is None:
            if len(self._topics) >= MAX_TOPICS:
                self._drop_stalest_topic()
            kept = self._topics[topic] = deque(maxlen=RECENT_PER_TOPIC)
        self._seq += 1
        kept.append(Kept(self._seq, message_id, origin, body, now - age))

    def newest_first(self, topic: str, *, before: int = 0) -> list[Kept]:
        """Live messages of `topic`, newest first; with `before`, only those with a lower seq."""
        kept = self._topics.get(topic)
        if kept is None:
            return []
        oldest_live = self._clock() - RECENT_TTL
        while kept and kept[0].at <= oldest_live:
            kept.popleft()
        if not kept:
            del self._topics[topic]
        # A message caught up from a peer may be older than one kept before it: filter too.
        return [
            entry
            for entry in reversed(kept)
            if entry.at > oldest_live and (not before or entry.seq < before)
        ]

    def age(self, entry: Kept) -> float:
        return max(0.0, self._clock() - entry.at)

    def _drop_stalest_topic(self) -> None:
        stalest = min(self._topics, key=lambda topic: self._topics[topic][-1].at)
        del self._topics[stalest]


class SeenIds:
    """Message ids already delivered or forwarded here, at most `SEEN_IDS` for `RECENT_TTL`."""

    def __init__(
        self, *, limit: int = SEEN_IDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limit = limit
        self._clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # id -> when first seen

    def first_sight(self, message_id: bytes) -> bool:
        """Record `message_id`; False if it was seen already (and is still remembered)."""
        now = self._clock()
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if at > now - RECENT_TTL and len(self._seen) < self._limit:
                break
            del self._seen[oldest]
        if message_id in self._seen:
            return False
        self._seen[message_id] = now
        return True

    def __len__(self) -> int:
        return len(self._seen)
