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
from collections import OrderedDict

from mirror.clusterkey import ClusterKey

PEER_HEADER = "X-Mirror-Peer"
_VERSION = "v1"
# Clocks of a cluster agree within seconds; a signature older than this is refused.
FRESHNESS_SECONDS = 30.0
_MAX_REMEMBERED_NONCES = 100_000


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
        self._seen: OrderedDict[str, float] = OrderedDict()

    def verify(self, header: str, method: str, path_qs: str, *, now: float | None = None) -> bool:
        current = time.time() if now is None else now
        parts = header.split(" ")
        if len(parts) != 4 or parts[0] != _VERSION or not parts[1].isdigit():
            return False
        _, stamp, nonce, mac_text = parts
        if abs(current - int(stamp) / 1000) > FRESHNESS_SECONDS:
            return False
        try:
            mac = base64.b64decode(mac_text, validate=True)
        except ValueError:
            return False
        if not self._key.verify(
            mac, method.encode(), path_qs.encode(), stamp.encode(), nonce.encode()
        ):
            return False
        self._forget_older_than(current - FRESHNESS_SECONDS)
        if nonce in self._seen:
            return False
        self._seen[nonce] = current
        return True

    def _forget_older_than(self, cutoff: float) -> None:
        while self._seen and (
            next(iter(self._seen.values())) < cutoff or len(self._seen) > _MAX_REMEMBERED_NONCES
        ):
            self._seen.popitem(last=False)
