"""An in-memory `Store` for fast unit tests: blobs and tags in dicts, changes on every write."""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import AsyncIterator

from mirror.oci.reference import Digest, TagRef, parse_digest
from mirror.stores.base import BlobSource, ImageEntry, Store, StreamBlob


class MemoryStore(Store):
    name = "memory"

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.tags: dict[TagRef, Digest] = {}
        self.broken = False  # images() raises, as a store that went away does
        self._changed = asyncio.Condition()
        self._version = 0

    async def put(self, data: bytes) -> Digest:
        digest = parse_digest("sha256:" + hashlib.sha256(data).hexdigest())
        self.blobs[str(digest)] = data
        await self._notify()
        return digest

    async def remove(self, digest: Digest) -> None:
        self.blobs.pop(str(digest), None)
        await self._notify()

    async def tag(self, ref: TagRef, digest: Digest) -> None:
        self.tags[ref] = digest
        await self._notify()

    async def untag(self, ref: TagRef) -> None:
        self.tags.pop(ref, None)
        await self._notify()

    async def resolve(self, ref: TagRef) -> Digest | None:
        return self.tags.get(ref)

    async def stat(self, digest: Digest) -> int | None:
        data = self.blobs.get(str(digest))
        return None if data is None else len(data)

    async def open(self, digest: Digest) -> BlobSource | None:
        data = self.blobs.get(str(digest))
        if data is None:
            return None

        async def read(offset: int, length: int) -> AsyncIterator[bytes]:
            yield data[offset : offset + length]

        return StreamBlob(len(data), read)

    async def images(self) -> list[ImageEntry]:
        if self.broken:
            raise OSError("the store went away")
        return [ImageEntry(ref, digest) for ref, digest in self.tags.items()]

    async def changes(self) -> AsyncIterator[None]:
        seen = self._version
        while True:
            async with self._changed:
                await self._changed.wait_for(functools.partial(self._changed_since, seen))
                seen = self._version
            yield

    def _changed_since(self, version: int) -> bool:
        return self._version != version

    async def _notify(self) -> None:
        async with self._changed:
            self._version += 1
            self._changed.notify_all()
