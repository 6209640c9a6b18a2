"""Docker Engine nodes pulling through their mirrors, with every part real.

Two dockerd "machines", each with its own mirror as its ``registry-mirrors`` entry; the two
mirrors form one cluster on distinct loopback addresses and fetch ``docker.io`` from a plain
distribution registry. dockerd's classic store keeps no registry bytes, so a mirror on a Docker
node serves what passed through its own cache (see ``mirror.stores.docker``): the first node's
pull fills its mirror's cache from upstream, and with upstream gone the second node's pull is
answered from that cache through the cluster.

dockerd applies ``registry-mirrors`` to ``docker.io`` only; other registries reach a mirror in
the path-prefix form ``MIRROR/<registry>/<repository>:<tag>``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness.cluster import HOSTS, MirrorFactory, keygen, wait_until
from harness.dockerd import DockerNode
from harness.images import TestImage, TestImages
from harness.mirror_node import MirrorNode
from harness.net import free_udp_port
from harness.registry import Registry

DockerFactory = Callable[..., DockerNode]

# The User-Agent mirror sends upstream (mirror.upstream.client).
MIRROR_USER_AGENT = "mirror/"
# gorilla/handlers' combined log line: request line, status, size, referer, user agent.
_ACCESS_LINE = re.compile(
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) [^"]*" (?P<status>\d{3}) \S+ "[^"]*" "(?P<agent>[^"]*)"'
)


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    path: str
    status: int
    agent: str


def upstream_requests(registry: Registry) -> list[UpstreamRequest]:
    """The registry's access log with each request's User-Agent (``requests()`` drops it)."""
    found = []
    for line in registry.access_log(sync=registry.running):
        match = _ACCESS_LINE.search(line)
        assert match is not None, line
        path = match["uri"].split("?", 1)[0]
        found.append(UpstreamRequest(match["method"], path, int(match["status"]), match["agent"]))
    return found


def set_registry_mirror(node: DockerNode, mirror: MirrorNode) -> None:
    """Make ``mirror`` the daemon's ``registry-mirrors`` entry and reload the daemon.

    A mirror with ``--store=docker`` needs its dockerd running first, and the mirror's port is
    only known once it runs: the entry is added the way an operator would, by editing
    ``daemon.json`` and sending SIGHUP (``registry-mirrors`` is reloaded live).
    """
    config_path = node.base_dir / "daemon.json"
    config = json.loads(config_path.read_text())
    config["registry-mirrors"] = [mirror.url]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    assert node.process.pid is not None
    os.kill(node.process.pid, signal.SIGHUP)
    wanted = [mirror.url + "/"]

    def reloaded() -> bool:
        out = node.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout
        return bool(json.loads(out) == wanted)

    wait_until(reloaded, f"dockerd {node.socket} to use mirror {mirror.url}")


def mirror_log(mirror: MirrorNode) -> str:
    return mirror.process.log_text()


# A log record starts with its timestamp; a traceback belongs to the record above it.
_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", re.MULTILINE)
# dockerd tries TLS first on a registry it reaches by name (the path-prefix form), then plain
# HTTP. aiohttp answers the ClientHello with a 400 and, at --log-level=debug only, logs the
# parser's exception with its traceback: aiohttp's own debug output, not a mirror failure.
_TLS_PROBE = (
    "DEBUG aiohttp.server: Error handling request",
    "Received HTTPS traffic on an HTTP port",
)


def assert_no_traceback(mirror: MirrorNode) -> None:
    """No exception escaped anywhere in the mirror (aiohttp's debug note on TLS probes aside)."""
    text = mirror_log(mirror)
    # Anything before the first record (output without a timestamp) is checked as well.
    starts = sorted({0, len(text), *(m.start() for m in _LOG_RECORD.finditer(text))})
    records = [text[a:b] for a, b in itertools.pairwise(starts)]
    bad = [r for r in records if "Traceback" in r and not all(part in r for part in _TLS_PROBE)]
    assert bad == [], "".join(bad)[-4000:]


def blob_digests(image: TestImage) -> list[str]:
    """The blobs dockerd fetches for the host platform: config and layers."""
    return [image.config_digest, *image.layer_digests]


@dataclass
class DockerCluster:
    docker: list[DockerNode]
    mirrors: list[MirrorNode]


def start_docker_cluster(
    tmp_path: Path,
    store: str,
    registry: Registry,
    mirror_factory: MirrorFactory,
    dockerd_factory: DockerFactory,
) -> DockerCluster:
    key_file = tmp_path / "cluster.key"
    keygen(key_file)
    hosts = HOSTS[:2]
    routers = [f"{host}:{free_udp_port(host)}" for host in hosts]
    docker_nodes: list[DockerNode] = []
    mirrors: list[MirrorNode] = []
    for index, host in enumerate(hosts):
        node = dockerd_factory()
        store_flags = [f"--store={store}"]
        if store == "docker":
            store_flags.append(f"--docker-host={node.host}")
        mirror = mirror_factory(
            *store_flags,
            f"--upstream=docker.io={registry.url}",
            f"--cluster-key-file={key_file}",
            f"--router-addr={routers[index]}",
            f"--bootstrap=static:{','.join(routers)}",
            "--resolve-timeout=200ms",
            host=host,
        )
        set_registry_mirror(node, mirror)
        docker_nodes.append(node)
        mirrors.append(mirror)
    for mirror in mirrors:
        wait_until(
            lambda m=mirror: m.metric("mirror_dht_contacts") >= len(mirrors) - 1,
            f"{mirror.address} to know its peer",
        )
    return DockerCluster(docker_nodes, mirrors)


@pytest.mark.parametrize(
    ("store", "image_name"),
    [("docker", "docker_v2"), ("cache", "multi_layer")],
    ids=["docker-store-docker-v2", "cache-store-oci"],
)
def test_second_docker_node_pulls_from_the_first_when_upstream_is_gone(
    store: str,
    image_name: str,
    tmp_path: Path,
    registry: Registry,
    test_images: TestImages,
    mirror_factory: MirrorFactory,
    dockerd_factory: DockerFactory,
) -> None:
    image: TestImage = getattr(test_images, image_name)
    image.push(registry.host, "library/app")
    registry.clear_access_log()
    cluster = start_docker_cluster(tmp_path, store, registry, mirror_factory, dockerd_factory)
    (docker1, docker2), (mirror1, mirror2) = cluster.docker, cluster.mirrors
    if store == "docker":
        for mirror in cluster.mirrors:
            assert "keeps images in its classic store" in mirror_log(mirror)

    # Node 1: a cold pull, through its mirror, from upstream.
    docker1.pull("app:v1")
    assert docker1.repo_digests("app:v1") == [f"app@{image.manifest_digest}"]
    assert docker1.image_ids() == [image.config_digest]
    blobs = blob_digests(image)
    from_upstream = mirror1.metric(
        "mirror_requests_total", method="GET", kind="blob", status="200", source="upstream"
    )
    assert from_upstream == len(blobs)
    requests = upstream_requests(registry)
    assert requests, "the pull never reached upstream"
    foreign = [r for r in requests if not r.agent.startswith(MIRROR_USER_AGENT)]
    assert foreign == [], "upstream was asked by someone else than the mirror"
    fetched = sorted(r.path for r in requests if r.method == "GET" and "/blobs/" in r.path)
    assert fetched == sorted(f"/v2/library/app/blobs/{d}" for d in blobs)
    assert mirror2.metric("mirror_requests_total", method="GET", kind="blob", status="200") == 0

    wait_until(
        lambda: mirror1.metric("mirror_advertised_keys", kind="tag") >= 1,
        "node 1's mirror to announce the tag",
    )
    wait_until(
        lambda: mirror1.metric("mirror_advertised_keys", kind="digest") >= len(blobs) + 1,
        "node 1's mirror to announce the manifest and blobs",
    )
    registry.stop()

    # Node 2: upstream is down; the tag, the manifest and every blob come from node 1's cache.
    docker2.pull("app:v1")
    assert docker2.image_ids() == docker1.image_ids()
    assert docker2.repo_digests("app:v1") == [f"app@{image.manifest_digest}"]
    from_peer = mirror2.metric(
        "mirror_requests_total", method="GET", kind="blob", status="200", source="peer"
    )
    assert from_peer == len(blobs)
    assert (
        mirror2.metric(
            "mirror_requests_total", method="GET", kind="blob", status="200", source="upstream"
        )
        == 0
    )
    served_to_peer = mirror1.metric(
        "mirror_requests_total", method="GET", kind="blob", status="200", source="local"
    )
    assert served_to_peer == len(blobs)
    assert len(upstream_requests(registry)) == len(requests), "upstream was asked again"
    for mirror in cluster.mirrors:
        assert_no_traceback(mirror)


def test_path_prefix_pull_of_a_registry_dockerd_never_mirrors(
    registry: Registry,
    test_images: TestImages,
    mirror_factory: MirrorFactory,
    dockerd_factory: DockerFactory,
) -> None:
    """``docker pull MIRROR/ghcr.io/team/app:v1``: the first path segment names the registry."""
    image = test_images.index
    image.push(registry.host, "team/app")
    registry.clear_access_log()
    mirror = mirror_factory("--store=cache", f"--upstream=ghcr.io={registry.url}")
    node = dockerd_factory()  # 127.0.0.0/8 is an insecure registry range by default

    ref = f"{mirror.address}/ghcr.io/team/app:v1"
    node.pull(ref)
    assert node.repo_digests(ref) == [f"{mirror.address}/ghcr.io/team/app@{image.manifest_digest}"]
    assert node.image_ids() == [image.config_digest]
    requests = upstream_requests(registry)
    assert requests and all(r.agent.startswith(MIRROR_USER_AGENT) for r in requests), requests
    assert all(r.path == "/v2/" or r.path.startswith("/v2/team/app/") for r in requests)
    fetched = sorted(r.path for r in requests if r.method == "GET" and "/blobs/" in r.path)
    assert fetched == sorted(f"/v2/team/app/blobs/{d}" for d in blob_digests(image))
    assert_no_traceback(mirror)


def oci_error(url: str) -> tuple[int, str, Any]:
    """Status, Content-Type and JSON body of an error answer to GET ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            raise AssertionError(f"{url} answered {response.status}")
    except urllib.error.HTTPError as error:
        body = json.loads(error.read())
        return error.code, error.headers.get("Content-Type", ""), body


def test_pull_of_a_tag_upstream_lacks_fails_cleanly(
    registry: Registry,
    test_images: TestImages,
    mirror_factory: MirrorFactory,
    dockerd_factory: DockerFactory,
) -> None:
    """A missing tag: the mirror answers an OCI 404 (no traceback), dockerd reports an error."""
    test_images.docker_v2.push(registry.host, "library/app")
    mirror = mirror_factory(
        "--store=cache",
        f"--upstream=docker.io={registry.url}",
        f"--upstream=ghcr.io={registry.url}",
    )
    node = dockerd_factory(registry_mirrors=[mirror.url])

    # Through registry-mirrors: the mirror's 404 sends dockerd on to Docker Hub, which is not
    # reachable here, so the pull fails either way; what matters is the mirror's answer.
    proc = node.docker("pull", "app:nope", check=False, timeout=60)
    assert proc.returncode != 0, proc.stdout
    assert node.image_ids() == []
    # The same request dockerd made, asked again: a 404 in OCI error JSON.
    status, content_type, body = oci_error(f"{mirror.url}/v2/library/app/manifests/nope")
    assert status == 404
    assert content_type.startswith("application/json")
    assert [e["code"] for e in body["errors"]] == ["MANIFEST_UNKNOWN"], body
    assert mirror.metric("mirror_requests_total", kind="manifest", status="404") >= 1
    # dockerd read the mirror's error (code and message) before moving on to Docker Hub.
    assert "manifest unknown: docker.io/library/app:nope" in node.log_path.read_text()

    # Path-prefix form: no fallback, dockerd reports the mirror's error itself.
    ref = f"{mirror.address}/ghcr.io/library/app:nope"
    proc = node.docker("pull", ref, check=False, timeout=60)
    assert proc.returncode != 0, proc.stdout
    assert "manifest unknown" in proc.stderr.lower(), proc.stderr
    upstream_heads = [
        r
        for r in upstream_requests(registry)
        if r.path == "/v2/library/app/manifests/nope" and r.agent.startswith(MIRROR_USER_AGENT)
    ]
    assert upstream_heads and all(r.status == 404 for r in upstream_heads), upstream_heads
    assert_no_traceback(mirror)
