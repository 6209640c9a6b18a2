"""Response bodies: OCI error JSON, and blobs sent with sendfile or streamed chunk by chunk.

A blob held here goes out with sendfile from its open file; one still downloading here goes
out with sendfile too, from the download's growing temp file, part by part as it arrives; only
bytes that never touch this node's disk (a peer's or upstream's stream passed on, a download the
cache could not keep) go through the process chunk by chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import BinaryIO, Protocol

from aiohttp import web

from mirror.errors import MirrorError, RangeNotSatisfiable, RegistryError
from mirror.stores.base import BlobSource, FileBlob, PartReader

log = logging.getLogger(__name__)

API_VERSION_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}


def error_response(error: RegistryError) -> web.Response:
    entry: dict[str, object] = {"code": error.code, "message": error.message}
    if error.detail is not None:
        entry["detail"] = error.detail
    headers = dict(API_VERSION_HEADER)
    if isinstance(error, RangeNotSatisfiable):
        headers["Content-Range"] = f"bytes */{error.size}"
    return web.Response(
        status=error.status,
        body=json.dumps({"errors": [entry]}).encode(),
        content_type="application/json",
        headers=headers,
    )


class _FileLike(Protocol):
    def fileno(self) -> int: ...


def sent_at_once(
    transport: asyncio.WriteTransport, file: _FileLike, offset: int, count: int
) -> int:
    """How many of `count` bytes of `file` from `offset` the kernel took into the socket's
    buffer straight away, with no wait (sendfile on the transport's socket).

    Why: the parts of a growing blob (1 MiB as the runtime writes them) usually fit the socket's
    buffer whole, and the loop's sendfile spends three turns of the event loop on each: the
    send, a wake-up once the socket is writable again, then its result. At 16 nodes that was a
    third of what serving growing blobs cost a node (docs/benchmarks.md). 0 when the transport
    cannot take a raw send now (TLS, bytes of its own still buffered, closing) or the socket is
    full; the caller sends the rest with the loop's sendfile, which waits for room. Nothing
    yields between the check of the transport's buffer and the send, so the bytes keep their
    place in the stream. A connection broken meanwhile raises `ConnectionError`."""
    if (
        transport.is_closing()
        or transport.get_extra_info("sslcontext") is not None
        or transport.get_write_buffer_size()
    ):
        return 0
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    sent = 0
    while sent < count:
        try:
            taken = os.sendfile(sock.fileno(), file.fileno(), offset + sent, count - sent)
        except (BlockingIOError, InterruptedError):
            break
        if taken == 0:  # the file ends here: the caller's count check reports it
            break
        sent += taken
    return sent


async def send_file_range(
    transport: asyncio.WriteTransport,
    file: BinaryIO,
    offset: int,
    count: int,
    *,
    fallback: bool = False,
) -> int:
    """Send `count` bytes of `file` from `offset` with the kernel's sendfile: at once where the
    socket has room, the rest with the loop's. Where the transport cannot sendfile (TLS) that
    raises `RuntimeError`, or with `fallback` reads and writes instead. Returns the bytes sent
    (fewer only if the file ended)."""
    sent = sent_at_once(transport, file, offset, count)
    if sent < count:
        sent += await asyncio.get_running_loop().sendfile(
            transport, file, offset + sent, count - sent, fallback=fallback
        )
    return sent


class SendfileResponse(web.StreamResponse):
    """A slice of an open file, sent with the kernel's sendfile on plain HTTP.

    aiohttp's FileResponse opens files by path; we need to serve a file we already hold open.
    """

    def __init__(
        self, fileobj: BinaryIO, offset: int, count: int, *, status: int, headers: dict[str, str]
    ) -> None:
        super().__init__(status=status, headers=headers)
        self.content_length = count
        self._fileobj = fileobj
        self._offset = offset
        self._count = count

    async def send(self, request: web.Request) -> None:
        if not await prepared(self, request) or request.method == "HEAD" or self._count == 0:
            return
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("client went away")
        # Where the transport cannot sendfile (TLS), asyncio falls back to reading and writing.
        try:
            await send_file_range(
                transport, self._fileobj, self._offset, self._count, fallback=True
            )
        except ConnectionError as exc:
            # The client went away mid-body (a runtime cancelled its pull): nothing to answer.
            log.info("client of %s left during the body: %s", request.path, exc)
            transport.close()
            return
        await self.write_eof()


async def send_blob(
    request: web.Request,
    blob: BlobSource,
    offset: int,
    count: int,
    *,
    status: int,
    headers: dict[str, str],
) -> web.StreamResponse:
    """Send `count` bytes of `blob` from `offset`; the body is fully sent when this returns."""
    if isinstance(blob, FileBlob):
        response = SendfileResponse(blob.fileobj, offset, count, status=status, headers=headers)
        await response.send(request)
        return response
    chunks = blob.iter_range(offset, count) if request.method != "HEAD" and count else None
    return await send_chunks(request, chunks, count, status=status, headers=headers)


async def send_growing(
    request: web.Request,
    reader: PartReader,
    count: int,
    *,
    status: int,
    headers: dict[str, str],
) -> web.StreamResponse:
    """Send `count` bytes of a blob still arriving (a download here, or the runtime's), the
    reader's range, as they arrive.

    What is on disk goes out with the kernel's sendfile from the growing file, each
    time as much as has arrived (the reader waits for more; the last byte comes only once the
    digest matched). Bytes passing through memory (the cache could not keep the blob) are
    written as they are. The body never enters the process twice, so memory stays flat, and
    the event loop only schedules. If the download fails, the connection is cut, so the client
    never takes a short body for a whole one. The reader is closed when this returns.
    """
    try:
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = count
        if not await prepared(response, request) or request.method == "HEAD" or count == 0:
            return response
        try:
            while (part := await reader.next_part()) is not None:
                if isinstance(part, bytes):
                    await response.write(part)
                    continue
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("client went away")
                try:
                    sent = await send_file_range(transport, part.file, part.offset, part.count)
                    if sent != part.count:  # the file ended early: never send a short body
                        raise EOFError(f"sent {sent} of {part.count} bytes from {part.offset}")
                except RuntimeError:
                    # No sendfile on this transport (TLS): positioned reads, written as usual.
                    if transport.is_closing():
                        raise ConnectionResetError("client went away") from None
                    async for chunk in part.chunks():
                        await response.write(chunk)
        except ConnectionError as exc:
            log.info("client of %s left during the body: %s", request.path, exc)
            _cut(request)
            return response
        except (OSError, EOFError, MirrorError) as exc:
            log.warning("stream of %s aborted: %s", request.path, exc)
            _cut(request)
            return response
        await response.write_eof()
        return response
    finally:
        await reader.aclose()


async def prepared(response: web.StreamResponse, request: web.Request) -> bool:
    """Send the status line and headers; False when the client already left (a node's probe
    that gave up while this one waited for its answer): nothing to answer, no error."""
    try:
        await response.prepare(request)
    except ConnectionError as exc:
        log.info("client of %s left before its answer: %s", request.path, exc)
        _cut(request)
        return False
    return True


def _cut(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


async def send_chunks(
    request: web.Request,
    chunks: AsyncIterator[bytes] | None,
    count: int,
    *,
    status: int,
    headers: dict[str, str],
) -> web.StreamResponse:
    """Stream `count` bytes as they come (None: headers only, for HEAD).

    If the source fails mid-body (a peer dies, a digest does not match) the connection is cut,
    so the client sees a short body and an error, never a response it could take for complete.
    """
    streamed = web.StreamResponse(status=status, headers=headers)
    streamed.content_length = count
    if not await prepared(streamed, request) or chunks is None or request.method == "HEAD":
        return streamed
    try:
        async for chunk in chunks:
            await streamed.write(chunk)
    except (OSError, EOFError, MirrorError) as exc:
        log.warning("stream of %s aborted: %s", request.path, exc)
        if request.transport is not None:
            request.transport.close()
        return streamed
    finally:
        # Release the source (a peer connection) now, not whenever the generator is collected.
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
    await streamed.write_eof()
    return streamed
