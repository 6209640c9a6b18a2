"""The sources the content service draws from besides this node: peers and upstream.

The service depends on these small protocols, not on the HTTP clients behind them
(`peers.fetcher.PeerFetcher`, `upstream.client.UpstreamClient`), so its decision order is unit
tested with in-memory sources, in milliseconds and without sockets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from mirror.oci.reference import Digest, TagRef
from mirror.peers.fetcher import PeerBlob, PeerManifest, Redirect
from mirror.ranges import RangeRequest
from mirror.request import Target
from mirror.routing.router import Provider
from mirror.upstream.client import Manifest, ManifestRef


class PeerSource(Protocol):
    """Other nodes of the cluster, found through the router (`PeerFetcher`)."""

    async def manifest(
        self, key: str, path: str, expected: Digest | None
    ) -> PeerManifest | None: ...

    async def blob(
        self,
        digest: Digest,
        path: str,
        requested: RangeRequest | None,
        *,
        head: bool = False,
        sharing: bool = False,
        nearer_than: int | None = None,
    ) -> PeerBlob | None: ...

    async def redirect_url(
        self,
        digest: Digest,
        path: str,
        *,
        sharing: bool = False,
        among: list[Provider] | None = None,
    ) -> Redirect | None: ...

    async def blob_from(
        self,
        candidates: list[Provider],
        digest: Digest,
        path: str,
        requested: RangeRequest | None,
        *,
        head: bool = False,
        nearer_than: int | None = None,
    ) -> PeerBlob | None: ...


class OpenBlob(Protocol):
    """An upstream blob response: headers read (`status` 200 or 206), body not yet."""

    status: int
    size: int
    offset: int
    length: int

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class UpstreamSource(Protocol):
    """Registries outside the cluster (`UpstreamClient`): failures raise `UpstreamError`,
    absence is None."""

    async def head_manifest(
        self, registry: str, repository: str, reference: str, *, timeout: float
    ) -> ManifestRef | None: ...

    async def get_manifest(
        self, registry: str, repository: str, reference: str
    ) -> Manifest | None: ...

    async def get_blob(
        self,
        registry: str,
        repository: str,
        digest: Digest,
        requested: RangeRequest | None = None,
    ) -> OpenBlob | None: ...


class TagAliases(Protocol):
    """Expected names with a fallback ("expected <- source", `prefetch/`): when `ref` cannot
    be resolved anywhere, the runtime is answered with what `source_for(ref)` names."""

    def source_for(self, ref: TagRef) -> Target | None: ...
