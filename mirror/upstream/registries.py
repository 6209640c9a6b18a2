"""Which URL serves which registry: `https://<registry>` unless configured otherwise."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import urlsplit

from mirror.errors import ConfigError, NameInvalid
from mirror.oci.reference import validate_registry

DOCKER_HUB = "docker.io"
# docker.io is a name, not a host: the v2 API of Docker Hub lives here.
DOCKER_HUB_URL = "https://registry-1.docker.io"


def parse_upstream(text: str) -> tuple[str, str]:
    """`REGISTRY=URL` from a flag: where to reach a registry (a private mirror, plain HTTP).

    The URL is an origin only (`http` or `https`, a host, an optional port): the v2 API always
    lives at `/v2/` below it, and a path, query or user info would be silently dropped or, worse,
    leak into every request.
    """
    registry, sep, url = text.partition("=")
    registry, url = registry.strip(), url.strip()
    if not sep or not registry or not url:
        raise ConfigError(f"upstream {text!r} is not REGISTRY=URL")
    try:
        validate_registry(registry)
    except NameInvalid:
        raise ConfigError(f"upstream {text!r}: {registry!r} is not a registry host") from None
    origin = parse_origin(
        url,
        f"upstream {text!r}",
        credentials_problem="put credentials in the Docker config, not the URL",
    )
    return registry.lower(), origin


def parse_origin(url: str, what: str, *, credentials_problem: str) -> str:
    """`http(s)://HOST[:PORT]`, nothing more: a registry's v2 API always lives at `/v2/` below.

    A path, query or user info would be silently dropped or, worse, leak into every request.
    `what` names the value in the one-line error.
    """
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError when out of range or not a number
    except ValueError as exc:
        raise ConfigError(f"{what}: bad URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{what}: URL must start with http:// or https://")
    if not parts.hostname:
        raise ConfigError(f"{what}: URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{what}: {credentials_problem}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or url.endswith("?"):
        raise ConfigError(f"{what}: URL must have no path, query or fragment")
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True)
class UpstreamMap:
    """Registry name (as in `?ns=`) -> base URL of its v2 API."""

    overrides: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Registry names are case-insensitive hosts; a frozen copy keeps the map immutable.
        normalized = {k.lower(): v.rstrip("/") for k, v in self.overrides.items()}
        object.__setattr__(self, "overrides", MappingProxyType(normalized))

    def base_url(self, registry: str) -> str:
        registry = registry.lower()
        override = self.overrides.get(registry)
        if override is not None:
            return override
        if registry == DOCKER_HUB:
            return DOCKER_HUB_URL
        return f"https://{registry}"
