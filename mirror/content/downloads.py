"""Blob downloads in progress on this node, followed by any number of readers as they grow.

A download writes into the node cache's temp file and is not tied to the request that started
it: if that client goes away, the download goes on for the others (and for the cache). Its origin
is upstream or a peer's stream (an `Opener`); either way this node is a provider of the blob
while it arrives. Readers, local clients and peers alike, follow the temp file through one shared
descriptor, waiting for bytes that have not arrived yet, so memory stays flat however many follow
it: as chunks (`pread`), or as `FilePart`s, extents of the file that the HTTP front sends with
sendfile (`DownloadReader.next_part`), so the bytes never enter the process on their way out. The
last byte is only handed out once the whole blob matched its digest; if it did not, or the
origin's stream broke, every reader fails and its client's connection is cut.

**On disk, not in memory.** The cache's copy of a blob is there for peers that come later; the
runtime keeps its own copy. So as a download arrives, the temp file is written back every
`_FLUSH_EVERY` bytes, and the pages of what every reader has already read are let go from the
page cache (`POSIX_FADV_DONTNEED`; all of them once the last reader is done): a node holds the
part of a blob its readers still need in memory, not the whole blob twice (its copy and the
runtime's). The bytes stay servable from disk. Measured (docs/benchmarks.md): on a machine
where fresh memory is dear, keeping every copy in memory cost the mirrors of a 16-node rollout
a fifth to a quarter of their CPU.

**Pass-through.** A blob the cache cannot hold still reaches its readers; it is just not kept.
The cache refuses it before the first byte (larger than `--cache-size`, or than the disk's free
space plus all that eviction could free: writing it would only push the rest of the cache out
before being thrown away), or its disk fills mid-blob and evicting cannot make room. From then on
new chunks go to the readers from memory, through a window of at most `window` bytes (plus the
chunk in hand): the download waits for the slowest reader before taking more from its origin,
so memory stays bounded per download whatever the blob's size, and the origin's connection is
what buffers (TCP flow control). Bytes already in the temp file stay readable there until the
last reader is done. The digest is still checked before the last byte is handed out, and the
temp file is removed at the end. One log line and `mirror_cache_passthrough_total` say so.

A reader counts from the moment it is created (`read`), not from its first read, so the window
keeps what it was promised. A reader that arrives when part of its range was neither written nor
is still in memory cannot be served: `read` raises `DownloadFailed` at once (503, which runtimes
retry), never hands out wrong bytes. A reader that stops reading holds every other one back; one
that has not moved for `stall_seconds` while the window is full is dropped (its connection is
cut), and a download nobody reads any more gives up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass

from mirror.errors import CacheFull, DigestMismatch, MirrorError, StoreUnavailable
from mirror.metrics import SOURCE_UPSTREAM
from mirror.oci.reference import Digest
from mirror.peers.receiver import Sink, SinkSlot
from mirror.stores.base import FilePart
from mirror.stores.cache import PASSTHROUGH_NO_SPACE, BlobWriter, CacheStore

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
# Bytes a pass-through download holds in memory for its readers, besides the chunk in hand:
# a few upstream chunks (up to 1 MiB each), enough to keep readers of similar speed streaming.
WINDOW = 4 * _CHUNK
# How long a pass-through download waits for room in its window while no reader moves.
STALL_SECONDS = 30.0
# Bytes taken from the origin while the previous ones are being written, written together next.
_WRITE_AHEAD = 2 * _CHUNK
# The temp file is flushed to disk in the background each time this much more was written, so
# the fsync that publishing waits for (and the last byte with it) finds little left to write,
# and the pages its readers are done with can be let go (a few MiB of a blob in memory at most).
_FLUSH_EVERY = 8 * _CHUNK


class DownloadFailed(StoreUnavailable):
    """The download a reader was following did not complete with the right bytes."""


class DownloadAbandoned(DownloadFailed):
    """The reservation a reader joined was given up: another node fetches the blob."""


@dataclass(frozen=True, slots=True)
class Source:
    """An opened origin of a blob: its size and its bytes from the start.

    `verified`: `chunks` checks the bytes against the digest itself and raises instead of
    yielding its last chunk when they do not match (a peer's stream, peers/fetcher.py). The
    download then does not hash them a second time: the source ending normally is the check.
    """

    size: int
    chunks: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]
    verified: bool = False
    # A verified peer stream whose receiving threads can write into the cache file themselves
    # (peers/receiver.py): then `chunks` yields only what they did not write.
    sink: SinkSlot | None = None


Opener = Callable[[], Awaitable[Source | None]]


def _let_go(fd: int, length: int) -> None:
    """Drop the clean page-cache pages of `fd`'s first `length` bytes (0: all of them).

    Only advice: a page still dirty or in use stays, and nothing is lost either way (the bytes
    are on disk; a later read fetches them again).
    """
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, length, os.POSIX_FADV_DONTNEED)


def _let_go_and_close(fd: int) -> None:
    _let_go(fd, 0)
    with contextlib.suppress(OSError):
        os.close(fd)


def _joined(chunks: list[bytes]) -> bytes:
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Signal:
    """Wakes every task waiting at the moment it fires; each then checks its condition again.

    A waiter checks and calls `wait` with no await in between, so no firing is ever missed.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


@dataclass(eq=False, slots=True)
class _Cursor:
    """One reader: the next byte it wants and the end of its range."""

    position: int
    end: int
    dropped: str | None = None  # why it can no longer be served


class Download:
    """One blob being fetched into the cache. Reserved first, then begun or abandoned.

    Reserving before asking the cluster who should fetch closes a race: a peer asking this
    node for the blob while the claim is being decided waits instead of missing it.
    """

    def __init__(
        self,
        digest: Digest,
        cache: CacheStore,
        *,
        window: int = WINDOW,
        stall_seconds: float = STALL_SECONDS,
    ) -> None:
        self.digest = digest
        self._cache = cache
        self._window = window
        self._stall_seconds = stall_seconds
        self._loop = asyncio.get_running_loop()
        self._started = asyncio.Event()  # size known and bytes about to flow, or failed
        # Started, begun, or a claim asked or decided: a peer waiting for the start looks again.
        self._state = _Signal()
        # This node is asking the cluster who fetches the blob from upstream (`deciding_claim`).
        self.claiming = False
        self._data = _Signal()  # more bytes, the end, or a reader dropped: readers look again
        self._room = _Signal()  # a reader moved or left: a passing-through producer looks again
        self._fd: int | None = None  # the temp file (then the published blob), shared
        self._file: io.FileIO | None = None  # `_fd` as a file object for sendfile (not owning it)
        self._ran = False  # run() is over: the descriptor closes with the last reader
        self._cursors: set[_Cursor] = set()
        self.size: int | None = None
        self.received = 0  # bytes taken from the origin (and hashed, here or by the origin)
        self.on_disk = 0  # [0, on_disk) are in the temp file
        # Why the blob is streamed through rather than kept (a PASSTHROUGH_* reason), or None.
        self.passthrough: str | None = None
        # Pass-through: the chunks [memory_start, received) readers may still need, in order.
        self._memory: deque[tuple[int, bytes]] = deque()
        self._memory_start = 0
        self._memory_bytes = 0
        self.kept = False  # published into the cache
        self._flushing: asyncio.Task[None] | None = None  # a background flush of the temp file
        self._flushed = 0  # bytes of it the last flush started covered
        # Letting a published blob's pages go and closing its descriptor, once nobody reads.
        self._closing: asyncio.Future[None] | None = None
        self.finished: asyncio.Future[bool] = self._loop.create_future()
        self.task: asyncio.Task[None] | None = None
        # Where the bytes come from (a metrics source: upstream or peer), set when begun.
        self.origin = SOURCE_UPSTREAM
        # How far its bytes are from a holder, told to peers (peers/referrals.py): 0 from
        # upstream, one more than the peer it streams from.
        self.hops = 0

    @property
    def buffered(self) -> int:
        """Bytes held in memory for readers (only while passing through)."""
        return self._memory_bytes

    async def run(self, opener: Opener) -> None:
        """Fetch and hand out; `finished` is True once every byte was verified (and `kept` if
        it entered the cache), False when the origin does not have the blob."""
        try:
            source = await opener()
            if source is None:
                self._finish(False)
                return
            try:
                await self._copy(source)
            finally:
                await source.close()
            self._finish(True)
        except asyncio.CancelledError:
            self._finish(DownloadFailed(f"download of {self.digest} was cancelled"))
            raise
        except (MirrorError, OSError) as exc:
            log.warning("download of %s failed: %s", self.digest, exc)
            self._finish(exc)
        except Exception as exc:
            # A bug, not a bad origin: readers must still fail rather than wait or see a miss.
            log.exception("download of %s failed unexpectedly", self.digest)
            self._finish(exc)
        finally:
            self._mark_started()
            self._ran = True
            self._data.fire()
            self._release_if_unread()

    async def _copy(self, source: Source) -> None:
        self.size = source.size
        refused = await self._cache.admit(self.digest, source.size)
        if refused is not None:
            await self._pass_through(source.chunks, self._hasher(source), refused)
            return
        try:
            async with self._cache.writer(
                self.digest, source.size, verified=source.verified
            ) as writer:
                if source.sink is not None and source.verified:
                    source.sink.target = self._sink_into(writer)
                await self._write(source.chunks, writer)
                return
        except CacheFull:  # no room even for the temp file: nothing was written
            self._cache.note_passthrough(
                self.digest, source.size, PASSTHROUGH_NO_SPACE, "the cache's disk is full"
            )
        await self._pass_through(source.chunks, self._hasher(source), PASSTHROUGH_NO_SPACE)

    def _sink_into(self, writer: BlobWriter) -> Sink:
        """Writes a receiving thread makes into `writer` itself, each told to the readers.

        The bytes never enter the event loop on their way in: the thread writes them (in
        order, after whatever came through `chunks` before them, `BlobWriter.write_at`), and
        the loop only learns how far the file has grown.
        """
        loop = self._loop

        def sink(piece: memoryview, offset: int) -> int | None:
            try:
                written = writer.write_at(piece, offset)
            except OSError:
                # This node's disk, not the peer: the bytes go through the loop, whose own
                # write meets the error and fails the download as it always did.
                return None
            if written:
                loop.call_soon_threadsafe(self._grown, writer)
            return written

        return sink

    def _grown(self, writer: BlobWriter) -> None:
        self._advance(writer.written)
        self._flush_ahead()

    def _hasher(self, source: Source) -> hashlib._Hash | None:
        """A hash to check `source`'s bytes with; None when the source checks them itself."""
        return None if source.verified else hashlib.new(self.digest.algorithm)

    async def _write(self, chunks: AsyncIterator[bytes], writer: BlobWriter) -> None:
        """Into the temp file and then the cache; streamed through from where the disk filled.

        Taking bytes from the origin and writing them overlap: while one batch is written (and
        hashed unless the source verifies, on a worker thread), the next chunks are taken, up
        to `_WRITE_AHEAD` bytes, and written together as the next batch. The origin's
        connection keeps flowing (a client connection buffers little: aiohttp's stops reading at
        about 128 KiB), and a blob that arrives in small chunks costs few thread hand-offs.
        """
        self._fd = await asyncio.to_thread(os.open, writer.temp_path, os.O_RDONLY)
        self._mark_started()
        queued: list[bytes] = []  # taken from the origin, not yet handed to the writer
        writing: asyncio.Task[bytes | None] | None = None
        try:
            async for chunk in chunks:
                queued.append(chunk)
                if writing is not None:
                    if not writing.done() and sum(map(len, queued)) < _WRITE_AHEAD:
                        continue
                    rest = await writing
                    writing = None
                    if rest is not None:
                        await self._disk_full(chunks, writer, [rest, *queued])
                        return
                writing = asyncio.create_task(self._write_batch(writer, _joined(queued)))
                queued = []
            rest = await writing if writing is not None else None
            writing = None
            if rest is None and queued:
                rest = await self._write_batch(writer, _joined(queued))
            if rest is not None:
                await self._disk_full(chunks, writer, [rest, *queued])
                return
        finally:
            if writing is not None:
                # The origin failed while a batch was being written: let it end before the
                # writer's temp file goes.
                await asyncio.wait([writing])
                if not writing.cancelled():
                    writing.exception()
            if self._flushing is not None:  # it uses the descriptor, closed after the download
                await asyncio.wait([self._flushing])
        await writer.commit()
        self.kept = True

    async def _write_batch(self, writer: BlobWriter, batch: bytes) -> bytes | None:
        """Write `batch`; what did not fit when the disk is full and eviction cannot help."""
        before = writer.written
        try:
            await writer.write(batch)
        except CacheFull:
            self._advance(writer.written)
            return batch[writer.written - before :]
        self._advance(writer.written)
        self._flush_ahead()
        return None

    def _flush_ahead(self) -> None:
        """Start writing what is in the temp file to disk, in the background (`_FLUSH_EVERY`)."""
        if self._fd is None or self.on_disk - self._flushed < _FLUSH_EVERY:
            return
        if self._flushing is not None and not self._flushing.done():
            return
        self._flushed = self.on_disk
        self._flushing = asyncio.create_task(self._flush(self._fd, self._flushed))

    async def _flush(self, fd: int, flushed: int) -> None:
        """Write the temp file's first `flushed` bytes back, then let go of the pages every
        reader is past. On a worker thread; the flush only gives the writer's fsync a head
        start: an error is not lost, that fsync (on its own open file) still reports it."""
        with contextlib.suppress(OSError):
            await asyncio.to_thread(os.fdatasync, fd)
        done = min([flushed, *(cursor.position for cursor in self._cursors)])
        if done > 0 and self._fd == fd:
            await asyncio.to_thread(_let_go, fd, done)

    async def _disk_full(
        self, chunks: AsyncIterator[bytes], writer: BlobWriter, rest: list[bytes]
    ) -> None:
        """The disk filled mid-blob: `rest` and the remaining chunks go through from memory.

        Still inside the writer: the temp file, readable up to `on_disk`, is removed only when
        the whole blob went through.
        """
        assert self.size is not None
        self._cache.note_passthrough(
            self.digest, self.size, PASSTHROUGH_NO_SPACE, "the cache's disk is full"
        )
        # In pieces of at most a chunk, so the window lets go of them as readers move on.
        pieces = [part[i : i + _CHUNK] for part in rest for i in range(0, len(part), _CHUNK)]
        await self._pass_through(chunks, writer.hash_so_far(), PASSTHROUGH_NO_SPACE, first=pieces)

    def _advance(self, written: int) -> None:
        self.received = self.on_disk = written
        self._data.fire()

    async def _pass_through(
        self,
        chunks: AsyncIterator[bytes],
        hasher: hashlib._Hash | None,
        reason: str,
        *,
        first: Iterable[bytes] = (),
    ) -> None:
        """Hand the rest of the blob to the readers from memory; verify it (with `hasher`,
        unless the source does); keep nothing."""
        self.passthrough = reason
        self._memory_start = self.received
        self._mark_started()
        self._data.fire()
        # The readers woken by the start join before the bytes flow: a source that needs no
        # hashing here may not wait at all, and a blob gone through before its first reader
        # came would be held nowhere.
        await asyncio.sleep(0)
        for chunk in first:
            await self._hold(chunk, hasher)
        async for chunk in chunks:
            await self._hold(chunk, hasher)
        if self.received != self.size:
            raise DigestMismatch(f"{self.digest}: got {self.received} bytes, expected {self.size}")
        if hasher is not None and (actual := hasher.hexdigest()) != self.digest.hex:
            raise DigestMismatch(
                f"{self.digest}: content hashes to {self.digest.algorithm}:{actual}"
            )

    async def _hold(self, chunk: bytes, hasher: hashlib._Hash | None) -> None:
        """Put `chunk` in the window for the readers once there is room for it."""
        assert self.size is not None
        if self.received + len(chunk) > self.size:
            raise DigestMismatch(f"{self.digest}: more than the {self.size} bytes announced")
        await self._room_for(len(chunk))
        if hasher is not None:
            await asyncio.to_thread(hasher.update, chunk)
        self._memory.append((self.received, chunk))
        self._memory_bytes += len(chunk)
        self.received += len(chunk)
        self._data.fire()

    async def _room_for(self, count: int) -> None:
        """Wait until every reader is past enough of the window for `count` more bytes.

        An empty window always takes a chunk, so memory is at most `window` plus one chunk.
        With no reader at all the window is kept, not emptied: a reader on its way (its
        request is being answered) must still find the first bytes.
        """
        while True:
            self._trim()
            if not self._memory or self._memory_bytes + count <= self._window:
                return
            try:
                async with asyncio.timeout(self._stall_seconds):
                    await self._room.wait()
            except TimeoutError:
                self._stalled()

    def _trim(self) -> None:
        """Drop the chunks every reader is past (none while nobody reads)."""
        wanted = [cursor.position for cursor in self._cursors if cursor.position < cursor.end]
        if not wanted:
            return
        lowest = min(wanted)
        while self._memory:
            offset, chunk = self._memory[0]
            if offset + len(chunk) > lowest:
                break
            self._memory.popleft()
            self._memory_bytes -= len(chunk)
            self._memory_start = offset + len(chunk)

    def _stalled(self) -> None:
        """No reader moved for `stall_seconds` with the window full: drop the ones holding it."""
        waiting = [cursor for cursor in self._cursors if cursor.position < cursor.end]
        if not waiting:
            raise DownloadFailed(
                f"{self.digest} was streamed through, but nobody read it for "
                f"{self._stall_seconds:g} s"
            )
        lowest = min(cursor.position for cursor in waiting)
        for cursor in waiting:
            if cursor.position == lowest:
                cursor.dropped = (
                    f"{self.digest}: this reader did not read for {self._stall_seconds:g} s and "
                    "fell behind the others"
                )
                self._cursors.discard(cursor)
        log.warning("dropped readers of %s stuck at byte %d for the others", self.digest, lowest)
        self._data.fire()

    def _finish(self, outcome: bool | BaseException) -> None:
        if self.finished.done():
            return
        if isinstance(outcome, BaseException):
            failure = outcome if isinstance(outcome, DownloadFailed) else None
            self.finished.set_exception(failure or DownloadFailed(f"{self.digest}: {outcome}"))
            # Readers observe it; nobody else must be warned about an unretrieved exception.
            self.finished.exception()
        else:
            self.finished.set_result(outcome)
        self._data.fire()

    @property
    def from_upstream(self) -> bool:
        """Begun, from upstream: its bytes wait on no other node."""
        return self.task is not None and self.origin == SOURCE_UPSTREAM

    @contextlib.contextmanager
    def deciding_claim(self) -> Iterator[None]:
        """While this node asks the cluster whether it fetches the blob from upstream.

        The cluster may name it the claimant before its own answer is back (a starved node),
        and the nodes that lost the claim then ask it for the blob: they wait on a claim,
        not on a node (`waits_on_no_node`).
        """
        self.claiming = True
        self._state.fire()
        try:
            yield
        finally:
            self.claiming = False
            self._state.fire()

    @property
    def waits_on_no_node(self) -> bool:
        """Begun from upstream, or its claim on that being decided: its start depends on no
        other node's download, so a peer waiting for it closes no cycle of waits."""
        return self.from_upstream or self.claiming

    async def state_changed(self) -> None:
        """Until it starts, is begun, or a claim on it is asked or decided. Check the state
        and call this with no await in between."""
        await self._state.wait()

    def _mark_started(self) -> None:
        self._started.set()
        self._state.fire()

    @property
    def started(self) -> asyncio.Event:
        """Set once the origin answered (size known), or the download failed or was abandoned."""
        return self._started

    async def wait_started(self) -> int | None:
        """The blob's size once the origin answered; None if the origin does not have it."""
        await self._started.wait()
        if self.finished.done():
            if self.finished.exception() is not None:
                raise self.finished.exception()  # type: ignore[misc]
            if not self.finished.result():
                return None
        return self.size

    def read(self, offset: int, length: int) -> DownloadReader:
        """Bytes [offset, offset+length) as they arrive; the final byte only once verified.

        The reader is counted from this call on, so bytes passing through are kept for it.
        Raises `DownloadFailed` at once when part of the range went through already and is
        held neither on disk nor in memory any more.
        """
        end = offset + length
        gone_from, gone_to = self._gone()
        if max(offset, gone_from) < min(end, gone_to):
            raise DownloadFailed(
                f"{self.digest} is being streamed through without being kept, and bytes "
                f"{gone_from}-{gone_to - 1} are gone already"
            )
        cursor = _Cursor(offset, end)
        self._cursors.add(cursor)
        return DownloadReader(self, cursor)

    def _gone(self) -> tuple[int, int]:
        """The bytes [from, to) that were passed through and are held nowhere any more."""
        if self.passthrough is None:
            return 0, 0
        on_disk = self.on_disk if self._fd is not None else 0
        return on_disk, self._memory_start

    async def _read_at(self, cursor: _Cursor) -> bytes:
        """The next bytes for `cursor` (at least one), waiting for them if need be."""
        part = await self._next_part(cursor, _CHUNK)
        if isinstance(part, bytes):
            return part
        chunk = await asyncio.to_thread(os.pread, part.file.fileno(), part.count, part.offset)
        if not chunk:
            raise DownloadFailed(f"{self.digest}: temp file ended at {part.offset}")
        return chunk

    async def _next_part(self, cursor: _Cursor, limit: int | None) -> FilePart | bytes:
        """What is there for `cursor` (at least one byte; on disk, at most `limit` unless None),
        waiting for it if need be."""
        while True:
            if cursor.dropped is not None:
                raise DownloadFailed(cursor.dropped)
            if self.finished.done() and self.finished.exception() is not None:
                raise self.finished.exception()  # type: ignore[misc]
            size = self.size
            if size is None and self._started.is_set():
                raise DownloadFailed(f"{self.digest} is not available upstream")
            if size is not None:
                # Hold back the last byte until the digest is checked.
                verified = self.finished.done() and self.finished.result()
                ready = size if verified else min(self.received, size - 1)
                position, until = cursor.position, min(cursor.end, ready)
                if position < until:
                    if position < self.on_disk:
                        count = min(until, self.on_disk) - position
                        if limit is not None:
                            count = min(count, limit)
                        return FilePart(await self._open_file(), position, count)
                    if position >= self._memory_start:
                        return self._from_memory(position, until)
                    raise DownloadFailed(
                        f"{self.digest}: byte {position} was streamed through and is gone"
                    )
            await self._data.wait()

    async def _open_file(self) -> io.FileIO:
        """The shared descriptor as a file object (for sendfile), opened again if need be."""
        fd = self._fd
        if fd is None:
            fd = await self._open_published()
        if self._file is None or self._file.closed or self._file.fileno() != fd:
            self._file = io.FileIO(fd, "rb", closefd=False)
        return self._file

    async def _open_published(self) -> int:
        """The download was over and its descriptor closed before this reader came."""
        if not self.kept:
            raise DownloadFailed(f"download of {self.digest} is no longer readable")
        try:
            fd = await asyncio.to_thread(os.open, self._cache.blob_path(self.digest), os.O_RDONLY)
        except OSError as exc:
            raise DownloadFailed(f"{self.digest} left the cache: {exc}") from exc
        if self._fd is not None:  # another reader opened it meanwhile
            os.close(fd)
            return self._fd
        self._fd = fd
        return fd

    def _from_memory(self, position: int, until: int) -> bytes:
        for offset, chunk in self._memory:
            if position < offset + len(chunk):
                start, stop = position - offset, min(len(chunk), until - offset)
                return chunk if (start, stop) == (0, len(chunk)) else chunk[start:stop]
        raise DownloadFailed(f"{self.digest}: byte {position} is not in memory")  # unreachable

    def _release(self, cursor: _Cursor) -> None:
        self._cursors.discard(cursor)
        self._room.fire()
        self._release_if_unread()

    def _release_if_unread(self) -> None:
        """Once the download is over and no reader is left, free its descriptor and memory."""
        if not self._ran or self._cursors:
            return
        if self._fd is not None:
            self._file = None  # it does not own the descriptor
            fd, self._fd = self._fd, None
            self._close_descriptor(fd)
        self._memory.clear()
        self._memory_bytes = 0
        self._memory_start = self.received

    def _close_descriptor(self, fd: int) -> None:
        """Close the shared descriptor; a published blob's pages are let go first, on a worker
        thread (fsynced, so every page is clean; a large blob's take a while to drop)."""
        if self.kept:
            try:
                self._closing = self._loop.run_in_executor(None, _let_go_and_close, fd)
                return
            except RuntimeError:  # the loop is shutting down: just close it
                pass
        with contextlib.suppress(OSError):
            os.close(fd)


class DownloadReader(AsyncIterator[bytes]):
    """One reader of a download: an async iterator of chunks; `aclose` lets the download go.

    A reader dropped without being closed (its request failed before the body was sent) is
    let go when it is collected, so a passing-through download never waits for it.
    """

    def __init__(self, download: Download, cursor: _Cursor) -> None:
        self._download: Download | None = download
        self._cursor = cursor

    async def __anext__(self) -> bytes:
        download, cursor = self._download, self._cursor
        if download is None or cursor.position >= cursor.end:
            self._let_go()
            raise StopAsyncIteration
        try:
            chunk = await download._read_at(cursor)
        except BaseException:
            self._let_go()
            raise
        cursor.position += len(chunk)
        if cursor.position >= cursor.end:
            self._let_go()
        else:
            download._room.fire()
        return chunk

    async def next_part(self) -> FilePart | bytes | None:
        """The next part of the range, as much as is there (None at its end): a `FilePart` of
        the file for what is on disk, bytes for what passes through memory.

        Waits for bytes that have not arrived; the last byte comes only once verified. A part
        of the file stays valid until `aclose`, which the caller must call when done (also
        after the last part): unlike iterating, this never lets the download go by itself.
        """
        download, cursor = self._download, self._cursor
        if download is None or cursor.position >= cursor.end:
            return None
        try:
            part = await download._next_part(cursor, None)
        except BaseException:
            self._let_go()
            raise
        cursor.position += part.count if isinstance(part, FilePart) else len(part)
        download._room.fire()
        return part

    async def aclose(self) -> None:
        self._let_go()

    def _let_go(self) -> None:
        download, self._download = self._download, None
        if download is not None:
            download._release(self._cursor)

    def __del__(self) -> None:
        download = self._download
        if download is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to wake
                download._loop.call_soon_threadsafe(download._release, self._cursor)


class Downloads:
    """At most one download per digest on this node; later requests join the running one."""

    def __init__(
        self, cache: CacheStore, *, window: int = WINDOW, stall_seconds: float = STALL_SECONDS
    ) -> None:
        self._cache = cache
        self._window = window
        self._stall_seconds = stall_seconds
        self._running: dict[str, Download] = {}

    def get(self, digest: Digest) -> Download | None:
        return self._running.get(str(digest))

    def reserve(self, digest: Digest) -> tuple[Download, bool]:
        """The download of `digest` under way, or a new reserved one (True: this call made it)."""
        existing = self._running.get(str(digest))
        if existing is not None:
            return existing, False
        download = Download(
            digest, self._cache, window=self._window, stall_seconds=self._stall_seconds
        )
        self._running[str(digest)] = download
        return download, True

    def begin(
        self, download: Download, opener: Opener, *, origin: str = SOURCE_UPSTREAM, hops: int = 0
    ) -> None:
        """Start fetching a reserved download from `opener` (`origin`: upstream, or peer;
        `hops`: how far its bytes are from a holder)."""
        download.origin = origin
        download.hops = hops
        download.task = asyncio.create_task(
            self._run(download, opener), name=f"download {download.digest}"
        )
        download._state.fire()

    def abandon(self, download: Download, reason: str) -> None:
        """Give a reservation up (another node fetches it); its waiters fail over."""
        download._finish(DownloadAbandoned(reason))
        download._mark_started()
        if self._running.get(str(download.digest)) is download:
            del self._running[str(download.digest)]

    def settle(self, download: Download, reason: str) -> None:
        """Abandon `download` if it is still only reserved: neither begun nor given up.

        For the request that reserved it, whatever way it ends (an error, its client leaving):
        a reservation left behind would keep its waiters, and this digest, waiting for ever.
        """
        if download.task is None and not download.finished.done():
            self.abandon(download, reason)

    async def _run(self, download: Download, opener: Opener) -> None:
        try:
            await download.run(opener)
        finally:
            if self._running.get(str(download.digest)) is download:
                del self._running[str(download.digest)]

    async def close(self) -> None:
        for download in list(self._running.values()):
            if download.task is not None:
                download.task.cancel()
        for download in list(self._running.values()):
            if download.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await download.task
