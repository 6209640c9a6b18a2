"""Downloads on one node: one fetch, many readers, nothing unverified handed out."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.content import downloads as downloads_module
from mirror.content.downloads import Download, DownloadFailed, Downloads, Source
from mirror.errors import DigestMismatch
from mirror.metrics import Metrics
from mirror.oci.reference import Digest, parse_digest
from mirror.stores.cache import CacheStore

DATA = bytes(range(256)) * 8192  # 2 MiB
DIGEST = parse_digest("sha256:" + hashlib.sha256(DATA).hexdigest())


class Trickle:
    """An origin that sends a chunk each time the test lets it (no timing involved).

    `checks`: the digest the origin checks its bytes against itself, as the peer fetcher does
    (`Source.verified`): it raises instead of sending its last chunk when they do not match.
    """

    def __init__(
        self,
        data: bytes,
        chunk: int = 256 * 1024,
        fail_at: int | None = None,
        *,
        checks: Digest | None = None,
    ) -> None:
        self.data = data
        self.chunk = chunk
        self.fail_at = fail_at
        self.checks = checks
        self.gate = asyncio.Semaphore(0)
        self.opened = 0
        self.sent = 0  # bytes handed to the download so far

    async def open(self) -> Source:
        self.opened += 1
        return Source(len(self.data), self._chunks(), self._close, verified=bool(self.checks))

    async def _chunks(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), self.chunk):
            await self.gate.acquire()
            if self.fail_at is not None and start >= self.fail_at:
                raise ConnectionResetError("origin dropped the connection")
            last = start + self.chunk >= len(self.data)
            if last and self.checks and hashlib.sha256(self.data).hexdigest() != self.checks.hex:
                raise DigestMismatch(f"peers sent bytes that do not hash to {self.checks}")
            piece = self.data[start : start + self.chunk]
            self.sent += len(piece)
            yield piece

    async def _close(self) -> None:
        return None

    def release_all(self) -> None:
        for _ in range(len(self.data) // self.chunk + 2):
            self.gate.release()


class CountingHashlib:
    """Stands for `hashlib` in the modules under test: counts the hashes they start."""

    def __init__(self) -> None:
        self.started = 0

    def new(self, name: str) -> hashlib._Hash:
        self.started += 1
        return hashlib.new(name)


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> CountingHashlib:
    counting = CountingHashlib()
    monkeypatch.setattr("mirror.stores.cache.hashlib", counting)
    monkeypatch.setattr("mirror.content.downloads.hashlib", counting)
    return counting


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


@pytest.mark.parametrize("verified", [False, True])
async def test_bytes_an_origin_verified_are_not_hashed_again(
    cache: CacheStore, hashes: CountingHashlib, verified: bool
) -> None:
    """A peer's stream is hashed by the peer fetcher, which holds its last chunk back until it
    matches: hashing it again here would only double the CPU a blob costs."""
    downloads = Downloads(cache)
    origin = Trickle(DATA, checks=DIGEST if verified else None)
    download, _ = downloads.reserve(DIGEST)
    downloads.begin(download, origin.open)
    reader = asyncio.ensure_future(collect(download))
    origin.release_all()
    assert await asyncio.wait_for(reader, 10) == DATA
    assert download.kept and await cache.stat(DIGEST) == len(DATA)
    assert hashes.started == (0 if verified else 1)


async def test_a_verified_origin_that_does_not_match_publishes_nothing(cache: CacheStore) -> None:
    downloads = Downloads(cache)
    origin = Trickle(DATA[:-1] + b"\x00", checks=DIGEST)
    download, _ = downloads.reserve(DIGEST)
    downloads.begin(download, origin.open)
    reader = download.read(0, len(DATA))
    origin.release_all()
    received = bytearray()
    with pytest.raises(DownloadFailed, match="do not hash"):
        async for chunk in reader:
            received += chunk
    assert len(received) < len(DATA)
    assert not download.kept and await cache.stat(DIGEST) is None
    assert list((cache.root / "tmp").iterdir()) == []


async def test_a_long_download_is_flushed_to_disk_as_it_arrives(
    cache: CacheStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """So the fsync that publishing waits for, and the last byte with it, finds little left."""
    monkeypatch.setattr(downloads_module, "_FLUSH_EVERY", len(DATA) // 4)
    flushed: list[int] = []
    monkeypatch.setattr(downloads_module.os, "fdatasync", flushed.append)
    downloads = Downloads(cache)
    origin = Trickle(DATA, chunk=len(DATA) // 8)
    download, _ = downloads.reserve(DIGEST)
    downloads.begin(download, origin.open)
    reader = asyncio.ensure_future(collect(download))
    origin.release_all()
    assert await asyncio.wait_for(reader, 10) == DATA
    assert flushed and await cache.stat(DIGEST) == len(DATA)


async def test_a_reader_of_a_finished_download_gets_chunks_of_bounded_size(
    cache: CacheStore,
) -> None:
    downloads = Downloads(cache)
    origin = Trickle(DATA, chunk=len(DATA))
    download, _ = downloads.reserve(DIGEST)
    downloads.begin(download, origin.open)
    origin.release_all()
    assert await asyncio.wait_for(download.finished, 10) is True
    chunks = [chunk async for chunk in download.read(0, len(DATA))]
    assert b"".join(chunks) == DATA
    assert max(map(len, chunks)) <= 1024 * 1024


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


# --- streaming through a blob the cache cannot keep -------------------------------------------

BIG = bytes(range(251)) * (8 * 1024 * 1024 // 251 + 1)  # ~8 MiB, not a multiple of a chunk
BIG_DIGEST = parse_digest("sha256:" + hashlib.sha256(BIG).hexdigest())
WINDOW = 1024 * 1024
CHUNK = 256 * 1024


@pytest.fixture
async def small_cache(tmp_path: Path) -> CacheStore:
    """A cache bounded far below BIG: BIG is never written to it."""
    store = CacheStore(tmp_path / "cache", max_bytes=len(BIG) // 4, metrics=Metrics())
    await store.start()
    return store


async def test_a_blob_over_the_bound_is_streamed_through_in_a_bounded_window(
    small_cache: CacheStore,
) -> None:
    downloads = Downloads(small_cache, window=WINDOW)
    origin = Trickle(BIG, chunk=CHUNK)
    download, _ = downloads.reserve(BIG_DIGEST)
    downloads.begin(download, origin.open)
    fast, slow = download.read(0, len(BIG)), download.read(0, len(BIG))
    origin.release_all()  # the origin may send everything at once: only the readers hold it
    highest = 0

    async def read_slowly() -> bytes:
        nonlocal highest
        received = bytearray()
        async for chunk in slow:
            received += chunk
            highest = max(highest, download.buffered)
            # The origin never runs ahead of the slowest reader by more than the window.
            assert origin.sent - len(received) <= WINDOW + CHUNK
            assert not list((small_cache.root / "tmp").iterdir())  # never written
            await asyncio.sleep(0)  # let the others run: this one is the slow one
        return bytes(received)

    async def read_fast() -> bytes:
        return b"".join([chunk async for chunk in fast])

    results = await asyncio.wait_for(asyncio.gather(read_fast(), read_slowly()), 10)
    assert results == [BIG, BIG]
    assert 0 < highest <= WINDOW
    assert download.passthrough == "over-bound" and not download.kept
    assert download.finished.result() is True and download.buffered == 0
    assert await small_cache.stat(BIG_DIGEST) is None
    metrics = small_cache._metrics
    assert metrics is not None
    sample = metrics.registry.get_sample_value
    assert sample("mirror_cache_passthrough_total", {"reason": "over-bound"}) == 1
    assert sample("mirror_cache_passthrough_bytes_total", {"reason": "over-bound"}) == len(BIG)


async def test_a_reader_too_late_for_the_window_fails_at_once_and_others_go_on(
    small_cache: CacheStore,
) -> None:
    downloads = Downloads(small_cache, window=WINDOW)
    origin = Trickle(BIG, chunk=CHUNK)
    download, _ = downloads.reserve(BIG_DIGEST)
    downloads.begin(download, origin.open)
    early = download.read(0, len(BIG))
    origin.release_all()
    received = bytearray()
    while len(received) < 3 * WINDOW:
        received += await early.__anext__()
    # Bytes 0.. went through to `early` and are neither on disk nor in memory any more.
    with pytest.raises(DownloadFailed, match="streamed through"):
        download.read(0, len(BIG))
    # A reader whose range is still in the window is served, from where `early` is.
    position = len(received)
    in_window = download.read(position, len(BIG) - position)

    async def rest(reader: AsyncIterator[bytes]) -> bytes:
        return b"".join([chunk async for chunk in reader])

    tails = await asyncio.wait_for(asyncio.gather(rest(early), rest(in_window)), 10)
    assert bytes(received) + tails[0] == BIG
    assert tails[1] == BIG[position:]


async def test_the_last_byte_of_a_stream_through_waits_for_the_digest(
    small_cache: CacheStore,
) -> None:
    downloads = Downloads(small_cache, window=WINDOW)
    wrong = BIG[:-1] + b"\x00"
    origin = Trickle(wrong, chunk=CHUNK)
    download, _ = downloads.reserve(BIG_DIGEST)
    downloads.begin(download, origin.open)
    reader = download.read(0, len(BIG))
    origin.release_all()
    received = bytearray()
    with pytest.raises(DownloadFailed, match="hashes to"):
        async for chunk in reader:
            received += chunk
    assert len(received) < len(BIG)  # never the last byte: the cut comes first
    assert list((small_cache.root / "tmp").iterdir()) == []


async def test_a_verified_stream_through_is_cut_before_its_last_byte_on_a_mismatch(
    small_cache: CacheStore, hashes: CountingHashlib
) -> None:
    downloads = Downloads(small_cache, window=WINDOW)
    origin = Trickle(BIG[:-1] + b"\x00", chunk=CHUNK, checks=BIG_DIGEST)
    download, _ = downloads.reserve(BIG_DIGEST)
    downloads.begin(download, origin.open)
    reader = download.read(0, len(BIG))
    origin.release_all()
    received = bytearray()
    with pytest.raises(DownloadFailed, match="do not hash"):
        async for chunk in reader:
            received += chunk
    assert len(received) < len(BIG) and download.passthrough == "over-bound"
    assert hashes.started == 0


async def test_a_reader_that_stops_reading_is_dropped_and_the_others_finish(
    small_cache: CacheStore,
) -> None:
    downloads = Downloads(small_cache, window=WINDOW, stall_seconds=0.05)
    origin = Trickle(BIG, chunk=CHUNK)
    download, _ = downloads.reserve(BIG_DIGEST)
    downloads.begin(download, origin.open)
    stuck, reading = download.read(0, len(BIG)), download.read(0, len(BIG))
    origin.release_all()
    assert await asyncio.wait_for(collect_all(reading), 10) == BIG
    with pytest.raises(DownloadFailed, match="fell behind"):
        await stuck.__anext__()


async def test_a_stream_through_nobody_reads_gives_up(small_cache: CacheStore) -> None:
    downloads = Downloads(small_cache, window=WINDOW, stall_seconds=0.05)
    origin = Trickle(BIG, chunk=CHUNK)
    download, _ = downloads.reserve(BIG_DIGEST)
    downloads.begin(download, origin.open)
    origin.release_all()
    with pytest.raises(DownloadFailed, match="nobody read it"):
        await asyncio.wait_for(download.finished, 10)
    assert origin.sent < len(BIG)  # it stopped taking bytes nobody wanted


async def test_a_reader_dropped_unread_does_not_hold_the_others(small_cache: CacheStore) -> None:
    """A request that failed before sending its body never closed its reader: the download
    lets it go when it is collected, without waiting for the stall timeout."""
    downloads = Downloads(small_cache, window=WINDOW)  # stalls would take 30 s: no timer here
    origin = Trickle(BIG, chunk=CHUNK)
    download, _ = downloads.reserve(BIG_DIGEST)
    downloads.begin(download, origin.open)
    reading = download.read(0, len(BIG))
    abandoned = download.read(0, len(BIG))
    del abandoned
    origin.release_all()
    assert await asyncio.wait_for(collect_all(reading), 10) == BIG


async def collect_all(reader: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in reader])


def resident_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache now, as util-linux's fincore counts them."""
    done = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip())


async def test_the_cache_copy_is_kept_on_disk_not_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages every reader is past are let go as the download is written back, and the rest
    once the last reader is done: the runtime keeps its own copy, so the cache's is for peers
    that come later, from disk."""
    # On a disk: tmpfs pages have nowhere to go (and some machines mount /tmp as tmpfs).
    fs_type = subprocess.run(
        ["findmnt", "--noheadings", "--output", "FSTYPE", "--target", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    root = tmp_path if fs_type != "tmpfs" else Path(__file__).parent.parent / ".pytest_cache"
    cache = CacheStore(Path(tempfile.mkdtemp(dir=root)) / "cache")
    await cache.start()
    monkeypatch.setattr(downloads_module, "_FLUSH_EVERY", len(DATA) // 4)
    downloads = Downloads(cache)
    chunk = len(DATA) // 8
    origin = Trickle(DATA, chunk=chunk)
    download, _ = downloads.reserve(DIGEST)
    downloads.begin(download, origin.open)
    reader = download.read(0, len(DATA))
    received = bytearray()
    # In lockstep: a chunk arrives, the reader reads it, the next one arrives.
    for arrived in range(1, 5):
        origin.gate.release()
        while len(received) < arrived * chunk:
            received += await reader.__anext__()
    temp = next((cache.root / "tmp").iterdir())
    assert download._flushing is not None
    await download._flushing
    assert resident_bytes(temp) < download.on_disk, "nothing read was let go"
    origin.release_all()
    async for piece in reader:
        received += piece
    assert bytes(received) == DATA
    assert download.task is not None
    await download.task
    assert download.kept and download._closing is not None
    await download._closing  # the last reader is done: pages let go, descriptor closed
    assert resident_bytes(cache.blob_path(DIGEST)) == 0, "the published copy is in memory"
    blob = await cache.open(DIGEST)  # still servable, from disk
    assert blob is not None and blob.size == len(DATA)
    await blob.close()
