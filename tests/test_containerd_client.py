"""ContainerdClient against a real containerd 1.6 (one per test from ``containerd_factory``).

Images are put into containerd without a registry: the test writes a small OCI image
archive (``oci-layout``, ``index.json`` naming the image through the
``io.containerd.image.name`` annotation, blobs) and runs ``ctr images import --no-unpack``,
which stores the blobs byte for byte and creates the image record, publishing
``/images/create`` like a pull would.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from harness.containerd import ContainerdNode
from harness.images import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    canonical_json,
    make_layer,
    sha256_digest,
)

from mirror.stores.containerd.api import content_pb2, content_pb2_grpc
from mirror.stores.containerd.client import (
    ContainerdClient,
    ContainerdEvent,
    ContainerdNotFound,
    ContainerdUnavailable,
)

NAMESPACE = "k8s.io"
IMAGE_NAME = "registry.example/team/app:v1"
# Bigger than one Content.Read message (~1 MiB), so reads span several messages.
LAYER_PAYLOAD = 3 * 1024 * 1024 + 123


@dataclass(frozen=True)
class ArchiveImage:
    """An image archive on disk and the exact blobs it holds."""

    path: Path
    name: str
    manifest_digest: str
    config_digest: str
    layer_digest: str
    blobs: dict[str, bytes]


def build_oci_archive(path: Path, name: str, layer_size: int = 4096) -> ArchiveImage:
    """Write a single-platform OCI image archive that ``ctr images import`` accepts."""
    layer, diff_id = make_layer({"data/blob.bin": os.urandom(layer_size)}, compresslevel=0)
    config = canonical_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    )
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": sha256_digest(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": OCI_LAYER_GZIP, "digest": sha256_digest(layer), "size": len(layer)}
            ],
        }
    )
    index = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": sha256_digest(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {"io.containerd.image.name": name},
                }
            ],
        }
    )
    blobs = {sha256_digest(b): b for b in (layer, config, manifest)}
    with tarfile.open(path, "w") as tar:

        def add(member: str, data: bytes) -> None:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
        add("index.json", index)
        for digest, data in blobs.items():
            add("blobs/sha256/" + digest.split(":", 1)[1], data)
    return ArchiveImage(
        path=path,
        name=name,
        manifest_digest=sha256_digest(manifest),
        config_digest=sha256_digest(config),
        layer_digest=sha256_digest(layer),
        blobs=blobs,
    )


def import_image(node: ContainerdNode, image: ArchiveImage, namespace: str) -> None:
    node.ctr("images", "import", "--no-unpack", str(image.path), namespace=namespace)


@pytest.fixture
def node(containerd_factory: Callable[[], ContainerdNode]) -> ContainerdNode:
    """A fresh containerd (boots in ~30 ms); conftest stops it at teardown."""
    return containerd_factory()


@pytest.fixture
def image(node: ContainerdNode, tmp_path: Path) -> ArchiveImage:
    """One image imported into ``k8s.io``; its blobs exist on disk for every namespace."""
    archive = build_oci_archive(tmp_path / "app.tar", IMAGE_NAME, LAYER_PAYLOAD)
    import_image(node, archive, NAMESPACE)
    return archive


@pytest.fixture
async def client(node: ContainerdNode) -> AsyncIterator[ContainerdClient]:
    c = ContainerdClient(str(node.socket), NAMESPACE, timeout=5.0)
    try:
        yield c
    finally:
        await c.close()


async def test_check_answers(client: ContainerdClient) -> None:
    await client.check()


async def test_check_missing_socket_fails_fast(tmp_path: Path) -> None:
    c = ContainerdClient(str(tmp_path / "absent.sock"), NAMESPACE, timeout=5.0)
    started = time.monotonic()
    try:
        with pytest.raises(ContainerdUnavailable):
            await c.check()
    finally:
        await c.close()
    assert time.monotonic() - started < 1.0


async def test_check_silent_socket_fails_within_timeout(tmp_path: Path) -> None:
    """A socket that accepts connections but never speaks gRPC: the deadline must fire."""
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(8)
        c = ContainerdClient(str(path), NAMESPACE, timeout=0.5)
        started = time.monotonic()
        try:
            with pytest.raises(ContainerdUnavailable):
                await c.check()
        finally:
            await c.close()
        assert time.monotonic() - started < 2.0


async def test_client_recovers_after_containerd_restart(
    client: ContainerdClient, node: ContainerdNode
) -> None:
    """One long-lived client must work again soon after containerd comes back."""
    await client.check()
    await asyncio.to_thread(node.process.stop)
    with pytest.raises(ContainerdUnavailable):
        await client.check()

    await asyncio.to_thread(node.process.start)
    deadline = time.monotonic() + 10
    while node.ctr("version", check=False, timeout=5).returncode != 0:
        assert time.monotonic() < deadline, "containerd did not come back"
        await asyncio.sleep(0.02)
    back = time.monotonic()
    while True:  # the channel may still be in reconnect backoff (capped at 2 s)
        try:
            await client.check()
            break
        except ContainerdUnavailable:
            assert time.monotonic() - back < 3.0, "client did not reconnect"
            await asyncio.sleep(0.05)


async def test_content_root_is_the_real_directory(
    client: ContainerdClient, node: ContainerdNode, image: ArchiveImage
) -> None:
    root = await client.content_root()
    assert root is not None
    assert Path(root) == node.content_dir
    blob = Path(root) / "blobs" / "sha256" / image.layer_digest.split(":", 1)[1]
    assert blob.read_bytes() == image.blobs[image.layer_digest]


async def test_list_and_get_image(client: ContainerdClient, image: ArchiveImage) -> None:
    records = {r.name: r for r in await client.list_images()}
    assert IMAGE_NAME in records
    record = records[IMAGE_NAME]
    assert record.digest == image.manifest_digest
    assert record.media_type == OCI_MANIFEST
    assert record.size == len(image.blobs[image.manifest_digest])

    assert await client.get_image(IMAGE_NAME) == record
    assert await client.get_image("registry.example/team/app:missing") is None


async def test_images_are_per_namespace(node: ContainerdNode, image: ArchiveImage) -> None:
    async with ContainerdClient(str(node.socket), "other") as other:
        assert await other.list_images() == []
        assert await other.get_image(IMAGE_NAME) is None


async def test_content_info(
    client: ContainerdClient, node: ContainerdNode, image: ArchiveImage
) -> None:
    for digest, data in image.blobs.items():
        info = await client.content_info(digest)
        assert info is not None, digest
        assert info.digest == digest
        assert info.size == len(data)
    manifest_info = await client.content_info(image.manifest_digest)
    assert manifest_info is not None
    # containerd's GC references: proves labels decode (field 5).
    assert manifest_info.labels["containerd.io/gc.ref.content.config"] == image.config_digest

    assert await client.content_info(sha256_digest(b"never stored")) is None

    # On disk (the store is shared) but not in this namespace: must look absent.
    assert node.has_blob(image.layer_digest)
    async with ContainerdClient(str(node.socket), "other") as other:
        assert await other.content_info(image.layer_digest) is None


async def test_list_content_answers_for_many_digests_at_once(
    client: ContainerdClient, image: ArchiveImage
) -> None:
    never = sha256_digest(b"never stored")
    found = await client.list_content([*image.blobs, never, "not-a-digest"])
    assert {info.digest: info.size for info in found} == {
        digest: len(data) for digest, data in image.blobs.items()
    }
    assert await client.list_content([never]) == []
    assert await client.list_content([]) == []
    # Held in another namespace only: absent, as for content_info.
    async with ContainerdClient(str(client.socket_path), "other") as other:
        assert await other.list_content(list(image.blobs)) == []


async def test_some_content_lists_the_first_of_a_namespace(
    client: ContainerdClient, image: ArchiveImage
) -> None:
    found = await client.some_content()
    assert {info.digest for info in found} >= set(image.blobs)
    sizes = {info.digest: info.size for info in found}
    assert all(sizes[digest] == len(data) for digest, data in image.blobs.items())
    async with ContainerdClient(str(client.socket_path), "holds-nothing") as other:
        assert await other.some_content() == []


async def test_read_content(client: ContainerdClient, image: ArchiveImage) -> None:
    data = image.blobs[image.layer_digest]
    assert len(data) > 2 * 1024 * 1024

    chunks = [chunk async for chunk in client.read_content(image.layer_digest)]
    assert b"".join(chunks) == data
    assert len(chunks) > 1  # streamed in several messages, all received

    async def read(offset: int, size: int) -> bytes:
        return b"".join([c async for c in client.read_content(image.layer_digest, offset, size)])

    assert await read(0, 10) == data[:10]
    assert await read(1_500_000, 1_000_000) == data[1_500_000:2_500_000]
    assert await read(len(data) - 7, 0) == data[-7:]
    assert await read(123, 0) == data[123:]


async def test_read_content_unknown_digest(client: ContainerdClient) -> None:
    with pytest.raises(ContainerdNotFound):
        async for _ in client.read_content(sha256_digest(b"never stored")):
            pass


async def test_read_content_stops_early(client: ContainerdClient, image: ArchiveImage) -> None:
    """Abandoning a stream cancels it; the client stays usable."""
    stream = client.read_content(image.layer_digest)
    first = await anext(stream)
    assert first == image.blobs[image.layer_digest][: len(first)]
    await stream.aclose()  # type: ignore[attr-defined]
    assert await client.content_info(image.layer_digest) is not None


class EventWatch:
    """Collects a subscription's events in a task so tests can await specific ones."""

    def __init__(self, client: ContainerdClient, filters: list[str]) -> None:
        self.queue: asyncio.Queue[ContainerdEvent] = asyncio.Queue()
        self.seen: list[ContainerdEvent] = []
        self._stream = client.subscribe(filters)
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for event in self._stream:
            await self.queue.put(event)

    async def expect(
        self, topic: str, *, name: str | None = None, digest: str | None = None, timeout: float
    ) -> ContainerdEvent:
        """The next event with this topic and name/digest; every event read lands in ``seen``."""

        async def wait() -> ContainerdEvent:
            while True:
                event = await self.queue.get()
                self.seen.append(event)
                if event.topic == topic and (event.name, event.digest) == (name, digest):
                    return event

        return await asyncio.wait_for(wait(), timeout)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def wait_subscribed(watch: EventWatch, node: ContainerdNode, src: str, ns: str) -> None:
    """Tag probe images until one's /images/create arrives: then the stream is live.

    Subscribe has no acknowledgement, so an event published right after the call may
    precede the server-side registration; the probes close that race without sleeping.
    """
    deadline = time.monotonic() + 10
    attempt = 0
    while True:
        attempt += 1
        probe = f"registry.example/probe:{attempt}"
        await asyncio.to_thread(node.tag, src, probe, ns)
        try:
            await watch.expect("/images/create", name=probe, timeout=0.5)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


async def test_subscribe_image_create_update_delete(node: ContainerdNode, tmp_path: Path) -> None:
    ns = "events-test"
    base = build_oci_archive(tmp_path / "base.tar", "registry.example/base:v1")
    await asyncio.to_thread(import_image, node, base, ns)

    async with ContainerdClient(str(node.socket), ns) as c:
        watch = EventWatch(c, [f'topic~="/images/",namespace=="{ns}"'])
        try:
            await wait_subscribed(watch, node, base.name, ns)

            new = build_oci_archive(tmp_path / "new.tar", "registry.example/new:v1")
            # Same image in another namespace first: the filter must keep its event out.
            await asyncio.to_thread(import_image, node, new, "events-elsewhere")
            await asyncio.to_thread(import_image, node, new, ns)
            created = await watch.expect("/images/create", name=new.name, timeout=10)
            assert created == ContainerdEvent(ns, "/images/create", new.name, None)

            await asyncio.to_thread(
                node.ctr, "images", "label", new.name, "mirror.test=1", namespace=ns
            )
            await watch.expect("/images/update", name=new.name, timeout=10)

            await asyncio.to_thread(node.remove_image, new.name, ns)
            deleted = await watch.expect("/images/delete", name=new.name, timeout=10)
            assert deleted.namespace == ns and deleted.digest is None

            # The namespace filter held: a change elsewhere was never delivered.
            assert all(event.namespace == ns for event in watch.seen)
        finally:
            await watch.close()


async def test_subscribe_content_delete(node: ContainerdNode, tmp_path: Path) -> None:
    """containerd 1.6 publishes /content/delete (but no /content/create) for Content.Delete."""
    ns = "content-events"
    base = build_oci_archive(tmp_path / "base.tar", "registry.example/base:v1")
    await asyncio.to_thread(import_image, node, base, ns)

    async with ContainerdClient(str(node.socket), ns) as c:
        watch = EventWatch(
            c,
            [
                f'topic=="/images/create",namespace=="{ns}"',
                f'topic~="/content/",namespace=="{ns}"',
            ],
        )
        try:
            await wait_subscribed(watch, node, base.name, ns)
            await asyncio.to_thread(node.ctr, "content", "rm", base.layer_digest, namespace=ns)
            deleted = await watch.expect("/content/delete", digest=base.layer_digest, timeout=10)
            assert deleted == ContainerdEvent(ns, "/content/delete", None, base.layer_digest)
        finally:
            await watch.close()


async def test_subscribe_without_containerd_raises(tmp_path: Path) -> None:
    c = ContainerdClient(str(tmp_path / "absent.sock"), NAMESPACE)
    try:
        with pytest.raises(ContainerdUnavailable):
            async for _ in c.subscribe(['topic~="/images/"']):
                pass
    finally:
        await c.close()


class StallingContent(content_pb2_grpc.ContentServicer):
    """A fake Content service: records call metadata, and Read stalls after one chunk."""

    def __init__(self) -> None:
        self.metadata: list[tuple[str, str | bytes]] = []

    async def Info(
        self, request: content_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> content_pb2.InfoResponse:
        self.metadata.extend(context.invocation_metadata() or ())
        return content_pb2.InfoResponse(info=content_pb2.Info(digest=request.digest, size=42))

    async def Read(
        self, request: content_pb2.ReadContentRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[content_pb2.ReadContentResponse]:
        yield content_pb2.ReadContentResponse(offset=0, data=b"first")
        await asyncio.Event().wait()  # never set: cancelled when the client gives up


@pytest.fixture
async def fake_containerd(tmp_path: Path) -> AsyncIterator[tuple[str, StallingContent]]:
    server = grpc.aio.server()
    servicer = StallingContent()
    content_pb2_grpc.add_ContentServicer_to_server(servicer, server)
    path = str(tmp_path / "fake.sock")
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    try:
        yield path, servicer
    finally:
        await server.stop(grace=None)


async def test_namespace_metadata_on_calls(
    fake_containerd: tuple[str, StallingContent],
) -> None:
    path, servicer = fake_containerd
    async with ContainerdClient(path, "moby") as c:
        info = await c.content_info("sha256:" + "a" * 64)
    assert info is not None and info.size == 42
    assert ("containerd-namespace", "moby") in servicer.metadata


async def test_read_content_stalled_stream_is_unavailable(
    fake_containerd: tuple[str, StallingContent],
) -> None:
    path, _ = fake_containerd
    async with ContainerdClient(path, NAMESPACE, timeout=0.3) as c:
        stream = c.read_content("sha256:" + "a" * 64)
        assert await anext(stream) == b"first"
        started = time.monotonic()
        with pytest.raises(ContainerdUnavailable):
            await anext(stream)
        assert time.monotonic() - started < 2.0
