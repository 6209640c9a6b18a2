"""The cluster key: a shared secret that authenticates DHT datagrams and peer HTTP requests.

Every message is MACed with HMAC-SHA256 under a key derived for its purpose, so a MAC made for a
datagram can never be replayed as an HTTP signature. An outsider without the key can neither
inject DHT records nor make a node fetch from its peers on its behalf. Signed messages carry
their time: one older than `FRESHNESS_SECONDS` is refused, and inside that window a
`ReplayGuard` refuses the same message id twice.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import secrets
from pathlib import Path

from mirror.errors import ConfigError

KEY_BYTES = 32
MAC_BYTES = 32
# Accepted clock skew between nodes either way; NTP-synchronised nodes are well inside it.
FRESHNESS_SECONDS = 30.0
# Ids remembered at most: only authenticated messages are recorded, so this bounds what the
# cluster's own request rate (not an outsider) can make a node hold.
_MAX_REMEMBERED_IDS = 200_000


class ClusterKey:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ConfigError("a cluster key must hold at least 16 bytes")
        self._secret = secret

    @staticmethod
    def generate() -> str:
        """A new key in its text form (what `mirror keygen` prints and key files hold)."""
        return base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode().rstrip("=")

    @classmethod
    def from_text(cls, text: str) -> ClusterKey:
        cleaned = text.strip()
        try:
            secret = base64.urlsafe_b64decode(cleaned + "=" * (-len(cleaned) % 4))
        except ValueError as exc:
            raise ConfigError(
                "the cluster key is not base64 text (make one: mirror keygen)"
            ) from exc
        return cls(secret)

    @classmethod
    def load(cls, path: Path) -> ClusterKey:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read cluster key file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{path} holds raw bytes, not a key's base64 text (make one: mirror keygen)"
            ) from exc
        try:
            return cls.from_text(text)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def purpose(self, label: str) -> PurposeKey:
        """A subkey for one kind of message (domain separation)."""
        derived = hmac.digest(self._secret, b"mirror/" + label.encode(), hashlib.sha256)
        return PurposeKey(derived)


class PurposeKey:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def mac(self, *parts: bytes) -> bytes:
        """HMAC-SHA256 over each part, each prefixed with its length (so no two splits of the
        same bytes share a MAC). One call into OpenSSL: every DHT datagram is sealed and
        opened with this, and an `hmac.new` with an update per piece cost four times as much."""
        message = b"".join(len(part).to_bytes(4, "big") + part for part in parts)
        return hmac.digest(self._secret, message, hashlib.sha256)

    def verify(self, mac: bytes, *parts: bytes) -> bool:
        return hmac.compare_digest(mac, self.mac(*parts))


class ReplayGuard:
    """Remembers the ids of accepted messages until their timestamps leave the window.

    Once a message's timestamp is older than the window it is refused as stale anyway, so an id
    never needs remembering past ``sent_at + window``. Only authenticated messages get here.
    """

    def __init__(self, window: float = FRESHNESS_SECONDS) -> None:
        self.window = window
        self._seen: dict[bytes | str, float] = {}
        self._expiries: list[tuple[float, bytes | str]] = []

    def first_use(self, message_id: bytes | str, sent_at: float, now: float) -> bool:
        """Record `message_id`; False if it was already recorded and is still live."""
        self._prune(now)
        if message_id in self._seen:
            return False
        forget_at = sent_at + self.window
        self._seen[message_id] = forget_at
        heapq.heappush(self._expiries, (forget_at, message_id))
        return True

    def __len__(self) -> int:
        return len(self._seen)

    def _prune(self, now: float) -> None:
        while self._expiries and (
            self._expiries[0][0] < now or len(self._seen) > _MAX_REMEMBERED_IDS
        ):
            forget_at, message_id = heapq.heappop(self._expiries)
            if self._seen.get(message_id) == forget_at:
                del self._seen[message_id]
