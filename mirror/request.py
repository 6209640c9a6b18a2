"""What a pull asks for, in the terms both the HTTP front and the content service speak.

The front (`registry/`) turns a request's path, query and headers into these types after
validating them; the content service (`content/`) decides where the bytes come from and never
sees raw HTTP. Keeping them here, below both, is what keeps the two layers free of a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum

from mirror.oci.reference import Digest, TagRef


class Kind(StrEnum):
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"


@dataclass(frozen=True, slots=True)
class Target:
    """A manifest by tag or digest, a blob by digest, or a repository's tag list."""

    kind: Kind
    registry: str
    repository: str
    tag: TagRef | None
    digest: Digest | None


class Caller(Enum):
    """Who asks, which decides how far a request may travel."""

    RUNTIME = "runtime"  # the node's own runtime: may be served from peers and upstream
    PEER = "peer"  # another node: served from this node's store only, never forwarded
    # A runtime another node redirected here with a signed URL: a blob served from this node
    # only (its store, a download under way, what its runtime is receiving), never forwarded.
    # The last byte comes once verified; a transfer that breaks is retried through the
    # runtime's own node, which serves the retry itself.
    REDIRECTED = "redirected"


@dataclass(frozen=True, slots=True)
class TagPage:
    """A page of a tag list, as `n` and `last` ask for it (distribution spec, tags/list)."""

    limit: int | None = None
    last: str | None = None
