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
from collections.abc import AsyncIterator
from typing import BinaryIO

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
            await asyncio.get_running_loop().sendfile(
                transport, self._fileobj, self._offset, self._count
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
                    sent = await asyncio.get_running_loop().sendfile(
                        transport, part.file, part.offset, part.count, fallback=False
                    )
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
