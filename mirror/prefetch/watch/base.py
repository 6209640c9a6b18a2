"""What both workload watches share: retrying, logging each problem once, reading images.

A watch runs for the life of the node and its API server may be away for hours, so a failure
must cost one log line, not one per retry: `Retry` logs a kind of failure (``HTTP 503``,
``cannot connect to …``) once for as long as it lasts, and waits a capped, jittered backoff
between attempts. A skipped image is the same: a Kubernetes Deployment is MODIFIED at every
status change, so `Once` keeps which problems were already told.

Memory stays bounded by the number of workloads: a watch keeps per workload only its image
set, capped at `MAX_IMAGES_PER_WORKLOAD`, never the objects the API sent.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass

from mirror.errors import DigestInvalid, NameInvalid
from mirror.prefetch.model import ImageRef, parse_image_ref
from mirror.routing.bootstrap.http import LookupFailed

# More than any real pod or task group holds; a workload past it is malformed or hostile.
MAX_IMAGES_PER_WORKLOAD = 256
# Problems remembered as already logged; past this the memory starts over.
MAX_REMEMBERED = 4096
# Failure kinds remembered per source during one outage (kinds are few; this only bounds).
_MAX_KINDS = 32


class ImageSkipped(Exception):
    """An image string a watch will not prefetch; the text says which and why."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between retries: `first`, doubling up to `maximum`, each jittered down to half.

    The jitter keeps the nodes that all lost the API server at once from all coming back at
    the same instant.
    """

    first: float = 1.0
    maximum: float = 60.0

    def delay(self, attempt: int) -> float:
        """The wait before retry number `attempt` (0 for the first retry)."""
        base = min(self.maximum, self.first * 2.0 ** min(attempt, 64))
        return base * random.uniform(0.5, 1.0)


class Retry:
    """One source's failures: which kinds were logged, and how long to wait before the next try.

    `failed` logs a kind the first time it is seen during an outage and sleeps the backoff;
    `succeeded` ends the outage (one info line if anything was logged) and resets the delay.
    """

    def __init__(self, what: str, log: logging.Logger, backoff: Backoff) -> None:
        self.what = what
        self.log = log
        self.backoff = backoff
        self.attempt = 0
        self.logged: set[str] = set()

    async def failed(self, kind: str, message: str) -> None:
        if kind not in self.logged and len(self.logged) < _MAX_KINDS:
            self.logged.add(kind)
            self.log.warning("%s: %s (retrying; the last known images stand)", self.what, message)
        delay = self.backoff.delay(self.attempt)
        self.attempt += 1
        await asyncio.sleep(delay)

    def succeeded(self) -> None:
        if self.logged:
            self.log.info("%s: the API answers again", self.what)
            self.logged.clear()
        self.attempt = 0


def failure_kind(exc: LookupFailed) -> str:
    """What makes two failures "the same" for logging: the HTTP status, or the message's head.

    The head is the text before the first colon (``malformed JSON``, ``cannot connect to
    127.0.0.1``), so details that change between retries do not make a new kind.
    """
    if exc.status is not None:
        return f"HTTP {exc.status}"
    return str(exc).partition(":")[0]


class Once:
    """Problems already logged, by key, so each is logged once; bounded by `MAX_REMEMBERED`."""

    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def first(self, key: str) -> bool:
        """True the first time `key` is seen (and again after the memory started over)."""
        if key in self.seen:
            return False
        if len(self.seen) >= self.limit:
            self.seen.clear()
        self.seen.add(key)
        return True


def image_ref(text: str) -> ImageRef:
    """`text` as an image reference; `ImageSkipped` with the reason if it is not one."""
    try:
        return parse_image_ref(text)
    except (NameInvalid, DigestInvalid) as exc:
        raise ImageSkipped(str(exc)) from None


class Images:
    """Collects one workload's images, logging each skipped image string once per workload.

    `where` names the workload in log lines (``job default/web``, ``deployment shop/api``).
    """

    def __init__(self, where: str, log: logging.Logger, once: Once) -> None:
        self.where = where
        self.log = log
        self.once = once
        self.found: set[ImageRef] = set()

    def skip(self, text: str, reason: str) -> None:
        if self.once.first(f"{self.where}\0{text}"):
            self.log.warning("%s: image %r skipped: %s", self.where, text, reason)

    def add(self, text: str) -> None:
        try:
            self.found.add(image_ref(text))
        except ImageSkipped as exc:
            self.skip(text, str(exc))

    def result(self) -> frozenset[ImageRef]:
        """The images found, at most `MAX_IMAGES_PER_WORKLOAD` (the first by name if more)."""
        if len(self.found) <= MAX_IMAGES_PER_WORKLOAD:
            return frozenset(self.found)
        if self.once.first(f"{self.where}\0too many"):
            self.log.warning(
                "%s: %d images; only the first %d by name are prefetched",
                self.where,
                len(self.found),
                MAX_IMAGES_PER_WORKLOAD,
            )
        return frozenset(sorted(self.found, key=str)[:MAX_IMAGES_PER_WORKLOAD])


def union(sets: Iterable[frozenset[ImageRef]]) -> frozenset[ImageRef]:
    """All images of all workloads, once each."""
    return frozenset().union(*sets)
