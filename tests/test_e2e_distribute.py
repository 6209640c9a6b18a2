"""Distribution on push, every part real: a distribution registry notifies node 1 of a push,
and every node that follows the tag takes it into its runtime, the blobs leaving the registry
once for the whole cluster.

Three containerd nodes and one dockerd node (classic store), each with its mirror, one cluster.
Every node's prefetch file follows `REGISTRY/team/*:prod-*` (webhook) and
`POLLED/poll/app:*` (a second registry without notifications, polled every 5 s). The registry's
`notifications` endpoint is node 1's receiver with the bearer token.
"""

from __future__ import annotations

import functools
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness.cluster import Cluster, MirrorFactory, start_mixed_cluster, wait_until
from harness.containerd import ContainerdNode
from harness.dockerd import DockerNode
from harness.images import TestImage, build_busybox
from harness.mirror_node import MirrorNode
from harness.net import free_port
from harness.registry import Registry, notifications

TOKEN = "distribution-e2e-token-0123456789"


@dataclass
class Swarm:
    registry: Registry
    polled: Registry
    cluster: Cluster
    docker: DockerNode
    docker_mirror: MirrorNode
    common: tuple[str, ...]
    workdir: Path

    @property
    def mirrors(self) -> list[MirrorNode]:
        return [*self.cluster.running(), self.docker_mirror]

    def image(self, name: str) -> TestImage:
        return build_busybox(
            self.workdir / f"{name}-{len(list(self.workdir.iterdir()))}", name=name
        )


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def holds(mirror: MirrorNode, ref: str, digest: str) -> bool:
    try:
        status = get_json(f"{mirror.url}/mirror/v1/prefetch?ref={urllib.request.quote(ref)}")
    except urllib.error.HTTPError:
        return False
    return bool(status["state"] == "held" and status["digest"] == digest)


def wait_all_hold(mirrors: list[MirrorNode], ref: str, digest: str, timeout: float = 120) -> None:
    for mirror in mirrors:
        wait_until(
            functools.partial(holds, mirror, ref, digest), f"{mirror.address}: {ref}", timeout
        )


def distributions(mirror: MirrorNode) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = get_json(f"{mirror.url}/mirror/v1/distributions")["distributions"]
    return found


@pytest.fixture
def swarm(
    tmp_path: Path,
    containerd_factory: Callable[[], ContainerdNode],
    dockerd_factory: Callable[..., DockerNode],
    mirror_factory: MirrorFactory,
) -> Iterator[Swarm]:
    port = free_port()
    registry_host = f"127.0.0.1:{port}"
    polled = Registry(tmp_path / "polled")
    polled.start()
    registry: Registry | None = None
    try:
        token_file = tmp_path / "webhook.token"
        token_file.write_text(TOKEN + "\n")
        prefetch_file = tmp_path / "prefetch.toml"
        prefetch_file.write_text(
            f'[[follow]]\nmatch = "{registry_host}/team/*:prod-*"\n\n'
            f'[[follow]]\nmatch = "{polled.host}/poll/app:*"\npoll = "5s"\n'
        )
        common = (
            f"--prefetch-file={prefetch_file}",
            f"--webhook-token-file={token_file}",
            f"--upstream={registry_host}=http://{registry_host}",
            f"--upstream={polled.host}={polled.url}",
        )
        mixed = start_mixed_cluster(
            tmp_path, containerd_factory, dockerd_factory, mirror_factory, common
        )
        cluster, docker, docker_mirror = mixed.cluster, mixed.docker, mixed.docker_mirror
        cluster.wait_connected()
        receiver = f"{cluster.mirror(0).url}/mirror/v1/events/distribution"
        registry = Registry(
            tmp_path / "registry", port=port, extra_config=notifications(receiver, TOKEN)
        )
        registry.start()
        workdir = tmp_path / "images"
        workdir.mkdir()
        yield Swarm(registry, polled, cluster, docker, docker_mirror, common, workdir)
    finally:
        if registry is not None:
            registry.stop()
        polled.stop()


def test_a_push_reaches_every_node_once_and_a_new_push_moves_them(swarm: Swarm) -> None:
    s = swarm
    ref = f"{s.registry.host}/team/web:prod-1"
    first = s.image("web")
    first.push_as(s.registry.host, "team/web", "prod-1")
    wait_all_hold(s.mirrors, ref, first.manifest_digest)
    for digest in [first.config_digest, *first.layer_digests]:
        assert s.registry.blob_fetch_count(digest) == 1, digest
    for index, node in enumerate(s.cluster.nodes):
        assert node.image_target(ref, "k8s.io") == first.manifest_digest, index
    s.docker.docker("image", "inspect", ref)

    # The origin saw every node's part.
    def complete() -> bool:
        found = [d for d in distributions(s.cluster.mirror(0)) if d["ref"] == ref]
        return bool(found and found[0]["complete"] and found[0]["nodes"]["done"] == 4)

    try:
        wait_until(complete, "node 1 to see the distribution complete", 30)
    except TimeoutError:
        print(json.dumps(distributions(s.cluster.mirror(0)), indent=1))
        raise
    [distribution] = [d for d in distributions(s.cluster.mirror(0)) if d["ref"] == ref]
    assert distribution["trigger"] == "distribution"
    assert distribution["digest"] == first.manifest_digest
    assert distribution["nodes"] == {"total": 4, "done": 4, "failed": 0, "fetching": 0}
    size = sum(first.host_blobs[d] for d in [first.config_digest, *first.layer_digests])
    assert distribution["bytes"]["upstream"] == size  # once, by whichever node fetched it

    # A new push of the tag moves every node.
    second = s.image("web")
    second.push_as(s.registry.host, "team/web", "prod-1")
    wait_all_hold(s.mirrors, ref, second.manifest_digest)
    assert s.cluster.nodes[1].image_target(ref, "k8s.io") == second.manifest_digest


def test_duplicates_are_one_distribution_and_a_wrong_token_nothing(swarm: Swarm) -> None:
    s = swarm
    image = s.image("dup")
    image.push(s.registry.host, "team/dup")
    ref = f"{s.registry.host}/team/dup:v1"  # not prod-*: followed by nobody
    envelope = json.dumps(
        {
            "events": [
                {
                    "action": "push",
                    "target": {
                        "mediaType": image.media_type,
                        "repository": "team/dup",
                        "tag": "prod-dup",
                        "digest": image.manifest_digest,
                    },
                    "request": {"host": s.registry.host, "method": "PUT"},
                }
            ]
        }
    ).encode()
    receiver = f"{s.cluster.mirror(0).url}/mirror/v1/events/distribution"

    def post(token: str) -> int:
        request = urllib.request.Request(
            receiver,
            data=envelope,
            method="POST",
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/vnd.docker.distribution.events.v1+json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def started() -> list[dict[str, Any]]:
        return [d for d in distributions(s.cluster.mirror(0)) if d["ref"].endswith("dup:prod-dup")]

    assert post("wrong-token-wrong-token") == 401
    assert started() == []
    for _ in range(100):
        assert post(TOKEN) == 202
    found = [
        d for d in distributions(s.cluster.mirror(0)) if d["ref"].endswith("team/dup:prod-dup")
    ]
    assert len(found) == 1
    assert s.cluster.mirror(0).metric("mirror_distributions_total", outcome="merged") >= 99
    assert ref  # the pushed tag itself matched no follow: nothing else was started for it


def test_a_polled_follow_picks_up_pushes_without_a_webhook(swarm: Swarm) -> None:
    s = swarm
    ref = f"{s.polled.host}/poll/app:v1"
    first = s.image("polled")
    first.push(s.polled.host, "poll/app")
    wait_all_hold(s.mirrors, ref, first.manifest_digest)
    second = s.image("polled")
    second.push(s.polled.host, "poll/app")
    wait_all_hold(s.mirrors, ref, second.manifest_digest)
    polls = [d for m in s.mirrors for d in distributions(m) if d["ref"] == ref]
    assert all(d["trigger"] == "poll" for d in polls)


def test_a_node_down_during_the_push_catches_up_when_it_returns(
    swarm: Swarm, mirror_factory: MirrorFactory
) -> None:
    s = swarm
    s.cluster.mirror(2).stop()
    ref = f"{s.registry.host}/team/late:prod-1"
    image = s.image("late")
    image.push_as(s.registry.host, "team/late", "prod-1")
    wait_all_hold(
        [s.cluster.mirror(0), s.cluster.mirror(1), s.docker_mirror], ref, image.manifest_digest
    )
    back = s.cluster.start_mirror(mirror_factory, 2, *s.common)
    wait_all_hold([back], ref, image.manifest_digest)
    assert s.cluster.nodes[2].image_target(ref, "k8s.io") == image.manifest_digest
