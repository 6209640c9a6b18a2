"""The content service's decision order, without sockets: where each request's bytes come from.

local store -> a download under way here -> peers -> a cluster-wide claim -> upstream; a whole
blob from a peer is a download here like an upstream one (announced at once, shared, kept); tags
upstream first, then this node and the cluster when upstream is out; a peer's request never
travels further than this node. The router is the in-memory one, peers and upstream are
in-memory sources (tests/harness/memory_sources.py); only the node cache is real, on tmp_path.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness.memory_sources import MemoryPeers, MemoryUpstream, digest_of
from harness.waits import until

from mirror.content.downloads import DownloadFailed
from mirror.content.service import BlobAnswer, ContentPolicy, ContentService, _peer_opener
from mirror.errors import BlobUnknown, ManifestUnknown, NameUnknown, RangeNotSatisfiable
from mirror.metrics import SOURCE_LOCAL, SOURCE_PEER, SOURCE_UPSTREAM, Metrics
from mirror.oci import mediatypes as mt
from mirror.oci.reference import parse_digest, tag_ref
from mirror.peers.fetcher import PeerBlob
from mirror.ranges import RangeRequest
from mirror.request import Caller, Kind, TagPage, Target
from mirror.routing.memory import MemoryCluster, MemoryRouter
from mirror.routing.router import Provider
from mirror.stores.cache import CacheStore

REGISTRY = "registry.test"
REPOSITORY = "team/app"
LAYER = bytes(range(256)) * 1024  # 256 KiB
LAYER_DIGEST = parse_digest(digest_of(LAYER))
CONFIG = b'{"architecture":"amd64"}'
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"digest": digest_of(CONFIG), "size": len(CONFIG)},
        "layers": [{"digest": str(LAYER_DIGEST), "size": len(LAYER)}],
    }
).encode()
MANIFEST_DIGEST = parse_digest(digest_of(MANIFEST))
POLICY = ContentPolicy(mirrored_registries=None, resolve_tags=True, tag_timeout=1.0)
PEER = Provider(b"p" * 20, "10.0.0.2:5000")
OTHER_NODE = Provider(b"o" * 20, "10.0.0.3:5000")


def blob_target(digest: str = str(LAYER_DIGEST), registry: str = REGISTRY) -> Target:
    return Target(Kind.BLOB, registry, REPOSITORY, None, parse_digest(digest))


def tag_target(tag: str = "v1", registry: str = REGISTRY) -> Target:
    return Target(Kind.MANIFEST, registry, REPOSITORY, tag_ref(registry, REPOSITORY, tag), None)


def digest_target(digest: str) -> Target:
    return Target(Kind.MANIFEST, REGISTRY, REPOSITORY, None, parse_digest(digest))


@dataclass
class Node:
    service: ContentService
    cache: CacheStore
    router: MemoryRouter
    peers: MemoryPeers
    upstream: MemoryUpstream
    metrics: Metrics


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    cache = CacheStore(tmp_path / "cache")
    await cache.start()
    cluster = MemoryCluster()
    router = cluster.router(b"n" * 20, "10.0.0.1:5000")
    peers = MemoryPeers(router)
    upstream = MemoryUpstream()
    metrics = Metrics()
    service = ContentService(
        cache, metrics, POLICY, cache=cache, peers=peers, router=router, upstream=upstream
    )
    yield Node(service, cache, router, peers, upstream, metrics)
    await service.close()
    await cache.close()


async def body(answer: BlobAnswer) -> bytes:
    try:
        if answer.local is not None:
            offset, length = 0, answer.size
            if answer.byte_range is not None:
                offset, length = answer.byte_range.offset, answer.byte_range.length
            return b"".join([chunk async for chunk in answer.local.iter_range(offset, length)])
        assert answer.chunks is not None
        return b"".join([chunk async for chunk in answer.chunks])
    finally:
        await answer.close()


async def fetch(node: Node, requested: RangeRequest | None = None) -> tuple[str, bytes]:
    answer = await node.service.blob(blob_target(), Caller.RUNTIME, requested, head=False)
    return answer.source, await body(answer)


# --- blobs ------------------------------------------------------------------------------------


async def test_a_blob_held_here_is_served_locally_without_asking_anyone(node: Node) -> None:
    await node.cache.put(LAYER_DIGEST, LAYER)
    assert await fetch(node) == (SOURCE_LOCAL, LAYER)
    assert node.router.calls == []
    assert node.upstream.asked == []


async def test_a_local_range_is_cut_from_the_local_blob(node: Node) -> None:
    await node.cache.put(LAYER_DIGEST, LAYER)
    assert await fetch(node, RangeRequest(10, 19)) == (SOURCE_LOCAL, LAYER[10:20])
    with pytest.raises(RangeNotSatisfiable):
        await fetch(node, RangeRequest(len(LAYER)))


async def test_peers_are_asked_before_upstream(node: Node) -> None:
    node.upstream.blobs[str(LAYER_DIGEST)] = LAYER
    node.peers.give(PEER, str(LAYER_DIGEST), LAYER)
    assert await fetch(node) == (SOURCE_PEER, LAYER)
    assert node.upstream.asked == []
    assert ("claim", str(LAYER_DIGEST)) not in node.router.calls


async def test_a_range_goes_to_the_peer_as_asked(node: Node) -> None:
    """A range of a blob nobody here has is a resume: passed through, neither kept nor
    announced; so is a HEAD."""
    node.peers.give(PEER, str(LAYER_DIGEST), LAYER)
    answer = await node.service.blob(
        blob_target(), Caller.RUNTIME, RangeRequest(suffix=5), head=False
    )
    assert answer.byte_range is not None and answer.byte_range.offset == len(LAYER) - 5
    assert await body(answer) == LAYER[-5:]
    head = await node.service.blob(blob_target(), Caller.RUNTIME, None, head=True)
    assert (head.source, head.size, head.chunks) == (SOURCE_PEER, len(LAYER), None)
    await asyncio.gather(*node.service._background)
    assert not node.cache.holds(LAYER_DIGEST)
    assert ("provide", str(LAYER_DIGEST)) not in node.router.calls


def coalesced(node: Node) -> float:
    """Requests that joined a download under way on this node so far."""
    found = node.metrics.registry.get_sample_value(
        "mirror_coalesced_waits_total", {"where": "node"}
    )
    return found or 0.0


async def test_a_redirected_runtime_joins_a_download_under_way_as_a_peer_does(
    node: Node,
) -> None:
    """A signed URL is served like a peer's request: what arrived at once, the end only once
    verified. Should the fetch fail, the runtime's retry goes through its own node."""
    key = str(LAYER_DIGEST)
    node.peers.give(PEER, key, LAYER)
    node.peers.gate = asyncio.Event()
    fetching = asyncio.create_task(fetch(node))
    await node.peers.midway.wait()
    answer = await node.service.blob(blob_target(), Caller.REDIRECTED, None, head=False)
    assert answer.source == SOURCE_PEER and answer.growing is not None
    node.peers.gate.set()
    assert await body(answer) == LAYER
    assert await fetching == (SOURCE_PEER, LAYER)
    answer = await node.service.blob(blob_target(), Caller.REDIRECTED, None, head=False)
    assert answer.source == SOURCE_LOCAL and await body(answer) == LAYER
    assert node.peers.asked == [(PEER.address, key)]


async def test_a_blob_from_a_peer_is_a_download_announced_at_once_shared_and_kept(
    node: Node,
) -> None:
    """Fetched from a peer as an upstream fetch is: a provider from the first byte, one fetch
    for every reader here and for peers (what arrived is served at once), kept afterwards."""
    key = str(LAYER_DIGEST)
    node.peers.give(PEER, key, LAYER)
    node.peers.gate = asyncio.Event()
    first = asyncio.create_task(fetch(node))
    await node.peers.midway.wait()  # half the blob is here, the rest held back at the peer
    assert node.service._downloads is not None
    download = node.service._downloads.get(LAYER_DIGEST)
    assert download is not None and download.origin == SOURCE_PEER
    await until(lambda: ("provide", key) in node.router.calls)  # the announcement's task ran
    assert key in node.router.announced() and not download.finished.done()

    second = asyncio.create_task(fetch(node))  # another local pull joins the fetch
    await until(lambda: coalesced(node) >= 1)
    # A peer's range is served once the download has its first byte (before: "not here yet").
    await until(lambda: download.received > 1000)
    from_peer = await node.service.blob(
        blob_target(), Caller.PEER, RangeRequest(1000, 1999), head=False
    )
    assert from_peer.source == SOURCE_PEER and await body(from_peer) == LAYER[1000:2000]
    assert not download.finished.done()

    node.peers.gate.set()
    assert await first == (SOURCE_PEER, LAYER)
    assert await second == (SOURCE_PEER, LAYER)
    assert node.peers.asked == [(PEER.address, key)]
    await asyncio.gather(*node.service._background)
    assert node.cache.holds(LAYER_DIGEST)
    assert key in node.router.announced()
    assert await fetch(node) == (SOURCE_LOCAL, LAYER)
    assert [op for op, k in node.router.calls if k == key] == ["find_providers", "provide"]
    assert node.upstream.asked == []


async def test_a_peer_fetch_that_breaks_is_withdrawn_and_leaves_nothing(node: Node) -> None:
    key = str(LAYER_DIGEST)
    node.peers.give(PEER, key, LAYER)
    node.peers.break_midway = True
    with pytest.raises(DownloadFailed):
        await fetch(node)
    await asyncio.gather(*node.service._background)
    assert [op for op, k in node.router.calls if k == key] == [
        "find_providers",
        "provide",
        "withdraw",
    ]
    assert key not in node.router.announced()
    assert not node.cache.holds(LAYER_DIGEST)
    assert node.peers.bodies_closed == 1
    assert list((node.cache.root / "tmp").iterdir()) == []
    assert node.service._downloads is not None and node.service._downloads.get(LAYER_DIGEST) is None


async def test_a_whole_blob_from_a_peer_is_not_hashed_again_but_a_part_of_one_is() -> None:
    """The peer fetcher checks a whole blob against its digest (its last chunk held back until
    it matches): the download takes it as verified. A holder that answered with a part of the
    blob is not checked by the fetcher: the download hashes it."""

    async def chunks() -> AsyncIterator[bytes]:
        yield LAYER

    whole = await _peer_opener(PeerBlob(len(LAYER), 0, len(LAYER), chunks()))()
    part = await _peer_opener(PeerBlob(len(LAYER), 0, len(LAYER) - 1, chunks()))()
    assert whole is not None and whole.verified
    assert part is not None and not part.verified


async def test_a_peer_blob_the_cache_cannot_keep_streams_through_and_is_withdrawn(
    tmp_path: Path,
) -> None:
    cache = CacheStore(tmp_path / "small", max_bytes=len(LAYER) // 2)
    await cache.start()
    router = MemoryCluster().router(b"n" * 20, "10.0.0.1:5000")
    peers = MemoryPeers(router)
    peers.give(PEER, str(LAYER_DIGEST), LAYER)
    service = ContentService(cache, Metrics(), POLICY, cache=cache, peers=peers, router=router)
    try:
        answer = await service.blob(blob_target(), Caller.RUNTIME, None, head=False)
        assert (answer.source, await body(answer)) == (SOURCE_PEER, LAYER)
        await asyncio.gather(*service._background)
        assert not cache.holds(LAYER_DIGEST)
        assert ("provide", str(LAYER_DIGEST)) in router.calls
        assert str(LAYER_DIGEST) not in router.announced()
    finally:
        await service.close()
        await cache.close()


async def test_a_miss_in_the_cluster_is_claimed_fetched_once_announced_and_kept(
    node: Node,
) -> None:
    node.upstream.blobs[str(LAYER_DIGEST)] = LAYER
    assert await fetch(node) == (SOURCE_UPSTREAM, LAYER)
    operations = [operation for operation, key in node.router.calls if key == str(LAYER_DIGEST)]
    assert operations[:2] == ["find_providers", "claim"]
    await asyncio.gather(*node.service._background)  # the announcement after the fetch
    assert "provide" in [operation for operation, _ in node.router.calls]
    assert str(LAYER_DIGEST) in node.router.announced()
    # Kept in the node cache: the next request is local and upstream is not asked again.
    assert await fetch(node) == (SOURCE_LOCAL, LAYER)
    assert node.upstream.count("blob", str(LAYER_DIGEST)) == 1


async def test_concurrent_requests_join_the_download_under_way(node: Node) -> None:
    node.upstream.blobs[str(LAYER_DIGEST)] = LAYER
    node.upstream.gate = asyncio.Event()
    first = asyncio.create_task(fetch(node))
    while not node.upstream.asked:
        await asyncio.sleep(0)
    second = asyncio.create_task(fetch(node, RangeRequest(100, 199)))
    while not node.metrics.registry.get_sample_value(
        "mirror_coalesced_waits_total", {"where": "node"}
    ):
        await asyncio.sleep(0)
    node.upstream.gate.set()
    assert await first == (SOURCE_UPSTREAM, LAYER)
    assert await second == (SOURCE_UPSTREAM, LAYER[100:200])
    assert node.upstream.count("blob", str(LAYER_DIGEST)) == 1


async def test_a_blob_another_node_claimed_is_streamed_from_that_node(node: Node) -> None:
    node.upstream.blobs[str(LAYER_DIGEST)] = LAYER
    other = node.router.cluster.router(OTHER_NODE.node_id, OTHER_NODE.address)
    assert await other.claim(str(LAYER_DIGEST), 30.0) is None  # the other node fetches it
    node.peers.held[OTHER_NODE.address] = {str(LAYER_DIGEST): LAYER}  # ...and serves it
    assert await fetch(node) == (SOURCE_PEER, LAYER)
    assert node.upstream.asked == []
    assert node.metrics.registry.get_sample_value(
        "mirror_coalesced_waits_total", {"where": "cluster"}
    )


async def test_a_blob_the_lookup_missed_comes_from_the_node_the_claim_names(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup cut short (a starved node's deadline) finds nobody though a node holds the
    blob: the claim's arbiter keeps the key's records and names that node, so the blob comes
    from it, not from upstream a second time."""
    key = str(LAYER_DIGEST)
    node.upstream.blobs[key] = LAYER
    node.peers.give(PEER, key, LAYER)

    async def cut_short(key: str, want: int = 2) -> list[Provider]:
        return []

    monkeypatch.setattr(node.router, "find_providers", cut_short)
    assert await fetch(node) == (SOURCE_PEER, LAYER)
    assert ("claim", key) in node.router.calls
    assert node.peers.asked == [(PEER.address, key)]
    assert node.upstream.asked == []
    assert node.router.cluster.holder(key) is None, "no claim was granted"


async def test_a_node_that_lost_the_claim_fetches_from_the_winner_as_a_download(
    node: Node,
) -> None:
    """The loser is a provider at once too: in a rollout, later nodes spread over both."""
    key = str(LAYER_DIGEST)
    node.upstream.blobs[key] = LAYER
    other = node.router.cluster.router(OTHER_NODE.node_id, OTHER_NODE.address)
    assert await other.claim(key, 30.0) is None  # the other node fetches it
    node.peers.held[OTHER_NODE.address] = {key: LAYER}
    node.peers.gate = asyncio.Event()
    first = asyncio.create_task(fetch(node))
    await node.peers.midway.wait()
    await until(lambda: ("provide", key) in node.router.calls)
    assert node.router.announced() == {key}
    node.peers.gate.set()
    assert await first == (SOURCE_PEER, LAYER)
    await asyncio.gather(*node.service._background)
    assert node.cache.holds(LAYER_DIGEST) and node.router.announced() == {key}
    assert node.router.cluster.holder(key) == OTHER_NODE  # the winner's claim is left alone
    assert node.upstream.asked == []


async def test_an_abandoned_claim_is_fetched_here(node: Node) -> None:
    """The claimant never serves the blob (it died): a duplicate fetch beats a failed pull."""
    node.upstream.blobs[str(LAYER_DIGEST)] = LAYER
    other = node.router.cluster.router(OTHER_NODE.node_id, OTHER_NODE.address)
    assert await other.claim(str(LAYER_DIGEST), 30.0) is None
    assert await fetch(node) == (SOURCE_UPSTREAM, LAYER)
    assert node.peers.asked == [(OTHER_NODE.address, str(LAYER_DIGEST))]
    assert node.upstream.count("blob", str(LAYER_DIGEST)) == 1


async def test_a_failed_fetch_releases_its_claim(node: Node) -> None:
    assert node.upstream.blobs == {}
    with pytest.raises(BlobUnknown):
        await fetch(node)
    await asyncio.gather(*node.service._background)
    assert ("release", str(LAYER_DIGEST)) in node.router.calls
    assert node.router.cluster.holder(str(LAYER_DIGEST)) is None


async def test_a_range_nobody_holds_is_passed_through_upstream_and_not_kept(node: Node) -> None:
    node.upstream.blobs[str(LAYER_DIGEST)] = LAYER
    assert await fetch(node, RangeRequest(5, 9)) == (SOURCE_UPSTREAM, LAYER[5:10])
    assert not node.cache.holds(LAYER_DIGEST)
    assert ("claim", str(LAYER_DIGEST)) not in node.router.calls


async def test_an_unreachable_router_means_fetching_alone(node: Node) -> None:
    node.router.down = True
    node.upstream.blobs[str(LAYER_DIGEST)] = LAYER
    assert await fetch(node) == (SOURCE_UPSTREAM, LAYER)


async def test_a_peer_request_is_answered_from_this_node_only(node: Node) -> None:
    node.upstream.blobs[str(LAYER_DIGEST)] = LAYER
    node.peers.give(PEER, str(LAYER_DIGEST), LAYER)
    with pytest.raises(BlobUnknown):
        await node.service.blob(blob_target(), Caller.PEER, None, head=False)
    with pytest.raises(ManifestUnknown):
        await node.service.manifest(digest_target(str(MANIFEST_DIGEST)), Caller.PEER)
    assert node.router.calls == [] and node.upstream.asked == [] and node.peers.asked == []


# --- manifests and tags -----------------------------------------------------------------------


async def test_a_tag_is_resolved_upstream_first_and_remembered(node: Node) -> None:
    stale = MANIFEST.replace(b'"schemaVersion": 2', b'"schemaVersion": 2 ')
    await node.cache.put(parse_digest(digest_of(stale)), stale)
    await node.cache.set_tag(tag_target().tag, parse_digest(digest_of(stale)))  # type: ignore[arg-type]
    node.upstream.push(REGISTRY, REPOSITORY, "v1", MANIFEST)
    answer = await node.service.manifest(tag_target(), Caller.RUNTIME)
    assert (answer.digest, answer.source) == (str(MANIFEST_DIGEST), SOURCE_UPSTREAM)
    assert await node.cache.resolve(tag_ref(REGISTRY, REPOSITORY, "v1")) is not None
    # Upstream down now: the tag upstream last confirmed is answered from this node.
    node.upstream.down = True
    answer = await node.service.manifest(tag_target(), Caller.RUNTIME)
    assert (answer.digest, answer.source) == (str(MANIFEST_DIGEST), SOURCE_LOCAL)


async def test_a_tag_missing_upstream_is_missing(node: Node) -> None:
    await node.cache.put(MANIFEST_DIGEST, MANIFEST)
    await node.cache.set_tag(tag_ref(REGISTRY, REPOSITORY, "v1"), MANIFEST_DIGEST)
    with pytest.raises(ManifestUnknown):
        await node.service.manifest(tag_target(), Caller.RUNTIME)


async def test_during_an_outage_a_tag_comes_from_the_cluster(node: Node) -> None:
    node.upstream.down = True
    node.peers.give(PEER, f"{REGISTRY}/{REPOSITORY}:v1", MANIFEST)
    answer = await node.service.manifest(tag_target(), Caller.RUNTIME)
    assert (answer.digest, answer.source) == (str(MANIFEST_DIGEST), SOURCE_PEER)


async def test_during_an_outage_tags_are_not_guessed_when_told_not_to(tmp_path: Path) -> None:
    cache = CacheStore(tmp_path / "cache")
    await cache.start()
    await cache.put(MANIFEST_DIGEST, MANIFEST)
    await cache.set_tag(tag_ref(REGISTRY, REPOSITORY, "v1"), MANIFEST_DIGEST)
    upstream = MemoryUpstream(down=True)
    strict = ContentPolicy(mirrored_registries=None, resolve_tags=False, tag_timeout=1.0)
    service = ContentService(cache, Metrics(), strict, cache=cache, upstream=upstream)
    with pytest.raises(ManifestUnknown):
        await service.manifest(tag_target(), Caller.RUNTIME)
    await service.close()


async def test_a_manifest_by_digest_comes_from_peers_then_upstream_and_is_kept(
    node: Node,
) -> None:
    node.upstream.manifests[str(MANIFEST_DIGEST)] = MANIFEST
    answer = await node.service.manifest(digest_target(str(MANIFEST_DIGEST)), Caller.RUNTIME)
    assert answer.source == SOURCE_UPSTREAM and answer.body == MANIFEST
    answer = await node.service.manifest(digest_target(str(MANIFEST_DIGEST)), Caller.RUNTIME)
    assert answer.source == SOURCE_LOCAL
    assert node.upstream.count("manifest", str(MANIFEST_DIGEST)) == 1


async def test_tags_are_listed_from_this_node_with_pages(node: Node) -> None:
    await node.cache.put(MANIFEST_DIGEST, MANIFEST)
    for tag in ("v1", "v2", "v3"):
        await node.cache.set_tag(tag_ref(REGISTRY, REPOSITORY, tag), MANIFEST_DIGEST)
    target = Target(Kind.TAGS, REGISTRY, REPOSITORY, None, None)
    assert await node.service.tags(target, TagPage()) == ["v1", "v2", "v3"]
    assert await node.service.tags(target, TagPage(limit=1, last="v1")) == ["v2"]
    with pytest.raises(NameUnknown):
        await node.service.tags(Target(Kind.TAGS, REGISTRY, "other", None, None), TagPage())


# --- policy and readiness ---------------------------------------------------------------------


async def test_registries_that_are_not_mirrored_are_unknown_for_every_kind(
    tmp_path: Path,
) -> None:
    cache = CacheStore(tmp_path / "cache")
    await cache.start()
    await cache.put(LAYER_DIGEST, LAYER)
    await cache.put(MANIFEST_DIGEST, MANIFEST)
    await cache.set_tag(tag_ref("ghcr.io", REPOSITORY, "v1"), MANIFEST_DIGEST)
    policy = ContentPolicy(
        mirrored_registries=frozenset({"docker.io"}), resolve_tags=True, tag_timeout=1.0
    )
    service = ContentService(cache, Metrics(), policy, cache=cache)
    with pytest.raises(BlobUnknown):
        await service.blob(blob_target(registry="ghcr.io"), Caller.RUNTIME, None, head=False)
    with pytest.raises(ManifestUnknown):
        await service.manifest(tag_target(registry="ghcr.io"), Caller.RUNTIME)
    with pytest.raises(NameUnknown):
        await service.tags(Target(Kind.TAGS, "ghcr.io", REPOSITORY, None, None), TagPage())
    await service.close()


async def test_readiness_needs_the_store_and_the_router(node: Node) -> None:
    assert await node.service.ready()
    node.router.down = True
    assert not await node.service.ready()
