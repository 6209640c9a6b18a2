"""A large blob from several providers at once: pieces fetched in parallel, handed on in order.

For --peer-ranges N > 1 (peers/fetcher.py decides when): the blob is cut into pieces of
--peer-range-size bytes. Up to N pieces are in flight at once, each a Range request to a
provider chosen when the piece starts (the fetcher's `open_piece`: least loaded first, so the
pieces in flight spread over the providers; a node still downloading the blob is one too, and
answers a range once its bytes arrive). The bytes leave strictly in order: the first piece is
passed on as it arrives, the later ones wait in memory until it is their turn, and a new piece
starts only when the first one is done, so at most N pieces are held (`BufferGauge` counts them).

A piece whose provider breaks, stalls past the read timeout or refuses it is continued from
another provider with a Range from its first missing byte: what arrived is kept, never fetched
or held twice. This module does not verify anything: the fetcher hashes the in-order stream and
holds its last chunk back, as for a single provider.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from mirror.errors import PeerUnavailable
from mirror.ranges import ByteRange
from mirror.routing.router import Provider

_CHUNK = 1024 * 1024

Opened = tuple[Provider, aiohttp.ClientResponse]


class PieceSource(Protocol):
    """Where pieces come from and where what they teach goes (the fetcher)."""

    async def open_piece(
        self, position: int, end: int, failed: Sequence[Provider]
    ) -> Opened | None:
        """A 206 answer for bytes [position, end) from a provider not in `failed`; None: none."""
        ...

    def piece_done(self, provider: Provider, received: int, seconds: float) -> None: ...

    def piece_broke(
        self, provider: Provider, received: int, seconds: float, error: BaseException
    ) -> None: ...


@dataclass(slots=True)
class BufferGauge:
    """Bytes of pieces held in memory now and at most (the bound is tested with it)."""

    now: int = 0
    peak: int = 0

    def add(self, count: int) -> None:
        self.now += count
        self.peak = max(self.peak, self.now)

    def remove(self, count: int) -> None:
        self.now -= count


class _PieceBroken(Exception):
    """A provider's answer ended before the piece did."""


class _Piece:
    """One piece: its bytes as they arrive, until the stream hands them on."""

    def __init__(self, byte_range: ByteRange, gauge: BufferGauge) -> None:
        self.range = byte_range
        self.chunks: deque[bytes] = deque()
        self.arrived = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._gauge = gauge

    def put(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self._gauge.add(len(chunk))
        self.arrived.set()

    async def drain(self) -> AsyncIterator[bytes]:
        """Its bytes in order as they arrive; raises what broke the piece."""
        assert self.task is not None
        while True:
            while self.chunks:
                yield self.chunks.popleft()
            if self.task.done():
                self.task.result()
                if not self.chunks:
                    return
                continue
            self.arrived.clear()
            await self.arrived.wait()


class RangedStream:
    """The whole blob of `size` bytes, in order, from pieces fetched in parallel."""

    def __init__(
        self,
        source: PieceSource,
        size: int,
        piece_size: int,
        window: int,
        first: Opened,
        gauge: BufferGauge,
        clock: Callable[[], float],
    ) -> None:
        self._source = source
        self._pending = deque(
            ByteRange(offset, min(piece_size, size - offset))
            for offset in range(0, size, piece_size)
        )
        self._window = max(1, window)
        self._first: Opened | None = first
        self._gauge = gauge
        self._clock = clock
        self._active: deque[_Piece] = deque()
        # Every provider that sent bytes of the blob: on a digest mismatch any may be the culprit.
        self.senders: list[Provider] = []

    async def chunks(self) -> AsyncGenerator[bytes]:
        try:
            while self._pending and len(self._active) < self._window:
                self._start()
            while self._active:
                piece = self._active[0]
                async for chunk in piece.drain():
                    try:
                        yield chunk
                    finally:
                        self._gauge.remove(len(chunk))
                self._active.popleft()
                if self._pending:
                    self._start()
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop every piece in flight and let go of its bytes and its connection."""
        if self._first is not None:
            self._first[1].close()
            self._first = None
        pieces = list(self._active)
        self._active.clear()
        tasks = [piece.task for piece in pieces if piece.task is not None]
        for task in tasks:
            task.cancel()
        # Cancelled or broken: let go either way.
        await asyncio.gather(*tasks, return_exceptions=True)
        for piece in pieces:
            self._gauge.remove(sum(len(chunk) for chunk in piece.chunks))
            piece.chunks.clear()

    def _start(self) -> None:
        piece = _Piece(self._pending.popleft(), self._gauge)
        first, self._first = self._first, None
        piece.task = asyncio.create_task(self._fetch(piece, first))
        self._active.append(piece)

    async def _fetch(self, piece: _Piece, opened: Opened | None) -> None:
        position, end = piece.range.offset, piece.range.end
        failed: list[Provider] = []
        try:
            while position < end:
                if opened is None:
                    opened = await self._source.open_piece(position, end, failed)
                    if opened is None:
                        raise PeerUnavailable(
                            f"no peer could send bytes {position}-{end - 1} of the blob"
                        )
                provider, response = opened
                opened = None
                if all(provider.node_id != p.node_id for p in self.senders):
                    self.senders.append(provider)
                since, received = self._clock(), 0
                try:
                    async for chunk in response.content.iter_chunked(_CHUNK):
                        chunk = chunk[: end - position]
                        if chunk:
                            position += len(chunk)
                            received += len(chunk)
                            piece.put(chunk)
                        if position >= end:
                            break
                    if position < end:
                        raise _PieceBroken(f"ended at byte {position} of {end}")
                except (_PieceBroken, aiohttp.ClientError, TimeoutError, OSError) as exc:
                    response.close()
                    self._source.piece_broke(provider, received, self._clock() - since, exc)
                    failed.append(provider)
                    continue
                finally:
                    response.release()
                self._source.piece_done(provider, received, self._clock() - since)
        finally:
            if opened is not None:
                opened[1].close()
            piece.arrived.set()
