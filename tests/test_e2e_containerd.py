"""End to end with the real parts: a containerd node pulls through another node's mirror.

Node A's containerd pulls the test images from a distribution registry; `mirror run --store
containerd` serves node A; the registry is stopped; node B's containerd pulls with a hosts.toml
whose mirror is node A's mirror. Anything not served correctly by the mirror fails the pull.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from harness.containerd import ContainerdNode, write_hosts_toml
from harness.images import TestImages, run_skopeo
from harness.mirror_node import MirrorNode
from harness.registry import Registry

MirrorFactory = Callable[..., MirrorNode]


@pytest.fixture
def node_a_with_images(
    registry: Registry,
    containerd_factory: Callable[[], ContainerdNode],
    test_images: TestImages,
) -> tuple[ContainerdNode, dict[str, str]]:
    """Node A holding every test image pulled from the registry; returns name -> reference."""
    node_a = containerd_factory()
    refs = {}
    for image in test_images.all():
        refs[image.name] = image.push(registry.host, f"e2e/{image.name}")
        node_a.pull(refs[image.name], plain_http=True)
    return node_a, refs


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_node_b_pulls_from_node_a_with_the_upstream_stopped(
    registry: Registry,
    node_a_with_images: tuple[ContainerdNode, dict[str, str]],
    containerd_factory: Callable[[], ContainerdNode],
    mirror_factory: MirrorFactory,
    test_images: TestImages,
    tmp_path: Path,
) -> None:
    node_a, refs = node_a_with_images
    mirror = mirror_factory("--store=containerd", f"--containerd-sock={node_a.socket}")
    registry.stop()

    node_b = containerd_factory()
    hosts_dir = tmp_path / "hosts"
    write_hosts_toml(hosts_dir, registry.host, registry.url, [mirror.url])
    for image in test_images.all():
        ref = refs[image.name]
        node_b.pull(ref, hosts_dir=hosts_dir)
        assert node_b.image_target(ref) == image.manifest_digest
        for digest in image.host_blobs:
            assert node_b.blob_path(digest).read_bytes() == image.blob_bytes(digest), digest

    served = sum(image.host_blobs[d] for image in test_images.all() for d in image.host_blobs)
    sent = mirror.metric("mirror_served_bytes_total", kind="blob", source="local")
    sent += mirror.metric("mirror_served_bytes_total", kind="manifest", source="local")
    assert sent >= served
    assert mirror.metric("mirror_requests_total", kind="blob", status="200", source="local") > 0
    # containerd named the registry in `ns`, with the port's colon escaped.
    assert f"ns={registry.host.replace(':', '%3A')}" in mirror.process.log_text()


def test_skopeo_inspects_and_copies_through_the_mirror(
    node_a_with_images: tuple[ContainerdNode, dict[str, str]],
    mirror_factory: MirrorFactory,
    test_images: TestImages,
    tmp_path: Path,
) -> None:
    """Without `ns` a request means docker.io, so node A also names the images there."""
    node_a, refs = node_a_with_images
    for image in test_images.all():
        node_a.tag(refs[image.name], f"docker.io/e2e/{image.name}:{image.tag}")
    mirror = mirror_factory("--store=containerd", f"--containerd-sock={node_a.socket}")

    for image in test_images.all():
        source = f"docker://{mirror.address}/e2e/{image.name}:{image.tag}"
        inspected = json.loads(run_skopeo("inspect", "--tls-verify=false", source).stdout)
        assert inspected["Digest"] == image.manifest_digest
        raw = run_skopeo("inspect", "--raw", "--tls-verify=false", source).stdout.encode()
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == image.manifest_digest

    image = test_images.multi_layer
    target = tmp_path / "copied"
    run_skopeo(
        "copy",
        "--src-tls-verify=false",
        "--preserve-digests",
        f"docker://{mirror.address}/e2e/{image.name}@{image.manifest_digest}",
        f"dir:{target}",
    )
    for digest in image.layer_digests:
        assert (target / digest.split(":")[1]).read_bytes() == image.blob_bytes(digest)


def test_blob_ranges_and_head_from_containerd(
    node_a_with_images: tuple[ContainerdNode, dict[str, str]],
    mirror_factory: MirrorFactory,
    test_images: TestImages,
) -> None:
    node_a, _ = node_a_with_images
    mirror = mirror_factory("--store=containerd", f"--containerd-sock={node_a.socket}")
    _assert_serves_ranges(mirror, test_images)


def test_content_api_stream_when_the_directory_is_unreadable(
    node_a_with_images: tuple[ContainerdNode, dict[str, str]],
    mirror_factory: MirrorFactory,
    test_images: TestImages,
    tmp_path: Path,
) -> None:
    """A content path the mirror cannot read makes it stream through Content.Read instead."""
    node_a, _ = node_a_with_images
    mirror = mirror_factory(
        "--store=containerd",
        f"--containerd-sock={node_a.socket}",
        f"--containerd-content-path={tmp_path / 'not-there'}",
    )
    _assert_serves_ranges(mirror, test_images)
    assert "streaming blobs through containerd's API" in mirror.process.log_text()


def _assert_serves_ranges(mirror: MirrorNode, test_images: TestImages) -> None:
    image = test_images.multi_layer
    big = max(image.layer_digests, key=lambda d: image.blobs[d])
    data = image.blob_bytes(big)
    url = f"{mirror.url}/v2/e2e/multi/blobs/{big}"
    status, headers, body = get(url)
    assert status == 200 and body == data
    assert headers["Docker-Content-Digest"] == big
    status, headers, body = get(url, {"Range": "bytes=1000000-2999999"})
    assert status == 206 and body == data[1000000:3000000]
    assert headers["Content-Range"] == f"bytes 1000000-2999999/{len(data)}"
    status, headers, body = get(url, {"Range": f"bytes={len(data) - 7}-"})
    assert status == 206 and body == data[-7:]
    status, _, body = get(url, {"Range": f"bytes={len(data)}-"})
    assert status == 416 and json.loads(body)["errors"][0]["code"] == "RANGE_INVALID"
    manifest_url = f"{mirror.url}/v2/e2e/multi/manifests/{image.manifest_digest}?ns=example.org"
    status, headers, body = get(manifest_url)
    assert status == 200 and headers["Content-Type"] == image.media_type
    assert body == image.blob_bytes(image.manifest_digest)


def test_only_this_namespace_is_served(
    node_a_with_images: tuple[ContainerdNode, dict[str, str]],
    mirror_factory: MirrorFactory,
    test_images: TestImages,
) -> None:
    """The blob directory is shared by all namespaces: presence must come from the API."""
    node_a, refs = node_a_with_images
    image = test_images.multi_layer
    assert node_a.has_blob(image.layer_digests[0])
    mirror = mirror_factory(
        "--store=containerd",
        f"--containerd-sock={node_a.socket}",
        "--containerd-namespace=elsewhere",
    )
    status, _, body = get(f"{mirror.url}/v2/e2e/multi/blobs/{image.layer_digests[0]}")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    registry_host = refs[image.name].split("/")[0]
    status, _, body = get(f"{mirror.url}/v2/e2e/multi/manifests/{image.tag}?ns={registry_host}")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"


def test_removed_image_is_no_longer_served(
    node_a_with_images: tuple[ContainerdNode, dict[str, str]],
    mirror_factory: MirrorFactory,
    test_images: TestImages,
) -> None:
    node_a, refs = node_a_with_images
    image = test_images.docker_v2
    mirror = mirror_factory("--store=containerd", f"--containerd-sock={node_a.socket}")
    registry_host = refs[image.name].split("/")[0]
    tag_url = f"{mirror.url}/v2/e2e/{image.name}/manifests/{image.tag}?ns={registry_host}"
    status, headers, _ = get(tag_url)
    assert status == 200 and headers["Docker-Content-Digest"] == image.manifest_digest
    assert headers["Content-Type"] == image.media_type
    node_a.remove_image(refs[image.name])
    assert get(tag_url)[0] == 404
    assert get(f"{mirror.url}/v2/e2e/x/blobs/{image.config_digest}")[0] == 404


def test_pull_fails_over_to_server_when_the_mirror_lacks_content(
    registry: Registry,
    containerd_factory: Callable[[], ContainerdNode],
    mirror_factory: MirrorFactory,
    test_images: TestImages,
    tmp_path: Path,
) -> None:
    """A mirror answering 404 is skipped by containerd, which then uses `server`."""
    image = test_images.index
    ref = image.push(registry.host, "e2e/fallback")
    empty = mirror_factory("--store=cache")
    node = containerd_factory()
    hosts_dir = tmp_path / "hosts"
    write_hosts_toml(hosts_dir, registry.host, registry.url, [empty.url])
    node.pull(ref, hosts_dir=hosts_dir)
    assert node.image_target(ref) == image.manifest_digest
    assert empty.metric("mirror_requests_total", kind="manifest", status="404", source="none") > 0


def test_containerd_going_away_is_a_503_and_not_ready(
    node_a_with_images: tuple[ContainerdNode, dict[str, str]],
    mirror_factory: MirrorFactory,
    test_images: TestImages,
) -> None:
    node_a, _ = node_a_with_images
    mirror = mirror_factory("--store=containerd", f"--containerd-sock={node_a.socket}")
    node_a.stop()
    status, _, body = get(f"{mirror.url}/v2/e2e/x/blobs/{test_images.index.config_digest}")
    assert status == 503 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert get(f"{mirror.url}/readyz")[0] == 503
    assert get(f"{mirror.url}/healthz")[0] == 200
    assert "Traceback" not in mirror.process.log_text()
