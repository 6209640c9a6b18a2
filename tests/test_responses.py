"""Answers to clients that left: a node's probe gives up after a second while the holder may
still be waiting to answer it (its runtime's source not chosen yet). The answer then finds the
connection gone before its headers: nothing to send, and nothing logged as an error."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.registry.responses import send_chunks, send_file_range, sent_at_once


@pytest.mark.parametrize("method", ["HEAD", "GET"])
async def test_a_client_gone_before_the_headers_costs_no_error(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client_gone = asyncio.Event()
    answered: asyncio.Future[web.StreamResponse] = asyncio.get_running_loop().create_future()

    async def slow(request: web.Request) -> web.StreamResponse:
        await client_gone.wait()
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.01)  # until the server saw the connection close
        response = await send_chunks(request, _one_chunk(), 5, status=200, headers={})
        answered.set_result(response)
        return response

    app = web.Application()
    app.router.add_route("*", "/blob", slow)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"{method} /blob HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        client_gone.set()
        async with asyncio.timeout(5):
            await answered
    finally:
        await server.close()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert any("left before its answer" in r.getMessage() for r in caplog.records)


async def _one_chunk() -> AsyncIterator[bytes]:
    yield b"12345"


async def _serve_file_range(
    tmp_path: Path, size: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[bytes, bytes, list[int]]:
    """A plain-HTTP answer sent with `send_file_range` from a file of `size` random bytes, read
    by a client that waits for the whole send before it reads: what the client got, the file,
    and the byte counts the loop's sendfile was asked for."""
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    loop = asyncio.get_running_loop()
    asked: list[int] = []
    loop_sendfile = loop.sendfile

    async def counted(
        transport: Any, file: Any, offset: int = 0, count: int | None = None, **kw: Any
    ) -> int:
        asked.append(count or 0)
        return await loop_sendfile(transport, file, offset, count, **kw)

    monkeypatch.setattr(loop, "sendfile", counted)
    handed_over = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(size)})
        await response.prepare(request)
        assert request.transport is not None
        with path.open("rb") as file:
            sent = await send_file_range(request.transport, file, 0, size)
        handed_over.set()
        assert sent == size
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/blob", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        if size < 64 * 1024:  # fits any socket buffer: taken before the client reads a byte
            async with asyncio.timeout(5):
                await handed_over.wait()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.readexactly(size)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
        await writer.wait_closed()
    finally:
        await server.close()
    return body, data, asked


async def test_a_part_the_socket_has_room_for_is_sent_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A growing blob's part that fits the socket's buffer goes out in one system call, with no
    turn of the event loop waiting for the socket (the loop's sendfile is not used)."""
    body, data, asked = await _serve_file_range(tmp_path, 32 * 1024, monkeypatch)
    assert body == data
    assert asked == []


async def test_what_the_socket_has_no_room_for_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More than the socket's buffer takes: the rest goes with the loop's sendfile, which
    waits for room, and the client gets every byte in order after the headers."""
    size = 64 * 1024 * 1024
    body, data, asked = await _serve_file_range(tmp_path, size, monkeypatch)
    assert body == data
    assert len(asked) == 1 and 0 < asked[0] < size


class _Unsendable(asyncio.WriteTransport):
    """A transport `sent_at_once` must leave alone: its socket is never asked for."""

    def __init__(self, *, buffered: int = 0, tls: bool = False) -> None:
        super().__init__()
        self._buffered = buffered
        self._tls = tls

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            raise AssertionError("the socket is not used")
        if name == "sslcontext" and self._tls:
            return ssl.create_default_context()
        return default


@pytest.mark.parametrize(
    "transport",
    [
        # Bytes the transport still holds go first: a raw send would put the file's before them.
        _Unsendable(buffered=10),
        # A raw send on a TLS connection's socket would be bytes outside its records.
        _Unsendable(tls=True),
    ],
    ids=["bytes-buffered", "tls"],
)
async def test_nothing_is_sent_at_once_around_the_transport(transport: _Unsendable) -> None:
    assert sent_at_once(transport, io.BytesIO(b"x"), 0, 1) == 0
