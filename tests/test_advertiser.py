"""The advertiser keeps the router in line with the store: announce, withdraw, re-announce.

Socket-free: an in-memory store and the in-memory router.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from harness.memory_store import MemoryStore

from mirror.content.advertiser import Advertiser
from mirror.metrics import Metrics
from mirror.oci import mediatypes as mt
from mirror.oci.reference import Digest, tag_ref
from mirror.routing.memory import MemoryCluster, MemoryRouter

REF = tag_ref("registry.test", "team/app", "v1")


@dataclass
class Image:
    manifest: Digest
    config: Digest
    layer: Digest

    def keys(self) -> set[str]:
        return {str(self.manifest), str(self.config), str(self.layer), str(REF)}


async def put_image(store: MemoryStore) -> Image:
    config = await store.put(b'{"architecture":"amd64"}')
    layer = await store.put(b"layer bytes")
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {"digest": str(config), "size": 24},
            "layers": [{"digest": str(layer), "size": 11}],
        }
    ).encode()
    image = Image(await store.put(manifest), config, layer)
    await store.tag(REF, image.manifest)
    return image


@pytest.fixture
def router() -> MemoryRouter:
    return MemoryCluster().router(b"n" * 20, "10.0.0.1:5000")


@pytest.fixture
async def running(router: MemoryRouter) -> AsyncIterator[tuple[MemoryStore, Advertiser]]:
    store = MemoryStore()
    advertiser = Advertiser(store, router, Metrics(), ttl=600.0)
    task = asyncio.create_task(advertiser.run())
    await advertiser.synced.wait()
    yield store, advertiser
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def synced_again(advertiser: Advertiser) -> None:
    advertiser.synced.clear()
    await advertiser.synced.wait()


async def test_what_the_store_holds_at_start_is_announced(router: MemoryRouter) -> None:
    store = MemoryStore()
    image = await put_image(store)
    advertiser = Advertiser(store, router, Metrics(), ttl=600.0)
    await advertiser.sync(reannounce=False)
    assert router.announced() == image.keys()
    assert advertiser.announced == image.keys()


async def test_a_new_image_is_announced_when_the_store_reports_it(
    router: MemoryRouter, running: tuple[MemoryStore, Advertiser]
) -> None:
    store, advertiser = running
    assert router.announced() == set()
    image = await put_image(store)
    while router.announced() != image.keys():
        await synced_again(advertiser)


async def test_what_vanishes_from_the_store_is_withdrawn(
    router: MemoryRouter, running: tuple[MemoryStore, Advertiser]
) -> None:
    store, advertiser = running
    image = await put_image(store)
    while router.announced() != image.keys():
        await synced_again(advertiser)
    await store.remove(image.layer)
    while str(image.layer) in router.announced():
        await synced_again(advertiser)
    assert ("withdraw", str(image.layer)) in router.calls
    assert router.announced() == image.keys() - {str(image.layer)}


async def test_a_reannounce_provides_every_key_again(router: MemoryRouter) -> None:
    store = MemoryStore()
    image = await put_image(store)
    advertiser = Advertiser(store, router, Metrics(), ttl=600.0)
    await advertiser.sync(reannounce=False)
    router.calls.clear()
    await advertiser.sync(reannounce=False)
    assert router.calls == []  # nothing changed, nothing sent
    await advertiser.sync(reannounce=True)
    assert {key for operation, key in router.calls if operation == "provide"} == image.keys()


async def test_a_failing_store_keeps_what_is_announced(router: MemoryRouter) -> None:
    store = MemoryStore()
    image = await put_image(store)
    advertiser = Advertiser(store, router, Metrics(), ttl=600.0)
    await advertiser.sync(reannounce=False)
    store.broken = True
    await advertiser.sync(reannounce=True)
    assert router.announced() == image.keys()
    assert advertiser.announced == image.keys()


async def test_an_unreachable_router_does_not_stop_the_advertiser(router: MemoryRouter) -> None:
    store = MemoryStore()
    image = await put_image(store)
    router.down = True
    advertiser = Advertiser(store, router, Metrics(), ttl=600.0)
    await advertiser.sync(reannounce=False)
    router.down = False
    await advertiser.sync(reannounce=True)
    assert router.announced() == image.keys()
