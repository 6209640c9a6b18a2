"""Reading a whole HTTP body with a cap, for bodies that must fit in memory.

Manifests from peers and upstream registries and JSON from orchestrator APIs are read whole; a
peer or server that sends more than the cap (by mistake or on purpose) must cost a bounded
amount of memory, whatever its `Content-Length` claims. So are the JSON bodies the node's own
API takes (pins, distributions, webhooks), which anyone who reaches the port can send.
"""

from __future__ import annotations

import json

import aiohttp
from aiohttp import web

from mirror.errors import BodyTooLarge, RequestInvalid

_CHUNK = 64 * 1024


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, at most `limit` bytes; raises `BodyTooLarge` past that.

    A declared `Content-Length` over the cap is refused before reading anything. Transport
    errors (`aiohttp.ClientError`, `TimeoutError`) propagate for the caller to describe.
    """
    if (response.content_length or 0) > limit:
        raise BodyTooLarge(f"body of {response.content_length} bytes exceeds {limit} bytes")
    body = bytearray()
    async for chunk in response.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"body exceeds {limit} bytes")
    return bytes(body)


async def read_json_request(request: web.Request, limit: int) -> object:
    """A request's JSON body, at most `limit` bytes; `RequestInvalid` (a 400) otherwise."""
    if (request.content_length or 0) > limit:
        raise RequestInvalid(f"the body is larger than {limit} bytes")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise RequestInvalid(f"the body is larger than {limit} bytes")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestInvalid(f"the body is not JSON: {exc}") from exc
