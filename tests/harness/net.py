"""Network helpers for the harness: free ports and readiness polling.

Readiness is always polled against a deadline; sleeping a fixed time would make tests
slow on fast machines and flaky on slow ones.
"""

from __future__ import annotations

import random
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

POLL_INTERVAL = 0.02
# Ports handed to daemons are drawn below the kernel's ephemeral range: a port the kernel picked
# (bind to 0) goes back into the pool the kernel gives client sockets, and a test making
# thousands of connections can take it as a connection's local port before the daemon binds it
# ("address already in use"). Below the range, only another test's pick can collide, and
# every pick is checked by binding it.
_LOWEST = 10000


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PICKER = random.Random()


def _pick(host: str, kind: socket.SocketKind) -> int:
    floor = _ephemeral_floor()
    for _ in range(200):
        port = _PICKER.randrange(_LOWEST, floor) if floor > _LOWEST + 100 else 0
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError(f"no free {kind.name} port on {host}")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago (below the ephemeral range)."""
    return _pick(host, socket.SOCK_STREAM)


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
    return _pick(host, socket.SOCK_DGRAM)
