"""The prefetcher's decisions, without sockets: pins in, images kept in the runtime.

The content service is the real one over a real node cache (tmp_path); upstream and the peers
are in memory (tests/harness/memory_sources.py) and so is the runtime (a dict of names), so
this covers resolving, the "expected <- source" fallback, node labels, retries and re-checks
in milliseconds. The real runtimes have their own tests (test_prefetch_containerd.py,
test_prefetch_docker.py) and the whole path runs end to end in test_e2e_prefetch.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from harness.memory_runtime import Image, MemoryRuntime, make_image, publish, start_prefetch_parts
from harness.memory_sources import MemoryUpstream, digest_of

from mirror.content.service import ContentPolicy, ContentService
from mirror.metrics import Metrics
from mirror.oci import mediatypes as mt
from mirror.oci.reference import TagRef, parse_digest
from mirror.prefetch.client import PrefetchFailed, node_url, prefetch
from mirror.prefetch.model import Pin, parse_image_ref
from mirror.prefetch.prefetcher import PinnedSources, PinState, Prefetcher
from mirror.prefetch.resolve import Platform
from mirror.registry.access import AccessPolicy
from mirror.registry.api import RegistryApi
from mirror.registry.prefetch_api import PrefetchApi
from mirror.request import Caller, Kind, Target
from mirror.routing.memory import MemoryCluster

POLICY = ContentPolicy(mirrored_registries=None, resolve_tags=True, tag_timeout=1.0)
AMD64 = Platform("linux", "amd64")
EXPECTED = "registry.internal:5000/infra/traefik:v2.10"
SOURCE = "docker.io/library/traefik:v2.10"


@dataclass
class Node:
    prefetcher: Prefetcher
    content: ContentService
    runtime: MemoryRuntime
    upstream: MemoryUpstream
    metrics: Metrics
    sources: PinnedSources

    def publish(self, ref: str, image: Image) -> None:
        publish(self.upstream, ref, image)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    router = MemoryCluster().router(b"n" * 20, "10.0.0.1:5000")
    upstream = MemoryUpstream()
    parts = await start_prefetch_parts(tmp_path / "cache", router, upstream, {"role": "edge"})
    yield Node(
        parts.prefetcher, parts.content, parts.runtime, upstream, parts.metrics, parts.sources
    )
    await parts.close()


def pin(ref: str, source: str | None = None, **labels: str) -> Pin:
    return Pin(parse_image_ref(ref), parse_image_ref(source) if source else None, labels)


def metric(node: Node, name: str, **labels: str) -> float:
    value = node.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_a_pinned_image_ends_in_the_runtime_with_every_blob_fetched_once(node: Node) -> None:
    image = make_image("app")
    node.publish("registry.test/team/app:v1", image)
    node.prefetcher.set_pins("file", [pin("registry.test/team/app:v1")])
    status = await node.prefetcher.settled(parse_image_ref("registry.test/team/app:v1"))
    assert status.state is PinState.HELD, status.error
    assert status.digest == image.digest
    assert status.layers_done == status.layers_total == 2
    held_digest, content = node.runtime.images["registry.test/team/app:v1"]
    assert held_digest == image.digest
    assert content == {**image.blobs, image.digest: image.manifest}
    for digest in image.blobs:
        assert node.upstream.count("blob", digest) == 1
    assert metric(node, "mirror_prefetch_pins", state="held") == 1
    assert metric(node, "mirror_prefetch_bytes_total") == sum(map(len, image.blobs.values()))


async def test_a_pin_for_other_node_labels_is_not_kept(node: Node) -> None:
    node.publish("registry.test/team/app:v1", make_image("app"))
    node.prefetcher.set_pins(
        "file", [pin("registry.test/team/app:v1", role="batch"), pin("docker.io/x:1", role="edge")]
    )
    assert [str(status.ref) for status in node.prefetcher.statuses()] == ["docker.io/library/x:1"]


async def test_an_image_the_runtime_holds_is_not_fetched_again(node: Node) -> None:
    image = make_image("app")
    node.publish("registry.test/team/app:v1", image)
    node.runtime.images["registry.test/team/app:v1"] = (image.digest, {})
    node.prefetcher.set_pins("file", [pin("registry.test/team/app:v1")])
    status = await node.prefetcher.settled(parse_image_ref("registry.test/team/app:v1"))
    assert status.state is PinState.HELD
    assert node.runtime.takes == []
    assert all(node.upstream.count("blob", digest) == 0 for digest in image.blobs)


async def test_expected_name_unresolvable_takes_the_source_and_answers_pulls_with_it(
    node: Node,
) -> None:
    """expected <- source: the runtime ends with the expected name; a runtime's own pull of
    the expected tag through the registry API gets the source's manifest."""
    image = make_image("traefik")
    node.publish(SOURCE, image)
    node.prefetcher.set_pins("file", [pin(EXPECTED, SOURCE)])
    status = await node.prefetcher.settled(parse_image_ref(EXPECTED))
    assert status.state is PinState.HELD, status.error
    assert status.through_source
    assert status.fetched == f"docker.io/library/traefik@{image.digest}"
    assert node.runtime.images[EXPECTED][0] == image.digest

    expected = parse_image_ref(EXPECTED)
    tag = expected.tag_ref
    assert tag is not None
    answer = await node.content.manifest(
        Target(Kind.MANIFEST, expected.registry, expected.repository, tag, None), Caller.RUNTIME
    )
    assert answer.digest == image.digest
    assert answer.alias is not None and answer.alias.repository == "library/traefik"
    assert metric(node, "mirror_alias_answers_total", expected=EXPECTED, source=SOURCE) >= 1


async def test_a_tag_that_resolves_is_taken_from_the_expected_name_not_the_source(
    node: Node,
) -> None:
    expected, source = make_image("expected"), make_image("source")
    node.publish(EXPECTED, expected)
    node.publish(SOURCE, source)
    node.prefetcher.set_pins("file", [pin(EXPECTED, SOURCE)])
    status = await node.prefetcher.settled(parse_image_ref(EXPECTED))
    assert status.state is PinState.HELD
    assert not status.through_source
    assert node.runtime.images[EXPECTED][0] == expected.digest


async def test_source_for_names_only_pins_that_have_a_source(node: Node) -> None:
    node.prefetcher.set_pins("file", [pin(EXPECTED, SOURCE), pin("registry.test/a/b:1")])
    alias = node.sources.source_for(TagRef("registry.internal:5000", "infra/traefik", "v2.10"))
    assert alias is not None
    assert (alias.registry, alias.repository) == ("docker.io", "library/traefik")
    assert node.sources.source_for(TagRef("registry.test", "a/b", "1")) is None


async def test_a_failure_is_reported_and_the_next_attempt_succeeds(node: Node) -> None:
    ref = parse_image_ref("registry.test/team/app:v1")
    node.prefetcher.set_pins("file", [pin(str(ref))])
    failed = await node.prefetcher.settled(ref)
    assert failed.state is PinState.FAILED
    assert failed.error and "registry.test/team/app:v1" in failed.error
    assert metric(node, "mirror_prefetch_pins", state="failed") == 1

    node.publish(str(ref), make_image("app"))
    node.prefetcher.request(ref, None)  # what `mirror prefetch` does: try now, not in an hour
    held = await node.prefetcher.settled(ref, after=failed.attempts)
    assert held.state is PinState.HELD
    assert held.error is None and held.failures == 0


async def test_a_runtime_that_refuses_is_a_failure_not_a_crash(node: Node) -> None:
    node.runtime.refuse = True
    node.publish("registry.test/team/app:v1", make_image("app"))
    node.prefetcher.set_pins("file", [pin("registry.test/team/app:v1")])
    status = await node.prefetcher.settled(parse_image_ref("registry.test/team/app:v1"))
    assert status.state is PinState.FAILED
    assert status.error == "the runtime refused the image"


async def test_a_moved_tag_is_taken_again_on_the_next_check(node: Node) -> None:
    ref = parse_image_ref("registry.test/team/app:v1")
    first, second = make_image("one"), make_image("two")
    node.publish(str(ref), first)
    node.prefetcher.set_pins("file", [pin(str(ref))])
    held = await node.prefetcher.settled(ref)
    assert held.digest == first.digest
    node.publish(str(ref), second)
    node.prefetcher.request(ref, None)
    again = await node.prefetcher.settled(ref, after=held.attempts)
    assert again.state is PinState.HELD and again.digest == second.digest
    assert node.runtime.images[str(ref)][0] == second.digest


async def test_pins_of_an_origin_are_replaced_and_a_removed_one_is_let_go(node: Node) -> None:
    node.prefetcher.set_pins("nomad", [pin("registry.test/a/one:1"), pin("registry.test/a/two:1")])
    node.prefetcher.set_pins("file", [pin("registry.test/a/two:1")])
    node.prefetcher.set_pins("nomad", [pin("registry.test/a/three:1")])
    statuses = {str(status.ref): status.origins for status in node.prefetcher.statuses()}
    assert statuses == {"registry.test/a/three:1": {"nomad"}, "registry.test/a/two:1": {"file"}}


async def test_an_index_is_planned_for_the_node_platform(node: Node) -> None:
    amd, arm = make_image("amd"), make_image("arm", arch="arm64")
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_INDEX,
            "manifests": [
                {
                    "mediaType": mt.OCI_MANIFEST,
                    "digest": image.digest,
                    "size": len(image.manifest),
                    "platform": {"os": "linux", "architecture": arch},
                }
                for image, arch in ((arm, "arm64"), (amd, "amd64"))
            ],
        }
    ).encode()
    node.upstream.push("registry.test", "team/multi", "v1", index)
    for image in (amd, arm):
        node.upstream.manifests[image.digest] = image.manifest
        node.upstream.blobs.update(image.blobs)
    ref = parse_image_ref("registry.test/team/multi:v1")
    node.prefetcher.set_pins("file", [pin(str(ref))])
    status = await node.prefetcher.settled(ref)
    assert status.state is PinState.HELD, status.error
    digest, content = node.runtime.images[str(ref)]
    assert digest == digest_of(index)
    assert set(content) == {digest_of(index), amd.digest, *amd.blobs}
    assert all(node.upstream.count("blob", d) == 0 for d in arm.blobs)


async def test_an_index_without_the_node_platform_fails_with_the_reason(node: Node) -> None:
    arm = make_image("arm", arch="arm64")
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_INDEX,
            "manifests": [
                {
                    "mediaType": mt.OCI_MANIFEST,
                    "digest": arm.digest,
                    "size": len(arm.manifest),
                    "platform": {"os": "linux", "architecture": "arm64"},
                }
            ],
        }
    ).encode()
    node.upstream.push("registry.test", "team/arm", "v1", index)
    ref = parse_image_ref("registry.test/team/arm:v1")
    node.prefetcher.set_pins("file", [pin(str(ref))])
    status = await node.prefetcher.settled(ref)
    assert status.state is PinState.FAILED
    assert status.error == f"index {digest_of(index)} has no manifest for linux/amd64"


async def test_a_digest_pin_falls_back_to_its_source(node: Node) -> None:
    image = make_image("pinned")
    node.publish(SOURCE, image)
    expected = f"registry.internal:5000/infra/traefik@{image.digest}"
    node.prefetcher.set_pins("file", [pin(expected, SOURCE)])
    node.upstream.manifests.pop(image.digest)  # neither registry serves it by digest...
    node.upstream.tags.clear()
    status = await node.prefetcher.settled(parse_image_ref(expected))
    assert status.state is PinState.FAILED  # ...so nothing can be had
    node.upstream.manifests[image.digest] = image.manifest
    node.prefetcher.request(parse_image_ref(expected), parse_image_ref(SOURCE))
    again = await node.prefetcher.settled(parse_image_ref(expected), after=status.attempts)
    assert again.state is PinState.HELD, again.error
    assert parse_digest(again.digest or "") == parse_digest(image.digest)


# --- the API and `mirror prefetch` -------------------------------------------------------------


@pytest.fixture
async def api(node: Node) -> AsyncIterator[str]:
    access = AccessPolicy(allowed_clients=(), verifier=None)
    registry = RegistryApi(
        node.metrics,
        node.content,
        access=access,
        extensions=[PrefetchApi(node.prefetcher, AMD64, access)],
    )
    server = TestServer(registry.app(), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


async def test_the_api_takes_an_image_and_reports_it(node: Node, api: str) -> None:
    image = make_image("app")
    node.publish("registry.test/team/app:v1", image)
    async with ClientSession() as http:
        body = {"ref": "registry.test/team/app:v1"}
        async with http.post(f"{api}/mirror/v1/prefetch", json=body) as response:
            assert response.status == 202
            assert (await response.json())["ref"] == "registry.test/team/app:v1"
        await node.prefetcher.settled(parse_image_ref("registry.test/team/app:v1"))
        async with http.get(f"{api}/mirror/v1/prefetch") as response:
            overview = await response.json()
        assert overview["runtime"] == "memory" and overview["platform"] == "linux/amd64"
        assert overview["labels"] == {"role": "edge"}
        assert overview["origins"] == {"api": {"pins": 1, "error": None}}
        [status] = overview["images"]
        assert status["state"] == "held" and status["digest"] == image.digest
        assert status["bytes"]["done"] == status["bytes"]["total"] > 0
        query = {"ref": "registry.test/team/app:v1"}
        async with http.get(f"{api}/mirror/v1/prefetch", params=query) as response:
            assert (await response.json())["state"] == "held"
        query = {"ref": "registry.test/team/other:v1"}
        async with http.get(f"{api}/mirror/v1/prefetch", params=query) as response:
            assert response.status == 404
            assert (await response.json())["errors"][0]["code"] == "NAME_UNKNOWN"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"ref": "Bad Ref"}', "NAME_INVALID"),
        (b'{"ref": "x:1", "source": "x@sha256:00"}', "NAME_INVALID"),
        (b'{"ref": 5}', "UNSUPPORTED"),
        (b'{"ref": "x:1", "other": 1}', "UNSUPPORTED"),
        (b"[]", "UNSUPPORTED"),
        (b"\xff{", "UNSUPPORTED"),
        (b'{"ref": "' + b"a" * 20000 + b'"}', "UNSUPPORTED"),
    ],
)
async def test_a_bad_request_is_a_400_with_oci_error_json(
    node: Node, api: str, body: bytes, code: str
) -> None:
    url = f"{api}/mirror/v1/prefetch"
    async with ClientSession() as http, http.post(url, data=body) as response:
        assert response.status == 400
        assert (await response.json())["errors"][0]["code"] == code
    assert node.prefetcher.statuses() == []


async def test_mirror_prefetch_follows_until_held(node: Node, api: str) -> None:
    node.publish("registry.test/team/app:v1", make_image("app"))
    said: list[str] = []
    line = await prefetch(
        node_url(api), "registry.test/team/app:v1", None, timeout=30, say=said.append
    )
    assert line.startswith("held: registry.test/team/app:v1 (sha256:")
    assert " in memory, " in line
    assert said and said[-1].startswith("held: ")


async def test_mirror_prefetch_reports_a_failure_in_one_line(node: Node, api: str) -> None:
    with pytest.raises(PrefetchFailed) as failed:
        await prefetch(node_url(api), "registry.test/team/none:v1", None, timeout=30, say=print)
    assert str(failed.value).startswith("registry.test/team/none:v1 could not be taken: ")
    assert "\n" not in str(failed.value)
