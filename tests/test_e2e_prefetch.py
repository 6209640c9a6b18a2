"""Pinned images end to end: three containerd nodes and one dockerd node (classic store), each
with its mirror, one cluster, one distribution registry upstream. Every part is real.

One prefetch file on every node pins three images:

- `lib/a`, for every node;
- `lib/b`, for nodes labelled `role=edge` (containerd node 0 and the Docker node);
- `registry.internal:5000/infra/bb:v1`, an "expected" name whose registry is down (its
  upstream URL is a port nobody listens on), with `lib/c` as its source.

Every matching node ends with each image in its runtime's own store, each blob fetched from
upstream once for the whole cluster; with upstream stopped, containers start from the pinned
images on a containerd node and on the Docker node, the expected name is held everywhere, and a
pull of the expected name through a mirror succeeds on a node that lost its copy.
"""

from __future__ import annotations

import functools
import json
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness.cluster import Cluster, MirrorFactory, start_mixed_cluster, wait_until
from harness.containerd import ContainerdNode, write_hosts_toml
from harness.dockerd import DockerNode
from harness.images import TestImage, build_busybox
from harness.mirror_node import MirrorNode
from harness.net import free_port
from harness.registry import Registry

EXPECTED = "registry.internal:5000/infra/bb:v1"
NAMESPACE = "k8s.io"


@dataclass
class PrefetchCluster:
    registry: Registry
    cluster: Cluster
    docker: DockerNode
    docker_mirror: MirrorNode
    images: dict[str, TestImage]  # a, b, c
    refs: dict[str, str]  # a, b, c -> upstream reference
    prefetch_file: Path

    @property
    def mirrors(self) -> list[MirrorNode]:
        return [*self.cluster.running(), self.docker_mirror]


def prefetch_status(mirror: MirrorNode) -> dict[str, Any]:
    with urllib.request.urlopen(f"{mirror.url}/mirror/v1/prefetch", timeout=10) as response:
        document: dict[str, Any] = json.loads(response.read())
        return document


def held(mirror: MirrorNode, count: int) -> bool:
    images = prefetch_status(mirror)["images"]
    return len(images) == count and all(image["state"] == "held" for image in images)


@pytest.fixture
def prefetching(
    tmp_path: Path,
    registry: Registry,
    containerd_factory: Callable[[], ContainerdNode],
    dockerd_factory: Callable[..., DockerNode],
    mirror_factory: MirrorFactory,
) -> PrefetchCluster:
    images = {name: build_busybox(tmp_path / f"image-{name}", name=name) for name in "abc"}
    prefetch_file = tmp_path / "prefetch.toml"
    refs = {name: image.push(registry.host, f"lib/{name}") for name, image in images.items()}
    prefetch_file.write_text(
        f'[[image]]\nref = "{refs["a"]}"\n\n'
        f'[[image]]\nref = "{refs["b"]}"\nnodes = {{ role = "edge" }}\n\n'
        f'[[image]]\nref = "{EXPECTED}"\nsource = "{refs["c"]}"\n'
    )
    dead = free_port()  # the expected registry: nothing listens there
    common = (
        f"--prefetch-file={prefetch_file}",
        f"--upstream={registry.host}={registry.url}",
        f"--upstream=registry.internal:5000=http://127.0.0.1:{dead}",
        "--upstream-timeout=2s",
    )
    edge = ("--node-label=role=edge",)
    mixed = start_mixed_cluster(
        tmp_path,
        containerd_factory,
        dockerd_factory,
        mirror_factory,
        common,
        extra={0: edge, 3: edge},
    )
    cluster, docker, docker_mirror = mixed.cluster, mixed.docker, mixed.docker_mirror
    return PrefetchCluster(registry, cluster, docker, docker_mirror, images, refs, prefetch_file)


def test_pinned_images_reach_every_matching_runtime_and_run_with_upstream_down(
    prefetching: PrefetchCluster, tmp_path: Path
) -> None:
    p = prefetching
    edge = [p.cluster.mirror(0), p.docker_mirror]
    for mirror in p.mirrors:
        count = 3 if mirror in edge else 2
        wait_until(functools.partial(held, mirror, count), f"{mirror.address} to hold", 180)

    # In each runtime's own store, under the pinned names.
    for index, node in enumerate(p.cluster.nodes):
        names = set(node.images(NAMESPACE))
        assert {p.refs["a"], EXPECTED} <= names
        assert (p.refs["b"] in names) == (index == 0)
        assert node.image_target(p.refs["a"], NAMESPACE) == p.images["a"].manifest_digest
    for ref in (p.refs["a"], p.refs["b"], EXPECTED):
        p.docker.docker("image", "inspect", ref)

    # The expected name came from its source (and says so), or from a node that already
    # held it under that name: the cluster is asked before the source.
    statuses = [
        next(i for i in prefetch_status(mirror)["images"] if i["ref"] == EXPECTED)
        for mirror in p.mirrors
    ]
    assert {status["digest"] for status in statuses} == {p.images["c"].manifest_digest}
    through_source = [status for status in statuses if status["through_source"]]
    assert through_source, statuses
    for status in through_source:
        assert status["fetched"].startswith(f"{p.registry.host}/lib/c@")

    # Each blob from upstream once for the whole cluster.
    for image in p.images.values():
        for digest in [image.config_digest, *image.layer_digests]:
            assert p.registry.blob_fetch_count(digest) == 1, digest

    # Upstream gone: containers start from the pinned images.
    p.registry.stop()
    node = p.cluster.nodes[1]
    out = node.ctr(
        "run", "--rm", p.refs["a"], "pinned-a", "/bin/busybox", "echo", "ok", namespace=NAMESPACE
    )
    assert out.stdout.strip() == "ok"
    out = node.ctr(
        "run",
        "--rm",
        EXPECTED,
        "pinned-expected",
        "/bin/busybox",
        "echo",
        "ok",
        namespace=NAMESPACE,
    )
    assert out.stdout.strip() == "ok"
    out = p.docker.docker(
        "run", "--rm", "--network", "none", p.refs["b"], "/bin/busybox", "echo", "ok"
    )
    assert out.stdout.strip() == "ok"

    # A node that lost its copy pulls the expected name through its mirror (registry down,
    # source down): from the cluster.
    node = p.cluster.nodes[2]
    node.remove_image(EXPECTED, NAMESPACE)
    hosts_dir = tmp_path / "hosts"
    write_hosts_toml(
        hosts_dir, "registry.internal:5000", "http://127.0.0.1:9", [p.cluster.mirror(2).url]
    )
    node.pull(EXPECTED, hosts_dir=hosts_dir, namespace=NAMESPACE)
    assert node.image_target(EXPECTED, NAMESPACE) == p.images["c"].manifest_digest


def test_a_broken_prefetch_file_is_reported_and_the_pins_stay(
    prefetching: PrefetchCluster,
) -> None:
    p = prefetching
    mirror = p.cluster.mirror(1)
    wait_until(functools.partial(held, mirror, 2), f"{mirror.address} to hold", 180)
    good = p.prefetch_file.read_text()
    p.prefetch_file.write_text(good + '\n[[image]]\nref = "Not An Image"\n')

    def reported() -> bool:
        return prefetch_status(mirror)["origins"]["file"]["error"] is not None

    wait_until(reported, "the broken file to be reported", 30)
    error = prefetch_status(mirror)["origins"]["file"]["error"]
    header = len(good.splitlines()) + 2  # after a blank line
    assert error.startswith(f"{p.prefetch_file}:{header}: ref 'Not An Image' is not an image")
    assert held(mirror, 2)  # the previous pins stay, and the node serves
    url = f"{mirror.url}/v2/lib/a/manifests/v1?ns={p.registry.host.replace(':', '%3A')}"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
