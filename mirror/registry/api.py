"""Handlers of the pull API: manifests and blobs from the node's store, else from its peers."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from mirror.errors import (
    BlobUnknown,
    Denied,
    DigestInvalid,
    ManifestUnknown,
    NameUnknown,
    PaginationInvalid,
    RegistryError,
    ServiceUnavailable,
    StoreUnavailable,
    Unauthorized,
    Unsupported,
)
from mirror.metrics import SOURCE_LOCAL, SOURCE_NONE, SOURCE_PEER, Metrics
from mirror.oci.mediatypes import MAX_MANIFEST_SIZE, OCTET_STREAM, detect_manifest_type
from mirror.oci.reference import Digest, parse_digest
from mirror.peers.fetcher import PeerFetcher
from mirror.registry.access import AccessPolicy, Caller
from mirror.registry.paths import Kind, Target, parse_target
from mirror.registry.ranges import parse_range
from mirror.registry.responses import API_VERSION_HEADER, error_response, send_blob, send_chunks
from mirror.stores.base import Store

log = logging.getLogger(__name__)

_READ_METHODS = frozenset({"GET", "HEAD"})
_KIND_KEY = web.RequestKey("kind", str)
_SOURCE_KEY = web.RequestKey("source", str)


class RegistryApi:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        access: AccessPolicy | None = None,
        peers: PeerFetcher | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._access = access or AccessPolicy(allowed_clients=(), verifier=None)
        self._peers = peers

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._observe])
        app.router.add_route("*", "/v2", self._base)
        app.router.add_route("*", "/v2/", self._base)
        app.router.add_route("*", "/v2/{path:.*}", self._pull)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    @web.middleware
    async def _observe(self, request: web.Request, handler: web.Handler) -> web.StreamResponse:
        """Render errors as OCI JSON (never a traceback) and record every API request."""
        started = time.perf_counter()
        try:
            response = await handler(request)
        except RegistryError as error:
            if isinstance(error, Denied | Unauthorized):
                self._metrics.refused_requests.labels(error.code.lower()).inc()
            response = error_response(error)
        except StoreUnavailable as error:
            log.warning("%s %s: %s", request.method, request.path, error)
            response = error_response(ServiceUnavailable(str(error)))
        except web.HTTPException:
            raise
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.path)
            response = error_response(RegistryError("internal error"))
        kind = request.get(_KIND_KEY)
        if kind is not None:
            sent = 0 if request.method == "HEAD" else response.content_length or 0
            self._metrics.observe(
                method=request.method,
                kind=kind,
                status=response.status,
                source=request.get(_SOURCE_KEY, SOURCE_NONE),
                seconds=time.perf_counter() - started,
                body_bytes=sent if response.status < 300 else 0,
            )
        return response

    async def _base(self, request: web.Request) -> web.Response:
        request[_KIND_KEY] = "base"
        if request.method not in _READ_METHODS:
            raise Unsupported(f"{request.method} is not supported by this mirror")
        return web.json_response({}, headers=API_VERSION_HEADER)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if await self._store.ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"store {self._store.name} is not ready\n")

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        request[_KIND_KEY] = "other"
        caller = self._access.classify(request)
        target = parse_target(request.match_info["path"], request.query.get("ns"))
        request[_KIND_KEY] = target.kind.value
        if request.method not in _READ_METHODS:
            raise Unsupported(f"{request.method} is not supported: this mirror only serves pulls")
        if target.kind is Kind.MANIFEST:
            return await self._manifest(request, target, caller)
        if target.kind is Kind.TAGS:
            return await self._tags(request, target)
        assert target.digest is not None
        return await self._blob(request, target.digest, caller)

    async def _manifest(
        self, request: web.Request, target: Target, caller: Caller
    ) -> web.StreamResponse:
        local = await self._local_manifest(target)
        if local is not None:
            request[_SOURCE_KEY] = SOURCE_LOCAL
            digest, body, media_type = local
        elif caller is Caller.RUNTIME and self._peers is not None:
            fetched = await self._peers.manifest(
                str(target.tag or target.digest), _peer_path(request), target.digest
            )
            if fetched is None:
                raise ManifestUnknown(f"{target.tag or target.digest} is not held in the cluster")
            request[_SOURCE_KEY] = SOURCE_PEER
            digest, body, media_type = fetched.digest, fetched.body, fetched.media_type
        else:
            raise ManifestUnknown(f"{target.tag or target.digest} is not held here")
        headers = {
            **API_VERSION_HEADER,
            "Docker-Content-Digest": str(digest),
            "Content-Type": media_type,
        }
        return web.Response(body=body, headers=headers)

    async def _local_manifest(self, target: Target) -> tuple[str, bytes, str] | None:
        """(digest, bytes, media type) of a manifest this node holds, or None."""
        digest = target.digest or await self._resolve_tag(target)
        if digest is None:
            return None
        blob = await self._store.open(digest)
        if blob is None:
            return None
        try:
            if blob.size > MAX_MANIFEST_SIZE:
                raise ManifestUnknown(f"{digest} is too large to be a manifest")
            body = await blob.read_all(MAX_MANIFEST_SIZE)
        finally:
            await blob.close()
        media_type = detect_manifest_type(body)
        if media_type is None:
            raise ManifestUnknown(f"{digest} is not a manifest")
        return str(digest), body, media_type

    async def _resolve_tag(self, target: Target) -> Digest | None:
        assert target.tag is not None
        found = await self._store.resolve(target.tag)
        if found is None:
            return None
        try:
            return parse_digest(found)
        except DigestInvalid:
            log.warning("%s points to an unusable digest %r", target.tag, found)
            return None

    async def _tags(self, request: web.Request, target: Target) -> web.Response:
        """Tags held for one repository, paginated with `n` and `last` as the spec describes."""
        tags = sorted(
            entry.ref.tag
            for entry in await self._store.images()
            if entry.ref.registry == target.registry and entry.ref.repository == target.repository
        )
        if not tags:
            raise NameUnknown(f"no tags of {target.registry}/{target.repository} are held here")
        last = request.query.get("last")
        if last is not None:
            tags = [tag for tag in tags if tag > last]
        limit = request.query.get("n")
        if limit is not None:
            if not limit.isdigit():
                raise PaginationInvalid(f"n must be a non-negative integer, not {limit!r}")
            tags = tags[: int(limit)]
        request[_SOURCE_KEY] = SOURCE_LOCAL
        body = {"name": target.repository, "tags": tags}
        return web.json_response(body, headers=API_VERSION_HEADER)

    async def _blob(
        self, request: web.Request, digest: Digest, caller: Caller
    ) -> web.StreamResponse:
        headers = {
            **API_VERSION_HEADER,
            "Docker-Content-Digest": str(digest),
            "Content-Type": OCTET_STREAM,
            "Accept-Ranges": "bytes",
            "ETag": f'"{digest}"',
        }
        blob = await self._store.open(digest)
        if blob is None:
            if caller is Caller.RUNTIME and self._peers is not None:
                return await self._blob_from_peers(request, digest, headers)
            raise BlobUnknown(f"blob {digest} is not held here")
        try:
            request[_SOURCE_KEY] = SOURCE_LOCAL
            byte_range = parse_range(request.headers.get("Range"), blob.size)
            if byte_range is None:
                return await send_blob(request, blob, 0, blob.size, status=200, headers=headers)
            headers["Content-Range"] = byte_range.content_range(blob.size)
            return await send_blob(
                request, blob, byte_range.offset, byte_range.length, status=206, headers=headers
            )
        finally:
            await blob.close()

    async def _blob_from_peers(
        self, request: web.Request, digest: Digest, headers: dict[str, str]
    ) -> web.StreamResponse:
        assert self._peers is not None
        client_range = request.headers.get("Range")
        if client_range is not None and parse_range(client_range, 1 << 62) is None:
            client_range = None  # a range we would ignore locally is not forwarded either
        found = await self._peers.blob(
            digest, _peer_path(request), client_range, head=request.method == "HEAD"
        )
        if found is None:
            raise BlobUnknown(f"blob {digest} is not held in the cluster")
        request[_SOURCE_KEY] = SOURCE_PEER
        status = 200
        if client_range is not None:
            status = 206
            headers["Content-Range"] = (
                f"bytes {found.offset}-{found.offset + found.length - 1}/{found.size}"
            )
        return await send_chunks(
            request, found.chunks, found.length, status=status, headers=headers
        )


def _peer_path(request: web.Request) -> str:
    """The same request as a peer should see it: path and query, nothing else."""
    return request.rel_url.path_qs
