"""Reports of a corrupt blob: only signed peers may send them, and they never evict a good copy.

The HTTP part runs the real registry front on loopback with the real access policy; the holder
is a node cache (and, for the runtime-store case, an in-memory store standing for containerd).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import ClientResponse, ClientSession
from aiohttp.test_utils import TestServer
from harness.memory_store import MemoryStore

from mirror.clusterkey import ClusterKey
from mirror.content.scrub import BlobChecker, CorruptionReports
from mirror.content.service import ContentPolicy, ContentService
from mirror.metrics import Metrics
from mirror.oci.reference import Digest, parse_digest
from mirror.peers.auth import PEER_HEADER, RequestSigner, RequestVerifier
from mirror.peers.fetcher import REPORT_PATH_PREFIX
from mirror.registry.access import AccessPolicy
from mirror.registry.api import RegistryApi
from mirror.stores.cache import CacheStore

KEY = ClusterKey.from_text(ClusterKey.generate())
POLICY = ContentPolicy(mirrored_registries=None, resolve_tags=True, tag_timeout=1.0)


def digest_of(data: bytes) -> Digest:
    return parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


def flip_a_byte(cache: CacheStore, digest: Digest) -> None:
    path = cache.blob_path(digest)
    os.chmod(path, 0o644)
    with open(path, "r+b") as handle:
        byte = handle.read(1)
        handle.seek(0)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.chmod(path, 0o444)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@dataclass
class Holder:
    url: str
    http: ClientSession
    metrics: Metrics
    cache: CacheStore
    reports: CorruptionReports
    good: Digest
    bad: Digest

    async def post(self, path: str, headers: dict[str, str] | None = None) -> ClientResponse:
        return await self.http.post(self.url + path, headers=headers or {})


@contextlib.asynccontextmanager
async def holding(tmp_path: Path, *, verifier: RequestVerifier | None) -> AsyncIterator[Holder]:
    """A node on its cache holding one intact blob and one with a flipped byte."""
    metrics = Metrics()
    cache = CacheStore(tmp_path / "cache", metrics=metrics)
    await cache.start()
    good_bytes, bad_bytes = os.urandom(1024 * 1024), os.urandom(3 * 1024 * 1024)
    good, bad = digest_of(good_bytes), digest_of(bad_bytes)
    await cache.put(good, good_bytes)
    await cache.put(bad, bad_bytes)
    flip_a_byte(cache, bad)
    reports = CorruptionReports(BlobChecker(cache, metrics), metrics)
    api = RegistryApi(
        metrics,
        ContentService(cache, metrics, POLICY, cache=cache),
        access=AccessPolicy(allowed_clients=(), verifier=verifier),
        reports=reports,
    )
    server = TestServer(api.app(), host="127.0.0.1")
    await server.start_server()
    try:
        async with ClientSession() as http:
            url = str(server.make_url("")).rstrip("/")
            yield Holder(url, http, metrics, cache, reports, good, bad)
    finally:
        await reports.close()
        await server.close()


@pytest.fixture
async def holder(tmp_path: Path) -> AsyncIterator[Holder]:
    async with holding(tmp_path, verifier=RequestVerifier(KEY)) as created:
        yield created


def signed(method: str, path: str, key: ClusterKey = KEY) -> dict[str, str]:
    return {PEER_HEADER: RequestSigner(key).sign(method, path)}


async def oci_error(response: ClientResponse) -> str:
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"errors"} and len(body["errors"]) == 1
    return str(body["errors"][0]["code"])


async def test_a_signed_report_evicts_a_corrupt_copy(holder: Holder) -> None:
    path = f"{REPORT_PATH_PREFIX}{holder.bad}"
    async with await holder.post(path, signed("POST", path)) as response:
        assert response.status == 202
        assert (await response.json()) == {"digest": str(holder.bad), "outcome": "queued"}
    await holder.reports.wait_idle()
    assert not holder.cache.holds(holder.bad)
    assert not holder.cache.blob_path(holder.bad).exists()
    assert holder.cache.holds(holder.good)
    m = holder.metrics
    assert sample(m, "mirror_corrupt_blobs_total", source="report", action="evicted") == 1
    assert sample(m, "mirror_corruption_reports_received_total", outcome="queued") == 1


async def test_a_report_of_a_good_copy_costs_a_rehash_and_nothing_else(holder: Holder) -> None:
    path = f"{REPORT_PATH_PREFIX}{holder.good}"
    async with await holder.post(path, signed("POST", path)) as response:
        assert response.status == 202
    await holder.reports.wait_idle()
    assert holder.cache.holds(holder.good) and holder.cache.blob_path(holder.good).exists()
    m = holder.metrics
    assert sample(m, "mirror_verified_blobs_total", source="report") == 1
    assert sample(m, "mirror_corrupt_blobs_total", source="report", action="evicted") == 0
    # Reported again at once: the copy was just found intact, so no second read.
    async with await holder.post(path, signed("POST", path)) as response:
        assert (await response.json())["outcome"] == "recent"
    await holder.reports.wait_idle()
    assert sample(m, "mirror_verified_blobs_total", source="report") == 1


async def test_unsigned_forged_foreign_and_replayed_reports_are_refused(holder: Holder) -> None:
    path = f"{REPORT_PATH_PREFIX}{holder.bad}"
    stamp = int(time.time() * 1000)
    attempts: list[tuple[dict[str, str], int, str]] = [
        # The node's own runtime (loopback, unsigned) may pull, never report.
        ({}, 403, "DENIED"),
        ({PEER_HEADER: f"v1 {stamp} abcd {'A' * 44}"}, 401, "UNAUTHORIZED"),
        ({PEER_HEADER: "garbage"}, 401, "UNAUTHORIZED"),
        (signed("POST", path, ClusterKey.from_text(ClusterKey.generate())), 401, "UNAUTHORIZED"),
        # Signed for another digest, or for a pull of this one.
        (signed("POST", f"{REPORT_PATH_PREFIX}{holder.good}"), 401, "UNAUTHORIZED"),
        (signed("GET", path), 401, "UNAUTHORIZED"),
    ]
    for headers, status, code in attempts:
        async with await holder.post(path, headers) as response:
            assert response.status == status, headers
            assert await oci_error(response) == code
    replayed = signed("POST", path)
    async with await holder.post(path, replayed) as response:
        assert response.status == 202
    async with await holder.post(path, replayed) as response:
        assert response.status == 401
        assert await oci_error(response) == "UNAUTHORIZED"
    await holder.reports.wait_idle()
    assert holder.cache.holds(holder.good)
    refused = sample(holder.metrics, "mirror_refused_requests_total", reason="unauthorized")
    assert refused == 6
    assert sample(holder.metrics, "mirror_refused_requests_total", reason="denied") == 1


async def test_wrong_methods_and_digests_are_client_errors(holder: Holder) -> None:
    path = f"{REPORT_PATH_PREFIX}{holder.bad}"
    async with holder.http.get(holder.url + path, headers=signed("GET", path)) as response:
        assert response.status == 405
        assert await oci_error(response) == "UNSUPPORTED"
    async with holder.http.get(holder.url + path) as response:
        assert response.status == 403
    for bad_digest in ("sha256:xyz", "md5:" + "0" * 32, "sha256:" + "A" * 64):
        bad_path = f"{REPORT_PATH_PREFIX}{bad_digest}"
        async with await holder.post(bad_path, signed("POST", bad_path)) as response:
            assert response.status == 400
            assert await oci_error(response) == "DIGEST_INVALID"
    assert holder.cache.holds(holder.bad), "a refused report evicted something"


async def test_a_node_without_a_cluster_key_takes_no_reports(tmp_path: Path) -> None:
    async with holding(tmp_path, verifier=None) as holder:
        path = f"{REPORT_PATH_PREFIX}{holder.bad}"
        async with await holder.post(path, signed("POST", path)) as response:
            assert response.status == 401
            assert await oci_error(response) == "UNAUTHORIZED"
        async with await holder.post(path) as response:
            assert response.status == 403
            assert await oci_error(response) == "DENIED"
        assert holder.cache.holds(holder.bad)


async def test_a_flood_of_reports_for_one_digest_costs_one_rehash(tmp_path: Path) -> None:
    metrics = Metrics()
    cache = CacheStore(tmp_path / "cache", metrics=metrics)
    await cache.start()
    data = os.urandom(2 * 1024 * 1024)
    digest = digest_of(data)
    await cache.put(digest, data)
    now = [0.0]
    reports = CorruptionReports(BlobChecker(cache, metrics), metrics, clock=lambda: now[0])
    try:
        outcomes = [reports.report(digest) for _ in range(50)]
        assert outcomes == ["queued"] + ["coalesced"] * 49
        await reports.wait_idle()
        assert sample(metrics, "mirror_verified_blobs_total", source="report") == 1
        assert reports.report(digest) == "recent"
        now[0] += 61
        assert reports.report(digest) == "queued"
        await reports.wait_idle()
        assert sample(metrics, "mirror_verified_blobs_total", source="report") == 2
        assert cache.holds(digest)
        missing = digest_of(b"never held")
        assert reports.report(missing) == "not-held"
    finally:
        await reports.close()


async def test_a_corrupt_copy_in_the_runtime_store_is_counted_not_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    cache = CacheStore(tmp_path / "cache", metrics=metrics)
    await cache.start()
    runtime = MemoryStore()
    digest = await runtime.put(b"the layer containerd pulled")
    runtime.blobs[str(digest)] = b"the layer containerd pulled, then rotted"
    reports = CorruptionReports(BlobChecker(cache, metrics, runtime=runtime), metrics)
    try:
        with caplog.at_level(logging.WARNING, logger="mirror.content.scrub"):
            assert reports.report(digest) == "queued"
            await reports.wait_idle()
        assert sample(metrics, "mirror_corrupt_blobs_total", source="report", action="kept") == 1
        assert str(digest) in runtime.blobs, "mirror removed content from the runtime's store"
        assert any("cannot remove" in record.getMessage() for record in caplog.records)
    finally:
        await reports.close()
