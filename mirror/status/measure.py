"""Measuring a pull: an image pulled through this node's content service into nothing.

The same path a runtime's pull takes (this node, a download under way, peers, upstream once
for the cluster), step by step as a runtime asks: the manifest named (by tag: resolved upstream
first), the node's platform's manifest when that is an index, then the config and every layer,
each read to its end and discarded. Each step is timed and says where its bytes came from.

Blobs are read one after the other (a runtime reads a few at once), so each step's time is its
own. What is fetched is kept in the node cache and announced, as after any pull: measuring the
same image again shows what a second pull costs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mirror.content.service import ContentService, ManifestAnswer
from mirror.errors import MirrorError, TooManyRequests
from mirror.oci.mediatypes import INDEX_TYPES
from mirror.oci.reference import parse_digest
from mirror.prefetch.model import Descriptor, ImageRef
from mirror.prefetch.resolve import ContentBlobs, PlanError, Platform, resolve
from mirror.request import Caller, Kind, Target
from mirror.status.collector import platform_entry

MEASURE_PATH = "/mirror/v1/measure"
# A client told "busy" may ask again this many seconds later.
_RETRY_AFTER_SECONDS = 1


@dataclass(slots=True)
class Step:
    kind: str  # index, manifest, config, layer
    digest: str
    size: int  # as the manifest says (a manifest: its length)
    bytes: int = 0  # read
    source: str | None = None  # local, peer, upstream; None: nothing read
    seconds: float = 0.0
    error: str | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "digest": self.digest,
            "size": self.size,
            "bytes": self.bytes,
            "source": self.source,
            "seconds": self.seconds,
            "error": self.error,
        }


@dataclass(slots=True)
class Measurement:
    ref: str
    platform: str
    digest: str | None = None  # what the name pointed to
    through: str | None = None  # the source answered for an expected name that is unresolvable
    steps: list[Step] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, object]:
        by_source: dict[str, int] = {}
        for step in self.steps:
            if step.source is not None:
                by_source[step.source] = by_source.get(step.source, 0) + step.bytes
        return {
            "ref": self.ref,
            "platform": self.platform,
            "digest": self.digest,
            "through": self.through,
            "ok": all(step.error is None for step in self.steps),
            "steps": [step.as_json() for step in self.steps],
            "total_seconds": self.seconds,
            "total_bytes": sum(step.bytes for step in self.steps),
            "by_source": by_source,
        }


class Measurer:
    """Measures pulls through one content service, one at a time (both ports share it)."""

    def __init__(self, content: ContentService, platform: Platform) -> None:
        self._content = content
        self._platform = platform
        self._busy = False

    async def measure(self, ref: ImageRef) -> Measurement:
        """`TooManyRequests` while another measure runs."""
        if self._busy:
            raise TooManyRequests(
                "a pull is being measured on this node; try again when it ends",
                retry_after=_RETRY_AFTER_SECONDS,
            )
        self._busy = True
        try:
            return await measure_pull(self._content, ref, self._platform)
        finally:
            self._busy = False


async def measure_pull(
    content: ContentService,
    ref: ImageRef,
    platform: Platform,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> Measurement:
    """Pull `ref` for `platform` through `content`, timing each step.

    The first manifest not being found raises (a `RegistryError`, as a pull's would); a later
    step that fails is recorded with its error and the others are still measured.
    """
    measurement = Measurement(str(ref), str(platform))
    started = clock()
    try:
        await _measure(content, ref, platform, measurement, clock)
    finally:
        measurement.seconds = clock() - started
    return measurement


async def _measure(
    content: ContentService,
    ref: ImageRef,
    platform: Platform,
    measurement: Measurement,
    clock: Callable[[], float],
) -> None:
    if ref.digest is not None:
        top_target = Target(Kind.MANIFEST, ref.registry, ref.repository, None, ref.digest)
    else:
        top_target = Target(Kind.MANIFEST, ref.registry, ref.repository, ref.tag_ref, None)
    top = await _manifest_step(content, top_target, measurement, clock)
    measurement.digest = top.digest
    registry, repository = ref.registry, ref.repository
    if top.alias is not None:
        registry, repository = top.alias.registry, top.alias.repository
        measurement.through = f"{registry}/{repository}"
    image = ImageRef(registry, repository, None, parse_digest(top.digest))
    if top.media_type in INDEX_TYPES:
        entry = platform_entry(_document(top.body), platform)
        if entry is None:
            raise PlanError(f"index {top.digest} has no manifest for {platform}")
        child = parse_digest(entry["digest"])
        target = Target(Kind.MANIFEST, registry, repository, None, child)
        try:
            await _manifest_step(content, target, measurement, clock)
        except MirrorError as exc:
            measurement.steps.append(Step("manifest", str(child), 0, error=str(exc)))
            return
        image = ImageRef(registry, repository, None, child)
    try:
        # The manifest is held here now: this reads it back and makes the plan.
        plan = (await resolve(content, image, None, platform)).plan
    except MirrorError as exc:
        measurement.steps[-1].error = f"not an image manifest: {exc}"
        return
    for kind, descriptor in [("config", plan.config), *(("layer", d) for d in plan.layers)]:
        measurement.steps.append(await _blob_step(content, plan.fetched, kind, descriptor, clock))


async def _manifest_step(
    content: ContentService, target: Target, measurement: Measurement, clock: Callable[[], float]
) -> ManifestAnswer:
    """One manifest, timed; recorded when it was found (a failure is the caller's to tell)."""
    started = clock()
    answer = await content.manifest(target, Caller.RUNTIME)
    kind = "index" if answer.media_type in INDEX_TYPES else "manifest"
    size = len(answer.body)
    step = Step(kind, answer.digest, size, size, answer.source, clock() - started)
    measurement.steps.append(step)
    return answer


async def _blob_step(
    content: ContentService,
    image: ImageRef,
    kind: str,
    descriptor: Descriptor,
    clock: Callable[[], float],
) -> Step:
    """One blob read to its end and dropped, timed; a failure is recorded in the step."""
    step = Step(kind, str(descriptor.digest), descriptor.size)

    def counted(source: str, size: int) -> None:
        step.source = source
        step.bytes += size

    blobs = ContentBlobs(content, image, {}, on_bytes=counted)
    started = clock()
    try:
        async for _chunk in blobs.read(descriptor):
            pass
    except (MirrorError, OSError, TimeoutError) as exc:
        step.error = str(exc) or type(exc).__name__
    step.seconds = clock() - started
    return step


def _document(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise PlanError(f"the index is not JSON: {exc}") from exc
