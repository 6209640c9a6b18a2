"""`mirror configure containers` end to end: podman and skopeo pull through a real node with the
drop-in it writes, and `mirror cleanup containers` puts `/etc/containers` back as it was.

Each tool runs with a test-made `/etc/containers` bind-mounted in a private mount namespace
(harness.podman): containers/image reads drop-ins from that one directory only, and the
machine's own must stay untouched. A pull that still works with the upstream registry stopped,
into an empty store, can only have come from the node; while the upstream runs, every request
it sees carries the node's User-Agent, so the tools never went around the node.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness.images import TestImage, TestImages
from harness.mirror_node import MirrorNode
from harness.operator import run_mirror_cli, snapshot
from harness.podman import PODMAN_BINARY, UNSHARE_BINARY, ContainersHost
from harness.registry import Registry

from mirror.runtime.containers_registries import DROP_IN

MirrorFactory = Callable[..., MirrorNode]

# The User-Agent mirror sends upstream (mirror.upstream.client).
MIRROR_AGENT = '"mirror/'


@pytest.fixture
def host(tmp_path: Path) -> Iterator[ContainersHost]:
    """A host's `/etc/containers`, for podman and skopeo; its runroots removed at teardown.

    Fails (never skips) when a tool is missing, like the other daemon fixtures."""
    missing = [name for name in (PODMAN_BINARY, UNSHARE_BINARY) if shutil.which(name) is None]
    if missing:
        pytest.fail(
            f"required binaries not on PATH: {', '.join(missing)}. Install the Debian packages "
            "podman and util-linux (bin/setup-env --system); these tests must not be skipped.",
            pytrace=False,
        )
    made = ContainersHost.create(tmp_path / "host")
    yield made
    made.close()


def went_through_the_mirror(registry: Registry, repository: str) -> None:
    upstream = [line for line in registry.access_log() if f"/v2/{repository}/" in line]
    assert upstream, "the pull never reached upstream"
    assert all(MIRROR_AGENT in line for line in upstream), "the tool went around the mirror"


def drop_in_entry(host: ContainersHost, prefix: str) -> dict[str, object]:
    document = tomllib.loads((host.registries_dir / DROP_IN).read_text())
    [entry] = [table for table in document["registry"] if table["prefix"] == prefix]
    return dict(entry)


def sha256_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def start(
    registry: Registry, image: TestImage, repository: str, mirror_factory: MirrorFactory, name: str
) -> tuple[str, MirrorNode]:
    """Push `image` upstream and start a node that reaches the registry `name` at it."""
    image.push(registry.host, repository)
    registry.clear_access_log()
    mirror = mirror_factory("--store=cache", f"--upstream={name}=http://{registry.host}")
    return f"{name}/{repository}:{image.tag}", mirror


def test_podman_pulls_through_the_mirror_by_tag_and_by_digest_with_the_upstream_stopped(
    tmp_path: Path,
    host: ContainersHost,
    registry: Registry,
    test_images: TestImages,
    mirror_factory: MirrorFactory,
) -> None:
    image = test_images.index
    ref, mirror = start(registry, image, "e2e/app", mirror_factory, registry.host)
    # The host's own configuration: the registry is plain HTTP, said in the main file, and a
    # drop-in of its own. configure must keep the first and leave the second alone.
    (host.etc_dir / "registries.conf").write_text(
        f'unqualified-search-registries = ["docker.io"]\n\n'
        f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n'
    )
    (host.registries_dir / "000-shortnames.conf").write_text(
        f'[aliases]\n  "e2e-app" = "{registry.host}/e2e/app"\n'
    )
    before = snapshot(host.etc_dir)

    result = run_mirror_cli(
        "configure",
        "containers",
        f"--registries-dir={host.registries_dir}",
        f"--mirror={mirror.url}",
        f"--mirrored-registries={registry.host}",
        f"--upstream={registry.host}=http://{registry.host}",
    )
    assert "SIGHUP" in result.stdout
    component = registry.host.replace(":", "_")  # 127.0.0.1_PORT: no ':' in a path component
    assert drop_in_entry(host, registry.host) == {
        "prefix": registry.host,
        "location": registry.host,
        "insecure": True,
        "mirror": [{"location": f"{mirror.address}/{component}", "insecure": True}],
    }

    assert host.pull(ref, tmp_path / "warm") == image.manifest_digest
    assert mirror.metric("mirror_requests_total", source="upstream") > 0
    went_through_the_mirror(registry, "e2e/app")

    registry.stop()
    assert host.pull(ref, tmp_path / "by-tag") == image.manifest_digest
    by_digest = f"{registry.host}/e2e/app@{image.manifest_digest}"
    assert host.pull(by_digest, tmp_path / "by-digest") == image.manifest_digest

    run_mirror_cli("cleanup", "containers", f"--registries-dir={host.registries_dir}")
    assert snapshot(host.etc_dir) == before


def test_skopeo_copies_through_the_mirror_by_tag_and_by_digest_with_the_upstream_stopped(
    tmp_path: Path,
    host: ContainersHost,
    registry: Registry,
    test_images: TestImages,
    mirror_factory: MirrorFactory,
) -> None:
    image = test_images.docker_v2
    ref, mirror = start(registry, image, "e2e/tool", mirror_factory, registry.host)
    before = snapshot(host.etc_dir)
    run_mirror_cli(
        "configure",
        "containers",
        f"--registries-dir={host.registries_dir}",
        f"--mirror={mirror.url}",
        f"--mirrored-registries={registry.host}",
        f"--upstream={registry.host}=http://{registry.host}",
    )

    assert sha256_of(host.skopeo_copy(ref, tmp_path / "warm")) == image.manifest_digest
    went_through_the_mirror(registry, "e2e/tool")

    registry.stop()
    assert sha256_of(host.skopeo_copy(ref, tmp_path / "by-tag")) == image.manifest_digest
    by_digest = f"{registry.host}/e2e/tool@{image.manifest_digest}"
    assert sha256_of(host.skopeo_copy(by_digest, tmp_path / "by-digest")) == image.manifest_digest

    run_mirror_cli("cleanup", "containers", f"--registries-dir={host.registries_dir}")
    assert snapshot(host.etc_dir) == before


def test_a_registry_with_a_port_goes_to_the_mirror_as_host_port(
    tmp_path: Path,
    host: ContainersHost,
    registry: Registry,
    test_images: TestImages,
    mirror_factory: MirrorFactory,
) -> None:
    """`registry.internal:5000` is the mirror's `registry.internal_5000`; the name needs no DNS:
    the node reaches it through --upstream, and so does the runtime's fallback location."""
    name = "registry.internal:5000"
    image = test_images.multi_layer
    ref, mirror = start(registry, image, "team/app", mirror_factory, name)
    run_mirror_cli(
        "configure",
        "containers",
        f"--registries-dir={host.registries_dir}",
        f"--mirror={mirror.url}",
        f"--mirrored-registries={name}",
        f"--upstream={name}=http://{registry.host}",
    )
    entry = drop_in_entry(host, name)
    assert entry["location"] == registry.host
    assert entry["mirror"] == [
        {"location": f"{mirror.address}/registry.internal_5000", "insecure": True}
    ]

    assert host.pull(ref, tmp_path / "warm") == image.manifest_digest
    went_through_the_mirror(registry, "team/app")

    registry.stop()
    by_digest = f"{name}/team/app@{image.manifest_digest}"
    assert host.pull(by_digest, tmp_path / "by-digest") == image.manifest_digest
    assert sha256_of(host.skopeo_copy(ref, tmp_path / "copy")) == image.manifest_digest


def test_a_read_only_registries_dir_is_a_one_line_error(tmp_path: Path) -> None:
    """As on a host whose /etc is read-only: a read-only bind mount of the directory, in a
    private mount namespace (root writes through mode bits, so chmod would prove nothing)."""
    directory = tmp_path / "registries.conf.d"
    directory.mkdir()
    (directory / "000-shortnames.conf").write_text("[aliases]\n")
    before = snapshot(directory)
    read_only = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    namespace = [UNSHARE_BINARY, "--mount", "--propagation", "private", "--"]
    configure = [sys.executable, "-m", "mirror", "configure", "containers"]
    flags = [f"--registries-dir={directory}", "--mirrored-registries=docker.io"]
    result = subprocess.run(
        [*namespace, "sh", "-c", read_only, "sh", str(directory), *configure, *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"mirror: error: cannot write {directory}/")
    assert "Read-only file system" in result.stderr
    assert snapshot(directory) == before
