"""PeerFetcher against peers that misbehave: slow, dying mid-blob, sending wrong bytes.

The peers are small aiohttp servers on loopback that behave the way a broken or hostile node
would; a real mirror node never sends wrong bytes, so this is the only way to show the fetcher's
defences. The provider list comes from the in-memory router instead of the DHT (tested on its
own).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from harness.dht import cluster

from mirror.clusterkey import ClusterKey
from mirror.errors import DigestMismatch, PeerUnavailable
from mirror.metrics import Metrics
from mirror.oci.reference import Digest, parse_digest
from mirror.peers.auth import PEER_HEADER, RequestSigner, RequestVerifier
from mirror.peers.fetcher import REPORT_PATH_PREFIX, PeerFetcher
from mirror.ranges import RangeRequest, resolve_range
from mirror.routing.memory import MemoryCluster, MemoryRouter
from mirror.routing.router import Provider

KEY = ClusterKey.from_text(ClusterKey.generate())
BLOB = bytes(range(256)) * 16384  # 4 MiB
DIGEST = parse_digest("sha256:" + hashlib.sha256(BLOB).hexdigest())
PATH = f"/v2/app/blobs/{DIGEST}"

Behaviour = Callable[[web.Request], Awaitable[web.StreamResponse]]


TAG_KEY = "docker.io/app:1"


def router_for(*providers: Provider) -> MemoryRouter:
    """A router whose cluster lists `providers`, in this order, as holders of DIGEST and TAG_KEY."""
    cluster = MemoryCluster()
    for key in (str(DIGEST), TAG_KEY):
        cluster.providers[key] = {provider.node_id: provider for provider in providers}
    return cluster.router(b"\xff" * 20, "127.0.0.1:9")


@dataclass
class Peers:
    servers: list[TestServer] = field(default_factory=list)
    seen: list[tuple[int, str | None]] = field(default_factory=list)
    # (peer index, path) of every signed POST: reports of a blob that did not match its digest.
    reports: list[tuple[int, str]] = field(default_factory=list)

    async def add(self, behaviour: Behaviour) -> Provider:
        verifier = RequestVerifier(KEY)
        index = len(self.servers)

        async def handle(request: web.Request) -> web.StreamResponse:
            signature = request.headers.get(PEER_HEADER, "")
            assert verifier.verify(signature, request.method, request.raw_path)
            if request.method == "POST":
                self.reports.append((index, request.raw_path))
                return web.json_response({"outcome": "queued"}, status=202)
            self.seen.append((index, request.headers.get("Range")))
            return await behaviour(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        self.servers.append(server)
        return Provider(bytes([index]) * 20, f"127.0.0.1:{server.port}")


@pytest.fixture
async def peers() -> AsyncIterator[Peers]:
    created = Peers()
    yield created
    for server in created.servers:
        await server.close()


async def good(request: web.Request) -> web.StreamResponse:
    byte_range = resolve_range(request.headers.get("Range"), len(BLOB))
    if byte_range is None:
        return web.Response(body=BLOB)
    end = byte_range.offset + byte_range.length
    return web.Response(
        status=206,
        body=BLOB[byte_range.offset : end],
        headers={"Content-Range": byte_range.content_range(len(BLOB))},
    )


def dying_after(limit: int) -> Behaviour:
    async def behaviour(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(len(BLOB))})
        await response.prepare(request)
        await response.write(BLOB[:limit])
        assert request.transport is not None
        request.transport.abort()
        return response

    return behaviour


async def corrupt(request: web.Request) -> web.StreamResponse:
    return web.Response(body=BLOB[:-1] + b"\x00")


async def missing(request: web.Request) -> web.StreamResponse:
    return web.Response(status=404)


def slow(seconds: float) -> Behaviour:
    async def behaviour(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return await good(request)

    return behaviour


async def fetcher_for(*providers: Provider, hedge_after: float = 0.05) -> PeerFetcher:
    fetcher = PeerFetcher(
        router_for(*providers), RequestSigner(KEY), Metrics(), hedge_after=hedge_after
    )
    await fetcher.start()
    return fetcher


async def read_all(fetcher: PeerFetcher, requested: RangeRequest | None = None) -> bytes:
    blob = await fetcher.blob(DIGEST, PATH, requested)
    assert blob is not None and blob.chunks is not None
    return b"".join([chunk async for chunk in blob.chunks])


async def test_streams_a_whole_blob(peers: Peers) -> None:
    fetcher = await fetcher_for(await peers.add(good))
    try:
        assert await read_all(fetcher) == BLOB
    finally:
        await fetcher.close()


async def test_a_peer_dying_mid_blob_is_resumed_elsewhere_with_a_range(peers: Peers) -> None:
    dying = await peers.add(dying_after(1_000_000))
    spare = await peers.add(good)
    fetcher = PeerFetcher(router_for(dying, spare), RequestSigner(KEY), Metrics(), hedge_after=5)
    await fetcher.start()
    try:
        # Shuffling may put the spare first; retry until the dying peer was asked first.
        for _ in range(50):
            peers.seen.clear()
            assert await read_all(fetcher) == BLOB
            if peers.seen[0][0] == 0:
                break
        assert peers.seen[0] == (0, None)
        index, range_header = peers.seen[1]
        assert index == 1 and range_header is not None
        assert range_header.startswith("bytes=") and range_header.endswith(f"-{len(BLOB) - 1}")
        assert int(range_header[6:].split("-")[0]) > 0
    finally:
        await fetcher.close()


async def test_wrong_bytes_never_complete_and_the_peer_is_distrusted(peers: Peers) -> None:
    bad = await peers.add(corrupt)
    metrics = Metrics()
    fetcher = PeerFetcher(router_for(bad), RequestSigner(KEY), metrics)
    await fetcher.start()
    received = bytearray()
    try:
        blob = await fetcher.blob(DIGEST, PATH, None)
        assert blob is not None and blob.chunks is not None
        with pytest.raises(DigestMismatch):
            async for chunk in blob.chunks:
                received += chunk
        assert len(received) < len(BLOB), "the whole wrong body was handed out"
        assert await fetcher.blob(DIGEST, PATH, None) is None, "distrusted peer asked again"
        assert metrics.registry.get_sample_value(
            "mirror_peer_fetch_failures_total", {"reason": "digest-mismatch"}
        )
    finally:
        await fetcher.close()


async def test_a_slow_peer_is_hedged(peers: Peers) -> None:
    slow_peer = await peers.add(slow(2.0))
    fast_peer = await peers.add(good)
    fetcher = await fetcher_for(slow_peer, fast_peer, hedge_after=0.05)
    try:
        loop = asyncio.get_running_loop()
        for _ in range(5):
            started = loop.time()
            assert await read_all(fetcher) == BLOB
            assert loop.time() - started < 1.5
    finally:
        await fetcher.close()


async def test_a_range_is_forwarded(peers: Peers) -> None:
    fetcher = await fetcher_for(await peers.add(good))
    try:
        blob = await fetcher.blob(DIGEST, PATH, RangeRequest(100, 199))
        assert blob is not None and blob.chunks is not None
        assert (blob.size, blob.offset, blob.length) == (len(BLOB), 100, 100)
        assert b"".join([c async for c in blob.chunks]) == BLOB[100:200]
    finally:
        await fetcher.close()


async def test_no_usable_peer_is_none_and_death_without_spare_is_an_error(peers: Peers) -> None:
    fetcher = await fetcher_for(await peers.add(missing))
    try:
        assert await fetcher.blob(DIGEST, PATH, None) is None
    finally:
        await fetcher.close()
    fetcher = await fetcher_for(await peers.add(dying_after(1000)))
    try:
        blob = await fetcher.blob(DIGEST, PATH, None)
        assert blob is not None and blob.chunks is not None
        with pytest.raises(PeerUnavailable):
            async for _ in blob.chunks:
                pass
    finally:
        await fetcher.close()


async def test_manifest_digest_is_checked(peers: Peers) -> None:
    manifest = b'{"schemaVersion":2,"config":{},"layers":[]}'
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()

    async def serve(request: web.Request) -> web.StreamResponse:
        return web.Response(body=manifest, headers={"Docker-Content-Digest": digest})

    async def lie(request: web.Request) -> web.StreamResponse:
        return web.Response(body=manifest + b" ", headers={"Docker-Content-Digest": digest})

    fetcher = await fetcher_for(await peers.add(lie))
    try:
        assert await fetcher.manifest(TAG_KEY, "/v2/app/manifests/1", None) is None
    finally:
        await fetcher.close()
    fetcher = await fetcher_for(await peers.add(serve))
    try:
        found = await fetcher.manifest(TAG_KEY, "/v2/app/manifests/1", None)
        assert found is not None and found.digest == digest and found.body == manifest
    finally:
        await fetcher.close()


async def test_a_lookup_is_timed_once_by_the_fetcher_and_not_again_by_the_dht() -> None:
    metrics = Metrics()
    async with cluster(3, metrics=metrics) as nodes:
        await nodes[1].provide(str(DIGEST))
        fetcher = PeerFetcher(nodes[0], RequestSigner(KEY), metrics)
        found = await fetcher.providers(str(DIGEST))
    assert [provider.address for provider in found] == [nodes[1].http_address]
    count = metrics.registry.get_sample_value(
        "mirror_peer_lookup_duration_seconds_count", {"result": "found"}
    )
    assert count == 1


def blob_of(seed: int, size: int = 2 * 1024 * 1024) -> tuple[bytes, Digest]:
    data = bytes((seed + i) % 251 for i in range(256)) * (size // 256)
    return data, parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


def serving(good: dict[Digest, bytes], corrupt: dict[Digest, bytes]) -> Behaviour:
    """A holder whose copies of `corrupt` have one byte flipped, the others intact."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        for digest, data in corrupt.items():
            if str(digest) in request.path:
                flipped = bytearray(data)
                flipped[len(data) // 2] ^= 0x01
                return web.Response(body=bytes(flipped))
        for digest, data in good.items():
            if str(digest) in request.path:
                return web.Response(body=data)
        return web.Response(status=404)

    return behaviour


def router_holding(provider: Provider, digests: list[Digest]) -> MemoryRouter:
    cluster = MemoryCluster()
    for digest in digests:
        cluster.providers[str(digest)] = {provider.node_id: provider}
    return cluster.router(b"\xff" * 20, "127.0.0.1:9")


async def fetch(fetcher: PeerFetcher, digest: Digest) -> bytes | None:
    """The whole blob, None when no provider is usable; raises what the stream raises."""
    blob = await fetcher.blob(digest, f"/v2/app/blobs/{digest}", None)
    if blob is None:
        return None
    assert blob.chunks is not None
    return b"".join([chunk async for chunk in blob.chunks])


async def test_a_mismatch_is_reported_and_only_that_digest_is_distrusted(peers: Peers) -> None:
    bad_bytes, bad = blob_of(1)
    good_bytes, good = blob_of(2)
    holder = await peers.add(serving({good: good_bytes}, {bad: bad_bytes}))
    metrics = Metrics()
    fetcher = PeerFetcher(router_holding(holder, [bad, good]), RequestSigner(KEY), metrics)
    await fetcher.start()
    try:
        with pytest.raises(DigestMismatch):
            await fetch(fetcher, bad)
        await fetcher.reports_sent()
        # Reached the holder, signed (the fake peer checks every signature), as a POST.
        assert peers.reports == [(0, f"{REPORT_PATH_PREFIX}{bad}")]
        assert metrics.registry.get_sample_value(
            "mirror_corruption_reports_sent_total", {"result": "accepted"}
        )
        assert await fetch(fetcher, bad) is None, "asked again for the digest it got wrong"
        assert await fetch(fetcher, good) == good_bytes, "distrusted for a digest it holds intact"
        assert peers.reports == [(0, f"{REPORT_PATH_PREFIX}{bad}")]
    finally:
        await fetcher.close()


async def test_distrust_of_a_digest_ends_and_many_bad_digests_distrust_the_node(
    peers: Peers,
) -> None:
    now = [1000.0]
    corrupt = dict(blob_of(seed)[::-1] for seed in (1, 2, 3))
    good_bytes, good = blob_of(9)
    holder = await peers.add(serving({good: good_bytes}, corrupt))
    fetcher = PeerFetcher(
        router_holding(holder, [*corrupt, good]),
        RequestSigner(KEY),
        Metrics(),
        clock=lambda: now[0],
    )
    await fetcher.start()
    try:
        first, second, third = corrupt
        with pytest.raises(DigestMismatch):
            await fetch(fetcher, first)
        assert await fetch(fetcher, first) is None
        now[0] += 61
        with pytest.raises(DigestMismatch):
            await fetch(fetcher, first)  # asked again a minute later
        with pytest.raises(DigestMismatch):
            await fetch(fetcher, second)
        assert await fetch(fetcher, good) == good_bytes, "two bad digests distrusted the node"
        with pytest.raises(DigestMismatch):
            await fetch(fetcher, third)
        assert await fetch(fetcher, good) is None, "three bad digests, yet still asked"
        now[0] += 601
        assert await fetch(fetcher, good) == good_bytes
        await fetcher.reports_sent()
        assert sorted(path for _, path in peers.reports) == sorted(
            f"{REPORT_PATH_PREFIX}{digest}" for digest in (first, first, second, third)
        )
    finally:
        await fetcher.close()


async def test_a_manifest_that_does_not_match_its_digest_is_reported(peers: Peers) -> None:
    manifest = b'{"schemaVersion":2,"config":{},"layers":[]}'
    digest = parse_digest("sha256:" + hashlib.sha256(manifest).hexdigest())

    async def rotten(request: web.Request) -> web.StreamResponse:
        return web.Response(body=manifest.replace(b"2", b"3"))

    holder = await peers.add(rotten)
    fetcher = PeerFetcher(router_holding(holder, [digest]), RequestSigner(KEY), Metrics())
    await fetcher.start()
    try:
        path = f"/v2/app/manifests/{digest}"
        assert await fetcher.manifest(str(digest), path, digest) is None
        await fetcher.reports_sent()
        assert peers.reports == [(0, f"{REPORT_PATH_PREFIX}{digest}")]
    finally:
        await fetcher.close()
