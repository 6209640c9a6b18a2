"""containerd's ingests read as they grow (stores/containerd/ingest.py), on its file layout.

The layout is containerd 1.6's, written by hand (harness/ingest_layout.py) so each step of an
ingest's life can be taken one at a time. The same code against a real containerd pull is in
test_e2e_redirect.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness.ingest_layout import IngestLayout

from mirror.errors import ContentVanished
from mirror.oci.reference import Digest, parse_digest
from mirror.stores.base import FilePart, PartReader
from mirror.stores.containerd.ingest import (
    GONE_CHECK_SECONDS,
    LIVE_SECONDS,
    IngestBlob,
    Ingests,
)
from mirror.stores.containerd.watch import FileWatcher

BLOB = os.urandom(300_000)
DIGEST = parse_digest("sha256:" + hashlib.sha256(BLOB).hexdigest())


def layout(root: Path, namespace: str = "k8s.io", *, total: bool = True) -> IngestLayout:
    return IngestLayout(root, BLOB, namespace, total=total)


def ingests(root: Path, clock: Callable[[], float] | None = None, **kwargs: float) -> Ingests:
    return Ingests(
        root,
        "k8s.io",
        poll_seconds=0.001,
        max_poll_seconds=0.002,
        clock=clock or (lambda: 0.0),
        **kwargs,
    )


async def take(reader: PartReader) -> bytes:
    part = await reader.next_part()
    assert isinstance(part, FilePart)
    return os.pread(part.file.fileno(), part.count, part.offset)


async def found(root: Path, digest: Digest = DIGEST, **kwargs: float) -> IngestBlob:
    blob = await ingests(root, **kwargs).find(digest)
    assert blob is not None
    return blob


def test_an_ingest_being_written_in_the_namespace_is_live(tmp_path: Path) -> None:
    """An ingest of the namespace written lately shows the directory is containerd's own; one
    of another namespace, one not written for `LIVE_SECONDS`, or none, does not."""
    assert not ingests(tmp_path / "none").live()
    assert not ingests(layout(tmp_path / "theirs", "moby").root).live()
    stale = layout(tmp_path / "stale")
    past = time.time() - LIVE_SECONDS - 1
    os.utime(stale.ingest / "data", (past, past))
    assert not ingests(stale.root).live()
    ours = layout(tmp_path / "ours")
    assert ingests(ours.root).live()
    ours.commit()
    assert not ingests(ours.root).live()


async def test_an_ingest_is_found_by_digest_in_its_namespace_only(tmp_path: Path) -> None:
    layout(tmp_path / "ours")
    blob = await found(tmp_path / "ours")
    assert blob.size == len(BLOB) and blob.received() == 0
    await blob.close()
    layout(tmp_path / "theirs", namespace="moby")
    assert await ingests(tmp_path / "theirs").find(DIGEST) is None
    other = parse_digest("sha256:" + "0" * 64)
    assert await ingests(tmp_path / "ours").find(other) is None
    # No size written: nothing to promise a reader. No directory at all: no pull ran yet.
    layout(tmp_path / "unsized", total=False)
    assert await ingests(tmp_path / "unsized").find(DIGEST) is None
    assert await ingests(tmp_path / "none").find(DIGEST) is None


async def test_a_reader_follows_the_data_and_gets_the_end_after_the_commit(
    tmp_path: Path,
) -> None:
    content = layout(tmp_path)
    blob = await found(tmp_path)
    reader = blob.reader(0, len(BLOB))
    content.write(100_000)
    received = await take(reader)
    assert received == BLOB[:100_000]
    content.write(len(BLOB))
    # Everything is on disk, but not committed: all but the last byte.
    received += await take(reader)
    assert received == BLOB[:-1]
    content.commit()  # containerd verified the digest and renamed the file
    received += await take(reader)
    assert received == BLOB
    assert await reader.next_part() is None
    await reader.aclose()


async def test_an_uncommitted_end_is_never_sent(tmp_path: Path) -> None:
    """All bytes there, no commit (the digest did not match, the runtime stopped): past the
    stall bound the reader fails instead of sending the last byte."""
    content = layout(tmp_path)
    now = [0.0]
    blob = await found(tmp_path, clock=lambda: now[0], stall_seconds=0.0)
    reader = blob.reader(0, len(BLOB))
    content.write(len(BLOB))
    assert await take(reader) == BLOB[:-1]
    now[0] = 1.0
    with pytest.raises(ContentVanished, match="stalled"):
        await reader.next_part()
    await reader.aclose()


async def test_an_ingest_given_up_ends_its_readers(tmp_path: Path) -> None:
    content = layout(tmp_path)
    blob = await found(tmp_path)
    reader = blob.reader(0, len(BLOB))
    content.write(1000)
    assert await take(reader) == BLOB[:1000]
    content.drop()
    with pytest.raises(ContentVanished, match="gave up"):
        await reader.next_part()
    await reader.aclose()


async def test_a_reader_waiting_on_the_writer_looks_for_the_commit_once_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until every byte is there the commit cannot come: a reader that caught up with a slow
    writer looks whether the ingest went away every `GONE_CHECK_SECONDS`, not at every wake."""
    content = layout(tmp_path)
    now = [0.0]
    blob = await found(tmp_path, clock=lambda: now[0])
    reader = blob.reader(0, len(BLOB))
    content.write(1000)
    assert await take(reader) == BLOB[:1000]
    looks, wakes = [0], [0]
    woken_enough = asyncio.Event()
    check_committed, received = blob._check_committed, blob.received

    def counted_look() -> bool:
        looks[0] += 1
        return check_committed()

    def counted_wake() -> int:
        wakes[0] += 1
        if wakes[0] >= 20:
            woken_enough.set()
        return received()

    monkeypatch.setattr(blob, "_check_committed", counted_look)
    monkeypatch.setattr(blob, "received", counted_wake)
    waiting = asyncio.create_task(reader.next_part())
    await woken_enough.wait()
    assert looks == [1]  # the first wake looked; the clock has not moved since
    content.drop()  # the runtime gave up
    now[0] = GONE_CHECK_SECONDS
    with pytest.raises(ContentVanished, match="gave up"):
        await waiting
    assert looks == [2]
    await reader.aclose()


async def test_a_blob_committed_from_another_copy_is_sent_from_there(tmp_path: Path) -> None:
    """containerd verified this ingest but held the blob already (another pull committed it
    first), so it dropped the ingest: the rest comes from the committed blob."""
    content = layout(tmp_path)
    blob = await found(tmp_path)
    reader = blob.reader(0, len(BLOB))
    content.write(len(BLOB))
    assert await take(reader) == BLOB[:-1]
    content.committed.parent.mkdir(parents=True)
    content.committed.write_bytes(BLOB)
    content.drop()
    assert await take(reader) == BLOB[-1:]
    assert await reader.next_part() is None
    await reader.aclose()


async def test_a_range_is_read_from_its_offset(tmp_path: Path) -> None:
    content = layout(tmp_path)
    content.write(200_000)
    blob = await found(tmp_path)
    assert blob.received() == 200_000
    reader = blob.reader(150_000, 100_000)
    assert await take(reader) == BLOB[150_000:200_000]
    content.write(len(BLOB))
    assert await take(reader) == BLOB[200_000:250_000]
    assert await reader.next_part() is None
    await reader.aclose()


async def test_a_commit_between_two_looks_is_not_taken_for_giving_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """containerd renames `data` to the blob's path, then removes the ingest directory. A
    commit that lands right after the reader looked at the blob's path (not there yet) must
    still end in the last byte, not in "gave up": once cut, every reader's runtime asked
    again (seen at 16 nodes, docs/benchmarks.md)."""
    content = layout(tmp_path)
    blob = await found(tmp_path)
    reader = blob.reader(0, len(BLOB))
    content.write(len(BLOB))
    assert await take(reader) == BLOB[:-1]
    real_stat = os.stat
    looks: list[str] = []

    def stat_then_commit(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if path == content.committed and not looks:
            looks.append("not there yet")
            content.commit()  # lands just after this look
            raise FileNotFoundError(path)
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", stat_then_commit)
    assert await take(reader) == BLOB[-1:]
    assert looks == ["not there yet"]
    assert await reader.next_part() is None
    await reader.aclose()


async def test_a_blob_committed_but_not_yet_listed_is_found_whole(tmp_path: Path) -> None:
    """Between containerd's rename and its database listing the blob, neither the ingest nor
    the store shows it: the blob's file is found instead, committed (no source behind it)."""
    content = layout(tmp_path)
    content.write(len(BLOB))
    content.commit()
    blob = await found(tmp_path)
    assert blob.committed and blob.size == len(BLOB) and blob.received() == len(BLOB)
    reader = blob.reader(0, len(BLOB))
    assert await take(reader) == BLOB
    assert await reader.next_part() is None
    await reader.aclose()
    # An ingest under way is not committed; no blob at all is nothing.
    other = layout(tmp_path / "other")
    receiving = await found(tmp_path / "other")
    assert not receiving.committed
    await receiving.close()
    other.drop()
    assert await ingests(tmp_path / "other").find(DIGEST) is None


# Readers woken by the writer (watch.py): with a poll interval far longer than the test may take,
# each step below can only be seen in time through inotify.
_NEVER = 60.0


def watched(root: Path, watcher: FileWatcher) -> Ingests:
    return Ingests(
        root,
        "k8s.io",
        poll_seconds=_NEVER,
        max_poll_seconds=_NEVER,
        watcher=watcher,
    )


async def test_a_watched_reader_wakes_on_each_write_the_commit_and_giving_up(
    tmp_path: Path,
) -> None:
    watcher = FileWatcher()
    try:
        content = layout(tmp_path / "committed")
        blob = await watched(tmp_path / "committed", watcher).find(DIGEST)
        assert blob is not None
        reader = blob.reader(0, len(BLOB))
        async with asyncio.timeout(10):
            waiting = asyncio.create_task(take(reader))
            await asyncio.sleep(0)  # the reader found nothing there and waits
            content.write(100_000)
            assert await waiting == BLOB[:100_000]
            waiting = asyncio.create_task(take(reader))
            await asyncio.sleep(0)
            content.write(len(BLOB))
            assert await waiting == BLOB[100_000:-1]
            waiting = asyncio.create_task(take(reader))
            await asyncio.sleep(0)
            content.commit()
            assert await waiting == BLOB[-1:]
        await reader.aclose()

        content = layout(tmp_path / "dropped")
        blob = await watched(tmp_path / "dropped", watcher).find(DIGEST)
        assert blob is not None
        reader = blob.reader(0, len(BLOB))
        async with asyncio.timeout(10):
            waiting = asyncio.create_task(reader.next_part())
            await asyncio.sleep(0)
            content.drop()  # the runtime gave up: the unlink wakes the reader
            with pytest.raises(ContentVanished, match="gave up"):
                await waiting
        await reader.aclose()
    finally:
        watcher.close()


async def test_readers_of_one_ingest_share_its_watch_until_the_last_leaves(
    tmp_path: Path,
) -> None:
    watcher = FileWatcher()
    try:
        content = layout(tmp_path)
        ingests_here = watched(tmp_path, watcher)
        first, second = await ingests_here.find(DIGEST), await ingests_here.find(DIGEST)
        assert first is not None and second is not None
        await first.close()  # the second still wakes on the writer
        reader = second.reader(0, len(BLOB))
        async with asyncio.timeout(10):
            waiting = asyncio.create_task(take(reader))
            await asyncio.sleep(0)
            content.write(1000)
            assert await waiting == BLOB[:1000]
        await reader.aclose()
    finally:
        watcher.close()
