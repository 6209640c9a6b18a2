"""The `Store` interface every backend implements, and the two shapes its bytes come in.

A backend hands out either an open file (served with sendfile, zero-copy) or a stream of chunks
(for content only reachable through an API). Opening the file before answering matters: containerd's
garbage collector may unlink a blob at any time, and an already open file survives that.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from mirror.errors import ContentVanished, DigestInvalid
from mirror.oci.reference import Digest, TagRef, parse_digest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ImageEntry:
    """One named image a store holds: its tag reference and the digest the tag points to."""

    ref: TagRef
    digest: Digest


def usable_digest(store: str, ref: TagRef, text: str) -> Digest | None:
    """The digest a store's tag record holds, validated; None and a warning when unusable.

    A tag pointing at something that is not a digest mirror can verify (a corrupt tag file,
    an algorithm such as sha384) is treated as a tag this store does not hold.
    """
    try:
        return parse_digest(text)
    except DigestInvalid as exc:
        log.warning("%s store: %s points to an unusable digest %r (%s)", store, ref, text, exc)
        return None


class BlobSource(ABC):
    """Bytes of one blob, opened and ready to serve. Always `close()` it."""

    size: int

    @abstractmethod
    async def close(self) -> None: ...

    async def read_all(self, limit: int) -> bytes:
        """The whole blob in memory, for manifests; refuses more than `limit` bytes."""
        if self.size > limit:
            raise ValueError(f"blob of {self.size} bytes exceeds the {limit} byte limit")
        chunks = [chunk async for chunk in self.iter_range(0, self.size)]
        return b"".join(chunks)

    @abstractmethod
    def iter_range(self, offset: int, length: int) -> AsyncIterator[bytes]:
        """Chunks covering `length` bytes from `offset`."""


class FileBlob(BlobSource):
    """A blob backed by an open file: servable with sendfile."""

    CHUNK = 1024 * 1024

    def __init__(self, fileobj: BinaryIO, size: int) -> None:
        self.fileobj = fileobj
        self.size = size

    async def close(self) -> None:
        self.fileobj.close()

    async def iter_range(self, offset: int, length: int) -> AsyncIterator[bytes]:
        end = offset + length
        position = offset
        while position < end:
            chunk = await asyncio.to_thread(
                _pread, self.fileobj, position, min(self.CHUNK, end - position)
            )
            if not chunk:
                raise EOFError(f"file ended at byte {position} of {self.size}")
            position += len(chunk)
            yield chunk


def _pread(fileobj: BinaryIO, offset: int, length: int) -> bytes:
    fileobj.seek(offset, io.SEEK_SET)
    return fileobj.read(length)


class StreamBlob(BlobSource):
    """A blob only reachable as a stream from some API; `open_range` starts a read at an offset."""

    def __init__(self, size: int, open_range: Callable[[int, int], AsyncIterator[bytes]]) -> None:
        self.size = size
        self._open_range = open_range

    async def close(self) -> None:
        return None

    def iter_range(self, offset: int, length: int) -> AsyncIterator[bytes]:
        return self._open_range(offset, length)


@dataclass(frozen=True, slots=True)
class FilePart:
    """`count` bytes of an open file from `offset`, there and ready to send.

    `file` belongs to whoever handed the part out (never close it): valid until the reader
    that got the part is closed. Send it with a positioned call (sendfile, pread), never by
    seeking and reading: other readers may share the descriptor.
    """

    file: io.FileIO
    offset: int
    count: int

    async def chunks(self, size: int = 1024 * 1024) -> AsyncIterator[bytes]:
        """The part's bytes in chunks read with `pread` (where sendfile cannot be used)."""
        position, end = self.offset, self.offset + self.count
        while position < end:
            count = min(size, end - position)
            chunk = await asyncio.to_thread(os.pread, self.file.fileno(), count, position)
            if not chunk:
                raise ContentVanished(f"file ended at {position}, expected {end} bytes")
            position += len(chunk)
            yield chunk


class PartReader(Protocol):
    """A range of a blob still arriving, handed out part by part as it lands on disk."""

    async def next_part(self) -> FilePart | bytes | None:
        """The next part, as much as is there (waits for more); None once the range is sent."""
        ...

    async def aclose(self) -> None:
        """Let the blob go (also after the last part)."""
        ...


class ReceivingBlob(ABC):
    """A blob the node's runtime is receiving right now, served to peers as it arrives.

    A runtime that fetches a blob holds its start on disk long before it holds the blob, so
    the nodes behind it in a rollout can take it from there (the swarm) instead of all from the
    first holder. The runtime verifies the digest before it commits: a reader gets the last
    byte only after that, so a peer never completes a blob nobody verified.
    """

    size: int

    @property
    def committed(self) -> bool:
        """Whether the runtime verified and committed it already: nothing more arrives, and
        it depends on no source (it is served as held)."""
        return False

    @abstractmethod
    def received(self) -> int:
        """The bytes on disk now (from the start)."""

    @abstractmethod
    def reader(self, offset: int, length: int) -> PartReader:
        """`length` bytes from `offset` as they arrive; closing the reader closes this blob."""

    @abstractmethod
    async def close(self) -> None: ...


class Store(ABC):
    """What this node holds. Backends only ever touch content named by a validated digest."""

    #: Short backend name, used in logs and metrics.
    name: str

    async def start(self) -> None:
        """Connect and check the backend; raises `StoreUnavailable` when it cannot be used."""
        return None

    async def close(self) -> None:
        """Release connections and files."""
        return None

    async def ready(self) -> bool:
        """Whether the backend answers now (for /readyz)."""
        return True

    @abstractmethod
    async def resolve(self, ref: TagRef) -> Digest | None:
        """The digest `ref` points to, or None when this store does not hold that tag.

        A tag held but pointing at an unusable digest is None too (and logged).
        """

    @abstractmethod
    async def stat(self, digest: Digest) -> int | None:
        """The size of a blob this store really holds (for this node), or None.

        Content that vanished (collected, removed) is None, never an error.
        """

    async def stat_many(self, digests: Collection[Digest]) -> dict[Digest, int]:
        """`stat` of each of `digests`, the held ones by their size: one at a time here, for a
        store that answers each as cheaply; one whose every question is a round trip to its
        backend asks about them all at once."""
        sizes: dict[Digest, int] = {}
        for digest in digests:
            size = await self.stat(digest)
            if size is not None:
                sizes[digest] = size
        return sizes

    @abstractmethod
    async def open(self, digest: Digest) -> BlobSource | None:
        """The blob's bytes, or None when it is not held."""

    @abstractmethod
    async def images(self) -> list[ImageEntry]:
        """Every tagged image held, for advertising and inspection.

        Tags pointing at an unusable digest are left out.
        """

    #: Whether `receiving` can show the blobs the runtime is still receiving. A node whose
    #: store cannot announces itself a provider only once the runtime holds a blob.
    shows_receiving: bool = False

    async def receiving(self, digest: Digest) -> ReceivingBlob | None:
        """The blob as the runtime receives it now (containerd's ingest), or None."""
        return None

    async def loose_digests(self) -> list[str]:
        """Digests held outside any tagged image (a cache's), announced like the rest."""
        return []

    async def changes(self) -> AsyncIterator[None]:
        """Yields whenever what the store holds may have changed (to advertise or withdraw).

        The default never yields: such a store is only rescanned periodically.
        """
        await asyncio.Event().wait()
        yield
