"""Signing and verifying peer-to-peer HTTP requests.

A peer request carries `X-Mirror-Peer: v1 <unix-ms> <nonce> <mac>`, the MAC covering the method,
the path with its query, the time and the nonce. A node answers a signed request from its own
store only, never from its peers, so a request can never loop through the cluster; and a request
without a valid signature can only come from the node's own runtime (loopback or an allowed
CIDR), so no outsider can use a node as a proxy.
"""

from __future__ import annotations

import base64
import secrets
import time

from mirror.clusterkey import FRESHNESS_SECONDS, ClusterKey, ReplayGuard

PEER_HEADER = "X-Mirror-Peer"
_VERSION = "v1"
# Unix milliseconds have 13 digits until the year 2286; anything longer is not a time.
_MAX_STAMP_DIGITS = 15


class RequestSigner:
    def __init__(self, key: ClusterKey) -> None:
        self._key = key.purpose("http")

    def sign(self, method: str, path_qs: str, *, now: float | None = None) -> str:
        stamp = str(int((time.time() if now is None else now) * 1000))
        nonce = secrets.token_hex(12)
        mac = self._key.mac(method.encode(), path_qs.encode(), stamp.encode(), nonce.encode())
        return f"{_VERSION} {stamp} {nonce} {base64.b64encode(mac).decode()}"


class RequestVerifier:
    """Checks signatures, their freshness, and that no signature is used twice."""

    def __init__(self, key: ClusterKey) -> None:
        self._key = key.purpose("http")
        self._replays = ReplayGuard(FRESHNESS_SECONDS)

    def verify(self, header: str, method: str, path_qs: str, *, now: float | None = None) -> bool:
        current = time.time() if now is None else now
        parts = header.split(" ")
        if len(parts) != 4 or parts[0] != _VERSION or not _is_timestamp(parts[1]):
            return False
        _, stamp, nonce, mac_text = parts
        sent_at = int(stamp) / 1000
        if abs(current - sent_at) > FRESHNESS_SECONDS:
            return False
        try:
            mac = base64.b64decode(mac_text, validate=True)
        except ValueError:
            return False
        if not self._key.verify(
            mac, method.encode(), path_qs.encode(), stamp.encode(), nonce.encode()
        ):
            return False
        return self._replays.first_use(nonce, sent_at, current)


def _is_timestamp(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` also takes "²") and few enough to be a time."""
    return text.isascii() and text.isdigit() and len(text) <= _MAX_STAMP_DIGITS
