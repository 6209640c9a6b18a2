"""A peer's blob body read by a thread of its own (peers/receiver.py), against a real socket.

The server here is a plain asyncio server that writes exactly the bytes each test wants (the
headers, then the body in steps the test releases), so that a body broken, stalled or
trickling in is produced on purpose; the client is a real aiohttp session, whose connection
the receiver takes over after the headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest

from mirror.peers import receiver
from mirror.peers.receiver import BodyBroken, ThreadedBody, can_take_over

MIB = 1024 * 1024

Script = Callable[[asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Server:
    """Answers each request by running `script` on the connection."""

    script: Script | None = None
    port: int = 0
    handlers: list[asyncio.Task[None]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        assert self.script is not None
        try:
            await self.script(writer)
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server()
    listening = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    state.port = listening.sockets[0].getsockname()[1]
    async with listening:
        yield state


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        yield client


def head(length: int, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nContent-Type: application/octet-stream"
        f"\r\n{extra}\r\n"
    ).encode()


def body_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "peer-body"]


async def no_body_thread_left() -> None:
    """The threads were told to stop and have said so (`aclose` waited for that)."""
    for thread in body_threads():
        await asyncio.to_thread(thread.join, 5)
    assert body_threads() == []


@contextlib.asynccontextmanager
async def taken_over(
    session: aiohttp.ClientSession,
    server: Server,
    length: int,
    stall: float = 5.0,
    *,
    sink: receiver.Sink | None = None,
    offset: int = 0,
) -> AsyncIterator[tuple[ThreadedBody, hashlib._Hash]]:
    digest = hashlib.sha256()
    async with session.get(f"http://127.0.0.1:{server.port}/blob") as response:
        assert can_take_over(response, length)
        body = ThreadedBody(response, length, digest, stall_seconds=stall, sink=sink, offset=offset)
        try:
            yield body, digest
        finally:
            await body.aclose()


def as_bytes(item: bytes | int) -> bytes:
    """A piece handed to the loop: bytes whenever no sink takes the body."""
    assert isinstance(item, bytes), f"{item!r} is not bytes"
    return item


async def next_bytes(body: ThreadedBody) -> bytes:
    return as_bytes(await body.__anext__())


async def all_bytes(body: ThreadedBody) -> list[bytes]:
    return [as_bytes(piece) async for piece in body]


async def test_a_body_arrives_whole_in_order_and_hashed(
    server: Server, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(5 * MIB + 123)

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(data)) + data)
        await writer.drain()

    server.script = send
    async with taken_over(session, server, len(data)) as (body, digest):
        pieces = await all_bytes(body)
    assert b"".join(pieces) == data
    assert all(isinstance(piece, bytes) and len(piece) <= receiver._PIECE for piece in pieces)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    await no_body_thread_left()


async def test_a_kernel_refusing_the_low_water_mark_still_gets_the_whole_body(
    server: Server, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SO_RCVLOWAT only saves wake-ups: refused, the thread reads as the data comes."""
    refused: list[int] = []

    class NoLowWater(socket.socket):
        def setsockopt(self, level: int, option: int, value: object) -> None:  # type: ignore[override]
            if option == socket.SO_RCVLOWAT:
                refused.append(option)
                raise OSError(errno.ENOPROTOOPT, "Protocol not available")
            super().setsockopt(level, option, value)  # type: ignore[call-overload]

    monkeypatch.setattr(socket, "socket", NoLowWater)  # the thread's socket is made after this
    data = os.urandom(3 * MIB + 7)
    first = MIB + 100
    more = asyncio.Event()

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(data)) + data[:first])
        await writer.drain()
        await more.wait()  # the thread runs out of bytes meanwhile and has to wait for more
        writer.write(data[first:])
        await writer.drain()

    server.script = send
    async with taken_over(session, server, len(data)) as (body, digest):
        received: list[bytes] = []
        async with asyncio.timeout(10):
            while sum(map(len, received)) < first:
                received.append(await next_bytes(body))
        more.set()
        received.extend(await all_bytes(body))
    assert b"".join(received) == data
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert refused, "the thread never asked for a low-water mark"


async def test_a_trickling_body_is_handed_on_before_a_buffer_fills(
    server: Server, session: aiohttp.ClientSession
) -> None:
    """A slow link's bytes are passed on once `_EARLY` of them are there, not held back until
    a whole buffer is full: the server here sends no more until the first piece arrived."""
    data = os.urandom(3 * MIB)
    first = 256 * 1024
    got_first = asyncio.Event()

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(data)) + data[:first])
        await writer.drain()
        await got_first.wait()
        writer.write(data[first:])
        await writer.drain()

    server.script = send
    async with taken_over(session, server, len(data)) as (body, _):
        received: list[bytes] = []
        async with asyncio.timeout(10):  # a thread holding the bytes back would wait forever
            while sum(map(len, received)) < first:
                received.append(await next_bytes(body))
        assert sum(map(len, received)) == first
        got_first.set()
        received.extend(await all_bytes(body))
    assert b"".join(received) == data


async def test_a_peer_closing_mid_body_breaks_it_after_the_bytes_that_came(
    server: Server, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(4 * MIB)

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(data)) + data[: 2 * MIB + 5])
        await writer.drain()

    server.script = send
    received = bytearray()
    async with taken_over(session, server, len(data)) as (body, _):
        with pytest.raises(BodyBroken, match="closed the connection"):
            async for piece in body:
                received += as_bytes(piece)
    assert data.startswith(received)
    await no_body_thread_left()


async def test_a_peer_that_stops_sending_breaks_the_body_after_the_stall_time(
    server: Server, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(4 * MIB)
    done = asyncio.Event()

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(data)) + data[:MIB])
        await writer.drain()
        await done.wait()  # connection open, nothing more sent

    server.script = send
    async with taken_over(session, server, len(data), stall=0.3) as (body, _):
        with pytest.raises(BodyBroken, match="no byte from the peer"):
            async for _piece in body:
                pass
    done.set()
    await no_body_thread_left()


async def test_closing_a_body_midway_stops_its_thread(
    server: Server, session: aiohttp.ClientSession
) -> None:
    """The reader leaves while the thread waits on a peer that sends nothing more: `aclose`
    wakes it (the socket is shut down) and returns once it has gone."""
    data = os.urandom(4 * MIB)
    done = asyncio.Event()

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(data)) + data[:MIB])
        await writer.drain()
        await done.wait()

    server.script = send
    async with taken_over(session, server, len(data), stall=60) as (body, _):
        await next_bytes(body)
        assert len(body_threads()) == 1
    await no_body_thread_left()
    done.set()


async def test_a_reader_that_takes_nothing_holds_the_thread_back(
    server: Server, session: aiohttp.ClientSession
) -> None:
    """At most `_AHEAD` pieces wait for the reader: memory stays bounded whatever the peer
    sends, and the rest stays in the socket until the reader takes pieces."""
    data = os.urandom(12 * MIB)

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(data)) + data)
        await writer.drain()

    server.script = send
    async with taken_over(session, server, len(data)) as (body, _):
        while len(body._pieces) < receiver._AHEAD:
            await body._arrived.wait()
            body._arrived.clear()
        # A moment in which a thread ignoring its bound would hand over more (a check that
        # nothing happens, not a wait for something to).
        await asyncio.to_thread(body._thread.join, 0.2)
        assert len(body._pieces) == receiver._AHEAD
        rest = await all_bytes(body)
    assert b"".join(rest) == data


async def test_a_sink_takes_the_body_on_the_thread_and_the_loop_gets_counts(
    server: Server, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(5 * MIB + 3)
    taken: list[tuple[int, bytes, str]] = []

    def sink(piece: memoryview, offset: int) -> int:
        taken.append((offset, bytes(piece), threading.current_thread().name))
        return len(piece)

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(data)) + data)
        await writer.drain()

    server.script = send
    async with taken_over(session, server, len(data), sink=sink, offset=1000) as (body, _):
        items = [item async for item in body]
    assert all(isinstance(item, int) for item in items), "bytes reached the event loop"
    assert sum(items) == len(data)  # type: ignore[arg-type]
    assert b"".join(piece for _, piece, _ in taken) == data
    offsets = [offset for offset, _, _ in taken]
    assert offsets[0] == 1000
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert {name for _, _, name in taken} == {"peer-body"}


async def test_what_the_sink_does_not_take_comes_to_the_loop_as_bytes(
    server: Server, session: aiohttp.ClientSession
) -> None:
    """Not its turn (0): that piece comes as bytes. Short, then None (its file is full): the
    rest of that piece and every later one come as bytes. In order, nothing lost."""
    data = os.urandom(6 * MIB)
    calls: list[int] = []
    placed = bytearray(len(data))

    def sink(piece: memoryview, offset: int) -> int | None:
        calls.append(offset)
        count = {1: 0, 2: len(piece), 3: len(piece) // 2}.get(len(calls))
        if count is not None:
            placed[offset : offset + count] = piece[:count]
        return count

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(data)) + data)
        await writer.drain()

    server.script = send
    position, kinds = 0, []
    async with taken_over(session, server, len(data), sink=sink) as (body, _):
        async for item in body:
            if isinstance(item, int):
                kinds.append("sunk")
                position += item
            else:
                kinds.append("bytes")
                placed[position : position + len(item)] = item
                position += len(item)
    assert position == len(data) and bytes(placed) == data
    assert len(calls) == 4, "the sink was asked again after it said it takes nothing more"
    assert kinds[:4] == ["bytes", "sunk", "sunk", "bytes"] and set(kinds[4:]) == {"bytes"}


@pytest.mark.parametrize(
    ("length", "extra", "why"),
    [
        (2 * MIB, "Content-Encoding: gzip\r\n", "content coding"),
        (receiver.TAKE_OVER_AT - 1, "", "short body"),
    ],
)
async def test_unusual_or_short_answers_are_left_to_aiohttp(
    server: Server, session: aiohttp.ClientSession, length: int, extra: str, why: str
) -> None:
    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(head(length, extra) + bytes(length))
        await writer.drain()

    server.script = send
    async with session.get(f"http://127.0.0.1:{server.port}/blob") as response:
        assert not can_take_over(response, length), why
        assert len(await response.read()) == length


async def test_a_chunked_answer_is_left_to_aiohttp(
    server: Server, session: aiohttp.ClientSession
) -> None:
    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        size = 2 * MIB
        writer.write(f"{size:x}\r\n".encode() + bytes(size) + b"\r\n0\r\n\r\n")
        await writer.drain()

    server.script = send
    async with session.get(f"http://127.0.0.1:{server.port}/blob") as response:
        assert not can_take_over(response, 2 * MIB)
        assert len(await response.read()) == 2 * MIB
