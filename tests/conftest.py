"""Fixtures for tests against real daemons: registry, containerd nodes, test images.

A missing daemon binary fails the tests that need it, with a message naming it: a silent
skip would let CI pass without ever exercising the real tools.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.containerd import CONTAINERD_BINARY, CTR_BINARY, ContainerdNode, start_containerd
from harness.dockerd import DOCKER_BINARY, DOCKERD_BINARY, DockerNode, start_dockerd
from harness.images import SKOPEO_BINARY, TestImages, build_test_images
from harness.mirror_node import MirrorNode, start_mirror
from harness.process import stop_all
from harness.registry import REGISTRY_BINARY, Registry

# pytest puts this directory (tests/ has no __init__.py) on sys.path: import the harness as
# ``harness``, never ``tests.harness`` (that would load a second copy of every module).

REQUIRED_BINARIES = (CONTAINERD_BINARY, CTR_BINARY, SKOPEO_BINARY, REGISTRY_BINARY)


@pytest.fixture(scope="session")
def required_binaries() -> dict[str, str]:
    """Name -> path of every daemon/tool the harness runs; fail (never skip) if one is missing."""
    found = {name: shutil.which(name) for name in REQUIRED_BINARIES}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        pytest.fail(
            f"required binaries not on PATH: {', '.join(missing)}. Install the Debian packages "
            "containerd, skopeo and docker-registry; these tests must not be skipped.",
            pytrace=False,
        )
    return {name: path for name, path in found.items() if path is not None}


@pytest.fixture(scope="session")
def test_images(
    tmp_path_factory: pytest.TempPathFactory, required_binaries: dict[str, str]
) -> TestImages:
    """The three synthetic images, built once per session (fresh random digests each run)."""
    return build_test_images(tmp_path_factory.mktemp("images"))


@pytest.fixture
def registry_factory(
    tmp_path: Path, required_binaries: dict[str, str]
) -> Iterator[Callable[..., Registry]]:
    """Start extra registries: ``registry_factory(extra_config="")``; all stopped at teardown."""
    started: list[Registry] = []

    def make(extra_config: str = "") -> Registry:
        reg = Registry(tmp_path / f"registry{len(started)}", extra_config=extra_config)
        started.append(reg)
        reg.start()
        return reg

    yield make
    stop_all(started)


@pytest.fixture
def registry(registry_factory: Callable[..., Registry]) -> Registry:
    """A started plain registry (the upstream); stopped at teardown."""
    return registry_factory()


@pytest.fixture
def containerd_factory(
    tmp_path: Path, required_binaries: dict[str, str]
) -> Iterator[Callable[[], ContainerdNode]]:
    """Start containerd nodes, each in its own directory; all stopped at teardown."""
    nodes: list[ContainerdNode] = []

    def make() -> ContainerdNode:
        node = start_containerd(tmp_path / f"node{len(nodes)}")
        nodes.append(node)
        return node

    yield make
    stop_all(nodes)


@pytest.fixture
def mirror_factory(tmp_path: Path) -> Iterator[Callable[..., MirrorNode]]:
    """Start `mirror run` nodes with extra flags: ``mirror_factory("--store=cache")``.

    ``host`` picks the loopback address the node listens on (127.0.0.11, .12, ... make
    distinct "machines").
    """
    started: list[MirrorNode] = []

    def make(*args: str, host: str = "127.0.0.1") -> MirrorNode:
        node = start_mirror(tmp_path / f"mirror{len(started)}", *args, host=host)
        started.append(node)
        return node

    yield make
    stop_all(started)


@pytest.fixture
def dockerd_factory(tmp_path: Path) -> Iterator[Callable[..., DockerNode]]:
    """Start dockerd nodes: ``dockerd_factory(registry_mirrors=[...])`` takes the keyword
    arguments of ``start_dockerd``; each node gets its own directory; all stopped at teardown.

    Fails (never skips) when dockerd, the docker CLI or containerd (which dockerd supervises)
    is missing, for the same reason as ``required_binaries``.
    """
    wanted = (DOCKERD_BINARY, DOCKER_BINARY, CONTAINERD_BINARY)
    missing = sorted(name for name in wanted if shutil.which(name) is None)
    if missing:
        pytest.fail(
            f"required binaries not on PATH: {', '.join(missing)}. Install the Debian package "
            "docker.io (dockerd, containerd) and a docker CLI; these tests must not be skipped.",
            pytrace=False,
        )
    nodes: list[DockerNode] = []

    def make(**kwargs: Any) -> DockerNode:
        node = start_dockerd(tmp_path / f"dockerd{len(nodes)}", **kwargs)
        nodes.append(node)
        return node

    yield make
    stop_all(nodes)
