"""A real `mirror run --store cache` process, spoken to in bytes no HTTP client would send."""

from __future__ import annotations

import re
import socket

from harness.cluster import MirrorFactory

MALFORMED = [
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nAccept: \x7f\x7f\r\n\r\n",  # a control character
    b"GET /v2/a b/manifests/x HTTP/1.1\r\nHost: x\r\n\r\n",  # a space in the target
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nno colon here\r\n\r\n",
]


def exchange(host: str, port: int, request: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=10) as connection:
        connection.sendall(request)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def test_malformed_requests_get_400_and_one_log_line_each(mirror_factory: MirrorFactory) -> None:
    node = mirror_factory("--store=cache")
    for request in MALFORMED:
        answer = exchange(node.host, node.port, request)
        # aiohttp answers before any handler runs: plain text, as HTTP/1.0 when unparsable.
        assert re.match(rb"HTTP/1\.[01] 400 ", answer), (request, answer[:200])
    # The node is unharmed, and its log holds a line per bad request, no traceback.
    fine = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert exchange(node.host, node.port, fine).startswith(b"HTTP/1.1 200 ")
    log = node.process.log_text()
    lines = [line for line in log.splitlines() if "malformed request" in line]
    assert len(lines) == len(MALFORMED), log[-3000:]
    assert "Traceback" not in log
    assert " ERROR " not in log
