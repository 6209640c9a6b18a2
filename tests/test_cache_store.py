"""The node cache: verified atomic writes, tags, and nothing partial ever visible.

What every store does (stat, open, ranges, tags, misses) is checked for the cache by the
conformance suite, tests/test_store_conformance.py; this file keeps what only the cache does.
"""

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import BinaryIO

import pytest

from mirror.errors import DigestMismatch, StoreUnavailable
from mirror.oci.reference import Digest, parse_digest, tag_ref
from mirror.stores.cache import CacheStore


def digest_of(data: bytes) -> Digest:
    return parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


@pytest.fixture
async def cache(tmp_path: Path) -> CacheStore:
    store = CacheStore(tmp_path / "cache")
    await store.start()
    return store


async def test_wrong_bytes_never_become_visible(cache: CacheStore) -> None:
    digest = digest_of(b"the real content")
    with pytest.raises(DigestMismatch):
        await cache.put(digest, b"something else")
    assert await cache.stat(digest) is None
    assert list((cache.root / "tmp").iterdir()) == []


async def test_short_write_is_refused(cache: CacheStore) -> None:
    data = b"0123456789"
    digest = digest_of(data)
    with pytest.raises(DigestMismatch):
        async with cache.writer(digest, 20) as writer:
            await writer.write(data)
            await writer.commit()
    assert await cache.stat(digest) is None


async def test_a_verified_write_is_not_hashed_again_but_its_size_is_checked(
    cache: CacheStore,
) -> None:
    """Its source checked the bytes against the digest (a peer's stream): only the size is
    left to check before publishing."""
    data = b"0123456789"
    digest = digest_of(data)
    with pytest.raises(DigestMismatch):
        async with cache.writer(digest, 20, verified=True) as writer:
            await writer.write(data)
            await writer.commit()
    assert await cache.stat(digest) is None
    async with cache.writer(digest, len(data), verified=True) as writer:
        await writer.write(data)
        assert writer.hash_so_far() is None
        await writer.commit()
    assert await cache.stat(digest) == len(data)


async def test_writes_reach_the_file_in_pieces_of_at_most_a_mebibyte(cache: CacheStore) -> None:
    """Larger writes have the kernel fill 2 MiB page-cache folios, which cost many times the
    CPU on some virtual machines."""
    data = bytes(range(256)) * (5 * 4096 + 3)  # 5 MiB and a bit
    async with cache.writer(digest_of(data), len(data)) as writer:
        handle = writer._handle
        assert handle is not None
        recording = _Recording(handle)
        writer._handle = recording  # type: ignore[assignment]
        await writer.write(data)
        writer._handle = handle
        await writer.commit()
    assert max(recording.sizes) <= 1024 * 1024 and sum(recording.sizes) == len(data)
    assert await cache.stat(digest_of(data)) == len(data)


class _Recording:
    """A file handle that notes the size of every write before passing it on."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.sizes: list[int] = []

    def write(self, view: memoryview) -> int | None:
        self.sizes.append(len(view))
        return self._handle.write(view)


async def test_abandoned_write_leaves_nothing(cache: CacheStore) -> None:
    data = b"partial"
    digest = digest_of(data)
    with pytest.raises(ConnectionError):
        async with cache.writer(digest) as writer:
            await writer.write(data[:3])
            raise ConnectionError("upstream dropped")
    assert await cache.stat(digest) is None
    assert list((cache.root / "tmp").iterdir()) == []


async def test_tags_round_trip_and_list(cache: CacheStore) -> None:
    digest = digest_of(b"manifest")
    ref = tag_ref("ghcr.io", "org/app", "1.0")
    nested = tag_ref("ghcr.io", "org/app/1.0", "latest")
    assert await cache.resolve(ref) is None
    await cache.set_tag(ref, digest)
    await cache.set_tag(nested, digest)
    assert await cache.resolve(ref) == digest
    assert await cache.resolve(nested) == digest
    other = digest_of(b"manifest 2")
    await cache.set_tag(ref, other)
    assert await cache.resolve(ref) == other
    listed = {(str(e.ref), e.digest) for e in await cache.images()}
    assert listed == {(str(ref), other), (str(nested), digest)}


async def test_a_tag_file_with_an_unusable_digest_is_not_held(
    cache: CacheStore, caplog: pytest.LogCaptureFixture
) -> None:
    ref = tag_ref("ghcr.io", "org/app", "broken")
    good = tag_ref("ghcr.io", "org/app", "good")
    await cache.set_tag(good, digest_of(b"manifest"))
    tag_file = cache.root / "tags" / "ghcr.io" / "org" / "app" / "@broken"
    tag_file.write_text("sha256:not-hex")
    with caplog.at_level(logging.WARNING, logger="mirror.stores"):
        assert await cache.resolve(ref) is None
    assert "sha256:not-hex" in caplog.text and str(ref) in caplog.text
    assert [entry.ref for entry in await cache.images()] == [good]


async def test_a_blob_removed_behind_the_caches_back_is_forgotten(cache: CacheStore) -> None:
    data = b"soon gone"
    await cache.put(digest_of(data), data)
    assert cache.holds(digest_of(data)) and cache.total_bytes == len(data)
    cache.blob_path(digest_of(data)).unlink()
    assert await cache.open(digest_of(data)) is None
    assert not cache.holds(digest_of(data))
    assert cache.total_bytes == 0
    assert await cache.loose_digests() == []


async def test_a_blob_is_looked_for_on_the_loop_so_one_published_meanwhile_is_kept(
    cache: CacheStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open that missed because the writer had not renamed the file yet, and came back after
    the writer put the blob in the books, dropped it (seen in the suite when the look ran on a
    thread: the claimant answered a peer 404 for a blob it had just fetched, and the peer went
    upstream again). `open`, like `stat`, looks on the loop, with no await between its look
    and the books, so no writer can publish in between: it never hands off to a thread."""
    data = b"published before the look"
    digest = digest_of(data)
    async with cache.writer(digest, len(data)) as writer:
        await writer.write(data)
        await writer.commit()

    async def no_threads(function: object, *args: object, **kwargs: object) -> object:
        raise AssertionError(f"open handed {function!r} to a thread")

    monkeypatch.setattr(asyncio, "to_thread", no_threads)
    blob = await cache.open(digest)
    missing = await cache.open(digest_of(b"never written"))
    monkeypatch.undo()
    assert blob is not None and missing is None
    assert b"".join([chunk async for chunk in blob.iter_range(0, len(data))]) == data
    await blob.close()
    assert cache.holds(digest)
    assert await cache.loose_digests() == [str(digest)]


async def test_leftover_temp_files_are_cleared_at_start(tmp_path: Path) -> None:
    (tmp_path / "c" / "tmp").mkdir(parents=True)
    (tmp_path / "c" / "tmp" / "blob-crashed").write_bytes(b"junk")
    store = CacheStore(tmp_path / "c")
    await store.start()
    assert list((tmp_path / "c" / "tmp").iterdir()) == []


async def test_unusable_directory_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailable):
        await CacheStore(blocker / "cache").start()


async def test_least_recently_used_blobs_are_evicted_past_the_bound(tmp_path: Path) -> None:
    from mirror.metrics import Metrics

    metrics = Metrics()
    store = CacheStore(tmp_path / "cache", max_bytes=2500, metrics=metrics)
    await store.start()
    blobs = [bytes([i]) * 1000 for i in range(3)]
    digests = [digest_of(b) for b in blobs]
    await store.put(digests[0], blobs[0])
    await store.put(digests[1], blobs[1])
    opened = await store.open(digests[0])  # now the most recently used, and pinned
    assert opened is not None
    await store.put(digests[2], blobs[2])
    assert await store.stat(digests[1]) is None, "the least recently used blob stayed"
    assert await store.stat(digests[0]) == 1000 and await store.stat(digests[2]) == 1000
    assert store.total_bytes == 2000
    assert metrics.registry.get_sample_value("mirror_cache_evictions_total") == 1
    assert metrics.registry.get_sample_value("mirror_cache_bytes") == 2000
    await opened.close()


async def test_an_open_blob_is_never_evicted(tmp_path: Path) -> None:
    store = CacheStore(tmp_path / "cache", max_bytes=1500)
    await store.start()
    first, second = b"a" * 1000, b"b" * 1000
    await store.put(digest_of(first), first)
    held = await store.open(digest_of(first))
    assert held is not None
    await store.put(digest_of(second), second)
    # Over the bound, but the only candidate is being read: it stays until closed.
    assert await store.stat(digest_of(first)) == 1000
    assert await held.read_all(2000) == first
    await held.close()


async def test_the_bound_applies_at_start(tmp_path: Path) -> None:
    store = CacheStore(tmp_path / "cache")
    await store.start()
    for i in range(4):
        data = bytes([i]) * 1000
        await store.put(digest_of(data), data)
    bounded = CacheStore(tmp_path / "cache", max_bytes=2000)
    await bounded.start()
    assert bounded.total_bytes <= 2000


async def test_changes_are_announced(cache: CacheStore) -> None:
    import asyncio

    changes = cache.changes()
    waiting = asyncio.ensure_future(anext(changes))
    await asyncio.sleep(0)
    assert not waiting.done()
    await cache.put(digest_of(b"new"), b"new")
    await asyncio.wait_for(waiting, 5)
    waiting = asyncio.ensure_future(anext(changes))
    await cache.set_tag(tag_ref("docker.io", "a", "1"), digest_of(b"new"))
    await asyncio.wait_for(waiting, 5)
    await changes.aclose()  # type: ignore[attr-defined]


async def test_cached_blobs_are_in_the_inventory_without_a_tag(cache: CacheStore) -> None:
    from mirror.stores.inventory import take_inventory

    await cache.put(digest_of(b"loose layer"), b"loose layer")
    inventory = await take_inventory(cache)
    assert str(digest_of(b"loose layer")) in inventory.digests and not inventory.tags
