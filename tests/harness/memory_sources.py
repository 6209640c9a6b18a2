"""In-memory peers and upstream for unit tests of the content service: no sockets, no timers.

`MemoryPeers` finds holders through a `MemoryRouter` (as `PeerFetcher` does through the DHT)
and serves what each holder was given; its bodies can be held at a gate mid-blob or break there,
as a slow or dying peer's do. `MemoryUpstream` is a registry in a dict that can be taken down,
held at a gate mid-blob, and counts what it was asked for.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from mirror.errors import PeerUnavailable, RangeNotSatisfiable, UpstreamError
from mirror.oci.mediatypes import detect_manifest_type
from mirror.oci.reference import Digest
from mirror.peers.fetcher import PeerBlob, PeerManifest, Redirect
from mirror.ranges import RangeRequest
from mirror.routing.memory import MemoryRouter
from mirror.routing.router import Provider
from mirror.upstream.client import Manifest, ManifestRef


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def _chunks(
    data: bytes, gate: asyncio.Event | None = None, chunk: int | None = None
) -> AsyncIterator[bytes]:
    """The two halves of `data` (in pieces of `chunk` bytes if given), held at `gate` between."""
    half = len(data) // 2
    for index, (start, stop) in enumerate(((0, half), (half, len(data)))):
        if index and gate is not None:
            await gate.wait()
        if chunk is None:
            yield data[start:stop]
            continue
        for piece in range(start, stop, chunk):
            yield data[piece : min(piece + chunk, stop)]


class MemoryPeers:
    """The cluster's other nodes: key (digest or tag text) -> bytes, per node address."""

    def __init__(self, router: MemoryRouter) -> None:
        self._router = router
        self.held: dict[str, dict[str, bytes]] = {}
        self.asked: list[tuple[str, str]] = []  # (address, key) in order
        # Held before the second half of every blob body, while unset (None: never held).
        self.gate: asyncio.Event | None = None
        # Set when a body has handed out its first half and reached the gate (or the break).
        self.midway = asyncio.Event()
        # Bodies break after their first half (the peer died and no other could continue).
        self.break_midway = False
        self.bodies_closed = 0  # bodies let go of, read to the end or not
        # How far each node's bytes are from a holder (X-Mirror-Hops), by address; else 0.
        self.hops: dict[str, int] = {}

    def give(self, provider: Provider, key: str, data: bytes) -> None:
        """`provider` holds `data` under `key`, and has announced it."""
        self.held.setdefault(provider.address, {})[key] = data
        self._router.cluster.providers.setdefault(key, {})[provider.node_id] = provider

    async def manifest(self, key: str, path: str, expected: Digest | None) -> PeerManifest | None:
        for provider in await self._router.find_providers(key):
            self.asked.append((provider.address, key))
            body = self.held.get(provider.address, {}).get(key)
            media_type = None if body is None else detect_manifest_type(body)
            if body is not None and media_type is not None:
                return PeerManifest(body, media_type, digest_of(body))
        return None

    async def blob(
        self,
        digest: Digest,
        path: str,
        requested: RangeRequest | None,
        *,
        head: bool = False,
        sharing: bool = False,
        nearer_than: int | None = None,
    ) -> PeerBlob | None:
        candidates = await self._router.find_providers(str(digest))
        return await self.blob_from(
            candidates, digest, path, requested, head=head, nearer_than=nearer_than
        )

    async def redirect_url(
        self,
        digest: Digest,
        path: str,
        *,
        sharing: bool = False,
        among: list[Provider] | None = None,
    ) -> Redirect | None:
        return None  # the in-memory cluster has no URLs to send a runtime to

    async def blob_from(
        self,
        candidates: list[Provider],
        digest: Digest,
        path: str,
        requested: RangeRequest | None,
        *,
        head: bool = False,
        nearer_than: int | None = None,
    ) -> PeerBlob | None:
        for provider in candidates:
            self.asked.append((provider.address, str(digest)))
            data = self.held.get(provider.address, {}).get(str(digest))
            hops = self.hops.get(provider.address, 0)
            if data is None or (nearer_than is not None and hops >= nearer_than):
                continue
            part = requested.resolve(len(data)) if requested is not None else None
            offset, length = (part.offset, part.length) if part else (0, len(data))
            chunks = None if head else self._body(data[offset : offset + length])
            return PeerBlob(len(data), offset, length, chunks, hops=hops)
        return None

    async def _body(self, data: bytes) -> AsyncIterator[bytes]:
        """The two halves of `data`, held at `gate` (or broken) between them."""
        half = len(data) // 2
        try:
            yield data[:half]
            self.midway.set()
            if self.break_midway:
                raise PeerUnavailable(f"no peer could continue from byte {half}")
            if self.gate is not None:
                await self.gate.wait()
            yield data[half:]
        finally:
            self.bodies_closed += 1


@dataclass
class MemoryBlob:
    """An open upstream blob response."""

    status: int
    size: int
    offset: int
    length: int
    data: bytes
    gate: asyncio.Event | None
    closed: bool = False
    chunk: int | None = None

    def chunks(self) -> AsyncIterator[bytes]:
        return _chunks(self.data, self.gate, self.chunk)

    async def close(self) -> None:
        self.closed = True


@dataclass
class MemoryUpstream:
    """A registry in a dict. `down` makes every call fail as an unreachable registry does."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)
    tags: dict[tuple[str, str, str], str] = field(default_factory=dict)
    down: bool = False
    # Held before the second half of every blob body, while unset (None: never held).
    gate: asyncio.Event | None = None
    asked: list[tuple[str, str]] = field(default_factory=list)  # (what, reference)
    # Blob bodies come in pieces of this many bytes, as a real one does (None: two halves).
    chunk: int | None = None

    def push(self, registry: str, repository: str, tag: str, manifest: bytes) -> str:
        digest = digest_of(manifest)
        self.manifests[digest] = manifest
        self.tags[(registry, repository, tag)] = digest
        return digest

    def count(self, what: str, reference: str) -> int:
        return self.asked.count((what, reference))

    def _call(self, what: str, reference: str) -> None:
        self.asked.append((what, reference))
        if self.down:
            raise UpstreamError(f"{what} {reference}: upstream is down")

    async def head_manifest(
        self, registry: str, repository: str, reference: str, *, timeout: float
    ) -> ManifestRef | None:
        self._call("head", reference)
        digest = self.tags.get((registry, repository, reference))
        if digest is None:
            return None
        body = self.manifests[digest]
        return ManifestRef(digest, detect_manifest_type(body) or "", len(body))

    async def get_manifest(self, registry: str, repository: str, reference: str) -> Manifest | None:
        self._call("manifest", reference)
        body = self.manifests.get(reference)
        if body is None:
            return None
        return Manifest(body, detect_manifest_type(body) or "", reference)

    async def get_blob(
        self,
        registry: str,
        repository: str,
        digest: Digest,
        requested: RangeRequest | None = None,
    ) -> MemoryBlob | None:
        self._call("blob", str(digest))
        data = self.blobs.get(str(digest))
        if data is None:
            return None
        if requested is None:
            return MemoryBlob(200, len(data), 0, len(data), data, self.gate, chunk=self.chunk)
        try:
            part = requested.resolve(len(data))
        except RangeNotSatisfiable:
            raise
        body = data[part.offset : part.end]
        return MemoryBlob(
            206, len(data), part.offset, part.length, body, self.gate, chunk=self.chunk
        )
