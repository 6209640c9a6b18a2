"""--peer-transfer=redirect over real HTTP on loopback: the holder's checks, the probe, the 307.

A holder is a real registry front (`RegistryApi` over a `ContentService` on a node cache) whose
access policy takes the signed URLs made for its address. What it must refuse is shown against
it directly: forged, expired, replayed and misdirected signatures (401), requests that only look
like signed URLs (401), a signed URL for anything but a blob (403), and any answer not from its
own store, a download under way or what its runtime receives (404 otherwise: a signed URL is
never forwarded).
`PeerFetcher.redirect_url` is shown choosing a provider that serves the blob, and following a
holder's referral down the swarm.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import ClientResponse, ClientSession, web
from aiohttp.test_utils import TestServer
from harness.ingest_layout import IngestLayout
from harness.memory_sources import MemoryPeers, MemoryUpstream
from harness.net import free_port
from harness.waits import until
from yarl import URL

from mirror.clusterkey import ClusterKey
from mirror.config import PeerTransfer
from mirror.content import service as content_service
from mirror.content.service import BlobAnswer, ContentPolicy, ContentService
from mirror.errors import BlobUnknown, TooManyRequests
from mirror.metrics import SOURCE_PEER, SOURCE_RECEIVING, Metrics
from mirror.oci import mediatypes as mt
from mirror.oci.reference import Digest, parse_digest
from mirror.peers import fetcher as fetcher_module
from mirror.peers.auth import (
    PEER_HEADER,
    REDIRECT_LIFETIME,
    RequestSigner,
    RequestVerifier,
    UrlSigner,
    UrlVerifier,
)
from mirror.peers.fetcher import PeerFetcher, Redirect
from mirror.peers.referrals import HOPS_HEADER, parse_hops, with_sharer
from mirror.ranges import RangeRequest, parse_range_header
from mirror.registry.access import AccessPolicy
from mirror.registry.api import RegistryApi, UploadSlots
from mirror.request import Caller, Kind, Target
from mirror.routing.memory import MemoryCluster, MemoryRouter
from mirror.routing.router import Provider
from mirror.stores.base import FilePart, ReceivingBlob
from mirror.stores.cache import CacheStore
from mirror.stores.containerd.ingest import Ingests

KEY = ClusterKey.from_text(ClusterKey.generate())
POLICY = ContentPolicy(mirrored_registries=None, resolve_tags=True, tag_timeout=1.0)
REDIRECTING = ContentPolicy(
    mirrored_registries=None,
    resolve_tags=True,
    tag_timeout=1.0,
    peer_transfer=PeerTransfer.REDIRECT,
)
BLOB = bytes(range(256)) * 4096  # 1 MiB
DIGEST = parse_digest("sha256:" + hashlib.sha256(BLOB).hexdigest())
PATH = f"/v2/library/app/blobs/{DIGEST}?ns=docker.io"
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": str(DIGEST),
            "size": len(BLOB),
        },
        "layers": [],
    }
).encode()
MANIFEST_DIGEST = parse_digest("sha256:" + hashlib.sha256(MANIFEST).hexdigest())


class NoPeers:
    """Peers that hold nothing and remember what they were asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def manifest(self, key: str, path: str, expected: Digest | None) -> None:
        self.asked.append(path)

    async def blob(
        self,
        digest: Digest,
        path: str,
        requested: RangeRequest | None,
        *,
        head: bool = False,
        sharing: bool = False,
        nearer_than: int | None = None,
    ) -> None:
        self.asked.append(path)

    async def blob_from(
        self, candidates: object, digest: Digest, path: str, *args: object, **kwargs: object
    ) -> None:
        self.asked.append(path)


@dataclass
class Holder:
    url: str
    address: str
    http: ClientSession
    metrics: Metrics
    cache: CacheStore
    peers: NoPeers
    upstream: MemoryUpstream

    def signed(self, method: str = "GET", path: str = PATH, **kwargs: float) -> str:
        return self.url + UrlSigner(KEY).sign(method, self.address, path, **kwargs)

    async def status(self, method: str, url: str, headers: dict[str, str] | None = None) -> int:
        async with self.http.request(method, URL(url, encoded=True), headers=headers) as response:
            await response.read()
            return response.status


@contextlib.asynccontextmanager
async def holder_node(
    tmp_path: Path,
    *,
    holds: bool = True,
    upstream: MemoryUpstream | None = None,
) -> AsyncIterator[Holder]:
    """A node holding BLOB and MANIFEST in its cache (unless not `holds`), on a free port,
    at a fan-out of one (so its second sharer is referred)."""
    cache = CacheStore(tmp_path / f"holder-{free_port()}")
    await cache.start()
    if holds:
        await cache.put(DIGEST, BLOB)
        await cache.put(MANIFEST_DIGEST, MANIFEST)
    metrics = Metrics()
    port = free_port()
    address = f"127.0.0.1:{port}"
    access = AccessPolicy((), RequestVerifier(KEY), url_verifier=UrlVerifier(KEY, address))
    peers, upstream = NoPeers(), upstream or MemoryUpstream()
    service = ContentService(cache, metrics, POLICY, cache=cache, peers=peers, upstream=upstream)
    server = TestServer(
        RegistryApi(metrics, service, access=access, blob_fanout=1).app(),
        host="127.0.0.1",
        port=port,
    )
    await server.start_server()
    try:
        async with ClientSession() as http:
            yield Holder(f"http://{address}", address, http, metrics, cache, peers, upstream)
    finally:
        await server.close()
        await service.close()


@pytest.fixture
async def holder(tmp_path: Path) -> AsyncIterator[Holder]:
    async with holder_node(tmp_path) as node:
        yield node


async def oci_error(response: ClientResponse) -> str:
    body = await response.json()
    assert set(body) == {"errors"} and len(body["errors"]) == 1
    return str(body["errors"][0]["code"])


async def test_a_signed_url_is_served_once_from_the_holders_store(holder: Holder) -> None:
    url = holder.signed()
    async with holder.http.get(URL(url, encoded=True)) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == str(DIGEST)
        assert await response.read() == BLOB
    async with holder.http.get(URL(url, encoded=True)) as response:
        assert response.status == 401
        assert response.content_type == "application/json"
        assert await oci_error(response) == "UNAUTHORIZED"
    refused = holder.metrics.registry.get_sample_value(
        "mirror_refused_requests_total", {"reason": "unauthorized"}
    )
    assert refused == 1


async def test_a_signed_url_honours_a_range(holder: Holder) -> None:
    """A runtime resuming keeps its Range when it follows the 307; the holder honours it."""
    headers = {"Range": "bytes=1000-"}
    async with holder.http.get(URL(holder.signed(), encoded=True), headers=headers) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 1000-{len(BLOB) - 1}/{len(BLOB)}"
        assert await response.read() == BLOB[1000:]


def _forged(holder: Holder) -> str:
    url = holder.signed()
    flipped = "A" if url[-10] != "A" else "B"  # not the last: it carries 2 unused bits
    return url[:-10] + flipped + url[-9:]


def _foreign(holder: Holder) -> str:
    other = ClusterKey.from_text(ClusterKey.generate())
    return holder.url + UrlSigner(other).sign("GET", holder.address, PATH)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_forged, id="forged"),
        pytest.param(lambda h: h.signed(now=time.time() - REDIRECT_LIFETIME - 1), id="expired"),
        pytest.param(
            lambda h: h.url + UrlSigner(KEY).sign("GET", "127.0.0.1:1", PATH),
            id="for-another-holder",
        ),
        pytest.param(lambda h: h.signed("HEAD"), id="for-another-method"),
        pytest.param(
            lambda h: h.signed(path=PATH.replace("ns=docker.io", "ns=ghcr.io")).replace(
                "ns=ghcr.io", "ns=docker.io"
            ),
            id="for-another-query",
        ),
        pytest.param(_foreign, id="foreign-key"),
    ],
)
async def test_bad_url_signatures_get_401(holder: Holder, make: Callable[[Holder], str]) -> None:
    async with holder.http.get(URL(make(holder), encoded=True)) as response:
        assert response.status == 401
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        assert await oci_error(response) == "UNAUTHORIZED"


async def test_nothing_gets_in_by_looking_like_a_signed_url(holder: Holder) -> None:
    """Loopback is the runtime, and a signed header a peer, but neither with `mirror-*` params."""
    base = holder.url + PATH
    assert await holder.status("GET", base) == 200  # the runtime, from loopback
    assert await holder.status("GET", base + "&mirror-sig=x") == 401
    junk = "&mirror-expires=99999999999999&mirror-nonce=" + "0" * 24 + "&mirror-sig=" + "A" * 43
    assert await holder.status("GET", base + junk) == 401
    # A valid header signature over a target with signature parameters: still 401.
    target = PATH + junk
    header = {PEER_HEADER: RequestSigner(KEY).sign("GET", target)}
    assert await holder.status("GET", holder.url + target, header) == 401
    # A valid header signature and a valid URL signature together: one or the other.
    signed = holder.signed()
    header = {PEER_HEADER: RequestSigner(KEY).sign("GET", signed[len(holder.url) :])}
    assert await holder.status("GET", signed, header) == 401
    # The peer header alone still works.
    header = {PEER_HEADER: RequestSigner(KEY).sign("GET", PATH)}
    assert await holder.status("GET", base, header) == 200


async def test_a_signed_url_reaches_blobs_only(holder: Holder) -> None:
    path = f"/v2/library/app/manifests/{MANIFEST_DIGEST}?ns=docker.io"
    async with holder.http.get(URL(holder.signed(path=path), encoded=True)) as response:
        assert response.status == 403
        assert await oci_error(response) == "DENIED"


async def test_a_signed_url_is_never_forwarded(tmp_path: Path) -> None:
    """The holder does not hold it: 404, and neither peers nor upstream are asked."""
    upstream = MemoryUpstream(blobs={str(DIGEST): BLOB})
    async with holder_node(tmp_path, holds=False, upstream=upstream) as empty:
        async with empty.http.get(URL(empty.signed(), encoded=True)) as response:
            assert response.status == 404
            assert await oci_error(response) == "BLOB_UNKNOWN"
        assert await empty.status("HEAD", empty.signed("HEAD")) == 404
        assert empty.peers.asked == [] and upstream.asked == []
        # The test's sources do answer the runtime's own request.
        assert await empty.status("HEAD", empty.url + PATH) == 200
        assert empty.peers.asked == [PATH] and upstream.asked


async def test_a_download_in_progress_is_served_on_a_signed_url(tmp_path: Path) -> None:
    """As to a peer: what has arrived at once, the end once the digest matched (the holder
    holds its last chunk back), so a cold rollout's runtimes go to the node fetching."""
    gate = asyncio.Event()
    upstream = MemoryUpstream(blobs={str(DIGEST): BLOB}, gate=gate)
    async with (
        holder_node(tmp_path, holds=False, upstream=upstream) as node,
        node.http.get(node.url + PATH) as runtime,  # starts the download
    ):
        assert runtime.status == 200
        first = await runtime.content.readexactly(len(BLOB) // 2)
        assert await node.status("HEAD", node.signed("HEAD")) == 200
        async with node.http.get(URL(node.signed(), encoded=True)) as redirected:
            assert redirected.status == 200
            half = await redirected.content.readexactly(len(BLOB) // 2)
            assert half == BLOB[: len(BLOB) // 2]
            gate.set()
            assert half + await redirected.read() == BLOB
        assert first + await runtime.read() == BLOB


def redirect_answer(url: str) -> BlobAnswer:
    """A BlobAnswer carrying a redirect (before ContentService has the field: a subclass)."""
    if "redirect" in BlobAnswer.__dataclass_fields__:
        return BlobAnswer(SOURCE_PEER, 0, None, redirect=url)
    return _RedirectAnswer(SOURCE_PEER, 0, None, redirect=url)


@dataclass(slots=True)
class _RedirectAnswer(BlobAnswer):
    redirect: str | None = None


class Redirecting(ContentService):
    """Answers every blob with a redirect, as ContentService does in redirect mode."""

    location = "http://10.0.0.7:5000/v2/x/blobs/sha256:00?mirror-sig=x"

    async def blob(
        self, target: Target, caller: Caller, requested: RangeRequest | None, *, head: bool
    ) -> BlobAnswer:
        return redirect_answer(self.location)


async def test_a_redirect_answer_is_a_307_with_no_body(tmp_path: Path) -> None:
    cache = CacheStore(tmp_path / "cache")
    await cache.start()
    metrics = Metrics()
    server = TestServer(RegistryApi(metrics, Redirecting(cache, metrics, POLICY)).app())
    await server.start_server()
    try:
        async with ClientSession() as http:
            url = server.make_url(f"/v2/library/app/blobs/{DIGEST}")
            async with http.get(url, allow_redirects=False) as response:
                assert response.status == 307
                assert response.headers["Location"] == Redirecting.location
                assert response.headers["Docker-Content-Digest"] == str(DIGEST)
                assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
                assert response.content_length == 0
                assert await response.read() == b""
    finally:
        await server.close()
    sample = metrics.registry.get_sample_value
    assert sample("mirror_peer_redirects_total", {"result": "sent"}) == 1
    labels = {"method": "GET", "kind": "blob", "status": "307", "source": SOURCE_PEER}
    assert sample("mirror_requests_total", labels) == 1
    assert sample("mirror_served_bytes_total", {"kind": "blob", "source": SOURCE_PEER}) is None


def fetcher_for(
    *holders: Holder | str,
    url_signer: UrlSigner | None = None,
    clock: Callable[[], float] = time.monotonic,
    own: Provider | None = None,
) -> PeerFetcher:
    """A fetcher whose router names `holders` (nodes, or bare addresses) as providers of DIGEST
    (`own`: the node it runs on, as it asks as a sharer)."""
    cluster = MemoryCluster()
    addresses = [h.address if isinstance(h, Holder) else h for h in holders]
    cluster.providers[str(DIGEST)] = {
        bytes([index + 1]) * 20: Provider(bytes([index + 1]) * 20, address)
        for index, address in enumerate(addresses)
    }
    router = cluster.router(b"\xff" * 20, "127.0.0.1:9")
    return PeerFetcher(
        router, RequestSigner(KEY), Metrics(), url_signer=url_signer, clock=clock, own=own
    )


async def redirect_url(fetcher: PeerFetcher, digest: Digest = DIGEST) -> str | None:
    await fetcher.start()
    try:
        redirect = await fetcher.redirect_url(digest, PATH)
    finally:
        await fetcher.close()
    if redirect is None:
        return None
    assert redirect.hops == 0, "a holder, or a node downloading the blob itself"
    return redirect.url


async def test_the_redirect_goes_to_a_provider_that_serves_the_blob(
    tmp_path: Path, holder: Holder
) -> None:
    """One holding it whole, or fetching it; never one that lacks it or does not answer."""
    gate = asyncio.Event()
    upstream = MemoryUpstream(blobs={str(DIGEST): BLOB}, gate=gate)
    async with (
        holder_node(tmp_path, holds=False) as empty,
        holder_node(tmp_path, holds=False, upstream=upstream) as downloading,
        downloading.http.get(downloading.url + PATH) as runtime,
    ):
        await runtime.content.readexactly(len(BLOB) // 2)
        dead = f"127.0.0.1:{free_port()}"
        urls = []
        for _ in range(5):  # the providers come in random order
            fetcher = fetcher_for(empty, dead, downloading, holder, url_signer=UrlSigner(KEY))
            url = await redirect_url(fetcher)
            assert url is not None
            assert url.startswith((f"{holder.url}/v2/", f"{downloading.url}/v2/")), url
            urls.append(url)
        gate.set()
        for url in urls[-2:]:
            async with holder.http.get(URL(url, encoded=True)) as response:
                assert response.status == 200
                assert await response.read() == BLOB
        assert await holder.status("GET", url) == 401, "a signed URL was used twice"
        await runtime.read()


async def test_no_redirect_without_a_whole_copy_or_in_share_mode(
    tmp_path: Path, holder: Holder
) -> None:
    async with holder_node(tmp_path, holds=False) as empty:
        fetcher = fetcher_for(empty, f"127.0.0.1:{free_port()}", url_signer=UrlSigner(KEY))
        assert await redirect_url(fetcher) is None
        sample = fetcher._metrics.registry.get_sample_value
        assert sample("mirror_peer_redirects_total", {"result": "no-holder"}) == 1
    assert await redirect_url(fetcher_for(holder)) is None, "no URL signer: share mode"


UNAVAILABLE = {"reason": "unavailable"}


@contextlib.asynccontextmanager
async def unanswering_node(
    answered_from: int | None = None,
) -> AsyncIterator[tuple[str, list[str], asyncio.Event]]:
    """A node that takes requests and answers none until the event is set (a node starved of
    CPU at the start of a rollout): its address, the methods it was sent, the event.
    `answered_from`: requests from this one on (counted from 0) are answered at once, as a
    holder of the blob."""
    asked: list[str] = []
    answer = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        asked.append(request.method)
        if answered_from is None or len(asked) <= answered_from:
            await answer.wait()
        return web.Response(status=200, headers={HOPS_HEADER: "0"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app)
    await server.start_server()
    try:
        yield f"{server.host}:{server.port}", asked, answer
    finally:
        answer.set()
        await server.close()


async def test_a_provider_slow_to_answer_its_probe_is_not_waited_on(
    holder: Holder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next provider is probed beside one that has not answered within `hedge_after`:
    the runtime goes to whichever serves first, not after the slow one's probe timed out."""
    monkeypatch.setattr(fetcher_module, "_PROBE_TIMEOUT", 3600.0)  # waiting would hang
    monkeypatch.setattr(fetcher_module, "_SLOW_PROBE_TIMEOUT", 3600.0)
    async with unanswering_node() as (slow_address, asked, answer):
        fetcher = fetcher_for(slow_address, holder, url_signer=UrlSigner(KEY))
        slow, fast = (
            Provider(bytes([i]) * 20, a) for i, a in ((1, slow_address), (2, holder.address))
        )
        # The slow node looks far faster, so it is probed first, every time.
        fetcher._loads.measured(slow, 1 << 20, 0.001)
        fetcher._loads.measured(fast, 1 << 20, 1.0)
        async with asyncio.timeout(60):  # a bound on a hang, not a measurement
            url = await redirect_url(fetcher)
        assert asked == ["HEAD"], "the slow node was probed first"
        assert not answer.is_set()
        assert url is not None and url.startswith(f"{holder.url}/v2/"), url
        sample = fetcher._metrics.registry.get_sample_value
        failed = {"reason": "unavailable"}
        assert not sample("mirror_peer_fetch_failures_total", failed), "cut off, not failed"


async def test_a_provider_that_took_the_probe_is_waited_for_not_probed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At the start of a rollout every provider may be too starved of CPU to answer a probe
    within `_PROBE_TIMEOUT`. Passing them all over would serve the runtime another way, from
    upstream at worst. One that took the connection is alive: its probe stays out (up to
    `_SLOW_PROBE_TIMEOUT`) and its late answer wins; it is not asked again, which would make it
    do the work twice. One that refused the connection is gone, and is not waited for."""
    monkeypatch.setattr(fetcher_module, "_PROBE_TIMEOUT", 0.2)
    monkeypatch.setattr(fetcher_module, "_SLOW_PROBE_TIMEOUT", 3600.0)  # waiting would hang
    async with unanswering_node() as (starved, asked, answer):
        refusing = f"127.0.0.1:{free_port()}"
        fetcher = fetcher_for(starved, refusing, url_signer=UrlSigner(KEY))
        sample = fetcher._metrics.registry.get_sample_value
        fetcher._loads.measured(Provider(bytes([1]) * 20, starved), 1 << 20, 0.001)  # first
        async with asyncio.timeout(60):  # a bound on a hang, not a measurement
            found = asyncio.create_task(redirect_url(fetcher))
            await until(lambda: sample("mirror_peer_fetch_failures_total", UNAVAILABLE) == 1)
            assert not found.done(), "the starved node's probe is still out"
            answer.set()  # it answers at last
            url = await found
    assert asked == ["HEAD"], "the starved node was probed once"
    assert url is not None and url.startswith(f"http://{starved}/v2/"), url
    assert not sample("mirror_peer_fetch_failures_total", {"reason": "slow"})


async def test_a_late_probe_does_not_hold_back_the_next_providers(
    holder: Holder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past `_PROBE_TIMEOUT` a probe no longer counts against `_PROBES_AT_ONCE`: two starved
    nodes probed first do not keep the holder from being probed, and their probes are cut
    when it answers, not failed."""
    monkeypatch.setattr(fetcher_module, "_PROBE_TIMEOUT", 0.2)
    monkeypatch.setattr(fetcher_module, "_SLOW_PROBE_TIMEOUT", 3600.0)  # waiting would hang
    async with (
        unanswering_node() as (first, asked_first, _),
        unanswering_node() as (
            second,
            asked_second,
            _,
        ),
    ):
        fetcher = fetcher_for(first, second, holder, url_signer=UrlSigner(KEY))
        for index, seconds in ((1, 0.001), (2, 0.002), (3, 1.0)):  # the holder looks slowest
            provider = Provider(bytes([index]) * 20, (first, second, holder.address)[index - 1])
            fetcher._loads.measured(provider, 1 << 20, seconds)
        async with asyncio.timeout(60):  # a bound on a hang, not a measurement
            url = await redirect_url(fetcher)
    assert (asked_first, asked_second) == (["HEAD"], ["HEAD"])
    assert url is not None and url.startswith(f"{holder.url}/v2/"), url
    sample = fetcher._metrics.registry.get_sample_value
    assert not sample("mirror_peer_fetch_failures_total", {"reason": "slow"}), "cut, not failed"


async def test_a_provider_that_never_answers_is_passed_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wait is bounded: a node that took the connection and did not answer within
    `_SLOW_PROBE_TIMEOUT` is passed over, and the runtime is served another way."""
    monkeypatch.setattr(fetcher_module, "_PROBE_TIMEOUT", 0.2)
    monkeypatch.setattr(fetcher_module, "_SLOW_PROBE_TIMEOUT", 0.2)
    async with unanswering_node() as (starved, asked, _):
        fetcher = fetcher_for(starved, url_signer=UrlSigner(KEY))
        async with asyncio.timeout(60):  # a bound on a hang, not a measurement
            assert await redirect_url(fetcher) is None
    assert asked == ["HEAD"]
    sample = fetcher._metrics.registry.get_sample_value
    assert sample("mirror_peer_fetch_failures_total", {"reason": "slow"}) == 1
    assert sample("mirror_peer_redirects_total", {"result": "no-holder"}) == 1


async def test_a_runtime_asking_again_is_served_by_its_node(holder: Holder) -> None:
    """A second request for a digest within minutes of its redirect is a retry (the transfer
    broke, or the runtime refused the bytes): it is not redirected but served, verified."""
    now = [1000.0]
    fetcher = fetcher_for(holder, url_signer=UrlSigner(KEY), clock=lambda: now[0])
    await fetcher.start()
    try:
        assert await fetcher.redirect_url(DIGEST, PATH) is not None
        now[0] += 299
        assert await fetcher.redirect_url(DIGEST, PATH) is None
        now[0] += 2
        assert await fetcher.redirect_url(DIGEST, PATH) is not None
    finally:
        await fetcher.close()
    sample = fetcher._metrics.registry.get_sample_value
    assert sample("mirror_peer_redirects_total", {"result": "retry"}) == 1


class RedirectingPeers(NoPeers):
    """Peers where a provider holds every blob whole: `redirect_url` always has a URL."""

    url = "http://10.0.0.7:5000/v2/library/app/blobs/sha256:00?mirror-sig=x"

    def __init__(self, hops: int | None = 0) -> None:
        super().__init__()
        self.hops = hops
        self.redirects: list[str] = []
        self.sharing: list[bool] = []

    async def redirect_url(
        self,
        digest: Digest,
        path: str,
        *,
        sharing: bool = False,
        among: list[Provider] | None = None,
    ) -> Redirect | None:
        self.redirects.append(path)
        self.sharing.append(sharing)
        return Redirect(self.url, self.hops)


async def test_the_content_service_redirects_the_runtimes_blob_gets_only(tmp_path: Path) -> None:
    cache = CacheStore(tmp_path / "cache")
    await cache.start()
    metrics, peers = Metrics(), RedirectingPeers()
    upstream = MemoryUpstream(blobs={str(DIGEST): BLOB})
    service = ContentService(
        cache, metrics, REDIRECTING, cache=cache, peers=peers, upstream=upstream
    )
    target = Target(Kind.BLOB, "docker.io", "library/app", None, DIGEST)
    try:
        answer = await service.blob(target, Caller.RUNTIME, None, head=False)
        assert answer.redirect == peers.url
        # A range (a runtime resuming) too: the runtime keeps its Range on the 307.
        ranged = parse_range_header("bytes=100-")
        answer = await service.blob(target, Caller.RUNTIME, ranged, head=False)
        assert answer.redirect == peers.url
        assert peers.redirects == [PATH, PATH]
        # A peer is never redirected (nor forwarded); a HEAD is answered here.
        with pytest.raises(BlobUnknown):
            await service.blob(target, Caller.PEER, None, head=False)
        answer = await service.blob(target, Caller.RUNTIME, None, head=True)
        assert answer.redirect is None and answer.size == len(BLOB)
        await answer.close()
        assert peers.redirects == [PATH, PATH]
        # What this node holds it serves itself.
        await cache.put(DIGEST, BLOB)
        answer = await service.blob(target, Caller.RUNTIME, None, head=False)
        assert answer.local is not None and answer.redirect is None
        await answer.close()
        assert peers.redirects == [PATH, PATH]
    finally:
        await service.close()

    # In share mode (the default) no redirect is asked for: a blob nobody holds.
    sharing = ContentService(cache, metrics, POLICY, cache=cache, peers=peers, upstream=upstream)
    try:
        other = Target(Kind.BLOB, "docker.io", "library/app", None, MANIFEST_DIGEST)
        with pytest.raises(BlobUnknown):
            await sharing.blob(other, Caller.RUNTIME, None, head=False)
        assert peers.redirects == [PATH, PATH], "share mode asked for a redirect"
    finally:
        await sharing.close()


class ReceivingCache(CacheStore):
    """A node cache standing for a runtime store that shows what its runtime receives: half
    of BLOB in a containerd ingest under way (`IngestBlob`)."""

    shows_receiving = True

    def __init__(self, root: Path) -> None:
        super().__init__(root / "cache")
        self._content = IngestLayout(root / "content", BLOB)
        self._content.write(len(BLOB) // 2)

    async def receiving(self, digest: Digest) -> ReceivingBlob | None:
        return await Ingests(self._content.root, "k8s.io").find(digest)


async def read_growing(answer: BlobAnswer, upto: int) -> bytes:
    """What `answer`'s reader hands out up to `upto` bytes (the ingest holds half of BLOB)."""
    assert answer.growing is not None
    received = b""
    while len(received) < upto and (part := await answer.growing.next_part()) is not None:
        assert isinstance(part, FilePart)
        received += os.pread(part.file.fileno(), part.count, part.offset)
    return received


async def test_peers_and_redirected_runtimes_get_what_the_runtime_is_receiving(
    tmp_path: Path,
) -> None:
    store = ReceivingCache(tmp_path)
    await store.start()
    cluster = MemoryCluster()
    me = Provider(b"\x01" * 20, "10.0.0.1:5000")
    router = cluster.router(me.node_id, me.address)
    # The source the runtime is sent to serves what its own runtime receives from a holder.
    metrics, peers = Metrics(), RedirectingPeers(hops=1)
    service = ContentService(store, metrics, REDIRECTING, cache=store, peers=peers, router=router)
    target = Target(Kind.BLOB, "docker.io", "library/app", None, DIGEST)
    half = len(BLOB) // 2
    try:
        # containerd opens its ingest before it asks its node: until the node chose a source
        # for its runtime, the ingest may be waiting on this very node, so a peer waits.
        early = asyncio.create_task(service.blob(target, Caller.PEER, None, head=True))
        await asyncio.sleep(0)
        assert not early.done()
        # The node's own runtime is redirected as a sharer (it serves what it receives), and
        # the node announces itself at once; it is never served its own fetch.
        answer = await service.blob(target, Caller.RUNTIME, None, head=False)
        assert answer.redirect == peers.url and peers.sharing == [True]
        assert (await early).source == SOURCE_RECEIVING
        await asyncio.gather(*service._background)
        assert cluster.providers[str(DIGEST)] == {me.node_id: me}
        for caller in (Caller.PEER, Caller.REDIRECTED):
            answer = await service.blob(target, caller, None, head=False)
            assert answer.source == SOURCE_RECEIVING and answer.size == len(BLOB)
            assert answer.hops == 2, "one hop further from the holder than its source"
            assert await read_growing(answer, half) == BLOB[:half]
            await answer.close()
        # A range from the bytes there; one beyond them is refused at once (its asker may be
        # where these bytes come from).
        ranged = parse_range_header("bytes=100-")
        answer = await service.blob(target, Caller.PEER, ranged, head=False)
        assert await read_growing(answer, half - 100) == BLOB[100:half]
        await answer.close()
        beyond = parse_range_header(f"bytes={half}-")
        with pytest.raises(BlobUnknown, match="not here yet"):
            await service.blob(target, Caller.PEER, beyond, head=False)
    finally:
        await service.close()


async def redirect_behind(
    holder: Holder, first_address: str, me: Provider
) -> tuple[Redirect | None, PeerFetcher]:
    """Where a sharing runtime of node `me` is sent once a first sharer, at `first_address`,
    took the holder's fan-out of one (its probe was answered); with the fetcher that chose."""
    first = Provider(b"\x05" * 20, first_address)
    assert await holder.status("HEAD", holder.signed("HEAD", with_sharer(PATH, first))) == 200
    fetcher = fetcher_for(holder, url_signer=UrlSigner(KEY), own=me)
    await fetcher.start()
    try:
        return await fetcher.redirect_url(DIGEST, PATH, sharing=True), fetcher
    finally:
        await fetcher.close()


async def test_a_holder_at_its_fan_out_refers_a_sharing_runtime_down_the_swarm(
    tmp_path: Path, holder: Holder
) -> None:
    """The holder keeps a slot for the first node's runtime (its probe) and sends the blob to
    it; the next node, whose runtime will share too, is referred to the first."""
    async with holder_node(tmp_path) as first_node:
        second = Provider(b"\x06" * 20, "127.0.0.1:9")
        redirect, _ = await redirect_behind(holder, first_node.address, second)
        assert redirect is not None
        url = redirect.url
        assert url.startswith(f"{first_node.url}/v2/library/app/blobs/")
        assert f"sharer={second.node_id.hex()}" in url
        sample = holder.metrics.registry.get_sample_value
        assert sample("mirror_peer_uploads_referred_total", {}) == 1


async def test_a_slot_kept_for_a_runtime_is_taken_over_by_its_get_or_let_go() -> None:
    metrics = Metrics()
    slots = UploadSlots(limit=1, fanout=1, metrics=metrics)
    let_go = slots.reserve(str(DIGEST), "a")
    assert slots.active == 1
    with pytest.raises(TooManyRequests):
        slots.reserve(str(DIGEST), "b")  # at its fan-out: referred
    with pytest.raises(TooManyRequests):
        slots.reserve(str(MANIFEST_DIGEST), None)  # at its bound
    assert slots.claim(str(DIGEST), "a") and slots.active == 1
    assert not slots.claim(str(DIGEST), "a"), "one GET per probe"
    let_go()  # taken over: nothing to give back
    assert slots.active == 1
    slots.give_back(str(DIGEST), "a")  # the GET's body was sent
    assert slots.active == 0
    let_go = slots.reserve(str(DIGEST), "b")
    let_go()  # the probe failed: the slot is free at once
    assert slots.active == 0 and not slots.claim(str(DIGEST), "b")


class ClaimantPeers(RedirectingPeers):
    """Peers where nobody holds the blob yet, but the node that claimed its upstream fetch
    serves it: `redirect_url` has a URL only among given providers."""

    def __init__(self) -> None:
        super().__init__()
        self.among: list[list[Provider] | None] = []

    async def redirect_url(
        self,
        digest: Digest,
        path: str,
        *,
        sharing: bool = False,
        among: list[Provider] | None = None,
    ) -> Redirect | None:
        self.among.append(among)
        self.sharing.append(sharing)
        return Redirect(self.url, 0) if among else None


async def test_a_cold_blob_sends_the_runtime_to_the_node_that_claimed_its_fetch(
    tmp_path: Path,
) -> None:
    store = ReceivingCache(tmp_path)
    await store.start()
    cluster = MemoryCluster()
    claimant = Provider(b"\x02" * 20, "10.0.0.2:5000")
    assert await cluster.router(claimant.node_id, claimant.address).claim(str(DIGEST), 30) is None
    me = Provider(b"\x01" * 20, "10.0.0.1:5000")
    metrics, peers = Metrics(), ClaimantPeers()
    upstream = MemoryUpstream(blobs={str(DIGEST): BLOB})
    service = ContentService(
        store,
        metrics,
        REDIRECTING,
        cache=store,
        peers=peers,
        router=cluster.router(me.node_id, me.address),
        upstream=upstream,
    )
    target = Target(Kind.BLOB, "docker.io", "library/app", None, DIGEST)
    try:
        answer = await service.blob(target, Caller.RUNTIME, None, head=False)
        assert answer.redirect == peers.url
        assert peers.among == [None, [claimant]] and peers.sharing == [True, True]
        assert not upstream.asked, "fetched upstream besides the claimant"
        assert service._downloads is not None and service._downloads.get(DIGEST) is None
        await asyncio.gather(*service._background)
        assert me.node_id in cluster.providers[str(DIGEST)]
    finally:
        await service.close()


async def test_the_blobs_a_runtime_is_sent_for_one_after_another_are_announced_together(
    tmp_path: Path,
) -> None:
    """A runtime asks for an image's blobs over a second or two: the first waits for the
    others (`RECEIVING_GATHER_SECONDS`), and all go out in one burst of announcements, one
    message per peer (routing/announce.py) instead of one per blob."""
    cache = CacheStore(tmp_path / "cache")
    await cache.start()
    cluster = MemoryCluster()
    me = Provider(b"\x01" * 20, "10.0.0.1:5000")
    router = cluster.router(me.node_id, me.address)
    provided: list[str] = []
    provide = router.provide

    async def recorded(key: str) -> bool:
        provided.append(key)
        return await provide(key)

    router.provide = recorded  # type: ignore[method-assign]
    service = ContentService(cache, Metrics(), REDIRECTING, cache=cache, router=router)
    first, second = (parse_digest("sha256:" + hex_ * 32) for hex_ in ("a1", "a2"))
    try:
        gathering = asyncio.create_task(service._announce_receiving(first))
        await asyncio.sleep(0)  # the first is waiting for the others
        await service._announce_receiving(second)  # joins it, and returns at once
        assert provided == [] and not gathering.done()
        await gathering
        assert provided == [str(first), str(second)]
        assert me.node_id in cluster.providers[str(second)]
    finally:
        await service.close()
        await cache.close()


async def test_an_ingest_without_a_source_is_busy_after_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node named in a referral whose runtime has not been sent anywhere yet answers busy
    once `PEER_START_WAIT` has passed, so two such nodes never wait on each other for long."""
    monkeypatch.setattr(content_service, "PEER_START_WAIT", 0.01)
    store = ReceivingCache(tmp_path)
    await store.start()
    service = ContentService(store, Metrics(), POLICY, cache=store, peers=RedirectingPeers())
    target = Target(Kind.BLOB, "docker.io", "library/app", None, DIGEST)
    try:
        for caller in (Caller.PEER, Caller.REDIRECTED):
            with pytest.raises(TooManyRequests, match="no source here yet"):
                await service.blob(target, caller, None, head=False)
    finally:
        await service.close()


async def test_an_ingest_whose_source_did_not_say_its_hops_is_never_served(
    tmp_path: Path,
) -> None:
    """A source that did not say how far it is from a holder (an older node) might lead back
    to this node: what the runtime receives from it is not served, and askers are told at
    once, without waiting, to ask another node. The node does not announce it either."""
    store = ReceivingCache(tmp_path)
    await store.start()
    cluster = MemoryCluster()
    me = Provider(b"\x01" * 20, "10.0.0.1:5000")
    peers = RedirectingPeers(hops=None)
    service = ContentService(
        store,
        Metrics(),
        REDIRECTING,
        cache=store,
        peers=peers,
        router=cluster.router(me.node_id, me.address),
    )
    target = Target(Kind.BLOB, "docker.io", "library/app", None, DIGEST)
    try:
        answer = await service.blob(target, Caller.RUNTIME, None, head=False)
        assert answer.redirect == peers.url and peers.sharing == [True]
        for caller in (Caller.PEER, Caller.REDIRECTED):
            async with asyncio.timeout(0.5):  # far below PEER_START_WAIT: no wait
                with pytest.raises(TooManyRequests, match="no source here yet"):
                    await service.blob(target, caller, None, head=False)
        await asyncio.gather(*service._background)
        assert str(DIGEST) not in cluster.providers
    finally:
        await service.close()


async def test_the_last_resort_is_a_provider_that_confirms_it_serves(holder: Holder) -> None:
    """Every provider busy: the runtime goes to the least loaded only once a last-resort probe
    (never refused for load) confirms it serves the blob and says its hops; with no provider
    confirming there is no redirect."""
    gone = Provider(b"\x05" * 20, f"127.0.0.1:{free_port()}")  # a sharer that went away
    assert await holder.status("HEAD", holder.signed("HEAD", with_sharer(PATH, gone))) == 200
    me = Provider(b"\x06" * 20, "127.0.0.1:9")
    fetcher = fetcher_for(holder, url_signer=UrlSigner(KEY), own=me)
    await fetcher.start()
    try:
        # At its fan-out, the holder refers this sharer to the one gone: nobody else serves.
        redirect = await fetcher.redirect_url(DIGEST, PATH, sharing=True)
    finally:
        await fetcher.close()
    assert redirect is not None and redirect.hops == 0
    assert redirect.url.startswith(f"{holder.url}/v2/")
    sample = fetcher._metrics.registry.get_sample_value
    assert sample("mirror_peer_last_resort_fetches_total", {}) == 1
    assert holder.metrics.registry.get_sample_value("mirror_peer_uploads_referred_total") == 1
    async with holder.http.get(URL(redirect.url, encoded=True)) as response:
        assert response.status == 200 and await response.read() == BLOB


def test_hops_are_a_small_number_or_unsaid() -> None:
    assert parse_hops("0") == 0 and parse_hops("17") == 17
    for text in (None, "", "-1", "1.0", " 1", "\u00b2", "99999", "1" * 40):
        assert parse_hops(text) is None, text


async def test_a_sourced_node_whose_ingest_is_not_shown_yet_is_busy(tmp_path: Path) -> None:
    """containerd writes an ingest's size once its source answered: until then a node that
    sent its runtime off (and announced itself) says busy, not that it lacks the blob."""
    store = ReceivingCache(tmp_path)
    await store.start()
    peers = RedirectingPeers(hops=0)
    service = ContentService(store, Metrics(), REDIRECTING, cache=store, peers=peers)
    target = Target(Kind.BLOB, "docker.io", "library/app", None, DIGEST)
    try:
        assert (await service.blob(target, Caller.RUNTIME, None, head=False)).redirect
        (store._content.root / "ingest").rename(tmp_path / "elsewhere")  # no ingest shown
        with pytest.raises(TooManyRequests, match="not started arriving"):
            await service.blob(target, Caller.REDIRECTED, None, head=True)
        (tmp_path / "elsewhere").rename(store._content.root / "ingest")
        answer = await service.blob(target, Caller.REDIRECTED, None, head=True)
        assert answer.source == SOURCE_RECEIVING and answer.hops == 1
    finally:
        await service.close()


async def test_a_blob_just_committed_is_served_whole_at_zero_hops(tmp_path: Path) -> None:
    """For a moment of every commit containerd's database does not list the blob and no
    ingest is left. A peer or a redirected runtime asking then (its probe found the ingest) is
    served the committed file at once, as held: no source to wait for, 0 hops."""
    store = ReceivingCache(tmp_path)
    await store.start()
    store._content.write(len(BLOB))
    store._content.commit()
    service = ContentService(store, Metrics(), REDIRECTING, cache=store, peers=RedirectingPeers())
    target = Target(Kind.BLOB, "docker.io", "library/app", None, DIGEST)
    try:
        for caller in (Caller.PEER, Caller.REDIRECTED):
            async with asyncio.timeout(0.5):  # far below PEER_START_WAIT: no wait
                answer = await service.blob(target, caller, None, head=False)
            assert answer.source == SOURCE_RECEIVING and answer.hops == 0
            assert await read_growing(answer, len(BLOB)) == BLOB
            await answer.close()
    finally:
        await service.close()


class RedirectingOnce(MemoryPeers):
    """In-memory peers that send the runtime to a source `hops` from a holder once; asked
    again (the runtime's retry), they have no redirect and the node fetches itself."""

    def __init__(self, router: MemoryRouter, hops: int) -> None:
        super().__init__(router)
        self.source_hops = hops
        self.redirected = False

    async def redirect_url(
        self,
        digest: Digest,
        path: str,
        *,
        sharing: bool = False,
        among: list[Provider] | None = None,
    ) -> Redirect | None:
        if self.redirected:
            return None
        self.redirected = True
        return Redirect(RedirectingPeers.url, self.source_hops)


@pytest.mark.parametrize("nearest", [1, 2])
async def test_a_retry_fetches_nearer_to_a_holder_than_the_ingest_it_served(
    tmp_path: Path, nearest: int
) -> None:
    """The runtime was sent to a source 1 hop from a holder, so this node served what it
    receives at 2 hops. Its retry is fetched here, and only from a node nearer than 2 hops:
    one further down may be fed by this very node's ingest (a ring that nobody fills stalled
    16-node rollouts for 30 s). The download tells peers its own hops: its source's plus one."""
    store = ReceivingCache(tmp_path)
    await store.start()
    cluster = MemoryCluster()
    router = cluster.router(b"\x01" * 20, "10.0.0.1:5000")
    peers = RedirectingOnce(router, hops=1)
    downstream = Provider(b"\x02" * 20, "10.0.0.2:5000")
    other = Provider(b"\x03" * 20, "10.0.0.3:5000")
    for provider, hops in ((downstream, 2), (other, nearest)):
        peers.give(provider, str(DIGEST), BLOB)
        peers.hops[provider.address] = hops
    service = ContentService(store, Metrics(), REDIRECTING, cache=store, peers=peers, router=router)
    target = Target(Kind.BLOB, "docker.io", "library/app", None, DIGEST)
    try:
        assert (await service.blob(target, Caller.RUNTIME, None, head=False)).redirect
        served = await service.blob(target, Caller.PEER, None, head=True)
        assert served.source == SOURCE_RECEIVING and served.hops == 2
        if nearest == 2:  # nobody nearer: not fetched from the peers (nor upstream: none)
            with pytest.raises(BlobUnknown):
                await service.blob(target, Caller.RUNTIME, None, head=False)
            assert [address for address, _ in peers.asked] == [downstream.address, other.address]
            return
        retry = await service.blob(target, Caller.RUNTIME, None, head=False)
        assert retry.redirect is None and retry.source == SOURCE_PEER
        assert retry.hops == 2, "from the node 1 hop away (the one at 2 would make it 3)"
        assert await read_growing(retry, len(BLOB)) == BLOB
        await retry.close()
    finally:
        await service.close()


async def test_a_download_from_a_peer_is_one_hop_further_than_its_source(tmp_path: Path) -> None:
    """A node fetching a blob from a peer serves it to others while it arrives: it tells them
    its source's hops plus one (it said 0 before, so a chain through a download could close
    on itself)."""
    cache = CacheStore(tmp_path / "cache")
    await cache.start()
    cluster = MemoryCluster()
    router = cluster.router(b"\x01" * 20, "10.0.0.1:5000")
    peers = MemoryPeers(router)
    source = Provider(b"\x02" * 20, "10.0.0.2:5000")
    peers.give(source, str(DIGEST), BLOB)
    peers.hops[source.address] = 3
    peers.gate = asyncio.Event()  # the download stays under way while the peer asks
    service = ContentService(cache, Metrics(), POLICY, cache=cache, peers=peers, router=router)
    target = Target(Kind.BLOB, "docker.io", "library/app", None, DIGEST)
    try:
        mine = await service.blob(target, Caller.RUNTIME, None, head=False)
        assert mine.source == SOURCE_PEER and mine.hops == 4
        theirs = await service.blob(target, Caller.PEER, None, head=True)
        assert theirs.hops == 4
        peers.gate.set()
        assert await read_growing(mine, len(BLOB)) == BLOB
        await mine.close()
    finally:
        await service.close()
