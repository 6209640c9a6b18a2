"""Network helpers for the harness: free ports and readiness polling.

Readiness is always polled against a deadline; sleeping a fixed time would make tests
slow on fast machines and flaky on slow ones.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

POLL_INTERVAL = 0.02


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago.

    Binding port 0 lets the kernel pick; there is a small race until the daemon binds it,
    which is acceptable for tests on loopback.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_tcp(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until ``host:port`` accepts a TCP connection, or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            last_error = exc
        time.sleep(POLL_INTERVAL)
    raise TimeoutError(f"{host}:{port} did not accept connections in {timeout}s: {last_error}")


def wait_for_http(url: str, timeout: float = 10.0) -> int:
    """Block until ``url`` gives any HTTP answer (even 4xx/5xx); return its status code.

    Any status counts because e.g. a registry demanding auth answers ``/v2/`` with 401 and
    is nonetheless up.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (OSError, urllib.error.URLError) as exc:
            last_error = exc
        time.sleep(POLL_INTERVAL)
    raise TimeoutError(f"{url} gave no HTTP answer in {timeout}s: {last_error}")


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port that was free on ``host`` a moment ago (for DHT routers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
