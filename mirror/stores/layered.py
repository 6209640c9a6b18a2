"""The runtime's store first, the node cache second: what a node holds, as one store.

Content the runtime holds (containerd's content store) is served from there in preference to a
cached copy; the cache adds what passed through this node from upstream (on Docker's classic
store, the only place manifests and compressed layers exist at all).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection

from mirror.oci.reference import Digest, TagRef
from mirror.stores.base import BlobSource, ImageEntry, ReceivingBlob, Store
from mirror.stores.cache import CacheStore


class LayeredStore(Store):
    def __init__(self, runtime: Store, cache: CacheStore) -> None:
        self.runtime = runtime
        self.cache = cache
        self.name = runtime.name
        self.shows_receiving = runtime.shows_receiving

    async def start(self) -> None:
        await self.runtime.start()
        await self.cache.start()

    async def close(self) -> None:
        await self.runtime.close()
        await self.cache.close()

    async def ready(self) -> bool:
        return await self.runtime.ready()

    async def resolve(self, ref: TagRef) -> Digest | None:
        digest = await self.runtime.resolve(ref)
        return digest if digest is not None else await self.cache.resolve(ref)

    async def stat(self, digest: Digest) -> int | None:
        size = await self.runtime.stat(digest)
        return size if size is not None else await self.cache.stat(digest)

    async def stat_many(self, digests: Collection[Digest]) -> dict[Digest, int]:
        sizes = await self.runtime.stat_many(digests)
        rest = [digest for digest in digests if digest not in sizes]
        return sizes | await self.cache.stat_many(rest) if rest else sizes

    async def open(self, digest: Digest) -> BlobSource | None:
        blob = await self.runtime.open(digest)
        return blob if blob is not None else await self.cache.open(digest)

    async def receiving(self, digest: Digest) -> ReceivingBlob | None:
        return await self.runtime.receiving(digest)

    async def images(self) -> list[ImageEntry]:
        runtime, cached = await asyncio.gather(self.runtime.images(), self.cache.images())
        seen = {entry.ref for entry in runtime}
        return runtime + [entry for entry in cached if entry.ref not in seen]

    async def loose_digests(self) -> list[str]:
        return await self.cache.loose_digests()

    async def changes(self) -> AsyncIterator[None]:
        queue: asyncio.Queue[None] = asyncio.Queue()

        async def forward(store: Store) -> None:
            async for _ in store.changes():
                queue.put_nowait(None)

        tasks = [asyncio.create_task(forward(s)) for s in (self.runtime, self.cache)]
        try:
            while True:
                await queue.get()
                yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
