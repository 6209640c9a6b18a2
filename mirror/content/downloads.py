"""Blob downloads in progress on this node, followed by any number of readers as they grow.

A download writes into the node cache's temp file and is not tied to the request that started
it: if that client goes away, the download goes on for the others (and for the cache). Readers,
local clients and peers alike, read the temp file through one shared descriptor with `pread`,
waiting for bytes that have not arrived yet, so memory stays flat however many follow it. The
last byte is only handed out once the whole blob matched its digest; if it did not, or the
upstream stream broke, every reader fails and its client's connection is cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from mirror.errors import MirrorError, StoreUnavailable
from mirror.oci.reference import Digest
from mirror.stores.cache import BlobWriter, CacheStore

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024


class DownloadFailed(StoreUnavailable):
    """The download a reader was following did not complete with the right bytes."""


class DownloadAbandoned(DownloadFailed):
    """The reservation a reader joined was given up: another node fetches the blob."""


@dataclass(frozen=True, slots=True)
class Source:
    """An opened origin of a blob: its size and its bytes from the start."""

    size: int
    chunks: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]


Opener = Callable[[], Awaitable[Source | None]]


class Download:
    """One blob being fetched into the cache. Reserved first, then begun or abandoned.

    Reserving before asking the cluster who should fetch closes a race: a peer asking this
    node for the blob while the claim is being decided waits instead of missing it.
    """

    def __init__(self, digest: Digest, cache: CacheStore) -> None:
        self.digest = digest
        self._cache = cache
        self._started = asyncio.Event()  # size known and temp file open, or failed
        self._progress = asyncio.Condition()
        self._fd: int | None = None
        self._readers = 0
        self.size: int | None = None
        self.written = 0
        self.finished: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None

    async def run(self, opener: Opener) -> None:
        """Fetch and publish; `finished` is True when committed, False when the origin lacks it."""
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
            self._started.set()
            async with self._progress:
                self._progress.notify_all()
            self._release_fd()

    async def _copy(self, source: Source) -> None:
        async with self._cache.writer(self.digest, source.size) as writer:
            self._fd = await asyncio.to_thread(os.open, writer.temp_path, os.O_RDONLY)
            self.size = source.size
            self._started.set()
            async for chunk in source.chunks:
                await writer.write(chunk)
                await self._advance(writer)
            await writer.commit()

    async def _advance(self, writer: BlobWriter) -> None:
        async with self._progress:
            self.written = writer.written
            self._progress.notify_all()

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

    async def wait_started(self) -> int | None:
        """The blob's size once the origin answered; None if the origin does not have it."""
        await self._started.wait()
        if self.finished.done():
            if self.finished.exception() is not None:
                raise self.finished.exception()  # type: ignore[misc]
            if not self.finished.result():
                return None
        return self.size

    async def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        """Bytes [offset, offset+length) as they arrive; the final byte only once verified."""
        size = await self.wait_started()
        if size is None:
            raise DownloadFailed(f"{self.digest} is not available upstream")
        fd = os.dup(self._fd) if self._fd is not None else await self._open_published()
        try:
            position, end = offset, offset + length
            while position < end:
                available = await self._available(position, size)
                count = min(_CHUNK, end - position, available - position)
                chunk = await asyncio.to_thread(os.pread, fd, count, position)
                if not chunk:
                    raise DownloadFailed(f"{self.digest}: temp file ended at {position}")
                position += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    async def _open_published(self) -> int:
        """The download finished between a reader finding it and starting to read."""
        if not (
            self.finished.done() and self.finished.exception() is None and self.finished.result()
        ):
            raise DownloadFailed(f"download of {self.digest} is no longer readable")
        try:
            return await asyncio.to_thread(os.open, self._cache.blob_path(self.digest), os.O_RDONLY)
        except OSError as exc:
            raise DownloadFailed(f"{self.digest} left the cache: {exc}") from exc

    async def _available(self, position: int, size: int) -> int:
        """How far a reader at `position` may read: written bytes, all of them once verified."""
        async with self._progress:
            while True:
                if self.finished.done():
                    if self.finished.exception() is not None:
                        raise self.finished.exception()  # type: ignore[misc]
                    return size
                # Hold back the last byte until the digest is checked.
                limit = min(self.written, size - 1)
                if limit > position:
                    return limit
                await self._progress.wait()

    def _release_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class Downloads:
    """At most one download per digest on this node; later requests join the running one."""

    def __init__(self, cache: CacheStore) -> None:
        self._cache = cache
        self._running: dict[str, Download] = {}

    def get(self, digest: Digest) -> Download | None:
        return self._running.get(str(digest))

    def reserve(self, digest: Digest) -> tuple[Download, bool]:
        """The download of `digest` under way, or a new reserved one (True: this call made it)."""
        existing = self._running.get(str(digest))
        if existing is not None:
            return existing, False
        download = Download(digest, self._cache)
        self._running[str(digest)] = download
        return download, True

    def begin(self, download: Download, opener: Opener) -> None:
        download.task = asyncio.create_task(
            self._run(download, opener), name=f"download {download.digest}"
        )

    def abandon(self, download: Download, reason: str) -> None:
        """Give a reservation up (another node fetches it); its waiters fail over."""
        download._finish(DownloadAbandoned(reason))
        download._started.set()
        if self._running.get(str(download.digest)) is download:
            del self._running[str(download.digest)]

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
