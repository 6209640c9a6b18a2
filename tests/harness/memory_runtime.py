"""In-memory doubles for the prefetch parts: a runtime in a dict, small synthetic images, and a
sink that records push events.

The real runtimes have their own tests (test_prefetch_containerd.py, test_prefetch_docker.py);
these let the prefetcher and the distributor be tested in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from mirror.errors import RuntimeImportError
from mirror.oci import mediatypes as mt
from mirror.prefetch.model import BlobReader, ImagePlan, PushEvent

from .memory_sources import digest_of


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
