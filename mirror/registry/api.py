"""Handlers of the pull API: manifests and blobs from the node's store, else from its peers."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from mirror.content.service import ContentService
from mirror.errors import (
    Denied,
    NameUnknown,
    PaginationInvalid,
    RegistryError,
    ServiceUnavailable,
    StoreUnavailable,
    Unauthorized,
    Unsupported,
)
from mirror.metrics import SOURCE_LOCAL, SOURCE_NONE, Metrics
from mirror.oci.mediatypes import OCTET_STREAM
from mirror.registry.access import AccessPolicy, Caller
from mirror.registry.paths import Kind, Target, parse_target
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
        content: ContentService,
        *,
        access: AccessPolicy | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._content = content
        self._access = access or AccessPolicy(allowed_clients=(), verifier=None)

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
        return await self._blob(request, target, caller)

    async def _manifest(
        self, request: web.Request, target: Target, caller: Caller
    ) -> web.StreamResponse:
        answer = await self._content.manifest(target, caller)
        request[_SOURCE_KEY] = answer.source
        headers = {
            **API_VERSION_HEADER,
            "Docker-Content-Digest": answer.digest,
            "Content-Type": answer.media_type,
        }
        return web.Response(body=answer.body, headers=headers)

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
        self, request: web.Request, target: Target, caller: Caller
    ) -> web.StreamResponse:
        assert target.digest is not None
        answer = await self._content.blob(
            target,
            target.digest,
            caller,
            request.headers.get("Range"),
            head=request.method == "HEAD",
        )
        try:
            request[_SOURCE_KEY] = answer.source
            headers = {
                **API_VERSION_HEADER,
                "Docker-Content-Digest": str(target.digest),
                "Content-Type": OCTET_STREAM,
                "Accept-Ranges": "bytes",
                "ETag": f'"{target.digest}"',
            }
            status = 200
            offset, length = 0, answer.size
            if answer.byte_range is not None:
                status = 206
                offset, length = answer.byte_range.offset, answer.byte_range.length
                headers["Content-Range"] = answer.byte_range.content_range(answer.size)
            if answer.local is not None:
                return await send_blob(
                    request, answer.local, offset, length, status=status, headers=headers
                )
            return await send_chunks(request, answer.chunks, length, status=status, headers=headers)
        finally:
            await answer.close()
