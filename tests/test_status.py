"""The status report, its API, the measure and `mirror status`, with in-memory parts.

The collector reads fakes of the parts' narrow interfaces (contacts, peer loads, upstream
health, pins, distributions) and a real in-memory store; the measure runs through a real
content service over in-memory peers and upstream; the API is served on loopback. The few
accessors the parts gained for the report (round trips, last seen, peer loads, the peer that
served a key, upstream health) are tested here against the real parts.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from harness.dht import cluster
from harness.memory_sources import MemoryPeers, MemoryUpstream, digest_of
from harness.memory_store import MemoryStore
from harness.mirror_node import MirrorNode
from harness.net import free_port

from mirror.clusterkey import ClusterKey
from mirror.content.service import ContentPolicy, ContentService
from mirror.errors import ManifestUnknown, TooManyRequests, UpstreamError
from mirror.metrics import SOURCE_LOCAL, SOURCE_NONE, SOURCE_PEER, SOURCE_UPSTREAM, Metrics
from mirror.oci import mediatypes as mt
from mirror.oci.reference import parse_digest, tag_ref
from mirror.peers.auth import PEER_HEADER, RequestSigner, RequestVerifier
from mirror.peers.fetcher import UPLOADS_HEADER, PeerFetcher, PeerLoad
from mirror.prefetch.model import parse_image_ref
from mirror.prefetch.resolve import Platform
from mirror.registry.access import AccessPolicy
from mirror.registry.api import ObservedPull, RegistryApi
from mirror.routing.memory import MemoryCluster
from mirror.routing.router import Provider
from mirror.routing.table import Contact, RoundTrips
from mirror.status import client as status_client
from mirror.status.api import StatusApi
from mirror.status.collector import NodeInfo, StatusCollector
from mirror.status.measure import Measurer, measure_pull
from mirror.status.pulls import PullLog
from mirror.stores.cache import CacheStore
from mirror.upstream.client import RegistryHealth, UpstreamClient
from mirror.upstream.registries import UpstreamMap, parse_upstream

REGISTRY = "registry.test"
REPOSITORY = "team/app"
PLATFORM = Platform("linux", "amd64")
CONFIG = b'{"architecture":"amd64","os":"linux"}'
LAYER_A = bytes(range(256)) * 512  # 128 KiB
LAYER_B = bytes(reversed(range(256))) * 1024  # 256 KiB
PEER = Provider(b"p" * 20, "10.0.0.2:5000")
KEY = ClusterKey.from_text(ClusterKey.generate())
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def manifest_of(config: bytes, *layers: bytes) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest_of(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **d}
                for d in ({"digest": digest_of(layer), "size": len(layer)} for layer in layers)
            ],
        }
    ).encode()


def index_of(manifest: bytes, platform: tuple[str, str]) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_INDEX,
            "manifests": [
                {
                    "mediaType": mt.OCI_MANIFEST,
                    "digest": digest_of(manifest),
                    "size": len(manifest),
                    "platform": {"os": platform[0], "architecture": platform[1]},
                }
            ],
        }
    ).encode()


MANIFEST = manifest_of(CONFIG, LAYER_A, LAYER_B)


def observed(n: int, *, source: str = SOURCE_LOCAL, digest: str | None = None) -> ObservedPull:
    return ObservedPull(
        at=1000.0 + n,
        method="GET",
        kind="blob",
        ref=f"{REGISTRY}/{REPOSITORY}@{digest or 'sha256:' + f'{n:064x}'}",
        digest=digest or "sha256:" + f"{n:064x}",
        source=source,
        status=200,
        body_bytes=n,
        seconds=0.5,
        caller="runtime",
        client="127.0.0.1",
    )


# --- the ring buffer of recent pulls ---------------------------------------------------------


class Served:
    def __init__(self, servers: dict[str, str]) -> None:
        self.servers = servers

    def served_by(self, key: str) -> str | None:
        return self.servers.get(key)


def test_the_pull_log_keeps_only_the_newest_pulls_newest_first() -> None:
    log = PullLog(kept=3)
    for n in range(5):
        log.observe(observed(n))
    assert len(log) == 3
    assert [record.pull.body_bytes for record in log.recent()] == [4, 3, 2]
    with pytest.raises(ValueError):
        PullLog(kept=0)


def test_a_pull_from_a_peer_names_the_peer_that_served_it() -> None:
    digest = "sha256:" + "ab" * 32
    log = PullLog(peers=Served({digest: "10.0.0.2:5000"}))
    log.observe(observed(1, source=SOURCE_PEER, digest=digest))
    log.observe(observed(2, source=SOURCE_LOCAL, digest=digest))
    log.observe(observed(3, source=SOURCE_PEER))  # the fetcher no longer remembers
    peers = [record.as_json()["peer"] for record in log.recent()]
    assert peers == [None, None, "10.0.0.2:5000"]


async def test_the_registry_front_feeds_every_manifest_and_blob_request(tmp_path: Path) -> None:
    cache = CacheStore(tmp_path / "cache")
    await cache.start()
    for data in (CONFIG, LAYER_A, LAYER_B, MANIFEST):
        await cache.put(parse_digest(digest_of(data)), data)
    await cache.set_tag(tag_ref(REGISTRY, REPOSITORY, "v1"), parse_digest(digest_of(MANIFEST)))
    metrics = Metrics()
    policy = ContentPolicy(mirrored_registries=None, resolve_tags=True, tag_timeout=1.0)
    log = PullLog()
    api = RegistryApi(metrics, ContentService(cache, metrics, policy), pulls=log)
    server = TestServer(api.app(), host="127.0.0.1")
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    try:
        async with ClientSession() as http:
            for path in (
                f"/v2/{REPOSITORY}/manifests/v1?ns={REGISTRY}",
                f"/v2/{REPOSITORY}/blobs/{digest_of(LAYER_A)}?ns={REGISTRY}",
                f"/v2/{REPOSITORY}/blobs/{'sha256:' + '0' * 64}?ns={REGISTRY}",
                f"/v2/{REPOSITORY}/tags/list?ns={REGISTRY}",  # not a pull: not recorded
                "/v2/",
            ):
                async with http.get(base + path) as response:
                    await response.read()
            async with http.head(base + f"/v2/{REPOSITORY}/manifests/v1?ns={REGISTRY}") as r:
                assert r.status == 200
    finally:
        await server.close()
        await cache.close()
    head, missing, blob, manifest = (record.as_json() for record in log.recent())
    assert manifest["ref"] == f"{REGISTRY}/{REPOSITORY}:v1"
    assert manifest["digest"] == digest_of(MANIFEST)
    assert (manifest["kind"], manifest["source"], manifest["status"]) == ("manifest", "local", 200)
    assert manifest["bytes"] == len(MANIFEST) and manifest["caller"] == "runtime"
    assert blob["ref"] == f"{REGISTRY}/{REPOSITORY}@{digest_of(LAYER_A)}"
    assert (blob["kind"], blob["bytes"], blob["client"]) == ("blob", len(LAYER_A), "127.0.0.1")
    assert isinstance(blob["seconds"], float) and blob["seconds"] >= 0
    assert (missing["status"], missing["source"], missing["bytes"]) == (404, SOURCE_NONE, 0)
    assert (head["method"], head["bytes"]) == ("HEAD", 0)


# --- the collector -------------------------------------------------------------------------


@dataclass
class Fakes:
    contacts: list[Contact] = field(default_factory=list)
    loads: list[PeerLoad] = field(default_factory=list)
    upstream: dict[str, RegistryHealth] = field(default_factory=dict)
    pins: list[dict[str, object]] = field(default_factory=list)
    distributions: list[dict[str, object]] = field(default_factory=list)
    total_bytes: int = 3 << 20
    max_bytes: int | None = 100 << 20

    def peer_loads(self) -> list[PeerLoad]:
        return self.loads

    def health(self) -> dict[str, RegistryHealth]:
        return self.upstream

    def statuses(self) -> list[View]:
        return [View(pin) for pin in self.pins]

    def all_distributions(self) -> list[View]:
        return [View(item) for item in self.distributions]


@dataclass
class View:
    document: dict[str, object]

    def as_json(self) -> dict[str, object]:
        return self.document


class ContactList:
    def __init__(self, fakes: Fakes) -> None:
        self.fakes = fakes

    def contacts(self) -> list[Contact]:
        return self.fakes.contacts


class DistributionList:
    def __init__(self, fakes: Fakes) -> None:
        self.fakes = fakes

    def distributions(self) -> list[View]:
        return self.fakes.all_distributions()


def collector_for(
    store: MemoryStore, fakes: Fakes, metrics: Metrics, log: PullLog
) -> StatusCollector:
    info = NodeInfo(
        node_id=b"\x01" * 20,
        address="10.0.0.1:5000",
        registry_addr="0.0.0.0:5000",
        metrics_addr="0.0.0.0:9090",
        router_addr="0.0.0.0:5001",
        store="memory",
        version="9.9.9",
        platform=PLATFORM,
        runtime="containerd",
    )
    clock = iter(range(10_000, 20_000, 5))
    return StatusCollector(
        info,
        store=store,
        metrics=metrics,
        pulls=log,
        cache=fakes,
        contacts=ContactList(fakes),
        peers=fakes,
        upstream=fakes,
        pins=fakes,
        distributions=DistributionList(fakes),
        clock=lambda: float(next(clock)),
    )


async def test_the_report_gathers_every_part() -> None:
    store = MemoryStore()
    for data in (CONFIG, LAYER_A, LAYER_B):
        await store.put(data)
    await store.tag(tag_ref(REGISTRY, REPOSITORY, "v1"), await store.put(MANIFEST))
    child = manifest_of(CONFIG, LAYER_A)
    await store.put(child)
    multi = index_of(child, ("linux", "amd64"))
    await store.tag(tag_ref(REGISTRY, "team/multi", "v2"), await store.put(multi))
    other = index_of(child, ("linux", "s390x"))
    await store.tag(tag_ref(REGISTRY, "team/other", "v3"), await store.put(other))
    metrics = Metrics()
    metrics.advertised_keys.labels("digest").set(7)
    metrics.advertised_keys.labels("tag").set(2)
    fakes = Fakes(
        contacts=[
            Contact(b"\x02" * 20, "10.0.0.2", 5001, 9000.0, 0.0012),
            Contact(b"\x03" * 20, "10.0.0.3", 5001, None, None),
        ],
        loads=[
            PeerLoad(b"\x02" * 20, "10.0.0.2:5000", 3, 1.0, 5e6, 1, 2.0),
            PeerLoad(b"\x04" * 20, "10.0.0.4:5000", 0, None, None, 0, 30.0),
        ],
        upstream={
            "docker.io": RegistryHealth(100.0, 50.0, "answered 503"),
            "ghcr.io": RegistryHealth(10.0, 60.0, "no response within 10s"),
        },
        pins=[{"ref": "registry.test/team/app:v1", "state": "held"}],
        distributions=[{"id": str(n)} for n in range(30)],
    )
    log = PullLog()
    log.observe(observed(1))
    report = await collector_for(store, fakes, metrics, log).report()
    assert set(report) == {
        "generated_at",
        "node",
        "peers",
        "holdings",
        "pulls",
        "upstream",
        "pins",
        "distributions",
    }
    node = report["node"]
    assert node["id"] == "01" * 20 and node["address"] == "10.0.0.1:5000"
    assert (node["store"], node["runtime"], node["version"]) == ("memory", "containerd", "9.9.9")
    assert node["platform"] == "linux/amd64" and node["uptime_seconds"] == 5.0
    assert node["cache"] == {"bytes": 3 << 20, "max_bytes": 100 << 20}
    # Contacts and peers fetched from, merged by id: the contact's round trip and the
    # fetcher's address and load on one row.
    by_id = {peer["id"]: peer for peer in report["peers"]}
    both = by_id["02" * 20]
    assert (both["address"], both["router"], both["rtt_ms"]) == (
        "10.0.0.2:5000",
        "10.0.0.2:5001",
        1.2,
    )
    assert (both["uploads"], both["in_flight"], both["throughput"]) == (3, 1, 5e6)
    assert both["last_seen"] == report["generated_at"] - 2.0  # answered the fetcher later
    contact_only = by_id["03" * 20]
    assert contact_only["address"] is None and contact_only["uploads"] is None
    fetched_only = by_id["04" * 20]
    assert fetched_only["router"] is None and fetched_only["contact"] is False
    holdings = report["holdings"]
    assert holdings["announced_keys"] == {"digest": 7, "tag": 2}
    assert holdings["images_total"] == 3
    sizes = {image["ref"]: (image["size"], image["platform"]) for image in holdings["images"]}
    assert sizes[f"{REGISTRY}/{REPOSITORY}:v1"] == (
        len(MANIFEST) + len(CONFIG) + len(LAYER_A) + len(LAYER_B),
        None,
    )
    assert sizes[f"{REGISTRY}/team/multi:v2"] == (
        len(multi) + len(child) + len(CONFIG) + len(LAYER_A),
        "linux/amd64",
    )
    assert sizes[f"{REGISTRY}/team/other:v3"] == (None, None)  # no manifest for this platform
    assert [pull["bytes"] for pull in report["pulls"]] == [1]
    health = {entry["registry"]: entry for entry in report["upstream"]}
    assert health["docker.io"]["healthy"] is True  # answered again since its error
    assert health["ghcr.io"]["healthy"] is False
    assert health["ghcr.io"]["error"] == "no response within 10s"
    assert report["pins"] == [{"ref": "registry.test/team/app:v1", "state": "held"}]
    assert [d["id"] for d in report["distributions"]] == [str(n) for n in range(20)]
    json.dumps(report)  # all of it is JSON


async def test_a_node_alone_reports_no_peers_and_a_failing_store_its_error() -> None:
    store = MemoryStore()
    store.broken = True
    metrics = Metrics()
    info = NodeInfo(
        None, "127.0.0.1:5000", "127.0.0.1:5000", "127.0.0.1:9090", None, "m", "1", PLATFORM
    )
    report = await StatusCollector(info, store=store, metrics=metrics, pulls=PullLog()).report()
    assert report["node"]["id"] is None and report["node"]["cache"] is None
    assert report["peers"] == [] and report["upstream"] == []
    assert report["pins"] == [] and report["distributions"] == []
    assert report["holdings"]["images"] == [] and report["holdings"]["error"]


# --- the API ---------------------------------------------------------------------------------


@dataclass
class Ports:
    registry: str
    metrics: str
    http: ClientSession
    signer: RequestSigner


@pytest.fixture
async def ports(tmp_path: Path) -> AsyncIterator[Ports]:
    """A node's two apps: the registry port (with the status routes) and the metrics one."""
    cache = CacheStore(tmp_path / "cache")
    await cache.start()
    metrics = Metrics()
    policy = ContentPolicy(mirrored_registries=None, resolve_tags=True, tag_timeout=1.0)
    content = ContentService(cache, metrics, policy, cache=cache)
    log = PullLog()
    info = NodeInfo(
        None, "127.0.0.1:5000", "127.0.0.1:5000", "127.0.0.1:9090", None, "cache", "1", PLATFORM
    )
    collector = StatusCollector(info, store=cache, metrics=metrics, pulls=log, cache=cache)
    access = AccessPolicy((), RequestVerifier(KEY))
    measurer = Measurer(content, PLATFORM)
    api = RegistryApi(
        metrics,
        content,
        access=access,
        extensions=[StatusApi(collector, access, measurer)],
        pulls=log,
    )
    metrics_app = metrics.app()
    StatusApi(collector, access, measurer, page=True).add_routes(metrics_app)
    servers = [TestServer(app, host="127.0.0.1") for app in (api.app(), metrics_app)]
    for server in servers:
        await server.start_server()
    urls = [str(server.make_url("")).rstrip("/") for server in servers]
    try:
        async with ClientSession() as http:
            yield Ports(urls[0], urls[1], http, RequestSigner(KEY))
    finally:
        for server in servers:
            await server.close()
        await content.close()
        await cache.close()


async def test_the_status_json_answers_on_both_ports(ports: Ports) -> None:
    for base in (ports.registry, ports.metrics):
        async with ports.http.get(base + "/mirror/v1/status") as response:
            assert response.status == 200
            assert response.headers["Cache-Control"] == "no-store"
            report = await response.json()
        assert report["node"]["store"] == "cache"
        assert report["holdings"] == {
            "images": [],
            "images_total": 0,
            "error": None,
            "announced_keys": {"digest": 0, "tag": 0},
        }


async def test_peers_may_read_the_status_on_the_registry_port_but_not_forge_it(
    ports: Ports,
) -> None:
    path = "/mirror/v1/status"
    signed = {PEER_HEADER: ports.signer.sign("GET", path)}
    async with ports.http.get(ports.registry + path, headers=signed) as response:
        assert response.status == 200
    forged = {
        PEER_HEADER: RequestSigner(ClusterKey.from_text(ClusterKey.generate())).sign("GET", path)
    }
    async with ports.http.get(ports.registry + path, headers=forged) as response:
        assert response.status == 401
        assert (await response.json())["errors"][0]["code"] == "UNAUTHORIZED"


async def test_the_page_is_one_self_contained_document(ports: Ports) -> None:
    async with ports.http.get(ports.metrics + "/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        policy = response.headers["Content-Security-Policy"]
        page = await response.text()
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "mirror/v1/status" in page and "mirror/v1/measure" in page
    # Nothing from elsewhere: no URL with a scheme or a protocol-relative one, no src= at all.
    assert not re.search(r"https?://|//[a-z]", page.replace("http://www.w3.org", ""))
    assert " src=" not in page and "<link" not in page
    for section in ("node", "peers", "images", "pulls", "upstream", "pins", "distributions"):
        assert f'id="{section}"' in page
    async with ports.http.get(ports.registry + "/") as response:
        assert response.status == 404  # the page lives on the metrics address only


async def test_measure_wants_a_json_body_from_the_nodes_own_clients(ports: Ports) -> None:
    path = "/mirror/v1/measure"
    for base in (ports.registry, ports.metrics):
        async with ports.http.post(base + path, data='{"ref": "x:1"}') as response:
            assert response.status == 400  # a form or text/plain: refused
        for body in ('{"ref": 5}', '{"ref": "x:1", "more": 1}', "[]", "{", '{"ref": "A B"}'):
            headers = {"Content-Type": "application/json"}
            async with ports.http.post(base + path, data=body, headers=headers) as response:
                assert response.status == 400, body
        headers = {"Content-Type": "application/json"}
        async with ports.http.post(base + path, json={"ref": f"{REGISTRY}/none:1"}) as response:
            assert response.status == 404
            assert (await response.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    signed = {PEER_HEADER: ports.signer.sign("POST", path), "Content-Type": "application/json"}
    async with ports.http.post(ports.registry + path, data='{"ref": "x:1"}', headers=signed) as r:
        assert r.status == 403  # a peer cannot make this node fetch
    async with ports.http.get(ports.metrics + path) as response:
        assert response.status == 405


# --- measuring a pull ------------------------------------------------------------------------


@dataclass
class Sources:
    service: ContentService
    cache: CacheStore
    peers: MemoryPeers
    upstream: MemoryUpstream


@pytest.fixture
async def sources(tmp_path: Path) -> AsyncIterator[Sources]:
    cache = CacheStore(tmp_path / "cache")
    await cache.start()
    cluster_ = MemoryCluster()
    router = cluster_.router(b"n" * 20, "10.0.0.1:5000")
    peers = MemoryPeers(router)
    upstream = MemoryUpstream()
    metrics = Metrics()
    policy = ContentPolicy(mirrored_registries=None, resolve_tags=True, tag_timeout=1.0)
    service = ContentService(
        cache, metrics, policy, cache=cache, peers=peers, router=router, upstream=upstream
    )
    yield Sources(service, cache, peers, upstream)
    await service.close()
    await cache.close()


def ticks() -> Callable[[], float]:
    """A clock that advances one second per reading: every step takes a known time."""
    counter = iter(range(1_000_000))
    return lambda: float(next(counter))


async def test_a_measure_times_each_step_and_names_its_source(sources: Sources) -> None:
    sources.upstream.push(REGISTRY, REPOSITORY, "v1", MANIFEST)
    await sources.cache.put(parse_digest(digest_of(CONFIG)), CONFIG)  # held here
    sources.peers.give(PEER, digest_of(LAYER_A), LAYER_A)  # a peer holds it
    sources.upstream.blobs[digest_of(LAYER_B)] = LAYER_B  # only upstream has it
    ref = parse_image_ref(f"{REGISTRY}/{REPOSITORY}:v1")
    result = await measure_pull(sources.service, ref, PLATFORM, clock=ticks())
    document = result.as_json()
    steps = [
        (s["kind"], s["digest"], s["source"], s["bytes"], s["seconds"]) for s in document["steps"]
    ]
    assert steps == [
        ("manifest", digest_of(MANIFEST), SOURCE_UPSTREAM, len(MANIFEST), 1.0),
        ("config", digest_of(CONFIG), SOURCE_LOCAL, len(CONFIG), 1.0),
        ("layer", digest_of(LAYER_A), SOURCE_PEER, len(LAYER_A), 1.0),
        ("layer", digest_of(LAYER_B), SOURCE_UPSTREAM, len(LAYER_B), 1.0),
    ]
    assert document["ok"] is True and document["digest"] == digest_of(MANIFEST)
    assert document["total_bytes"] == len(MANIFEST) + len(CONFIG) + len(LAYER_A) + len(LAYER_B)
    assert document["by_source"] == {
        SOURCE_UPSTREAM: len(MANIFEST) + len(LAYER_B),
        SOURCE_LOCAL: len(CONFIG),
        SOURCE_PEER: len(LAYER_A),
    }
    assert document["total_seconds"] > 4
    # Measured again, everything is here now: the first pull left it in the node cache.
    again = (await measure_pull(sources.service, ref, PLATFORM)).as_json()
    assert {step["source"] for step in again["steps"][1:]} == {SOURCE_LOCAL}


async def test_a_measure_of_an_index_takes_this_platforms_manifest(sources: Sources) -> None:
    child = manifest_of(CONFIG, LAYER_A)
    index = index_of(child, ("linux", "amd64"))
    sources.upstream.push(REGISTRY, REPOSITORY, "multi", index)
    sources.upstream.manifests[digest_of(child)] = child
    sources.upstream.blobs.update({digest_of(CONFIG): CONFIG, digest_of(LAYER_A): LAYER_A})
    ref = parse_image_ref(f"{REGISTRY}/{REPOSITORY}:multi")
    document = (await measure_pull(sources.service, ref, PLATFORM)).as_json()
    kinds = [(step["kind"], step["digest"]) for step in document["steps"]]
    assert kinds == [
        ("index", digest_of(index)),
        ("manifest", digest_of(child)),
        ("config", digest_of(CONFIG)),
        ("layer", digest_of(LAYER_A)),
    ]
    other = parse_image_ref(f"{REGISTRY}/{REPOSITORY}:multi")
    with pytest.raises(ManifestUnknown):
        await measure_pull(sources.service, other, Platform("linux", "s390x"))


async def test_a_blob_nobody_has_is_an_error_in_its_step_and_the_rest_is_measured(
    sources: Sources,
) -> None:
    sources.upstream.push(REGISTRY, REPOSITORY, "v1", MANIFEST)
    sources.upstream.blobs.update({digest_of(CONFIG): CONFIG, digest_of(LAYER_B): LAYER_B})
    ref = parse_image_ref(f"{REGISTRY}/{REPOSITORY}:v1")
    document = (await measure_pull(sources.service, ref, PLATFORM)).as_json()
    errors = [(step["kind"], bool(step["error"])) for step in document["steps"]]
    assert errors == [("manifest", False), ("config", False), ("layer", True), ("layer", False)]
    assert document["ok"] is False
    with pytest.raises(ManifestUnknown):
        await measure_pull(sources.service, parse_image_ref(f"{REGISTRY}/none:1"), PLATFORM)


async def test_one_measure_at_a_time(sources: Sources) -> None:
    sources.upstream.push(REGISTRY, REPOSITORY, "v1", manifest_of(CONFIG, LAYER_A))
    sources.upstream.blobs.update({digest_of(CONFIG): CONFIG, digest_of(LAYER_A): LAYER_A})
    sources.upstream.gate = asyncio.Event()
    measurer = Measurer(sources.service, PLATFORM)
    ref = parse_image_ref(f"{REGISTRY}/{REPOSITORY}:v1")
    first = asyncio.create_task(measurer.measure(ref))
    while not sources.upstream.count("blob", digest_of(CONFIG)):
        await asyncio.sleep(0)  # let the first measure reach the held blob
    with pytest.raises(TooManyRequests):
        await measurer.measure(ref)
    sources.upstream.gate.set()
    assert (await first).as_json()["ok"] is True
    assert (await measurer.measure(ref)).as_json()["ok"] is True  # free again


# --- the terminal tables -------------------------------------------------------------------


REPORT = {
    "generated_at": 1000.0,
    "node": {
        "id": "ab" * 20,
        "address": "10.0.0.1:5000",
        "metrics_addr": "10.0.0.1:9090",
        "store": "containerd",
        "runtime": "containerd",
        "platform": "linux/amd64",
        "version": "0.1.0",
        "uptime_seconds": 3725,
        "cache": {"bytes": 1 << 30, "max_bytes": 4 << 30},
    },
    "peers": [
        {
            "id": "cd" * 20,
            "address": "10.0.0.2:5000",
            "router": "10.0.0.2:5001",
            "last_seen": 998.0,
            "rtt_ms": 0.42,
            "uploads": 2,
            "throughput": 50 << 20,
        }
    ],
    "holdings": {
        "images": [
            {"ref": "docker.io/library/app:1", "digest": "sha256:" + "e" * 64, "size": 5 << 20}
        ],
        "images_total": 1,
        "announced_keys": {"digest": 12, "tag": 1},
    },
    "pulls": [
        {
            "at": 990.0,
            "method": "GET",
            "kind": "blob",
            "ref": "docker.io/library/app@sha256:" + "f" * 64,
            "source": "peer",
            "peer": "10.0.0.2:5000",
            "status": 200,
            "bytes": 3 << 20,
            "seconds": 0.25,
        },
        {
            "at": 980.0,
            "method": "GET",
            "kind": "manifest",
            "ref": "docker.io/x:1",
            "source": "none",
            "status": 404,
            "bytes": 0,
            "seconds": 0.002,
        },
    ],
    "upstream": [
        {
            "registry": "docker.io",
            "healthy": False,
            "last_success": None,
            "last_error": 995.0,
            "error": "no response within 10s",
        }
    ],
    "pins": [
        {
            "ref": "docker.io/library/app:1",
            "state": "fetching",
            "bytes": {"done": 1, "total": 4},
            "layers": {"done": 1, "total": 3},
        }
    ],
    "distributions": [
        {
            "ref": "registry.test/team/app:v2",
            "complete": False,
            "started": 900.0,
            "nodes": {"total": 3, "done": 1, "failed": 1},
            "by_node": {"a": {"bytes": {"done": 5, "total": 10}}},
        }
    ],
}


def test_the_tables_show_every_section_without_colour_off_a_terminal() -> None:
    text = status_client.render(REPORT, colour=False)
    assert not ANSI.search(text)
    lines = text.splitlines()
    assert lines[0].startswith("node 10.0.0.1:5000  id abababababababab, store containerd")
    assert "up 1h 2m" in lines[0]
    assert "cache 1.0 GiB of 4.0 GiB (25%), announces 12 digests and 1 tags" in lines[1]
    for heading in (
        "PEERS (1)",
        "HOLDINGS (1 image)",
        "RECENT PULLS (last 2 of 2)",
        "UPSTREAM",
        "PINS (1)",
        "DISTRIBUTIONS (1)",
    ):
        assert heading in lines, heading
    peer = next(line for line in lines if "10.0.0.2:5001" in line)
    assert re.search(
        r"10\.0\.0\.2:5000\s+10\.0\.0\.2:5001\s+2s ago\s+0\.42 ms\s+2\s+50\.0 MiB/s", peer
    )
    pull = next(line for line in lines if "@sha256:ffff" in line)
    assert re.search(
        r"10s ago\s+GET blob\s+\S+\s+peer\s+10\.0\.0\.2:5000\s+200\s+3\.0 MiB\s+250\.0 ms", pull
    )
    assert any("docker.io  failing" in line and "5s ago" in line for line in lines)
    assert any("[#####---------------]  25%" in line and "1/3" in line for line in lines)
    assert any("1/3 held, 1 failed" in line and " 50%" in line for line in lines)


def test_the_tables_are_coloured_on_a_terminal_with_the_same_text() -> None:
    coloured = status_client.render(REPORT, colour=True)
    assert "\x1b[36mpeer\x1b[0m" in coloured  # the source
    assert "\x1b[31m" in coloured  # the 404 and the failing registry
    assert "\x1b[1mPEERS (1)\x1b[0m" in coloured
    assert ANSI.sub("", coloured) == status_client.render(REPORT, colour=False)


def test_an_empty_report_renders() -> None:
    text = status_client.render({"generated_at": 0, "node": {}}, colour=False)
    assert text.count("(none)") == 6


# --- what the parts tell the report ----------------------------------------------------------


def test_round_trips_are_smoothed_and_bounded() -> None:
    trips = RoundTrips()
    trips.record(b"a", 1.0)
    trips.record(b"a", 2.0)
    assert trips.get(b"a") == pytest.approx(1.3)
    for n in range(2000):
        trips.record(n.to_bytes(4, "big"), 0.001)
    assert trips.get(b"a") is None  # the least recently answering went first
    assert trips.get((1999).to_bytes(4, "big")) == 0.001


async def test_dht_contacts_carry_their_round_trip_and_when_they_were_last_heard() -> None:
    async with cluster(3) as nodes:
        await nodes[0].provide("sha256:" + "12" * 32)  # calls that credit contacts, answered
        contacts = {contact.node_id: contact for contact in nodes[0].contacts()}
        assert set(contacts) == {nodes[1].node_id, nodes[2].node_id}
        for contact in contacts.values():
            assert contact.host == "127.0.0.1" and contact.port > 0
            assert contact.round_trip is not None and 0 < contact.round_trip < 1
            assert contact.last_seen is not None


async def test_the_fetcher_tells_which_peer_served_a_key_and_what_it_reported() -> None:
    blob = bytes(range(256)) * 1024
    digest = parse_digest(digest_of(blob))

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=blob, headers={UPLOADS_HEADER: "3"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    holder = Provider(b"h" * 20, f"127.0.0.1:{server.port}")
    memory = MemoryCluster()
    memory.providers[str(digest)] = {holder.node_id: holder}
    fetcher = PeerFetcher(memory.router(b"n" * 20, "127.0.0.1:9"), RequestSigner(KEY), Metrics())
    await fetcher.start()
    try:
        assert fetcher.served_by(str(digest)) is None
        found = await fetcher.blob(digest, f"/v2/app/blobs/{digest}", None)
        assert found is not None and found.chunks is not None
        assert b"".join([chunk async for chunk in found.chunks]) == blob
        assert fetcher.served_by(str(digest)) == holder.address
        (load,) = fetcher.peer_loads()
        # It reported 3 uploads, this node's among them; that one has ended since.
        assert (load.node_id, load.address, load.uploads, load.in_flight) == (
            holder.node_id,
            holder.address,
            2,
            0,
        )
        assert load.reported_ago is not None and load.seen_ago is not None
    finally:
        await fetcher.close()
        await server.close()


async def test_upstream_health_per_registry() -> None:
    answers = {"status": 200}

    async def manifest(request: web.Request) -> web.Response:
        return web.Response(
            status=answers["status"],
            body=MANIFEST,
            headers={"Content-Type": mt.OCI_MANIFEST, "Docker-Content-Digest": digest_of(MANIFEST)},
        )

    app = web.Application()
    app.router.add_route("*", "/v2/{tail:.*}", manifest)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    registries = UpstreamMap(
        dict(
            [
                parse_upstream(f"up.test=http://127.0.0.1:{server.port}"),
                parse_upstream("down.test=http://127.0.0.1:1"),
            ]
        )
    )
    client = UpstreamClient(registries, None, Metrics(), response_timeout=5)
    await client.start()
    try:
        assert client.health() == {}
        assert await client.get_manifest("up.test", "team/app", digest_of(MANIFEST))
        health = client.health()["up.test"]
        assert health.last_success is not None and health.last_error is None
        answers["status"] = 503
        with pytest.raises(UpstreamError, match="503"):
            await client.get_manifest("up.test", "team/app", "v1")
        health = client.health()["up.test"]
        assert health.error == "answered 503" and health.last_error is not None
        answers["status"] = 404  # "not there" is an answer
        assert await client.get_manifest("up.test", "team/app", "v2") is None
        health = client.health()["up.test"]
        assert health.last_success is not None and health.last_success >= health.last_error
        with pytest.raises(UpstreamError):
            await client.get_manifest("down.test", "team/app", "v1")
        down = client.health()["down.test"]
        assert down.last_success is None and down.error and "127.0.0.1:1" in down.error
    finally:
        await client.close()
        await server.close()


# --- `mirror status` against a real node ------------------------------------------------------


def run_status(*args: str, tty: bool = False) -> tuple[int, str, str]:
    """`python -m mirror status ARGS`; with `tty`, its stdout is a real terminal (a pty)."""
    argv = [sys.executable, "-m", "mirror", "status", *args]
    env = {key: value for key, value in os.environ.items() if key != "NO_COLOR"}
    if not tty:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        return done.returncode, done.stdout, done.stderr
    primary, secondary = pty.openpty()
    try:
        process = subprocess.Popen(
            argv, stdout=secondary, stderr=subprocess.PIPE, env=env, close_fds=True
        )
        os.close(secondary)
        secondary = -1
        output = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        assert process.stderr is not None
        stderr = process.stderr.read().decode()
        return process.wait(timeout=60), output.decode().replace("\r\n", "\n"), stderr
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)


def test_mirror_status_prints_tables_colour_only_on_a_terminal_and_json(
    mirror_factory: Callable[..., MirrorNode],
) -> None:
    node = mirror_factory("--store=cache")
    with pytest.raises(urllib.error.HTTPError) as missing:  # a pull the node cannot answer
        urllib.request.urlopen(f"{node.url}/v2/library/none/manifests/1", timeout=10)
    assert missing.value.code == 404
    missing.value.close()
    code, plain, _ = run_status("--node", node.url)
    assert code == 0
    assert not ANSI.search(plain)
    assert plain.startswith(f"node {node.address}  alone (no cluster key), store cache")
    assert "RECENT PULLS (last 1 of 1)" in plain and "docker.io/library/none:1" in plain
    code, coloured, _ = run_status("--node", node.url, tty=True)
    assert code == 0
    assert ANSI.search(coloured)
    assert "\x1b[1mPEERS (0)\x1b[0m" in coloured
    code, text, _ = run_status("--node", f"{node.host}:{node.metrics_port}", "--json")
    assert code == 0
    report = json.loads(text)
    assert report["node"]["address"] == node.address
    assert report["pulls"][0]["ref"] == "docker.io/library/none:1"


def test_mirror_status_of_a_node_that_does_not_answer_is_one_line() -> None:
    closed = free_port("127.0.0.1")
    code, out, err = run_status("--node", f"127.0.0.1:{closed}")
    assert code == 1 and out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"mirror: error: cannot reach the node at http://127.0.0.1:{closed}/")
