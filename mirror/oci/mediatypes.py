"""Manifest media types, detected from the bytes because containerd does not keep them."""

from __future__ import annotations

import json

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCTET_STREAM = "application/octet-stream"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

# The spec lets registries refuse manifests above 4 MiB; nothing larger is read into memory.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024


def detect_manifest_type(body: bytes) -> str | None:
    """The media type a registry would have served these bytes with, or None if not a manifest.

    The explicit `mediaType` field wins. Without it (allowed for OCI), the shape decides:
    `manifests` makes an index, `layers` and `config` make an image manifest.
    """
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(document, dict):
        return None
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared in MANIFEST_TYPES:
        return declared
    if declared is not None:
        return None
    if isinstance(document.get("manifests"), list):
        return OCI_INDEX
    if isinstance(document.get("layers"), list) and isinstance(document.get("config"), dict):
        return OCI_MANIFEST
    return None


def referenced_digests(body: bytes) -> list[str]:
    """Digests a manifest or index points at (children, config, layers), in document order."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return []
    if not isinstance(document, dict):
        return []
    descriptors: list[object] = []
    for key in ("manifests", "layers"):
        value = document.get(key)
        if isinstance(value, list):
            descriptors.extend(value)
    config = document.get("config")
    if isinstance(config, dict):
        descriptors.insert(0, config)
    return [
        d["digest"] for d in descriptors if isinstance(d, dict) and isinstance(d.get("digest"), str)
    ]
