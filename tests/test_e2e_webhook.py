"""A real `docker-registry` notifies the receiver of a push: one event for the tag, none else.

The registry's `notifications` endpoint points at the registry front (`RegistryApi` with
`EventsApi`) running in this process; `skopeo copy` pushes an index image with a tag, which
the registry reports as one event per blob, one per child manifest (by digest) and one for the
index under its tag. Only the last is a push event; the test waits for it on an asyncio event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp.test_utils import TestServer
from harness.images import TestImages
from harness.memory_runtime import RecordingSink
from harness.memory_store import MemoryStore
from harness.registry import Registry, notifications

from mirror.content.service import ContentPolicy, ContentService
from mirror.metrics import Metrics
from mirror.oci.reference import parse_digest
from mirror.prefetch.model import ImageRef, PushEvent
from mirror.registry.api import RegistryApi
from mirror.registry.events_api import DISTRIBUTION_PATH, EventsApi

POLICY = ContentPolicy(mirrored_registries=None, resolve_tags=True, tag_timeout=1.0)
TOKEN = "e2e-webhook-token"


def sample(metrics: Metrics, outcome: str) -> float:
    labels = {"source": "distribution", "outcome": outcome}
    return metrics.registry.get_sample_value("mirror_webhook_events_total", labels) or 0.0


async def test_a_push_to_a_real_registry_is_one_push_event(
    registry_factory: Callable[..., Registry], test_images: TestImages
) -> None:
    metrics = Metrics()
    sink = RecordingSink()
    events = EventsApi(sink, TOKEN.encode(), metrics)
    api = RegistryApi(metrics, ContentService(MemoryStore(), metrics, POLICY), extensions=[events])
    server = TestServer(api.app(), host="127.0.0.1")
    await server.start_server()
    try:
        url = f"http://127.0.0.1:{server.port}{DISTRIBUTION_PATH}"
        # Started and pushed to in threads: the loop must stay free to take the notifications.
        registry = await asyncio.to_thread(registry_factory, extra_config=notifications(url, TOKEN))
        image = test_images.index
        await asyncio.to_thread(image.push, registry.host, "team/app")
        # The registry delivers to an endpoint in order: the tag's event comes after the
        # blobs' and the children's, all of them already answered.
        async with asyncio.timeout(30):
            await sink.arrived.wait()
        assert sink.events == [
            PushEvent(
                ImageRef(registry.host, "team/app", image.tag, parse_digest(image.manifest_digest)),
                "distribution",
            )
        ]
        assert sample(metrics, "accepted") == 1
        # Four blobs and two child manifests, pushed by digest: seen and left alone.
        assert sample(metrics, "ignored") == 6
        assert sample(metrics, "invalid") == 0
        assert sample(metrics, "unauthorized") == 0
    finally:
        await server.close()
