"""Registry credentials from a Docker `config.json`, the file every cluster already has for pulls.

Only the inline `auths` section is read: `{"auth": base64("user:pass")}` or
`{"username": ..., "password": ...}`. Entries with neither (a `credsStore` keeps the secret
elsewhere, or only an `identitytoken` is present) are skipped: mirror then pulls anonymously,
which is what a runtime without that helper would do too.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from mirror.errors import ConfigError

# Docker writes Hub credentials under its v1 URL; every one of these names means Docker Hub.
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_DOCKER_HUB = "docker.io"


def normalize_registry(key: str) -> str:
    """The registry host a config key or `?ns=` value names: no scheme, no path, lowercase.

    `https://index.docker.io/v1/`, `index.docker.io` and `docker.io` all give `docker.io`.
    """
    key = key.strip()
    host = urlsplit(key).netloc if "://" in key else key.split("/", 1)[0]
    host = host.lower()
    return _DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def basic_authorization(username: str, password: str) -> str:
    """The `Authorization` header value for HTTP Basic (RFC 7617), UTF-8 encoded."""
    pair = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


class Credentials:
    """Username and password per registry host."""

    def __init__(self, entries: Mapping[str, tuple[str, str]] | None = None) -> None:
        self._entries = {normalize_registry(k): v for k, v in (entries or {}).items()}

    def __repr__(self) -> str:
        # Never print secrets, even in a traceback.
        return f"Credentials(registries={sorted(self._entries)})"

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, path: Path) -> Credentials:
        """Read `path`; ConfigError (one line) when it cannot be read or is not a Docker config."""
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read credentials {path}: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, ValueError) as exc:
            message = str(exc).splitlines()[0]
            raise ConfigError(f"credentials {path} are not valid JSON: {message}") from None
        if not isinstance(document, dict):
            raise ConfigError(f"credentials {path}: expected a JSON object")
        auths = document.get("auths", {})
        if not isinstance(auths, dict):
            raise ConfigError(f"credentials {path}: 'auths' must be an object")
        entries: dict[str, tuple[str, str]] = {}
        for key, entry in auths.items():
            pair = _parse_entry(entry, f"credentials {path}: auths[{key!r}]")
            if pair is not None:
                entries[key] = pair
        return cls(entries)

    def lookup(self, registry: str) -> tuple[str, str] | None:
        return self._entries.get(normalize_registry(registry))


def _parse_entry(entry: object, where: str) -> tuple[str, str] | None:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be an object")
    auth = entry.get("auth")
    if auth:
        if not isinstance(auth, str):
            raise ConfigError(f"{where}.auth must be a string")
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise ConfigError(f"{where}.auth is not base64 of 'user:password'") from None
        username, colon, password = decoded.partition(":")
        if not colon or not username:
            raise ConfigError(f"{where}.auth is not base64 of 'user:password'")
        return username, password
    user, secret = entry.get("username"), entry.get("password")
    if user is None and secret is None:
        return None
    if not isinstance(user, str) or not isinstance(secret, str) or not user:
        raise ConfigError(f"{where} needs both 'username' and 'password' as strings")
    return user, secret
