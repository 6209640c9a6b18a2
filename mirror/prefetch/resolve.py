"""From a pin to an `ImagePlan`, and the plan's bytes, all through the content service.

Going through the content service rather than an upstream client is the point: a pinned image
is found the way a runtime's pull would find it (this node, then peers, then upstream once for
the whole cluster), a tag falls back to its source when it cannot be resolved (the service's
`TagAliases`), and every blob fetched here is kept in the node cache and announced, so the
other nodes that pin the same image take it from this one.
"""

from __future__ import annotations

import json
import platform
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from mirror.content.service import ContentService, ManifestAnswer
from mirror.errors import BlobUnknown, ManifestUnknown, MirrorError
from mirror.oci.mediatypes import INDEX_TYPES, MAX_MANIFEST_SIZE
from mirror.oci.reference import Digest, parse_digest
from mirror.prefetch.model import Descriptor, ImagePlan, ImageRef
from mirror.request import Caller, Kind, Target

# The largest image config read into memory (they are a few KiB; Docker caps them near 8 MiB).
_MAX_CONFIG_SIZE = 8 * 1024 * 1024

_ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class PlanError(ManifestUnknown):
    """A manifest that cannot become a plan: no manifest for this platform, a malformed one."""


@dataclass(frozen=True, slots=True)
class Platform:
    """The platform a node runs images for: an index's entry is chosen by it."""

    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text

    def matches(self, entry: dict[str, Any]) -> bool:
        if entry.get("os") != self.os or entry.get("architecture") != self.architecture:
            return False
        variant = entry.get("variant")
        return self.variant is None or variant in (None, self.variant)


def host_platform() -> Platform:
    """This machine's platform, as container runtimes name it (`linux/amd64`)."""
    machine = platform.machine().lower()
    return Platform("linux", _ARCHITECTURES.get(machine, machine))


@dataclass(slots=True)
class ResolvedImage:
    """A plan and the manifest bodies behind it (index, manifest), already in memory."""

    plan: ImagePlan
    bodies: dict[Digest, bytes]
    # The manifest answered for the pin's name came from its source ("expected <- source").
    through_source: bool


async def resolve(
    content: ContentService, ref: ImageRef, source: ImageRef | None, node: Platform
) -> ResolvedImage:
    """The image `ref` names for `node`, or `source`'s when `ref` cannot be resolved.

    A tag falls back through the content service (which also answers the runtime's own pull
    of `ref` with the source); a digest has no tag to alias, so the fallback is taken here.
    """
    try:
        answer = await content.manifest(_manifest_target(ref), Caller.RUNTIME)
        fetched_ref = ref
        if answer.alias is not None and source is not None:
            fetched_ref = source
    except MirrorError:
        if source is None or ref.digest is None:
            raise
        answer = await content.manifest(_manifest_target(source), Caller.RUNTIME)
        fetched_ref = source
    top_digest = parse_digest(answer.digest)
    fetched = ImageRef(fetched_ref.registry, fetched_ref.repository, None, top_digest)
    top = Descriptor(answer.media_type, top_digest, len(answer.body))
    bodies = {top_digest: answer.body}
    manifest, manifest_body = top, answer.body
    if answer.media_type in INDEX_TYPES:
        manifest = _platform_entry(answer, node)
        child = await content.manifest(
            Target(Kind.MANIFEST, fetched.registry, fetched.repository, None, manifest.digest),
            Caller.RUNTIME,
        )
        manifest_body = child.body
        bodies[manifest.digest] = manifest_body
    config, layers = _image_parts(manifest_body, manifest.digest)
    plan = ImagePlan(ref, fetched, top, manifest, config, layers)
    return ResolvedImage(plan, bodies, answer.alias is not None or fetched_ref is source)


def _manifest_target(ref: ImageRef) -> Target:
    if ref.digest is not None:
        return Target(Kind.MANIFEST, ref.registry, ref.repository, None, ref.digest)
    return Target(Kind.MANIFEST, ref.registry, ref.repository, ref.tag_ref, None)


def _document(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PlanError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise PlanError(f"{what} is not a JSON object")
    return document


def _descriptor(value: object, what: str) -> Descriptor:
    if not isinstance(value, dict):
        raise PlanError(f"{what} is not a descriptor")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool):
        raise PlanError(f"{what} lacks a digest or a size")
    if size < 0:
        raise PlanError(f"{what} has a negative size")
    return Descriptor(media_type if isinstance(media_type, str) else "", parse_digest(digest), size)


def _platform_entry(answer: ManifestAnswer, node: Platform) -> Descriptor:
    entries = _document(answer.body, f"index {answer.digest}").get("manifests")
    if not isinstance(entries, list):
        raise PlanError(f"index {answer.digest} lists no manifests")
    for position, entry in enumerate(entries):
        wanted = isinstance(entry, dict) and isinstance(entry.get("platform"), dict)
        if wanted and node.matches(entry["platform"]):
            descriptor = _descriptor(entry, f"index {answer.digest} entry {position}")
            if descriptor.size > MAX_MANIFEST_SIZE:
                raise PlanError(f"manifest {descriptor.digest} is larger than 4 MiB")
            return descriptor
    raise PlanError(f"index {answer.digest} has no manifest for {node}")


def _image_parts(body: bytes, digest: Digest) -> tuple[Descriptor, tuple[Descriptor, ...]]:
    document = _document(body, f"manifest {digest}")
    config = _descriptor(document.get("config"), f"manifest {digest} config")
    if config.size > _MAX_CONFIG_SIZE:
        raise PlanError(f"manifest {digest}: config of {config.size} bytes is too large")
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise PlanError(f"manifest {digest} lists no layers")
    parts = tuple(
        _descriptor(layer, f"manifest {digest} layer {n}") for n, layer in enumerate(layers)
    )
    return config, parts


class ContentBlobs:
    """The plan's blobs through the content service (a `BlobReader`), counted as they pass
    (`on_bytes(source, n)`: local, peer or upstream, as the service answered).

    Manifests come from memory (`bodies`): they were fetched to make the plan, and a registry
    need not serve a manifest from its blob endpoint.
    """

    def __init__(
        self,
        content: ContentService,
        fetched: ImageRef,
        bodies: dict[Digest, bytes],
        on_bytes: Callable[[str, int], None] | None = None,
    ) -> None:
        self._content = content
        self._fetched = fetched
        self._bodies = bodies
        self._on_bytes = on_bytes

    async def read(self, descriptor: Descriptor) -> AsyncIterator[bytes]:
        body = self._bodies.get(descriptor.digest)
        if body is not None:
            yield body
            return
        target = Target(
            Kind.BLOB, self._fetched.registry, self._fetched.repository, None, descriptor.digest
        )
        answer = await self._content.blob(target, Caller.RUNTIME, None, head=False, redirect=False)
        try:
            if answer.local is not None:
                chunks = answer.local.iter_range(0, answer.local.size)
            else:
                assert answer.chunks is not None, "a blob asked for without redirect has bytes"
                chunks = answer.chunks
            async for chunk in chunks:
                if self._on_bytes is not None:
                    self._on_bytes(answer.source, len(chunk))
                yield chunk
        finally:
            await answer.close()

    async def held_here(self, descriptor: Descriptor) -> bool:
        """Whether the node already holds the blob whole (its runtime's store or cache)."""
        if descriptor.digest in self._bodies:
            return True
        target = Target(
            Kind.BLOB, self._fetched.registry, self._fetched.repository, None, descriptor.digest
        )
        try:
            # Asked as a peer would: answered from this node only, never fetched.
            answer = await self._content.blob(target, Caller.PEER, None, head=True)
        except BlobUnknown:
            return False
        await answer.close()
        return answer.local is not None
