"""The cluster key: a shared secret that authenticates DHT datagrams and peer HTTP requests.

Every message is MACed with HMAC-SHA256 under a key derived for its purpose, so a MAC made for a
datagram can never be replayed as an HTTP signature. An outsider without the key can neither
inject DHT records nor make a node fetch from its peers on its behalf.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from pathlib import Path

from mirror.errors import ConfigError

KEY_BYTES = 32
MAC_BYTES = 32


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
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(len(part).to_bytes(4, "big"))
            mac.update(part)
        return mac.digest()

    def verify(self, mac: bytes, *parts: bytes) -> bool:
        return hmac.compare_digest(mac, self.mac(*parts))
