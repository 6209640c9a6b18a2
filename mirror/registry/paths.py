"""Parsing `/v2/<name>/(manifests|blobs)/<reference>` into a validated request target."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from mirror.errors import EndpointUnknown
from mirror.oci.reference import (
    DEFAULT_REGISTRY,
    Digest,
    TagRef,
    is_digest_reference,
    parse_digest,
    tag_ref,
    validate_registry,
    validate_repository,
)

# The name is greedy, so a repository may itself contain "blobs" or "manifests" components.
_API_PATH = re.compile(r"(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)")
_TAGS_PATH = re.compile(r"(?P<name>.+)/tags/list")


class Kind(StrEnum):
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"


@dataclass(frozen=True, slots=True)
class Target:
    """What a pull request asks for: a manifest by tag or digest, or a blob by digest."""

    kind: Kind
    registry: str
    repository: str
    tag: TagRef | None
    digest: Digest | None


def parse_target(path_after_v2: str, ns: str | None) -> Target:
    """Validate everything before any store is asked; raises a `RegistryError` on bad input."""
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
