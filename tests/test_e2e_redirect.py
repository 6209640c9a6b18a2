"""--peer-transfer=redirect with the real parts: runtimes sent to the peer that holds the blobs.

A node started with `--peer-transfer=redirect` answers its runtime's blob GETs that a peer holds
whole with a `307` to a signed single-use URL at that peer; the peer sends the bytes with
sendfile and the runtime verifies the digest before it commits. Shown here with the upstream
registry stopped and only other nodes holding the image:

- containerd pulls three images through the redirecting node, which relays no blob byte (its
  manifests still go through it);
- a holder killed mid-blob: containerd reconnects to its mirror with a `Range` from the byte it
  has; the mirror, asked again for a blob it redirected, serves the rest itself from the other
  holder (the holders sit in a network namespace behind a link shaped to 200 Mbit/s, so the
  kill lands mid-body);
- bytes a holder's rotten copy sends are refused by the runtime (containerd and dockerd verify
  the digest before they commit); the retry is served by the mirror, which verifies and tells
  the holder;
- a runtime pulling while another node's runtime is still receiving a blob is sent to that
  node, which serves it from containerd's ingest as it grows (the swarm under redirect);
- dockerd follows the redirect too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness.cluster import HOSTS, MirrorFactory, keygen, make_cluster, status_of, wait_until
from harness.containerd import ContainerdNode, CtrError, write_hosts_toml
from harness.dockerd import DockerNode
from harness.images import TestImage, TestImages
from harness.mirror_node import MirrorNode
from harness.net import free_port, free_udp_port
from harness.netns import NetNamespace, make_namespace
from harness.process import ManagedProcess, stop_all
from harness.registry import Registry

from mirror.clusterkey import ClusterKey
from mirror.peers.auth import PEER_HEADER, RequestSigner

REDIRECT = "--peer-transfer=redirect"
# The holders' link to the host in the failover test: 64 MiB take about 2.7 s.
SHAPED_RATE = "200mbit"
NAMESPACE_OCTET = 233


def blob_digests(image: TestImage) -> list[str]:
    """What a pull fetches from /blobs/: the config and the layers (manifests are not blobs)."""
    return [image.config_digest, *image.layer_digests]


def redirects_of(mirror: MirrorNode, digest: str) -> list[str]:
    """The holders `mirror` sent its runtime to for `digest`, in order (from its log)."""
    pattern = re.compile(rf"redirecting the runtime to (\S+) for {re.escape(digest)}")
    return pattern.findall(mirror.process.log_text())


def served_once(mirror: MirrorNode, digest: str) -> bool:
    """Whether `mirror` answered exactly one GET for `digest`, 200, on a signed URL. Waited
    for, not read at once: the holder logs a GET after its last byte went out, and a runtime
    that refuses the bytes fails its pull at that same last byte."""
    wait_until(lambda: signed_gets(mirror, digest) != [], f"{mirror.address} to log its GET")
    return signed_gets(mirror, digest) == [200]


def signed_gets(mirror: MirrorNode, digest: str, *, signed_url: bool = True) -> list[int]:
    """Statuses of the GETs for `digest` that `mirror` answered on signed URLs (or else, with
    `signed_url` False, the others: a peer's signed header), from its access log."""
    pattern = re.compile(rf'"GET /v2/[^ ]*/blobs/{re.escape(digest)}(\?[^ ]*)? HTTP/1\.1" (\d+)')
    return [
        int(status)
        for query, status in pattern.findall(mirror.process.log_text())
        if ("&mirror-sig=" in query) is signed_url
    ]


def assert_pulled(node: ContainerdNode, ref: str, image: TestImage) -> None:
    assert node.image_target(ref) == image.manifest_digest
    for digest in image.host_blobs:
        assert node.blob_path(digest).read_bytes() == image.blob_bytes(digest), digest


def test_containerd_pulls_through_a_redirecting_node(
    registry: Registry,
    containerd_factory: Callable[[], ContainerdNode],
    mirror_factory: MirrorFactory,
    test_images: TestImages,
    tmp_path: Path,
) -> None:
    """Node 1 holds the images; node 2 redirects its containerd there for every blob."""
    holding, pulling = containerd_factory(), containerd_factory()
    images = test_images.all()
    for image in images:
        holding.pull(image.push(registry.host, f"p2p/{image.name}"), plain_http=True)
    cluster = make_cluster(tmp_path, [holding, pulling])
    holder = cluster.start_mirror(mirror_factory, 0)
    node = cluster.start_mirror(mirror_factory, 1, REDIRECT)
    cluster.wait_connected()
    for image in images:
        for digest in blob_digests(image):
            url = f"{node.url}/v2/p2p/any/blobs/{digest}"
            wait_until(lambda url=url: status_of(url) == 200, f"{digest} to be found")
    registry.stop()

    # A HEAD is answered by the node itself, and a peer is never redirected: it gets what the
    # node holds (nothing) and no 307.
    big = max(test_images.multi_layer.layer_digests, key=lambda d: test_images.multi_layer.blobs[d])
    path = f"/v2/p2p/multi_layer/blobs/{big}?ns={registry.host.replace(':', '%3A')}"
    request = urllib.request.Request(node.url + path, method="HEAD")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == test_images.multi_layer.blobs[big]
    signature = RequestSigner(ClusterKey.load(cluster.key_file)).sign("GET", path)
    assert _status_no_redirects(node.url + path, {PEER_HEADER: signature}) == 404

    hosts_dir = tmp_path / "hosts"
    write_hosts_toml(hosts_dir, registry.host, registry.url, [node.url])
    for image in images:
        ref = f"{registry.host}/p2p/{image.name}:{image.tag}"
        pulling.pull(ref, hosts_dir=hosts_dir)
        assert_pulled(pulling, ref, image)
        for digest in blob_digests(image):
            assert redirects_of(node, digest) == [holder.address], digest
            assert served_once(holder, digest), digest

    fetched = sum(image.blobs[d] for image in images for d in blob_digests(image))
    sent = node.metric("mirror_peer_redirects_total", result="sent")
    assert sent == sum(len(blob_digests(image)) for image in images)
    assert node.metric("mirror_requests_total", kind="blob", status="307", source="peer") == sent
    assert node.metric("mirror_served_bytes_total", kind="blob") == 0, "the node relayed bytes"
    # Manifests are never redirected: the node fetched them from the holder and served them.
    assert node.metric("mirror_requests_total", kind="manifest", status="200", source="peer") > 0
    assert node.metric("mirror_requests_total", kind="manifest", status="307") == 0
    assert holder.metric("mirror_served_bytes_total", kind="blob", source="local") >= fetched


def _status_no_redirects(url: str, headers: dict[str, str]) -> int:
    class NoRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirects)
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


@dataclass
class ShapedHolders:
    """Nodes in one network namespace, reaching the host over one veth link shaped to
    SHAPED_RATE: each has its own address (10.N.i.2, the host 10.N.i.1)."""

    namespace: NetNamespace
    ips: list[str]
    started: list[MirrorNode] = field(default_factory=list)

    @property
    def host_ip(self) -> str:
        return self.namespace.host_ip

    def start_mirror(self, base_dir: Path, ip: str, *args: str) -> MirrorNode:
        """`mirror run` inside the namespace on `ip` (every port is free in a new namespace)."""
        port, metrics_port = free_port(), free_port()
        argv = [
            "ip",
            "netns",
            "exec",
            self.namespace.name,
            sys.executable,
            "-m",
            "mirror",
            "run",
            f"--registry-addr={ip}:{port}",
            f"--metrics-addr={ip}:{metrics_port}",
            f"--cache-dir={base_dir / 'cache'}",
            "--log-level=debug",
            *args,
        ]
        process = ManagedProcess(argv, base_dir, "mirror")
        node = MirrorNode(process, ip, port, metrics_port)
        self.started.append(node)
        process.start()  # `ip netns exec` execs: the pid is the mirror's
        wait_until(lambda: _ready(node), f"mirror on {node.address} to be ready")
        return node

    def reshape(self, rate: str) -> None:
        """Shape the holders' link to `rate` from now on."""
        inner_veth = "mn" + self.namespace.host_veth.removeprefix("mh")
        shape = ["tbf", "rate", rate, "burst", "256kb", "latency", "400ms"]
        tc = ["netns", "exec", self.namespace.name, "tc", "qdisc", "change", "dev", inner_veth]
        _ip(*tc, "root", *shape)


def _ready(node: MirrorNode) -> bool:
    node.process.ensure_running()
    try:
        with urllib.request.urlopen(f"{node.url}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture
def shaped() -> Iterator[ShapedHolders]:
    namespace = make_namespace(NAMESPACE_OCTET)
    holders = ShapedHolders(namespace, [namespace.inner_ip])
    try:
        inner_veth = "mn" + namespace.host_veth.removeprefix("mh")
        # A second address pair on the same link, for a second holder.
        _ip("addr", "add", f"10.{NAMESPACE_OCTET}.1.1/30", "dev", namespace.host_veth)
        _ip("-n", namespace.name, "addr", "add", f"10.{NAMESPACE_OCTET}.1.2/30", "dev", inner_veth)
        holders.ips.append(f"10.{NAMESPACE_OCTET}.1.2")
        shape = ["tbf", "rate", SHAPED_RATE, "burst", "256kb", "latency", "400ms"]
        _ip(
            "netns", "exec", namespace.name, "tc", "qdisc", "add", "dev", inner_veth, "root", *shape
        )
        yield holders
    finally:
        try:
            stop_all(holders.started)
        finally:
            namespace.remove()


def _ingest(node: ContainerdNode, digest: str) -> Path | None:
    """containerd's ingest directory of `digest` (a download under way, or a refused one)."""
    ingests = node.root / "io.containerd.content.v1.content" / "ingest"
    for ref in ingests.glob("*/ref"):
        try:
            if digest in ref.read_text():
                return ref.parent
        except OSError:
            continue
    return None


def _ingested(node: ContainerdNode, digest: str) -> int:
    """Bytes containerd has written so far of its download of `digest` (0: none under way)."""
    ingest = _ingest(node, digest)
    try:
        return 0 if ingest is None else (ingest / "data").stat().st_size
    except OSError:
        return 0


def test_a_holder_dying_mid_blob_under_redirect(
    registry: Registry,
    containerd_factory: Callable[[], ContainerdNode],
    mirror_factory: MirrorFactory,
    test_images: TestImages,
    shaped: ShapedHolders,
    tmp_path: Path,
) -> None:
    """containerd reconnects to its mirror with a Range; the mirror streams the rest itself."""
    image = test_images.multi_layer
    ref_upstream = image.push(registry.host, f"p2p/{image.name}")
    nodes = [containerd_factory() for _ in range(3)]
    for holding in nodes[:2]:
        holding.pull(ref_upstream, plain_http=True)
    key_file = tmp_path / "cluster.key"
    keygen(key_file)
    router_ips = [*shaped.ips, shaped.host_ip]
    routers = [f"{ip}:{free_udp_port('127.0.0.1')}" for ip in shaped.ips]
    routers.append(f"{shaped.host_ip}:{free_udp_port(shaped.host_ip)}")
    common = [f"--cluster-key-file={key_file}", f"--bootstrap=static:{','.join(routers)}"]
    common.append("--resolve-timeout=200ms")
    holders = [
        shaped.start_mirror(
            tmp_path / f"holder{index}",
            router_ips[index],
            "--store=containerd",
            f"--containerd-sock={nodes[index].socket}",
            f"--router-addr={routers[index]}",
            *common,
        )
        for index in range(2)
    ]
    node = mirror_factory(
        "--store=containerd",
        f"--containerd-sock={nodes[2].socket}",
        f"--router-addr={routers[2]}",
        REDIRECT,
        *common,
        host=shaped.host_ip,
    )
    mirrors = [*holders, node]
    for mirror in mirrors:
        wait_until(lambda m=mirror: m.metric("mirror_dht_contacts") >= 2, f"{mirror.address}")
    for holder in holders:
        wait_until(
            lambda h=holder: h.metric("mirror_advertised_keys", kind="digest") >= len(image.blobs),
            f"{holder.address} to announce the image",
        )
    big = max(image.layer_digests, key=lambda d: image.blobs[d])
    url = f"{node.url}/v2/p2p/any/blobs/{big}"
    wait_until(lambda: status_of(url) == 200, f"{big} to be found")
    registry.stop()

    hosts_dir = tmp_path / "hosts"
    write_hosts_toml(hosts_dir, registry.host, registry.url, [node.url])
    ref = f"{registry.host}/p2p/{image.name}:{image.tag}"
    with ThreadPoolExecutor(1) as pool:
        pull = pool.submit(nodes[2].pull, ref, hosts_dir=hosts_dir)
        wait_until(lambda: bool(redirects_of(node, big)) or pull.done(), "the redirect")
        wait_until(lambda: _ingested(nodes[2], big) >= 8 << 20 or pull.done(), "8 MiB to arrive")
        assert not pull.done(), "the pull ended before the holder could be killed"
        serving = redirects_of(node, big)[0]
        victim = next(holder for holder in holders if holder.address == serving)
        received = _ingested(nodes[2], big)
        os.kill(victim.process.pid or 0, signal.SIGKILL)
        started = time.monotonic()
        pull.result(timeout=120)
    assert_pulled(nodes[2], ref, image)
    assert received < image.blobs[big], "the holder was killed after the last byte"

    survivor = next(holder for holder in holders if holder is not victim)
    assert redirects_of(node, big) == [victim.address]
    assert node.metric("mirror_peer_redirects_total", result="retry") == 1
    # The resume: containerd asked its mirror again with a Range from the byte it had (a 206);
    # the mirror streamed it from the survivor, which got the node's signed peer request.
    assert node.metric("mirror_requests_total", kind="blob", status="206", source="peer") == 1
    relayed = node.metric("mirror_served_bytes_total", kind="blob", source="peer")
    assert 0 < relayed <= image.blobs[big] - received
    assert signed_gets(survivor, big, signed_url=False) == [206]
    assert signed_gets(survivor, big) == []
    print(
        f"killed at {received >> 20} MiB of {image.blobs[big] >> 20} MiB; the mirror relayed the"
        f" last {relayed / 2**20:.1f} MiB; pull done {time.monotonic() - started:.1f}s later"
    )


# The holder's link while a runtime receives from it in the swarm test: 64 MiB take ~13 s.
SLOW_RATE = "40mbit"


def test_a_runtime_is_sent_to_a_node_whose_runtime_is_still_receiving(
    registry: Registry,
    containerd_factory: Callable[[], ContainerdNode],
    mirror_factory: MirrorFactory,
    test_images: TestImages,
    shaped: ShapedHolders,
    tmp_path: Path,
) -> None:
    """The swarm under redirect: B's containerd is sent to holder A (a slow link) and B
    announces itself; C's containerd, pulling while B's is still receiving the big layer, is
    sent to B, which serves it from containerd's ingest as it grows (the last byte once B's
    containerd committed it). A sends the layer once; no mirror relays a byte."""
    image = test_images.multi_layer
    ref_upstream = image.push(registry.host, f"p2p/{image.name}")
    holding, node_b, node_c = (containerd_factory() for _ in range(3))
    holding.pull(ref_upstream, plain_http=True)
    key_file = tmp_path / "cluster.key"
    keygen(key_file)
    routers = [f"{shaped.ips[0]}:{free_udp_port('127.0.0.1')}"]
    routers += [f"{shaped.host_ip}:{free_udp_port(shaped.host_ip)}" for _ in range(2)]
    common = [f"--cluster-key-file={key_file}", f"--bootstrap=static:{','.join(routers)}"]
    # A fan-out of one: A, sending the layer to B, refers C to B (with two it may serve C).
    common += ["--resolve-timeout=200ms", "--blob-fanout=1"]
    a = shaped.start_mirror(
        tmp_path / "a",
        shaped.ips[0],
        "--store=containerd",
        f"--containerd-sock={holding.socket}",
        f"--router-addr={routers[0]}",
        *common,
    )
    b, c = (
        mirror_factory(
            "--store=containerd",
            f"--containerd-sock={runtime.socket}",
            f"--router-addr={router}",
            REDIRECT,
            *common,
            host=shaped.host_ip,
        )
        for runtime, router in ((node_b, routers[1]), (node_c, routers[2]))
    )
    for mirror in (a, b, c):
        wait_until(lambda m=mirror: m.metric("mirror_dht_contacts") >= 2, f"{mirror.address}")
    wait_until(
        lambda: a.metric("mirror_advertised_keys", kind="digest") >= len(image.blobs),
        "A to announce the image",
    )
    big = max(image.layer_digests, key=lambda d: image.blobs[d])
    wait_until(lambda: status_of(f"{b.url}/v2/p2p/any/blobs/{big}") == 200, f"{big} to be found")
    registry.stop()
    shaped.reshape(SLOW_RATE)

    ref = f"{registry.host}/p2p/{image.name}:{image.tag}"
    hosts_b, hosts_c = tmp_path / "hosts-b", tmp_path / "hosts-c"
    write_hosts_toml(hosts_b, registry.host, registry.url, [b.url])
    write_hosts_toml(hosts_c, registry.host, registry.url, [c.url])
    with ThreadPoolExecutor(1) as pool:
        pull_b = pool.submit(node_b.pull, ref, hosts_dir=hosts_b)
        wait_until(lambda: _ingested(node_b, big) >= 4 << 20 or pull_b.done(), "B to receive")
        assert not pull_b.done() and not node_b.has_blob(big), "B's pull ended too soon"
        node_c.pull(ref, hosts_dir=hosts_c)
        pull_b.result(timeout=120)
    assert_pulled(node_b, ref, image)
    assert_pulled(node_c, ref, image)

    assert redirects_of(b, big) == [a.address]
    assert redirects_of(c, big) == [b.address]
    assert served_once(a, big), "A sent the big layer more than once"
    assert served_once(b, big)
    assert re.search(rf"sending {re.escape(big)} as the runtime receives it", b.process.log_text())
    received = b.metric("mirror_served_bytes_total", kind="blob", source="receiving")
    assert received >= image.blobs[big]
    for mirror in (b, c):
        assert mirror.metric("mirror_served_bytes_total", kind="blob", source="peer") == 0


def rot(node: ContainerdNode, digest: str) -> None:
    """Flip the last byte of `node`'s copy of `digest`, as a failing disk would."""
    path = node.blob_path(digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def test_containerd_refuses_a_rotten_copy_and_its_retry_is_verified(
    registry: Registry,
    containerd_factory: Callable[[], ContainerdNode],
    mirror_factory: MirrorFactory,
    test_images: TestImages,
    tmp_path: Path,
) -> None:
    """The redirected runtime gets wrong bytes: containerd refuses to commit them (the pull
    fails: no other copy, upstream stopped). Its retry is not redirected: the node fetches the
    blob itself, verifies it, and reports the rotten copy to its holder."""
    image = test_images.docker_v2
    holding, pulling = containerd_factory(), containerd_factory()
    holding.pull(image.push(registry.host, f"p2p/{image.name}"), plain_http=True)
    rotten = image.layer_digests[0]
    rot(holding, rotten)
    cluster = make_cluster(tmp_path, [holding, pulling])
    holder = cluster.start_mirror(mirror_factory, 0)
    node = cluster.start_mirror(mirror_factory, 1, REDIRECT)
    cluster.wait_connected()
    url = f"{node.url}/v2/p2p/any/blobs/{rotten}"
    wait_until(lambda: status_of(url) == 200, f"{rotten} to be found")
    registry.stop()

    hosts_dir = tmp_path / "hosts"
    write_hosts_toml(hosts_dir, registry.host, registry.url, [node.url])
    ref = f"{registry.host}/p2p/{image.name}:{image.tag}"
    with pytest.raises(CtrError) as refused:
        pulling.pull(ref, hosts_dir=hosts_dir)
    assert "unexpected commit digest" in str(refused.value), refused.value
    assert not pulling.has_blob(rotten)
    assert redirects_of(node, rotten) == [holder.address]
    assert served_once(holder, rotten)
    # containerd 1.6 keeps the refused bytes as the blob's ingest: a pull retried at once
    # commits them again without asking anyone. Its garbage collector drops the ingest soon
    # after the failed pull's lease is gone; only then does a retry fetch again.
    wait_until(lambda: _ingest(pulling, rotten) is None, "containerd to drop the refused bytes")

    with pytest.raises(CtrError):
        pulling.pull(ref, hosts_dir=hosts_dir)
    assert redirects_of(node, rotten) == [holder.address], "redirected again"
    assert node.metric("mirror_peer_redirects_total", result="retry") >= 1
    assert node.metric("mirror_peer_fetch_failures_total", reason="digest-mismatch") >= 1
    assert not pulling.has_blob(rotten)
    wait_until(
        lambda: holder.metric("mirror_corrupt_blobs_total", source="report", action="kept") == 1,
        "the holder to re-hash its copy on the node's report",
    )


DockerFactory = Callable[..., DockerNode]


def test_dockerd_follows_the_redirect(
    registry: Registry,
    containerd_factory: Callable[[], ContainerdNode],
    dockerd_factory: DockerFactory,
    mirror_factory: MirrorFactory,
    test_images: TestImages,
    tmp_path: Path,
) -> None:
    """dockerd's `registry-mirrors` entry redirects; its pull takes the bytes from the holder."""
    image = test_images.docker_v2
    holding = containerd_factory()
    holding.pull(image.push(registry.host, f"p2p/{image.name}"), plain_http=True)
    key_file = tmp_path / "cluster.key"
    keygen(key_file)
    routers = [f"{host}:{free_udp_port(host)}" for host in HOSTS[:2]]
    common = [f"--cluster-key-file={key_file}", f"--bootstrap=static:{','.join(routers)}"]
    common.append("--resolve-timeout=200ms")
    holder = mirror_factory(
        "--store=containerd",
        f"--containerd-sock={holding.socket}",
        f"--router-addr={routers[0]}",
        *common,
        host=HOSTS[0],
    )
    node = mirror_factory(
        "--store=cache", f"--router-addr={routers[1]}", REDIRECT, *common, host=HOSTS[1]
    )
    for digest in blob_digests(image):
        url = f"{node.url}/v2/p2p/any/blobs/{digest}"
        wait_until(lambda url=url: status_of(url) == 200, f"{digest} to be found")
    registry.stop()

    docker = dockerd_factory(registry_mirrors=[node.url])
    # By digest: dockerd asks its mirror for docker.io/p2p/docker_v2, which the cluster holds
    # by digest (the tag in the holder's store is under the test registry's name).
    reference = f"p2p/{image.name}@{image.manifest_digest}"
    docker.pull(reference)
    assert docker.image_ids(), "no image after the pull"
    for digest in blob_digests(image):
        assert redirects_of(node, digest) == [holder.address], digest
        assert served_once(holder, digest), digest
    assert node.metric("mirror_peer_redirects_total", result="sent") == len(blob_digests(image))
    assert node.metric("mirror_served_bytes_total", kind="blob") == 0, "the node relayed bytes"


def test_dockerd_refuses_a_rotten_copy(
    registry: Registry,
    containerd_factory: Callable[[], ContainerdNode],
    dockerd_factory: DockerFactory,
    mirror_factory: MirrorFactory,
    test_images: TestImages,
    tmp_path: Path,
) -> None:
    """dockerd verifies what it follows a redirect for: it refuses the wrong bytes and tries its
    next endpoint (Docker Hub, out of reach here). Its next pull is served by the node."""
    image = test_images.docker_v2
    holding = containerd_factory()
    holding.pull(image.push(registry.host, f"p2p/{image.name}"), plain_http=True)
    rotten = image.layer_digests[-1]
    rot(holding, rotten)
    key_file = tmp_path / "cluster.key"
    keygen(key_file)
    routers = [f"{host}:{free_udp_port(host)}" for host in HOSTS[:2]]
    common = [f"--cluster-key-file={key_file}", f"--bootstrap=static:{','.join(routers)}"]
    common.append("--resolve-timeout=200ms")
    holder = mirror_factory(
        "--store=containerd",
        f"--containerd-sock={holding.socket}",
        f"--router-addr={routers[0]}",
        *common,
        host=HOSTS[0],
    )
    node = mirror_factory(
        "--store=cache", f"--router-addr={routers[1]}", REDIRECT, *common, host=HOSTS[1]
    )
    url = f"{node.url}/v2/p2p/any/blobs/{rotten}"
    wait_until(lambda: status_of(url) == 200, f"{rotten} to be found")
    registry.stop()

    docker = dockerd_factory(registry_mirrors=[node.url])
    reference = f"p2p/{image.name}@{image.manifest_digest}"
    assert docker.docker("pull", reference, check=False).returncode != 0
    log = docker.process.log_text()
    assert f"filesystem layer verification failed for digest {rotten}" in log
    assert "Attempting next endpoint for pull after error: filesystem layer verification" in log
    assert docker.image_ids() == []
    assert redirects_of(node, rotten) == [holder.address]
    assert served_once(holder, rotten)

    assert docker.docker("pull", reference, check=False).returncode != 0
    assert redirects_of(node, rotten) == [holder.address], "redirected again"
    assert node.metric("mirror_peer_redirects_total", result="retry") >= 1
    wait_until(
        lambda: holder.metric("mirror_corrupt_blobs_total", source="report", action="kept") == 1,
        "the holder to re-hash its copy on the node's report",
    )
