"""`mirror configure` end to end: real runtimes pull through a real mirror with the files it
writes, and `mirror cleanup` puts the runtime's configuration back as it was. Docker's certs.d
files (Docker 28+ only) are checked with ctr: the dockerd here is 20.10.

The upstream is a plain distribution registry; the mirror fetches from it (`--store=cache`), so
a pull that works while every request upstream carries the mirror's User-Agent went through the
mirror, not around it.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

from harness.cluster import wait_until
from harness.containerd import ContainerdNode
from harness.dockerd import DockerNode
from harness.images import TestImages
from harness.mirror_node import MirrorNode
from harness.operator import run_mirror_cli, snapshot
from harness.registry import Registry

MirrorFactory = Callable[..., MirrorNode]

# The User-Agent mirror sends upstream (mirror.upstream.client).
MIRROR_AGENT = '"mirror/'


def requests_for(registry: Registry, repository: str) -> list[str]:
    return [line for line in registry.access_log() if f"/v2/{repository}/" in line]


def test_containerd_pulls_through_the_mirror_with_the_hosts_toml_configure_writes(
    tmp_path: Path,
    registry: Registry,
    test_images: TestImages,
    mirror_factory: MirrorFactory,
    containerd_factory: Callable[[], ContainerdNode],
) -> None:
    image = test_images.docker_v2
    ref = image.push(registry.host, "e2e/app")
    registry.clear_access_log()
    mirror = mirror_factory("--store=cache", f"--upstream={registry.host}=http://{registry.host}")
    node = containerd_factory()

    # The node's own configuration, which configure must replace and cleanup put back.
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / "docker.io").mkdir(parents=True)
    (hosts_dir / "docker.io" / "hosts.toml").write_text(
        '# the operator\'s\nserver = "https://registry-1.docker.io"\n\n'
        '[host."https://mirror.gcr.io"]\n  capabilities = ["pull"]\n'
    )
    before = snapshot(hosts_dir)

    run_mirror_cli(
        "configure",
        "containerd",
        f"--config-path={hosts_dir}",
        f"--mirror={mirror.url}",
        f"--upstream={registry.host}=http://{registry.host}",
    )
    written = (hosts_dir / registry.host / "hosts.toml").read_text()
    assert f'server = "http://{registry.host}"' in written
    assert f'[host."{mirror.url}"]' in written
    assert (hosts_dir / "_default" / "hosts.toml").is_file()

    node.pull(ref, hosts_dir=hosts_dir)
    assert node.image_target(ref) == image.manifest_digest
    assert mirror.metric("mirror_requests_total", source="upstream") > 0
    upstream = requests_for(registry, "e2e/app")
    assert upstream, "the pull never reached upstream"
    assert all(MIRROR_AGENT in line for line in upstream), "containerd went around the mirror"

    run_mirror_cli("cleanup", "containerd", f"--config-path={hosts_dir}")
    assert snapshot(hosts_dir) == before


def test_dockerd_pulls_through_the_mirror_configure_adds_to_daemon_json(
    registry: Registry,
    test_images: TestImages,
    mirror_factory: MirrorFactory,
    dockerd_factory: Callable[..., DockerNode],
) -> None:
    image = test_images.docker_v2
    image.push(registry.host, "library/app")
    registry.clear_access_log()
    mirror = mirror_factory("--store=cache", f"--upstream=docker.io={registry.url}")
    # The mirror's port is known only now: configure the file the running daemon was started
    # with, then reload it, as the command tells the operator to.
    node = dockerd_factory()
    daemon_json = node.base_dir / "daemon.json"
    certs = node.base_dir / "certs.d"
    original = daemon_json.read_bytes()

    # --certs-d auto asks the Engine API: 20.10 has only the classic store, which reads no
    # hosts.toml, so none is written.
    result = run_mirror_cli(
        "configure",
        "docker",
        f"--daemon-json={daemon_json}",
        f"--mirror={mirror.url}",
        f"--docker-host={node.host}",
        f"--certs-dir={certs}",
    )
    assert "SIGHUP" in result.stdout
    assert "dockerd 20.10" in result.stdout and "uses the classic image store" in result.stdout
    assert not certs.exists()
    settings = json.loads(daemon_json.read_bytes())
    assert settings == {**json.loads(original), "registry-mirrors": [mirror.url]}
    reload_and_wait(node, [mirror.url + "/"])

    node.pull("app:v1")
    assert node.repo_digests("app:v1") == [f"app@{image.manifest_digest}"]
    assert mirror.metric("mirror_requests_total", source="upstream") > 0
    upstream = requests_for(registry, "library/app")
    assert upstream and all(MIRROR_AGENT in line for line in upstream)

    result = run_mirror_cli(
        "cleanup", "docker", f"--daemon-json={daemon_json}", f"--certs-dir={certs}"
    )
    assert daemon_json.read_bytes() == original
    assert sorted(p.name for p in daemon_json.parent.glob("daemon.json*")) == ["daemon.json"]

    # dockerd reloads registry-mirrors only from a file that sets it, so taking the mirror out
    # needs a restart, as cleanup says; the restarted daemon runs on the original file.
    assert "restart dockerd" in result.stdout
    reloads = node.process.log_text().count("Reloaded configuration")
    assert node.process.pid is not None
    os.kill(node.process.pid, signal.SIGHUP)
    wait_until(
        lambda: node.process.log_text().count("Reloaded configuration") > reloads,
        "dockerd to reload its configuration",
    )
    assert mirrors_in_use(node) == [mirror.url + "/"]
    node.process.stop()
    node.process.start()
    wait_until(node.ping, f"dockerd {node.socket} to restart", timeout=60)
    assert mirrors_in_use(node) == []


def mirrors_in_use(node: DockerNode) -> list[str]:
    out = node.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout
    return list(json.loads(out) or [])


def reload_and_wait(node: DockerNode, wanted: list[str]) -> None:
    assert node.process.pid is not None
    os.kill(node.process.pid, signal.SIGHUP)
    wait_until(lambda: mirrors_in_use(node) == wanted, f"dockerd to use mirrors {wanted}")


def test_docker_certs_d_files_send_every_registry_through_the_mirror_checked_with_ctr(
    tmp_path: Path,
    registry: Registry,
    test_images: TestImages,
    mirror_factory: MirrorFactory,
    containerd_factory: Callable[[], ContainerdNode],
) -> None:
    """The `certs.d` files `mirror configure docker` writes for Docker 28+ on the containerd
    image store, proven with `ctr --hosts-dir` instead of dockerd.

    The dockerd here is 20.10: it has no containerd image store and reads only certificates
    from certs.d. Docker 28+ reads the files with containerd's own code (`ConfigureHosts` with
    `HostDirFromRoot`: `<host:port>`, then `_default`), the same format and lookup as
    `ctr --hosts-dir`, so ctr pulling through them shows what that dockerd would do: a
    registry with a port and docker.io both go to the mirror, and a node pulls with the
    upstream stopped.
    """
    image = test_images.multi_layer
    ported_ref = image.push(registry.host, "e2e/app")
    image.push(registry.host, "library/app")
    hub_ref = f"docker.io/library/app:{image.tag}"
    registry.clear_access_log()
    mirror = mirror_factory(
        "--store=cache",
        f"--upstream={registry.host}=http://{registry.host}",
        f"--upstream=docker.io={registry.url}",
    )

    # The host's Docker configuration: a daemon.json and a registry with a Docker-style CA.
    etc_docker = tmp_path / "etc-docker"
    certs = etc_docker / "certs.d"
    (certs / "registry.example:5000").mkdir(parents=True)
    (certs / "registry.example:5000" / "ca.crt").write_text("the operator's CA\n")
    daemon_json = etc_docker / "daemon.json"
    daemon_json.write_text('{\n  "debug": true\n}\n')
    before = snapshot(etc_docker)

    result = run_mirror_cli(
        "configure",
        "docker",
        f"--daemon-json={daemon_json}",
        f"--certs-dir={certs}",
        "--certs-d=yes",
        f"--mirror={mirror.url}",
    )
    assert "dockerd reads hosts.toml at every pull" in result.stdout
    assert json.loads(daemon_json.read_bytes())["registry-mirrors"] == [mirror.url]
    # No directory names the registry: `_default` is what sends it to the mirror.
    assert sorted(p.parent.name for p in certs.glob("*/hosts.toml")) == [
        "_default",
        "registry.example:5000",
    ]

    warm = containerd_factory()
    for ref in (ported_ref, hub_ref):
        warm.pull(ref, hosts_dir=certs)
        assert warm.image_target(ref) == image.manifest_digest
    upstream = requests_for(registry, "e2e/app") + requests_for(registry, "library/app")
    assert upstream, "the pulls never reached upstream"
    assert all(MIRROR_AGENT in line for line in upstream), "containerd went around the mirror"

    registry.stop()
    node = containerd_factory()
    for ref in (ported_ref, hub_ref):
        node.pull(ref, hosts_dir=certs)
        assert node.image_target(ref) == image.manifest_digest
        for digest in image.host_blobs:
            assert node.blob_path(digest).read_bytes() == image.blob_bytes(digest), digest
    log = mirror.process.log_text()
    assert f"ns={registry.host.replace(':', '%3A')}" in log and "ns=docker.io" in log

    result = run_mirror_cli(
        "cleanup", "docker", f"--daemon-json={daemon_json}", f"--certs-dir={certs}"
    )
    assert f"removed {certs / '_default'}" in result.stdout
    assert snapshot(etc_docker) == before
