"""Serve what containerd holds in one namespace.

containerd's blob directory is shared by every namespace, so presence is always asked from the
API (Content.Info answers NOT_FOUND for a digest this namespace does not hold) before a file is
opened. Bytes go out with sendfile from the content directory; when that directory cannot be read
(another mount namespace, no permission) they are streamed through Content.Read instead.

Two exceptions, both once the directory has proven to be the live one (a blob the API listed
was found in it, or an ingest of this namespace is being written beside it; a path that merely
exists, or a mount of another copy, must not decide).
A blob with no file is a miss without asking: containerd writes the file before its database
lists the blob, so no file means no namespace holds it. Peers probe a node for the blobs it is
still receiving, all such misses, and a gRPC call costs a starved node more than its answer is
worth. And a blob the API listed is believed held for `_HELD_SECONDS` (while its file is there):
a rollout's peers probe a holder for each blob again and again. Many blobs at once (`stat_many`,
a walk of an image) are asked in one call: each call wakes gRPC's threads about twenty times,
and on a node with a small CPU share its runtime pays for those wake-ups.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Collection
from pathlib import Path
from typing import Final, TypeVar

from mirror.config import ContainerdConfig
from mirror.errors import ContentVanished, DigestInvalid, StoreUnavailable
from mirror.oci.reference import Digest, TagRef, parse_digest, parse_image_name
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
    ContentInfo,
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
# While the blob directory is not vouched for, a listing is searched for a blob that would
# vouch for it at most this often.
_VOUCH_EVERY_SECONDS = 1.0
# Blobs believed held are pruned of expired ones past this many.
_HELD_KEPT = 1024


class _Ask(enum.Enum):
    """Not known without asking containerd (`ContainerdStore._believed`)."""

    ASK = enum.auto()


_ASK: Final = _Ask.ASK


class ContainerdStore(Store):
    name = "containerd"
    shows_receiving = True

    def __init__(self, config: ContainerdConfig) -> None:
        self._config = config
        self._client = ContainerdClient(str(config.socket), config.namespace)
        self._blob_dir: Path | None = None
        # Set once a blob the API listed was found in `_blob_dir`: a missing file is a miss.
        self._files_vouched = False
        # When to look for a blob that vouches for the directory next (`_seek_vouching`).
        self._vouch_after = -math.inf
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
        # Not vouched for yet: a listing that vouches answers a miss here, and the next ones.
        if await self._seek_vouching():
            return None  # containerd lists nothing in this namespace
        believed = self._believed(digest)
        if believed is not _ASK:
            return believed
        info = await self._call(self._client.content_info(str(digest)))
        if info is None:
            self._held.pop(digest, None)
            return None
        self._listed(digest, info.size)
        return info.size

    async def stat_many(self, digests: Collection[Digest]) -> dict[Digest, int]:
        """What `stat` would say of each, in one `Content.List` for all those the store cannot
        answer from what it knows (a walk of an image asks about all its blobs at once)."""
        self._vouched_by_ingest()
        sizes: dict[Digest, int] = {}
        ask: dict[str, Digest] = {}
        for digest in digests:
            believed = self._believed(digest)
            if believed is _ASK:
                ask[str(digest)] = digest
            elif believed is not None:
                sizes[digest] = believed
        if not ask:
            return sizes
        for info in await self._call(self._client.list_content(list(ask))):
            listed = ask.get(info.digest)
            if listed is not None:
                del ask[info.digest]
                self._listed(listed, info.size)
                sizes[listed] = info.size
        for missing in ask.values():
            self._held.pop(missing, None)
        await self._seek_vouching()  # after: a blob just listed may have vouched already
        return sizes

    async def _seek_vouching(self) -> bool:
        """While the blob directory is not vouched for, look for what vouches for it: an ingest
        of this namespace containerd is writing beside it (`Ingests.live`: a fresh node's
        runtime opens one before it asks this node for each manifest and blob it pulls), or,
        at most every `_VOUCH_EVERY_SECONDS`, a blob the API lists that has its file there.
        Until then every probe of the node, and every lookup of its own, costs a gRPC call, in
        the seconds when a rollout's nodes are shortest of CPU. A listing that does not vouch
        ends the search: its blobs are missing from the directory (not the live one: said
        once) or cannot be looked at there (said at start).

        True when the listing showed the namespace holds nothing: a miss, without asking."""
        if self._vouched_by_ingest() or self._vouch_after == math.inf:
            return False
        now = time.monotonic()
        if now < self._vouch_after:
            return False
        self._vouch_after = now + _VOUCH_EVERY_SECONDS
        try:
            listed = await self._client.some_content()
        except ContainerdError:
            return False
        if not listed:
            return True
        found = {self._file_there(digest) for digest in _parsed_digests(listed)}
        if True in found:
            self._files_vouched = True
        elif found:
            self._vouch_after = math.inf
            if found == {False}:
                log.warning(
                    "%s lacks the blobs containerd lists: asking its API about every blob",
                    self._blob_dir,
                )
        return False

    def _vouched_by_ingest(self) -> bool:
        """Whether the blob directory is vouched for, once more looking at the ingests beside
        it unless a listing showed it is not the live one (no gRPC call)."""
        if not self._files_vouched and self._vouch_after != math.inf:
            self._files_vouched = self._ingests is not None and self._ingests.live()
        return self._files_vouched

    def _believed(self, digest: Digest) -> int | _Ask | None:
        """What is known of `digest` without asking containerd: a miss (None), its size (held
        lately), or `_ASK`."""
        if not self._files_vouched:
            return _ASK
        if self._file_there(digest) is False:
            self._held.pop(digest, None)
            return None
        held = self._held.get(digest)
        if held is not None and time.monotonic() < held[1]:
            return held[0]
        return _ASK

    def _listed(self, digest: Digest, size: int) -> None:
        """containerd listed `digest` in this namespace: its file, when there, vouches for the
        blob directory, and once it is vouched for the blob is believed held for
        `_HELD_SECONDS`."""
        if not self._files_vouched:
            if not self._file_there(digest):
                return
            self._files_vouched = True
        now = time.monotonic()
        if len(self._held) >= _HELD_KEPT:
            self._held = {d: entry for d, entry in self._held.items() if entry[1] > now}
        self._held[digest] = (size, now + _HELD_SECONDS)

    def _file_there(self, digest: Digest) -> bool | None:
        """Whether `digest` has a file in the blob directory; None when that cannot be told
        (unreadable now, or no directory). One `stat`: not worth a thread."""
        if self._blob_dir is None:
            return None
        try:
            os.stat(_blob_path(self._blob_dir, digest))
        except FileNotFoundError:
            return False
        except OSError:
            return None
        return True

    async def open(self, digest: Digest) -> BlobSource | None:
        size = await self.stat(digest)
        if size is None:
            return None
        if self._blob_dir is not None:
            path = _blob_path(self._blob_dir, digest)
            try:
                fileobj = open(path, "rb")  # noqa: SIM115 (owned by the blob; one call: no thread)
            except OSError as exc:
                log.debug("cannot open %s (%s): streaming it through the API", path, exc)
            else:
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


def _parsed_digests(infos: list[ContentInfo]) -> list[Digest]:
    """The digests of `infos` this mirror serves (others, of another algorithm, left out)."""
    digests = []
    for info in infos:
        try:
            digests.append(parse_digest(info.digest))
        except DigestInvalid:
            continue
    return digests


def _blob_path(blob_dir: Path, digest: Digest) -> Path:
    """Where containerd keeps the committed blob `digest` under its `blobs` directory."""
    return blob_dir / digest.algorithm / digest.hex
