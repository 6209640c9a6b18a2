"""The peer fetcher's hash of a blob: batched onto a worker thread, in order, never a byte lost.

`_PipelinedHasher` queues chunks and hashes them a batch at a time; whatever the chunks' sizes
(a connection hands over pieces of up to 256 KiB), the digest must be the plain hash of the
bytes in order, including a tail too short to make a batch, and the stream must be held back
only once too much is queued.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from mirror.peers import fetcher
from mirror.peers.fetcher import _PipelinedHasher

KIB = 1024


@pytest.mark.parametrize(
    "sizes",
    [
        [],
        [1],
        [100 * KIB] * 3,  # less than a batch in all: hashed only when the digest is asked for
        [256 * KIB] * 37 + [5],  # many batches and a short tail
        [3 * 1024 * KIB, 7, 2 * 1024 * KIB],  # chunks larger than a batch
    ],
)
async def test_the_digest_is_the_hash_of_every_byte_in_order(sizes: list[int]) -> None:
    chunks = [os.urandom(size) for size in sizes]
    hasher = _PipelinedHasher("sha256")
    for chunk in chunks:
        await hasher.update(chunk)
    assert await hasher.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()


async def test_the_stream_waits_only_once_too_much_is_queued(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hash runs behind the stream, up to `_HASH_AHEAD` bytes: while a batch is being
    hashed, chunks are queued without waiting until that much is."""
    release = asyncio.Event()
    loop = asyncio.get_running_loop()
    hashed: list[int] = []

    def slow_hash(self: _PipelinedHasher, batch: list[bytes]) -> None:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
        hashed.append(sum(map(len, batch)))
        for chunk in batch:
            self._hash.update(chunk)

    monkeypatch.setattr(_PipelinedHasher, "_hash_all", slow_hash)
    hasher = _PipelinedHasher("sha256")
    batch, ahead = fetcher._HASH_BATCH, fetcher._HASH_AHEAD
    data = os.urandom(batch + ahead)
    await hasher.update(data[:batch])  # the first batch goes to the worker, which is held
    for start in range(batch, batch + ahead - KIB, KIB):
        await asyncio.wait_for(hasher.update(data[start : start + KIB]), 1)
    blocked = asyncio.ensure_future(hasher.update(data[batch + ahead - KIB :]))
    await asyncio.sleep(0.05)
    assert not blocked.done()  # `ahead` bytes queued behind a batch still being hashed
    release.set()
    await asyncio.wait_for(blocked, 5)
    assert await hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    assert hashed[0] == batch and sum(hashed) == len(data)
