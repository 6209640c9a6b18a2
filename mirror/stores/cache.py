"""The node cache: mirror's own content-addressed store on local disk.

Layout under the cache directory:
    blobs/<algorithm>/<hex>          exact bytes, named by their digest
    tags/<registry>/<repository>/@<tag>   the digest a tag points to (text)
    tmp/                             writes in progress, renamed into place when verified

A blob becomes visible only after its bytes hashed to its digest and were fsynced, so a reader
never sees partial or wrong content. '@' cannot start a repository component or appear in a tag,
so a tag file can never collide with a nested repository directory.

The cache is bounded: past `max_bytes` the least recently used blobs are evicted, never one that
is open for reading (writes in progress live in tmp/ and are not counted until published).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from mirror.errors import DigestMismatch, StoreUnavailable
from mirror.metrics import Metrics
from mirror.oci.reference import Digest, TagRef, parse_digest, tag_ref
from mirror.stores.base import BlobSource, FileBlob, ImageEntry, Store, usable_digest

log = logging.getLogger(__name__)

_TAG_PREFIX = "@"


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
        try:
            return (await asyncio.to_thread(self.blob_path(digest).stat)).st_size
        except (FileNotFoundError, NotADirectoryError):
            self._forget(str(digest))
            return None

    async def open(self, digest: Digest) -> BlobSource | None:
        key = str(digest)
        # Pinned before the file is opened, so an eviction cannot slip in between.
        self._readers[key] += 1
        try:
            fileobj = await asyncio.to_thread(open, self.blob_path(digest), "rb")
        except (FileNotFoundError, NotADirectoryError):
            self._unpin(key)
            self._forget(key)
            return None
        if key in self._lru:
            self._lru.move_to_end(key)
        return _PinnedFileBlob(fileobj, os.fstat(fileobj.fileno()).st_size, self, key)

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

    def writer(self, digest: Digest, expected_size: int | None = None) -> BlobWriter:
        """A writer that makes the blob visible only once its bytes match `digest`."""
        return BlobWriter(self, digest, expected_size)

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
            size = self._lru.pop(key)
            self._total -= size
            try:
                await asyncio.to_thread(self.blob_path(parse_digest(key)).unlink, True)
            except OSError as exc:
                log.warning("cannot evict %s from the cache: %s", key, exc)
            if self._metrics is not None:
                self._metrics.cache_evictions.inc()
            log.debug("evicted %s (%d bytes) from the cache", key, size)
        self._report_size()

    def _report_size(self) -> None:
        if self._metrics is not None:
            self._metrics.cache_bytes.set(self._total)


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
    """

    def __init__(self, store: CacheStore, digest: Digest, expected_size: int | None) -> None:
        self._store = store
        self.digest = digest
        self._expected_size = expected_size
        self._hash = hashlib.new(digest.algorithm)
        self.temp_path = store._tmp / f"blob-{digest.hex[:16]}-{uuid.uuid4().hex}"
        self._handle: BinaryIO | None = None
        self.written = 0
        self._committed = False

    async def __aenter__(self) -> BlobWriter:
        self._handle = await asyncio.to_thread(open, self.temp_path, "xb", buffering=0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._committed:
            await asyncio.to_thread(self._discard)

    async def write(self, chunk: bytes) -> None:
        await asyncio.to_thread(self._write_chunk, chunk)

    def _write_chunk(self, chunk: bytes) -> None:
        assert self._handle is not None
        view = memoryview(chunk)
        while view:
            count = self._handle.write(view)
            view = view[count:]
        self._hash.update(chunk)
        self.written += len(chunk)

    async def commit(self) -> None:
        """Verify size and digest, then publish. Raises `DigestMismatch` and discards otherwise."""
        if self._expected_size is not None and self.written != self._expected_size:
            raise DigestMismatch(
                f"{self.digest}: got {self.written} bytes, expected {self._expected_size}"
            )
        actual = self._hash.hexdigest()
        if actual != self.digest.hex:
            raise DigestMismatch(
                f"{self.digest}: content hashes to {self.digest.algorithm}:{actual}"
            )
        await asyncio.to_thread(self._publish)
        self._committed = True
        await self._store._published(self.digest, self.written)

    def _publish(self) -> None:
        assert self._handle is not None
        os.fsync(self._handle.fileno())
        self._handle.close()
        target = self._store.blob_path(self.digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.temp_path, 0o444)
        os.replace(self.temp_path, target)

    def _discard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self.temp_path.unlink(missing_ok=True)
