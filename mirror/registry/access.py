"""Who may use the registry API: the node's own runtime, and authenticated peers.

Without this a node on a routable address is an open proxy into the cluster's images (and, with
upstream fallback, into the registries it mirrors).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from aiohttp import web

from mirror.config import IPNetwork
from mirror.errors import Denied, Unauthorized
from mirror.peers.auth import PEER_HEADER, RequestVerifier
from mirror.request import Caller


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    allowed_clients: tuple[IPNetwork, ...]
    verifier: RequestVerifier | None

    def classify(self, request: web.Request) -> Caller:
        """Raises `Unauthorized` for a bad peer signature, `Denied` for an unknown client."""
        signature = request.headers.get(PEER_HEADER)
        if signature is not None:
            # The raw target, exactly as sent: decoding could make two requests look alike.
            if self.verifier is None or not self.verifier.verify(
                signature, request.method, request.raw_path
            ):
                raise Unauthorized("peer request signature is not valid")
            return Caller.PEER
        local = request.transport.get_extra_info("sockname") if request.transport else None
        if not self._is_allowed(request.remote, local[0] if local else None):
            raise Denied(f"client {request.remote} is not allowed to use this mirror")
        return Caller.RUNTIME

    def _is_allowed(self, remote: str | None, local: str | None) -> bool:
        """Loopback, this host itself (a client dialling the node's own address), or allowed."""
        address = _ip(remote)
        if address is None:
            return False
        if address.is_loopback or address == _ip(local):
            return True
        return any(address in network for network in self.allowed_clients)


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if text is None:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
