"""The upstream client against a real distribution registry, with and without token auth.

The plain and the token-auth registry share one storage directory (the auth one sees it
through a symlink), so the test images are pushed once, without credentials, and both serve
them read-only. Small aiohttp apps stand in where a real registry cannot misbehave on demand
(redirects to storage, wrong bytes, silence).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from harness.images import TestImage, TestImages, run_skopeo
from harness.registry import Registry
from harness.token_server import TokenServer

from mirror.errors import ConfigError, RangeNotSatisfiable, UpstreamAuthError, UpstreamError
from mirror.metrics import Metrics
from mirror.oci.mediatypes import DOCKER_MANIFEST, MAX_MANIFEST_SIZE, OCI_MANIFEST
from mirror.oci.reference import parse_digest
from mirror.ranges import RangeRequest
from mirror.upstream.auth import Authenticator, BearerChallenge, parse_www_authenticate
from mirror.upstream.client import MAX_TAG_PAGES, UpstreamBlob, UpstreamClient
from mirror.upstream.credentials import Credentials, basic_authorization
from mirror.upstream.registries import UpstreamMap, parse_upstream

MISSING_DIGEST = parse_digest("sha256:" + "0" * 64)


def repo_of(image: TestImage) -> str:
    return f"test/{image.name.replace('_', '-')}"


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def fetches(metrics: Metrics, kind: str, result: str) -> float:
    return sample(metrics, "mirror_upstream_fetches_total", kind=kind, result=result)


def token_fetches(metrics: Metrics, result: str) -> float:
    return sample(metrics, "mirror_upstream_token_fetches_total", result=result)


async def read_all(blob: UpstreamBlob) -> bytes:
    try:
        return b"".join([chunk async for chunk in blob.chunks()])
    finally:
        await blob.close()


def docker_config(path: Path, auths: dict[str, object]) -> Path:
    path.write_text(json.dumps({"auths": auths}))
    return path


def basic_auth_entry(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(
    tmp_path_factory: pytest.TempPathFactory,
    test_images: TestImages,
    required_binaries: dict[str, str],
) -> Iterator[Registry]:
    """A plain registry holding the three test images (pushed once for the module)."""
    reg = Registry(tmp_path_factory.mktemp("upstream"))
    reg.start()
    try:
        for image in test_images.all():
            image.push(reg.host, repo_of(image))
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def token_issuer(tmp_path_factory: pytest.TempPathFactory) -> TokenServer:
    """Keys, certificate and port of the token service; it runs per test (`token_server`)."""
    return TokenServer(tmp_path_factory.mktemp("token"), users={"alice": "s3cret"})


@pytest.fixture(scope="module")
def auth_registry(
    tmp_path_factory: pytest.TempPathFactory, upstream: Registry, token_issuer: TokenServer
) -> Iterator[Registry]:
    """A registry demanding bearer tokens from `token_issuer`, over `upstream`'s storage."""
    base = tmp_path_factory.mktemp("auth-registry")
    (base / "storage").symlink_to(upstream.storage_dir, target_is_directory=True)
    reg = Registry(base, extra_config=token_issuer.registry_config())
    reg.start()
    yield reg
    reg.stop()


@pytest.fixture
async def token_server(token_issuer: TokenServer) -> AsyncIterator[TokenServer]:
    token_issuer.reset()
    token_issuer.allow_anonymous = True
    token_issuer.token_field = "token"
    async with token_issuer:
        yield token_issuer


ClientFactory = Callable[..., Awaitable[tuple[UpstreamClient, Metrics]]]


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    """`await make_client({registry: url}, credentials=None, **kw) -> (client, metrics)`."""
    clients: list[UpstreamClient] = []

    async def make(
        overrides: dict[str, str], credentials: Credentials | None = None, **kwargs: float
    ) -> tuple[UpstreamClient, Metrics]:
        metrics = Metrics()
        client = UpstreamClient(UpstreamMap(overrides), credentials, metrics, **kwargs)
        await client.start()
        clients.append(client)
        return client, metrics

    yield make
    for client in clients:
        await client.close()


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    """Run `app` on an ephemeral loopback port; returns the runner and `127.0.0.1:PORT`."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"{host}:{port}"


# -- a plain registry ----------------------------------------------------------------------


async def test_manifests_of_every_type(
    upstream: Registry, test_images: TestImages, make_client: ClientFactory
) -> None:
    client, metrics = await make_client({upstream.host: upstream.url})
    for image in test_images.all():
        body = image.blob_bytes(image.manifest_digest)
        repo = repo_of(image)

        ref = await client.head_manifest(upstream.host, repo, image.tag, timeout=5)
        assert ref is not None
        assert (ref.digest, ref.media_type, ref.size) == (
            image.manifest_digest,
            image.media_type,
            len(body),
        )
        by_digest = await client.head_manifest(
            upstream.host, repo, image.manifest_digest, timeout=5
        )
        assert by_digest == ref

        for reference in (image.tag, image.manifest_digest):
            manifest = await client.get_manifest(upstream.host, repo, reference)
            assert manifest is not None
            assert manifest.body == body
            assert manifest.digest == image.manifest_digest
            assert manifest.media_type == image.media_type

    assert {test_images.docker_v2.media_type, test_images.multi_layer.media_type} == {
        DOCKER_MANIFEST,
        OCI_MANIFEST,
    }
    assert fetches(metrics, "tag", "ok") == 3
    assert fetches(metrics, "manifest", "ok") == 9


async def test_blob_whole_and_ranges(
    upstream: Registry, test_images: TestImages, make_client: ClientFactory
) -> None:
    client, metrics = await make_client({upstream.host: upstream.url})
    image = test_images.multi_layer
    repo = repo_of(image)
    small, big = image.layer_digests[0], image.layer_digests[1]
    small_bytes = image.blob_bytes(small)

    blob = await client.get_blob(upstream.host, repo, parse_digest(small))
    assert blob is not None
    assert (blob.status, blob.size, blob.offset, blob.length) == (
        200,
        len(small_bytes),
        0,
        len(small_bytes),
    )
    assert await read_all(blob) == small_bytes

    blob = await client.get_blob(upstream.host, repo, parse_digest(small), RangeRequest(10, 99))
    assert blob is not None
    assert (blob.status, blob.size, blob.offset, blob.length) == (206, len(small_bytes), 10, 90)
    assert await read_all(blob) == small_bytes[10:100]

    blob = await client.get_blob(upstream.host, repo, parse_digest(small), RangeRequest(suffix=7))
    assert blob is not None
    assert (blob.status, blob.offset, blob.length) == (206, len(small_bytes) - 7, 7)
    assert await read_all(blob) == small_bytes[-7:]

    with pytest.raises(RangeNotSatisfiable) as unsatisfiable:
        await client.get_blob(upstream.host, repo, parse_digest(small), RangeRequest(999999999))
    assert unsatisfiable.value.size == len(small_bytes)

    # The big layer streams in chunks of at most 1 MiB and hashes right.
    blob = await client.get_blob(upstream.host, repo, parse_digest(big))
    assert blob is not None
    hasher, sizes = hashlib.sha256(), []
    async with blob:
        async for chunk in blob.chunks():
            hasher.update(chunk)
            sizes.append(len(chunk))
    assert "sha256:" + hasher.hexdigest() == big
    assert max(sizes) <= 1024 * 1024
    assert sum(sizes) == image.blobs[big]

    total = len(small_bytes) + 90 + 7 + image.blobs[big]
    assert sample(metrics, "mirror_upstream_bytes_total") == total
    assert fetches(metrics, "blob", "ok") == 5


async def test_blob_closed_early_frees_the_connection(
    upstream: Registry, test_images: TestImages, make_client: ClientFactory
) -> None:
    client, metrics = await make_client({upstream.host: upstream.url})
    image = test_images.multi_layer
    big = image.layer_digests[1]
    blob = await client.get_blob(upstream.host, repo_of(image), parse_digest(big))
    assert blob is not None
    async for _chunk in blob.chunks():
        break
    await blob.close()
    # The client still works afterwards, and the early close is not an upstream failure.
    assert await client.head_manifest(upstream.host, repo_of(image), image.tag, timeout=5)
    assert fetches(metrics, "blob", "ok") == 1
    assert fetches(metrics, "blob", "error") == 0


async def test_missing_content_is_none(
    upstream: Registry, test_images: TestImages, make_client: ClientFactory
) -> None:
    client, metrics = await make_client({upstream.host: upstream.url})
    repo = repo_of(test_images.multi_layer)
    assert await client.head_manifest(upstream.host, repo, "no-such-tag", timeout=5) is None
    assert await client.get_manifest(upstream.host, repo, "no-such-tag") is None
    assert await client.get_manifest(upstream.host, "no/such-repo", "v1") is None
    assert await client.get_manifest(upstream.host, repo, str(MISSING_DIGEST)) is None
    assert await client.get_blob(upstream.host, repo, MISSING_DIGEST) is None
    assert await client.get_blob(upstream.host, "no/such-repo", MISSING_DIGEST) is None
    assert fetches(metrics, "tag", "missing") == 1
    assert fetches(metrics, "manifest", "missing") == 3
    assert fetches(metrics, "blob", "missing") == 2


async def test_stopped_registry_fails_fast(registry: Registry, make_client: ClientFactory) -> None:
    client, metrics = await make_client({registry.host: registry.url})
    registry.stop()
    started = time.monotonic()
    with pytest.raises(UpstreamError):
        await client.head_manifest(registry.host, "a/b", "v1", timeout=5)
    with pytest.raises(UpstreamError):
        await client.get_manifest(registry.host, "a/b", "v1")
    with pytest.raises(UpstreamError):
        await client.get_blob(registry.host, "a/b", MISSING_DIGEST)
    assert time.monotonic() - started < 2
    assert fetches(metrics, "tag", "error") == 1
    assert fetches(metrics, "manifest", "error") == 1
    assert fetches(metrics, "blob", "error") == 1


async def test_head_manifest_timeout_is_honoured(make_client: ClientFactory) -> None:
    """A server that accepts and never answers: the whole call ends at `timeout`."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    host = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        client, metrics = await make_client({host: f"http://{host}"}, read_timeout=60)
        started = time.monotonic()
        with pytest.raises(UpstreamError, match=r"within 0\.3s"):
            await client.head_manifest(host, "a/b", "v1", timeout=0.3)
        assert 0.25 < time.monotonic() - started < 1.5
        assert held  # it really connected
        assert fetches(metrics, "tag", "error") == 1
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


# -- token auth against distribution -------------------------------------------------------


async def test_token_flow_anonymous(
    auth_registry: Registry,
    token_server: TokenServer,
    test_images: TestImages,
    make_client: ClientFactory,
) -> None:
    auth_registry.clear_access_log()
    client, metrics = await make_client({auth_registry.host: auth_registry.url})
    image = test_images.multi_layer
    repo = repo_of(image)

    manifest = await client.get_manifest(auth_registry.host, repo, image.tag)
    assert manifest is not None and manifest.digest == image.manifest_digest
    ref = await client.head_manifest(auth_registry.host, repo, image.tag, timeout=5)
    assert ref is not None and ref.digest == image.manifest_digest
    layer = image.layer_digests[0]
    blob = await client.get_blob(auth_registry.host, repo, parse_digest(layer))
    assert blob is not None
    assert await read_all(blob) == image.blob_bytes(layer)

    # One token for the repository's pull scope, reused by the later requests.
    assert [(r.user, r.service, r.scopes, r.status) for r in token_server.requests] == [
        (None, token_server.service, (f"repository:{repo}:pull",), 200)
    ]
    assert token_fetches(metrics, "ok") == 1

    # Another repository is another scope, hence another token.
    other = test_images.index
    assert await client.get_manifest(auth_registry.host, repo_of(other), other.tag)
    assert [r.scopes for r in token_server.requests][1:] == [(f"repository:{repo_of(other)}:pull",)]
    assert token_fetches(metrics, "ok") == 2

    # After the first 401 the challenge is known: no request goes out without a token.
    unauthorized = [e for e in auth_registry.requests() if e.status == 401]
    assert len(unauthorized) == 2


async def test_concurrent_requests_share_one_token(
    auth_registry: Registry,
    token_server: TokenServer,
    test_images: TestImages,
    make_client: ClientFactory,
) -> None:
    client, metrics = await make_client({auth_registry.host: auth_registry.url})
    image = test_images.index
    results = await asyncio.gather(
        *(client.get_manifest(auth_registry.host, repo_of(image), image.tag) for _ in range(4)),
        *(
            client.get_blob(auth_registry.host, repo_of(image), parse_digest(d))
            for d in image.layer_digests
        ),
    )
    for result in results:
        assert result is not None
        if isinstance(result, UpstreamBlob):
            await read_all(result)
    assert len(token_server.requests) == 1
    assert token_fetches(metrics, "ok") == 1


async def test_token_flow_with_credentials(
    tmp_path: Path,
    auth_registry: Registry,
    token_server: TokenServer,
    test_images: TestImages,
    make_client: ClientFactory,
) -> None:
    config = docker_config(
        tmp_path / "config.json",
        {f"http://{auth_registry.host}": basic_auth_entry("alice", "s3cret")},
    )
    client, metrics = await make_client(
        {auth_registry.host: auth_registry.url}, Credentials.load(config)
    )
    image = test_images.docker_v2
    repo = repo_of(image)
    token_server.token_field = "access_token"  # the other spelling the spec allows

    manifest = await client.get_manifest(auth_registry.host, repo, image.manifest_digest)
    assert manifest is not None and manifest.media_type == DOCKER_MANIFEST
    for layer in image.layer_digests:
        blob = await client.get_blob(auth_registry.host, repo, parse_digest(layer))
        assert blob is not None
        assert await read_all(blob) == image.blob_bytes(layer)

    assert [(r.user, r.scopes) for r in token_server.requests] == [
        ("alice", (f"repository:{repo}:pull",))
    ]
    assert token_fetches(metrics, "ok") == 1


async def test_token_refused(
    auth_registry: Registry,
    token_server: TokenServer,
    test_images: TestImages,
    make_client: ClientFactory,
) -> None:
    repo = repo_of(test_images.multi_layer)
    wrong = Credentials({auth_registry.host: ("alice", "wrong")})
    client, metrics = await make_client({auth_registry.host: auth_registry.url}, wrong)
    with pytest.raises(UpstreamAuthError, match="refused the configured credentials"):
        await client.get_manifest(auth_registry.host, repo, "v1")
    assert token_fetches(metrics, "error") == 1
    assert fetches(metrics, "manifest", "error") == 1

    # Anonymous access turned off: an anonymous client cannot get a token either.
    token_server.allow_anonymous = False
    client, metrics = await make_client({auth_registry.host: auth_registry.url})
    with pytest.raises(UpstreamAuthError, match="anonymous"):
        await client.head_manifest(auth_registry.host, repo, "v1", timeout=5)
    assert token_fetches(metrics, "error") == 1


async def test_tokens_expire_from_the_cache(
    auth_registry: Registry, token_server: TokenServer, test_images: TestImages
) -> None:
    """Against the real token service, with a fake clock: refetched only once near expiry."""
    now = [1000.0]
    metrics = Metrics()
    token_server.expires_in = 60
    challenge = BearerChallenge(
        token_server.realm, token_server.service, f"repository:{repo_of(test_images.index)}:pull"
    )
    async with aiohttp.ClientSession() as session:
        auth = Authenticator(
            session,
            UpstreamMap({auth_registry.host: auth_registry.url}),
            None,
            metrics,
            clock=lambda: now[0],
        )
        header = await auth.answer(
            auth_registry.host,
            repo_of(test_images.index),
            [
                f'Bearer realm="{challenge.realm}",service="{challenge.service}",'
                f'scope="{challenge.scope}"'
            ],
            None,
        )
        assert header.startswith("Bearer ")
        now[0] += 45  # 60 s lifetime minus a 12 s margin: still good at 45 s
        assert await auth.authorization(auth_registry.host, repo_of(test_images.index)) == header
        assert len(token_server.requests) == 1
        now[0] += 5  # 50 s: inside the margin, fetched anew
        fresh = await auth.authorization(auth_registry.host, repo_of(test_images.index))
        assert fresh is not None and fresh != header
        assert len(token_server.requests) == 2
        # A token the registry just refused is not offered again, even if not yet expired.
        again = await auth.answer(
            auth_registry.host,
            repo_of(test_images.index),
            [f'Bearer realm="{challenge.realm}",scope="{challenge.scope}"'],
            fresh,
        )
        assert again != fresh
        assert len(token_server.requests) == 3
    assert token_fetches(metrics, "ok") == 3


# -- redirects and misbehaving registries --------------------------------------------------


async def test_blob_redirect_never_leaks_authorization(
    tmp_path: Path, make_client: ClientFactory
) -> None:
    """The registry (bearer auth) redirects the blob to storage on another port."""
    payload = bytes(range(256)) * 40
    digest = "sha256:" + hashlib.sha256(payload).hexdigest()
    seen_by_storage: list[dict[str, str]] = []
    seen_by_registry: list[str | None] = []
    token_requests: list[str | None] = []

    async def storage_blob(request: web.Request) -> web.StreamResponse:
        seen_by_storage.append(dict(request.headers))
        assert request.query["X-Amz-Signature"] == "presigned"
        return web.Response(body=payload)

    storage_app = web.Application()
    storage_app.router.add_get("/bucket/{name}", storage_blob)
    storage_runner, storage_host = await serve(storage_app)

    registry_host_box: list[str] = []

    async def registry_blob(request: web.Request) -> web.StreamResponse:
        authorization = request.headers.get("Authorization")
        seen_by_registry.append(authorization)
        if authorization != "Bearer t0ken":
            realm = f"http://{registry_host_box[0]}/token"
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED"}]},
                status=401,
                headers={
                    "WWW-Authenticate": f'Bearer realm="{realm}",service="fake",'
                    f'scope="repository:{request.match_info["repo"]}:pull"'
                },
            )
        location = f"http://{storage_host}/bucket/blob?X-Amz-Signature=presigned"
        raise web.HTTPTemporaryRedirect(location)

    async def token(request: web.Request) -> web.Response:
        token_requests.append(request.headers.get("Authorization"))
        return web.json_response({"access_token": "t0ken", "expires_in": 300})

    registry_app = web.Application()
    registry_app.router.add_get("/v2/{repo:.+}/blobs/{digest}", registry_blob)
    registry_app.router.add_get("/token", token)
    registry_runner, registry_host = await serve(registry_app)
    registry_host_box.append(registry_host)
    try:
        creds = Credentials.load(
            docker_config(tmp_path / "c.json", {registry_host: {"username": "u", "password": "p"}})
        )
        client, metrics = await make_client({registry_host: f"http://{registry_host}"}, creds)
        blob = await client.get_blob(registry_host, "lib/app", parse_digest(digest))
        assert blob is not None
        assert await read_all(blob) == payload

        assert seen_by_registry == [None, "Bearer t0ken"]
        assert token_requests == [basic_authorization("u", "p")]
        assert len(seen_by_storage) == 1
        assert "Authorization" not in seen_by_storage[0]
        assert token_fetches(metrics, "ok") == 1

        # A Range goes to storage too (the storage here ignores it: a 200 is passed on as is).
        blob = await client.get_blob(
            registry_host, "lib/app", parse_digest(digest), RangeRequest(0, 9)
        )
        assert blob is not None and blob.status == 200
        await read_all(blob)
        assert seen_by_storage[1]["Range"] == "bytes=0-9"
        assert "Authorization" not in seen_by_storage[1]
        assert seen_by_registry[-1] == "Bearer t0ken"  # cached token sent up front
    finally:
        await registry_runner.cleanup()
        await storage_runner.cleanup()


async def test_misbehaving_registry(make_client: ClientFactory) -> None:
    good = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []}
    ).encode()
    good_digest = "sha256:" + hashlib.sha256(good).hexdigest()
    other_digest = "sha256:" + "1" * 64

    async def manifest(request: web.Request) -> web.StreamResponse:
        reference = request.match_info["reference"]
        if reference == "broken":
            return web.json_response({"errors": [{"code": "UNAVAILABLE"}]}, status=503)
        if reference == "huge":
            return web.Response(body=b" " * (MAX_MANIFEST_SIZE + 1), content_type="text/plain")
        if reference == "basic":
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="x"'})
        if reference == "bad-redirect":
            # A Location yarl parses but nothing can connect to.
            return web.Response(status=307, headers={"Location": "http://127.0.0.1:99999/x"})
        if reference == "lying":
            # Claims a digest the body does not have: the computed one is used instead.
            headers = {"Docker-Content-Digest": other_digest, "Content-Type": OCI_MANIFEST}
            return web.Response(body=good, headers=headers)
        # Any digest asked for gets the same body: only the right digest may accept it.
        return web.Response(body=good, headers={"Content-Type": OCI_MANIFEST})

    app = web.Application()
    app.router.add_route("*", "/v2/{repo:.+}/manifests/{reference}", manifest)
    runner, host = await serve(app)
    try:
        client, metrics = await make_client({host: f"http://{host}"})
        with pytest.raises(UpstreamError, match="503 UNAVAILABLE"):
            await client.get_manifest(host, "a/b", "broken")
        with pytest.raises(UpstreamError, match="exceeds"):
            await client.get_manifest(host, "a/b", "huge")
        with pytest.raises(UpstreamAuthError, match="none are configured"):
            await client.get_manifest(host, "a/b", "basic")
        with pytest.raises(UpstreamError, match="does not match"):
            await client.get_manifest(host, "a/b", other_digest)
        with pytest.raises(UpstreamError, match="bad redirect Location"):
            await client.get_manifest(host, "a/b", "bad-redirect")

        lying = await client.get_manifest(host, "a/b", "lying")
        assert lying is not None and lying.digest == good_digest
        by_digest = await client.get_manifest(host, "a/b", good_digest)
        assert by_digest is not None and by_digest.digest == good_digest
        # HEAD without Docker-Content-Digest: the client falls back to the body.
        ref = await client.head_manifest(host, "a/b", "latest", timeout=5)
        assert ref is not None
        assert (ref.digest, ref.media_type, ref.size) == (good_digest, OCI_MANIFEST, len(good))
        assert fetches(metrics, "manifest", "error") == 5
    finally:
        await runner.cleanup()


async def test_basic_auth_registry(tmp_path: Path, make_client: ClientFactory) -> None:
    seen: list[str | None] = []
    expected = basic_authorization("bob", "pw")

    async def manifest(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != expected:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/v2/{repo:.+}/manifests/{reference}", manifest)
    runner, host = await serve(app)
    try:
        client, _ = await make_client({host: f"http://{host}"}, Credentials({host: ("bob", "pw")}))
        assert await client.get_manifest(host, "a/b", "v1") is None
        assert await client.get_manifest(host, "a/b", "v2") is None
        assert seen == [None, expected, expected]  # Basic sent up front once known

        wrong, _ = await make_client({host: f"http://{host}"}, Credentials({host: ("bob", "x")}))
        with pytest.raises(UpstreamAuthError, match="refused"):
            await wrong.get_manifest(host, "a/b", "v1")
    finally:
        await runner.cleanup()


# -- tag lists -----------------------------------------------------------------------------


async def test_list_tags_of_a_real_registry(
    registry: Registry, test_images: TestImages, make_client: ClientFactory
) -> None:
    image = test_images.docker_v2
    for tag in ("v1", "v2", "prod-1"):
        await asyncio.to_thread(
            run_skopeo,
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            image.source,
            f"docker://{registry.host}/team/app:{tag}",
        )
    client, metrics = await make_client({registry.host: registry.url})
    tags = await client.list_tags(registry.host, "team/app")
    assert tags is not None and sorted(tags) == ["prod-1", "v1", "v2"]
    assert await client.list_tags(registry.host, "no/such-repo") is None
    assert fetches(metrics, "tag", "ok") == 1
    assert fetches(metrics, "tag", "missing") == 1
    registry.stop()
    with pytest.raises(UpstreamError):
        await client.list_tags(registry.host, "team/app")
    assert fetches(metrics, "tag", "error") == 1


async def test_list_tags_with_token_auth(
    auth_registry: Registry,
    token_server: TokenServer,
    test_images: TestImages,
    make_client: ClientFactory,
) -> None:
    client, _ = await make_client({auth_registry.host: auth_registry.url})
    repo = repo_of(test_images.index)
    assert await client.list_tags(auth_registry.host, repo) == [test_images.index.tag]
    assert [r.scopes for r in token_server.requests] == [(f"repository:{repo}:pull",)]
    # The token is cached: a manifest of the same repository needs no other.
    assert await client.head_manifest(auth_registry.host, repo, "v1", timeout=5)
    assert len(token_server.requests) == 1


SEEN = web.AppKey("seen", list[str])


def tag_pages(pages: dict[str, tuple[int, object, str | None]]) -> web.Application:
    """A registry whose tags/list answers `pages[last]` (`last` absent: ""): status, JSON body,
    and the Link header's URL, if any. Every request is recorded in `app[SEEN]`."""
    seen: list[str] = []

    async def tags(request: web.Request) -> web.Response:
        seen.append(request.path_qs)
        status, body, link = pages[request.query.get("last", "")]
        headers = {"Link": f'<{link}>; rel="next"'} if link is not None else {}
        if isinstance(body, bytes):
            return web.Response(status=status, body=body, headers=headers)
        return web.json_response(body, status=status, headers=headers)

    app = web.Application()
    app[SEEN] = seen
    app.router.add_get("/v2/{repo:.+}/tags/list", tags)
    return app


async def test_list_tags_follows_link_pages(make_client: ClientFactory) -> None:
    pages: dict[str, tuple[int, object, str | None]] = {
        "": (200, {"name": "a/b", "tags": ["v1", "v2"]}, "/v2/a/b/tags/list?n=2&last=v2"),
        "v3": (200, {"name": "a/b", "tags": None}, None),
    }
    app = tag_pages(pages)
    runner, host = await serve(app)
    # An absolute Link at the same origin; a tag seen twice; a string no request could name.
    pages["v2"] = (
        200,
        {"name": "a/b", "tags": ["v2", "v3", "bad tag"]},
        f"http://{host}/v2/a/b/tags/list?n=2&last=v3",
    )
    try:
        client, metrics = await make_client({host: f"http://{host}"})
        assert await client.list_tags(host, "a/b", page_size=2) == ["v1", "v2", "v3"]
        assert app[SEEN] == [
            "/v2/a/b/tags/list?n=2",
            "/v2/a/b/tags/list?n=2&last=v2",
            "/v2/a/b/tags/list?n=2&last=v3",
        ]
        assert fetches(metrics, "tag", "ok") == 1
        with pytest.raises(ValueError, match="page_size"):
            await client.list_tags(host, "a/b", page_size=0)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("pages", "error"),
    [
        # A Link back to a page already read.
        (
            {
                "": (200, {"tags": ["a"]}, "/v2/a/b/tags/list?last=a"),
                "a": (200, {"tags": []}, "/v2/a/b/tags/list?last=a"),
            },
            "already read",
        ),
        # A Link to another origin would get our credentials.
        (
            {"": (200, {"tags": ["a"]}, "http://elsewhere.example/v2/a/b/tags/list?last=a")},
            "another origin",
        ),
        # The repository vanished between pages: a half list would read as tags removed.
        (
            {
                "": (200, {"tags": ["a"]}, "/v2/a/b/tags/list?last=a"),
                "a": (404, {"errors": []}, None),
            },
            "answered 404",
        ),
        ({"": (200, {"tags": "a"}, None)}, "not a list of strings"),
        ({"": (200, {"tags": [1]}, None)}, "not a list of strings"),
        ({"": (200, ["a"], None)}, "not a tag list"),
        ({"": (200, b"<html>", None)}, "not JSON"),
        ({"": (500, {"errors": [{"code": "UNKNOWN"}]}, None)}, "500 UNKNOWN"),
    ],
)
async def test_list_tags_refuses_what_it_cannot_trust(
    make_client: ClientFactory, pages: dict[str, tuple[int, object, str | None]], error: str
) -> None:
    runner, host = await serve(tag_pages(pages))
    try:
        client, metrics = await make_client({host: f"http://{host}"})
        with pytest.raises(UpstreamError, match=error):
            await client.list_tags(host, "a/b")
        assert fetches(metrics, "tag", "error") == 1
    finally:
        await runner.cleanup()


async def test_list_tags_stops_at_the_page_cap(make_client: ClientFactory) -> None:
    """A registry whose every page links to one more: the client gives up, it does not loop."""
    requests = 0

    async def endless(request: web.Request) -> web.Response:
        nonlocal requests
        requests += 1
        last = int(request.query.get("last", "0"))
        link = f'</v2/a/b/tags/list?last={last + 1}>; rel="next"'
        return web.json_response({"tags": [f"t{last}"]}, headers={"Link": link})

    app = web.Application()
    app.router.add_get("/v2/{repo:.+}/tags/list", endless)
    runner, host = await serve(app)
    try:
        client, _ = await make_client({host: f"http://{host}"})
        with pytest.raises(UpstreamError, match=f"more than {MAX_TAG_PAGES} pages"):
            await client.list_tags(host, "a/b")
        assert requests == MAX_TAG_PAGES
    finally:
        await runner.cleanup()


# -- parsing -------------------------------------------------------------------------------


def test_credentials_forms_and_aliases(tmp_path: Path) -> None:
    config = docker_config(
        tmp_path / "config.json",
        {
            "https://index.docker.io/v1/": basic_auth_entry("hub", "pa:ss"),
            "ghcr.io": {"username": "gh", "password": "tok"},
            "http://localhost:5000/": basic_auth_entry("local", "pw"),
            "quay.io": {},  # kept in a credsStore: skipped
            "gcr.io": {"identitytoken": "refresh"},
        },
    )
    creds = Credentials.load(config)
    assert creds.lookup("docker.io") == ("hub", "pa:ss")
    assert creds.lookup("index.docker.io") == ("hub", "pa:ss")
    assert creds.lookup("registry-1.docker.io") == ("hub", "pa:ss")
    assert creds.lookup("GHCR.io") == ("gh", "tok")
    assert creds.lookup("localhost:5000") == ("local", "pw")
    assert creds.lookup("localhost") is None
    assert creds.lookup("quay.io") is None
    assert creds.lookup("gcr.io") is None
    assert "pa:ss" not in repr(creds) and "tok" not in repr(creds)

    plain_hub = docker_config(tmp_path / "hub.json", {"docker.io": basic_auth_entry("h", "p")})
    assert Credentials.load(plain_hub).lookup("index.docker.io") == ("h", "p")
    no_auths = tmp_path / "empty.json"
    no_auths.write_text('{"credsStore": "desktop"}')
    assert Credentials.load(no_auths).lookup("docker.io") is None


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        '{"auths": []}',
        '{"auths": {"x.io": "user:pass"}}',
        '{"auths": {"x.io": {"auth": "%%%"}}}',
        '{"auths": {"x.io": {"auth": "' + base64.b64encode(b"nocolon").decode() + '"}}}',
        '{"auths": {"x.io": {"username": "u"}}}',
        '{"auths": {"x.io": {"username": 1, "password": "p"}}}',
    ],
)
def test_malformed_credentials(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        Credentials.load(path)
    assert "\n" not in str(error.value)
    assert str(path) in str(error.value)


def test_unreadable_credentials(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Credentials.load(tmp_path / "missing.json")


def test_parse_upstream_and_map() -> None:
    assert parse_upstream("docker.io=https://mirror.example.com") == (
        "docker.io",
        "https://mirror.example.com",
    )
    assert parse_upstream("Reg.local:5000=http://10.0.0.1:5000/") == (
        "reg.local:5000",
        "http://10.0.0.1:5000",
    )
    for bad in [
        "docker.io",
        "=https://x",
        "docker.io=",
        "docker.io=ftp://x",
        "docker.io=https://x/v2",
        "docker.io=https://x?a=b",
        "docker.io=https://u:p@x",
        "docker.io=https://x:99999",
        "docker.io=https://",
        "bad host=https://x",
    ]:
        with pytest.raises(ConfigError):
            parse_upstream(bad)

    upstreams = UpstreamMap(dict([parse_upstream("ghcr.io=http://127.0.0.1:1234")]))
    assert upstreams.base_url("ghcr.io") == "http://127.0.0.1:1234"
    assert upstreams.base_url("docker.io") == "https://registry-1.docker.io"
    assert upstreams.base_url("quay.io") == "https://quay.io"
    assert UpstreamMap().base_url("localhost:5000") == "https://localhost:5000"


def test_parse_www_authenticate() -> None:
    [bearer] = parse_www_authenticate(
        [
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/ubuntu:pull,push"'
        ]
    )
    assert bearer.scheme == "bearer"
    assert dict(bearer.params) == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/ubuntu:pull,push",
    }
    basic, second, negotiate, bare = parse_www_authenticate(
        [
            'Basic realm="a, b", Bearer  realm = "x\\"y" , error=insufficient_scope',
            "Negotiate abc==, Basic",
        ]
    )
    assert (basic.scheme, dict(basic.params)) == ("basic", {"realm": "a, b"})
    assert dict(second.params) == {"realm": 'x"y', "error": "insufficient_scope"}
    assert (negotiate.scheme, negotiate.token68) == ("negotiate", "abc==")
    assert (bare.scheme, dict(bare.params)) == ("basic", {})
    assert parse_www_authenticate(["", " , ", '"garbage"']) == []
