"""Parsing `/v2/<name>/(manifests|blobs)/<reference>` into a validated request target."""

from __future__ import annotations

import re

from mirror.errors import EndpointUnknown
from mirror.oci.reference import (
    DEFAULT_REGISTRY,
    is_digest_reference,
    parse_digest,
    registry_from_path_component,
    tag_ref,
    validate_registry,
    validate_repository,
)
from mirror.request import Kind, Target

# The name is greedy, so a repository may itself contain "blobs" or "manifests" components.
_API_PATH = re.compile(r"(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)")
_TAGS_PATH = re.compile(r"(?P<name>.+)/tags/list")


def parse_target(path_after_v2: str, ns: str | None) -> Target:
    """Validate everything before any store is asked; raises a `RegistryError` on bad input."""
    if not ns:
        ns, path_after_v2 = _registry_prefix(path_after_v2)
    registry = validate_registry(ns) if ns else DEFAULT_REGISTRY
    match = _API_PATH.fullmatch(path_after_v2)
    if match is None:
        tags = _TAGS_PATH.fullmatch(path_after_v2)
        if tags is None:
            raise EndpointUnknown(f"/v2/{path_after_v2} is not a pull API endpoint")
        return Target(Kind.TAGS, registry, validate_repository(tags["name"]), None, None)
    repository = validate_repository(match["name"])
    reference = match["reference"]
    if match["kind"] == "blobs":
        return Target(Kind.BLOB, registry, repository, None, parse_digest(reference))
    if is_digest_reference(reference):
        return Target(Kind.MANIFEST, registry, repository, None, parse_digest(reference))
    return Target(
        Kind.MANIFEST, registry, repository, tag_ref(registry, repository, reference), None
    )


def _registry_prefix(path: str) -> tuple[str | None, str]:
    """`ghcr.io/org/app/...` without `ns`: the registry as the first path component.

    dockerd sends only docker.io pulls to its mirrors; naming the registry in the path
    (`docker pull node:5000/ghcr.io/org/app:1.0`) reaches the others. A first component is a
    registry when it is a host name: it has a dot or a port, or is `localhost`, which no
    Docker Hub namespace can be; `registry.internal_5000` is `registry.internal:5000`, as
    Docker must spell a port in a path (`registry_from_path_component`).
    """
    first, slash, rest = path.partition("/")
    registry = registry_from_path_component(first) if slash and rest.count("/") >= 2 else None
    if registry is not None:
        return registry, rest
    return None, path
