"""The node cache: mirror's own content-addressed store on local disk.

Layout under the cache directory:
    blobs/<algorithm>/<hex>          exact bytes, named by their digest
    tags/<registry>/<repository>/@<tag>   the digest a tag points to (text)
    tmp/                             writes in progress, renamed into place when verified

A blob becomes visible only after its bytes hashed to its digest and were fsynced, so a reader
never sees partial or wrong content. '@' cannot start a repository component or appear in a tag,
so a tag file can never collide with a nested repository directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from pathlib import Path
from types import TracebackType

from mirror.errors import DigestMismatch, StoreUnavailable
from mirror.oci.reference import Digest, TagRef, parse_digest, tag_ref
from mirror.stores.base import BlobSource, FileBlob, ImageEntry, Store

_TAG_PREFIX = "@"


class CacheStore(Store):
    name = "cache"

    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs = root / "blobs"
        self._tags = root / "tags"
        self._tmp = root / "tmp"

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._prepare_dirs)
        except OSError as exc:
            raise StoreUnavailable(f"cache directory {self.root} is not usable: {exc}") from exc

    def _prepare_dirs(self) -> None:
        for directory in (self._blobs, self._tags, self._tmp):
            directory.mkdir(parents=True, exist_ok=True)
        # Leftovers of writes interrupted by a crash are never valid content.
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)
        if not os.access(self._tmp, os.W_OK):
            raise PermissionError(f"{self._tmp} is not writable")

    def blob_path(self, digest: Digest) -> Path:
        return self._blobs / digest.algorithm / digest.hex

    def _tag_path(self, ref: TagRef) -> Path:
        return self._tags / ref.registry / ref.repository / f"{_TAG_PREFIX}{ref.tag}"

    async def resolve(self, ref: TagRef) -> str | None:
        try:
            text = await asyncio.to_thread(self._tag_path(ref).read_text)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return text.strip() or None

    async def stat(self, digest: Digest) -> int | None:
        try:
            return (await asyncio.to_thread(self.blob_path(digest).stat)).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    async def open(self, digest: Digest) -> BlobSource | None:
        try:
            fileobj = await asyncio.to_thread(open, self.blob_path(digest), "rb")
        except (FileNotFoundError, NotADirectoryError):
            return None
        return FileBlob(fileobj, os.fstat(fileobj.fileno()).st_size)

    async def images(self) -> list[ImageEntry]:
        return await asyncio.to_thread(self._scan_tags)

    def _scan_tags(self) -> list[ImageEntry]:
        entries: list[ImageEntry] = []
        for path in self._tags.rglob(f"{_TAG_PREFIX}*"):
            relative = path.relative_to(self._tags).parts
            if len(relative) < 3:
                continue
            registry, repository = relative[0], "/".join(relative[1:-1])
            try:
                ref = tag_ref(registry, repository, relative[-1][len(_TAG_PREFIX) :])
                digest = str(parse_digest(path.read_text().strip()))
            except (OSError, ValueError):
                continue
            entries.append(ImageEntry(ref, digest))
        return entries

    async def set_tag(self, ref: TagRef, digest: Digest) -> None:
        """Point `ref` at `digest`, atomically replacing any previous value."""
        await asyncio.to_thread(self._write_atomically, self._tag_path(ref), str(digest).encode())

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


class BlobWriter:
    """Streams bytes into a temp file while hashing; `commit` verifies, fsyncs and renames.

    Used as an async context manager: leaving it without `commit` (an error, a dropped upstream)
    deletes the temp file, so partial content never becomes visible.
    """

    def __init__(self, store: CacheStore, digest: Digest, expected_size: int | None) -> None:
        self._store = store
        self.digest = digest
        self._expected_size = expected_size
        self._hash = hashlib.new(digest.algorithm)
        self._temp_path = store._tmp / f"blob-{digest.hex[:16]}-{uuid.uuid4().hex}"
        self._handle = None
        self.written = 0
        self._committed = False

    async def __aenter__(self) -> BlobWriter:
        self._handle = await asyncio.to_thread(open, self._temp_path, "xb")
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
        self._handle.write(chunk)
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

    def _publish(self) -> None:
        assert self._handle is not None
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        target = self._store.blob_path(self.digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self._temp_path, 0o444)
        os.replace(self._temp_path, target)

    def _discard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._temp_path.unlink(missing_ok=True)
