"""Serve what containerd holds in one namespace.

containerd's blob directory is shared by every namespace, so presence is always asked from the
API (Content.Info answers NOT_FOUND for a digest this namespace does not hold) before a file is
opened. Bytes go out with sendfile from the content directory; when that directory cannot be read
(another mount namespace, no permission) they are streamed through Content.Read instead.

Two exceptions, both once the directory has proven to be the live one (a blob the API listed
was opened from it; a path that merely exists, or a mount of another copy, must not decide).
A blob with no file is a miss without asking: containerd writes the file before its database
lists the blob, so no file means no namespace holds it. Peers probe a node for the blobs it is
still receiving, all such misses, and a gRPC call costs a starved node more than its answer is
worth. And a blob the API listed is believed held for `_HELD_SECONDS` while its file is there:
a rollout's peers probe a holder for each blob again and again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

from mirror.config import ContainerdConfig
from mirror.errors import ContentVanished, StoreUnavailable
from mirror.oci.reference import Digest, TagRef, parse_image_name
from mirror.stores.base import (
    BlobSource,
    FileBlob,
    ImageEntry,
    ReceivingBlob,
    Store,
    StreamBlob,
    usable_digest,
)
from mirror.stores.containerd.client import (
    ContainerdClient,
    ContainerdError,
    ContainerdNotFound,
    ContainerdUnavailable,
)
from mirror.stores.containerd.ingest import Ingests
from mirror.stores.containerd.watch import FileWatcher

log = logging.getLogger(__name__)

T = TypeVar("T")

_RESUBSCRIBE_MIN = 0.1
_RESUBSCRIBE_MAX = 5.0
# How long a blob the API listed is believed held without asking again (while its file is
# there; another namespace may still hold a file this one dropped, so not longer).
_HELD_SECONDS = 2.0
# Blobs believed held are pruned of expired ones past this many.
_HELD_KEPT = 1024


class ContainerdStore(Store):
    name = "containerd"
    shows_receiving = True

    def __init__(self, config: ContainerdConfig) -> None:
        self._config = config
        self._client = ContainerdClient(str(config.socket), config.namespace)
        self._blob_dir: Path | None = None
        # Set once a blob the API listed was opened from `_blob_dir`: a missing file is a miss.
        self._files_vouched = False
        # Digest -> (size, until when): blobs the API listed lately (`stat`).
        self._held: dict[Digest, tuple[int, float]] = {}
        self._ingests: Ingests | None = None
        self._watcher = FileWatcher()

    async def start(self) -> None:
        try:
            await self._client.check()
            content_path = self._config.content_path or await self._content_root()
        except ContainerdUnavailable as exc:
            raise StoreUnavailable(f"containerd at {self._config.socket}: {exc}") from exc
        # Kept even when unreadable now: a fresh node has no blob directory until its first pull.
        self._blob_dir = content_path / "blobs"
        self._ingests = Ingests(content_path, self._config.namespace, watcher=self._watcher)
        if await asyncio.to_thread(os.access, self._blob_dir, os.R_OK | os.X_OK):
            log.info("serving containerd blobs from %s with sendfile", self._blob_dir)
        else:
            log.warning(
                "cannot read %s (yet): streaming blobs through containerd's API until it can",
                self._blob_dir,
            )

    async def _content_root(self) -> Path:
        root = await self._client.content_root()
        if root is None:
            raise ContainerdUnavailable("it reports no content store plugin")
        return Path(root)

    async def close(self) -> None:
        self._watcher.close()
        await self._client.close()

    async def ready(self) -> bool:
        try:
            await self._client.check()
        except ContainerdUnavailable:
            return False
        return True

    async def resolve(self, ref: TagRef) -> Digest | None:
        image = await self._call(self._client.get_image(str(ref)))
        return usable_digest(self.name, ref, image.digest) if image is not None else None

    async def stat(self, digest: Digest) -> int | None:
        if self._files_vouched:
            if self._no_file(digest):
                self._held.pop(digest, None)
                return None
            held = self._held.get(digest)
            if held is not None and time.monotonic() < held[1]:
                return held[0]
        info = await self._call(self._client.content_info(str(digest)))
        if info is None:
            self._held.pop(digest, None)
            return None
        if self._files_vouched:
            self._remember_held(digest, info.size)
        return info.size

    def _remember_held(self, digest: Digest, size: int) -> None:
        now = time.monotonic()
        if len(self._held) >= _HELD_KEPT:
            self._held = {d: entry for d, entry in self._held.items() if entry[1] > now}
        self._held[digest] = (size, now + _HELD_SECONDS)

    def _no_file(self, digest: Digest) -> bool:
        """Whether `digest` has no file in the blob directory (one `stat`: not worth a thread)."""
        assert self._blob_dir is not None, "vouched for only once the directory is known"
        try:
            os.stat(_blob_path(self._blob_dir, digest))
        except FileNotFoundError:
            return True
        except OSError:
            return False  # unreadable now: the API decides
        return False

    async def open(self, digest: Digest) -> BlobSource | None:
        size = await self.stat(digest)
        if size is None:
            return None
        if self._blob_dir is not None:
            path = _blob_path(self._blob_dir, digest)
            try:
                fileobj = await asyncio.to_thread(open, path, "rb")
            except OSError as exc:
                log.debug("cannot open %s (%s): streaming it through the API", path, exc)
            else:
                self._files_vouched = True
                return FileBlob(fileobj, os.fstat(fileobj.fileno()).st_size)
        return StreamBlob(size, lambda offset, length: self._read(digest, offset, length))

    async def receiving(self, digest: Digest) -> ReceivingBlob | None:
        """containerd's ingest of `digest` in this namespace, read from its file as it grows
        (stores/containerd/ingest.py); None when none is under way or the files are unreadable."""
        if self._ingests is None:
            return None
        return await self._ingests.find(digest)

    async def _read(self, digest: Digest, offset: int, length: int) -> AsyncIterator[bytes]:
        if length <= 0:
            return  # Content.Read takes size 0 as "to the end"
        try:
            async for chunk in self._client.read_content(str(digest), offset, length):
                yield chunk
        except ContainerdNotFound as exc:
            raise ContentVanished(f"{digest} left containerd while it was read: {exc}") from exc
        except ContainerdError as exc:
            raise StoreUnavailable(f"containerd stopped streaming {digest}: {exc}") from exc

    async def changes(self) -> AsyncIterator[None]:
        """Image and content events of this namespace; after a lost stream, one change to rescan.

        containerd 1.6 publishes no event when content is written, but every pull ends with an
        image create or update, which is when the new content becomes reachable.
        """
        namespace = f'namespace=="{self._config.namespace}"'
        filters = [f'{namespace},topic~="^/images/"', f'{namespace},topic=="/content/delete"']
        backoff = _RESUBSCRIBE_MIN
        while True:
            try:
                async for _event in self._client.subscribe(filters):
                    backoff = _RESUBSCRIBE_MIN
                    self._held.clear()  # a delete in this namespace: believe none of them
                    yield
            except ContainerdError as exc:
                log.warning("containerd event stream lost (%s); resubscribing", exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RESUBSCRIBE_MAX)
            # Events in between are lost: have the caller rescan, and believe no blob held.
            self._held.clear()
            yield

    async def images(self) -> list[ImageEntry]:
        records = await self._call(self._client.list_images())
        entries = []
        for record in records:
            ref = parse_image_name(record.name)
            if ref is None:
                continue
            digest = usable_digest(self.name, ref, record.digest)
            if digest is not None:
                entries.append(ImageEntry(ref, digest))
        return entries

    async def _call(self, pending: Awaitable[T]) -> T:
        """Await a client call; a containerd that went away becomes `StoreUnavailable`."""
        try:
            return await pending
        except ContainerdError as exc:
            raise StoreUnavailable(f"containerd at {self._config.socket}: {exc}") from exc


def _blob_path(blob_dir: Path, digest: Digest) -> Path:
    """Where containerd keeps the committed blob `digest` under its `blobs` directory."""
    return blob_dir / digest.algorithm / digest.hex
