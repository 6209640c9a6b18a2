"""The swarm data path with the real parts: a node serves a blob while it is still fetching it.

Nodes A, B and C each run in a network namespace of their own, joined by veth pairs to a bridge
on this host (which is how the test, their runtime, reaches them). A holds a blob in its node
cache and sends at 48 Mbit/s (`tc tbf` on its end of its link): a holder that serves slowly.
B's runtime pulls the blob; B fetches it from A as a download of its own and announces itself
at once. C is kept from reaching A's registry port (an iptables reject in A's namespace, so
refused at once) until the test lets it: C's pull can only be served by B, from B's growing temp
file, while B still fetches it.

Then the runtimes: containerd and dockerd pull through a node that fetched the image from a peer
(with upstream stopped), and a third node pulls it from that node's cache once the first holder
is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness.cluster import HOSTS, MirrorFactory, keygen, make_cluster, status_of, wait_until
from harness.containerd import ContainerdNode, write_hosts_toml
from harness.dockerd import DockerNode
from harness.images import TestImages
from harness.mirror_node import MirrorNode
from harness.net import free_port, free_udp_port
from harness.process import ManagedProcess, stop_all
from harness.registry import Registry

from mirror.clusterkey import ClusterKey
from mirror.peers.auth import PEER_HEADER, RequestSigner
from mirror.peers.fetcher import LAST_RESORT_PARAM

MIB = 1024 * 1024
BLOB_SIZE = 24 * MIB
# A's side of its link: about 6 MB/s, so a 24 MiB blob takes about four seconds to reach B.
LINK_RATE = "48mbit"
REPOSITORY = "swarm/big"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
NODES = ("a", "b", "c")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=20)


@dataclass
class SwarmNet:
    """A bridge on this host (`prefix`.1) and one namespace per node (`prefix`.2, .3, .4)."""

    suffix: str
    prefix: str  # "10.N.0"

    @property
    def bridge(self) -> str:
        return f"mswbr{self.suffix}"

    @property
    def host_ip(self) -> str:
        return f"{self.prefix}.1"

    def namespace(self, node: str) -> str:
        return f"msw{node}-{self.suffix}"

    def ip(self, node: str) -> str:
        return f"{self.prefix}.{2 + NODES.index(node)}"

    def veths(self, node: str) -> tuple[str, str]:
        return f"ms{node}h{self.suffix}", f"ms{node}n{self.suffix}"

    def netns_exec(self, node: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(node), *argv]

    def create(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for node in NODES:
            outer, inner = self.veths(node)
            ns = ["ip", "-n", self.namespace(node)]
            _run("ip", "netns", "add", self.namespace(node))
            _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            _run("ip", "link", "set", inner, "netns", self.namespace(node))
            _run("ip", "link", "set", outer, "master", self.bridge)
            _run("ip", "link", "set", outer, "up")
            _run(*ns, "addr", "add", f"{self.ip(node)}/24", "dev", inner)
            _run(*ns, "link", "set", inner, "up")
            _run(*ns, "link", "set", "lo", "up")
        # A sends slowly: everything leaving its namespace, to B, C and this host.
        _run(
            *self.netns_exec("a", "tc", "qdisc", "add", "dev", self.veths("a")[1], "root", "tbf"),
            *("rate", LINK_RATE, "burst", "64kb", "latency", "200ms"),
        )

    def refuse(self, client: str, server: str, port: int, *, delete: bool = False) -> None:
        """Reject (or stop rejecting) TCP from node `client` to `port` of node `server`."""
        rule = ["-p", "tcp", "-s", self.ip(client), "--dport", str(port)]
        rule += ["-j", "REJECT", "--reject-with", "tcp-reset"]
        _run(*self.netns_exec(server, "iptables", "-D" if delete else "-I", "INPUT", *rule))

    def remove(self) -> None:
        for node in NODES:
            outer, _ = self.veths(node)
            subprocess.run(["ip", "link", "del", outer], capture_output=True, check=False)
            subprocess.run(
                ["ip", "netns", "del", self.namespace(node)], capture_output=True, check=False
            )
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)


def _unused_prefix() -> str:
    """A 10.N.0.0/24 no interface of this host is on (other tests and benchmarks make some)."""
    used = subprocess.run(
        ["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True
    ).stdout
    for octet in secrets.SystemRandom().sample(range(160, 230), 70):
        if f" 10.{octet}." not in used:
            return f"10.{octet}.0"
    raise RuntimeError("no free 10.N.0.0/24 for the test's bridge")


@pytest.fixture
def swarm_net() -> Iterator[SwarmNet]:
    net = SwarmNet(secrets.token_hex(3), _unused_prefix())
    try:
        net.create()
        yield net
    finally:
        net.remove()


@dataclass(frozen=True)
class Seeded:
    digest: str
    data: bytes


def seed_cache(cache_dir: Path, data: bytes) -> Seeded:
    """A node cache holding `data` as the one layer of a tagged image (the advertiser announces
    what tagged images reach, and loose blobs)."""
    blobs = cache_dir / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(content: bytes) -> str:
        hex_digest = hashlib.sha256(content).hexdigest()
        (blobs / hex_digest).write_bytes(content)
        return f"sha256:{hex_digest}"

    config_body = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    layer, config = put(data), put(config_body)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config,
            "size": len(config_body),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer,
                "size": len(data),
            }
        ],
    }
    tag = cache_dir / "tags" / "docker.io" / REPOSITORY / "@v1"
    tag.parent.mkdir(parents=True)
    tag.write_text(put(json.dumps(manifest).encode()))
    return Seeded(layer, data)


def start_in(net: SwarmNet, node: str, base: Path, *flags: str) -> MirrorNode:
    """`mirror run` in the node's namespace (empty but for it: any port is free there)."""
    host, port, metrics_port = net.ip(node), free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "mirror",
        "run",
        f"--registry-addr={host}:{port}",
        f"--metrics-addr={host}:{metrics_port}",
        f"--cache-dir={base / 'cache'}",
        "--log-level=debug",
        *flags,
    ]
    process = ManagedProcess(net.netns_exec(node, *argv), base, "mirror")
    process.start()
    mirror = MirrorNode(process, host, port, metrics_port)
    deadline = time.monotonic() + 20.0
    while True:
        try:
            process.ensure_running()
            with urllib.request.urlopen(f"{mirror.url}/readyz", timeout=1) as response:
                if response.status == 200:
                    return mirror
        except (OSError, urllib.error.URLError):
            pass
        except BaseException:
            mirror.stop()
            raise
        if time.monotonic() > deadline:
            mirror.stop()
            raise TimeoutError(f"{mirror.address} not ready:\n{process.log_text()[-3000:]}")
        time.sleep(0.02)


@dataclass
class Swarm:
    net: SwarmNet
    seeded: Seeded
    a: MirrorNode
    b: MirrorNode
    c: MirrorNode
    key_file: Path

    def url(self, node: MirrorNode) -> str:
        return f"{node.url}/v2/{REPOSITORY}/blobs/{self.seeded.digest}"

    def refuse_c_at_a(self, *, delete: bool = False) -> None:
        self.net.refuse("c", "a", self.a.port, delete=delete)


@contextmanager
def cluster_of_nodes(
    net: SwarmNet,
    base: Path,
    key_file: Path,
    flags_of: Callable[[str], list[str]] = lambda node: [],
) -> Iterator[list[MirrorNode]]:
    """Nodes A, B and C on their node caches, one keyed cluster, met; stopped on exit.

    `flags_of(node)`: more flags for that node's `mirror run`.
    """
    routers = {node: f"{net.ip(node)}:{free_udp_port()}" for node in NODES}
    started: list[MirrorNode] = []
    try:
        for node in NODES:
            started.append(
                start_in(
                    net,
                    node,
                    base / node,
                    "--store=cache",
                    f"--cluster-key-file={key_file}",
                    f"--router-addr={routers[node]}",
                    f"--bootstrap=static:{','.join(routers.values())}",
                    "--resolve-timeout=200ms",
                    "--upstream-fallback=false",
                    # The test, on the bridge, is every node's runtime.
                    f"--allow-client={net.host_ip}/32",
                    *flags_of(node),
                )
            )
        for mirror in started:
            wait_until(
                lambda m=mirror: m.metric("mirror_dht_contacts") >= 2, f"{mirror.address} to meet"
            )
        yield started
    finally:
        stop_all(started)


@pytest.fixture
def swarm(swarm_net: SwarmNet, tmp_path: Path) -> Iterator[Swarm]:
    key_file = tmp_path / "cluster.key"
    keygen(key_file)
    seeded = seed_cache(tmp_path / "a" / "cache", os.urandom(BLOB_SIZE))
    # A fan-out of 1: with three nodes, the one shape in which a holder refers a second
    # fetcher to the first (a fan-out of 2 serves both; the tree is tested in test_upload_bound).
    with cluster_of_nodes(
        swarm_net, tmp_path, key_file, lambda node: ["--blob-fanout=1"]
    ) as started:
        built = Swarm(swarm_net, seeded, *started, key_file=key_file)
        # B finds A's blob (a HEAD only asks: nothing is fetched yet).
        wait_until(lambda: status_of(built.url(built.b)) == 200, "B to find the blob at A")
        yield built


class Pull(threading.Thread):
    """A runtime reading a whole blob from a node, hashing it."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.hasher = hashlib.sha256()
        self.received = 0
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=60) as response:
                while chunk := response.read(MIB):
                    self.hasher.update(chunk)
                    self.received += len(chunk)
        except Exception as exc:
            self.error = exc

    def result(self) -> tuple[int, str]:
        self.join(timeout=60)
        assert not self.is_alive()
        return self.received, "sha256:" + self.hasher.hexdigest()


def gets_of_blob(node: MirrorNode, status: str) -> float:
    return node.metric("mirror_requests_total", method="GET", kind="blob", status=status)


def test_a_node_serves_a_blob_to_a_peer_while_it_still_fetches_it(swarm: Swarm) -> None:
    a, b, c, seeded = swarm.a, swarm.b, swarm.c, swarm.seeded
    swarm.refuse_c_at_a()
    b_pull = Pull(swarm.url(b))
    b_pull.start()
    # B announced itself as soon as its fetch began: C (which cannot reach A) finds it.
    wait_until(lambda: status_of(swarm.url(c)) == 200, "C to find the blob at B")

    hasher = hashlib.sha256()
    with urllib.request.urlopen(swarm.url(c), timeout=60) as response:
        assert int(response.headers["Content-Length"]) == BLOB_SIZE
        first = response.read(MIB)
        # C has bytes, and B has not finished fetching: nothing is in B's cache yet.
        assert b.metric("mirror_cache_bytes") == 0
        assert b_pull.is_alive()
        hasher.update(first)
        received = len(first)
        while chunk := response.read(MIB):
            hasher.update(chunk)
            received += len(chunk)
    assert (received, "sha256:" + hasher.hexdigest()) == (BLOB_SIZE, seeded.digest)
    assert b_pull.result() == (BLOB_SIZE, seeded.digest) and b_pull.error is None

    # A sent the blob once, to B; C streamed it from B's download.
    assert gets_of_blob(a, "200") == 1
    assert re.search(
        rf"streaming {seeded.digest} from {re.escape(b.address)}\b", c.process.log_text()
    )
    assert (
        b.metric("mirror_requests_total", method="GET", kind="blob", status="200", source="peer")
        == 2
    )
    # Both kept it: each is a provider from its own cache now.
    wait_until(lambda: b.metric("mirror_cache_bytes") == BLOB_SIZE, "B to keep the blob")
    wait_until(lambda: c.metric("mirror_cache_bytes") == BLOB_SIZE, "C to keep the blob")


def test_a_peer_dying_mid_download_is_resumed_from_the_holder(swarm: Swarm) -> None:
    a, b, c, seeded = swarm.a, swarm.b, swarm.c, swarm.seeded
    swarm.refuse_c_at_a()
    b_pull = Pull(swarm.url(b))
    b_pull.start()
    wait_until(lambda: status_of(swarm.url(c)) == 200, "C to find the blob at B")

    hasher = hashlib.sha256()
    with urllib.request.urlopen(swarm.url(c), timeout=60) as response:
        first = response.read(MIB)
        assert b.metric("mirror_cache_bytes") == 0  # B is still fetching
        swarm.refuse_c_at_a(delete=True)
        os.kill(b.process.pid or 0, signal.SIGKILL)
        hasher.update(first)
        received = len(first)
        while chunk := response.read(MIB):
            hasher.update(chunk)
            received += len(chunk)
    assert (received, "sha256:" + hasher.hexdigest()) == (BLOB_SIZE, seeded.digest)
    b_pull.result()  # cut with B

    log = c.process.log_text()
    assert re.search(rf"streaming {seeded.digest} from {re.escape(b.address)}\b", log)
    assert re.search(rf"resuming {seeded.digest} at byte \d+ from {re.escape(a.address)}\b", log)
    assert c.metric("mirror_peer_fetch_failures_total", reason="broken") >= 1
    assert gets_of_blob(a, "206") == 1  # the rest, from where B stopped
    wait_until(lambda: c.metric("mirror_cache_bytes") == BLOB_SIZE, "C to keep the blob")


def streamed_from(node: MirrorNode, digest: str) -> list[str]:
    """The addresses `node` streamed `digest` from, in order (its log)."""
    return re.findall(rf"streaming {digest} from (\S+)", node.process.log_text())


def test_nodes_fetching_at_once_take_the_blob_from_the_holder_once(swarm: Swarm) -> None:
    """B and C pull the blob at once (--blob-fanout 1, as `swarm` sets): A sends it once; the
    other streams it from the first (referred there by A, or finding it in the DHT). A range
    past what a fetching node holds is refused at once (no wait on bytes it may be waiting
    for itself); a whole blob is not."""
    a, b, c, seeded = swarm.a, swarm.b, swarm.c, swarm.seeded
    wait_until(lambda: status_of(swarm.url(c)) == 200, "C to find the blob at A")
    pulls = [Pull(swarm.url(b)), Pull(swarm.url(c))]
    for pull in pulls:
        pull.start()
    wait_until(lambda: all(streamed_from(node, seeded.digest) for node in (b, c)), "both to stream")
    first = b if streamed_from(b, seeded.digest) == [a.address] else c
    second = c if first is b else b
    assert streamed_from(second, seeded.digest) == [first.address]

    signer = RequestSigner(ClusterKey.load(swarm.key_file))
    # As a last resort: past every bound (the first would refer a plain request to the second).
    path = f"/v2/{REPOSITORY}/blobs/{seeded.digest}?ns=docker.io&{LAST_RESORT_PARAM}=1"
    for node in (first, second):
        request = urllib.request.Request(
            f"{node.url}{path}",
            headers={PEER_HEADER: signer.sign("GET", path), "Range": f"bytes={BLOB_SIZE - 1}-"},
        )
        started = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 404 and time.monotonic() - started < 2
        assert b"not here yet" in refused.value.read()

    for pull in pulls:
        assert pull.result() == (BLOB_SIZE, seeded.digest) and pull.error is None
    assert gets_of_blob(a, "200") == 1
    assert gets_of_blob(a, "429") == a.metric("mirror_peer_uploads_referred_total")
    # A referral is followed unless the DHT had already named the first to the second.
    assert second.metric("mirror_peer_referrals_followed_total") <= gets_of_blob(a, "429")
    assert first.metric("mirror_peer_referrals_followed_total") == 0


def served_blob_bytes(node: MirrorNode) -> float:
    """Blob body bytes the node sent, every source together."""
    lines = node.metrics_text().splitlines()
    return sum(
        float(line.rpartition(" ")[2])
        for line in lines
        if line.startswith("mirror_served_bytes_total{") and 'kind="blob"' in line
    )


def test_a_large_layer_comes_in_ranges_from_two_holders(
    swarm_net: SwarmNet, tmp_path: Path
) -> None:
    """--peer-ranges 4: C fetches a 64 MiB layer held by A (the slow link) and B in pieces."""
    key_file = tmp_path / "cluster.key"
    keygen(key_file)
    data = os.urandom(64 * MIB)
    seeded = seed_cache(tmp_path / "a" / "cache", data)
    seed_cache(tmp_path / "b" / "cache", data)

    def flags_of(node: str) -> list[str]:
        return ["--peer-ranges=4"] if node == "c" else []

    with cluster_of_nodes(swarm_net, tmp_path, key_file, flags_of) as (a, b, c):
        for holder in (a, b):
            wait_until(
                lambda m=holder: m.metric("mirror_advertised_keys", kind="digest") >= 3,
                f"{holder.address} to announce the image",
            )
        pull = Pull(f"{c.url}/v2/{REPOSITORY}/blobs/{seeded.digest}")
        pull.start()
        assert pull.result() == (len(data), seeded.digest) and pull.error is None
        # Both holders sent pieces (206 answers to Range requests; no whole-blob 200).
        assert gets_of_blob(a, "206") >= 1 and gets_of_blob(b, "206") >= 1
        assert gets_of_blob(a, "200") == 0 and gets_of_blob(b, "200") == 0
        sent = [served_blob_bytes(a), served_blob_bytes(b)]
        assert all(count > 0 for count in sent) and sum(sent) >= len(data), sent
        wait_until(lambda: c.metric("mirror_cache_bytes") == len(data), "C to keep the layer")


# --- the runtimes ---------------------------------------------------------------------------


def cache_blobs(mirror: MirrorNode) -> Path:
    flag = next(arg for arg in mirror.process.argv if arg.startswith("--cache-dir="))
    return Path(flag.split("=", 1)[1]) / "blobs" / "sha256"


def test_containerd_pulls_through_a_node_that_fetched_from_a_peer(
    tmp_path: Path,
    registry: Registry,
    containerd_factory: Callable[[], ContainerdNode],
    mirror_factory: MirrorFactory,
    test_images: TestImages,
) -> None:
    """Node 2 pulls from node 1 through its mirror, which keeps what it fetched; with node 1
    gone (mirror stopped, image removed) and node 2's image removed too, node 3 pulls the image
    from node 2's mirror cache. Upstream is stopped throughout. The share path, chosen: by
    default a containerd node redirects its runtime and keeps no copy of its own."""
    image = test_images.multi_layer
    nodes = [containerd_factory() for _ in range(3)]
    ref = image.push(registry.host, f"swarm/{image.name}")
    nodes[0].pull(ref, plain_http=True)
    cluster = make_cluster(tmp_path, nodes)
    mirrors = [
        cluster.start_mirror(mirror_factory, index, "--peer-transfer=share") for index in range(3)
    ]
    cluster.wait_connected()
    big = max(image.layer_digests, key=lambda d: image.blobs[d])
    for mirror in mirrors[1:]:
        url = f"{mirror.url}/v2/swarm/x/blobs/{big}"
        wait_until(lambda url=url: status_of(url) == 200, f"{url} to find the image")
    registry.stop()

    hosts = tmp_path / "hosts1"
    write_hosts_toml(hosts, registry.host, registry.url, [mirrors[1].url])
    nodes[1].pull(ref, hosts_dir=hosts)
    assert nodes[1].image_target(ref) == image.manifest_digest
    for digest in image.host_blobs:
        assert nodes[1].blob_path(digest).read_bytes() == image.blob_bytes(digest), digest
        # Kept by node 2's mirror, which is a provider from its own cache.
        kept = cache_blobs(mirrors[1]) / digest.split(":")[1]
        wait_until(kept.exists, f"{digest} in node 2's mirror cache")
        assert kept.read_bytes() == image.blob_bytes(digest)
    blobs = len(image.host_blobs) - 1  # the manifest is fetched as a manifest
    assert gets_of_blob(mirrors[1], "200") == blobs

    mirrors[0].stop()
    nodes[1].remove_image(ref)
    assert not nodes[1].has_blob(big)
    hosts = tmp_path / "hosts2"
    write_hosts_toml(hosts, registry.host, registry.url, [mirrors[2].url])
    by_digest = f"{registry.host}/swarm/{image.name}@{image.manifest_digest}"
    nodes[2].pull(by_digest, hosts_dir=hosts)
    for digest in image.host_blobs:
        assert nodes[2].blob_path(digest).read_bytes() == image.blob_bytes(digest), digest
    assert re.search(
        rf"streaming {big} from {re.escape(mirrors[1].address)}\b", mirrors[2].process.log_text()
    )


def test_dockerd_pulls_through_a_node_that_fetched_from_a_peer(
    tmp_path: Path,
    registry: Registry,
    dockerd_factory: Callable[..., DockerNode],
    mirror_factory: MirrorFactory,
    test_images: TestImages,
) -> None:
    """Three Docker hosts, each mirror on its node cache (the classic store keeps no registry
    bytes). Node 1 pulls from upstream; upstream stops; node 2 pulls from node 1 and its mirror
    keeps the image; node 1's mirror stops; node 3 pulls the image from node 2's."""
    image = test_images.multi_layer
    image.push(registry.host, "library/app")
    key_file = tmp_path / "cluster.key"
    keygen(key_file)
    hosts = HOSTS[:3]
    routers = [f"{host}:{free_udp_port(host)}" for host in hosts]
    mirrors = [
        mirror_factory(
            "--store=cache",
            f"--upstream=docker.io={registry.url}",
            f"--cluster-key-file={key_file}",
            f"--router-addr={routers[index]}",
            f"--bootstrap=static:{','.join(routers)}",
            "--resolve-timeout=200ms",
            host=host,
        )
        for index, host in enumerate(hosts)
    ]
    docker = [dockerd_factory(registry_mirrors=[mirror.url]) for mirror in mirrors]
    for mirror in mirrors:
        wait_until(lambda m=mirror: m.metric("mirror_dht_contacts") >= 2, "the mirrors to meet")
    blobs = [image.config_digest, *image.layer_digests]

    docker[0].pull("app:v1")
    wait_until(
        lambda: mirrors[0].metric("mirror_advertised_keys", kind="digest") >= len(blobs) + 1,
        "node 1's mirror to announce the image",
    )
    registry.stop()

    docker[1].pull("app:v1")
    assert docker[1].image_ids() == [image.config_digest]
    assert mirrors[1].metric(
        "mirror_requests_total", method="GET", kind="blob", status="200", source="peer"
    ) == len(blobs)
    for digest in blobs:
        kept = cache_blobs(mirrors[1]) / digest.split(":")[1]
        wait_until(kept.exists, f"{digest} in node 2's mirror cache")
        assert kept.read_bytes() == image.blob_bytes(digest)

    mirrors[0].stop()
    docker[2].pull(f"app@{image.manifest_digest}")
    assert docker[2].image_ids() == [image.config_digest]
    big = max(image.layer_digests, key=lambda d: image.blobs[d])
    assert re.search(
        rf"streaming {big} from {re.escape(mirrors[1].address)}\b", mirrors[2].process.log_text()
    )
