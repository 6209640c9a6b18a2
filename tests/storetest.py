"""What every `Store` does, checked the same way against every real backend.

A backend's test class subclasses `StoreContract` and provides a `backend` fixture: a started
store, the way content really gets into it (a pull into containerd, a verified write into the
node cache) and the way it really disappears (image removal and containerd's GC, a file deleted
from the cache directory). Each check is one behaviour, named for it.

Every image is fresh (random layer), so checks never see each other's content even when their
backends share one containerd.
"""

from __future__ import annotations

import os
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from harness.images import (
    HOST_PLATFORM,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    canonical_json,
    make_layer,
    sha256_digest,
)

from mirror.errors import ContentVanished
from mirror.oci.reference import Digest, TagRef, parse_digest, tag_ref
from mirror.stores.base import BlobSource, FileBlob, ImageEntry, Store
from mirror.stores.inventory import take_inventory
from mirror.stores.manifests import read_manifest

MIB = 1024 * 1024
# Several 1 MiB file chunks and Content.Read messages, and not a multiple of either.
LAYER_SIZE = 2 * MIB + 12345


@dataclass(frozen=True)
class Image:
    """A single-platform OCI image: its tag, its manifest digest and the bytes of every blob."""

    ref: TagRef
    manifest: Digest
    config: Digest
    layer: Digest
    blobs: dict[Digest, bytes]


def _digest(data: bytes) -> Digest:
    return parse_digest(sha256_digest(data))


def build_image(registry: str, tag: str = "v1") -> Image:
    """A new image under a unique repository of `registry`, with one random layer."""
    layer, diff_id = make_layer({"data/blob.bin": os.urandom(LAYER_SIZE)}, compresslevel=0)
    os_, arch = HOST_PLATFORM
    config = canonical_json(
        {"architecture": arch, "os": os_, "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    )

    def descriptor(media_type: str, data: bytes) -> dict[str, object]:
        return {"mediaType": media_type, "digest": str(_digest(data)), "size": len(data)}

    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(OCI_LAYER_GZIP, layer)],
        }
    )
    repository = f"conformance/{uuid.uuid4().hex[:12]}"
    return Image(
        ref=tag_ref(registry, repository, tag),
        manifest=_digest(manifest),
        config=_digest(config),
        layer=_digest(layer),
        blobs={_digest(data): data for data in (manifest, config, layer)},
    )


def write_oci_layout(image: Image, directory: Path) -> str:
    """`image` as an OCI image layout; returns the skopeo source `oci:DIR:TAG`."""
    blob_dir = directory / "blobs" / "sha256"
    blob_dir.mkdir(parents=True)
    for digest, data in image.blobs.items():
        (blob_dir / digest.hex).write_bytes(data)
    top = {
        "mediaType": OCI_MANIFEST,
        "digest": str(image.manifest),
        "size": len(image.blobs[image.manifest]),
        "annotations": {"org.opencontainers.image.ref.name": image.ref.tag},
    }
    (directory / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    (directory / "index.json").write_bytes(
        canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top]})
    )
    return f"oci:{directory}:{image.ref.tag}"


class Backend(ABC):
    """A started store, and how content gets into it and out of it behind its back."""

    store: Store

    @abstractmethod
    async def add_image(self) -> Image:
        """Put a fresh tagged image into the store the way it arrives in production."""

    @abstractmethod
    async def vanish(self, image: Image) -> None:
        """Take every blob of `image` away the way it really goes (GC, a deleted file)."""


async def read_range(blob: BlobSource, offset: int, length: int) -> bytes:
    return b"".join([chunk async for chunk in blob.iter_range(offset, length)])


async def read_whole(store: Store, digest: Digest) -> bytes | None:
    blob = await store.open(digest)
    if blob is None:
        return None
    try:
        assert blob.size == await store.stat(digest)
        return await blob.read_all(blob.size)
    finally:
        await blob.close()


def never_stored() -> list[Digest]:
    """Well-formed digests of content no store holds, in both supported algorithms."""
    return [
        parse_digest("sha256:" + os.urandom(32).hex()),
        parse_digest("sha512:" + os.urandom(64).hex()),
    ]


class _VanishingAfterOpen(Store):
    """`store`, except that every blob disappears right after it was opened."""

    name = "vanishing"

    def __init__(self, backend: Backend, image: Image) -> None:
        self._backend = backend
        self._image = image
        self.opened: list[BlobSource] = []

    async def resolve(self, ref: TagRef) -> Digest | None:
        return await self._backend.store.resolve(ref)

    async def stat(self, digest: Digest) -> int | None:
        return await self._backend.store.stat(digest)

    async def open(self, digest: Digest) -> BlobSource | None:
        blob = await self._backend.store.open(digest)
        if blob is not None:
            self.opened.append(blob)
            await self._backend.vanish(self._image)
        return blob

    async def images(self) -> list[ImageEntry]:
        return await self._backend.store.images()


class StoreContract:
    """The checks; a subclass supplies the `backend` fixture (a `Backend`)."""

    async def test_is_ready(self, backend: Backend) -> None:
        assert await backend.store.ready() is True

    async def test_resolves_a_held_tag_to_its_digest(self, backend: Backend) -> None:
        image = await backend.add_image()
        found = await backend.store.resolve(image.ref)
        assert isinstance(found, Digest)
        assert found == image.manifest

    async def test_an_unknown_tag_resolves_to_none(self, backend: Backend) -> None:
        image = await backend.add_image()
        assert await backend.store.resolve(replace(image.ref, tag="not-held")) is None
        other_repository = replace(image.ref, repository=image.ref.repository + "/other")
        assert await backend.store.resolve(other_repository) is None

    async def test_stat_gives_the_exact_size(self, backend: Backend) -> None:
        image = await backend.add_image()
        for digest, data in image.blobs.items():
            assert await backend.store.stat(digest) == len(data), digest

    async def test_open_reads_every_blob_whole(self, backend: Backend) -> None:
        image = await backend.add_image()
        for digest, data in image.blobs.items():
            assert await read_whole(backend.store, digest) == data, digest

    async def test_ranges_read_byte_exact(self, backend: Backend) -> None:
        image = await backend.add_image()
        data = image.blobs[image.layer]
        size = len(data)
        blob = await backend.store.open(image.layer)
        assert blob is not None
        try:
            for offset, length in [
                (0, size),
                (0, 1),
                (size - 1, 1),
                (1, size - 1),
                (MIB - 1, 2),
                (MIB, MIB + 5),
                (12345, 67890),
                (size - 1000, 1000),
            ]:
                got = await read_range(blob, offset, length)
                assert got == data[offset : offset + length], (offset, length)
        finally:
            await blob.close()

    async def test_an_empty_range_reads_nothing(self, backend: Backend) -> None:
        image = await backend.add_image()
        blob = await backend.store.open(image.layer)
        assert blob is not None
        try:
            assert await read_range(blob, 12345, 0) == b""
        finally:
            await blob.close()

    async def test_a_manifest_reads_with_its_media_type(self, backend: Backend) -> None:
        image = await backend.add_image()
        found = await read_manifest(backend.store, image.manifest)
        assert found == (image.blobs[image.manifest], OCI_MANIFEST)

    async def test_images_lists_the_tag_with_its_digest(self, backend: Backend) -> None:
        image = await backend.add_image()
        assert ImageEntry(image.ref, image.manifest) in await backend.store.images()

    async def test_the_inventory_holds_the_tag_and_every_blob(self, backend: Backend) -> None:
        image = await backend.add_image()
        inventory = await take_inventory(backend.store)
        assert str(image.ref) in inventory.tags
        assert {str(digest) for digest in image.blobs} <= inventory.digests

    async def test_stat_many_sizes_the_held_ones_and_leaves_out_the_rest(
        self, backend: Backend
    ) -> None:
        image = await backend.add_image()
        asked = [*image.blobs, *never_stored()]
        sizes = {digest: len(data) for digest, data in image.blobs.items()}
        assert await backend.store.stat_many(asked) == sizes
        assert await backend.store.stat_many([]) == {}

    async def test_missing_content_is_none(self, backend: Backend) -> None:
        for digest in never_stored():
            assert await backend.store.stat(digest) is None
            assert await backend.store.open(digest) is None
        assert await read_manifest(backend.store, never_stored()[0]) is None

    async def test_vanished_content_is_a_clean_miss(self, backend: Backend) -> None:
        image = await backend.add_image()
        assert ImageEntry(image.ref, image.manifest) in await backend.store.images()
        await backend.vanish(image)
        for digest in image.blobs:
            assert await backend.store.stat(digest) is None, digest
            assert await backend.store.open(digest) is None, digest
        assert await read_manifest(backend.store, image.manifest) is None
        # The tag itself may outlive its content (a cache's tag file) but must not fail.
        assert await backend.store.resolve(image.ref) in (None, image.manifest)
        await backend.store.images()

    async def test_a_vanished_image_is_not_advertised(self, backend: Backend) -> None:
        image = await backend.add_image()
        assert str(image.ref) in (await take_inventory(backend.store)).tags
        await backend.vanish(image)
        inventory = await take_inventory(backend.store)
        assert str(image.ref) not in inventory.tags
        assert str(image.manifest) not in inventory.digests

    async def test_an_open_blob_survives_removal_or_ends_as_vanished(
        self, backend: Backend
    ) -> None:
        """An open file keeps its bytes; a stream stops with ContentVanished, not an outage."""
        image = await backend.add_image()
        data = image.blobs[image.layer]
        blob = await backend.store.open(image.layer)
        assert blob is not None
        try:
            await backend.vanish(image)
            if isinstance(blob, FileBlob):
                assert await read_range(blob, 0, len(data)) == data
            else:
                with pytest.raises(ContentVanished):
                    await read_range(blob, 0, len(data))
        finally:
            await blob.close()

    async def test_a_manifest_that_vanishes_while_read_is_whole_or_not_held(
        self, backend: Backend
    ) -> None:
        image = await backend.add_image()
        vanishing = _VanishingAfterOpen(backend, image)
        found = await read_manifest(vanishing, image.manifest)
        if isinstance(vanishing.opened[0], FileBlob):
            assert found == (image.blobs[image.manifest], OCI_MANIFEST)
        else:
            assert found is None
