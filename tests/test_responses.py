"""Answers to clients that left: a node's probe gives up after a second while the holder may
still be waiting to answer it (its runtime's source not chosen yet). The answer then finds the
connection gone before its headers: nothing to send, and nothing logged as an error."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.registry.responses import send_chunks


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
