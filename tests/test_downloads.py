"""Downloads on one node: one fetch, many readers, nothing unverified handed out."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.content.downloads import Download, DownloadFailed, Downloads, Source
from mirror.oci.reference import parse_digest
from mirror.stores.cache import CacheStore

DATA = bytes(range(256)) * 8192  # 2 MiB
DIGEST = parse_digest("sha256:" + hashlib.sha256(DATA).hexdigest())


class Trickle:
    """An origin that sends a chunk each time the test lets it (no timing involved)."""

    def __init__(self, data: bytes, chunk: int = 256 * 1024, fail_at: int | None = None) -> None:
        self.data = data
        self.chunk = chunk
        self.fail_at = fail_at
        self.gate = asyncio.Semaphore(0)
        self.opened = 0

    async def open(self) -> Source:
        self.opened += 1
        return Source(len(self.data), self._chunks(), self._close)

    async def _chunks(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), self.chunk):
            await self.gate.acquire()
            if self.fail_at is not None and start >= self.fail_at:
                raise ConnectionResetError("origin dropped the connection")
            yield self.data[start : start + self.chunk]

    async def _close(self) -> None:
        return None

    def release_all(self) -> None:
        for _ in range(len(self.data) // self.chunk + 2):
            self.gate.release()


@pytest.fixture
async def cache(tmp_path: Path) -> CacheStore:
    store = CacheStore(tmp_path / "cache")
    await store.start()
    return store


async def collect(download: Download, offset: int = 0, length: int = len(DATA)) -> bytes:
    return b"".join([chunk async for chunk in download.read(offset, length)])


async def test_readers_share_one_fetch_and_see_identical_bytes(cache: CacheStore) -> None:
    downloads = Downloads(cache)
    origin = Trickle(DATA)
    download, created = downloads.reserve(DIGEST)
    assert created
    downloads.begin(download, origin.open)
    again, created_again = downloads.reserve(DIGEST)
    assert again is download and not created_again
    readers = [asyncio.ensure_future(collect(download)) for _ in range(3)]
    ranged = asyncio.ensure_future(collect(download, 1000, 5000))
    origin.release_all()
    results = await asyncio.wait_for(asyncio.gather(*readers, ranged), 10)
    assert results[:3] == [DATA] * 3 and results[3] == DATA[1000:6000]
    assert origin.opened == 1
    assert await cache.stat(DIGEST) == len(DATA)
    assert downloads.get(DIGEST) is None


async def test_the_last_byte_waits_for_the_digest(cache: CacheStore) -> None:
    downloads = Downloads(cache)
    origin = Trickle(DATA, chunk=len(DATA))
    download, _ = downloads.reserve(DIGEST)
    downloads.begin(download, origin.open)
    reader = download.read(0, len(DATA))
    origin.gate.release()
    received = bytearray()
    async for chunk in reader:
        received += chunk
    assert bytes(received) == DATA
    assert download.finished.done() and download.finished.result() is True


async def test_wrong_bytes_fail_every_reader_and_leave_nothing(cache: CacheStore) -> None:
    downloads = Downloads(cache)
    origin = Trickle(DATA[:-1] + b"\x00")
    download, _ = downloads.reserve(DIGEST)
    downloads.begin(download, origin.open)
    reader = asyncio.ensure_future(collect(download))
    origin.release_all()
    with pytest.raises(DownloadFailed):
        await asyncio.wait_for(reader, 10)
    assert await cache.stat(DIGEST) is None
    assert list((cache.root / "tmp").iterdir()) == []


async def test_a_dropped_origin_fails_readers(cache: CacheStore) -> None:
    downloads = Downloads(cache)
    origin = Trickle(DATA, fail_at=len(DATA) // 2)
    download, _ = downloads.reserve(DIGEST)
    downloads.begin(download, origin.open)
    reader = asyncio.ensure_future(collect(download))
    origin.release_all()
    with pytest.raises(DownloadFailed):
        await asyncio.wait_for(reader, 10)
    assert await cache.stat(DIGEST) is None


async def test_missing_upstream_and_abandoned_reservations(cache: CacheStore) -> None:
    downloads = Downloads(cache)

    async def nothing() -> Source | None:
        return None

    download, _ = downloads.reserve(DIGEST)
    downloads.begin(download, nothing)
    assert await asyncio.wait_for(download.wait_started(), 5) is None
    reserved, _ = downloads.reserve(parse_digest("sha256:" + "1" * 64))
    waiter = asyncio.ensure_future(reserved.wait_started())
    downloads.abandon(reserved, "another node fetches it")
    with pytest.raises(DownloadFailed, match="another node"):
        await asyncio.wait_for(waiter, 5)
