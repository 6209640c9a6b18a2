"""Peer to peer with the real parts: four containerd nodes on distinct loopback addresses.

Only node 1 holds the images; the upstream registry is stopped; nodes 2-4 pull through their own
mirror, which finds node 1 through the authenticated DHT and streams from it.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness.cluster import (
    HOSTS,
    Cluster,
    MirrorFactory,
    make_cluster,
    status_of,
    wait_until,
)
from harness.containerd import ContainerdNode, write_hosts_toml
from harness.images import TestImages
from harness.mirror_node import MirrorNode
from harness.net import free_udp_port
from harness.netns import NetNamespace, make_namespace
from harness.registry import Registry


@pytest.fixture
def cluster(
    tmp_path: Path,
    registry: Registry,
    containerd_factory: Callable[[], ContainerdNode],
    test_images: TestImages,
) -> Cluster:
    nodes = [containerd_factory() for _ in HOSTS]
    for image in test_images.all():
        nodes[0].pull(image.push(registry.host, f"p2p/{image.name}"), plain_http=True)
    return make_cluster(tmp_path, nodes)


def wait_for_cluster(cluster: Cluster, digest: str) -> None:
    """Every running mirror knows the others, and each can find `digest` (node 1 holds it)."""
    cluster.wait_connected()
    for mirror in cluster.running()[1:]:
        url = f"{mirror.url}/v2/p2p/any/blobs/{digest}"
        wait_until(lambda url=url: status_of(url) == 200, f"{digest} to be found from {url}")


def test_three_nodes_pull_from_the_one_that_has_the_image(
    cluster: Cluster,
    mirror_factory: MirrorFactory,
    registry: Registry,
    test_images: TestImages,
    tmp_path: Path,
) -> None:
    for index in range(len(HOSTS)):
        cluster.start_mirror(mirror_factory, index)
    wait_for_cluster(cluster, test_images.multi_layer.manifest_digest)
    registry.stop()

    for index in (1, 2, 3):
        hosts_dir = tmp_path / f"hosts{index}"
        write_hosts_toml(hosts_dir, registry.host, registry.url, [cluster.mirror(index).url])
        for image in test_images.all():
            ref = f"{registry.host}/p2p/{image.name}:{image.tag}"
            cluster.nodes[index].pull(ref, hosts_dir=hosts_dir)
            assert cluster.nodes[index].image_target(ref) == image.manifest_digest
            for digest in image.host_blobs:
                path = cluster.nodes[index].blob_path(digest)
                assert path.read_bytes() == image.blob_bytes(digest), digest
    node2 = cluster.mirror(1)
    # Blobs from peers: relayed (200) or, a containerd node's default, redirected (307).
    from_peers = sum(
        node2.metric("mirror_requests_total", kind="blob", status=status, source="peer")
        for status in ("200", "307")
    )
    assert from_peers > 0
    assert node2.metric("mirror_requests_total", kind="manifest", status="200", source="peer") > 0
    assert node2.metric("mirror_peer_lookup_duration_seconds_count", result="found") > 0
    # A containerd node sends its runtime to the holder by default (--peer-transfer=auto).
    assert node2.metric("mirror_peer_redirects_total", result="sent") > 0


def test_a_peer_dying_mid_blob_does_not_break_the_stream(
    cluster: Cluster,
    mirror_factory: MirrorFactory,
    registry: Registry,
    test_images: TestImages,
) -> None:
    """Nodes 1 and 2 hold the image; node 3 streams the big layer; whoever serves it is killed.

    The share path: node 3's mirror fetches from a peer and relays (a containerd node would
    redirect its runtime by default, which `tests/test_e2e_redirect.py` kills mid-blob)."""
    image = test_images.multi_layer
    cluster.nodes[1].pull(f"{registry.host}/p2p/{image.name}:{image.tag}", plain_http=True)
    for index in range(3):
        cluster.start_mirror(mirror_factory, index, "--peer-transfer=share")
    big = max(image.layer_digests, key=lambda d: image.blobs[d])
    registry.stop()
    for index in (0, 1):
        source = cluster.mirror(index)
        wait_until(
            lambda s=source: s.metric("mirror_advertised_keys", kind="digest") >= len(image.blobs),
            f"node {index + 1} to announce the image",
        )
    wait_for_cluster(cluster, big)

    reader = cluster.mirror(2)
    hasher = hashlib.sha256()
    received = 0
    with urllib.request.urlopen(f"{reader.url}/v2/p2p/x/blobs/{big}", timeout=60) as response:
        assert int(response.headers["Content-Length"]) == image.blobs[big]
        first = response.read(4 * 1024 * 1024)
        hasher.update(first)
        received += len(first)
        serving = _serving_peer(reader, big)
        victim = next(m for m in cluster.mirrors[:2] if m is not None and m.address == serving)
        os.kill(victim.process.pid or 0, signal.SIGKILL)
        while chunk := response.read(1024 * 1024):
            hasher.update(chunk)
            received += len(chunk)
    assert received == image.blobs[big]
    assert "sha256:" + hasher.hexdigest() == big
    assert reader.metric("mirror_peer_fetch_failures_total", reason="broken") >= 1


def _serving_peer(mirror: MirrorNode, digest: str) -> str:
    pattern = re.compile(rf"streaming {re.escape(digest)} from (\S+)")
    wait_until(lambda: bool(pattern.search(mirror.process.log_text())), "the stream to start")
    return pattern.findall(mirror.process.log_text())[-1]


@pytest.fixture
def namespace() -> Iterator[NetNamespace]:
    created = make_namespace()
    yield created
    created.remove()


def test_outsiders_are_refused(
    cluster: Cluster,
    mirror_factory: MirrorFactory,
    test_images: TestImages,
    namespace: NetNamespace,
) -> None:
    """A client that is neither loopback nor allowed gets 403; a bad peer signature gets 401."""
    digest = test_images.multi_layer.manifest_digest
    open_node = mirror_factory(
        "--store=containerd",
        f"--containerd-sock={cluster.nodes[0].socket}",
        f"--cluster-key-file={cluster.key_file}",
        f"--router-addr={namespace.host_ip}:{free_udp_port(namespace.host_ip)}",
        host=namespace.host_ip,
    )
    url = f"{open_node.url}/v2/p2p/multi_layer/manifests/{digest}"
    assert namespace.http_status(url) == 403
    forged = {"X-Mirror-Peer": f"v1 {int(time.time() * 1000)} abcd {'A' * 44}"}
    assert namespace.http_status(url, forged) == 401
    assert status_of(url, forged) == 401
    assert status_of(url) == 200, "this host, dialling the node's own address, is refused"
    assert open_node.metric("mirror_refused_requests_total", reason="denied") == 1
    assert open_node.metric("mirror_refused_requests_total", reason="unauthorized") == 2

    allowing = mirror_factory(
        "--store=containerd",
        f"--containerd-sock={cluster.nodes[0].socket}",
        f"--allow-client={namespace.inner_ip}/32",
        host=namespace.host_ip,
    )
    assert namespace.http_status(f"{allowing.url}/v2/p2p/multi_layer/manifests/{digest}") == 200


def test_a_replayed_peer_request_is_refused(
    cluster: Cluster, mirror_factory: MirrorFactory, test_images: TestImages
) -> None:
    from mirror.clusterkey import ClusterKey
    from mirror.peers.auth import RequestSigner

    node = cluster.start_mirror(mirror_factory, 0)
    path = f"/v2/p2p/multi_layer/manifests/{test_images.multi_layer.manifest_digest}"
    signature = RequestSigner(ClusterKey.load(cluster.key_file)).sign("HEAD", path)
    assert status_of(node.url + path, {"X-Mirror-Peer": signature}) == 200
    assert status_of(node.url + path, {"X-Mirror-Peer": signature}) == 401
    other = RequestSigner(ClusterKey.from_text(ClusterKey.generate())).sign("HEAD", path)
    assert status_of(node.url + path, {"X-Mirror-Peer": other}) == 401


def test_pulls_and_removals_are_announced_and_withdrawn_at_once(
    cluster: Cluster,
    mirror_factory: MirrorFactory,
    registry: Registry,
    test_images: TestImages,
) -> None:
    """Node 2 pulls while its mirror runs: containerd's events make it announce at once.

    A blob, not a manifest, is probed: manifests fetched by digest are kept in the node cache.
    """
    image = test_images.index
    announcer = cluster.start_mirror(mirror_factory, 1, "--upstream-fallback=false")
    seeker = cluster.start_mirror(mirror_factory, 2, "--upstream-fallback=false")
    url = f"{seeker.url}/v2/p2p/index/blobs/{image.config_digest}"
    assert status_of(url) == 404
    ref = f"{registry.host}/p2p/{image.name}:{image.tag}"
    cluster.nodes[1].pull(ref, plain_http=True)
    wait_until(lambda: status_of(url) == 200, "the pulled image to be found")
    assert announcer.metric("mirror_advertised_keys", kind="tag") == 1

    cluster.nodes[1].remove_image(ref)
    wait_until(
        lambda: announcer.metric("mirror_advertised_keys", kind="digest") == 0,
        "the removed image to be withdrawn",
    )
    assert status_of(url) == 404


def test_dns_bootstrap_through_a_real_dnsmasq(
    cluster: Cluster,
    mirror_factory: MirrorFactory,
    test_images: TestImages,
    tmp_path: Path,
) -> None:
    from harness.dnsmasq import DOMAIN, Dnsmasq

    port = _udp_port_free_on(HOSTS[:2])
    name = f"mirror-peers.{DOMAIN}"
    dns = Dnsmasq(tmp_path / "dnsmasq", {name: HOSTS[:2]})
    dns.start()
    try:
        mirrors = [
            mirror_factory(
                "--store=containerd",
                f"--containerd-sock={cluster.nodes[index].socket}",
                f"--cluster-key-file={cluster.key_file}",
                f"--router-addr={HOSTS[index]}:{port}",
                f"--bootstrap=dns:{name}",
                f"--dns-server={dns.host}:{dns.port}",
                "--resolve-timeout=200ms",
                host=HOSTS[index],
            )
            for index in (0, 1)
        ]
        digest = test_images.multi_layer.config_digest
        url = f"{mirrors[1].url}/v2/p2p/x/blobs/{digest}"
        wait_until(lambda: status_of(url) == 200, "node 2 to find node 1 through DNS")
        assert f"query[A] {name}" in dns.process.log_text()
    finally:
        dns.stop()


def _udp_port_free_on(hosts: list[str]) -> int:
    import socket

    for _ in range(50):
        port = free_udp_port(hosts[0])
        sockets = []
        try:
            for host in hosts:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sockets.append(sock)
                sock.bind((host, port))
            return port
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no UDP port free on every host")
