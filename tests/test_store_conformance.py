"""Every real store passes the same checks (tests/storetest.py), with real content in it.

- the node cache, written through its verified writer;
- containerd (namespace k8s.io), images pulled with `ctr images pull` from a real distribution
  registry, served from the content directory (sendfile) and, when that directory cannot be
  read, streamed through Content.Read;
- the layered store over containerd's `moby` namespace plus a cache: Docker's containerd image
  store, tested through containerd directly (the Docker here predates that store);
- the layered store answering from its cache half (containerd holds nothing of the image).

One containerd and one registry serve the whole module; every check pulls an image of its own.
A tag pointing at a digest mirror cannot use is checked with a fake Images service, since
containerd refuses to record one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from harness.cluster import wait_until
from harness.containerd import CTR_BINARY, ContainerdNode, start_containerd
from harness.images import OCI_MANIFEST, run_skopeo
from harness.registry import Registry
from storetest import Backend, Image, StoreContract, build_image, write_oci_layout

from mirror.config import ContainerdConfig
from mirror.oci.reference import parse_digest, tag_ref
from mirror.stores.base import FileBlob, Store, StreamBlob
from mirror.stores.cache import CacheStore
from mirror.stores.containerd import store as containerd_store
from mirror.stores.containerd.api import descriptor_pb2, images_pb2, images_pb2_grpc
from mirror.stores.containerd.store import ContainerdStore
from mirror.stores.inventory import take_inventory
from mirror.stores.layered import LayeredStore

K8S = "k8s.io"
MOBY = "moby"


@pytest.fixture(scope="module")
def containerd(
    tmp_path_factory: pytest.TempPathFactory, required_binaries: dict[str, str]
) -> Iterator[ContainerdNode]:
    node = start_containerd(tmp_path_factory.mktemp("containerd"))
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def upstream(
    tmp_path_factory: pytest.TempPathFactory, required_binaries: dict[str, str]
) -> Iterator[Registry]:
    registry = Registry(tmp_path_factory.mktemp("registry"))
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()


class CacheBackend(Backend):
    """Images written into the node cache as a download does: verified writes, then the tag."""

    def __init__(self, cache: CacheStore, store: Store | None = None) -> None:
        self.cache = cache
        self.store = store if store is not None else cache

    async def add_image(self) -> Image:
        image = build_image("registry.test")
        for digest, data in image.blobs.items():
            async with self.cache.writer(digest, len(data)) as writer:
                for start in range(0, len(data), 256 * 1024):
                    await writer.write(data[start : start + 256 * 1024])
                await writer.commit()
        await self.cache.set_tag(image.ref, image.manifest)
        return image

    async def vanish(self, image: Image) -> None:
        for digest in image.blobs:
            self.cache.blob_path(digest).unlink()


class ContainerdBackend(Backend):
    """Images pushed to a real registry and pulled by containerd into `namespace`."""

    def __init__(
        self, store: Store, node: ContainerdNode, registry: Registry, namespace: str, work: Path
    ) -> None:
        self.store = store
        self._node = node
        self._registry = registry
        self._namespace = namespace
        self._work = work

    async def add_image(self) -> Image:
        image = build_image(self._registry.host)
        await asyncio.to_thread(self._push_and_pull, image)
        return image

    def _push_and_pull(self, image: Image) -> None:
        layout = self._work / image.ref.repository.replace("/", "-")
        source = write_oci_layout(image, layout)
        run_skopeo(
            "copy", "--preserve-digests", "--dest-tls-verify=false", source, f"docker://{image.ref}"
        )
        self._node.pull(str(image.ref), plain_http=True, namespace=self._namespace)

    async def vanish(self, image: Image) -> None:
        # `ctr images rm --sync` deletes the image and waits for the GC to collect its content.
        await asyncio.to_thread(self._node.remove_image, str(image.ref), self._namespace)
        kept = [str(d) for d in image.blobs if self._node.has_blob(str(d))]
        assert not kept, f"containerd's GC kept {kept}"


async def _started(store: Store) -> Store:
    await store.start()
    return store


def _containerd_store(node: ContainerdNode, namespace: str, content: Path | None = None) -> Store:
    return ContainerdStore(ContainerdConfig(node.socket, namespace, content))


class TestCacheStore(StoreContract):
    @pytest.fixture
    async def backend(self, tmp_path: Path) -> AsyncIterator[Backend]:
        cache = CacheStore(tmp_path / "cache")
        await cache.start()
        try:
            yield CacheBackend(cache)
        finally:
            await cache.close()


class TestContainerdStore(StoreContract):
    @pytest.fixture
    async def backend(
        self, containerd: ContainerdNode, upstream: Registry, tmp_path: Path
    ) -> AsyncIterator[Backend]:
        store = await _started(_containerd_store(containerd, K8S))
        try:
            yield ContainerdBackend(store, containerd, upstream, K8S, tmp_path)
        finally:
            await store.close()

    async def test_blobs_are_open_files_for_sendfile(self, backend: Backend) -> None:
        image = await backend.add_image()
        blob = await backend.store.open(image.layer)
        assert isinstance(blob, FileBlob)
        await blob.close()

    async def test_files_spare_the_api_once_one_was_found_there(
        self, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Peers probe a node for blobs it lacks and for those it holds, again and again: once
        a blob the API listed was found in the directory, a digest with no file there is a
        miss without a gRPC call, and a blob the API listed is believed held for a moment
        while its file is there (a digest with a file is asked first: it may be another
        namespace's)."""
        store = backend.store
        assert isinstance(store, ContainerdStore)
        absent = parse_digest("sha256:" + "9a" * 32)
        asked: list[str] = []
        content_info = store._client.content_info

        async def counted(digest: str) -> object:
            asked.append(digest)
            return await content_info(digest)

        monkeypatch.setattr(store._client, "content_info", counted)
        image = await backend.add_image()
        blob = await store.open(image.layer)
        assert isinstance(blob, FileBlob)
        await blob.close()
        asked.clear()
        assert await store.stat(absent) is None
        assert asked == []
        # Listed by `open` a moment ago: believed held.
        assert await store.stat(image.layer) is not None
        assert asked == []
        store._held.clear()  # the moment passed
        assert await store.stat(image.layer) is not None
        assert asked == [str(image.layer)]
        # Peers probe a holder for a blob again and again: believed held for a moment.
        assert await store.stat(image.layer) is not None
        assert asked == [str(image.layer)]

    async def test_an_image_is_walked_in_a_call_per_level(
        self, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The advertiser walks every image whenever the store changes: its blobs are asked
        about together (one Content.List for the manifest, one for what it references), not
        one Content.Info each, which on a starved node woke gRPC's threads hundreds of times
        at the start of every pull."""
        store = backend.store
        assert isinstance(store, ContainerdStore)
        image = await backend.add_image()
        calls = _counted_calls(store, monkeypatch)
        inventory = await take_inventory(store)
        assert {str(digest) for digest in image.blobs} <= inventory.digests
        assert calls == ["List", "List"]
        calls.clear()
        assert await take_inventory(store) == inventory  # believed held a moment after
        assert calls == []


def _counted_calls(store: ContainerdStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The content calls `store` makes from now on, by name, in order."""
    calls: list[str] = []
    client = store._client
    for method, name in (
        ("content_info", "Info"),
        ("list_content", "List"),
        ("some_content", "ListSome"),
    ):
        real = getattr(client, method)

        async def counted(*args: object, _real: Any = real, _name: str = name) -> object:
            calls.append(_name)
            return await _real(*args)

        monkeypatch.setattr(client, method, counted)
    return calls


async def test_a_fresh_node_is_vouched_for_by_its_first_blob(
    containerd: ContainerdNode,
    upstream: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node that holds nothing has no blob to vouch for its directory with: a stat looks at
    what containerd lists (at most once a second; here every time), and nothing listed is a
    miss without asking more; once its runtime committed a blob there, misses cost no call."""
    monkeypatch.setattr(containerd_store, "_VOUCH_EVERY_SECONDS", 0.0)
    store = await _started(_containerd_store(containerd, "fresh"))
    try:
        calls = _counted_calls(store, monkeypatch)
        absent = parse_digest("sha256:" + "9b" * 32)
        assert await store.stat(absent) is None
        assert calls == ["ListSome"]  # nothing listed: nothing held, and not vouched for
        await ContainerdBackend(store, containerd, upstream, "fresh", tmp_path).add_image()
        calls.clear()
        assert await store.stat(absent) is None
        assert calls == ["ListSome"]  # a listed blob has its file there: no file, no blob
        calls.clear()
        assert await store.stat(absent) is None
        assert calls == []
    finally:
        await store.close()


async def test_a_fresh_node_is_vouched_for_by_its_runtimes_ingest(
    containerd: ContainerdNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh node's runtime opens an ingest before it asks the node for each manifest and
    blob it pulls: one being written beside the blob directory vouches for it, so the probes
    and lookups of the pull's first seconds cost no gRPC call."""
    store = await _started(_containerd_store(containerd, "ingesting"))
    blob = b"i" * 4096
    argv = [
        CTR_BINARY, "-a", str(containerd.socket), "-n", "ingesting", "content", "ingest",
        "--expected-size", str(len(blob)), "--expected-digest",
        "sha256:" + hashlib.sha256(blob).hexdigest(), "ingesting-test",
    ]  # fmt: skip
    ingest = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        ingest_dir = containerd.content_dir / "ingest"
        wait_until(
            lambda: any(
                ref.read_text().startswith("ingesting/") for ref in ingest_dir.glob("*/ref")
            ),
            "ctr's ingest to open",
        )
        calls = _counted_calls(store, monkeypatch)
        absent = parse_digest("sha256:" + "9d" * 32)
        assert await store.stat(absent) is None
        assert await store.stat_many([absent]) == {}
        assert calls == []
    finally:
        assert ingest.stdin is not None
        ingest.stdin.write(blob)
        ingest.stdin.close()
        assert ingest.wait(timeout=30) == 0
        await store.close()


async def test_a_directory_lacking_the_listed_blobs_is_not_vouched_for(
    containerd: ContainerdNode,
    upstream: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A readable directory that is not containerd's (a copy, another daemon's) must never make
    a miss of a blob containerd holds: once a listing's blobs are all missing there, the search
    ends, with one warning, and the API answers every stat."""
    monkeypatch.setattr(containerd_store, "_VOUCH_EVERY_SECONDS", 0.0)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "blobs" / "sha256").mkdir(parents=True)
    store = await _started(_containerd_store(containerd, "elsewhere", elsewhere))
    try:
        image = await ContainerdBackend(
            store, containerd, upstream, "elsewhere", tmp_path
        ).add_image()
        calls = _counted_calls(store, monkeypatch)
        with caplog.at_level(logging.WARNING, logger=containerd_store.__name__):
            assert await store.stat(image.layer) == len(image.blobs[image.layer])
        assert calls == ["ListSome", "Info"]
        assert "lacks the blobs containerd lists" in caplog.text
        calls.clear()
        assert await store.stat(image.layer) == len(image.blobs[image.layer])
        assert await store.stat(parse_digest("sha256:" + "9c" * 32)) is None
        assert calls == ["Info", "Info"]
    finally:
        await store.close()


class TestContainerdStoreStreaming(StoreContract):
    """The content directory is unreadable (another mount namespace): Content.Read."""

    @pytest.fixture
    async def backend(
        self, containerd: ContainerdNode, upstream: Registry, tmp_path: Path
    ) -> AsyncIterator[Backend]:
        store = await _started(_containerd_store(containerd, K8S, tmp_path / "not-mounted"))
        try:
            yield ContainerdBackend(store, containerd, upstream, K8S, tmp_path)
        finally:
            await store.close()

    async def test_blobs_stream_through_the_api(self, backend: Backend) -> None:
        image = await backend.add_image()
        blob = await backend.store.open(image.layer)
        assert isinstance(blob, StreamBlob)
        await blob.close()


class TestLayeredStoreOverMoby(StoreContract):
    """Docker's containerd image store: namespace `moby`, then the node cache."""

    @pytest.fixture
    async def backend(
        self, containerd: ContainerdNode, upstream: Registry, tmp_path: Path
    ) -> AsyncIterator[Backend]:
        store = LayeredStore(_containerd_store(containerd, MOBY), CacheStore(tmp_path / "cache"))
        await store.start()
        try:
            yield ContainerdBackend(store, containerd, upstream, MOBY, tmp_path)
        finally:
            await store.close()

    async def test_other_namespaces_do_not_see_it(
        self, backend: Backend, containerd: ContainerdNode
    ) -> None:
        image = await backend.add_image()
        k8s = await _started(_containerd_store(containerd, K8S))
        try:
            assert containerd.has_blob(str(image.layer))
            assert await k8s.resolve(image.ref) is None
            assert await k8s.stat(image.layer) is None
            assert await k8s.open(image.layer) is None
        finally:
            await k8s.close()


class TestLayeredStoreFromItsCache(StoreContract):
    """containerd holds nothing of the image: everything comes from the cache half."""

    @pytest.fixture
    async def backend(self, containerd: ContainerdNode, tmp_path: Path) -> AsyncIterator[Backend]:
        cache = CacheStore(tmp_path / "cache")
        store = LayeredStore(_containerd_store(containerd, K8S), cache)
        await store.start()
        try:
            yield CacheBackend(cache, store)
        finally:
            await store.close()


# --- a tag pointing at a digest mirror cannot use --------------------------------------------

UNUSABLE = "sha384:" + "ab" * 48  # valid for containerd, not an algorithm mirror verifies
BROKEN_NAME = "registry.test/team/broken:v1"


class _OneBrokenImage(images_pb2_grpc.ImagesServicer):
    """An Images service holding one image whose target digest mirror cannot use."""

    def _image(self) -> images_pb2.Image:
        target = descriptor_pb2.Descriptor(media_type=OCI_MANIFEST, digest=UNUSABLE, size=10)
        return images_pb2.Image(name=BROKEN_NAME, target=target)

    async def Get(
        self, request: images_pb2.GetImageRequest, context: grpc.aio.ServicerContext
    ) -> images_pb2.GetImageResponse:
        if request.name != BROKEN_NAME:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"image {request.name}: not found")
        return images_pb2.GetImageResponse(image=self._image())

    async def List(
        self, request: images_pb2.ListImagesRequest, context: grpc.aio.ServicerContext
    ) -> images_pb2.ListImagesResponse:
        return images_pb2.ListImagesResponse(images=[self._image()])


@pytest.fixture
async def broken_containerd(tmp_path: Path) -> AsyncIterator[ContainerdStore]:
    """A ContainerdStore (not started: the fake has no Introspection) over the fake service."""
    server = grpc.aio.server()
    images_pb2_grpc.add_ImagesServicer_to_server(_OneBrokenImage(), server)  # type: ignore[no-untyped-call]
    socket = tmp_path / "fake.sock"
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    store = ContainerdStore(ContainerdConfig(socket, K8S, tmp_path))
    try:
        yield store
    finally:
        await store.close()
        await server.stop(grace=None)


async def test_containerd_tag_with_an_unusable_digest_is_not_held(
    broken_containerd: ContainerdStore, caplog: pytest.LogCaptureFixture
) -> None:
    ref = tag_ref("registry.test", "team/broken", "v1")
    with caplog.at_level(logging.WARNING, logger="mirror.stores"):
        assert await broken_containerd.resolve(ref) is None
    assert UNUSABLE in caplog.text and str(ref) in caplog.text
    assert await broken_containerd.images() == []


async def test_layered_store_takes_the_cache_tag_when_the_runtime_tag_is_unusable(
    broken_containerd: ContainerdStore, tmp_path: Path
) -> None:
    cache = CacheStore(tmp_path / "cache")
    await cache.start()
    ref = tag_ref("registry.test", "team/broken", "v1")
    cached = parse_digest("sha256:" + "cd" * 32)
    await cache.set_tag(ref, cached)
    assert await LayeredStore(broken_containerd, cache).resolve(ref) == cached
