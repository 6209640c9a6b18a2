"""Keeping what this node serves honest after it was written: re-hashing, and evicting rot.

The node cache verifies a blob before publishing it (stores/cache.py), but a disk can flip a bit
later and a person can edit a file while the node is stopped. Nothing on the way from a node to
its own runtime checks the digest again, and a peer that checks it can only cut its client. Two
things find such a copy and remove it:

- **Reports** (`CorruptionReports`). A peer whose stream from this node failed its digest says so
  with a signed request (`registry/api.py`, sent by `peers/fetcher.py`). The node answers at
  once and re-hashes its copy in the background. It evicts the copy only when its own hash
  disagrees: a report alone never removes a good blob (the bytes may have been damaged on the
  way, or the peer may be wrong), so a peer can at worst cost a re-hash, and reports for one
  digest share one re-hash. A copy in the runtime's store (containerd) cannot be removed by
  mirror: it is logged and counted for the operator.
- **The scrub** (`Scrubber`). A background walk re-hashes every cached blob, then again a day
  later, reading at most `--scrub-rate` bytes per second so pulls keep the disk. Blobs opened
  since the node started and not yet verified in this run go first: a node that serves a
  rotten blob to its own runtime finds out right after, so the runtime's retry goes elsewhere.
  A blob this run wrote counts as verified: the cache matched its bytes against the digest as
  it published them, and re-reading it when it is served (in a rollout, as the next node asks
  for it) would only hash the same bytes again; the daily pass still covers it.

Only published blobs are read (`blobs/`): a write in progress lives in `tmp/` until it is
verified and renamed, so the scrub never hashes a blob being written. An eviction names the
file (device and inode) that was hashed, so a fresh copy published meanwhile is never removed.
Files are opened with `O_NOATIME` where allowed: the cache rebuilds its least-recently-used
order from access times at start, and a scrub pass must not look like use.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable

from mirror.errors import MirrorError
from mirror.metrics import Metrics
from mirror.oci.reference import Digest, parse_digest
from mirror.stores.base import BlobSource, FileBlob, Store
from mirror.stores.cache import CacheStore

log = logging.getLogger(__name__)

SOURCE_SCRUB = "scrub"
SOURCE_REPORT = "report"

MIB = 1024 * 1024
# What one read (one hop to a worker thread) hashes.
_CHUNK = 4 * MIB
# A full scrub pass starts at most this often; opened blobs are verified in between.
_PASS_EVERY = 24 * 3600.0
# Opened blobs waiting to be verified first; more than that wait for the pass.
_MAX_PRIORITY = 4096
# A digest found intact on a report is not re-hashed for another report this soon: a peer that
# keeps reporting a good copy costs one re-hash a minute at most.
_QUIET_AFTER_INTACT = 60.0
# Digests waiting for their report re-hash; reports beyond this are dropped (counted "busy").
_MAX_PENDING_REPORTS = 256


class Verdict(enum.Enum):
    INTACT = "intact"
    CORRUPT = "corrupt"
    ABSENT = "absent"


class Pacer:
    """Bounds reads to `rate` bytes per second on average.

    Every read books its bytes on a timeline that advances at `rate`; a read may start once the
    reads before it are paid for. Idle time earns no credit, so a burst after a pause is one
    chunk, never a pass's worth.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("a pacer needs a positive rate")
        self.rate = rate
        self._clock = clock
        self._free_at = float("-inf")

    def reserve(self, count: int) -> float:
        """Seconds to wait before reading `count` bytes, which are booked at once."""
        now = self._clock()
        start = max(self._free_at, now)
        self._free_at = start + count / self.rate
        return start - now


class BlobChecker:
    """Re-hashes the copies of a blob this node holds; evicts a cached copy that does not match.

    Checks of one copy run once at a time: a caller arriving while one runs waits for its
    verdict instead of reading the blob again.
    """

    def __init__(
        self,
        cache: CacheStore,
        metrics: Metrics,
        *,
        runtime: Store | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._cache = cache
        self._runtime = runtime
        self._metrics = metrics
        self._sleep = sleep
        self._running: dict[str, asyncio.Task[Verdict]] = {}

    @property
    def has_runtime(self) -> bool:
        return self._runtime is not None

    def holds_cached(self, digest: Digest) -> bool:
        return self._cache.holds(digest)

    async def close(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def check_cached(
        self, digest: Digest, source: str, pacer: Pacer | None = None
    ) -> Verdict:
        """Re-hash the cached copy (at `pacer`'s rate if given); evict it if it is wrong."""
        return await self._once(
            f"cache {digest}", lambda: self._check_cached(digest, source, pacer)
        )

    async def check_runtime(self, digest: Digest, source: str) -> Verdict:
        """Re-hash the runtime store's copy; a wrong one is logged and counted, not removed."""
        return await self._once(f"runtime {digest}", lambda: self._check_runtime(digest, source))

    async def _once(self, key: str, start: Callable[[], Awaitable[Verdict]]) -> Verdict:
        task = self._running.get(key)
        if task is None:

            async def run() -> Verdict:
                return await start()

            task = asyncio.create_task(run(), name=f"verify {key}")
            self._running[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        # Shielded: one waiter giving up (its request ended) does not stop the others' check.
        return await asyncio.shield(task)

    def _forget(self, key: str, task: asyncio.Task[Verdict]) -> None:
        if self._running.get(key) is task:
            del self._running[key]

    async def _check_cached(self, digest: Digest, source: str, pacer: Pacer | None) -> Verdict:
        try:
            fd = await asyncio.to_thread(_open_quietly, str(self._cache.blob_path(digest)))
        except (FileNotFoundError, NotADirectoryError):
            return Verdict.ABSENT
        # Held open until the verdict is acted on: while it is open, no fresh copy can be given
        # the same inode number, so the eviction below can only ever remove this file.
        try:
            info = os.fstat(fd)
            actual = await self._hash_fd(fd, info.st_size, digest, source, pacer)
            self._metrics.verified_blobs.labels(source).inc()
            if actual == digest.hex:
                return Verdict.INTACT
            evicted = await self._cache.evict_corrupt(digest, (info.st_dev, info.st_ino))
            # Counted once the file is gone: whoever reads the metric can rely on it.
            self._metrics.corrupt_blobs.labels(source, "evicted").inc()
        finally:
            os.close(fd)
        log.warning(
            "%s in the node cache hashes to %s:%s (found by %s): %s",
            digest,
            digest.algorithm,
            actual,
            source,
            "evicted" if evicted else "it was replaced or removed meanwhile",
        )
        return Verdict.CORRUPT

    async def _hash_fd(
        self, fd: int, size: int, digest: Digest, source: str, pacer: Pacer | None
    ) -> str:
        hasher = hashlib.new(digest.algorithm)
        offset = 0
        while offset < size:
            if pacer is not None:
                await self._sleep(pacer.reserve(min(_CHUNK, size - offset)))
            count = await asyncio.to_thread(_hash_chunk, fd, offset, hasher)
            if count == 0:
                break
            offset += count
            self._metrics.verified_bytes.labels(source).inc(count)
        return hasher.hexdigest()

    async def _hash_blob(self, blob: BlobSource, digest: Digest, source: str) -> str:
        if isinstance(blob, FileBlob):
            return await self._hash_fd(blob.fileobj.fileno(), blob.size, digest, source, None)
        hasher = hashlib.new(digest.algorithm)
        async for chunk in blob.iter_range(0, blob.size):
            await asyncio.to_thread(hasher.update, chunk)
            self._metrics.verified_bytes.labels(source).inc(len(chunk))
        return hasher.hexdigest()

    async def _check_runtime(self, digest: Digest, source: str) -> Verdict:
        if self._runtime is None:
            return Verdict.ABSENT
        try:
            blob = await self._runtime.open(digest)
            if blob is None:
                return Verdict.ABSENT
            try:
                actual = await self._hash_blob(blob, digest, source)
            finally:
                await blob.close()
        except (OSError, EOFError, MirrorError) as exc:
            log.info("cannot re-hash %s in the %s store: %s", digest, self._runtime.name, exc)
            return Verdict.ABSENT
        self._metrics.verified_blobs.labels(source).inc()
        if actual == digest.hex:
            return Verdict.INTACT
        self._metrics.corrupt_blobs.labels(source, "kept").inc()
        log.warning(
            "%s in the %s store hashes to %s:%s (found by %s); mirror cannot remove content "
            "from the runtime's store: remove it there (for containerd, `ctr content rm`) so "
            "the image is pulled again",
            digest,
            self._runtime.name,
            digest.algorithm,
            actual,
            source,
        )
        return Verdict.CORRUPT


def _open_quietly(path: str) -> int:
    """Open for reading without updating the access time, where the kernel allows it."""
    noatime = getattr(os, "O_NOATIME", 0)
    try:
        return os.open(path, os.O_RDONLY | noatime)
    except PermissionError:
        # O_NOATIME needs the file's owner (or CAP_FOWNER); reading still works without it.
        if not noatime:
            raise
        return os.open(path, os.O_RDONLY)


def _hash_chunk(fd: int, offset: int, hasher: hashlib._Hash) -> int:
    """Read and hash one chunk on a worker thread (hashlib releases the GIL for big updates)."""
    data = os.pread(fd, _CHUNK, offset)
    hasher.update(data)
    return len(data)


class Scrubber:
    """Re-verifies every cached blob, a pass a day, reading at most `rate` bytes per second.

    Blobs opened since start and not verified yet in this run jump the queue (checked between
    two blobs of a pass, and as soon as they are opened between passes): what the node really
    serves is checked first, everything else eventually.
    """

    def __init__(
        self,
        checker: BlobChecker,
        cache: CacheStore,
        *,
        rate: float,
        every: float = _PASS_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._checker = checker
        self._cache = cache
        self.pacer = Pacer(rate, clock)
        self._every = every
        self._clock = clock
        # Verified intact in this run (ever), and in the current pass.
        self._verified: set[str] = set()
        self._this_pass: set[str] = set()
        self._priority: dict[str, Digest] = {}
        self._wake = asyncio.Event()
        cache.watch_opens(self._opened)
        cache.watch_publishes(self._written)

    def _written(self, digest: Digest) -> None:
        """A blob this run published matched its digest as it was written: verified."""
        key = str(digest)
        self._verified.add(key)
        self._priority.pop(key, None)

    def _opened(self, digest: Digest) -> None:
        key = str(digest)
        if key in self._verified or key in self._priority or len(self._priority) >= _MAX_PRIORITY:
            return
        self._priority[key] = digest
        self._wake.set()

    async def run(self) -> None:
        log.info("scrubbing the node cache at %.1f MiB/s", self.pacer.rate / MIB)
        while True:
            started = self._clock()
            await self.scrub_pass()
            next_pass = started + self._every
            while (remaining := next_pass - self._clock()) > 0:
                self._wake.clear()
                await self.verify_opened()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._wake.wait()

    async def scrub_pass(self) -> None:
        """Re-hash every blob the cache holds now; opened ones are taken between blobs."""
        self._this_pass.clear()
        checked = corrupt = 0
        for text in await self._cache.loose_digests():
            await self.verify_opened()
            if text in self._this_pass:
                continue
            try:
                digest = parse_digest(text)
            except MirrorError:
                continue
            verdict = await self._verify(digest)
            checked += verdict is not Verdict.ABSENT
            corrupt += verdict is Verdict.CORRUPT
        await self.verify_opened()
        log.info("scrub pass done: %d cached blobs verified, %d corrupt", checked, corrupt)

    async def verify_opened(self) -> None:
        """Verify the blobs opened since start that no check has covered yet."""
        while self._priority:
            key = next(iter(self._priority))
            digest = self._priority.pop(key)
            if key not in self._verified:
                await self._verify(digest)

    async def _verify(self, digest: Digest) -> Verdict:
        key = str(digest)
        if not self._cache.holds(digest):
            return Verdict.ABSENT
        try:
            verdict = await self._checker.check_cached(digest, SOURCE_SCRUB, self.pacer)
        except OSError as exc:
            # Not evicted: the error may pass (no descriptors left, say). The pass goes on; a
            # disk that really cannot read it fails the runtime's pull and the next pass too.
            log.warning("scrub cannot read %s from the node cache: %s", digest, exc)
            return Verdict.ABSENT
        self._this_pass.add(key)
        if verdict is Verdict.INTACT:
            self._verified.add(key)
        else:
            self._verified.discard(key)
        return verdict


class CorruptionReports:
    """Peers' reports of a blob from this node that did not match its digest.

    `report` answers at once; the re-hash runs in the background, one digest at a time and
    unpaced (a report means a client just failed: finding out fast matters more than the I/O of
    one blob). Reports of a digest already waiting join it; a digest found intact is not
    re-hashed again for a minute; past `_MAX_PENDING_REPORTS` waiting digests, reports are
    dropped. So a peer, even a buggy one, can make the node re-hash but never evict a good blob.
    """

    def __init__(
        self,
        checker: BlobChecker,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._checker = checker
        self._metrics = metrics
        self._clock = clock
        self._one_at_a_time = asyncio.Semaphore(1)
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._intact_at: dict[str, float] = {}

    def report(self, digest: Digest) -> str:
        """Take a report; the outcome (queued, coalesced, recent, not-held, busy) at once."""
        outcome = self._admit(digest)
        self._metrics.corruption_reports_received.labels(outcome).inc()
        return outcome

    def _admit(self, digest: Digest) -> str:
        key = str(digest)
        if key in self._pending:
            return "coalesced"
        if self._clock() - self._intact_at.get(key, float("-inf")) < _QUIET_AFTER_INTACT:
            return "recent"
        if not self._checker.holds_cached(digest) and not self._checker.has_runtime:
            return "not-held"
        if len(self._pending) >= _MAX_PENDING_REPORTS:
            log.warning("dropping a report of %s: %d reports wait", digest, len(self._pending))
            return "busy"
        task = asyncio.create_task(self._recheck(digest), name=f"report {digest}")
        self._pending[key] = task
        task.add_done_callback(lambda _: self._pending.pop(key, None))
        return "queued"

    async def wait_idle(self) -> None:
        """Until every report taken so far was handled (for tests and shutdown)."""
        while self._pending:
            await asyncio.gather(*self._pending.values(), return_exceptions=True)

    async def close(self) -> None:
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._checker.close()

    async def _recheck(self, digest: Digest) -> None:
        async with self._one_at_a_time:
            try:
                cached = await self._checker.check_cached(digest, SOURCE_REPORT)
                runtime = await self._checker.check_runtime(digest, SOURCE_REPORT)
            except Exception:
                log.warning("re-hashing reported %s failed", digest, exc_info=True)
                return
        verdicts = {cached, runtime}
        if Verdict.CORRUPT in verdicts:
            return  # logged and counted by the checker
        if verdicts == {Verdict.ABSENT}:
            log.info("a peer reported %s, which this node no longer holds", digest)
            return
        log.info(
            "a peer reported %s, but this node's copy matches its digest: the bytes were "
            "damaged after they left, or the peer is wrong",
            digest,
        )
        now = self._clock()
        self._intact_at = {
            key: at for key, at in self._intact_at.items() if now - at < _QUIET_AFTER_INTACT
        }
        self._intact_at[str(digest)] = now
