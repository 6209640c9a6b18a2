"""Sanity checks of the real-daemon harness itself.

If these fail, every end-to-end test of the mirror is meaningless: the images must keep
their digests through a registry, containerd must pull them from it, and the access log
must count what was fetched.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness.containerd import ContainerdNode, write_hosts_toml
from harness.images import OCI_INDEX, TestImages, inspect_raw, sha256_digest
from harness.net import free_port
from harness.registry import Registry


def test_push_preserves_digests_and_containerd_pulls(
    test_images: TestImages,
    registry: Registry,
    containerd_factory: Callable[[], ContainerdNode],
) -> None:
    refs = {}
    for image in test_images.all():
        ref = image.push(registry.host, f"harness/{image.name}")
        refs[image.name] = ref
        raw = inspect_raw(ref)
        assert sha256_digest(raw) == image.manifest_digest, image.name
        assert raw == image.blob_bytes(image.manifest_digest), image.name

    node = containerd_factory()
    for image in test_images.all():
        ref = refs[image.name]
        node.pull(ref, plain_http=True)
        assert node.image_target(ref) == image.manifest_digest, image.name
        for digest, size in image.host_blobs.items():
            path = node.blob_path(digest)
            assert path.is_file(), f"{image.name}: {digest} not in {node.content_dir}"
            assert path.stat().st_size == size, f"{image.name}: {digest} size"

    # A linux/amd64 pull leaves the arm64 half of the index alone, so host_blobs is exact.
    index = test_images.index
    assert index.media_type == OCI_INDEX
    others = set(index.blobs) - set(index.host_blobs)
    assert others, "index image has no non-host blobs"
    assert not any(node.has_blob(d) for d in others)

    big = max(test_images.multi_layer.layer_digests, key=test_images.multi_layer.blobs.__getitem__)
    assert test_images.multi_layer.blobs[big] >= 64 * 1024 * 1024
    assert registry.blob_fetch_count(big) == 1


def test_nodes_side_by_side_hosts_dir_and_registry_restart(
    tmp_path: Path,
    test_images: TestImages,
    registry: Registry,
    registry_factory: Callable[..., Registry],
    containerd_factory: Callable[[], ContainerdNode],
) -> None:
    image = test_images.docker_v2
    ref = image.push(registry.host, "harness/restart")
    mirror = registry_factory()
    image.push(mirror.host, "harness/restart")
    port = registry.port
    registry.stop()
    registry.start()
    assert registry.port == port
    registry.clear_access_log()
    mirror.clear_access_log()

    first, second = containerd_factory(), containerd_factory()
    assert first.socket != second.socket
    dead = f"http://127.0.0.1:{free_port()}"

    # A dead mirror is skipped, the live one serves; it sees ?ns=<upstream host>.
    via_mirror = tmp_path / "hosts-mirror"
    write_hosts_toml(via_mirror, registry.host, registry.url, [dead, mirror.url])
    first.pull(ref, hosts_dir=via_mirror)
    assert mirror.blob_fetch_count(image.config_digest) == 1
    assert registry.blob_fetch_count(image.config_digest) == 0
    ns = "ns=" + registry.host.replace(":", "%3A")
    assert all(ns in entry.uri for entry in mirror.requests())

    # With every mirror down, containerd falls back to the server.
    dead_only = tmp_path / "hosts-dead"
    write_hosts_toml(dead_only, registry.host, registry.url, [dead])
    second.pull(ref, hosts_dir=dead_only)
    assert registry.blob_fetch_count(image.config_digest) == 1

    for node in (first, second):
        assert node.image_target(ref) == image.manifest_digest
        assert all(node.has_blob(digest) for digest in image.host_blobs)

    first.tag(ref, "example.test/alias:v1")
    assert first.image_target("example.test/alias:v1") == image.manifest_digest
