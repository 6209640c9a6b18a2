"""`DockerRuntime` against a real dockerd (classic store, vfs), a real mirror and a real registry.

The plan is built from the test image's own fields, as the prefetcher would resolve it. dockerd
runs with ``registry-mirrors`` unset: the runtime names the node's mirror in the pull reference
itself (``MIRROR/<registry>/<repository>@<digest>``). The upstream registry is reachable both
under a port-less name (``--upstream=registry.test=URL``) and as itself (``127.0.0.1:PORT``,
spelled ``127.0.0.1_PORT`` in the pull: Docker's grammar has no room for a port inside a path
component).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness.dockerd import DockerNode
from harness.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    TestImage,
    build_busybox,
)
from harness.mirror_node import MirrorNode
from harness.registry import Registry

from mirror.errors import ConfigError, RuntimeImportError
from mirror.oci.reference import parse_digest
from mirror.prefetch.model import Descriptor, ImagePlan, parse_image_ref
from mirror.prefetch.runtimes.docker import DockerRuntime, docker_name

DockerFactory = Callable[..., DockerNode]
MirrorFactory = Callable[..., MirrorNode]

# The name the mirror knows the test registry by (see the module docstring).
UPSTREAM = "registry.test"


class LayoutBlobs:
    """The image's bytes from its layout, as the prefetcher hands a runtime its blobs.

    Records what was asked for: the Docker runtime must ask for nothing (dockerd pulls).
    """

    def __init__(self, image: TestImage) -> None:
        self.image = image
        self.asked: list[str] = []

    async def read(self, descriptor: Descriptor) -> AsyncIterator[bytes]:
        self.asked.append(str(descriptor.digest))
        yield self.image.blob_bytes(str(descriptor.digest))


def plan_for(image: TestImage, *, name: str, fetched: str) -> ImagePlan:
    """The plan the prefetcher resolves for ``image``, expected as ``name``, fetched from
    ``fetched`` (``registry/repository``, by the image's digest)."""
    docker = image.media_type == DOCKER_MANIFEST
    config_type = DOCKER_CONFIG if docker else OCI_CONFIG
    layer_type = DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP

    def descriptor(media_type: str, digest: str) -> Descriptor:
        return Descriptor(media_type, parse_digest(digest), image.blobs[digest])

    top = descriptor(image.media_type, image.manifest_digest)
    return ImagePlan(
        name=parse_image_ref(name),
        fetched=parse_image_ref(f"{fetched}@{image.manifest_digest}"),
        target=top,
        manifest=top,
        config=descriptor(config_type, image.config_digest),
        layers=tuple(descriptor(layer_type, digest) for digest in image.layer_digests),
    )


@dataclass
class DockerHost:
    """One Docker node: its dockerd, its mirror (upstream: the test registry), the runtime."""

    registry: Registry
    mirror: MirrorNode
    docker: DockerNode
    runtime: DockerRuntime

    def repo_names(self, image_id: str) -> tuple[list[str], list[str]]:
        """``RepoTags`` and ``RepoDigests`` of an image."""
        out = self.docker.docker(
            "image", "inspect", "--format", "{{json .RepoTags}}|{{json .RepoDigests}}", image_id
        ).stdout
        tags, digests = out.strip().split("|")
        return json.loads(tags), json.loads(digests)

    def listed(self) -> list[str]:
        """``REPOSITORY:TAG`` of every image ``docker images`` shows (``<none>`` included)."""
        out = self.docker.docker("images", "--all", "--format", "{{.Repository}}:{{.Tag}}").stdout
        return sorted(line for line in out.splitlines() if line)


@pytest.fixture
def host(
    registry: Registry, mirror_factory: MirrorFactory, dockerd_factory: DockerFactory
) -> DockerHost:
    node = dockerd_factory()  # registry-mirrors unset
    mirror = mirror_factory(
        "--store=docker",
        f"--docker-host={node.host}",
        f"--upstream={UPSTREAM}={registry.url}",
        f"--upstream=docker.io={registry.url}",
        f"--upstream={registry.host}={registry.url}",  # plain HTTP under its own name too
    )
    # 127.0.0.0/8 is an insecure registry range by default: dockerd speaks plain HTTP to it.
    return DockerHost(registry, mirror, node, DockerRuntime(node.host, pull_via=mirror.address))


@pytest.fixture
def busybox(tmp_path: Path, registry: Registry) -> TestImage:
    image = build_busybox(tmp_path / "busybox")
    image.push(registry.host, "lib/bb")
    return image


async def test_take_names_the_image_which_runs_with_every_registry_gone(
    host: DockerHost, busybox: TestImage
) -> None:
    out = host.docker.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout
    assert json.loads(out) in ([], None), "the pull must not depend on registry-mirrors"
    plan = plan_for(busybox, name=f"{UPSTREAM}/lib/bb:v1", fetched=f"{UPSTREAM}/lib/bb")
    blobs = LayoutBlobs(busybox)

    assert not await host.runtime.holds(plan)
    await host.runtime.take(plan, blobs)
    assert await host.runtime.holds(plan)

    assert blobs.asked == [], "dockerd pulls every blob from the mirror itself"
    assert host.docker.image_ids() == [busybox.config_digest]
    assert host.listed() == [f"{UPSTREAM}/lib/bb:v1"]
    assert host.repo_names(busybox.config_digest) == ([f"{UPSTREAM}/lib/bb:v1"], [])
    # The pull went through the node's mirror, which fetched from upstream.
    blob_fetches = host.mirror.metric(
        "mirror_requests_total", method="GET", kind="blob", status="200"
    )
    assert blob_fetches == 1 + len(busybox.layer_digests)  # config and layers
    assert host.registry.blob_fetch_count(busybox.config_digest) == 1
    await host.runtime.take(plan, blobs)  # again: the same outcome, nothing fetched upstream
    assert host.listed() == [f"{UPSTREAM}/lib/bb:v1"]
    assert host.registry.blob_fetch_count(busybox.config_digest) == 1

    host.registry.stop()
    host.mirror.stop()
    run = host.docker.docker(
        "run", "--rm", "--network", "none", f"{UPSTREAM}/lib/bb:v1", "/bin/busybox", "echo", "ok"
    )
    assert run.stdout == "ok\n"
    assert await host.runtime.holds(plan)


@pytest.mark.parametrize(
    ("name", "fetched", "short_name"),
    [
        ("registry.internal:5000/infra/bb:v1", f"{UPSTREAM}/lib/bb", None),
        ("docker.io/library/traefik:v2.10", "docker.io/library/traefik", "traefik:v2.10"),
    ],
    ids=["other-registry-with-port", "docker-hub"],
)
async def test_take_tags_the_expected_name_not_the_fetched_one(
    host: DockerHost, busybox: TestImage, name: str, fetched: str, short_name: str | None
) -> None:
    busybox.push(host.registry.host, fetched.partition("/")[2])
    plan = plan_for(busybox, name=name, fetched=fetched)

    await host.runtime.take(plan, LayoutBlobs(busybox))

    assert await host.runtime.holds(plan)
    shown = short_name or name  # dockerd shows Docker Hub names in their short form
    image_id = host.docker.docker("image", "inspect", "--format", "{{.Id}}", shown).stdout
    assert image_id.strip() == busybox.config_digest
    assert host.listed() == [shown]
    assert host.repo_names(busybox.config_digest) == ([shown], [])


async def test_holds_is_false_for_a_name_on_another_image(
    host: DockerHost, busybox: TestImage, tmp_path: Path
) -> None:
    other = build_busybox(tmp_path / "other", name="other")
    other.push(host.registry.host, "lib/other")
    name = f"{UPSTREAM}/infra/app:v1"
    plan = plan_for(busybox, name=name, fetched=f"{UPSTREAM}/lib/bb")
    other_plan = plan_for(other, name=name, fetched=f"{UPSTREAM}/lib/other")

    await host.runtime.take(other_plan, LayoutBlobs(other))
    assert await host.runtime.holds(other_plan)
    assert not await host.runtime.holds(plan)

    await host.runtime.take(plan, LayoutBlobs(busybox))  # moves the tag, as a pull would
    assert await host.runtime.holds(plan)
    assert not await host.runtime.holds(other_plan)
    assert host.repo_names(busybox.config_digest) == ([name], [])


async def test_a_digest_only_name_gets_a_pinned_tag_in_its_repository(
    host: DockerHost, busybox: TestImage
) -> None:
    name = f"registry.internal:5000/infra/bb@{busybox.manifest_digest}"
    plan = plan_for(busybox, name=name, fetched=f"{UPSTREAM}/lib/bb")
    hex12 = busybox.manifest_digest.partition(":")[2][:12]
    assert docker_name(plan.name) == f"registry.internal:5000/infra/bb:pinned-{hex12}"

    assert not await host.runtime.holds(plan)
    await host.runtime.take(plan, LayoutBlobs(busybox))
    assert await host.runtime.holds(plan)
    assert host.listed() == [f"registry.internal:5000/infra/bb:pinned-{hex12}"]


async def test_a_digest_the_mirror_cannot_serve_is_a_one_line_runtime_import_error(
    host: DockerHost, busybox: TestImage
) -> None:
    plan = plan_for(busybox, name=f"{UPSTREAM}/lib/bb:v1", fetched=f"{UPSTREAM}/lib/bb")
    unknown = parse_digest("sha256:" + secrets.token_hex(32))
    plan = ImagePlan(
        plan.name,
        plan.fetched,
        Descriptor(plan.target.media_type, unknown, 100),
        Descriptor(plan.target.media_type, unknown, 100),
        plan.config,
        plan.layers,
    )

    with pytest.raises(RuntimeImportError) as caught:
        await host.runtime.take(plan, LayoutBlobs(busybox))

    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"docker pull {host.mirror.address}/{UPSTREAM}/lib/bb@{unknown}: ")
    assert "manifest unknown" in message
    assert "http+docker" not in message, "dockerd's reason, not the SDK's request URL"
    assert host.listed() == []
    assert not await host.runtime.holds(plan)


async def test_a_fetched_registry_with_a_port_is_pulled_as_host_underscore_port(
    host: DockerHost, busybox: TestImage
) -> None:
    """Docker allows no `:` in a path component: the registry is spelled `127.0.0.1_PORT`,
    which the mirror reads back as `127.0.0.1:PORT` (no upstream override needed)."""
    fetched = f"{host.registry.host}/lib/bb"
    plan = plan_for(busybox, name="registry.internal:5000/infra/bb:v1", fetched=fetched)
    assert host.runtime.pull_reference(plan).startswith(
        f"{host.mirror.address}/{host.registry.host.replace(':', '_')}/lib/bb@"
    )

    await host.runtime.take(plan, LayoutBlobs(busybox))

    assert await host.runtime.holds(plan)
    assert host.listed() == ["registry.internal:5000/infra/bb:v1"]
    assert host.registry.blob_fetch_count(busybox.config_digest) == 1


async def test_a_registry_docker_cannot_spell_is_refused_before_dockerd_is_asked(
    host: DockerHost, busybox: TestImage
) -> None:
    plan = plan_for(busybox, name=f"{UPSTREAM}/lib/bb:v1", fetched="[::1]:5000/lib/bb")

    with pytest.raises(RuntimeImportError, match="cannot name the registry"):
        await host.runtime.take(plan, LayoutBlobs(busybox))

    assert host.listed() == []


async def test_an_unreachable_daemon_is_a_runtime_import_error(tmp_path: Path) -> None:
    image = build_busybox(tmp_path / "busybox")
    runtime = DockerRuntime(f"unix://{tmp_path}/no-docker.sock", pull_via="127.0.0.1:1")
    plan = plan_for(image, name=f"{UPSTREAM}/lib/bb:v1", fetched=f"{UPSTREAM}/lib/bb")

    with pytest.raises(RuntimeImportError, match=r"no-docker\.sock") as held:
        await runtime.holds(plan)
    with pytest.raises(RuntimeImportError, match=r"no-docker\.sock") as taken:
        await runtime.take(plan, LayoutBlobs(image))
    assert "\n" not in str(held.value)
    assert "\n" not in str(taken.value)


@pytest.mark.parametrize(
    "pull_via", ["http://127.0.0.1:5000", "127.0.0.1:5000/v2", "127.0.0.1", "[::1]", ""]
)
def test_pull_via_is_a_host_and_port(pull_via: str) -> None:
    with pytest.raises(ConfigError, match="host:port"):
        DockerRuntime("unix:///run/docker.sock", pull_via=pull_via)
