"""The node cache: mirror's own content-addressed store on local disk.

Layout under the cache directory:
    blobs/<algorithm>/<hex>          exact bytes, named by their digest
    tags/<registry>/<repository>/@<tag>   the digest a tag points to (text)
    tmp/                             writes in progress, renamed into place when verified

A blob becomes visible only after its bytes hashed to its digest (here, or as they arrived by
a source that verifies them: `writer(verified=True)`) and were fsynced, so a reader never sees
partial or wrong content. '@' cannot start a repository component or appear in a tag, so a tag
file can never collide with a nested repository directory.

The cache is bounded: past `max_bytes` the least recently used blobs are evicted, never one that
is open for reading (writes in progress live in tmp/ and are not counted until published).

The disk is bounded too, whatever `max_bytes` says. A blob is admitted (`admit`) before its first
byte is written: one larger than `max_bytes`, or than the free space plus everything eviction
could remove, is never written, since it could only fill the disk and push out the rest of the
cache before being thrown away. When the disk still runs out mid-write (other writers, other
files on the same file system), the writer evicts least recently used blobs to make room and goes
on; when that cannot help it raises `CacheFull`, and the download streams the blob through
without keeping it (content/downloads.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from mirror.errors import CacheFull, DigestMismatch, StoreUnavailable
from mirror.metrics import Metrics
from mirror.oci.reference import Digest, TagRef, parse_digest, tag_ref
from mirror.stores.base import BlobSource, FileBlob, ImageEntry, Store, usable_digest

log = logging.getLogger(__name__)

_TAG_PREFIX = "@"

# Why a blob was streamed through rather than kept (the `reason` label of the metric).
PASSTHROUGH_OVER_BOUND = "over-bound"
PASSTHROUGH_NO_SPACE = "no-space"

# A write that failed for want of space: the disk is full, or the user's quota is.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
# The most a blob writer hands the kernel per write() call. From 2 MiB on the kernel fills the
# page cache with 2 MiB folios, which on a virtual machine whose free memory goes back to the
# host cost up to 40 times more CPU to fill: about 9 s/GiB, against 0.2 s/GiB in 1 MiB writes
# (measured on the benchmark host, kernel 6.18). Smaller writes cost nothing anywhere else.
_WRITE_PIECE = 1024 * 1024


class CacheStore(Store):
    name = "cache"

    def __init__(
        self, root: Path, *, max_bytes: int | None = None, metrics: Metrics | None = None
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._metrics = metrics
        self._blobs = root / "blobs"
        self._tags = root / "tags"
        self._tmp = root / "tmp"
        # Least recently used first; the size of every published blob.
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._total = 0
        self._readers: Counter[str] = Counter()
        self._version = 0
        self._changed = asyncio.Condition()
        # Writes in progress: the bytes they are still to write are spoken for on the disk.
        self._writers: set[BlobWriter] = set()
        # Told of every blob opened for reading (content/scrub.py verifies those first), and
        # of every blob published, its bytes just matched against the digest.
        self._open_listeners: list[Callable[[Digest], None]] = []
        self._publish_listeners: list[Callable[[Digest], None]] = []

    @property
    def total_bytes(self) -> int:
        return self._total

    async def start(self) -> None:
        try:
            found = await asyncio.to_thread(self._prepare_dirs)
        except OSError as exc:
            raise StoreUnavailable(f"cache directory {self.root} is not usable: {exc}") from exc
        for digest, size in found:
            self._lru[digest] = size
            self._total += size
        self._report_size()
        await self._evict()

    def _prepare_dirs(self) -> list[tuple[str, int]]:
        """Create the layout, drop crash leftovers, and list blobs oldest access first."""
        for directory in (self._blobs, self._tags, self._tmp):
            directory.mkdir(parents=True, exist_ok=True)
        # Leftovers of writes interrupted by a crash are never valid content.
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)
        if not os.access(self._tmp, os.W_OK):
            raise PermissionError(f"{self._tmp} is not writable")
        found: list[tuple[float, str, int]] = []
        for algorithm_dir in self._blobs.iterdir():
            for entry in os.scandir(algorithm_dir):
                stat = entry.stat()
                found.append((stat.st_atime, f"{algorithm_dir.name}:{entry.name}", stat.st_size))
        return [(digest, size) for _, digest, size in sorted(found)]

    def holds(self, digest: Digest) -> bool:
        """Whether `digest` is published here, from memory: no await between asking and acting."""
        return str(digest) in self._lru

    def blob_path(self, digest: Digest) -> Path:
        return self._blobs / digest.algorithm / digest.hex

    def _tag_path(self, ref: TagRef) -> Path:
        return self._tags / ref.registry / ref.repository / f"{_TAG_PREFIX}{ref.tag}"

    async def resolve(self, ref: TagRef) -> Digest | None:
        try:
            text = await asyncio.to_thread(self._tag_path(ref).read_text)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return usable_digest(self.name, ref, text.strip())

    async def stat(self, digest: Digest) -> int | None:
        # One `stat` of a local file, on the loop: a worker thread would cost more wake-ups
        # than the call, and every request a node answers asks the cache. With no await between
        # the look and the books, a blob in the books with no file went away.
        try:
            return self.blob_path(digest).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            if str(digest) in self._lru:
                self._forget(str(digest))
            return None

    def _open_file(self, digest: Digest) -> BinaryIO:
        """The blob's file, opened; FileNotFoundError if it is not there.

        On the loop, like `stat`: one local system call, where a worker thread cost two
        wake-ups and a turn of the loop on every request, most of them misses (a runtime's
        blob, not cached here). And with no await between the look and the books, a look
        cannot miss a blob a writer publishes meanwhile and then drop it from the books (which
        lost a blob just fetched, and sent a peer upstream, when the open ran on a thread).
        """
        return open(self.blob_path(digest), "rb")

    async def open(self, digest: Digest) -> BlobSource | None:
        key = str(digest)
        # Pinned before the file is opened, so an eviction cannot slip in between.
        self._readers[key] += 1
        try:
            fileobj = self._open_file(digest)
        except (FileNotFoundError, NotADirectoryError):
            self._unpin(key)
            self._forget(key)
            return None
        if key in self._lru:
            self._lru.move_to_end(key)
        for listener in self._open_listeners:
            listener(digest)
        return _PinnedFileBlob(fileobj, os.fstat(fileobj.fileno()).st_size, self, key)

    def watch_opens(self, listener: Callable[[Digest], None]) -> None:
        """Call `listener` (synchronously, so it must not block) with every digest opened."""
        self._open_listeners.append(listener)

    def watch_publishes(self, listener: Callable[[Digest], None]) -> None:
        """Call `listener` (synchronously) with every digest published, its bytes verified."""
        self._publish_listeners.append(listener)

    async def evict_corrupt(self, digest: Digest, identity: tuple[int, int]) -> bool:
        """Remove a published blob found not to match its digest; True if it was removed.

        `identity` is the (device, inode) of the file that was hashed and found wrong; the caller
        keeps that file open until this returns, so no other file can have its inode number. A
        writer publishes by rename, so the path may hold a fresh, verified copy by now: that one
        stays. Readers that have the bad file open keep their descriptor; new readers miss and
        look elsewhere. Watchers of `changes()` are told, so the advertiser withdraws the digest.
        """
        removed = await asyncio.to_thread(self._remove_if_same, self.blob_path(digest), identity)
        if not removed:
            return False
        size = self._lru.pop(str(digest), None)
        if size is not None:
            self._total -= size
        self._report_size()
        await self._notify()
        return True

    def _remove_if_same(self, path: Path, identity: tuple[int, int]) -> bool:
        """Unlink `path` if it is still the file `identity` names.

        Checked twice: once before moving it aside, and again on the moved file, so a copy
        published between the check and the move is put back rather than lost.
        """
        try:
            found = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        if (found.st_dev, found.st_ino) != identity:
            return False
        aside = self._tmp / f"corrupt-{uuid.uuid4().hex}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        moved = os.stat(aside)
        if (moved.st_dev, moved.st_ino) != identity:
            # link, unlike rename, never replaces a copy published in the meantime.
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
            os.unlink(aside)
            return False
        os.unlink(aside)
        return True

    def _unpin(self, key: str) -> None:
        self._readers[key] -= 1
        if self._readers[key] <= 0:
            del self._readers[key]

    def _forget(self, key: str) -> None:
        """Drop a blob whose file is gone (removed behind the cache's back) from the books."""
        size = self._lru.pop(key, None)
        if size is not None:
            self._total -= size
            self._report_size()
            log.warning("%s vanished from the cache directory", key)

    async def images(self) -> list[ImageEntry]:
        return await asyncio.to_thread(self._scan_tags)

    async def loose_digests(self) -> list[str]:
        return list(self._lru)

    def _scan_tags(self) -> list[ImageEntry]:
        entries: list[ImageEntry] = []
        for path in self._tags.rglob(f"{_TAG_PREFIX}*"):
            relative = path.relative_to(self._tags).parts
            if len(relative) < 3:
                continue
            registry, repository = relative[0], "/".join(relative[1:-1])
            try:
                ref = tag_ref(registry, repository, relative[-1][len(_TAG_PREFIX) :])
                text = path.read_text().strip()
            except (OSError, ValueError):
                continue
            digest = usable_digest(self.name, ref, text)
            if digest is not None:
                entries.append(ImageEntry(ref, digest))
        return entries

    async def changes(self) -> AsyncIterator[None]:
        seen = self._version
        while True:
            async with self._changed:
                await self._changed.wait_for(partial(self._changed_since, seen))
                seen = self._version
            yield

    def _changed_since(self, version: int) -> bool:
        return self._version != version

    async def _notify(self) -> None:
        async with self._changed:
            self._version += 1
            self._changed.notify_all()

    async def set_tag(self, ref: TagRef, digest: Digest) -> None:
        """Point `ref` at `digest`, atomically replacing any previous value."""
        path = self._tag_path(ref)
        data = str(digest).encode()
        if await asyncio.to_thread(_read_if_exists, path) == data:
            return
        await asyncio.to_thread(self._write_atomically, path, data)
        await self._notify()

    def _write_atomically(self, target: Path, data: bytes) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._tmp / f"tag-{uuid.uuid4().hex}"
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)

    def writer(
        self, digest: Digest, expected_size: int | None = None, *, verified: bool = False
    ) -> BlobWriter:
        """A writer that makes the blob visible only once its bytes match `digest`.

        `verified`: the caller's source checks the bytes against `digest` itself and raises
        instead of handing out its last one when they do not match (a peer's stream). They
        are not hashed a second time, and the caller commits only once that source ended.
        """
        return BlobWriter(self, digest, expected_size, verified=verified)

    async def put(self, digest: Digest, data: bytes) -> None:
        async with self.writer(digest, len(data)) as writer:
            await writer.write(data)
            await writer.commit()

    async def _published(self, digest: Digest, size: int) -> None:
        key = str(digest)
        if key not in self._lru:
            self._total += size
        self._lru[key] = size
        self._lru.move_to_end(key)
        for listener in self._publish_listeners:
            listener(digest)
        await self._evict()
        self._report_size()
        await self._notify()

    async def _evict(self) -> None:
        """Drop least recently used blobs until under the bound; open ones are kept."""
        if self.max_bytes is None or self._total <= self.max_bytes:
            return
        for key in list(self._lru):
            if self._total <= self.max_bytes:
                break
            if self._readers.get(key):
                continue
            await self._evict_one(key)
        self._report_size()

    async def _evict_one(self, key: str) -> None:
        # Popped first: two evictions running at once (a publish, a write short of space)
        # may both have listed the same blob.
        size = self._lru.pop(key, None)
        if size is None:
            return
        self._total -= size
        try:
            await asyncio.to_thread(self.blob_path(parse_digest(key)).unlink, True)
        except OSError as exc:
            log.warning("cannot evict %s from the cache: %s", key, exc)
        if self._metrics is not None:
            self._metrics.cache_evictions.inc()
        log.debug("evicted %s (%d bytes) from the cache", key, size)

    # --- room on the disk ----------------------------------------------------------------

    async def admit(self, digest: Digest, size: int) -> str | None:
        """Whether a blob of `size` bytes may be written: None if so, else why not.

        Decided before the first byte is written, so that a blob the cache could never keep
        does not fill the disk and push every other blob out only to be thrown away: one
        larger than `max_bytes` (`PASSTHROUGH_OVER_BOUND`), or than the free space plus all
        that eviction could remove (`PASSTHROUGH_NO_SPACE`). Bytes other writes in progress
        are still to write count as taken. A blob that fits only once least recently used
        blobs are gone has them evicted now, before it is written. A refusal is logged and
        counted (`note_passthrough`).
        """
        if self.max_bytes is not None and size > self.max_bytes:
            why = f"it is larger than the cache's bound ({_human(self.max_bytes)}, --cache-size)"
            self.note_passthrough(digest, size, PASSTHROUGH_OVER_BOUND, why)
            return PASSTHROUGH_OVER_BOUND
        free = await asyncio.to_thread(self._free_bytes)
        needed = size + self._pending_bytes()
        if free is None or free >= needed:
            return None
        evictable = self._evictable_bytes()
        if free + evictable < needed:
            why = (
                f"the cache's disk cannot hold it ({_human(free)} free, "
                f"{_human(evictable)} evictable)"
            )
            self.note_passthrough(digest, size, PASSTHROUGH_NO_SPACE, why)
            return PASSTHROUGH_NO_SPACE
        await self._evict_for_space(needed)
        return None

    async def make_room(self, needed: int) -> bool:
        """Evict least recently used blobs until `needed` bytes are free; False if impossible.

        For a write that ran out of space mid-blob. When even evicting every blob that is not
        open for reading could not free that much, nothing is evicted: emptying the cache for
        a blob that cannot be kept anyway would only cost the next pulls.
        """
        free = await asyncio.to_thread(self._free_bytes)
        if free is None:
            return False
        if free >= needed:
            return True
        if free + self._evictable_bytes() < needed:
            return False
        return await self._evict_for_space(needed)

    async def _evict_for_space(self, needed: int) -> bool:
        """Evict least recently used blobs, not open ones, until `needed` bytes are free."""
        enough = False
        evicted = False
        for key in list(self._lru):
            free = await asyncio.to_thread(self._free_bytes)
            enough = free is not None and free >= needed
            if enough:
                break
            if self._readers.get(key):
                continue
            await self._evict_one(key)
            evicted = True
        else:
            free = await asyncio.to_thread(self._free_bytes)
            enough = free is not None and free >= needed
        if evicted:
            self._report_size()
            await self._notify()  # the advertiser withdraws what left
        return enough

    def _free_bytes(self) -> int | None:
        """Bytes free on the cache's file system for an unprivileged writer; None: unknown."""
        try:
            found = os.statvfs(self._tmp)
        except OSError:
            return None
        return found.f_bavail * found.f_frsize

    def _evictable_bytes(self) -> int:
        return sum(size for key, size in self._lru.items() if not self._readers.get(key))

    def _pending_bytes(self) -> int:
        return sum(writer.remaining for writer in self._writers)

    def note_passthrough(self, digest: Digest, size: int, reason: str, why: str) -> None:
        """Log (one line per blob) and count a blob streamed through without being kept."""
        log.warning("not keeping %s (%s): %s; streaming it through", digest, _human(size), why)
        if self._metrics is not None:
            self._metrics.cache_passthrough.labels(reason).inc()
            self._metrics.cache_passthrough_bytes.labels(reason).inc(size)

    def _report_size(self) -> None:
        if self._metrics is not None:
            self._metrics.cache_bytes.set(self._total)


def _human(size: int) -> str:
    """`64 MiB`, `4.8 MiB`, `512 B`: sizes as an operator reads them in a log line."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{size} B"


def _read_if_exists(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


class _PinnedFileBlob(FileBlob):
    """A cached blob that stays safe from eviction while it is open."""

    def __init__(self, fileobj: BinaryIO, size: int, store: CacheStore, key: str) -> None:
        super().__init__(fileobj, size)
        self._store = store
        self._key: str | None = key

    async def close(self) -> None:
        await super().close()
        if self._key is not None:
            self._store._unpin(self._key)
            self._key = None


class BlobWriter:
    """Streams bytes into a temp file while hashing; `commit` verifies, fsyncs and renames.

    Used as an async context manager: leaving it without `commit` (an error, a dropped upstream)
    deletes the temp file, so partial content never becomes visible. Writes are unbuffered, so
    readers following a download in progress (through `temp_path`) see each chunk once
    `write` returns.

    When the disk is full, `write` has least recently used blobs evicted and goes on; when
    that cannot help it raises `CacheFull`. `written` and the running hash then cover exactly
    the bytes that reached the file, so the caller can go on with the rest elsewhere.
    """

    def __init__(
        self,
        store: CacheStore,
        digest: Digest,
        expected_size: int | None,
        *,
        verified: bool = False,
    ) -> None:
        self._store = store
        self.digest = digest
        self._expected_size = expected_size
        # None: the bytes are verified by their source (`CacheStore.writer`).
        self._hash = None if verified else hashlib.new(digest.algorithm)
        self.temp_path = store._tmp / f"blob-{digest.hex[:16]}-{uuid.uuid4().hex}"
        self._handle: BinaryIO | None = None
        self.written = 0
        self._committed = False
        # Writes from another thread (`write_at`) and this writer's own take turns under it.
        self._turn = threading.RLock()
        self._taking = True  # False once it writes nothing more (full, discarded, published)

    async def __aenter__(self) -> BlobWriter:
        try:
            self._handle = await asyncio.to_thread(open, self.temp_path, "xb", buffering=0)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise CacheFull(f"cannot create a temp file in the cache: {exc}") from exc
            raise
        self._store._writers.add(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._store._writers.discard(self)
        if not self._committed:
            await asyncio.to_thread(self._discard)

    @property
    def remaining(self) -> int:
        """Bytes this write still expects to add to the disk (0 when its size is unknown)."""
        if self._expected_size is None or self not in self._store._writers:
            return 0
        return max(0, self._expected_size - self.written)

    def hash_so_far(self) -> hashlib._Hash | None:
        """A copy of the running hash, covering the `written` bytes (None: verified bytes)."""
        return None if self._hash is None else self._hash.copy()

    async def write(self, chunk: bytes) -> None:
        """Append `chunk`; on a full disk, evict to make room, or raise `CacheFull`."""
        view = memoryview(chunk)
        made_room = False
        while True:
            done = await asyncio.to_thread(self._write_chunk, view)
            view = view[done:]
            if not view:
                return
            # The disk is full. Room for the rest of the blob, not just this chunk: evicting a
            # blob per chunk and failing near the end would cost the cache for nothing.
            if (done == 0 and made_room) or not await self._store.make_room(
                self.remaining or len(view)
            ):
                self._store._writers.discard(self)  # writes no more: its space is not needed
                self._stop_taking()
                raise CacheFull(f"{self.digest}: no room left after {self.written} bytes")
            made_room = True

    def write_at(self, view: memoryview, offset: int) -> int | None:
        """From another thread (a peer's body arriving, peers/receiver.py): write `view`, the
        blob's bytes from `offset`, if every byte before it is written; how many it wrote.

        0: not its turn (bytes before it are still on their way through the event loop; the
        caller passes these on that way too). Short of `view` or None: no more room, or the
        writer is done; it takes nothing more (`write` on the loop evicts and goes on, or
        raises `CacheFull`, for the bytes that follow).
        """
        with self._turn:
            if not self._taking or self._handle is None:
                return None
            if self.written != offset:
                return 0
            done = self._write_chunk(view)
            if done < len(view):
                self._taking = False
            return done

    def _stop_taking(self) -> None:
        with self._turn:
            self._taking = False

    def _write_chunk(self, view: memoryview) -> int:
        """Write as much of `view` as fits; the count written (short only when out of space)."""
        with self._turn:  # reentrant: `write_at` holds it already
            assert self._handle is not None
            done = 0
            while done < len(view):
                try:
                    count = self._handle.write(view[done : done + _WRITE_PIECE])
                except OSError as exc:
                    if exc.errno in _NO_SPACE:
                        break
                    raise
                if not count:
                    break
                if self._hash is not None:
                    self._hash.update(view[done : done + count])
                self.written += count
                done += count
            return done

    async def commit(self) -> None:
        """Verify size and digest, then publish. Raises `DigestMismatch` and discards otherwise."""
        if self._expected_size is not None and self.written != self._expected_size:
            raise DigestMismatch(
                f"{self.digest}: got {self.written} bytes, expected {self._expected_size}"
            )
        if self._hash is not None and (actual := self._hash.hexdigest()) != self.digest.hex:
            raise DigestMismatch(
                f"{self.digest}: content hashes to {self.digest.algorithm}:{actual}"
            )
        await asyncio.to_thread(self._publish)
        self._committed = True
        await self._store._published(self.digest, self.written)

    def _publish(self) -> None:
        assert self._handle is not None
        self._stop_taking()
        os.fsync(self._handle.fileno())
        self._handle.close()
        target = self._store.blob_path(self.digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.temp_path, 0o444)
        os.replace(self.temp_path, target)

    def _discard(self) -> None:
        self._stop_taking()
        if self._handle is not None:
            self._handle.close()
        self.temp_path.unlink(missing_ok=True)
