"""Keeps the pinned images in the node's runtime: one worker per image, retried, re-checked.

Pins arrive by origin (the prefetch file, a workload watch, the API); each origin's set replaces
its previous one, and the union of those that apply to this node's labels is what the node
keeps. An image pinned by several origins has one worker. A pin that goes away stops being
kept; the image stays in the runtime (removing images is the runtime's garbage collector's
job, and a workload may still use it).

A worker resolves its image through the content service, makes the node hold every blob (so
the cluster fetches each once, and this node serves the others), hands the plan to the
runtime, and then re-checks on an interval: a tag that moved upstream is taken again, an image
removed from the runtime is put back. Failures are retried with capped exponential backoff and
reported in the status; nothing here stops the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from mirror.content.service import ContentService
from mirror.errors import MirrorError
from mirror.metrics import SOURCE_PEER, SOURCE_UPSTREAM, Metrics
from mirror.oci.reference import TagRef
from mirror.prefetch.model import ImagePlan, ImageRef, Pin, Runtime
from mirror.prefetch.resolve import ContentBlobs, Platform, ResolvedImage, resolve
from mirror.request import Kind, Target

log = logging.getLogger(__name__)


class PinState(StrEnum):
    WAITING = "waiting"  # not tried yet, or waiting for a free worker slot
    FETCHING = "fetching"
    HELD = "held"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Timing:
    """How often pins are re-checked and how failures back off (seconds)."""

    recheck: float = 300.0
    retry_first: float = 5.0
    retry_max: float = 300.0
    # Images fetched at once; the rest wait their turn (a node's link and disk are shared).
    parallel: int = 2

    def backoff(self, failures: int) -> float:
        return min(self.retry_first * 2.0 ** max(failures - 1, 0), self.retry_max)


@dataclass(slots=True)
class PinStatus:
    """What the node knows of one pinned image, as the API and `mirror prefetch` show it."""

    ref: ImageRef
    source: ImageRef | None
    origins: set[str]
    state: PinState = PinState.WAITING
    digest: str | None = None
    fetched: str | None = None  # the reference the content came from (source when aliased)
    through_source: bool = False
    error: str | None = None
    failures: int = 0
    attempts: int = 0  # ended, successful or not
    bytes_done: int = 0
    bytes_total: int = 0
    # Of `bytes_done`, what the latest attempt fetched from upstream and from peers.
    bytes_upstream: int = 0
    bytes_peers: int = 0
    layers_done: int = 0
    layers_total: int = 0
    checked_at: float | None = None
    next_check: float | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def as_json(self) -> dict[str, object]:
        return {
            "ref": str(self.ref),
            "source": str(self.source) if self.source else None,
            "origins": sorted(self.origins),
            "state": str(self.state),
            "digest": self.digest,
            "fetched": self.fetched,
            "through_source": self.through_source,
            "error": self.error,
            "failures": self.failures,
            "attempts": self.attempts,
            "bytes": {
                "done": self.bytes_done,
                "total": self.bytes_total,
                "upstream": self.bytes_upstream,
                "peers": self.bytes_peers,
            },
            "layers": {"done": self.layers_done, "total": self.layers_total},
            "checked_at": self.checked_at,
            "next_check": self.next_check,
        }


class PinnedSources:
    """The content service's `TagAliases`: expected names pinned here with a source.

    Made before the content service and the prefetcher, which both hold it: the prefetcher
    fills it as pins change, the service reads it when a tag cannot be resolved.
    """

    def __init__(self) -> None:
        self._sources: dict[TagRef, Target] = {}

    def replace(self, pins: Iterable[Pin]) -> None:
        sources = {}
        for pin in pins:
            expected, source = pin.ref.tag_ref, pin.source
            if expected is None or source is None:
                continue
            tag = source.tag_ref if source.digest is None else None
            sources[expected] = Target(
                Kind.MANIFEST, source.registry, source.repository, tag, source.digest
            )
        self._sources = sources

    def source_for(self, ref: TagRef) -> Target | None:
        return self._sources.get(ref)


class Prefetcher:
    """Pins in, images kept in the runtime (and expected names' sources in `PinnedSources`)."""

    def __init__(
        self,
        content: ContentService,
        runtime: Runtime | None,
        metrics: Metrics,
        *,
        labels: Mapping[str, str],
        platform: Platform,
        sources: PinnedSources | None = None,
        timing: Timing | None = None,
    ) -> None:
        self._content = content
        self._sources = sources or PinnedSources()
        self._runtime = runtime
        self._metrics = metrics
        self._labels = dict(labels)
        self._platform = platform
        self._timing = timing or Timing()
        self._by_origin: dict[str, tuple[Pin, ...]] = {}
        # Per origin, why its latest pins could not be read (the previous ones stay).
        self._origin_errors: dict[str, str | None] = {}
        self._status: dict[str, PinStatus] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(self._timing.parallel)
        self._closed = False
        # Set and replaced on every state change: `settled` waits on it, no polling.
        self._changed = asyncio.Event()

    @property
    def runtime_name(self) -> str | None:
        return self._runtime.name if self._runtime is not None else None

    @property
    def labels(self) -> Mapping[str, str]:
        return self._labels

    # --- pins in ----------------------------------------------------------------------------

    def set_pins(self, origin: str, pins: Iterable[Pin]) -> None:
        """Replace what `origin` pins; workers start and stop to match the union."""
        self._by_origin[origin] = tuple(pins)
        self._reconcile()

    def add_labels(self, labels: Mapping[str, str]) -> None:
        """Labels learnt after start (a Kubernetes node's, from the API); flags win."""
        self._labels = {**labels, **self._labels}
        self._reconcile()

    def report(self, origin: str, error: str | None) -> None:
        """What went wrong reading `origin`'s pins (None: nothing), for the status API."""
        self._origin_errors[origin] = error

    def origins(self) -> dict[str, dict[str, object]]:
        """Each origin's pin count and latest problem, as the status API shows them."""
        names = set(self._by_origin) | set(self._origin_errors)
        return {
            name: {
                "pins": len(self._by_origin.get(name, ())),
                "error": self._origin_errors.get(name),
            }
            for name in sorted(names)
        }

    def request(
        self,
        ref: ImageRef,
        source: ImageRef | None,
        origin: str = "api",
        *,
        keep: int | None = None,
    ) -> PinStatus:
        """Take an image now (the API, a followed push): pinned by `origin` until the node
        restarts, and tried at once (woken if it was pinned already).

        `keep`: only the latest `keep` images `origin` requested of `ref`'s repository stay
        pinned (a request again counts as the latest); older ones are let go.
        """
        current = self._by_origin.get(origin, ())
        existing = next((pin for pin in current if pin.ref == ref), None)
        pins = [pin for pin in current if pin.ref != ref]
        pins.append(existing if existing is not None else Pin(ref, source, origin=origin))
        if keep is not None:
            pins = _latest_of_repository(pins, ref, keep)
        if tuple(pins) != current:
            self._by_origin[origin] = tuple(pins)
            self._reconcile()
        status = self._status[str(ref)]
        if status.state is not PinState.FETCHING:
            status.wake.set()
        return status

    def _wanted(self) -> dict[str, tuple[Pin, set[str]]]:
        wanted: dict[str, tuple[Pin, set[str]]] = {}
        for origin, pins in self._by_origin.items():
            for pin in pins:
                if not pin.applies_to(self._labels):
                    continue
                key = str(pin.ref)
                if key in wanted:
                    first, origins = wanted[key]
                    origins.add(origin)
                    if first.source is None and pin.source is not None:
                        wanted[key] = (pin, origins)
                else:
                    wanted[key] = (pin, {origin})
        return wanted

    def _reconcile(self) -> None:
        if self._closed:
            return
        wanted = self._wanted()
        self._sources.replace(pin for pin, _ in wanted.values())
        for key in list(self._status):
            if key not in wanted:
                log.info("prefetch: %s is no longer pinned", key)
                del self._status[key]
                self._workers.pop(key).cancel()
        for key, (pin, origins) in wanted.items():
            status = self._status.get(key)
            if status is None:
                status = PinStatus(pin.ref, pin.source, origins)
                self._status[key] = status
                self._workers[key] = asyncio.create_task(self._keep(status), name=f"prefetch {key}")
            else:
                status.origins = origins
                if status.source != pin.source:
                    status.source = pin.source
                    status.wake.set()
        self._count_states()

    # --- status out -------------------------------------------------------------------------

    def statuses(self) -> list[PinStatus]:
        return sorted(self._status.values(), key=lambda status: str(status.ref))

    def status(self, ref: ImageRef) -> PinStatus | None:
        return self._status.get(str(ref))

    def _count_states(self) -> None:
        for state in PinState:
            count = sum(1 for status in self._status.values() if status.state is state)
            self._metrics.prefetch_pins.labels(str(state)).set(count)

    def _set_state(self, status: PinStatus, state: PinState) -> None:
        status.state = state
        self._count_states()
        self._changed.set()
        self._changed = asyncio.Event()

    async def settled(self, ref: ImageRef, *, after: int = 0) -> PinStatus:
        """The status of `ref` once more than `after` attempts at it have ended."""
        while True:
            status = self._status.get(str(ref))
            if status is None:
                raise KeyError(f"{ref} is not pinned on this node")
            if status.attempts > after:
                return status
            await self._changed.wait()

    # --- the workers ------------------------------------------------------------------------

    async def close(self) -> None:
        self._closed = True
        workers = list(self._workers.values())
        for worker in workers:
            worker.cancel()
        for worker in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def _keep(self, status: PinStatus) -> None:
        while True:
            status.wake.clear()
            try:
                async with self._slots:
                    await self._take(status)
            except (MirrorError, OSError) as exc:
                status.failures += 1
                status.error = f"{exc}" or type(exc).__name__
                self._set_state(status, PinState.FAILED)
                delay = self._timing.backoff(status.failures)
                log.warning(
                    "prefetch: %s failed (%s); retrying in %.0f s", status.ref, status.error, delay
                )
            else:
                status.failures = 0
                status.error = None
                delay = self._timing.recheck
            status.checked_at = time.time()
            status.next_check = status.checked_at + delay
            status.attempts += 1
            self._changed.set()
            self._changed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(status.wake.wait(), delay)

    async def _take(self, status: PinStatus) -> None:
        resolved = await resolve(self._content, status.ref, status.source, self._platform)
        plan = resolved.plan
        status.digest = str(plan.target.digest)
        status.fetched = str(plan.fetched)
        status.through_source = resolved.through_source
        status.layers_total = len(plan.layers)
        status.bytes_total = plan.size
        if self._runtime is not None and await self._runtime.holds(plan):
            self._held(status, plan, resolved, fetched=False)
            return
        self._set_state(status, PinState.FETCHING)
        status.bytes_done = status.layers_done = 0
        status.bytes_upstream = status.bytes_peers = 0
        if resolved.through_source:
            log.warning(
                "prefetch: %s cannot be resolved; taking it from its source %s",
                status.ref,
                plan.fetched,
            )
        await self._hold_blobs(status, resolved)
        if self._runtime is not None:
            blobs = ContentBlobs(self._content, plan.fetched, resolved.bodies)
            await self._runtime.take(plan, blobs)
        self._held(status, plan, resolved, fetched=True)

    async def _hold_blobs(self, status: PinStatus, resolved: ResolvedImage) -> None:
        """Every blob of the plan held on this node, fetched through the cluster if not."""

        def count(source: str, nbytes: int) -> None:
            status.bytes_done += nbytes
            if source == SOURCE_UPSTREAM:
                status.bytes_upstream += nbytes
            elif source == SOURCE_PEER:
                status.bytes_peers += nbytes
            self._metrics.prefetch_bytes.inc(nbytes)

        plan = resolved.plan
        blobs = ContentBlobs(self._content, plan.fetched, resolved.bodies, on_bytes=count)
        for descriptor in plan.descriptors:
            if await blobs.held_here(descriptor):
                status.bytes_done += descriptor.size
            else:
                async for _ in blobs.read(descriptor):
                    pass
            if descriptor in plan.layers:
                status.layers_done += 1

    def _held(
        self, status: PinStatus, plan: ImagePlan, resolved: ResolvedImage, *, fetched: bool
    ) -> None:
        status.bytes_done, status.layers_done = status.bytes_total, status.layers_total
        if status.state is not PinState.HELD or fetched:
            where = self._runtime.name if self._runtime is not None else "the node cache"
            via = f" from its source {plan.fetched}" if resolved.through_source else ""
            log.info(
                "prefetch: %s (%s) is held in %s%s", status.ref, plan.target.digest, where, via
            )
        self._set_state(status, PinState.HELD)


def _latest_of_repository(pins: list[Pin], ref: ImageRef, keep: int) -> list[Pin]:
    """`pins` (oldest first) without those of `ref`'s repository older than the latest `keep`."""
    same = [pin.ref for pin in pins if pin.ref.name == ref.name]
    dropped = set(same[: max(0, len(same) - keep)])
    return [pin for pin in pins if pin.ref not in dropped]
