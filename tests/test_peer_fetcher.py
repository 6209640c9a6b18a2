"""PeerFetcher against peers that misbehave: slow, dying mid-blob, sending wrong bytes.

The peers are small aiohttp servers on loopback that behave the way a broken or hostile node
would; a real mirror node never sends wrong bytes, so this is the only way to show the fetcher's
defences. The provider list comes from the in-memory router instead of the DHT (tested on its
own).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from harness.dht import cluster

from mirror.clusterkey import ClusterKey
from mirror.content.downloads import Downloads, Source
from mirror.errors import DigestMismatch, PeerUnavailable
from mirror.metrics import Metrics
from mirror.oci.reference import Digest, parse_digest
from mirror.peers.auth import PEER_HEADER, RequestSigner, RequestVerifier
from mirror.peers.fetcher import LAST_RESORT_PARAM, REPORT_PATH_PREFIX, UPLOADS_HEADER, PeerFetcher
from mirror.peers.referrals import (
    HOPS_HEADER,
    MAX_REFERRED,
    SHARER_PARAM,
    TRY_HEADER,
    describe,
    parse_referral,
    parse_sharer,
    referral,
)
from mirror.ranges import RangeRequest, resolve_range
from mirror.routing.memory import MemoryCluster, MemoryRouter
from mirror.routing.router import Provider
from mirror.stores.cache import BlobWriter, CacheStore

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
    # (peer index, raw path with its query) of every signed GET and HEAD.
    paths: list[tuple[int, str]] = field(default_factory=list)

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
            self.paths.append((index, request.raw_path))
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


async def test_a_long_body_is_received_by_a_thread_of_its_own(peers: Peers) -> None:
    """Past aiohttp's per-chunk path (peers/receiver.py); the thread is gone with the blob."""
    fetcher = await fetcher_for(await peers.add(good))
    try:
        blob = await fetcher.blob(DIGEST, PATH, None)
        assert blob is not None and blob.chunks is not None
        chunks = [await anext(blob.chunks)]
        assert [t for t in threading.enumerate() if t.name == "peer-body"]
        chunks.extend([chunk async for chunk in blob.chunks])
        assert b"".join(chunks) == BLOB
        for thread in [t for t in threading.enumerate() if t.name == "peer-body"]:
            await asyncio.to_thread(thread.join, 5)  # told to end: it says so as its last act
            assert not thread.is_alive()
    finally:
        await fetcher.close()


async def test_a_shared_blob_is_written_into_the_cache_by_the_receiving_threads(
    peers: Peers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a node keeps and shares never enters the event loop on its way in: the threads
    receiving the peers' bodies write it into the cache's temp file, across a resume from
    another provider too; the blob is kept whole and readers get every byte."""
    loop_writes: list[int] = []
    write = BlobWriter.write

    async def counted(self: BlobWriter, chunk: bytes) -> None:
        loop_writes.append(len(chunk))
        await write(self, chunk)

    monkeypatch.setattr(BlobWriter, "write", counted)

    async def keep(fetcher: PeerFetcher, attempt: int) -> None:
        loop_writes.clear()
        cache = CacheStore(tmp_path / f"cache-{attempt}")
        await cache.start()
        await keep_through_a_download(fetcher, cache)

    await with_the_dying_peer_first(peers, 1_500_000, keep)
    assert peers.seen[0] == (0, None) and peers.seen[1][0] == 1  # resumed at the spare
    assert loop_writes == [], "bytes went through the event loop's writes"


async def with_the_dying_peer_first(
    peers: Peers, dies_after: int, fetch: Callable[[PeerFetcher, int], Awaitable[None]]
) -> None:
    """`fetch` (given the attempt's number) from a peer dying after `dies_after` bytes and a
    spare, until the dying one was asked first: the fetcher shuffles equally loaded peers."""
    dying = await peers.add(dying_after(dies_after))
    spare = await peers.add(good)
    fetcher = PeerFetcher(router_for(dying, spare), RequestSigner(KEY), Metrics(), hedge_after=5)
    await fetcher.start()
    try:
        for attempt in range(50):
            peers.seen.clear()
            await fetch(fetcher, attempt)
            if peers.seen[0][0] == 0:
                return
    finally:
        await fetcher.close()


async def keep_through_a_download(fetcher: PeerFetcher, cache: CacheStore) -> None:
    """Fetch the blob from peers into `cache` as a node sharing it does (content/service.py)."""
    downloads = Downloads(cache)
    try:
        found = await fetcher.blob(DIGEST, PATH, None, sharing=True)
        assert found is not None and found.chunks is not None and found.sink is not None
        chunks, sink = found.chunks, found.sink
        download, _ = downloads.reserve(DIGEST)

        async def opener() -> Source:
            return Source(len(BLOB), chunks, _nothing, verified=True, sink=sink)

        downloads.begin(download, opener)
        reader = download.read(0, len(BLOB))
        assert b"".join([chunk async for chunk in reader]) == BLOB
        assert download.task is not None
        await download.task
        assert download.kept and await cache.stat(DIGEST) == len(BLOB)
        assert cache.blob_path(DIGEST).read_bytes() == BLOB
    finally:
        await downloads.close()


async def _nothing() -> None:
    return None


async def test_a_peer_dying_mid_blob_is_resumed_elsewhere_with_a_range(peers: Peers) -> None:

    async def read(fetcher: PeerFetcher, attempt: int) -> None:
        assert await read_all(fetcher) == BLOB

    await with_the_dying_peer_first(peers, 1_000_000, read)
    assert peers.seen[0] == (0, None)
    index, range_header = peers.seen[1]
    assert index == 1 and range_header is not None
    assert range_header.startswith("bytes=") and range_header.endswith(f"-{len(BLOB) - 1}")
    assert int(range_header[6:].split("-")[0]) > 0


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


# --- spreading the load: busy holders, reported uploads, throughput -------------------------

LAST_RESORT = f"{LAST_RESORT_PARAM}=1"


def refusing(uploads: int) -> Behaviour:
    """A holder at its upload bound: 429 with its load, except to a last-resort request."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        if request.query.get(LAST_RESORT_PARAM) == "1":
            response = await good(request)
            response.headers[UPLOADS_HEADER] = str(uploads + 1)
            return response
        body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"busy"}]}'
        headers = {UPLOADS_HEADER: str(uploads), "Retry-After": "1"}
        return web.Response(status=429, body=body, headers=headers)

    return behaviour


def reporting(uploads: int) -> Behaviour:
    """A holder that serves the blob and says it is sending `uploads` bodies to peers."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        response = await good(request)
        response.headers[UPLOADS_HEADER] = str(uploads)
        return response

    return behaviour


def trickling(piece: int, pause: float) -> Behaviour:
    """A holder behind a thin link: the body in `piece`-byte writes, `pause` seconds apart."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(len(BLOB))})
        await response.prepare(request)
        for start in range(0, len(BLOB), piece):
            await response.write(BLOB[start : start + piece])
            await asyncio.sleep(pause)
        await response.write_eof()
        return response

    return behaviour


def sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def asked(peers: Peers) -> list[int]:
    """Which peers were asked, in order (last-resort requests included)."""
    return [index for index, _ in peers.paths]


async def test_a_busy_provider_is_passed_over_at_once_and_asked_last_after(peers: Peers) -> None:
    """A 429 is no failure: the idle holder is asked at once (no hedge delay), and the busy one
    is asked last for its Retry-After, so the next fetches do not even try it."""
    busy = await peers.add(refusing(uploads=8))
    idle = await peers.add(good)
    now = [1000.0]
    loop = asyncio.get_running_loop()
    # Providers with nothing known are ordered at random: retry until the busy one came first.
    for _ in range(60):
        metrics = Metrics()
        fetcher = PeerFetcher(
            router_for(busy, idle), RequestSigner(KEY), metrics, hedge_after=5, clock=lambda: now[0]
        )
        await fetcher.start()
        try:
            peers.paths.clear()
            started = loop.time()
            assert await read_all(fetcher) == BLOB
            if asked(peers)[0] != 0:
                continue
            assert loop.time() - started < 2.5, "waited for the hedge instead of moving on"
            assert asked(peers) == [0, 1]
            assert sample(metrics, "mirror_peer_fetches_steered_total") == 1
            assert sample(metrics, "mirror_peer_last_resort_fetches_total") == 0
            assert (
                metrics.registry.get_sample_value(
                    "mirror_peer_fetch_failures_total", {"reason": "unavailable"}
                )
                is None
            ), "a busy holder was counted as failing"
            for _ in range(10):
                peers.paths.clear()
                assert await read_all(fetcher) == BLOB
                assert asked(peers) == [1], "a holder that just said it is busy was asked first"
            return
        finally:
            await fetcher.close()
    pytest.fail("the busy provider was never asked first")


async def test_when_every_provider_is_busy_the_least_loaded_serves_a_last_resort(
    peers: Peers,
) -> None:
    providers = [await peers.add(refusing(uploads)) for uploads in (9, 3, 6)]
    metrics = Metrics()
    fetcher = PeerFetcher(router_for(*providers), RequestSigner(KEY), metrics, hedge_after=5)
    await fetcher.start()
    try:
        assert await read_all(fetcher) == BLOB
    finally:
        await fetcher.close()
    plain = [index for index, path in peers.paths if LAST_RESORT not in path]
    last_resort = [(index, path) for index, path in peers.paths if LAST_RESORT in path]
    assert sorted(plain) == [0, 1, 2], "not every provider was asked before the last resort"
    assert last_resort == [(1, f"{PATH}?{LAST_RESORT}")], "not the least loaded, or not once"
    assert sample(metrics, "mirror_peer_fetches_steered_total") == 3
    assert sample(metrics, "mirror_peer_last_resort_fetches_total") == 1


async def test_a_blob_half_sent_is_resumed_at_a_busy_holder_as_a_last_resort(
    peers: Peers,
) -> None:
    dying = await peers.add(dying_after(1_000_000))
    busy = await peers.add(refusing(uploads=4))
    metrics = Metrics()
    fetcher = PeerFetcher(router_for(dying, busy), RequestSigner(KEY), metrics, hedge_after=5)
    await fetcher.start()
    try:
        assert await read_all(fetcher) == BLOB
    finally:
        await fetcher.close()
    index, path = peers.paths[-1]
    assert (index, path) == (1, f"{PATH}?{LAST_RESORT}")
    range_header = peers.seen[-1][1]
    assert range_header is not None and int(range_header[6:].split("-")[0]) > 0
    assert sample(metrics, "mirror_peer_last_resort_fetches_total") == 1


async def test_the_least_loaded_provider_is_asked_first(peers: Peers) -> None:
    loaded = [await peers.add(reporting(uploads)) for uploads in (6, 0, 3)]
    now = [1000.0]
    fetcher = PeerFetcher(
        router_for(*loaded), RequestSigner(KEY), Metrics(), hedge_after=5, clock=lambda: now[0]
    )
    await fetcher.start()
    try:
        # One answer from each (a HEAD: no upload) tells this node their loads.
        for provider in loaded:
            assert await fetcher.blob_from([provider], DIGEST, PATH, None, head=True)
        for _ in range(10):
            peers.paths.clear()
            assert await read_all(fetcher) == BLOB
            assert asked(peers) == [1]
        # A report is a snapshot: a few seconds later it no longer decides.
        now[0] += 60
        first = set()
        for _ in range(40):
            peers.paths.clear()
            assert await read_all(fetcher) == BLOB
            first.add(asked(peers)[0])
        assert first == {0, 1, 2}
    finally:
        await fetcher.close()


async def test_a_node_spreads_its_own_concurrent_fetches(peers: Peers) -> None:
    """Without any report, this node's own bodies in flight count: a second fetch started while
    the first is still arriving goes to the other holder."""
    holders = [await peers.add(good), await peers.add(good)]
    for _ in range(10):
        # A fresh node each time: once bodies have been timed, measured throughput ranks the
        # holders too, and on a loaded machine one may then look twice as fast as the other.
        fetcher = await fetcher_for(*holders, hedge_after=5)
        try:
            peers.paths.clear()
            first = await fetcher.blob(DIGEST, PATH, None)
            second = await fetcher.blob(DIGEST, PATH, None)
            assert sorted(asked(peers)) == [0, 1], "both fetches went to one holder"
            for opened in (first, second):
                assert opened is not None and opened.chunks is not None
                assert b"".join([chunk async for chunk in opened.chunks]) == BLOB
        finally:
            await fetcher.close()


async def test_the_faster_of_two_idle_providers_is_asked_first(peers: Peers) -> None:
    slow_peer = await peers.add(trickling(256 * 1024, 0.04))  # about 6 MiB/s
    fast_peer = await peers.add(good)
    fetcher = await fetcher_for(slow_peer, fast_peer, hedge_after=5)
    try:
        for provider in (slow_peer, fast_peer):
            found = await fetcher.blob_from([provider], DIGEST, PATH, None)
            assert found is not None and found.chunks is not None
            assert b"".join([chunk async for chunk in found.chunks]) == BLOB
        for _ in range(10):
            peers.paths.clear()
            assert await read_all(fetcher) == BLOB
            assert asked(peers) == [1], "the slow holder was asked first"
    finally:
        await fetcher.close()


# --- referrals: a busy provider sends a sharing fetcher to the nodes fetching from it ---------


def referring(*sharers: Provider) -> Behaviour:
    """A holder at its fan-out: 429 naming `sharers` (the nodes fetching the blob from it)."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        if request.query.get(LAST_RESORT_PARAM) == "1":
            return await good(request)
        body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"ask them"}]}'
        headers = {TRY_HEADER: referral(describe(s) for s in sharers), "Retry-After": "1"}
        return web.Response(status=429, body=body, headers=headers)

    return behaviour


async def fetch_whole_as_a_sharer(fetcher: PeerFetcher) -> None:
    """Start `fetcher`, fetch the blob whole as a node sharing it does, check it, close."""
    await fetcher.start()
    try:
        found = await fetcher.blob(DIGEST, PATH, None, sharing=True)
        assert found is not None and found.chunks is not None
        assert b"".join([chunk async for chunk in found.chunks]) == BLOB
    finally:
        await fetcher.close()


async def test_a_sharing_fetch_names_itself_and_follows_a_referral(peers: Peers) -> None:
    """The holder (the only provider the DHT knows) refers the fetcher down the chain: to a
    node it never heard of, which refers it further, to the node that serves it. Every request
    carries this node as the sharer; the distrusted, the unparsable and this node itself are
    skipped, and the holder is never asked for a last resort."""
    own = Provider(b"\xee" * 20, "127.0.0.1:9")
    distrusted = Provider(b"\xdd" * 20, "127.0.0.1:7")
    last = await peers.add(good)
    middle = await peers.add(referring(own, distrusted, last))
    holder = await peers.add(referring(middle))
    metrics = Metrics()
    fetcher = PeerFetcher(router_for(holder), RequestSigner(KEY), metrics, hedge_after=5, own=own)
    fetcher._distrust(distrusted, str(DIGEST), "test")
    await fetch_whole_as_a_sharer(fetcher)
    assert asked(peers) == [2, 1, 0]
    sharer = f"{SHARER_PARAM}={own.node_id.hex()}@127.0.0.1:9"
    assert all(path == f"{PATH}?{sharer}" for _, path in peers.paths), peers.paths
    assert sample(metrics, "mirror_peer_referrals_followed_total") == 2
    assert sample(metrics, "mirror_peer_last_resort_fetches_total") == 0


async def test_a_referred_node_slow_to_answer_is_waited_for_not_hedged_away_from(
    peers: Peers,
) -> None:
    """A node named by a referral may still be finding its own source (referrals.py): asking
    the next name after `hedge_after` would walk the whole chain anyway. A provider the DHT
    named is still hedged away from (test_a_slow_peer_is_hedged)."""
    own = Provider(b"\xee" * 20, "127.0.0.1:9")
    spare = await peers.add(good)
    starting = await peers.add(slow(0.5))
    holder = await peers.add(referring(starting, spare))
    fetcher = PeerFetcher(
        router_for(holder), RequestSigner(KEY), Metrics(), hedge_after=0.05, own=own
    )
    await fetch_whole_as_a_sharer(fetcher)
    assert asked(peers) == [2, 1]


async def test_a_referred_node_that_never_answers_is_given_up_after_the_patience(
    peers: Peers,
) -> None:
    """A node whose event loop is stuck cannot say it is busy: the next name is asked too."""
    own = Provider(b"\xee" * 20, "127.0.0.1:9")
    spare = await peers.add(good)
    stuck = await peers.add(slow(30))
    holder = await peers.add(referring(stuck, spare))
    fetcher = PeerFetcher(
        router_for(holder),
        RequestSigner(KEY),
        Metrics(),
        hedge_after=0.05,
        referred_patience=0.3,
        own=own,
    )
    await fetch_whole_as_a_sharer(fetcher)
    assert asked(peers) == [2, 1, 0]


async def test_a_fetch_for_the_runtime_alone_names_no_sharer(peers: Peers) -> None:
    provider = await peers.add(good)
    fetcher = PeerFetcher(
        router_for(provider),
        RequestSigner(KEY),
        Metrics(),
        own=Provider(b"\xee" * 20, "127.0.0.1:9"),
    )
    await fetcher.start()
    try:
        assert await read_all(fetcher) == BLOB
    finally:
        await fetcher.close()
    assert peers.paths == [(0, PATH)]


def test_referrals_parse_well_formed_sharers_only() -> None:
    good_one = Provider(bytes(range(20)), "[fd00::1]:5000")
    text = referral([describe(good_one), "nonsense", f"{'0' * 40}@host", describe(good_one)])
    assert parse_referral(text) == [good_one, good_one]
    assert parse_referral(None) == [] and parse_referral("") == []
    assert parse_sharer(f"{'a' * 40}@10.0.0.1:5000 ") is None
    assert len(parse_referral(", ".join([describe(good_one)] * 50))) == MAX_REFERRED


def at_hops(hops: int | None) -> Behaviour:
    """A good peer whose answers say its bytes are `hops` from a holder (None: unsaid)."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        response = await good(request)
        if hops is not None:
            response.headers[HOPS_HEADER] = str(hops)
        return response

    return behaviour


async def test_a_fetch_takes_only_a_source_nearer_to_a_holder_than_asked(peers: Peers) -> None:
    """`nearer_than` (a node whose ingest was served at that many hops, fetching for its
    runtime's retry): providers at that many hops or more, or that do not say, are passed
    over; the one taken says its hops, which the node's download adds one to."""
    far = await peers.add(at_hops(2))
    unsaid = await peers.add(at_hops(None))
    near = await peers.add(at_hops(1))
    fetcher = await fetcher_for(far, unsaid, near)
    try:
        blob = await fetcher.blob(DIGEST, PATH, None, nearer_than=2)
        assert blob is not None and blob.chunks is not None and blob.hops == 1
        assert b"".join([chunk async for chunk in blob.chunks]) == BLOB
        assert await fetcher.blob(DIGEST, PATH, None, nearer_than=1) is None
        assert {index for index, _ in peers.seen} == {0, 1, 2}, "all asked, none taken"
    finally:
        await fetcher.close()
    fetcher = await fetcher_for(far)  # no bound: taken whatever its hops
    try:
        blob = await fetcher.blob(DIGEST, PATH, None)
        assert blob is not None and blob.chunks is not None and blob.hops == 2
        assert b"".join([chunk async for chunk in blob.chunks]) == BLOB
    finally:
        await fetcher.close()
