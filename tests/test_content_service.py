"""The content service's races on one node, made deterministic with gates.

Each test holds one step of a request at a gate (a store slow to answer, a claim slow to be
decided) while another request or a download moves on, then checks the request still finds
the blob. The DHT, the caches and the peer that holds the blob are the real ones, on loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from harness.dht import KEY

from mirror.content import service as service_module
from mirror.content.downloads import Download, Downloads, Source
from mirror.content.service import BlobAnswer, ContentPolicy, ContentService
from mirror.errors import TooManyRequests
from mirror.metrics import SOURCE_LOCAL, SOURCE_PEER, Metrics
from mirror.oci.reference import Digest, parse_digest
from mirror.peers.auth import RequestSigner, RequestVerifier
from mirror.peers.fetcher import PeerFetcher
from mirror.registry.access import AccessPolicy
from mirror.registry.api import RegistryApi
from mirror.request import Caller, Kind, Target
from mirror.routing.dht import DhtNode
from mirror.routing.keys import stable_node_id
from mirror.routing.router import Provider
from mirror.stores.base import BlobSource
from mirror.stores.cache import CacheStore
from mirror.upstream.client import UpstreamClient
from mirror.upstream.registries import UpstreamMap

DATA = bytes(range(256)) * 4096  # 1 MiB
DIGEST = parse_digest("sha256:" + hashlib.sha256(DATA).hexdigest())
REGISTRY = "registry.test"
TARGET = Target(Kind.BLOB, REGISTRY, "team/app", None, DIGEST)
POLICY = ContentPolicy(mirrored_registries=None, resolve_tags=True, tag_timeout=1.0)


class GatedCache(CacheStore):
    """A cache whose misses are held at a gate: the store is slow to say 'not here'."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.asked = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()

    async def open(self, digest: Digest) -> BlobSource | None:
        found = await super().open(digest)
        if found is None and not self.gate.is_set():
            self.asked.set()
            await self.gate.wait()
        return found


async def reserved_in(cache: CacheStore) -> tuple[ContentService, Downloads, Download]:
    """A content service on `cache` (started here) whose download of DIGEST is reserved."""
    await cache.start()
    service = ContentService(cache, Metrics(), POLICY, cache=cache)
    downloads = service._downloads
    assert downloads is not None
    download, _ = downloads.reserve(DIGEST)
    return service, downloads, download


async def whole_data() -> Source:
    """An origin that gives DATA whole."""

    async def chunks() -> AsyncIterator[bytes]:
        yield DATA

    async def close() -> None:
        return None

    return Source(len(DATA), chunks(), close)


async def body(answer: BlobAnswer) -> bytes:
    if answer.local is not None:
        data = await asyncio.to_thread(answer.local.fileobj.read)
    else:
        assert answer.chunks is not None
        data = b"".join([chunk async for chunk in answer.chunks])
    await answer.close()
    return data


async def test_a_download_that_ends_while_the_store_is_asked_is_found_in_the_cache(
    tmp_path: Path,
) -> None:
    """A peer asking the node that fetches a blob, just as the fetch ends, gets the blob.

    The store missed; the download then committed and left the list of running downloads;
    only then did the store's answer arrive. Before the fix the peer got 404 and fetched the
    blob from upstream a second time.
    """
    cache = GatedCache(tmp_path / "cache")
    service, downloads, download = await reserved_in(cache)

    cache.gate.clear()
    request = asyncio.create_task(service.blob(TARGET, Caller.PEER, None, head=False))
    await cache.asked.wait()
    downloads.begin(download, whole_data)
    assert await download.finished
    assert download.task is not None
    await download.task  # off the list of running downloads now
    assert downloads.get(DIGEST) is None
    cache.gate.set()
    answer = await request
    assert answer.source == SOURCE_LOCAL
    assert await body(answer) == DATA


async def test_a_peer_waits_for_a_download_to_start_then_is_told_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A referral may name a node still finding its source: a peer waits for it, boundedly.

    Two nodes each waiting for the other to start would otherwise wait until a read timeout.
    """
    monkeypatch.setattr(service_module, "PEER_START_WAIT", 0.2)
    service, downloads, download = await reserved_in(CacheStore(tmp_path / "cache"))
    with pytest.raises(TooManyRequests, match="has not started arriving here yet"):
        await service.blob(TARGET, Caller.PEER, None, head=False)

    # Started while the peer waits: it gets the blob.
    request = asyncio.create_task(service.blob(TARGET, Caller.PEER, None, head=False))
    await asyncio.sleep(0)
    downloads.begin(download, whole_data)
    assert await body(await request) == DATA


async def test_a_peer_waits_for_an_upstream_fetch_to_start_past_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download from upstream waits on no node, so a peer waits for it unbounded: told busy,
    a node that lost the claim to this one would fetch the blob from upstream itself."""
    monkeypatch.setattr(service_module, "PEER_START_WAIT", 0)
    service, downloads, download = await reserved_in(CacheStore(tmp_path / "cache"))
    upstream_answers = asyncio.Event()

    async def slow_upstream() -> Source:
        await upstream_answers.wait()
        return await whole_data()

    downloads.begin(download, slow_upstream)
    request = asyncio.create_task(service.blob(TARGET, Caller.PEER, None, head=False))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not request.done(), "told busy while upstream was still answering"
    upstream_answers.set()
    assert await body(await request) == DATA


async def test_a_peer_waits_for_a_claim_being_decided_past_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A starved node may be named the claimant before its own claim's answer is back; the
    nodes that lost to it ask it for the blob meanwhile. Told busy, each fetched the blob from
    upstream itself (a cold pull at 2.5x the image from upstream). They wait for the claim:
    it waits on no node. Once it is decided without a fetch here, the bound applies again."""
    monkeypatch.setattr(service_module, "PEER_START_WAIT", 0)
    service, downloads, download = await reserved_in(CacheStore(tmp_path / "cache"))
    with download.deciding_claim():
        request = asyncio.create_task(service.blob(TARGET, Caller.PEER, None, head=False))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not request.done(), "told busy while this node's claim was being decided"
    downloads.begin(download, whole_data)  # won: fetched from upstream
    assert await body(await request) == DATA

    service, downloads, download = await reserved_in(CacheStore(tmp_path / "lost"))
    with download.deciding_claim():
        request = asyncio.create_task(service.blob(TARGET, Caller.PEER, None, head=False))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not request.done()
    with pytest.raises(TooManyRequests, match="has not started arriving here yet"):
        await request  # lost, and not started within the bound


class GatedRouter:
    """The real DHT, with claim decisions held until the test opens the gate."""

    def __init__(self, dht: DhtNode) -> None:
        self._dht = dht
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def find_providers(self, key: str, want: int = 2) -> list[Provider]:
        return await self._dht.find_providers(key, want)

    async def claim(self, key: str, ttl: float) -> Provider | None:
        self.entered.set()
        await self.gate.wait()
        return await self._dht.claim(key, ttl)

    async def release(self, key: str) -> None:
        await self._dht.release(key)

    async def provide(self, key: str) -> bool:
        return await self._dht.provide(key)

    async def withdraw(self, key: str) -> None:
        await self._dht.withdraw(key)

    def ready(self) -> bool:
        return self._dht.ready()


@dataclass
class Holder:
    """A node that claimed the blob's upstream fetch and serves it (a real registry front)."""

    dht: DhtNode
    address: str


@pytest.fixture
async def holder(tmp_path: Path) -> AsyncIterator[Holder]:
    store = CacheStore(tmp_path / "holder")
    await store.start()
    await store.put(DIGEST, DATA)
    metrics = Metrics()
    access = AccessPolicy(allowed_clients=(), verifier=RequestVerifier(KEY))
    api = RegistryApi(metrics, ContentService(store, metrics, POLICY), access=access)
    server = TestServer(api.app(), host="127.0.0.1")
    await server.start_server()
    address = f"127.0.0.1:{server.port}"
    dht = DhtNode(
        http_address=address, cluster_key=KEY, node_id=stable_node_id(address), metrics=metrics
    )
    await dht.listen("127.0.0.1", 0)
    yield Holder(dht, address)
    await dht.close()
    await server.close()


async def test_a_request_that_joined_an_abandoned_reservation_follows_the_claimant(
    tmp_path: Path, holder: Holder
) -> None:
    """Two local pulls of one blob; the first reserves it, then loses the claim to a peer.

    The second, which joined the first's reservation, must not fail (the runtime would then
    go upstream itself): it looks again and streams from the claimant too.
    """
    ours = DhtNode(
        http_address="127.0.0.1:9", cluster_key=KEY, node_id=stable_node_id("ours"), metrics=None
    )
    await ours.listen("127.0.0.1", 0)
    await ours.bootstrap([holder.dht.router_address])
    cache = CacheStore(tmp_path / "cache")
    await cache.start()
    metrics = Metrics()
    peers = PeerFetcher(ours, RequestSigner(KEY), metrics)
    await peers.start()
    # Never reached when the cluster coalesces: a closed port, so a regression fails fast.
    upstream = UpstreamClient(UpstreamMap({REGISTRY: "http://127.0.0.1:9"}), None, metrics)
    await upstream.start()
    router = GatedRouter(ours)
    service = ContentService(
        cache, metrics, POLICY, cache=cache, peers=peers, router=router, upstream=upstream
    )
    try:
        assert await holder.dht.claim(str(DIGEST), 30.0) is None  # the peer fetches it
        first = asyncio.create_task(service.blob(TARGET, Caller.RUNTIME, None, head=False))
        await router.entered.wait()
        second = asyncio.create_task(service.blob(TARGET, Caller.RUNTIME, None, head=False))
        # Yield until the second request waits on the first one's reservation.
        while not metrics.registry.get_sample_value(
            "mirror_coalesced_waits_total", {"where": "node"}
        ):
            await asyncio.sleep(0)
        router.gate.set()
        answers = await asyncio.gather(first, second)
        assert [answer.source for answer in answers] == [SOURCE_PEER, SOURCE_PEER]
        assert [await body(answer) for answer in answers] == [DATA, DATA]
    finally:
        await service.close()
        await peers.close()
        await upstream.close()
        await ours.close()
