"""Connection limits of a real `mirror run` node: request-head deadline and per-client cap.

Real sockets on loopback against the node's own servers (registry and metrics port). No sleep
stands for synchronisation: a test waits for a socket's EOF, or a response, with a deadline.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness.mirror_node import MirrorNode, start_mirror
from harness.process import stop_all

from mirror.cli import build_parser, run_config
from mirror.config import HttpLimits

HEAD_TIMEOUT = 1.0
BLOB_SIZE = 32 * 1024 * 1024
FULL_REQUEST = b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n\r\n"


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., MirrorNode]]:
    """`mirror run --store cache` nodes on loopback, each with a directory; all stopped."""
    started: list[MirrorNode] = []

    def make(*args: str, blob: bytes | None = None) -> MirrorNode:
        base = tmp_path / f"node{len(started)}"
        if blob is not None:
            held = base / "cache" / "blobs" / "sha256" / hashlib.sha256(blob).hexdigest()
            held.parent.mkdir(parents=True)
            held.write_bytes(blob)
        node = start_mirror(base, "--store=cache", "--upstream-fallback=false", *args)
        started.append(node)
        return node

    yield make
    stop_all(started)


def connect(
    node: MirrorNode, *, port: int | None = None, source: str | None = None
) -> socket.socket:
    address = (node.host, port or node.port)
    return socket.create_connection(
        address, timeout=10, source_address=(source, 0) if source else None
    )


def wait_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Read until the node closes the connection: what came, and when (monotonic).

    Raises TimeoutError if it is still open after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    received = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"still open after {timeout}s; received {received[:200]!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        except TimeoutError:
            continue
        if not chunk:
            return received, time.monotonic()
        received += chunk


def read_response(sock: socket.socket, timeout: float = 10) -> tuple[bytes, bytes]:
    """One response (status line and headers, body by Content-Length) off a keep-alive socket."""
    sock.settimeout(timeout)
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {buffer!r}")
        buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)\r?$", head)
    assert match is not None, head
    length = int(match[1])
    while len(body) < length:
        chunk = sock.recv(min(1 << 20, length - len(body)))
        if not chunk:
            raise ConnectionError(f"closed after {len(body)} of {length} body bytes")
        body += chunk
    assert len(body) == length, "more than one response"
    return head, body


def served(sock: socket.socket) -> bool:
    """Whether a whole request on `sock` gets an answer (False: the node closed it)."""
    try:
        sock.sendall(FULL_REQUEST)
        head, _ = read_response(sock)
    except (ConnectionError, TimeoutError):
        return False
    return head.startswith(b"HTTP/1.1 200 ")


def poll_metric(node: MirrorNode, reason: str, expected: float, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (value := node.metric("mirror_connections_closed_total", reason=reason)) != expected:
        assert time.monotonic() < deadline, f"{reason}: {value}, expected {expected}"
        time.sleep(0.02)


def test_incomplete_requests_are_closed_but_slow_responses_and_idle_keep_alive_are_not(
    node_factory: Callable[..., MirrorNode],
) -> None:
    blob = os.urandom(BLOB_SIZE)
    digest = hashlib.sha256(blob).hexdigest()
    node = node_factory(f"--request-head-timeout={HEAD_TIMEOUT:g}s", blob=blob)

    # A client pulling a big blob that it reads slowly: nothing at all until the end.
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    slow.connect((node.host, node.port))
    blob_request = f"GET /v2/library/app/blobs/sha256:{digest} HTTP/1.1\r\nHost: m\r\n\r\n"
    slow.sendall(blob_request.encode())
    slow.settimeout(10)
    first = slow.recv(4096)
    assert first.startswith(b"HTTP/1.1 200 "), first[:200]

    # Keep-alive connections that finished a request: one stays idle, one starts another
    # request and stalls in it.
    idle, stalls_second = connect(node), connect(node)
    for sock in (idle, stalls_second):
        assert served(sock)
    opened = time.monotonic()
    stalled = {
        "half a request line": connect(node),
        "half the headers": connect(node),
        "nothing at all": connect(node),
        "a whole request, then half of the next": connect(node),
        "half the headers, metrics port": connect(node, port=node.metrics_port),
    }
    stalled["half a request line"].sendall(b"GET /v2/ HT")
    stalled["half the headers"].sendall(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nAcc")
    stalled["a whole request, then half of the next"].sendall(FULL_REQUEST + b"GET /v2/ HT")
    stalled["half the headers, metrics port"].sendall(b"GET /metrics HTTP/1.1\r\nHo")
    stalls_second.sendall(b"GET /v2/ HTTP/1.1\r\nHo")
    stalled["on keep-alive, half of the second request"] = stalls_second

    for what, sock in stalled.items():
        received, closed_at = wait_closed(sock, timeout=10 * HEAD_TIMEOUT)
        assert closed_at - opened >= 0.9 * HEAD_TIMEOUT, what
        whole = what == "a whole request, then half of the next"
        assert received.startswith(b"HTTP/1.1 200 ") == whole, (what, received[:200])
        sock.close()
    assert time.monotonic() - opened > HEAD_TIMEOUT

    # The idle keep-alive connection outlived the head deadline and still serves a request.
    assert served(idle)
    idle.close()

    # The slow response was never cut: the whole blob arrives, intact.
    received = first
    slow.settimeout(30)
    while b"\r\n\r\n" not in received:
        received += slow.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    assert f"content-length: {BLOB_SIZE}".encode() in head.lower()
    hasher = hashlib.sha256(body)
    got = len(body)
    while got < BLOB_SIZE:
        chunk = slow.recv(1 << 20)
        assert chunk, f"cut after {got} of {BLOB_SIZE} bytes"
        hasher.update(chunk)
        got += len(chunk)
    assert got == BLOB_SIZE and hasher.hexdigest() == digest
    slow.close()

    poll_metric(node, "head-timeout", len(stalled))
    assert node.metric("mirror_connections_closed_total", reason="per-client-limit") == 0
    # Six closes in a second: one log line now, a count at most a minute later.
    log = node.process.log_text()
    assert len(re.findall(r"that sent no complete request head", log)) == 1, log[-3000:]


def test_connections_past_the_per_client_cap_are_closed_at_once(
    node_factory: Callable[..., MirrorNode],
) -> None:
    cap = 4
    node = node_factory(f"--max-connections-per-client={cap}", "--request-head-timeout=60s")
    held = [connect(node) for _ in range(cap)]
    for sock in held:
        assert served(sock)

    refused = [connect(node) for _ in range(3)]
    for sock in refused:
        started = time.monotonic()
        received, closed_at = wait_closed(sock, timeout=10)
        assert received == b""
        assert closed_at - started < 5  # at once, not at the 60 s head deadline
        sock.close()
    poll_metric(node, "per-client-limit", 3)

    # Another client address is not held back by this one's connections.
    other = connect(node, source="127.0.0.2")
    assert served(other)
    other.close()
    # The held connections are untouched.
    for sock in held:
        assert served(sock)

    # Closing two makes room for two: the node learns of a close asynchronously, so poll.
    for sock in held[:2]:
        sock.close()
    del held[:2]
    deadline = time.monotonic() + 10
    while len(held) < cap:
        assert time.monotonic() < deadline, "closed connections were never released"
        sock = connect(node)
        if served(sock):
            held.append(sock)
        else:
            sock.close()
            time.sleep(0.02)
    past = connect(node)
    assert wait_closed(past, timeout=10)[0] == b""
    past.close()
    for sock in held:
        sock.close()

    # Refusals are counted one by one but logged rarely: one line for the first burst.
    log = node.process.log_text()
    assert len(re.findall(r"refused \d+ connection", log)) == 1, log[-3000:]


def test_the_limits_come_from_flags_and_the_environment() -> None:
    environ = {"MIRROR_MAX_CONNECTIONS_PER_CLIENT": "0"}
    config = run_config(build_parser(environ).parse_args(["run", "--request-head-timeout=2s"]))
    assert config.http_limits == HttpLimits(request_head_timeout=2.0, max_connections_per_client=0)
    defaults = run_config(build_parser({}).parse_args(["run"])).http_limits
    assert defaults == HttpLimits(request_head_timeout=10.0, max_connections_per_client=512)
    for bad in ("-1", "many", "1.5"):
        with pytest.raises(SystemExit):
            build_parser({}).parse_args(["run", f"--max-connections-per-client={bad}"])
