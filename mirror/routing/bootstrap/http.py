"""The one HTTP GET the Kubernetes and Nomad sources make, and how its failures read.

Both ask a cluster-local JSON API with a token, seconds to minutes apart, and both must turn
any failure into one warning line rather than an exception (a source never raises). That
shared part lives here so the two clients hold only what their APIs differ in: paths,
paging, and the shape of the answer.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from mirror.bodies import read_capped
from mirror.errors import BodyTooLarge

# A request slower than this counts as failed. The API servers are cluster-local, and a
# refresh comes soon enough that waiting longer would only delay a node's start.
REQUEST_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
# A server that keeps handing out continue tokens (a bug, or a huge cluster) is not
# followed forever; the pages read so far are used.
MAX_PAGES = 100
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


class LookupFailed(Exception):
    """A request that gave no usable answer; the text goes into one warning line."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def open_session(timeout: float, *, socket_path: str | None = None) -> aiohttp.ClientSession:
    """A session for one lookup: lookups are seconds to minutes apart, so none is kept open.

    ``trust_env`` stays off: an HTTP(S)_PROXY meant for upstream registries must not carry
    cluster API requests, and their tokens, elsewhere.
    """
    connector = aiohttp.UnixConnector(path=socket_path) if socket_path else None
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout, connect=min(CONNECT_TIMEOUT, timeout)),
    )


async def get_json(
    client: aiohttp.ClientSession,
    url: URL,
    *,
    params: Mapping[str, str],
    headers: Mapping[str, str],
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None = None,
    socket_path: str | None = None,
) -> tuple[Any, CIMultiDictProxy[str]]:
    """GET and decode JSON; any failure, HTTP status other than 200 included, as LookupFailed.

    Redirects are not followed, so a token never travels to another host. ``socket_path``
    only names the Unix socket in messages (the session's connector uses it).
    """
    try:
        async with client.get(
            url,
            params=params,
            headers=headers,
            ssl=ssl_context if ssl_context is not None else True,
            server_hostname=server_hostname,
            allow_redirects=False,
        ) as response:
            body = await read_capped(response, MAX_RESPONSE_BYTES)
            status, response_headers = response.status, response.headers
    except BodyTooLarge:
        raise LookupFailed(f"response larger than {MAX_RESPONSE_BYTES} bytes") from None
    except TimeoutError:
        raise LookupFailed("timed out") from None
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise LookupFailed(describe(exc, socket_path=socket_path)) from None
    if status != 200:
        raise LookupFailed(f"HTTP {status}{error_detail(body)}", status=status)
    try:
        return json.loads(body), response_headers
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise LookupFailed(f"malformed JSON: {exc}") from None


def error_detail(body: bytes) -> str:
    """``: message`` from a Kubernetes Status object or a plain-text error, on one line.

    Public for the prefetch Kubernetes watch, which reads its streamed answers itself.
    """
    text = body.decode("utf-8", "replace")
    try:
        decoded = json.loads(text)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("message"), str):
        text = decoded["message"]
    text = " ".join(text.split())
    if len(text) > 200:
        text = text[:200] + "…"
    return f": {text}" if text else ""


def describe(exc: BaseException, *, socket_path: str | None = None) -> str:
    """One line: an OSError's strerror (callers name the path), where a connection failed."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        text = f"TLS to {exc.host}:{exc.port} failed: {exc.certificate_error}"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        reason = os.strerror(error.errno) if error.errno else error.strerror or str(error)
        where = socket_path or f"{exc.host}:{exc.port}"
        text = f"cannot connect to {where}: {reason}"
    elif isinstance(exc, OSError) and not isinstance(exc, aiohttp.ClientError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc)
    return " ".join((text or type(exc).__name__).split())
