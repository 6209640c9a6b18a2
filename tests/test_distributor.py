"""Distribution on push, without sockets: an event reaches one node, every follower takes it.

Three (then four) nodes, each with the real content service over a real node cache, the
prefetcher with an in-memory runtime, and the distributor; the cluster is the in-memory router
(`routing/memory.py`, which broadcasts like the DHT), reports go straight to the origin's
distributor. The real path (webhooks from a real registry, DHT, runtimes) is
test_e2e_distribute.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from harness.memory_runtime import MemoryRuntime, make_image, publish, start_prefetch_parts
from harness.memory_sources import MemoryUpstream
from harness.memory_store import MemoryStore

from mirror.content.service import ContentPolicy, ContentService
from mirror.metrics import Metrics
from mirror.prefetch import distributor as distributor_module
from mirror.prefetch.client import distribute, node_url
from mirror.prefetch.distributor import Distribution, Distributor, parse_report
from mirror.prefetch.model import Follow, PushEvent, parse_image_ref
from mirror.prefetch.prefetcher import Prefetcher
from mirror.registry.access import AccessPolicy
from mirror.registry.api import RegistryApi
from mirror.registry.distributions_api import DistributionsApi
from mirror.routing.memory import MemoryCluster

POLICY = ContentPolicy(mirrored_registries=None, resolve_tags=True, tag_timeout=1.0)
FOLLOW = Follow("registry.test/team/*:prod-*")
REF = "registry.test/team/web:prod-1"


@dataclass
class Node:
    address: str
    distributor: Distributor
    prefetcher: Prefetcher
    runtime: MemoryRuntime
    metrics: Metrics
    closers: list[Callable[[], Awaitable[None]]]


@dataclass
class World:
    cluster: MemoryCluster
    upstream: MemoryUpstream
    nodes: list[Node]
    add: Callable[[list[Follow]], Awaitable[Node]]

    def publish(self, ref: str, label: str) -> str:
        image = make_image(label)
        publish(self.upstream, ref, image)
        return image.digest

    def node(self, address: str) -> Node:
        return next(node for node in self.nodes if node.address == address)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    cluster = MemoryCluster()
    upstream = MemoryUpstream()
    nodes: list[Node] = []

    async def add(follows: list[Follow]) -> Node:
        index = len(nodes)
        address = f"10.0.0.{index + 1}:5000"
        router = cluster.router(bytes([index + 1]) * 20, address)
        parts = await start_prefetch_parts(tmp_path / f"cache{index}", router, upstream, {})
        prefetcher, runtime, metrics = parts.prefetcher, parts.runtime, parts.metrics

        async def reporter(origin: str, distribution_id: str, body: dict[str, object]) -> None:
            progress = parse_report(json.loads(json.dumps(body)))  # as it travels
            assert progress is not None
            world.node(origin).distributor.record(distribution_id, address, progress)

        distributor = Distributor(
            prefetcher,
            metrics,
            own_address=address,
            broadcaster=router,
            reporter=reporter,
        )
        distributor.set_follows(follows)
        node = Node(
            address,
            distributor,
            prefetcher,
            runtime,
            metrics,
            [distributor.close, parts.close],
        )
        nodes.append(node)
        return node

    world = World(cluster, upstream, nodes, add)
    for follows in ([FOLLOW], [FOLLOW], []):
        await add(follows)
    yield world
    for node in nodes:
        for close in node.closers:
            await close()


async def finished(node: Node, distribution: Distribution, nodes: int) -> Distribution:
    """The origin's view once `nodes` nodes reported an end."""
    return await asyncio.wait_for(node.distributor.ended(distribution.id, nodes), 10)


async def test_a_push_reaches_every_follower_and_the_origin_counts_them(world: World) -> None:
    digest = world.publish(REF, "one")
    origin = world.nodes[0]
    distribution = origin.distributor.start(PushEvent(parse_image_ref(REF), "distribution"))
    await finished(origin, distribution, 2)
    assert distribution.counts() == {"total": 2, "done": 2, "failed": 0, "fetching": 0}
    for node in world.nodes[:2]:
        assert node.runtime.images[REF][0] == digest
    assert world.nodes[2].runtime.images == {}  # follows nothing
    assert set(distribution.nodes) == {"10.0.0.1:5000", "10.0.0.2:5000"}
    assert all(p.digest == digest for p in distribution.nodes.values())


async def test_the_same_push_twice_or_a_flood_is_one_distribution(world: World) -> None:
    digest = world.publish(REF, "one")
    event = PushEvent(parse_image_ref(f"{REF}@{digest}"), "distribution")
    origin = world.nodes[0]
    first = origin.distributor.start(event)
    for _ in range(100):
        assert origin.distributor.start(event) is first
    assert len(origin.distributor.distributions()) == 1
    sample = origin.metrics.registry.get_sample_value
    assert sample("mirror_distributions_total", {"outcome": "started"}) == 1
    assert sample("mirror_distributions_total", {"outcome": "merged"}) == 100
    await finished(origin, first, 2)
    assert world.nodes[1].runtime.takes == [REF]


async def test_a_new_push_of_the_tag_moves_every_follower(world: World) -> None:
    origin, follower = world.nodes[0], world.nodes[1]
    first_digest = world.publish(REF, "one")
    first = origin.distributor.start(PushEvent(parse_image_ref(f"{REF}@{first_digest}"), "x"))
    await finished(origin, first, 2)
    second_digest = world.publish(REF, "two")
    second = origin.distributor.start(PushEvent(parse_image_ref(f"{REF}@{second_digest}"), "x"))
    assert second is not first
    await finished(origin, second, 2)
    assert follower.runtime.images[REF][0] == second_digest


async def test_a_follow_keeps_only_the_latest_tags_of_a_repository_pinned(world: World) -> None:
    """CI pushing a tag per build must not pin every build on every node until it restarts."""
    origin, follower = world.nodes[0], world.nodes[1]
    follower.distributor.set_follows([Follow("registry.test/team/*:prod-*", keep=2)])
    other = "registry.test/team/api:prod-1"
    pushed = [REF, other, *(f"registry.test/team/web:prod-{n}" for n in (2, 3))]
    for index, ref in enumerate(pushed):
        digest = world.publish(ref, f"build {index}")
        event = PushEvent(parse_image_ref(f"{ref}@{digest}"), "x")
        await finished(origin, origin.distributor.start(event), 2)
    # web keeps its two latest, api its one; the origin follows with the default of 3.
    pinned = {str(status.ref) for status in follower.prefetcher.statuses()}
    assert pinned == {other, *pushed[2:]}
    assert {str(status.ref) for status in origin.prefetcher.statuses()} == set(pushed)
    # Pushed again, the oldest kept tag becomes the latest: the other one goes.
    digest = world.publish(pushed[2], "build 2 again")
    event = PushEvent(parse_image_ref(f"{pushed[2]}@{digest}"), "x")
    await finished(origin, origin.distributor.start(event), 2)
    digest = world.publish("registry.test/team/web:prod-4", "build 4")
    event = PushEvent(parse_image_ref(f"registry.test/team/web:prod-4@{digest}"), "x")
    await finished(origin, origin.distributor.start(event), 2)
    pinned = {str(status.ref) for status in follower.prefetcher.statuses()}
    assert pinned == {other, pushed[2], "registry.test/team/web:prod-4"}


async def test_labels_of_a_follow_choose_the_nodes(world: World) -> None:
    world.publish(REF, "one")
    web_only = Follow("registry.test/team/*:prod-*", nodes={"tier": "web"})
    for node in world.nodes:
        node.distributor.set_follows([web_only])
    origin = world.nodes[0]
    distribution = origin.distributor.start(PushEvent(parse_image_ref(REF), "cli"))
    for node in world.nodes:
        assert not node.distributor.follows(distribution.ref)
    assert distribution.counts()["total"] == 0  # no node carries tier=web
    assert all(node.runtime.takes == [] for node in world.nodes)


async def test_a_node_that_was_down_catches_up(world: World) -> None:
    digest = world.publish(REF, "one")
    origin = world.nodes[0]
    distribution = origin.distributor.start(PushEvent(parse_image_ref(REF), "distribution"))
    await finished(origin, distribution, 2)
    late = await world.add([FOLLOW])
    await late.distributor.catch_up()
    await finished(origin, distribution, 3)
    assert late.runtime.images[REF][0] == digest
    assert distribution.counts()["done"] == 3


@pytest.mark.parametrize(
    "body",
    [
        {"state": "held", "bytes_upstream": -1},
        {"state": "sleeping"},
        {"state": "held", "digest": 5},
        {"state": "held", "bytes_done": True},
        [],
    ],
)
def test_a_report_that_is_not_one_is_refused(body: object) -> None:
    assert parse_report(body) is None


# --- the API and `mirror distribute` ----------------------------------------------------------


@pytest.fixture
async def origin_api(world: World) -> AsyncIterator[str]:
    """The first node's distributions API on loopback, as the base URL."""
    origin = world.nodes[0]
    access = AccessPolicy(allowed_clients=(), verifier=None)
    api = RegistryApi(
        origin.metrics,
        ContentService(MemoryStore(), origin.metrics, POLICY),
        access=access,
        extensions=[DistributionsApi(origin.distributor, access)],
    )
    server = TestServer(api.app(), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


async def test_mirror_distribute_follows_every_node_to_the_end(
    world: World, origin_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(distributor_module, "SETTLE_SECONDS", 0.5)  # nodes join by then
    digest = world.publish(REF, "one")
    said: list[str] = []
    summary = await distribute(node_url(origin_api), REF, timeout=30, say=said.append)
    assert summary.startswith(f"distributed {REF} to 2 nodes in ")
    assert "2 hold it, 0 failed" in summary
    assert any("10.0.0.2:5000" in line and "held" in line for line in said)
    for node in world.nodes[:2]:
        assert node.runtime.images[REF][0] == digest


async def test_the_distributions_api_refuses_what_it_cannot_use(
    world: World, origin_api: str
) -> None:
    base = origin_api
    async with ClientSession() as http:
        for body, code in (
            ({"ref": "registry.test/a/b@sha256:" + "0" * 64}, "NAME_INVALID"),
            ({"ref": 5}, "UNSUPPORTED"),
            ({"ref": "x:1", "more": 1}, "UNSUPPORTED"),
        ):
            async with http.post(f"{base}/mirror/v1/distributions", json=body) as response:
                assert response.status == 400
                assert (await response.json())["errors"][0]["code"] == code
        async with http.get(f"{base}/mirror/v1/distributions/nope") as response:
            assert response.status == 404
        # A report is a peer's, signed: the node's own client is refused.
        url = f"{base}/mirror/v1/distributions/x/report?node=10.0.0.9:5000"
        async with http.post(url, json={"state": "held"}) as response:
            assert response.status == 403
    assert world.nodes[0].distributor.distributions() == []


async def test_a_tag_that_has_not_moved_yet_is_asked_again(world: World) -> None:
    """A registry may notify before the tag points to the push: a node that resolved the
    previous digest asks again instead of reporting the old image as done."""
    world.publish(REF, "one")
    pushed = make_image("two")
    origin, follower = world.nodes[0], world.nodes[1]
    event = PushEvent(parse_image_ref(f"{REF}@{pushed.digest}"), "distribution")
    distribution = origin.distributor.start(event)
    while follower.prefetcher.status(parse_image_ref(REF)) is None:
        await asyncio.sleep(0)  # the in-memory broadcast is delivered with call_soon
    first = await follower.prefetcher.settled(parse_image_ref(REF))  # resolved the old one
    assert first.digest != pushed.digest
    world.publish(REF, "two")  # the tag moves now
    ended = await finished(origin, distribution, 2)
    assert {p.digest for p in ended.nodes.values()} == {pushed.digest}
    assert ended.counts()["done"] == 2
