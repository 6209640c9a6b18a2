"""Blobs containerd is receiving: its ingests, read as they grow, served to peers.

containerd writes a blob it fetches into `<content>/ingest/<hash>/data` and, once the whole blob
hashed to its digest, renames that file to `<content>/blobs/sha256/<hex>` (the same inode: a
descriptor opened on `data` reads the committed blob). Beside `data` it keeps `ref`, which reads
`<namespace>/<sequence>/<key>` where a pull's key ends with the digest (`layer-sha256:<hex>`),
and `total`, the size it expects. Nothing else about an ingest is needed, and the directory
name (a hash of the ref, sequence included) cannot be predicted, so the few ingests under way
are scanned.

Bytes go out as they land (the runtime writes them in order), the last byte only once the blob
is committed: a peer never completes a blob containerd did not verify. A reader that caught up
waits for the writer's next change to `data`, reported by inotify (watch.py: each write, the
commit's rename, the unlink of a runtime that gave up), and looks on its own only every
`GONE_CHECK_SECONDS` (a stall). Without a watcher it looks on a timer: `POLL_MIN_SECONDS`
doubling up to `POLL_MAX_SECONDS` until about `PART_BYTES` are there, halving when they were
there at once, so a reader wakes a few dozen times a second rather than a hundred and each wake
sends a sizeable part; once every byte is there it looks every `POLL_MIN_SECONDS` for the
commit, which the runtime makes right after (before that, only every `GONE_CHECK_SECONDS`, for
a runtime that gave up).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from mirror.errors import ContentVanished
from mirror.oci.reference import Digest
from mirror.stores.base import FilePart, PartReader, ReceivingBlob
from mirror.stores.containerd.watch import FileWatch, FileWatcher

# How long a reader that sent everything there waits before it looks again: at least, at most.
POLL_MIN_SECONDS = 0.005
POLL_MAX_SECONDS = 0.05
# What a reader is happy to find when it looks: less, and it waits longer next time.
PART_BYTES = 1024 * 1024
# An ingest that neither grew nor was committed for this long is given up (the runtime
# stopped, or its commit failed): the reader's connection is cut, its client goes elsewhere.
STALL_SECONDS = 30.0
# How often a reader waiting on a writer that is not done looks whether the ingest went away.
GONE_CHECK_SECONDS = 1.0
# The largest `ref` and `total` files read: both are a line of text.
_SMALL_FILE = 4096
# An ingest whose `data` changed this recently is one containerd is writing now (`live`).
LIVE_SECONDS = STALL_SECONDS


class Ingests:
    """The ingests of one containerd namespace under one content directory."""

    def __init__(
        self,
        content_path: Path,
        namespace: str,
        *,
        poll_seconds: float = POLL_MIN_SECONDS,
        max_poll_seconds: float = POLL_MAX_SECONDS,
        stall_seconds: float = STALL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        watcher: FileWatcher | None = None,
    ) -> None:
        """`watcher`: wakes readers when an ingest's file changes (watch.py); without one they
        look on a timer."""
        self._ingest_dir = content_path / "ingest"
        self._blob_dir = content_path / "blobs"
        self._namespace = namespace
        self._poll_seconds = poll_seconds
        self._max_poll_seconds = max_poll_seconds
        self._stall_seconds = stall_seconds
        self._clock = clock
        self._watcher = watcher

    async def find(self, digest: Digest) -> IngestBlob | None:
        """The ingest receiving `digest` in this namespace, opened; None when there is none.

        Looked for on the loop: a few small files of a local directory cost less than waking a
        worker thread, and peers ask for each blob a node receives again and again."""
        blob = self._find(digest)
        if blob is not None and blob.directory is not None and self._watcher is not None:
            # On the loop: the watcher's descriptor is read there.
            blob.watch(self._watcher.watch(blob.directory / "data"))
        return blob

    def live(self) -> bool:
        """Whether containerd is writing an ingest of this namespace here now: one whose `data`
        changed within `LIVE_SECONDS`. Then this content directory is containerd's own, not a
        copy or another daemon's (ContainerdStore vouches for its blobs by it). A few small
        files of a local directory: looked at on the loop, as `find` is."""
        now = time.time()
        for directory in self._entries() or []:
            if self._key(directory) is None:
                continue
            try:
                changed = os.stat(directory / "data").st_mtime
            except OSError:
                continue  # committed or given up meanwhile
            if now - changed < LIVE_SECONDS:
                return True
        return False

    def _find(self, digest: Digest) -> IngestBlob | None:
        committed = self._blob_dir / digest.algorithm / digest.hex
        entries = self._entries()
        if entries is None:
            return None  # no pull has run yet, or the directory is not readable from here
        for directory in entries:
            if _pulled_digest(self._key(directory)) != str(digest):
                continue
            size = _size(_small_text(directory / "total"))
            if size is None:
                continue  # a writer that did not say the size: nothing to promise a reader
            try:
                data = open(directory / "data", "rb", buffering=0)  # noqa: SIM115 (owned by the blob)
            except OSError:
                continue  # committed or given up meanwhile
            return self._blob(data, size, directory, committed)
        return self._just_committed(committed)

    def _entries(self) -> list[Path] | None:
        """The ingest directories under way, of any namespace; None when there is no ingest
        directory to read."""
        try:
            return [Path(entry.path) for entry in os.scandir(self._ingest_dir)]
        except OSError:
            return None

    def _key(self, directory: Path) -> str | None:
        """The key an ingest's `ref` (`<namespace>/<sequence>/<key>`) names, when the ingest is
        of this namespace."""
        ref = _small_text(directory / "ref")
        if ref is None:
            return None
        namespace, _, rest = ref.strip().partition("/")
        return rest.partition("/")[2] if namespace == self._namespace else None

    def _just_committed(self, committed: Path) -> IngestBlob | None:
        """The blob at its committed path, when no ingest of it is left.

        containerd renames the ingest there before its database lists the blob in the
        namespace: for that moment of every commit the store does not show the blob and no
        ingest is left, and a peer that the runtime's probe found receiving it would be told
        it is not here (its runtime then asks again, by a slower way). Only asked for a blob
        the store does not show, which is not in the database, so only in that moment (or
        for another namespace's blob, whose bytes are as good).
        """
        try:
            data = open(committed, "rb", buffering=0)  # noqa: SIM115 (owned by the blob)
        except OSError:
            return None
        size = os.fstat(data.fileno()).st_size
        if size == 0:
            data.close()
            return None
        return self._blob(data, size, None, committed)

    def _blob(
        self, data: io.FileIO, size: int, directory: Path | None, committed: Path
    ) -> IngestBlob:
        """`data` opened as an `IngestBlob` read with this store's polling and stall bound."""
        return IngestBlob(
            data,
            size,
            directory,
            committed,
            poll_seconds=self._poll_seconds,
            max_poll_seconds=self._max_poll_seconds,
            stall_seconds=self._stall_seconds,
            clock=self._clock,
        )


def _small_text(path: Path) -> str | None:
    try:
        with open(path, "rb") as file:
            return file.read(_SMALL_FILE).decode("utf-8", "replace")
    except OSError:
        return None


def _pulled_digest(key: str | None) -> str | None:
    """The digest an ingest's key names: a pull's key is `<kind>-<digest>`
    (`layer-sha256:<hex>`, `config-...`), the digest what follows the last `-` before the
    algorithm. Other keys (a push, an import) name none.
    """
    if key is None:
        return None
    _, _, digest = key.rpartition("-")
    return digest if digest.startswith("sha256:") else None


def _size(text: str | None) -> int | None:
    digits = None if text is None else text.strip()
    if digits is None or not (digits.isascii() and digits.isdigit()):
        return None
    size = int(digits)
    return size if size > 0 else None


class IngestBlob(ReceivingBlob):
    """One open ingest: its `data` descriptor, kept across the commit (a rename)."""

    def __init__(
        self,
        data: io.FileIO,
        size: int,
        directory: Path | None,
        committed: Path,
        *,
        poll_seconds: float,
        max_poll_seconds: float,
        stall_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        self.size = size
        self._file = data
        self._directory = directory
        self._committed = committed
        self._min_poll = poll_seconds
        self._max_poll = max_poll_seconds
        self._poll = poll_seconds  # the wait before the next look, adapted to the writer
        self._stall_seconds = stall_seconds
        self._clock = clock
        # No ingest directory: the blob was committed already (`Ingests.find`).
        self._verified = directory is None
        self._watch: FileWatch | None = None
        # The size last seen, and when it was first seen (a stall is measured from there).
        self._seen = -1
        self._grew_at = clock()
        # When the commit was last looked for (`_commit_may_show`).
        self._looked_at = -math.inf

    @property
    def committed(self) -> bool:
        return self._verified

    @property
    def file(self) -> io.FileIO:
        """The descriptor parts are sent from (`data`, or the committed blob)."""
        return self._file

    @property
    def directory(self) -> Path | None:
        """The ingest's directory; None for a blob found committed."""
        return self._directory

    def watch(self, watch: FileWatch | None) -> None:
        """Wake on the writer's changes to `data` rather than on a timer (None: the timer)."""
        self._watch = watch

    def received(self) -> int:
        return min(os.fstat(self._file.fileno()).st_size, self.size)

    def reader(self, offset: int, length: int) -> PartReader:
        return _IngestReader(self, offset, offset + length)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        self._file.close()

    async def sendable(self, position: int, end: int) -> int:
        """How far from `position` (towards `end`) may be sent now: waits until there is more
        than `position` (about `PART_BYTES` more, unless the writer is slow or done, or `end`
        is there), or raises `ContentVanished` when the ingest will not give it."""
        waited = False
        nudged = False  # woken by a change to `data`: if it added no bytes, an unlink or rename
        while True:
            events = self._watch.events if self._watch is not None else 0
            there = self.received()
            if there != self._seen:
                self._seen, self._grew_at = there, self._clock()
                nudged = False  # a write
            cap = self.size if self._verified else self.size - 1
            limit = min(there, cap, end)
            if limit > position:
                whole = limit in (cap, end) or limit - position >= PART_BYTES
                if whole or self._poll >= self._max_poll:
                    if not waited:  # it was there at once: look sooner next time
                        self._poll = max(self._poll / 2, self._min_poll)
                    return limit
            elif (
                not self._verified
                and (nudged or self._commit_may_show(there))
                and self._check_committed()
            ):
                continue
            elif self._verified:  # a committed blob does not grow
                raise ContentVanished(f"{self._committed.name} ends at {there} bytes")
            if self._clock() - self._grew_at > self._stall_seconds:
                raise ContentVanished(
                    f"the runtime's ingest of {self._committed.name} stalled at {there} bytes"
                )
            if there >= self.size:  # all there: the commit comes right after
                nudged = await self._wait(events, self._min_poll)
                continue
            nudged = await self._wait(events, self._poll)
            waited = True
            self._poll = min(self._poll * 2, self._max_poll)

    async def _wait(self, events: int, poll: float) -> bool:
        """Until the writer's next change to `data` (True), with the stall and give-up checks
        still every `GONE_CHECK_SECONDS`; unwatched, `poll` seconds (False)."""
        if self._watch is None:
            await asyncio.sleep(poll)
            return False
        return await self._watch.changed_since(events, GONE_CHECK_SECONDS)

    def _commit_may_show(self, there: int) -> bool:
        """Whether to look for the commit now: at every wake once all bytes are there (it comes
        right after), else every `GONE_CHECK_SECONDS` (the runtime may have given up, or held
        the blob already). Each look is three system calls, and a reader waiting on a slow
        writer wakes dozens of times a second."""
        now = self._clock()
        if there < self.size and now - self._looked_at < GONE_CHECK_SECONDS:
            return False
        self._looked_at = now
        return True

    def _check_committed(self) -> bool:
        """Whether the runtime committed the blob (so verified it): `data` was renamed to the
        blob's path (same inode), or the ingest is gone and the blob is there (it held the
        blob already and dropped its copy after verifying it: the rest is sent from there).

        The directory is looked at before the blob's path: containerd renames `data` before it
        removes the directory, so a directory found gone means a commit shows at the path. In
        the other order a commit between the two looks read as given up, which cut every
        reader at the last byte (their runtimes asked again, and got it by a slower way).
        """
        assert self._directory is not None, "a committed blob is verified from the start"
        ingest_left = self._directory.exists()
        try:
            committed = os.stat(self._committed)
        except OSError:
            committed = None
        own = os.fstat(self._file.fileno())
        if committed is not None and (committed.st_ino, committed.st_dev) == (
            own.st_ino,
            own.st_dev,
        ):
            self._verified = True
            return True
        if ingest_left:
            return False
        if committed is None:
            raise ContentVanished(f"the runtime gave up receiving {self._committed.name}")
        try:
            replacement = open(self._committed, "rb", buffering=0)  # noqa: SIM115 (owned here)
        except OSError as exc:
            raise ContentVanished(f"{self._committed.name} went away: {exc}") from exc
        self._file.close()
        self._file = replacement
        self._verified = True
        return True


class _IngestReader:
    def __init__(self, blob: IngestBlob, position: int, end: int) -> None:
        self._blob: IngestBlob | None = blob
        self._position = position
        self._end = end

    async def next_part(self) -> FilePart | bytes | None:
        blob = self._blob
        if blob is None or self._position >= self._end:
            return None
        limit = await blob.sendable(self._position, self._end)
        part = FilePart(blob.file, self._position, limit - self._position)
        self._position = limit
        return part

    async def aclose(self) -> None:
        blob, self._blob = self._blob, None
        if blob is not None:
            with contextlib.suppress(OSError):
                await blob.close()
