"""Distribution on push: a pushed tag taken by every node that follows it, and its progress.

A push event (a registry's webhook, Docker Hub's, a poll that saw a tag move, `mirror
distribute`) reaches one node. That node becomes the distribution's *origin*: it tells every
other node through the router's broadcast (`routing.router.Broadcaster`: flooded over the DHT's
contacts, so no central list of nodes is needed and a dead node costs one timeout), and handles
the event itself like any node:

- a node whose `[[follow]]` entries match the tag (and whose labels match the entry's `nodes`)
  pins the tag (origin `follow`) and wakes its worker: the prefetcher resolves it and puts it
  into the runtime, the bytes moving through the swarm (one upstream fetch per blob for the
  cluster). The pin stays until a newer push of the same tag replaces its content;
- it reports to the origin (a signed peer request) when it starts and when it ends, with the
  bytes it took from upstream and from peers, so the origin can show the whole cluster's
  progress (`GET /mirror/v1/distributions`).

The same push delivered twice, or a flood of events for one tag, starts one distribution: events
are keyed by tag and digest (a digest seen before is the same distribution; events without a
digest, from Docker Hub or by hand, are merged for `_MERGE_WINDOW` seconds). A node that was down
during an event asks the others for recent broadcasts when it starts (`catch_up`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from mirror.errors import MirrorError
from mirror.metrics import Metrics
from mirror.prefetch.follow import follow_matches
from mirror.prefetch.model import Follow, ImageRef, PushEvent, parse_image_ref
from mirror.prefetch.prefetcher import PinState, PinStatus, Prefetcher
from mirror.routing.router import Broadcaster

log = logging.getLogger(__name__)

TOPIC = "push"
# Events without a digest for the same tag within this many seconds are one distribution.
_MERGE_WINDOW = 30.0
# Distributions remembered (for dedupe and the API), oldest dropped first.
_KEPT = 256
# A node reports to the origin with this timeout; a lost report costs only the status line.
_REPORT_TIMEOUT = 5.0
# While a node fetches, it reports its progress this often.
_PROGRESS_EVERY = 1.0
# Attempts of the prefetcher before a node reports its part failed.
_ATTEMPTS = 3
# Before asking again for a tag that still pointed to the previous push (times the attempt).
_STALE_PAUSE = 1.0
# How long after its start the origin waits for nodes to say they take part, before it calls a
# distribution whose known nodes all ended complete (the broadcast reaches 64 nodes in well
# under a second; see docs/benchmarks.md).
SETTLE_SECONDS = 3.0

Reporter = Callable[[str, str, dict[str, object]], Awaitable[None]]


@dataclass(slots=True)
class NodeProgress:
    """One node's part in a distribution, as it reported it."""

    state: str  # "fetching", "held", "failed"
    digest: str | None = None
    error: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    bytes_upstream: int = 0
    bytes_peers: int = 0
    updated: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, object]:
        return {
            "state": self.state,
            "digest": self.digest,
            "error": self.error,
            "bytes": {
                "done": self.bytes_done,
                "total": self.bytes_total,
                "upstream": self.bytes_upstream,
                "peers": self.bytes_peers,
            },
            "updated": self.updated,
        }


@dataclass(slots=True)
class Distribution:
    id: str
    ref: ImageRef
    digest: str | None
    trigger: str
    origin: str
    started: float
    nodes: dict[str, NodeProgress] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        states = [progress.state for progress in self.nodes.values()]
        return {
            "total": len(states),
            "done": states.count("held"),
            "failed": states.count("failed"),
            "fetching": states.count("fetching"),
        }

    def complete(self, now: float) -> bool:
        """Every node that took part has ended, and the nodes had time to say they take part."""
        counts = self.counts()
        return now - self.started >= SETTLE_SECONDS and counts["fetching"] == 0

    def ended_at(self, now: float) -> float | None:
        """When the last node's part ended, once the distribution is complete."""
        if not self.complete(now):
            return None
        return max((progress.updated for progress in self.nodes.values()), default=self.started)

    def as_json(self) -> dict[str, object]:
        now = time.time()
        totals = {
            "upstream": sum(p.bytes_upstream for p in self.nodes.values()),
            "peers": sum(p.bytes_peers for p in self.nodes.values()),
        }
        return {
            "id": self.id,
            "ref": str(self.ref),
            "digest": self.digest,
            "trigger": self.trigger,
            "origin": self.origin,
            "started": self.started,
            "ended": self.ended_at(now),
            "complete": self.complete(now),
            "nodes": self.counts(),
            "bytes": totals,
            "by_node": {node: progress.as_json() for node, progress in sorted(self.nodes.items())},
        }


def distribution_id(ref: ImageRef, digest: str | None, started: float) -> str:
    """Stable for a tag and digest (a push delivered twice is one distribution); by time when
    the trigger knows no digest."""
    basis = f"{ref}@{digest}" if digest else f"{ref}#{int(started // _MERGE_WINDOW)}"
    return hashlib.sha256(basis.encode()).hexdigest()[:16]


class Distributor:
    """Push events in; follow pins, broadcast, progress out. Also the webhooks' `PushSink`."""

    def __init__(
        self,
        prefetcher: Prefetcher,
        metrics: Metrics,
        *,
        own_address: str,
        broadcaster: Broadcaster | None = None,
        reporter: Reporter | None = None,
    ) -> None:
        self._prefetcher = prefetcher
        self._metrics = metrics
        self._own = own_address
        self._broadcaster = broadcaster
        self._reporter = reporter
        self._follows: tuple[Follow, ...] = ()
        self._distributions: OrderedDict[str, Distribution] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        # Set and replaced on every report recorded: `ended` waits on it, no polling.
        self._recorded = asyncio.Event()
        if broadcaster is not None:
            broadcaster.subscribe(TOPIC, self._on_message)

    # --- what this node follows --------------------------------------------------------------

    def set_follows(self, follows: Iterable[Follow]) -> None:
        self._follows = tuple(follows)

    def follows(self, ref: ImageRef) -> bool:
        return self._keep(ref) is not None

    def _keep(self, ref: ImageRef) -> int | None:
        """How many tags of `ref`'s repository the follows taking `ref` keep; None: none does."""
        keeps = [
            follow.keep
            for follow in self._follows
            if follow.applies_to(self._prefetcher.labels) and follow_matches(follow, ref)
        ]
        return max(keeps, default=None)

    # --- events in ---------------------------------------------------------------------------

    def pushed(self, event: PushEvent) -> None:
        """`PushSink`: a push seen by this node; it becomes the distribution's origin."""
        self.start(event)

    def start(self, event: PushEvent) -> Distribution:
        """The distribution of `event`: a new one (announced to the cluster), or the one the
        same push already started."""
        now = time.time()
        digest = str(event.ref.digest) if event.ref.digest else None
        ref = _tag_only(event.ref)
        key = distribution_id(ref, digest, now)
        existing = self._distributions.get(key)
        if existing is not None:
            self._metrics.distributions.labels("merged").inc()
            return existing
        distribution = Distribution(key, ref, digest, event.trigger, self._own, now)
        self._remember(distribution)
        self._metrics.distributions.labels("started").inc()
        log.info(
            "distribution %s: %s%s (%s) to the cluster",
            key,
            ref,
            f" ({digest})" if digest else "",
            event.trigger,
        )
        message = {
            "id": key,
            "ref": str(ref),
            "digest": digest,
            "trigger": event.trigger,
            "origin": self._own,
            "started": now,
        }
        if self._broadcaster is not None:
            self._spawn(self._broadcast(json.dumps(message).encode()))
        self._take_part(distribution)
        return distribution

    async def _broadcast(self, message: bytes) -> None:
        assert self._broadcaster is not None
        try:
            await self._broadcaster.broadcast(TOPIC, message)
        except (MirrorError, OSError, ValueError) as exc:
            log.warning("cannot announce a distribution to the cluster: %s", exc)

    def _on_message(self, message: bytes) -> None:
        """A distribution another node started (or one this node missed, on catch-up)."""
        distribution = _parse_message(message)
        if distribution is None:
            log.info("ignored a malformed distribution message (%d bytes)", len(message))
            return
        if distribution.id in self._distributions or distribution.origin == self._own:
            return
        self._remember(distribution)
        self._take_part(distribution)

    async def catch_up(self) -> None:
        """Distributions announced while this node was down, asked from its contacts."""
        if self._broadcaster is None:
            return
        try:
            messages = await self._broadcaster.recent(TOPIC)
        except (MirrorError, OSError) as exc:
            log.info("no recent distributions from the cluster: %s", exc)
            return
        for message in messages:
            self._on_message(message)

    def _remember(self, distribution: Distribution) -> None:
        self._distributions[distribution.id] = distribution
        while len(self._distributions) > _KEPT:
            self._distributions.popitem(last=False)

    # --- taking part -------------------------------------------------------------------------

    def _take_part(self, distribution: Distribution) -> None:
        keep = self._keep(distribution.ref)
        if keep is None:
            log.debug("distribution %s: %s is not followed here", distribution.id, distribution.ref)
            return
        status = self._prefetcher.request(distribution.ref, None, origin="follow", keep=keep)
        self._spawn(self._follow_through(distribution, status.attempts))

    async def _follow_through(self, distribution: Distribution, attempts: int) -> None:
        """Report to the origin at once, every `_PROGRESS_EVERY` seconds while fetching (the
        progress bars of `mirror distribute`), and at the end: held, or failed after
        `_ATTEMPTS` tries. A registry may notify before its tag answers, or while the tag
        still points to the previous push: an attempt that failed is retried by the
        prefetcher's backoff, one that found another digest than the pushed one is tried again
        here after a short pause; meanwhile the state stays `fetching`."""
        last = attempts
        while True:
            status = await self._attempt(distribution, last)
            if status is None:
                return
            stale = _stale(status, distribution)
            if status.state is PinState.HELD and not stale:
                break
            if status.attempts - attempts >= _ATTEMPTS:
                break
            last = status.attempts
            if stale:
                await asyncio.sleep(_STALE_PAUSE * (status.attempts - attempts))
                self._prefetcher.request(distribution.ref, None, origin="follow")
        held = status.state is PinState.HELD and not stale
        progress = _progress(status, "held" if held else "failed")
        if stale:
            progress.error = (
                f"{distribution.ref} still points to {status.digest}, not the pushed "
                f"{distribution.digest}"
            )
        await self._report(distribution, progress)

    async def _attempt(self, distribution: Distribution, after: int) -> PinStatus | None:
        """The pin's status once the attempt after `after` ended, reporting progress meanwhile;
        None when the pin went away."""
        settled = asyncio.ensure_future(self._prefetcher.settled(distribution.ref, after=after))
        try:
            while True:
                current = self._prefetcher.status(distribution.ref)
                if current is None:
                    return None
                await self._report(distribution, _progress(current, "fetching"))
                done, _ = await asyncio.wait({settled}, timeout=_PROGRESS_EVERY)
                if done:
                    return settled.result()
        finally:
            settled.cancel()

    async def _report(self, distribution: Distribution, progress: NodeProgress) -> None:
        if distribution.origin == self._own or self._reporter is None:
            self.record(distribution.id, self._own, progress)
            return
        try:
            await asyncio.wait_for(
                self._reporter(distribution.origin, distribution.id, _report_body(progress)),
                _REPORT_TIMEOUT,
            )
        except (MirrorError, OSError, TimeoutError) as exc:
            log.info(
                "cannot report distribution %s to %s: %s", distribution.id, distribution.origin, exc
            )
        self.record(distribution.id, self._own, progress)

    def record(self, distribution_id: str, node: str, progress: NodeProgress) -> bool:
        """A node's report (this node's own, or a peer's to this origin); False if unknown."""
        distribution = self._distributions.get(distribution_id)
        if distribution is None:
            return False
        distribution.nodes[node] = progress
        self._recorded.set()
        self._recorded = asyncio.Event()
        if progress.state != "fetching":
            self._metrics.distribution_nodes.labels(progress.state).inc()
        return True

    # --- status out --------------------------------------------------------------------------

    def distributions(self) -> list[Distribution]:
        return list(reversed(self._distributions.values()))

    async def ended(self, distribution_id: str, nodes: int) -> Distribution:
        """The distribution once `nodes` nodes have reported the end of their part."""
        while True:
            distribution = self._distributions[distribution_id]
            if sum(1 for p in distribution.nodes.values() if p.state != "fetching") >= nodes:
                return distribution
            await self._recorded.wait()

    def get(self, distribution_id: str) -> Distribution | None:
        return self._distributions.get(distribution_id)

    # --- housekeeping ------------------------------------------------------------------------

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _tag_only(ref: ImageRef) -> ImageRef:
    return ImageRef(ref.registry, ref.repository, ref.tag or None, None if ref.tag else ref.digest)


def _stale(status: PinStatus, distribution: Distribution) -> bool:
    """Held, but not what was pushed: the tag had not moved yet when it was resolved."""
    return (
        status.state is PinState.HELD
        and distribution.digest is not None
        and status.digest is not None
        and status.digest != distribution.digest
    )


def _progress(status: PinStatus, state: str) -> NodeProgress:
    return NodeProgress(
        state,
        digest=status.digest,
        error=status.error if state != "held" else None,
        bytes_done=status.bytes_done,
        bytes_total=status.bytes_total,
        bytes_upstream=status.bytes_upstream,
        bytes_peers=status.bytes_peers,
    )


def _report_body(progress: NodeProgress) -> dict[str, object]:
    return {
        "state": progress.state,
        "digest": progress.digest,
        "error": progress.error,
        "bytes_done": progress.bytes_done,
        "bytes_total": progress.bytes_total,
        "bytes_upstream": progress.bytes_upstream,
        "bytes_peers": progress.bytes_peers,
    }


def parse_report(document: object) -> NodeProgress | None:
    """A node's report as the origin receives it; None when it is not one."""
    if not isinstance(document, dict):
        return None
    state, digest, error = document.get("state"), document.get("digest"), document.get("error")
    counts = [
        document.get(name, 0)
        for name in ("bytes_done", "bytes_total", "bytes_upstream", "bytes_peers")
    ]
    if state not in ("fetching", "held", "failed"):
        return None
    if not all(isinstance(v, str | None) for v in (digest, error)):
        return None
    numbers = [n for n in counts if isinstance(n, int) and not isinstance(n, bool) and n >= 0]
    if len(numbers) != len(counts):
        return None
    done, total, upstream, peers = numbers
    return NodeProgress(
        str(state),
        digest=digest[:100] if isinstance(digest, str) else None,
        error=(error[:500] if isinstance(error, str) else None),
        bytes_done=done,
        bytes_total=total,
        bytes_upstream=upstream,
        bytes_peers=peers,
    )


def _parse_message(message: bytes) -> Distribution | None:
    try:
        document = json.loads(message)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    fields = [document.get(name) for name in ("id", "ref", "trigger", "origin")]
    if not all(isinstance(value, str) and value for value in fields):
        return None
    digest, started = document.get("digest"), document.get("started")
    if digest is not None and not isinstance(digest, str):
        return None
    if not isinstance(started, int | float) or isinstance(started, bool):
        return None
    try:
        ref = parse_image_ref(str(document["ref"]))
    except MirrorError:
        return None
    return Distribution(
        str(document["id"])[:64],
        ref,
        digest,
        str(document["trigger"])[:32],
        str(document["origin"])[:300],
        float(started),
    )
