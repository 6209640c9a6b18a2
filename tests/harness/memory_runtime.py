"""In-memory doubles for the prefetch parts: a runtime in a dict, small synthetic images, a
sink that records push events, and one node's prefetch parts wired together.

The real runtimes have their own tests (test_prefetch_containerd.py, test_prefetch_docker.py);
these let the prefetcher and the distributor be tested in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

from mirror.content.service import ContentPolicy, ContentService
from mirror.errors import RuntimeImportError
from mirror.metrics import Metrics
from mirror.oci import mediatypes as mt
from mirror.prefetch.model import BlobReader, ImagePlan, PushEvent, parse_image_ref
from mirror.prefetch.prefetcher import PinnedSources, Prefetcher, Timing
from mirror.prefetch.resolve import Platform
from mirror.routing.memory import MemoryRouter
from mirror.stores.cache import CacheStore

from .memory_sources import MemoryPeers, MemoryUpstream, digest_of


@dataclass
class Image:
    manifest: bytes
    blobs: dict[str, bytes]

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)


def make_image(label: str, *, arch: str = "amd64") -> Image:
    config = json.dumps({"architecture": arch, "os": "linux", "label": label}).encode()
    layers = [f"{label} layer {n}".encode() * 1000 for n in range(2)]
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {"mediaType": "c", "digest": digest_of(config), "size": len(config)},
            "layers": [
                {"mediaType": "l", "digest": digest_of(layer), "size": len(layer)}
                for layer in layers
            ],
        }
    ).encode()
    return Image(manifest, {digest_of(blob): blob for blob in [config, *layers]})


@dataclass
class MemoryRuntime:
    """A runtime in a dict: name -> (target digest, every blob's bytes as read)."""

    images: dict[str, tuple[str, dict[str, bytes]]] = field(default_factory=dict)
    takes: list[str] = field(default_factory=list)
    refuse: bool = False

    @property
    def name(self) -> str:
        return "memory"

    async def holds(self, plan: ImagePlan) -> bool:
        held = self.images.get(str(plan.name))
        return held is not None and held[0] == str(plan.target.digest)

    async def take(self, plan: ImagePlan, blobs: BlobReader) -> None:
        self.takes.append(str(plan.name))
        if self.refuse:
            raise RuntimeImportError("the runtime refused the image")
        content = {}
        for descriptor in plan.descriptors:
            content[str(descriptor.digest)] = b"".join([c async for c in blobs.read(descriptor)])
        self.images[str(plan.name)] = (str(plan.target.digest), content)


@dataclass
class RecordingSink:
    """A `PushSink` that keeps what it is given; `arrived` is set at the first event."""

    events: list[PushEvent] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def pushed(self, event: PushEvent) -> None:
        self.events.append(event)
        self.arrived.set()


def publish(upstream: MemoryUpstream, ref: str, image: Image) -> None:
    """Push `image` to the in-memory upstream under `ref` (a tag reference)."""
    parsed = parse_image_ref(ref)
    assert parsed.tag is not None
    upstream.push(parsed.registry, parsed.repository, parsed.tag, image.manifest)
    upstream.blobs.update(image.blobs)


# Attempts that fail are not retried within a test: the test wakes a pin when it wants it tried.
NO_RETRY = Timing(recheck=3600, retry_first=3600, retry_max=3600)
_POLICY = ContentPolicy(mirrored_registries=None, resolve_tags=True, tag_timeout=1.0)


@dataclass
class PrefetchParts:
    """One node's content service (real, over a real cache), prefetcher and in-memory runtime,
    wired as mirror/node.py wires them."""

    cache: CacheStore
    content: ContentService
    prefetcher: Prefetcher
    runtime: MemoryRuntime
    metrics: Metrics
    sources: PinnedSources

    async def close(self) -> None:
        await self.prefetcher.close()
        await self.content.close()
        await self.cache.close()


async def start_prefetch_parts(
    cache_dir: Path, router: MemoryRouter, upstream: MemoryUpstream, labels: dict[str, str]
) -> PrefetchParts:
    cache = CacheStore(cache_dir)
    await cache.start()
    metrics = Metrics()
    sources = PinnedSources()
    content = ContentService(
        cache,
        metrics,
        _POLICY,
        cache=cache,
        peers=MemoryPeers(router),
        router=router,
        upstream=upstream,
        aliases=sources,
    )
    runtime = MemoryRuntime()
    prefetcher = Prefetcher(
        content,
        runtime,
        metrics,
        labels=labels,
        platform=Platform("linux", "amd64"),
        sources=sources,
        timing=NO_RETRY,
    )
    return PrefetchParts(cache, content, prefetcher, runtime, metrics, sources)
