"""The scrub: cached blobs re-hashed at a bounded rate, rotten ones evicted and withdrawn.

Corruption is made the way the disk (or a person) makes it: one byte of the published file
flipped behind the cache's back.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import pytest

from mirror.content.scrub import MIB, BlobChecker, Pacer, Scrubber
from mirror.metrics import Metrics
from mirror.oci.reference import Digest, parse_digest
from mirror.stores.cache import CacheStore


def digest_of(data: bytes) -> Digest:
    return parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


def flip_a_byte(cache: CacheStore, digest: Digest, at: int | None = None) -> None:
    path = cache.blob_path(digest)
    size = path.stat().st_size
    os.chmod(path, 0o644)
    with open(path, "r+b") as handle:
        handle.seek(size // 2 if at is None else at)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x01]))
    os.chmod(path, 0o444)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def cache(tmp_path: Path) -> CacheStore:
    store = CacheStore(tmp_path / "cache", metrics=Metrics())
    await store.start()
    return store


async def put(cache: CacheStore, size: int) -> tuple[bytes, Digest]:
    data = os.urandom(size)
    digest = digest_of(data)
    await cache.put(digest, data)
    return data, digest


async def test_a_pass_evicts_a_corrupt_blob_keeps_good_ones_and_tells_watchers(
    tmp_path: Path,
) -> None:
    metrics = Metrics()
    cache = CacheStore(tmp_path / "cache", metrics=metrics)
    await cache.start()
    _, good = await put(cache, 3 * MIB)
    _, bad = await put(cache, 5 * MIB + 17)
    flip_a_byte(cache, bad)
    changes = cache.changes()
    told = asyncio.ensure_future(anext(changes))
    scrubber = Scrubber(BlobChecker(cache, metrics), cache, rate=1024 * MIB)

    await scrubber.scrub_pass()

    assert cache.holds(good) and cache.blob_path(good).exists()
    assert not cache.holds(bad) and not cache.blob_path(bad).exists()
    assert await cache.stat(bad) is None and await cache.open(bad) is None
    assert bad not in [parse_digest(text) for text in await cache.loose_digests()]
    await asyncio.wait_for(told, 10)  # the advertiser re-syncs and withdraws it
    await changes.aclose()
    assert sample(metrics, "mirror_verified_blobs_total", source="scrub") == 2
    assert sample(metrics, "mirror_verified_bytes_total", source="scrub") == 8 * MIB + 17
    assert sample(metrics, "mirror_corrupt_blobs_total", source="scrub", action="evicted") == 1
    assert sample(metrics, "mirror_cache_bytes") == 3 * MIB
    assert list((cache.root / "tmp").iterdir()) == []


async def test_the_pacer_books_reads_at_the_rate_and_banks_no_idle_time() -> None:
    now = [100.0]
    pacer = Pacer(4 * MIB, clock=lambda: now[0])
    # Five 1 MiB reads asked at once: each may start when the ones before are paid for.
    assert [pacer.reserve(MIB) for _ in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    now[0] += 3600  # an idle hour earns nothing: the next burst is still one read
    assert [pacer.reserve(2 * MIB) for _ in range(2)] == [0.0, 0.5]


async def test_a_pass_sleeps_exactly_what_its_rate_asks(cache: CacheStore) -> None:
    """The scrub's own pacing, on a fake clock that advances only by what it sleeps."""
    now = [0.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    sizes = [3 * MIB, 5 * MIB, 9 * MIB + 1]
    for size in sizes:
        await put(cache, size)
    rate = 2 * MIB
    checker = BlobChecker(cache, Metrics(), sleep=fake_sleep)
    scrubber = Scrubber(checker, cache, rate=rate, clock=lambda: now[0])
    await scrubber.scrub_pass()
    total = sum(sizes)
    last_read = MIB + 1  # 9 MiB + 1 is read as 4 + 4 + (1 MiB + 1), the last booked unslept
    assert sum(slept) == pytest.approx((total - last_read) / rate)
    # Never ahead of the rate: by the time each read starts, the reads before it are paid for.
    assert all(seconds >= 0 for seconds in slept)


async def test_the_rate_holds_in_real_time(cache: CacheStore) -> None:
    for _ in range(2):
        await put(cache, 4 * MIB)
    rate = 16 * MIB
    scrubber = Scrubber(BlobChecker(cache, Metrics()), cache, rate=rate)
    started = time.monotonic()
    await scrubber.scrub_pass()
    # 8 MiB at 16 MiB/s: the first 4 MiB chunk goes at once, the second waits its turn.
    assert time.monotonic() - started >= (8 * MIB - 4 * MIB) / rate * 0.9


async def test_a_blob_being_written_is_never_hashed(tmp_path: Path) -> None:
    metrics = Metrics()
    cache = CacheStore(tmp_path / "cache", metrics=metrics)
    await cache.start()
    await put(cache, MIB)
    data = os.urandom(2 * MIB)
    digest = digest_of(data)
    scrubber = Scrubber(BlobChecker(cache, metrics), cache, rate=1024 * MIB)
    async with cache.writer(digest, len(data)) as writer:
        await writer.write(data[:MIB])
        await scrubber.scrub_pass()
        assert sample(metrics, "mirror_verified_bytes_total", source="scrub") == MIB
        await writer.write(data[MIB:])
        await writer.commit()
    assert cache.holds(digest)


async def test_blobs_opened_since_start_are_verified_first(tmp_path: Path) -> None:
    """A node serving a rotten blob to its own runtime finds out right after, not next pass."""
    metrics = Metrics()
    cache = CacheStore(tmp_path / "cache", metrics=metrics)
    await cache.start()
    _, older = await put(cache, MIB)
    _, served = await put(cache, 2 * MIB)
    flip_a_byte(cache, served, at=0)
    scrubber = Scrubber(BlobChecker(cache, metrics), cache, rate=1024 * MIB)

    blob = await cache.open(served)  # the runtime's pull: sendfile, no check on the way
    assert blob is not None
    await blob.close()
    await scrubber.verify_opened()

    assert not cache.holds(served)
    assert cache.holds(older)
    assert sample(metrics, "mirror_verified_blobs_total", source="scrub") == 1
    assert sample(metrics, "mirror_corrupt_blobs_total", source="scrub", action="evicted") == 1

    # Verified intact once in this run: opening it again does not queue another read.
    blob = await cache.open(older)
    assert blob is not None
    await blob.close()
    await scrubber.verify_opened()
    blob = await cache.open(older)
    assert blob is not None
    await blob.close()
    await scrubber.verify_opened()
    assert sample(metrics, "mirror_verified_blobs_total", source="scrub") == 2


async def test_a_blob_this_run_wrote_is_not_hashed_again_when_served(tmp_path: Path) -> None:
    """In a rollout each node serves what it just received and verified to the next one."""
    metrics = Metrics()
    cache = CacheStore(tmp_path / "cache", metrics=metrics)
    await cache.start()
    _, earlier = await put(cache, MIB)  # a blob of an earlier run, as far as the scrub knows
    scrubber = Scrubber(BlobChecker(cache, metrics), cache, rate=1024 * MIB)
    _, written = await put(cache, 2 * MIB)
    for digest in (written, earlier):
        blob = await cache.open(digest)
        assert blob is not None
        await blob.close()
    await scrubber.verify_opened()
    assert sample(metrics, "mirror_verified_bytes_total", source="scrub") == MIB
    # The daily pass still covers it.
    await scrubber.scrub_pass()
    assert sample(metrics, "mirror_verified_bytes_total", source="scrub") == 4 * MIB


async def test_eviction_never_removes_a_fresh_copy_published_meanwhile(cache: CacheStore) -> None:
    data, digest = await put(cache, MIB)
    # The checker holds the file it hashed open (so its inode number cannot be reused) while a
    # writer publishes a fresh, verified copy over it by rename.
    with open(cache.blob_path(digest), "rb") as hashed:
        stale = os.fstat(hashed.fileno())
        await cache.put(digest, data)
        assert not await cache.evict_corrupt(digest, (stale.st_dev, stale.st_ino))
    assert cache.holds(digest) and cache.blob_path(digest).read_bytes() == data
    fresh = cache.blob_path(digest).stat()
    assert await cache.evict_corrupt(digest, (fresh.st_dev, fresh.st_ino))
    assert not cache.holds(digest)


async def test_the_scrub_does_not_disturb_the_least_recently_used_order(
    cache: CacheStore,
) -> None:
    """Access times rebuild the LRU order at start; a scrub pass must not look like use."""
    _, digest = await put(cache, MIB)
    path = cache.blob_path(digest)
    os.utime(path, (1_000_000, path.stat().st_mtime))
    await Scrubber(BlobChecker(cache, Metrics()), cache, rate=1024 * MIB).scrub_pass()
    assert path.stat().st_atime == 1_000_000


def test_the_scrub_rate_flag_is_mib_per_second_and_zero_turns_it_off() -> None:
    from mirror.cli import build_parser, run_config

    def rate(args: list[str], environ: dict[str, str] | None = None) -> int:
        return run_config(build_parser(environ or {}).parse_args(["run", *args])).scrub_rate

    assert rate([]) == 20 * MIB
    assert rate(["--scrub-rate=2.5"]) == int(2.5 * MIB)
    assert rate([], {"MIRROR_SCRUB_RATE": "0"}) == 0
    for bad in ("-1", "fast", "20MiB"):
        with pytest.raises(SystemExit):
            build_parser({}).parse_args(["run", f"--scrub-rate={bad}"])
