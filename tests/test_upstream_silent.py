"""An upstream that accepts the TCP connection and never answers (`--upstream-timeout`).

A runtime gives up on a mirror host only after its own, long timeouts; a clean OCI 404 makes it
fall back to the next host at once. So a silent upstream must cost a pull at most the
configured wait for response headers (token fetch included), then a 404 (BLOB_UNKNOWN,
MANIFEST_UNKNOWN), for every request that waited on it, including the followers of one
download. Before the flag, a blob request waited for the 60 s per-read timeout.

The silent upstream is a raw asyncio TCP server on a free loopback port that keeps every
connection open and never writes a byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from harness.mirror_node import MirrorNode

from mirror.content.service import ContentPolicy, ContentService
from mirror.errors import BlobUnknown, ManifestUnknown, UpstreamError
from mirror.metrics import SOURCE_LOCAL, Metrics
from mirror.oci.mediatypes import OCI_MANIFEST
from mirror.oci.reference import TagRef, parse_digest
from mirror.ranges import RangeRequest
from mirror.request import Caller, Kind, Target
from mirror.stores.cache import CacheStore
from mirror.upstream.auth import Authenticator
from mirror.upstream.client import UpstreamClient
from mirror.upstream.registries import UpstreamMap

REGISTRY = "silent.test"
REPOSITORY = "team/app"
TIMEOUT = 0.5
# Generous: the point is "about the configured timeout", far below the old 60 s.
BOUND = 5.0
BLOB = parse_digest("sha256:" + "ab" * 32)
MANIFEST = parse_digest("sha256:" + "cd" * 32)


@dataclass
class SilentServer:
    """Accepts connections and never answers; counts and holds them until closed."""

    server: asyncio.Server | None = None
    held: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    async def _accept(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.held.append(writer)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def close(self) -> None:
        for writer in self.held:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def silent() -> AsyncIterator[SilentServer]:
    server = SilentServer()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def client(silent: SilentServer) -> AsyncIterator[tuple[UpstreamClient, Metrics]]:
    metrics = Metrics()
    upstream = UpstreamClient(
        UpstreamMap({REGISTRY: silent.url}),
        None,
        metrics,
        read_timeout=60,
        response_timeout=TIMEOUT,
    )
    await upstream.start()
    try:
        yield upstream, metrics
    finally:
        await upstream.close()


def fetches(metrics: Metrics, kind: str, result: str) -> float:
    labels = {"kind": kind, "result": result}
    return metrics.registry.get_sample_value("mirror_upstream_fetches_total", labels) or 0.0


class Elapsed:
    """`with Elapsed() as t: ...; t.seconds`."""

    def __enter__(self) -> Elapsed:
        self._started = time.monotonic()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.monotonic() - self._started


def assert_bounded(seconds: float) -> None:
    assert TIMEOUT * 0.8 < seconds < BOUND, f"answered after {seconds:.2f}s"


# -- the client ------------------------------------------------------------------------------


async def test_every_request_waits_for_headers_at_most_the_timeout(
    silent: SilentServer, client: tuple[UpstreamClient, Metrics]
) -> None:
    upstream, metrics = client
    calls: list[Callable[[], object]] = [
        lambda: upstream.get_blob(REGISTRY, REPOSITORY, BLOB),
        lambda: upstream.get_blob(REGISTRY, REPOSITORY, BLOB, RangeRequest(0, 9)),
        lambda: upstream.get_manifest(REGISTRY, REPOSITORY, str(MANIFEST)),
        lambda: upstream.get_manifest(REGISTRY, REPOSITORY, "latest"),
    ]
    for call in calls:
        with Elapsed() as elapsed, pytest.raises(UpstreamError, match=r"within 0\.5s"):
            await call()  # type: ignore[misc]
        assert_bounded(elapsed.seconds)
    # A tag check keeps its own, shorter bound; the response timeout caps it too.
    with Elapsed() as elapsed, pytest.raises(UpstreamError):
        await upstream.head_manifest(REGISTRY, REPOSITORY, "latest", timeout=30)
    assert_bounded(elapsed.seconds)
    assert len(silent.held) == 5, "the requests did not reach the silent server"
    assert fetches(metrics, "blob", "error") == 2
    assert fetches(metrics, "manifest", "error") == 2
    assert fetches(metrics, "tag", "error") == 1


async def test_a_silent_token_service_is_bounded(silent: SilentServer) -> None:
    """The registry answers 401 at once; its token realm is the silent server."""

    async def challenge(_request: web.Request) -> web.Response:
        realm = f'Bearer realm="{silent.url}/token",service="registry",scope="repository:a:pull"'
        return web.Response(status=401, headers={"WWW-Authenticate": realm})

    app = web.Application()
    app.router.add_route("*", "/v2/{tail:.*}", challenge)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host = f"127.0.0.1:{runner.addresses[0][1]}"
    metrics = Metrics()
    upstream = UpstreamClient(
        UpstreamMap({REGISTRY: f"http://{host}"}), None, metrics, response_timeout=TIMEOUT
    )
    await upstream.start()
    try:
        with Elapsed() as elapsed, pytest.raises(UpstreamError):
            await upstream.get_blob(REGISTRY, REPOSITORY, BLOB)
        assert_bounded(elapsed.seconds)
        assert silent.held, "the token service was never asked"
        token_errors = metrics.registry.get_sample_value(
            "mirror_upstream_token_fetches_total", {"result": "error"}
        )
        assert token_errors == 1

        # The authenticator bounds a token fetch by itself too.
        async with aiohttp.ClientSession() as session:
            auth = Authenticator(
                session, UpstreamMap({REGISTRY: f"http://{host}"}), None, Metrics(), timeout=0.3
            )
            header = f'Bearer realm="{silent.url}/token",service="registry"'
            with Elapsed() as elapsed, pytest.raises(UpstreamError, match=r"within 0\.3s"):
                await auth.answer(REGISTRY, REPOSITORY, [header], None)
            assert 0.2 < elapsed.seconds < BOUND
    finally:
        await upstream.close()
        await runner.cleanup()


# -- the content service ---------------------------------------------------------------------


def target(kind: Kind, *, tag: str | None = None, digest: str | None = None) -> Target:
    return Target(
        kind,
        REGISTRY,
        REPOSITORY,
        TagRef(REGISTRY, REPOSITORY, tag) if tag is not None else None,
        parse_digest(digest) if digest is not None else None,
    )


@pytest.fixture
async def service(
    tmp_path: Path, client: tuple[UpstreamClient, Metrics]
) -> AsyncIterator[tuple[ContentService, CacheStore, Metrics]]:
    upstream, metrics = client
    cache = CacheStore(tmp_path / "cache")
    await cache.start()
    policy = ContentPolicy(mirrored_registries=None, resolve_tags=True, tag_timeout=30.0)
    content = ContentService(cache, metrics, policy, cache=cache, upstream=upstream)
    try:
        yield content, cache, metrics
    finally:
        await content.close()


async def test_a_blob_and_its_followers_get_a_404_after_the_timeout(
    silent: SilentServer, service: tuple[ContentService, CacheStore, Metrics]
) -> None:
    content, cache, metrics = service
    blob = target(Kind.BLOB, digest=str(BLOB))
    with Elapsed() as elapsed:
        answers = await asyncio.gather(
            *(content.blob(blob, Caller.RUNTIME, None, head=head) for head in (False, True, False)),
            return_exceptions=True,
        )
    assert_bounded(elapsed.seconds)
    assert all(isinstance(answer, BlobUnknown) for answer in answers), answers
    assert len(silent.held) == 1, "the followers did not wait on the one download"
    coalesced = metrics.registry.get_sample_value("mirror_coalesced_waits_total", {"where": "node"})
    assert coalesced == 2
    assert not cache.holds(BLOB)

    # A resume (a range of a blob nobody holds) goes upstream as is: bounded the same way.
    with Elapsed() as elapsed, pytest.raises(BlobUnknown):
        await content.blob(blob, Caller.RUNTIME, RangeRequest(0, 9), head=False)
    assert_bounded(elapsed.seconds)


async def test_manifests_and_tags_get_a_404_after_the_timeout(
    service: tuple[ContentService, CacheStore, Metrics],
) -> None:
    content, _cache, _metrics = service
    for wanted in (target(Kind.MANIFEST, digest=str(MANIFEST)), target(Kind.MANIFEST, tag="v1")):
        with Elapsed() as elapsed, pytest.raises(ManifestUnknown):
            await content.manifest(wanted, Caller.RUNTIME)
        assert_bounded(elapsed.seconds)


async def test_a_tag_this_node_holds_still_resolves(
    service: tuple[ContentService, CacheStore, Metrics],
) -> None:
    """The outage path as before: upstream does not answer, the node's own copy does."""
    content, cache, _metrics = service
    body = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []}
    ).encode()
    digest = parse_digest("sha256:" + hashlib.sha256(body).hexdigest())
    await cache.put(digest, body)
    await cache.set_tag(TagRef(REGISTRY, REPOSITORY, "held"), digest)
    with Elapsed() as elapsed:
        answer = await content.manifest(target(Kind.MANIFEST, tag="held"), Caller.RUNTIME)
    assert_bounded(elapsed.seconds)
    assert (answer.digest, answer.body, answer.source) == (str(digest), body, SOURCE_LOCAL)


# -- a node ----------------------------------------------------------------------------------


async def test_a_node_answers_oci_404s_within_the_timeout(
    silent: SilentServer, mirror_factory: Callable[..., MirrorNode]
) -> None:
    node = await asyncio.to_thread(
        mirror_factory,
        "--store=cache",
        f"--upstream={REGISTRY}={silent.url}",
        "--upstream-timeout=500ms",
    )
    base = f"{node.url}/v2/{REPOSITORY}"
    ns = f"?ns={REGISTRY}"
    requests = [
        ("GET", f"{base}/blobs/{BLOB}{ns}", "BLOB_UNKNOWN"),
        ("GET", f"{base}/manifests/{MANIFEST}{ns}", "MANIFEST_UNKNOWN"),
        ("HEAD", f"{base}/manifests/v1{ns}", None),
        ("GET", f"{base}/manifests/v1{ns}", "MANIFEST_UNKNOWN"),
    ]
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def ask(method: str, url: str) -> tuple[int, str, bytes]:
            async with http.request(method, url) as response:
                return response.status, response.content_type, await response.read()

        for method, url, code in requests:
            with Elapsed() as elapsed:
                status, content_type, raw = await ask(method, url)
            assert_bounded(elapsed.seconds)
            assert status == 404, (method, url, raw)
            if code is not None:
                assert content_type == "application/json"
                assert [e["code"] for e in json.loads(raw)["errors"]] == [code]

        # Several runtimes pulling the same blob at once: none is left hanging.
        other = parse_digest("sha256:" + "ef" * 32)
        with Elapsed() as elapsed:
            answers = await asyncio.gather(
                *(ask("GET", f"{base}/blobs/{other}{ns}") for _ in range(4))
            )
        assert_bounded(elapsed.seconds)
        assert [status for status, _, _ in answers] == [404] * 4
