"""Several nodes on distinct loopback addresses: a containerd and a mirror each, one cluster key."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .containerd import ContainerdNode
from .dockerd import DockerNode
from .mirror_node import MirrorNode
from .net import free_udp_port

HOSTS = ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"]
MirrorFactory = Callable[..., MirrorNode]


@dataclass
class Cluster:
    key_file: Path
    routers: list[str]
    nodes: list[ContainerdNode]
    mirrors: list[MirrorNode | None]

    def start_mirror(self, factory: MirrorFactory, index: int, *extra: str) -> MirrorNode:
        mirror = factory(
            "--store=containerd",
            f"--containerd-sock={self.nodes[index].socket}",
            f"--cluster-key-file={self.key_file}",
            f"--router-addr={self.routers[index]}",
            f"--bootstrap=static:{','.join(self.routers)}",
            "--resolve-timeout=200ms",
            *extra,
            host=HOSTS[index],
        )
        self.mirrors[index] = mirror
        return mirror

    def mirror(self, index: int) -> MirrorNode:
        mirror = self.mirrors[index]
        assert mirror is not None
        return mirror

    def running(self) -> list[MirrorNode]:
        return [mirror for mirror in self.mirrors if mirror is not None]

    def wait_connected(self) -> None:
        """Every running mirror has every other one in its routing table."""
        running = self.running()
        for mirror in running:
            wait_until(
                lambda m=mirror: m.metric("mirror_dht_contacts") >= len(running) - 1,
                f"{mirror.address} to know its peers",
            )


@dataclass
class MixedCluster:
    """Three containerd nodes and one Docker node (classic store), each with its mirror."""

    cluster: Cluster
    docker: DockerNode
    docker_mirror: MirrorNode

    @property
    def mirrors(self) -> list[MirrorNode]:
        return [*self.cluster.running(), self.docker_mirror]


def start_mixed_cluster(
    base: Path,
    containerd_factory: Callable[[], ContainerdNode],
    dockerd_factory: Callable[..., DockerNode],
    mirror_factory: MirrorFactory,
    common: tuple[str, ...],
    *,
    extra: dict[int, tuple[str, ...]] | None = None,
) -> MixedCluster:
    """Nodes 0-2 on containerd, node 3 on Docker; every mirror gets `common`, node I also
    `extra[I]` (e.g. its labels). The Docker node's mirror uses `--store=docker`."""
    extra = extra or {}
    cluster = make_cluster(base, [containerd_factory() for _ in range(3)])
    docker_router = f"{HOSTS[3]}:{free_udp_port(HOSTS[3])}"
    cluster.routers.append(docker_router)
    for index in range(3):
        cluster.start_mirror(mirror_factory, index, *common, *extra.get(index, ()))
    docker = dockerd_factory()
    docker_mirror = mirror_factory(
        "--store=docker",
        f"--docker-host={docker.host}",
        f"--cluster-key-file={cluster.key_file}",
        f"--router-addr={docker_router}",
        f"--bootstrap=static:{','.join(cluster.routers)}",
        "--resolve-timeout=200ms",
        *common,
        *extra.get(3, ()),
        host=HOSTS[3],
    )
    return MixedCluster(cluster, docker, docker_mirror)


def make_cluster(base: Path, nodes: list[ContainerdNode]) -> Cluster:
    key_file = base / "cluster.key"
    keygen(key_file)
    routers = [f"{host}:{free_udp_port(host)}" for host in HOSTS[: len(nodes)]]
    return Cluster(key_file, routers, nodes, [None] * len(nodes))


def keygen(path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "mirror", "keygen", "--out", str(path)], check=True, timeout=30
    )


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll a condition against a deadline (the nodes converge asynchronously)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def status_of(url: str, headers: dict[str, str] | None = None) -> int:
    """The status of a HEAD request (errors included)."""
    request = urllib.request.Request(url, method="HEAD", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
