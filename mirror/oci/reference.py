"""The distribution spec's grammar for names, tags, digests and registry hosts.

Everything that reaches a store or a file path is validated here first, so no request can name a
file outside a store: a digest that passed `parse_digest` is an algorithm and lowercase hex only.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mirror.errors import DigestInvalid, NameInvalid

DEFAULT_REGISTRY = "docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST_RE = re.compile(
    r"(?P<algorithm>[a-z0-9]+(?:[+._-][a-z0-9]+)*):(?P<encoded>[a-zA-Z0-9=_-]+)"
)
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[a-f0-9]+")
_HOST_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_REGISTRY_RE = re.compile(
    rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*|\[(?P<ipv6>[0-9a-fA-F:.]+)\])(?::(?P<port>[0-9]{{1,5}}))?"
)
# The spec caps a repository name (with its registry) at 255 characters.
_MAX_NAME_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Digest:
    """A content digest known to be well formed and of an algorithm we can verify."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


@dataclass(frozen=True, slots=True)
class TagRef:
    """`<registry>/<repository>:<tag>`, the key under which runtimes name an image."""

    registry: str
    repository: str
    tag: str

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"


def parse_digest(text: str) -> Digest:
    match = _DIGEST_RE.fullmatch(text)
    if match is None:
        raise DigestInvalid(f"malformed digest {text!r}")
    algorithm, encoded = match["algorithm"], match["encoded"]
    expected_length = _HEX_LENGTH.get(algorithm)
    if expected_length is None:
        raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}")
    if len(encoded) != expected_length or not _HEX_RE.fullmatch(encoded):
        raise DigestInvalid(
            f"{algorithm} digest must be {expected_length} lowercase hex characters"
        )
    return Digest(algorithm, encoded)


def is_digest_reference(reference: str) -> bool:
    """A manifest reference is a digest when it has the `algorithm:` shape; tags cannot hold ':'."""
    return ":" in reference


def validate_repository(name: str) -> str:
    if len(name) > _MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise NameInvalid(f"invalid repository name {name!r}")
    return name


def validate_tag(tag: str) -> str:
    if not _TAG_RE.fullmatch(tag):
        raise NameInvalid(f"invalid tag {tag!r}")
    return tag


def is_registry(host: str) -> bool:
    """A host name or bracketed IPv6 address, with a port in 1-65535 if any: a URL can be
    made of it (a name that only looks right would fail later, at the upstream request)."""
    match = _REGISTRY_RE.fullmatch(host) if len(host) <= _MAX_NAME_LENGTH else None
    if match is None:
        return False
    if match["port"] is not None and not 0 < int(match["port"]) <= 65535:
        return False
    if match["ipv6"] is not None:
        try:
            ipaddress.IPv6Address(match["ipv6"])
        except ValueError:
            return False
    return True


def validate_registry(host: str) -> str:
    """Registry host as runtimes send it in `?ns=` (host, optional port, IPv6 in brackets)."""
    if not is_registry(host):
        raise NameInvalid(f"invalid registry {host!r}")
    return host


def tag_ref(registry: str, repository: str, tag: str) -> TagRef:
    return TagRef(validate_registry(registry), validate_repository(repository), validate_tag(tag))


def parse_image_name(name: str) -> TagRef | None:
    """`registry/repository:tag` as runtimes name images; None for digest-only or odd names."""
    registry, slash, rest = name.partition("/")
    if not slash or "@" in rest:
        return None
    repository, colon, tag = rest.rpartition(":")
    if not colon or "/" in tag:
        return None
    try:
        return tag_ref(registry, repository, tag)
    except NameInvalid:
        return None


# `host_PORT`: a registry with a port as one path component (`registry.internal_5000`).
_PORTED_COMPONENT = re.compile(r"(?P<host>[a-z0-9.-]+)_(?P<port>[0-9]{1,5})")


def registry_from_path_component(component: str) -> str | None:
    """The registry a first path component names in the path-prefix form, or None.

    `ghcr.io`, `localhost` and `registry.internal:5000` name themselves (a dot, `localhost`
    or a port: no Docker Hub namespace looks like that). Docker's reference grammar allows no
    `:` in a path component, so dockerd (which sends only docker.io to its mirrors and reaches
    the others as `MIRROR/<registry>/<repository>`) writes a port as `_PORT`:
    `registry.internal_5000`. An underscore is never part of a host name, nor of a Docker Hub
    namespace, so the spelling is unambiguous.
    """
    ported = _PORTED_COMPONENT.fullmatch(component)
    if ported is not None:
        registry = f"{ported['host']}:{ported['port']}"
        return registry if is_registry(registry) else None
    looks_like_host = "." in component or ":" in component or component == "localhost"
    return component if looks_like_host and is_registry(component) else None


def registry_as_path_component(registry: str) -> str | None:
    """`registry` spelled so that Docker accepts it as a path component, or None if it cannot
    be (capitals, IPv6, a single-word host that would read as a Docker Hub namespace)."""
    host, colon, port = registry.rpartition(":")
    component = f"{host}_{port}" if colon and not registry.endswith("]") else registry
    if component != component.lower() or "[" in component:
        return None
    return component if registry_from_path_component(component) == registry else None
