"""A blob the node cache cannot hold still reaches its clients: streamed through, not kept.

Over `--cache-size`, or on a disk too small for it (a real tmpfs, mounted here as root), a blob
is never written, or stops being written where the disk filled, and the rest goes to its
readers from a bounded window in memory; least recently used blobs are evicted first when that
is enough. Nothing wrong is ever handed out: the digest is checked before the last byte, and a
reader that comes too late for the window fails at once. The unit tests drive the content
service and downloads without sockets (in-memory upstream and router); the last one runs a real
`mirror run` node on a 24 MiB tmpfs with a real distribution registry upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness.memory_sources import MemoryUpstream, digest_of
from harness.mirror_node import start_mirror
from harness.registry import Registry

from mirror.content.downloads import Download, DownloadFailed, Downloads, Source
from mirror.content.service import BlobAnswer, ContentPolicy, ContentService
from mirror.errors import StoreUnavailable
from mirror.metrics import SOURCE_UPSTREAM, Metrics
from mirror.oci.reference import Digest, parse_digest
from mirror.peers.receiver import SinkSlot
from mirror.ranges import RangeRequest
from mirror.request import Caller, Kind, Target
from mirror.routing.memory import MemoryCluster, MemoryRouter
from mirror.stores.cache import BlobWriter, CacheStore

MiB = 1024 * 1024
CHUNK = 256 * 1024
REGISTRY = "registry.test"
REPOSITORY = "team/app"
POLICY = ContentPolicy(mirrored_registries=None, resolve_tags=True, tag_timeout=1.0)


def blob_of(size: int, seed: int = 0) -> tuple[bytes, Digest]:
    """`size` bytes no two chunks of which are alike (a misplaced chunk changes the digest)."""
    data = b"".join(
        hashlib.sha256(f"{seed}:{block}".encode()).digest() * 1024
        for block in range(size // 32768 + 1)
    )[:size]
    return data, parse_digest(digest_of(data))


BIG, BIG_DIGEST = blob_of(8 * MiB + 12345)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def tmp_files(cache: CacheStore) -> list[Path]:
    return list((cache.root / "tmp").iterdir())


# --- through the content service --------------------------------------------------------------


@dataclass
class Node:
    service: ContentService
    cache: CacheStore
    router: MemoryRouter
    upstream: MemoryUpstream
    metrics: Metrics


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    """A node whose cache is bounded to 1 MiB, far below BIG; upstream sends 256 KiB chunks."""
    metrics = Metrics()
    cache = CacheStore(tmp_path / "cache", max_bytes=MiB, metrics=metrics)
    await cache.start()
    router = MemoryCluster().router(b"n" * 20, "10.0.0.1:5000")
    upstream = MemoryUpstream(chunk=CHUNK)
    upstream.blobs[str(BIG_DIGEST)] = BIG
    service = ContentService(cache, metrics, POLICY, cache=cache, router=router, upstream=upstream)
    yield Node(service, cache, router, upstream, metrics)
    await service.close()
    await cache.close()


def blob_target() -> Target:
    return Target(Kind.BLOB, REGISTRY, REPOSITORY, None, BIG_DIGEST)


async def ask(node: Node, requested: RangeRequest | None = None) -> BlobAnswer:
    return await node.service.blob(blob_target(), Caller.RUNTIME, requested, head=False)


async def body(answer: BlobAnswer) -> bytes:
    try:
        assert answer.local is None and answer.chunks is not None
        return b"".join([chunk async for chunk in answer.chunks])
    finally:
        await answer.close()


async def test_a_blob_over_the_bound_reaches_two_concurrent_readers_and_is_not_kept(
    node: Node,
) -> None:
    # Upstream holds the second half back until both requests are in.
    node.upstream.gate = asyncio.Event()
    first = await ask(node)
    second = await ask(node)
    node.upstream.gate.set()
    bodies = await asyncio.wait_for(asyncio.gather(body(first), body(second)), 20)
    assert bodies == [BIG, BIG]
    assert first.source == second.source == SOURCE_UPSTREAM
    assert node.upstream.count("blob", str(BIG_DIGEST)) == 1
    await asyncio.gather(*node.service._background)  # the announcement, then its withdrawal
    # Nothing kept, nothing left behind, and said so.
    assert not node.cache.holds(BIG_DIGEST) and await node.cache.stat(BIG_DIGEST) is None
    assert tmp_files(node.cache) == [] and node.cache.total_bytes == 0
    assert sample(node.metrics, "mirror_cache_passthrough_total", reason="over-bound") == 1
    assert sample(node.metrics, "mirror_cache_passthrough_bytes_total", reason="over-bound") == (
        len(BIG)
    )
    # Not held, so not announced, and the claim is free for whichever node asks next.
    key = str(BIG_DIGEST)
    assert ("provide", key) in node.router.calls and ("withdraw", key) in node.router.calls
    assert key not in node.router.announced()
    assert node.router.cluster.holder(key) is None
    # The next pull streams it through again, just as well.
    assert await body(await ask(node)) == BIG
    assert node.upstream.count("blob", str(BIG_DIGEST)) == 2


async def test_a_reader_too_late_for_the_window_fails_cleanly_and_never_gets_bytes(
    node: Node,
) -> None:
    early = await ask(node)
    assert early.chunks is not None
    received = bytearray()
    # Past the 4 MiB window: the first bytes went through to `early` and are gone.
    while len(received) < 6 * MiB:
        received += await early.chunks.__anext__()
    with pytest.raises(StoreUnavailable, match="streamed through"):  # a 503 on the wire
        await ask(node)
    # A resume from where the window still is, is served from it.
    resumed = await ask(node, RangeRequest(len(received)))
    tails = await asyncio.wait_for(asyncio.gather(body(early), body(resumed)), 20)
    assert bytes(received) + tails[0] == BIG
    assert tails[1] == BIG[len(received) :]
    assert node.upstream.count("blob", str(BIG_DIGEST)) == 1


# --- on a real disk that is too small ---------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path`, unmounted afterwards whatever happened."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a {size} tmpfs (run the tests as root): {mounted.stderr}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", "8m") as path:
        yield path


class Origin:
    """An origin that sends a chunk each time the test lets it."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.gate = asyncio.Semaphore(0)

    async def open(self) -> Source:
        return Source(len(self.data), self._chunks(), self._close)

    async def _chunks(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), CHUNK):
            await self.gate.acquire()
            yield self.data[start : start + CHUNK]

    async def _close(self) -> None:
        return None

    def release(self, chunks: int | None = None) -> None:
        for _ in range(chunks or len(self.data) // CHUNK + 2):
            self.gate.release()


class ThreadWrittenOrigin(Origin):
    """A verified peer stream whose receiving thread writes into the cache itself, as
    peers/receiver.py does: each piece offered to the sink on a worker thread, what the sink
    does not take (not its turn, or its file full) passed on as bytes."""

    async def open(self) -> Source:
        self.slot = SinkSlot()
        return Source(len(self.data), self._offered(), self._close, verified=True, sink=self.slot)

    async def _offered(self) -> AsyncIterator[bytes]:
        offset = 0
        for start in range(0, len(self.data), CHUNK):
            await self.gate.acquire()
            piece = self.data[start : start + CHUNK]
            sink, taken = self.slot.target, 0
            if sink is not None:
                written = await asyncio.to_thread(sink, memoryview(piece), offset)
                taken = written or 0
            if taken < len(piece):
                yield piece[taken:]
            offset += len(piece)


async def rest(reader: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in reader])


async def fetched_whole(cache: CacheStore, origin: Origin, digest: Digest) -> Download:
    """`origin`'s blob downloaded into `cache` with one reader, which got every byte."""
    downloads = Downloads(cache)
    download, _ = downloads.reserve(digest)
    downloads.begin(download, origin.open)
    reader = download.read(0, len(origin.data))
    origin.release()
    assert await asyncio.wait_for(rest(reader), 20) == origin.data
    assert download.task is not None
    await download.task
    return download


async def started_cache(root: Path, metrics: Metrics) -> CacheStore:
    cache = CacheStore(root, metrics=metrics)
    await cache.start()
    return cache


@pytest.mark.parametrize(
    "origin_kind",
    # The bytes come through the event loop, or a receiving thread writes them (the sink).
    [Origin, ThreadWrittenOrigin],
)
async def test_a_disk_that_fills_mid_blob_streams_the_rest_through(
    small_disk: Path, origin_kind: type[Origin]
) -> None:
    metrics = Metrics()
    cache = await started_cache(small_disk / "cache", metrics)
    data, digest = blob_of(6 * MiB, seed=1)
    downloads = Downloads(cache, window=MiB)
    origin = origin_kind(data)
    download, _ = downloads.reserve(digest)
    downloads.begin(download, origin.open)
    first, second = download.read(0, len(data)), download.read(0, len(data))
    origin.release(1)
    head = await first.__anext__()  # the first chunk is in the temp file now
    # Something else takes the disk: 2 MiB of the blob still fit, then nothing.
    filler = small_disk / "filler"
    filler.write_bytes(bytes(shutil.disk_usage(small_disk).free - 2 * MiB))
    origin.release()
    results = await asyncio.wait_for(asyncio.gather(rest(first), rest(second)), 20)
    assert [head + results[0], results[1]] == [data, data]
    assert download.task is not None
    await download.task
    assert download.passthrough == "no-space" and not download.kept
    assert 2 * MiB <= download.on_disk < len(data)  # written up to where the disk filled
    assert await cache.stat(digest) is None and tmp_files(cache) == []
    assert sample(metrics, "mirror_cache_passthrough_total", reason="no-space") == 1
    # The temp file's space is given back: only the filler takes room.
    assert shutil.disk_usage(small_disk).used - filler.stat().st_size < 64 * 1024


async def test_a_write_error_on_the_receiving_thread_sends_the_bytes_through_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error writing on the receiving thread is this node's, not the peer's: the sink
    stops taking, the bytes come through the loop (whose own write would meet a lasting error
    and fail the download), and nothing is lost."""

    def failing(self: BlobWriter, view: memoryview, offset: int) -> int | None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(BlobWriter, "write_at", failing)
    cache = await started_cache(tmp_path / "cache", Metrics())
    data, digest = blob_of(2 * MiB, seed=4)
    download = await fetched_whole(cache, ThreadWrittenOrigin(data), digest)
    assert download.kept and await cache.stat(digest) == len(data)


async def test_a_disk_that_fills_mid_blob_evicts_what_is_not_open_and_keeps_the_blob(
    small_disk: Path,
) -> None:
    metrics = Metrics()
    cache = await started_cache(small_disk / "cache", metrics)
    data, digest = blob_of(4 * MiB, seed=2)
    downloads = Downloads(cache)
    origin = Origin(data)
    download, _ = downloads.reserve(digest)
    downloads.begin(download, origin.open)
    reader = download.read(0, len(data))
    origin.release(1)
    head = await reader.__anext__()
    # Meanwhile two other blobs were cached; the older one is being read, so it must stay.
    (old, old_digest), (recent, recent_digest) = blob_of(3 * MiB, 3), blob_of(2 * MiB, 4)
    await cache.put(old_digest, old)
    await cache.put(recent_digest, recent)
    pinned = await cache.open(old_digest)
    assert pinned is not None
    origin.release()
    assert head + await asyncio.wait_for(rest(reader), 20) == data
    assert download.task is not None
    await download.task
    assert download.kept and download.passthrough is None
    assert cache.holds(digest) and cache.holds(old_digest) and not cache.holds(recent_digest)
    assert sample(metrics, "mirror_cache_evictions_total") == 1
    assert sample(metrics, "mirror_cache_passthrough_total", reason="no-space") == 0
    await pinned.close()


async def test_a_blob_that_fits_once_old_blobs_are_evicted_evicts_them_first(
    small_disk: Path,
) -> None:
    metrics = Metrics()
    cache = await started_cache(small_disk / "cache", metrics)
    (first, first_digest), (second, second_digest) = blob_of(3 * MiB, 5), blob_of(3 * MiB, 6)
    await cache.put(first_digest, first)
    await cache.put(second_digest, second)
    data, digest = blob_of(4 * MiB, seed=7)
    download = await fetched_whole(cache, Origin(data), digest)
    assert download.kept
    assert cache.holds(digest) and cache.holds(second_digest) and not cache.holds(first_digest)
    assert sample(metrics, "mirror_cache_passthrough_total", reason="no-space") == 0


async def test_a_blob_larger_than_the_disk_is_never_written(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    cache = await started_cache(small_disk / "cache", metrics)
    data, digest = blob_of(12 * MiB, seed=8)
    downloads = Downloads(cache)
    origin = Origin(data)
    download, _ = downloads.reserve(digest)
    downloads.begin(download, origin.open)
    reader = download.read(0, len(data))
    origin.release(1)
    head = await reader.__anext__()
    assert tmp_files(cache) == [] and shutil.disk_usage(small_disk).used < 64 * 1024
    origin.release()
    assert head + await asyncio.wait_for(rest(reader), 20) == data
    assert sample(metrics, "mirror_cache_passthrough_total", reason="no-space") == 1
    assert sample(metrics, "mirror_cache_passthrough_bytes_total", reason="no-space") == len(data)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("not keeping")]
    assert lines == [
        f"not keeping {digest} (12 MiB): the cache's disk cannot hold it (8 MiB free, "
        "0 B evictable); streaming it through"
    ]


async def test_a_late_reader_of_a_blob_partly_on_disk_fails_cleanly(small_disk: Path) -> None:
    """Bytes on disk stay readable; the ones that went through memory and left do not."""
    cache = await started_cache(small_disk / "cache", Metrics())
    data, digest = blob_of(6 * MiB, seed=9)
    downloads = Downloads(cache, window=MiB)
    origin = Origin(data)
    download, _ = downloads.reserve(digest)
    downloads.begin(download, origin.open)
    early = download.read(0, len(data))
    origin.release(1)
    received = bytearray(await early.__anext__())
    filler = small_disk / "filler"
    filler.write_bytes(bytes(shutil.disk_usage(small_disk).free - MiB))
    origin.release()
    while len(received) < 4 * MiB:  # past the disk's part and a whole window beyond
        received += await early.__anext__()
    on_disk = download.on_disk
    assert download.passthrough == "no-space" and on_disk <= 2 * MiB
    with pytest.raises(DownloadFailed, match="streamed through"):
        download.read(0, len(data))
    # A range that lies wholly in the temp file is still served from it.
    from_disk = download.read(0, on_disk)
    tails = await asyncio.wait_for(asyncio.gather(rest(early), rest(from_disk)), 20)
    assert bytes(received) + tails[0] == data
    assert tails[1] == data[:on_disk]


# --- a real node, a real registry, a real small disk ------------------------------------------


def push_blob(registry: Registry, repository: str, data: bytes) -> str:
    """Upload `data` as a blob of `repository` (a monolithic upload) and return its digest."""
    digest = digest_of(data)
    start = urllib.request.Request(
        f"{registry.url}/v2/{repository}/blobs/uploads/", data=b"", method="POST"
    )
    with urllib.request.urlopen(start, timeout=30) as response:
        location = urllib.parse.urljoin(registry.url, response.headers["Location"])
    separator = "&" if "?" in location else "?"
    upload = urllib.request.Request(
        f"{location}{separator}digest={digest}",
        data=data,
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(upload, timeout=60) as response:
        assert response.status == 201
    return digest


def peak_rss(pid: int) -> int:
    """The peak resident memory of a process so far, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.mark.parametrize(
    ("reason", "flags"),
    [("over-bound", []), ("no-space", ["--cache-size=1GiB"])],
    ids=["default-bound", "bound-larger-than-the-disk"],
)
def test_a_layer_larger_than_the_node_cache_disk_is_pulled_through_a_node_twice(
    tmp_path: Path, registry: Registry, reason: str, flags: list[str]
) -> None:
    layer = subprocess.run(
        ["head", "-c", str(64 * MiB), "/dev/urandom"], capture_output=True, check=True
    ).stdout
    digest = push_blob(registry, "team/big", layer)
    registry.clear_access_log()
    base = tmp_path / "node"
    with tmpfs(base / "cache", "24m") as cache_dir:
        node = start_mirror(
            base, "--store=cache", f"--upstream={registry.host}=http://{registry.host}", *flags
        )
        try:
            pid = node.process.pid
            assert pid is not None
            before = peak_rss(pid)
            ns = urllib.parse.quote(registry.host, safe="")
            url = f"{node.url}/v2/team/big/blobs/{digest}?ns={ns}"
            for _ in range(2):
                hasher, length = hashlib.sha256(), 0
                with urllib.request.urlopen(url, timeout=60) as response:
                    assert response.status == 200
                    while chunk := response.read(MiB):
                        hasher.update(chunk)
                        length += len(chunk)
                assert (length, f"sha256:{hasher.hexdigest()}") == (len(layer), digest)
                assert list((cache_dir / "tmp").iterdir()) == []
            # Flat in memory: nowhere near a whole layer held at once.
            assert peak_rss(pid) - before < 32 * MiB
            assert node.metric("mirror_cache_passthrough_total", reason=reason) == 2
            assert node.metric("mirror_cache_bytes") == 0
            assert registry.blob_fetch_count(digest) == 2
            assert node.process.log_text().count(f"not keeping {digest} (64 MiB): ") == 2
        finally:
            node.stop()
