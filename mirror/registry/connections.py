"""Bounds on the connections an HTTP port holds: a deadline for request heads, a cap per client.

Why this exists: aiohttp's server closes keep-alive connections that sit idle between
requests, but nothing bounds how long a request *head* may take to arrive. A client that
sends half a request line or half its headers and stalls keeps its socket, and the node's
file descriptor, as long as it likes (a probe of 200 such sockets found every one still open a
minute later). Many of them exhaust the node's descriptors, and then nothing can be pulled.

What it does, for every connection accepted on a port served by `GuardedServer`:

- **Head deadline.** A connection must deliver a complete request head within
  `HttpLimits.request_head_timeout` of opening, or, on a keep-alive connection, of the first
  byte of its next request. A connection that sends nothing at all is closed at the same
  deadline. The deadline is disarmed as soon as aiohttp hands the request to the application,
  and the connection is not watched again until that request's task has finished: the handler
  *and* the writing of the response (`loop.sendfile` included). So a response is never cut,
  however many minutes a big blob takes, and a keep-alive connection idle between requests is
  left to aiohttp's own keep-alive timeout.
- **Per-client cap.** At most `HttpLimits.max_connections_per_client` open connections per
  remote IP on each port (0: no cap); one past it is closed at once, before aiohttp sees it.

Both are counted in `mirror_connections_closed_total{reason}` and logged at most once a
minute each, with a count: a flood of bad connections must not become a flood of log lines.

How: the listening socket is made here with asyncio's `create_server`, not `web.TCPSite`, and
its protocol factory wraps each of aiohttp's per-connection protocols (made by the public
`web.Server` factory) in a `GuardedConnection`. The wrapper forwards every protocol callback
unchanged (connection_made, data_received, eof_received, connection_lost, pause_writing,
resume_writing); the transport is still aiohttp's, so flow control and `loop.sendfile` work as
before. aiohttp's internals are not touched.

The one coupling with the application is explicit: `GuardedServer` puts the middleware
`request_started` first in the app it serves. A middleware runs once aiohttp has parsed a whole
head (it runs for unrouted paths too; a head aiohttp cannot parse is answered 400 and the
connection closed by aiohttp itself). It finds its connection through the transport and hands
it the request's task: aiohttp runs each request (handler and response writing) in a task of
its own.

Knowing that a *next* request has begun needs one observation of the bytes: when a request
ends, were the last bytes received the blank line that ends a head? If they were, everything
received was whole requests (a pipelined one is handed over at once and disarms the deadline
again); if not, the client has sent part of something more, so the deadline starts at once.
A request body looks like "something more" too, so a keep-alive connection that sent a body is
closed after the head deadline rather than aiohttp's keep-alive timeout; the pull API has no
request bodies, and closing such a connection early costs a client one reconnect.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import cast

from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.config import HttpLimits
from mirror.metrics import Metrics

log = logging.getLogger(__name__)

# Connections the kernel queues before they are accepted. A pull starts many at once (every node
# of a rollout, every layer of an image); asyncio's default of 100 made the kernel drop SYNs in
# a 600-connection burst, and each dropped client waited a second for its retry (bench/load.py).
# nginx uses 511; the kernel caps it at net.core.somaxconn.
_BACKLOG = 1024

HEAD_TIMEOUT = "head-timeout"
PER_CLIENT_LIMIT = "per-client-limit"

# Logged at most once per this many seconds for each reason, with how many happened.
LOG_INTERVAL = 60.0

# A head ends with an empty line; aiohttp's parser takes CRLF line ends only.
_HEAD_END = b"\r\n\r\n"

ProtocolFactory = Callable[[], asyncio.Protocol]


def client_address(transport: asyncio.BaseTransport) -> str | None:
    """The remote IP of a TCP transport (an IPv4-mapped IPv6 address as IPv4), or None."""
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return None
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return peer[0]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class _RareLog:
    """One log line for the first event, then at most one per `LOG_INTERVAL`, with a count."""

    def __init__(self, loop: asyncio.AbstractEventLoop, level: int, message: str) -> None:
        self._loop = loop
        self._level = level
        self._message = message  # formatted with (count, last client)
        self._count = 0
        self._last_client = "?"
        self._quiet_until = 0.0
        self._pending: asyncio.TimerHandle | None = None

    def note(self, client: str | None) -> None:
        self._count += 1
        self._last_client = client or "?"
        if self._pending is not None:
            return
        if self._loop.time() >= self._quiet_until:
            self._emit()
        else:
            self._pending = self._loop.call_at(self._quiet_until, self._emit)

    def _emit(self) -> None:
        self._pending = None
        log.log(self._level, self._message, self._count, self._last_client)
        self._count = 0
        self._quiet_until = self._loop.time() + LOG_INTERVAL

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


class ConnectionPolicy:
    """The limits, shared by every port of a node, and the account of what they closed."""

    def __init__(self, limits: HttpLimits, metrics: Metrics) -> None:
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self._closed = metrics.connections_closed
        for reason in (HEAD_TIMEOUT, PER_CLIENT_LIMIT):
            self._closed.labels(reason)  # present at 0 from the start
        self._timeout_log = _RareLog(
            self.loop,
            logging.INFO,
            "closed %d connection(s) that sent no complete request head within "
            f"{limits.request_head_timeout:g}s (--request-head-timeout; the last from %s)",
        )
        self._refusal_log = _RareLog(
            self.loop,
            logging.WARNING,
            "refused %d connection(s) from clients already holding "
            f"{limits.max_connections_per_client} (--max-connections-per-client; "
            "the last from %s)",
        )

    def refused(self, client: str | None) -> None:
        self._closed.labels(PER_CLIENT_LIMIT).inc()
        self._refusal_log.note(client)

    def head_timed_out(self, client: str | None) -> None:
        self._closed.labels(HEAD_TIMEOUT).inc()
        self._timeout_log.note(client)

    def close(self) -> None:
        self._timeout_log.close()
        self._refusal_log.close()


class ConnectionGuard:
    """One listening port: the connections each client holds open on it."""

    def __init__(self, policy: ConnectionPolicy) -> None:
        self.policy = policy
        self.limits = policy.limits
        self.loop = policy.loop
        self._open: dict[str, int] = {}

    def protocol_factory(self, inner: ProtocolFactory) -> ProtocolFactory:
        """A factory for `create_server`: `inner`'s protocols, each wrapped and guarded."""
        return lambda: GuardedConnection(self, inner)

    def admit(self, client: str | None) -> bool:
        """Count a new connection of `client`; False (counted as refused) past the cap."""
        if client is None:
            return True
        held = self._open.get(client, 0)
        cap = self.limits.max_connections_per_client
        if cap and held >= cap:
            self.policy.refused(client)
            return False
        self._open[client] = held + 1
        return True

    def release(self, client: str | None) -> None:
        if client is None:
            return
        held = self._open.get(client, 0) - 1
        if held > 0:
            self._open[client] = held
        else:
            self._open.pop(client, None)


class GuardedConnection(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind a per-client cap and a head deadline.

    Every callback of the transport is forwarded unchanged to the wrapped protocol, which is
    made only once the connection is admitted.
    """

    __slots__ = (
        "_client",
        "_deadline",
        "_guard",
        "_in_flight",
        "_inner",
        "_make_inner",
        "_tail",
        "_transport",
    )

    def __init__(self, guard: ConnectionGuard, make_inner: ProtocolFactory) -> None:
        self._guard = guard
        self._make_inner = make_inner
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._client: str | None = None
        # Requests handed to the application whose task (handler, response) has not ended.
        self._in_flight = 0
        self._deadline: asyncio.TimerHandle | None = None
        # The last bytes received, to tell whether they ended a request head.
        self._tail = b""

    # -- the protocol, forwarded ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        client = client_address(transport)
        if not self._guard.admit(client):
            transport.close()
            return
        self._client = client
        self._inner = self._make_inner()
        self._arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        inner = self._inner
        if inner is None:
            return
        self._tail = data[-4:] if len(data) >= 4 else (self._tail + data)[-4:]
        if self._in_flight == 0 and self._deadline is None:
            self._arm()  # the first byte of a next request on a keep-alive connection
        inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self._inner is None else self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        inner, self._inner = self._inner, None
        self._transport = None
        if inner is None:  # refused: never counted, never seen by aiohttp
            return
        self._guard.release(self._client)
        inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # -- the head deadline ------------------------------------------------------------------

    def request_started(self, task: asyncio.Task[object]) -> None:
        """A whole request head arrived; `task` handles it and writes its response."""
        self._disarm()
        self._in_flight += 1
        task.add_done_callback(self._request_finished)

    def _request_finished(self, task: asyncio.Task[object]) -> None:
        self._in_flight -= 1
        if self._in_flight or self._inner is None:
            return
        if self._tail != _HEAD_END:
            # Bytes past the last whole head: part of a next request is already here.
            self._arm()

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self._guard.loop.call_later(
                self._guard.limits.request_head_timeout, self._head_timed_out
            )

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_timed_out(self) -> None:
        self._deadline = None
        if self._in_flight or self._transport is None or self._transport.is_closing():
            return
        self._guard.policy.head_timed_out(self._client)
        self._transport.close()


@web.middleware
async def request_started(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the request's connection that its head arrived and which task answers it."""
    transport = request.transport
    connection = transport.get_protocol() if transport is not None else None
    task = asyncio.current_task()
    if isinstance(connection, GuardedConnection) and task is not None:
        connection.request_started(task)
    return await handler(request)


class GuardedServer:
    """An aiohttp application listening on one port, its connections guarded (see above).

    Used instead of `web.AppRunner` + `web.TCPSite`: the same runner serves the application,
    only the listening socket is made here, with the guarded protocol factory.
    """

    def __init__(
        self,
        app: web.Application,
        policy: ConnectionPolicy,
        *,
        access_log: logging.Logger | None,
        logger: logging.Logger,
    ) -> None:
        # First, so it sees every request before any other middleware can answer it.
        app.middlewares.insert(0, request_started)
        self._runner = web.AppRunner(app, access_log=access_log, logger=logger)
        self._guard = ConnectionGuard(policy)
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one the kernel chose, for port 0)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port; OSError when the address cannot be bound."""
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        try:
            self._server = await self._guard.loop.create_server(
                self._guard.protocol_factory(server),
                host,
                port,
                reuse_address=True,
                backlog=_BACKLOG,
            )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop listening, then shut the application down as `AppRunner.cleanup` does."""
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._runner.cleanup()
