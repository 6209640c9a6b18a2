"""ContainerdRuntime against a real containerd 1.6: images written in, unpacked, named.

No registry: each test builds an image as an OCI layout (``harness.images``), makes the
`ImagePlan` the prefetcher would resolve for it, and hands the runtime a `BlobReader` over the
layout's files. What counts is what containerd's own tools then see: ``ctr run`` starts the
image, ``ctr images check`` calls it complete and unpacked, and a garbage collection forced
after the import (deleting a lease with ``--sync``) leaves all of it in place.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import pytest
from harness.containerd import ContainerdNode
from harness.images import TestImage, build_busybox, build_index

from mirror.errors import BlobUnknown, RuntimeImportError
from mirror.oci.reference import parse_digest
from mirror.prefetch.model import Descriptor, ImagePlan, ImageRef, parse_image_ref
from mirror.prefetch.runtimes.containerd import ContainerdRuntime, chain_ids
from mirror.stores.containerd.api import content_pb2, content_pb2_grpc
from mirror.stores.containerd.client import ContainerdClient

NAME = "registry.test/team/busybox:v1"
SOURCE = "upstream.test:5000/mirror/busybox:v1"
# Smaller than a layer, so every layer arrives in several chunks.
READ_CHUNK = 64 * 1024


class LayoutBlobs:
    """A `BlobReader` over an image layout's files; ``corrupt`` digests get one byte flipped.

    ``reads`` lists every digest asked for, so a test can tell that nothing was written.
    """

    def __init__(self, image: TestImage, corrupt: Iterable[str] = ()) -> None:
        self.image = image
        self.corrupt = set(corrupt)
        self.reads: list[str] = []

    async def read(self, descriptor: Descriptor) -> AsyncIterator[bytes]:
        digest = str(descriptor.digest)
        self.reads.append(digest)
        data = bytearray(self.image.blob_bytes(digest))
        if digest in self.corrupt:
            data[len(data) // 2] ^= 0xFF
        for start in range(0, len(data), READ_CHUNK):
            yield bytes(data[start : start + READ_CHUNK])


class FailingBlobs(LayoutBlobs):
    """Gives up half way through ``failing``, as a reader whose peers and upstream all fail."""

    def __init__(self, image: TestImage, failing: str) -> None:
        super().__init__(image)
        self.failing = failing

    async def read(self, descriptor: Descriptor) -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in super().read(descriptor):
            if str(descriptor.digest) == self.failing and sent >= descriptor.size // 2:
                raise BlobUnknown(f"{descriptor.digest} is gone")
            sent += len(chunk)
            yield chunk


def descriptor(image: TestImage, digest: str, media_type: str) -> Descriptor:
    return Descriptor(media_type, parse_digest(digest), image.blobs[digest])


def plan_for(image: TestImage, name: str = NAME, fetched: str = SOURCE) -> ImagePlan:
    """The plan the prefetcher would resolve for ``image`` on linux/amd64."""
    manifest_digest = image.host_manifest_digest
    manifest = json.loads(image.blob_bytes(manifest_digest))
    return ImagePlan(
        name=parse_image_ref(name),
        fetched=parse_image_ref(fetched),
        target=descriptor(image, image.manifest_digest, image.media_type),
        manifest=descriptor(image, manifest_digest, manifest["mediaType"]),
        config=descriptor(image, manifest["config"]["digest"], manifest["config"]["mediaType"]),
        layers=tuple(
            descriptor(image, layer["digest"], layer["mediaType"]) for layer in manifest["layers"]
        ),
    )


def diff_ids(image: TestImage) -> list[str]:
    config = json.loads(image.blob_bytes(image.config_digest))
    ids: list[str] = config["rootfs"]["diff_ids"]
    return ids


def top_chain_id(image: TestImage) -> str:
    return chain_ids(diff_ids(image))[-1]


@pytest.fixture
def node(containerd_factory: Callable[[], ContainerdNode]) -> ContainerdNode:
    return containerd_factory()


@pytest.fixture
async def runtime(node: ContainerdNode) -> AsyncIterator[ContainerdRuntime]:
    rt = ContainerdRuntime(node.socket, node.namespace, timeout=10.0)
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close()


@pytest.fixture
async def client(node: ContainerdNode) -> AsyncIterator[ContainerdClient]:
    c = ContainerdClient(str(node.socket), node.namespace)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
def busybox(tmp_path: Path) -> TestImage:
    return build_busybox(tmp_path / "busybox")


def force_gc(node: ContainerdNode, namespace: str | None = None) -> None:
    """Run containerd's garbage collection now: a lease deleted with --sync waits for it."""
    node.ctr("leases", "create", "--id", "force-gc", namespace=namespace)
    node.ctr("leases", "rm", "--sync", "force-gc", namespace=namespace)


def leftovers(node: ContainerdNode, namespace: str | None = None) -> tuple[str, str]:
    """Leases and unfinished ingests left behind (each listing without its header line)."""
    leases = node.ctr("leases", "ls", "--quiet", namespace=namespace).stdout.strip()
    active = node.ctr("content", "active", namespace=namespace).stdout.splitlines()[1:]
    return leases, "\n".join(active)


def check_line(node: ContainerdNode, name: str, namespace: str | None = None) -> str:
    """``ctr images check``'s verdict on ``name``: status and whether it is unpacked."""
    lines = node.ctr("images", "check", namespace=namespace).stdout.splitlines()
    return next(line for line in lines if line.split()[0] == name)


async def content_listing(client: ContainerdClient) -> dict[str, tuple[int, dict[str, str]]]:
    """Every blob of the namespace with its size and labels, through Content.List."""
    stub = content_pb2_grpc.ContentStub(client.channel())
    call = stub.List(content_pb2.ListContentRequest(), metadata=client.metadata())
    listing: dict[str, tuple[int, dict[str, str]]] = {}
    async for reply in call:
        for info in reply.info:
            listing[info.digest] = (info.size, dict(info.labels))
    return listing


@pytest.mark.parametrize("namespace", ["k8s.io", "moby"])
async def test_a_taken_image_is_held_and_runs(
    containerd_factory: Callable[[], ContainerdNode], busybox: TestImage, namespace: str
) -> None:
    node = containerd_factory()
    plan = plan_for(busybox)
    runtime = ContainerdRuntime(node.socket, namespace)
    try:
        await runtime.start()
        assert not await runtime.holds(plan)
        await runtime.take(plan, LayoutBlobs(busybox))
        assert await runtime.holds(plan)
    finally:
        await runtime.close()

    assert node.image_target(NAME, namespace) == busybox.manifest_digest
    verdict = check_line(node, NAME, namespace)
    assert "complete" in verdict and verdict.split()[-1] == "true", verdict
    assert leftovers(node, namespace) == ("", "")
    run = node.ctr(
        "run", "--rm", NAME, "prefetched", "/bin/busybox", "echo", "ok", namespace=namespace
    )
    assert run.stdout.strip() == "ok"


async def test_labels_are_the_ones_a_pull_sets(
    node: ContainerdNode, runtime: ContainerdRuntime, client: ContainerdClient, busybox: TestImage
) -> None:
    plan = plan_for(busybox)
    await runtime.take(plan, LayoutBlobs(busybox))

    record = await client.get_image(NAME)
    assert record is not None
    assert record.labels == {"io.cri-containerd.image": "managed"}
    assert (record.digest, record.media_type) == (busybox.manifest_digest, busybox.media_type)

    listing = await content_listing(client)
    source = {"containerd.io/distribution.source.upstream.test": "mirror/busybox"}
    manifest_labels = listing[busybox.manifest_digest][1]
    assert manifest_labels == {
        "containerd.io/gc.ref.content.config": busybox.config_digest,
        "containerd.io/gc.ref.content.l.0": busybox.layer_digests[0],
        "containerd.io/gc.ref.content.l.1": busybox.layer_digests[1],
        **source,
    }
    assert listing[busybox.config_digest][1] == {
        "containerd.io/gc.ref.snapshot.overlayfs": top_chain_id(busybox),
        **source,
    }
    for layer, diff_id in zip(busybox.layer_digests, diff_ids(busybox), strict=True):
        assert listing[layer][1] == {"containerd.io/uncompressed": diff_id, **source}
        assert listing[layer][0] == busybox.blobs[layer]


async def test_a_garbage_collection_after_the_import_keeps_everything(
    node: ContainerdNode, runtime: ContainerdRuntime, busybox: TestImage
) -> None:
    plan = plan_for(busybox)
    await runtime.take(plan, LayoutBlobs(busybox))
    force_gc(node)
    assert await runtime.holds(plan)
    assert all(node.has_blob(digest) for digest in busybox.blobs)


async def test_a_second_take_writes_nothing(
    node: ContainerdNode, runtime: ContainerdRuntime, client: ContainerdClient, busybox: TestImage
) -> None:
    plan = plan_for(busybox)
    await runtime.take(plan, LayoutBlobs(busybox))
    content_before = await content_listing(client)
    snapshots_before = node.ctr("snapshots", "ls").stdout

    again = LayoutBlobs(busybox)
    await runtime.take(plan, again)

    assert again.reads == []  # no blob was read, so none was written
    assert await content_listing(client) == content_before
    assert node.ctr("snapshots", "ls").stdout == snapshots_before
    assert leftovers(node) == ("", "")


@pytest.mark.parametrize("part", ["layer", "config", "manifest"])
async def test_corrupt_bytes_are_refused_and_leave_no_name(
    node: ContainerdNode,
    runtime: ContainerdRuntime,
    client: ContainerdClient,
    busybox: TestImage,
    part: str,
) -> None:
    plan = plan_for(busybox)
    bad = {"layer": busybox.layer_digests[0], "config": busybox.config_digest}.get(
        part, busybox.manifest_digest
    )
    with pytest.raises(RuntimeImportError) as refused:
        await runtime.take(plan, LayoutBlobs(busybox, corrupt=[bad]))
    assert bad in str(refused.value)
    assert "\n" not in str(refused.value)
    assert await client.get_image(NAME) is None
    assert not await runtime.holds(plan)
    assert leftovers(node) == ("", "")

    # Nothing half-done stands in the way of the next attempt.
    await runtime.take(plan, LayoutBlobs(busybox))
    assert await runtime.holds(plan)


async def test_a_reader_that_fails_leaves_nothing_behind(
    node: ContainerdNode, runtime: ContainerdRuntime, client: ContainerdClient, busybox: TestImage
) -> None:
    """The reader's own error reaches the caller; the half-written ingest is gone."""
    plan = plan_for(busybox)
    with pytest.raises(BlobUnknown):
        await runtime.take(plan, FailingBlobs(busybox, failing=busybox.layer_digests[0]))
    assert await client.get_image(NAME) is None
    assert leftovers(node) == ("", "")


async def test_blobs_another_namespace_holds_are_shared_without_their_bytes(
    node: ContainerdNode, runtime: ContainerdRuntime, busybox: TestImage
) -> None:
    plan = plan_for(busybox)
    await runtime.take(plan, LayoutBlobs(busybox))
    moby = ContainerdRuntime(node.socket, "moby")
    reader = LayoutBlobs(busybox)
    try:
        assert not await moby.holds(plan)
        await moby.take(plan, reader)
        assert await moby.holds(plan)
    finally:
        await moby.close()
    # Only the config is read (to learn its diff IDs); no byte of a layer is sent again.
    assert reader.reads == [busybox.config_digest]
    run = node.ctr("run", "--rm", NAME, "shared", "/bin/busybox", "echo", "ok", namespace="moby")
    assert run.stdout.strip() == "ok"


async def test_an_index_image_is_taken_for_the_host_platform(
    node: ContainerdNode, runtime: ContainerdRuntime, client: ContainerdClient, tmp_path: Path
) -> None:
    image = build_index(tmp_path / "index")
    plan = plan_for(image)
    assert plan.target.digest != plan.manifest.digest

    await runtime.take(plan, LayoutBlobs(image))

    assert await runtime.holds(plan)
    assert node.image_target(NAME) == image.manifest_digest
    verdict = check_line(node, NAME)
    assert "complete" in verdict and verdict.split()[-1] == "true", verdict
    index = json.loads(image.blob_bytes(image.manifest_digest))
    listing = await content_listing(client)
    assert {
        key: value
        for key, value in listing[image.manifest_digest][1].items()
        if key.startswith("containerd.io/gc.ref.content.")
    } == {
        f"containerd.io/gc.ref.content.m.{i}": entry["digest"]
        for i, entry in enumerate(index["manifests"])
    }
    # Only the host platform's blobs were asked for and stored.
    assert set(listing) == set(image.host_blobs)
    force_gc(node)
    assert await runtime.holds(plan)


async def test_a_name_pointing_elsewhere_is_not_held_and_is_moved(
    node: ContainerdNode, runtime: ContainerdRuntime, tmp_path: Path
) -> None:
    first = build_busybox(tmp_path / "first", name="first")
    second = build_busybox(tmp_path / "second", name="second")
    first_plan, second_plan = plan_for(first), plan_for(second)
    await runtime.take(first_plan, LayoutBlobs(first))

    assert await runtime.holds(first_plan)
    assert not await runtime.holds(second_plan)

    # Both start with the same busybox layer: its blob and its snapshot are reused as they are.
    shared = first.layer_digests[0]
    assert shared == second.layer_digests[0]
    bottom = diff_ids(first)[0]  # the bottom layer's chain ID is its diff ID
    bottom_before = node.ctr("snapshots", "info", bottom).stdout
    reader = LayoutBlobs(second)
    await runtime.take(second_plan, reader)

    assert await runtime.holds(second_plan)
    assert not await runtime.holds(first_plan)
    assert node.image_target(NAME) == second.manifest_digest
    assert shared not in reader.reads
    assert node.ctr("snapshots", "info", bottom).stdout == bottom_before


async def test_a_digest_name_is_kept_as_written(
    node: ContainerdNode, runtime: ContainerdRuntime, busybox: TestImage
) -> None:
    name = f"registry.test/team/busybox@{busybox.manifest_digest}"
    plan = plan_for(busybox, name=name)
    await runtime.take(plan, LayoutBlobs(busybox))
    assert await runtime.holds(plan)
    assert node.image_target(name) == busybox.manifest_digest


async def test_a_name_whose_digest_is_not_the_target_is_refused(
    node: ContainerdNode, runtime: ContainerdRuntime, busybox: TestImage
) -> None:
    plan = plan_for(busybox)
    other = parse_digest("sha256:" + "0" * 64)
    wrong = ImagePlan(
        name=ImageRef(plan.name.registry, plan.name.repository, digest=other),
        fetched=plan.fetched,
        target=plan.target,
        manifest=plan.manifest,
        config=plan.config,
        layers=plan.layers,
    )
    assert not await runtime.holds(wrong)
    with pytest.raises(RuntimeImportError):
        await runtime.take(wrong, LayoutBlobs(busybox))
    assert node.images() == {}


async def test_concurrent_takes_of_one_image_both_succeed(
    node: ContainerdNode, runtime: ContainerdRuntime, busybox: TestImage
) -> None:
    """Whichever import commits a blob or snapshot first, the other takes it as done."""
    plan = plan_for(busybox)
    results = await asyncio.gather(
        runtime.take(plan, LayoutBlobs(busybox)),
        runtime.take(plan, LayoutBlobs(busybox)),
        return_exceptions=True,
    )
    assert results == [None, None]
    assert await runtime.holds(plan)
    force_gc(node)
    assert await runtime.holds(plan)
    assert leftovers(node) == ("", "")


async def test_an_unreachable_containerd_is_an_import_error(tmp_path: Path) -> None:
    runtime = ContainerdRuntime(tmp_path / "absent.sock", "k8s.io", timeout=1.0)
    try:
        with pytest.raises(RuntimeImportError):
            await runtime.start()
    finally:
        await runtime.close()


def test_chain_ids_follow_the_image_spec() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    second = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert chain_ids([a, b]) == [a, second]
    assert chain_ids([]) == []
