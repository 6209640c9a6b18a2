"""The words the prefetch parts share: an image reference, a pin, a resolved image, a runtime.

Pins come from a file, from workload watches (Nomad, Kubernetes) and from the API; the
prefetcher resolves each into an `ImagePlan` through the content service (so the cluster
fetches every blob from upstream once), and a `Runtime` puts the plan into the runtime's own
store, where it stays usable with every registry down.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from mirror.errors import NameInvalid, RegistryError
from mirror.oci.reference import (
    DEFAULT_REGISTRY,
    Digest,
    TagRef,
    is_registry,
    parse_digest,
    validate_registry,
    validate_repository,
    validate_tag,
)


@dataclass(frozen=True, slots=True)
class ImageRef:
    """`registry/repository` with a tag, a digest, or both, fully qualified.

    `traefik:v2.10` is `docker.io/library/traefik:v2.10`, as Docker and containerd read it.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    def __post_init__(self) -> None:
        if self.tag is None and self.digest is None:
            raise NameInvalid(f"{self.name} names neither a tag nor a digest")

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def tag_ref(self) -> TagRef | None:
        return TagRef(self.registry, self.repository, self.tag) if self.tag else None

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_image_ref(text: str) -> ImageRef:
    """An image reference as `docker pull` takes it; `NameInvalid` with the reason if not one."""
    try:
        return _parse_image_ref(text)
    except RegistryError as exc:
        raise NameInvalid(f"{text!r} is not an image reference: {exc}") from exc


def _parse_image_ref(text: str) -> ImageRef:
    remainder, at, digest_text = text.strip().partition("@")
    digest = parse_digest(digest_text) if at else None
    first, slash, rest = remainder.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost") and is_registry(first):
        registry, path = validate_registry(first), rest
    else:
        registry, path = DEFAULT_REGISTRY, remainder
    repository, colon, tag = path.rpartition(":")
    if not colon or "/" in tag:
        repository, tag = path, ""
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"
    if not repository:
        raise NameInvalid(f"image reference {text!r} has no repository")
    validate_repository(repository)
    if tag:
        validate_tag(tag)
    elif digest is None:
        tag = "latest"
    return ImageRef(registry, repository, tag or None, digest)


def labels_match(required: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether a node with `labels` carries every one of `required` (a `nodes` table)."""
    return all(labels.get(key) == value for key, value in required.items())


@dataclass(frozen=True, slots=True)
class Pin:
    """One image a node should hold: `ref`, or `source` tagged as `ref` when `ref` is down.

    `nodes` are labels a node must all carry for the pin to apply to it (empty: every node);
    `origin` says where the pin came from (`file`, `nomad`, `kubernetes`, `api`).
    """

    ref: ImageRef
    source: ImageRef | None = None
    nodes: Mapping[str, str] = field(default_factory=dict)
    origin: str = "file"

    def applies_to(self, labels: Mapping[str, str]) -> bool:
        return labels_match(self.nodes, labels)


# Tags of one repository a follow keeps pinned unless its `keep` says otherwise: the one in
# use, the one before (a rollback) and one more.
DEFAULT_FOLLOW_KEEP = 3


@dataclass(frozen=True, slots=True)
class Follow:
    """`[[follow]]`: every pushed (or polled and changed) tag matching `match` is pinned.

    `match` is a glob over `registry/repository:tag` (`*` and `?` within a component, as
    `fnmatch` with `/` not crossed); `nodes` as a pin's; `poll`, in seconds, makes the cluster
    poll upstream for the matching tags instead of waiting for events (None: events only).
    `keep`: the latest tags taken of each repository that stay pinned; an older one is let go
    (the runtime's own garbage collection may then remove it), so a follow of a repository CI
    pushes to all day does not pin every build until the node restarts.
    """

    match: str
    nodes: Mapping[str, str] = field(default_factory=dict)
    poll: float | None = None
    keep: int = DEFAULT_FOLLOW_KEEP

    def applies_to(self, labels: Mapping[str, str]) -> bool:
        return labels_match(self.nodes, labels)


@dataclass(frozen=True, slots=True)
class PrefetchFile:
    """What a prefetch file says: images to pin, and tags to follow."""

    pins: tuple[Pin, ...] = ()
    follows: tuple[Follow, ...] = ()


@dataclass(frozen=True, slots=True)
class PushEvent:
    """A tag was pushed (a registry's or Docker Hub's webhook, a poll that saw it move, or
    `mirror distribute`): `ref` has the tag, and the digest when the trigger knows it."""

    ref: ImageRef
    trigger: str  # "distribution", "dockerhub", "poll", "cli"


class PushSink(Protocol):
    """Where push events go (the distributor); returns at once, the work happens later."""

    def pushed(self, event: PushEvent) -> None: ...


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A piece of content as a manifest lists it."""

    media_type: str
    digest: Digest
    size: int


@dataclass(frozen=True, slots=True)
class ImagePlan:
    """An image resolved to its content and ready to hand to a runtime.

    `name` is what the runtime will call it (the pin's `ref`, always with a tag or digest as
    the pin named it); `fetched` is where the content came from, by digest (the pin's `source`
    when the expected name could not be resolved). `target` is what `name` points to (an index
    or a manifest); `manifest`, `config` and `layers` are the node's platform's image.
    """

    name: ImageRef
    fetched: ImageRef
    target: Descriptor
    manifest: Descriptor
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def descriptors(self) -> tuple[Descriptor, ...]:
        """Every blob of the image, the top first: what a runtime's store must hold."""
        own = (
            (self.target,)
            if self.target.digest == self.manifest.digest
            else (
                self.target,
                self.manifest,
            )
        )
        return (*own, self.config, *self.layers)

    @property
    def size(self) -> int:
        return sum(descriptor.size for descriptor in self.descriptors)


class BlobReader(Protocol):
    """Bytes of a plan's blobs, from wherever the node finds them (itself, peers, upstream).

    `read` yields the whole blob in chunks and raises a `MirrorError` when it cannot be had.
    The reader verifies nothing: runtimes check digests when they commit content.
    """

    def read(self, descriptor: Descriptor) -> AsyncIterator[bytes]: ...


class Runtime(Protocol):
    """The node's container runtime, as the prefetcher puts images into it."""

    @property
    def name(self) -> str: ...

    async def holds(self, plan: ImagePlan) -> bool:
        """`plan.name` points to `plan.target` and the image is usable (unpacked) offline."""
        ...

    async def take(self, plan: ImagePlan, blobs: BlobReader) -> None:
        """Store the plan's content under `plan.name`, unpacked; `RuntimeImportError` if not."""
        ...
