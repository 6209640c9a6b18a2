"""Polling upstream for followed tags that moved: distribution on push without webhooks.

A `[[follow]]` with `poll` names one repository (registry and repository literal, the loader
checks) and a tag glob. Every `poll` seconds the poller lists the repository's tags, keeps the
matching ones, HEADs each manifest for its digest and hands a `PushEvent(ref@digest, "poll")`
to the sink for each tag whose digest is not the one the last poll saw. That includes the
first poll: the poller keeps no state across restarts, so after one every matching tag is
offered again, and the sink (the distributor) tells a tag it already distributed from a moved
one. The same goes for a node that stops being the poller and later becomes it again: what it
saw meanwhile is stale, so it forgets it and starts over.

One node of the cluster polls, not every node: before each poll of a follow the poller asks
`may_poll(match)` (the integrator answers from a DHT claim), so a registry sees the cluster as
one client.

Nothing ends the run loop but cancellation. An upstream that is down, refuses our credentials
or lost the repository, a sink or `may_poll` that raises: each is logged once per follow and
kind (WARNING), retried at the next interval, and logged again (INFO) when the follow polls
cleanly. A tag whose HEAD failed keeps the digest seen before, so it is neither offered twice
nor forgotten.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from mirror.errors import DigestInvalid, NameInvalid, UpstreamError
from mirror.oci.reference import Digest, parse_digest
from mirror.prefetch.follow import FollowPattern, follow_pattern
from mirror.prefetch.model import Follow, ImageRef, PushEvent, PushSink
from mirror.upstream.client import ManifestRef

log = logging.getLogger(__name__)

# A HEAD per matching tag per poll: this many at once keeps a poll short without looking like
# a flood to the registry.
DEFAULT_CONCURRENCY = 4
# Past this many matching tags a poll HEADs only the first ones (in the registry's order) and
# says so once: `*` over a repository of generated tags must not turn into thousands of
# requests every interval.
DEFAULT_MAX_TAGS = 1000

MayPoll = Callable[[str], Awaitable[bool]]


class PollUpstream(Protocol):
    """What the poller asks upstream (`UpstreamClient` is one)."""

    async def list_tags(self, registry: str, repository: str) -> list[str] | None: ...

    async def head_manifest(
        self, registry: str, repository: str, reference: str, *, timeout: float
    ) -> ManifestRef | None: ...


@dataclass(frozen=True, slots=True)
class _Target:
    """One polled match: follows with the same match (for other nodes) are polled once, at the
    shortest of their intervals."""

    match: str
    pattern: FollowPattern
    interval: float


class Poller:
    """Polls the follows that have `poll`; `poll_once()` for one round, `run()` for ever."""

    def __init__(
        self,
        follows: Iterable[Follow],
        upstream: PollUpstream,
        sink: PushSink,
        *,
        may_poll: MayPoll,
        head_timeout: float = 10.0,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_tags: int = DEFAULT_MAX_TAGS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._upstream = upstream
        self._sink = sink
        self._may_poll = may_poll
        self._head_timeout = head_timeout
        self._heads = asyncio.Semaphore(concurrency)
        self._max_tags = max_tags
        self._clock = clock
        self._targets: dict[str, _Target] = {}
        # Per match: the digest of each matching tag at the last poll.
        self._seen: dict[str, dict[str, Digest]] = {}
        self._due: dict[str, float] = {}
        # (match, kind) of the troubles logged and not yet over.
        self._troubles: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self.set_follows(follows)

    @property
    def matches(self) -> tuple[str, ...]:
        """The matches polled, each once, in the order of the follows."""
        return tuple(self._targets)

    def set_follows(self, follows: Iterable[Follow]) -> None:
        """Poll these follows from now on (the prefetch file was re-read).

        A match still followed keeps what its polls saw, so re-reading the file offers nothing
        again; a new match is polled at once; a dropped one is forgotten.
        """
        targets: dict[str, _Target] = {}
        for follow in follows:
            if follow.poll is None:
                continue
            try:
                pattern = follow_pattern(follow.match)
            except NameInvalid as exc:
                self._trouble(follow.match, "pattern", f"not polled: {exc}")
                continue
            if not pattern.pollable:
                self._trouble(follow.match, "pattern", "not polled: the repository has a glob")
                continue
            known = targets.get(follow.match)
            interval = follow.poll if known is None else min(known.interval, follow.poll)
            targets[follow.match] = _Target(follow.match, pattern, interval)
        now = self._clock()
        for match in set(self._targets) - set(targets):
            self._seen.pop(match, None)
            self._due.pop(match, None)
            self._troubles = {key for key in self._troubles if key[0] != match}
        for match, target in targets.items():
            self._due[match] = min(self._due.get(match, now), now + target.interval)
        self._targets = targets
        self._wake.set()

    async def poll_once(self) -> list[PushEvent]:
        """Poll every polled match now, whatever its interval; the events handed to the sink."""
        targets = list(self._targets.values())
        now = self._clock()
        for target in targets:
            self._due[target.match] = now + target.interval
        rounds = await asyncio.gather(*(self._poll(target) for target in targets))
        return [event for events in rounds for event in events]

    async def run(self) -> None:
        """Poll each match every interval until cancelled; no error ends it."""
        while True:
            self._wake.clear()
            now = self._clock()
            due = [t for t in self._targets.values() if self._due.get(t.match, now) <= now]
            for target in due:
                self._due[target.match] = now + target.interval
            if due:
                await asyncio.gather(*(self._poll(target) for target in due))
            wait = min(self._due.values(), default=None)
            try:
                async with asyncio.timeout(None if wait is None else wait - self._clock()):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _poll(self, target: _Target) -> list[PushEvent]:
        try:
            return await self._poll_target(target)
        except Exception:  # a bug: logged once, the loop goes on
            if (target.match, "unexpected") not in self._troubles:
                log.exception("polling %s failed", target.match)
            self._troubles.add((target.match, "unexpected"))
            return []

    async def _poll_target(self, target: _Target) -> list[PushEvent]:
        match, pattern = target.match, target.pattern
        try:
            allowed = await self._may_poll(match)
        except Exception as exc:
            self._trouble(match, "may_poll", f"cannot tell whether this node polls: {exc!r}")
            return []
        if not allowed:
            self._seen.pop(match, None)
            return []
        troubled = False
        try:
            tags = await self._upstream.list_tags(pattern.registry, pattern.repository)
        except UpstreamError as exc:
            self._trouble(match, f"list:{type(exc).__name__}", f"cannot list tags: {exc}")
            return []
        if tags is None:
            self._trouble(
                match, "missing", f"{pattern.registry}/{pattern.repository} does not exist"
            )
            self._seen[match] = {}
            return []
        wanted = [tag for tag in tags if pattern.matches_tag(tag)]
        if len(wanted) > self._max_tags:
            self._trouble(
                match,
                "too-many",
                f"{len(wanted)} tags match; only the first {self._max_tags} are polled",
            )
            wanted = wanted[: self._max_tags]
            troubled = True
        seen = self._seen.get(match, {})
        heads = await asyncio.gather(*(self._head(pattern, tag) for tag in wanted))
        current: dict[str, Digest] = {}
        events: list[PushEvent] = []
        for tag, head in zip(wanted, heads, strict=True):
            if isinstance(head, str):
                self._trouble(match, "head", head)
                troubled = True
                if tag in seen:
                    current[tag] = seen[tag]
                continue
            if head is None:
                continue  # removed between the list and the HEAD
            current[tag] = head
            if seen.get(tag) != head:
                ref = ImageRef(pattern.registry, pattern.repository, tag, head)
                events.append(PushEvent(ref, "poll"))
        self._seen[match] = current
        for event in events:
            try:
                self._sink.pushed(event)
            except Exception as exc:
                self._trouble(match, "sink", f"the push sink failed to take {event.ref}: {exc!r}")
                troubled = True
        if not troubled:
            self._clear(match)
        return events

    async def _head(self, pattern: FollowPattern, tag: str) -> Digest | str | None:
        """The tag's digest now, None if it is gone, or why it could not be had."""
        async with self._heads:
            try:
                found = await self._upstream.head_manifest(
                    pattern.registry, pattern.repository, tag, timeout=self._head_timeout
                )
            except UpstreamError as exc:
                return f"cannot HEAD {tag}: {exc}"
        if found is None:
            return None
        try:
            return parse_digest(found.digest)
        except DigestInvalid as exc:
            return f"{tag}: {exc}"

    def _trouble(self, match: str, kind: str, message: str) -> None:
        if (match, kind) not in self._troubles:
            log.warning("polling %s: %s (retried every interval; logged once)", match, message)
            self._troubles.add((match, kind))

    def _clear(self, match: str) -> None:
        over = {key for key in self._troubles if key[0] == match}
        if over:
            log.info("polling %s works again", match)
            self._troubles -= over
