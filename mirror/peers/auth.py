"""Signing and verifying peer-to-peer HTTP requests.

A peer request carries `X-Mirror-Peer: v1 <unix-ms> <nonce> <mac>`, the MAC covering the method,
the path with its query, the time and the nonce. A node answers a signed request from its own
store only, never from its peers, so a request can never loop through the cluster; and a request
without a valid signature can only come from the node's own runtime (loopback or an allowed
CIDR), so no outsider can use a node as a proxy.

A **signed URL** (`--peer-transfer=redirect`) lets a node send its runtime to the peer holding a
blob: `<path>?<query>&mirror-expires=<unix-ms>&mirror-nonce=<hex>&mirror-sig=<mac>`, the MAC
(under a key of its own, so a header signature can never pass for a URL signature or the other
way round) covering the method, the holder's address, the path with its query, the expiry and
the nonce. It is good for one request at that one holder until it expires (`REDIRECT_LIFETIME`
after signing); the holder answers it from its own store only, like a signed peer request.
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets
import time

from mirror.clusterkey import FRESHNESS_SECONDS, ClusterKey, ReplayGuard

PEER_HEADER = "X-Mirror-Peer"
_VERSION = "v1"
# Unix milliseconds have 13 digits until the year 2286; anything longer is not a time.
_MAX_STAMP_DIGITS = 15

# How long a signed URL stays good. The runtime follows a redirect at once (milliseconds); the
# margin is for the holder's clock running ahead of the signer's (see UrlVerifier).
REDIRECT_LIFETIME = 30.0
# The query parameters of a signed URL, always last and in this order. Any parameter starting
# with the prefix marks a request as carrying a URL signature, which must then be valid.
URL_PARAM_PREFIX = "mirror-"
_URL_SIGNATURE = re.compile(
    r"[?&]mirror-expires=(?P<expires>[0-9]{1,15})"
    r"&mirror-nonce=(?P<nonce>[0-9a-f]{24})"
    r"&mirror-sig=(?P<mac>[A-Za-z0-9_-]{43})\Z"
)
_CLAIMS_URL_SIGNATURE = re.compile(r"[?&]" + re.escape(URL_PARAM_PREFIX))


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


def _url_mac(mac: bytes) -> str:
    """A MAC as a URL carries it: base64url without padding (43 characters)."""
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def carries_url_signature(target: str) -> bool:
    """Whether a raw request target (path and query) claims a URL signature, valid or not."""
    _, separator, query = target.partition("?")
    return bool(separator) and _CLAIMS_URL_SIGNATURE.search("?" + query) is not None


class UrlSigner:
    """Signs the URL a node redirects its runtime to (and the HEAD it first probes with)."""

    def __init__(self, key: ClusterKey, *, lifetime: float = REDIRECT_LIFETIME) -> None:
        self._key = key.purpose("redirect")
        self._lifetime = lifetime

    def sign(self, method: str, holder: str, target: str, *, now: float | None = None) -> str:
        """`target` (a raw path with its query) with the signature appended, for `holder`
        (the HOST:PORT the DHT gives for it) to serve `method` on once."""
        if carries_url_signature(target):
            raise ValueError(f"{target!r} already carries {URL_PARAM_PREFIX}* parameters")
        current = time.time() if now is None else now
        expires = str(int((current + self._lifetime) * 1000))
        nonce = secrets.token_hex(12)
        mac = self._key.mac(
            method.encode(), holder.encode(), target.encode(), expires.encode(), nonce.encode()
        )
        signature = _url_mac(mac)
        separator = "&" if "?" in target else "?"
        return (
            f"{target}{separator}mirror-expires={expires}&mirror-nonce={nonce}"
            f"&mirror-sig={signature}"
        )


class UrlVerifier:
    """Checks signed URLs made for this node (`own_address`, as it announces itself).

    A URL is refused once expired, and when its expiry lies further ahead than a signer could
    have set it (`REDIRECT_LIFETIME`, plus `FRESHNESS_SECONDS` for this node's clock running
    behind the signer's), which also bounds how long a nonce must be remembered: until the
    URL expires, after which it is refused as expired anyway.
    """

    def __init__(self, key: ClusterKey, own_address: str) -> None:
        self._key = key.purpose("redirect")
        self._own_address = own_address
        self._replays = ReplayGuard(FRESHNESS_SECONDS)

    def verify(self, method: str, target: str, *, now: float | None = None) -> bool:
        """Whether the raw request target `target` carries a valid, unused signature."""
        match = _URL_SIGNATURE.search(target)
        if match is None:
            return False
        unsigned = target[: match.start()]
        if match.group(0)[0] != ("&" if "?" in unsigned else "?") or carries_url_signature(
            unsigned
        ):
            return False  # not as a signer writes it: another separator, parameters twice
        current = time.time() if now is None else now
        expires = int(match["expires"]) / 1000
        if not current <= expires <= current + REDIRECT_LIFETIME + FRESHNESS_SECONDS:
            return False
        mac = self._key.mac(
            method.encode(),
            self._own_address.encode(),
            unsigned.encode(),
            match["expires"].encode(),
            match["nonce"].encode(),
        )
        # Compared as text: the last of 43 characters carries 2 unused bits, so decoding would
        # take 4 spellings of one MAC; only the one the signer writes is accepted.
        if not hmac.compare_digest(_url_mac(mac), match["mac"]):
            return False
        # Remembered until the URL expires (ReplayGuard forgets at sent_at + window).
        return self._replays.first_use(match["nonce"], expires - self._replays.window, current)
