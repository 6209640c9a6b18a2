"""Who may use the registry API: the node's own runtime, and authenticated peers.

Without this a node on a routable address is an open proxy into the cluster's images (and, with
upstream fallback, into the registries it mirrors).

A peer proves itself with a signed header; a runtime another node redirected here
(`--peer-transfer=redirect`) with the signed URL it was given, which counts as a peer's
credential for that one request: answered from this node's own store only, never forwarded.
A request carrying both, or a URL signature that is not valid, is refused outright.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from aiohttp import web

from mirror.config import IPNetwork
from mirror.errors import Denied, Unauthorized
from mirror.peers.auth import PEER_HEADER, RequestVerifier, UrlVerifier, carries_url_signature
from mirror.request import Caller


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    allowed_clients: tuple[IPNetwork, ...]
    verifier: RequestVerifier | None
    # Signed URLs this node's peers redirect their runtimes to; None: refused (no cluster key).
    url_verifier: UrlVerifier | None = None

    def classify(self, request: web.Request) -> Caller:
        """Raises `Unauthorized` for a bad peer signature, `Denied` for an unknown client."""
        signature = request.headers.get(PEER_HEADER)
        if by_signed_url(request):
            # Checked before the client's address: a runtime redirected here may come from
            # another host, and one on loopback must not get more than the URL grants.
            if signature is not None:
                raise Unauthorized("a request carries a peer signature or a signed URL, not both")
            if self.url_verifier is None or not self.url_verifier.verify(
                request.method, request.raw_path
            ):
                raise Unauthorized("the signed URL is not valid, has expired or was used before")
            return Caller.REDIRECTED
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


def by_signed_url(request: web.Request) -> bool:
    """Whether the request claims a URL signature (`classify` refuses it unless valid)."""
    return carries_url_signature(request.raw_path)


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
