"""A peer's blob body received by a thread of its own, off aiohttp's per-chunk path.

Why: on the event loop, every time the socket is readable (on a real link that is every few
packets) aiohttp reads what is there into a fresh bytes object, which goes through the HTTP
parser, a stream reader and an iterator before it is hashed and written. A node that shares
what it fetches receives every layer of a rollout, and the chain of nodes runs at that cost.
Measured on this project's 2-CPU VM, receiving and hashing a body (docs/benchmarks.md,
*Receiving a peer's body on a thread*): over a 200 Mbit/s shaped link, 5.2-5.8 CPU s/GiB
through aiohttp, 2.3 for a thread reading into a 1 MiB buffer, 1.2 once the thread sleeps
until a buffer's worth has arrived (SO_RCVLOWAT); over loopback 2.0-2.4 against 0.9-1.4.

How: aiohttp still sends the request and reads the headers (the choice among providers,
hedging and referrals stay as they are). Then the answer's connection is taken over: its
transport stops reading, what aiohttp had already buffered is passed on first, and a duplicate
of the socket's descriptor is read to the body's end by a thread, which hashes every piece
where it landed and hands it to the event loop. The connection is closed afterwards, never
reused. Only a plain TCP answer with a `Content-Length`, no content coding and more than
`TAKE_OVER_AT` bytes to go is taken over; `can_take_over` says so, and any other answer is
read through aiohttp as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp

log = logging.getLogger(__name__)

# Bodies with less than this to go are read through aiohttp: a thread costs more than it saves.
TAKE_OVER_AT = 1024 * 1024
# The thread fills buffers of this size...
_PIECE = 1024 * 1024
# ...but hands one over early when a slow link has not filled it within this time, so its bytes
# are not held back. Meanwhile the thread sleeps until a buffer's worth has arrived
# (SO_RCVLOWAT) rather than waking for every packet.
_EARLY_SECONDS = 0.05
# Pieces handed over and not yet taken: the memory one body may hold ahead of its reader.
_AHEAD = 4
# How often a thread waiting for its reader looks whether it was stopped.
_WAKE_SECONDS = 1.0


# Takes a piece of the body that starts at byte `offset` of the blob (into a cache file), on the
# receiving thread: how many bytes it took now (0: not now, the bytes before it are not written
# yet), or None when it takes nothing any more (the file is full or gone).
Sink = Callable[[memoryview, int], "int | None"]


@dataclass(slots=True)
class SinkSlot:
    """Where a stream's bodies are written instead of being handed to the event loop, once
    whoever keeps the blob sets `target` (content/downloads.py, before reading the stream)."""

    target: Sink | None = None


class BodyBroken(Exception):
    """The body did not arrive whole: the peer closed the connection, stalled or failed."""


def can_take_over(response: aiohttp.ClientResponse, remaining: int) -> bool:
    """Whether `response`'s body (`remaining` bytes still to come) can be read by a thread."""
    connection = response.connection
    if connection is None or connection.transport is None or remaining < TAKE_OVER_AT:
        return False
    transport = connection.transport
    if transport.get_extra_info("sslcontext") is not None:
        return False
    if transport.get_extra_info("socket") is None:
        return False
    headers = response.headers
    return (
        response.content_length == remaining
        and "Transfer-Encoding" not in headers
        and headers.get("Content-Encoding", "identity") == "identity"
    )


class ThreadedBody(AsyncIterator["bytes | int"]):
    """The rest of `response`'s body, `remaining` bytes, in pieces of up to 1 MiB.

    `digest` (optional) is updated with every byte in order, on the thread. With a `sink`, the
    thread writes each piece itself (the body starts at byte `offset` of the blob) and yields
    only its length, an int: those bytes never enter the event loop. What the sink does not
    take is yielded as bytes, as without one. A body that breaks raises `BodyBroken`. `aclose`
    must be called (it stops the thread); the response itself is left to its owner, who
    closes it.
    """

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        remaining: int,
        digest: hashlib._Hash | None,
        *,
        stall_seconds: float,
        sink: Sink | None = None,
        offset: int = 0,
    ) -> None:
        if not can_take_over(response, remaining):
            raise ValueError("this response cannot be taken over")
        connection = response.connection
        assert connection is not None and connection.transport is not None
        self._loop = asyncio.get_running_loop()
        self._pieces: deque[bytes | int | BaseException] = deque()
        self._sink = sink
        self._offset = offset  # of the next byte the thread delivers, in the blob
        self._arrived = asyncio.Event()
        self._credits = threading.Semaphore(_AHEAD)
        self._stopping = False
        self._ended = False
        # Taking what aiohttp buffered may make it resume reading (its flow control); pausing
        # right after, with no await between, leaves no byte read in between.
        buffered = response.content.read_nowait(-1)
        if connection.protocol is not None:
            connection.protocol.pause_reading()  # and its read timeout: the thread has its own
        connection.transport.pause_reading()
        sock = connection.transport.get_extra_info("socket")
        self._socket = socket.socket(fileno=os.dup(sock.fileno()))
        self._socket.setblocking(False)
        self._poller = select.poll()
        self._poller.register(self._socket, select.POLLIN)
        self._low_water = 1  # what SO_RCVLOWAT is set to; 0: the kernel refused it
        self._stall_seconds = stall_seconds
        self._last_byte = time.monotonic()
        # Closing the socket (the thread) and shutting it down (`aclose`) never overlap: a
        # descriptor number closed and reused meanwhile would be shut down instead.
        self._socket_lock = threading.Lock()
        self._exited: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._receive,
            args=(buffered, remaining - len(buffered), digest),
            name="peer-body",
            daemon=True,
        )
        self._thread.start()

    def __aiter__(self) -> ThreadedBody:
        return self

    async def __anext__(self) -> bytes | int:
        while not self._pieces:
            if self._ended:
                raise StopAsyncIteration
            await self._arrived.wait()
            self._arrived.clear()
        piece = self._pieces.popleft()
        if isinstance(piece, BaseException):
            self._ended = True
            raise piece
        self._credits.release()
        return piece

    async def aclose(self) -> None:
        """Stop the thread (if it still runs) and wait until it let go of the socket."""
        self._stopping = True
        self._credits.release()
        with self._socket_lock:
            if self._socket.fileno() != -1:
                with contextlib.suppress(OSError):  # the peer closed it already
                    self._socket.shutdown(socket.SHUT_RDWR)
        await asyncio.shield(self._exited)

    # The thread's side.

    def _receive(self, buffered: bytes, left: int, digest: hashlib._Hash | None) -> None:
        try:
            if buffered:
                self._credits.acquire()  # one of _AHEAD, never waited for
                if digest is not None:
                    digest.update(buffered)
                self._deliver(memoryview(buffered))
            buffer = memoryview(bytearray(min(_PIECE, left)))
            while left > 0:
                if not self._take_credit():
                    return
                piece = self._fill(buffer[: min(_PIECE, left)], left)
                if digest is not None:
                    digest.update(piece)
                left -= len(piece)
                self._deliver(piece)
            self._hand_over(None)
        except (OSError, BodyBroken) as exc:
            if not self._stopping:
                self._hand_over(exc if isinstance(exc, BodyBroken) else BodyBroken(str(exc)))
        except RuntimeError:
            pass  # the event loop is closed: nobody is reading any more
        finally:
            with self._socket_lock:
                self._socket.close()
            self._call_loop(self._exit)

    def _take_credit(self) -> bool:
        """Wait until the reader took a piece; False once it no longer wants any."""
        while not self._credits.acquire(timeout=_WAKE_SECONDS):
            if self._stopping or self._loop.is_closed():
                return False
        return not self._stopping

    def _deliver(self, piece: memoryview) -> None:
        """Into the sink as far as it takes it (its length handed over), the rest as bytes."""
        taken = 0
        if self._sink is not None:
            written = self._sink(piece, self._offset)
            if written is None:
                self._sink = None  # it takes nothing any more: the rest goes to the reader
            elif written:
                taken = written
                self._hand_over(written)
        if taken < len(piece):
            if taken and not self._take_credit():  # the rest is one more item
                return
            # Copied out of the reused buffer: one copy (0.03 s/GiB), no fresh buffer per piece.
            self._hand_over(bytes(piece[taken:]))
        self._offset += len(piece)

    def _fill(self, buffer: memoryview, left: int) -> memoryview:
        """The next bytes of the body: `buffer` filled, or what came within `_EARLY_SECONDS`."""
        size, filled = len(buffer), 0
        started = time.monotonic()
        while filled < size:
            try:
                count = self._socket.recv_into(buffer[filled:])
            except BlockingIOError:
                now = time.monotonic()
                if filled and now - started >= _EARLY_SECONDS:
                    break  # a slow link: pass on what is here rather than wait for a full buffer
                if self._stopping:
                    raise BodyBroken("stopped") from None
                if now - self._last_byte >= self._stall_seconds:
                    raise BodyBroken(
                        f"no byte from the peer for {self._stall_seconds:g} s"
                    ) from None
                self._wake_at(size - filled)
                self._poller.poll(_EARLY_SECONDS * 1000)
                continue
            if count == 0:
                raise BodyBroken(f"the peer closed the connection {left - filled} bytes short")
            filled += count
            self._last_byte = time.monotonic()
        return buffer[:filled]

    def _wake_at(self, count: int) -> None:
        """Have the socket report readable only once `count` bytes are there (or it ends).

        Only a saving: where the kernel refuses the option, the thread wakes for every few
        packets instead, as aiohttp would.
        """
        if count == self._low_water or self._low_water == 0:
            return
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, count)
        except OSError as exc:
            log.debug("SO_RCVLOWAT refused (%s): waking for every packet", exc)
            count = 0
        self._low_water = count

    def _hand_over(self, piece: bytes | int | BaseException | None) -> None:
        self._call_loop(self._arrive, piece)

    def _call_loop(self, callback: Callable[..., None], *args: object) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback, *args)

    # Back on the event loop.

    def _arrive(self, piece: bytes | int | BaseException | None) -> None:
        if piece is None:
            self._ended = True
        else:
            self._pieces.append(piece)
        self._arrived.set()

    def _exit(self) -> None:
        if not self._exited.done():
            self._exited.set_result(None)
        if not self._ended and not self._pieces:
            # Stopped or failed without a word (the loop was closing): readers must not wait.
            self._ended = True
            self._arrived.set()
