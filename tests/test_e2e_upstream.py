"""Pull-through with the real parts: containerd nodes, their mirrors, a distribution registry.

A miss in the whole cluster goes upstream once; tags are fresh while upstream is up and keep
resolving while it is down; bad upstream bytes never reach a client as valid content.
"""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web
from harness.cluster import Cluster, MirrorFactory, make_cluster, status_of, wait_until
from harness.containerd import ContainerdNode, write_hosts_toml
from harness.images import TestImage, TestImages
from harness.mirror_node import MirrorNode
from harness.registry import Registry


def upstream_flag(registry: Registry) -> str:
    return f"--upstream={registry.host}=http://{registry.host}"


def pull_all(nodes: list[ContainerdNode], ref: str, hosts_dirs: list[Path]) -> None:
    """Every node pulls `ref` at the same moment (one thread each, started together)."""
    start = threading.Barrier(len(nodes))
    errors: list[BaseException] = []

    def pull(node: ContainerdNode, hosts_dir: Path) -> None:
        start.wait()
        try:
            node.pull(ref, hosts_dir=hosts_dir)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [
        threading.Thread(target=pull, args=(node, hosts_dir))
        for node, hosts_dir in zip(nodes, hosts_dirs, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors


@pytest.fixture
def upstream_cluster(
    tmp_path: Path,
    registry: Registry,
    containerd_factory: Callable[[], ContainerdNode],
    mirror_factory: MirrorFactory,
) -> Cluster:
    nodes = [containerd_factory() for _ in range(4)]
    cluster = make_cluster(tmp_path, nodes)
    for index in range(4):
        cluster.start_mirror(mirror_factory, index, upstream_flag(registry))
    cluster.wait_connected()
    return cluster


def hosts_dirs(cluster: Cluster, registry: Registry, base: Path) -> list[Path]:
    dirs = []
    for index, mirror in enumerate(cluster.running()):
        directory = base / f"hosts{index}"
        write_hosts_toml(directory, registry.host, registry.url, [mirror.url])
        dirs.append(directory)
    return dirs


def assert_pulled(node: ContainerdNode, ref: str, image: TestImage) -> None:
    assert node.image_target(ref) == image.manifest_digest
    for digest in image.host_blobs:
        assert node.blob_path(digest).read_bytes() == image.blob_bytes(digest), digest


def test_four_cold_nodes_fetch_each_blob_from_upstream_once(
    upstream_cluster: Cluster,
    registry: Registry,
    test_images: TestImages,
    tmp_path: Path,
) -> None:
    image = test_images.multi_layer
    ref = image.push(registry.host, "cold/app")
    registry.clear_access_log()
    pull_all(upstream_cluster.nodes, ref, hosts_dirs(upstream_cluster, registry, tmp_path))
    for node in upstream_cluster.nodes:
        assert_pulled(node, ref, image)
    blobs = [image.config_digest, *image.layer_digests]
    counts = {digest: registry.blob_fetch_count(digest) for digest in blobs}
    assert counts == dict.fromkeys(blobs, 1), counts
    # A node streams from the claimant (share), or, on containerd by default (redirect), sends
    # its runtime there.
    shared = sum(
        m.metric("mirror_coalesced_waits_total", where="cluster")
        + m.metric("mirror_requests_total", kind="blob", status="200", source="peer")
        + m.metric("mirror_peer_redirects_total", result="sent")
        for m in upstream_cluster.running()
    )
    assert shared > 0, "no node streamed from another nor sent its runtime there"


def test_tags_are_fresh_while_upstream_is_up_and_resolve_while_it_is_down(
    upstream_cluster: Cluster,
    registry: Registry,
    test_images: TestImages,
    tmp_path: Path,
) -> None:
    first, second = test_images.multi_layer, test_images.docker_v2
    dirs = hosts_dirs(upstream_cluster, registry, tmp_path)
    node1, node2 = upstream_cluster.nodes[0], upstream_cluster.nodes[1]
    ref = first.push(registry.host, "fresh/app")
    node1.pull(ref, hosts_dir=dirs[0])
    assert node1.image_target(ref) == first.manifest_digest

    assert second.push(registry.host, "fresh/app") == ref  # the same tag, re-pushed
    node1.pull(ref, hosts_dir=dirs[0])
    assert node1.image_target(ref) == second.manifest_digest, "a stale tag was served"

    mirror1 = upstream_cluster.mirror(0)
    wait_until(
        lambda: mirror1.metric("mirror_advertised_keys", kind="tag") >= 1,
        "node 1 to announce the tag",
    )
    registry.stop()
    node1.pull(ref, hosts_dir=dirs[0])  # upstream down: from the node's own store
    node2.pull(ref, hosts_dir=dirs[1])  # upstream down: from the cluster
    assert_pulled(node2, ref, second)


def test_no_upstream_fallback_and_unmirrored_registries_are_404s(
    registry: Registry,
    mirror_factory: MirrorFactory,
    test_images: TestImages,
) -> None:
    image = test_images.index
    image.push(registry.host, "policy/app")
    ns = registry.host.replace(":", "%3A")
    path = f"/v2/policy/app/manifests/{image.tag}?ns={ns}"
    registry.clear_access_log()
    spegel_like = mirror_factory("--store=cache", "--upstream-fallback=false")
    assert status_of(spegel_like.url + path) == 404
    closed = mirror_factory(
        "--store=cache", upstream_flag(registry), "--mirrored-registries=ghcr.io"
    )
    assert status_of(closed.url + path) == 404
    assert status_of(closed.url + f"/v2/policy/app/blobs/{image.config_digest}?ns={ns}") == 404
    assert registry.requests() == [], "a 404 contacted the registry"
    open_node = mirror_factory("--store=cache", upstream_flag(registry))
    assert status_of(open_node.url + path) == 200


def test_path_prefix_names_the_registry(
    registry: Registry, mirror_factory: MirrorFactory, test_images: TestImages
) -> None:
    """`GET /v2/<registry>/<name>/...` without `ns`, the form dockerd users type."""
    image = test_images.docker_v2
    image.push(registry.host, "prefix/app")
    node = mirror_factory("--store=cache", "--upstream=ghcr.io=" + registry.url)
    url = f"{node.url}/v2/ghcr.io/prefix/app/manifests/{image.tag}"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.headers["Docker-Content-Digest"] == image.manifest_digest
        assert response.read() == image.blob_bytes(image.manifest_digest)


# --- a misbehaving upstream ----------------------------------------------------------------


class BadUpstream:
    """A registry that serves good manifests but corrupt or truncated blobs, on loopback."""

    def __init__(self, image: TestImage, mode: str) -> None:
        self.image = image
        self.mode = mode
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _manifest(self, request: web.Request) -> web.Response:
        body = self.image.blob_bytes(self.image.manifest_digest)
        headers = {"Docker-Content-Digest": self.image.manifest_digest}
        return web.Response(body=body, content_type=self.image.media_type, headers=headers)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        data = self.image.blob_bytes(request.match_info["digest"])
        if self.mode == "corrupt":
            return web.Response(body=data[:-1] + bytes([data[-1] ^ 1]))
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        assert request.transport is not None
        request.transport.abort()
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/v2/{name:.+}/manifests/{ref}", self._manifest)
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.mark.parametrize("mode", ["corrupt", "dropped"])
async def test_bad_upstream_bytes_never_reach_a_client_as_valid(
    mode: str, mirror_factory: MirrorFactory, test_images: TestImages
) -> None:
    import aiohttp

    image = test_images.multi_layer
    bad = BadUpstream(image, mode)
    await bad.start()
    try:
        node: MirrorNode = mirror_factory(
            "--store=cache", f"--upstream=bad.test=http://127.0.0.1:{bad.port}"
        )
        big = max(image.layer_digests, key=lambda d: image.blobs[d])
        url = f"{node.url}/v2/app/blobs/{big}?ns=bad.test"
        for _ in range(2):
            async with aiohttp.ClientSession() as http:
                try:
                    async with http.get(url) as response:
                        body = await response.read()
                except aiohttp.ClientPayloadError:
                    body = None
                else:
                    assert response.status != 200 or hashlib.sha256(body).hexdigest() == big[7:]
        cache = node.process.log_path.parent / "cache"
        assert not (cache / "blobs" / "sha256" / big[7:]).exists()
        assert list((cache / "tmp").iterdir()) == []
    finally:
        await bad.stop()


async def test_a_registry_demanding_tokens_is_pulled_through_with_credentials(
    tmp_path: Path,
    registry: Registry,
    containerd_factory: Callable[[], ContainerdNode],
    mirror_factory: MirrorFactory,
    test_images: TestImages,
) -> None:
    """containerd pulls through the mirror from a registry that only serves with a token."""
    import asyncio
    import base64

    from harness.token_server import TokenServer

    image = test_images.multi_layer
    image.push(registry.host, "auth/app")
    tokens = TokenServer(tmp_path / "token", users={"alice": "s3cret"}, allow_anonymous=False)
    base = tmp_path / "auth-registry"
    base.mkdir()
    (base / "storage").symlink_to(registry.storage_dir, target_is_directory=True)
    locked = Registry(base, extra_config=tokens.registry_config())
    auth_file = tmp_path / "config.json"
    secret = base64.b64encode(b"alice:s3cret").decode()
    auth_file.write_text(json.dumps({"auths": {locked.host: {"auth": secret}}}))
    async with tokens:
        await asyncio.to_thread(locked.start)
        try:
            node = await asyncio.to_thread(
                mirror_factory,
                "--store=cache",
                f"--upstream={locked.host}=http://{locked.host}",
                f"--registry-auth-file={auth_file}",
            )
            containerd = await asyncio.to_thread(containerd_factory)
            hosts_dir = tmp_path / "hosts"
            write_hosts_toml(hosts_dir, locked.host, locked.url, [node.url])
            ref = f"{locked.host}/auth/app:{image.tag}"
            await asyncio.to_thread(containerd.pull, ref, hosts_dir=hosts_dir)
            assert_pulled(containerd, ref, image)
            assert any(r.user == "alice" and r.status == 200 for r in tokens.requests)
            fetched = await asyncio.to_thread(
                node.metric, "mirror_upstream_token_fetches_total", result="ok"
            )
            assert 1 <= fetched <= 3, "tokens were not cached"
            served = await asyncio.to_thread(
                node.metric, "mirror_requests_total", kind="blob", status="200", source="upstream"
            )
            assert served >= len(image.layer_digests)
        finally:
            await asyncio.to_thread(locked.stop)
