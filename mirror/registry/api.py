"""Handlers of the pull API: HTTP in, typed requests to the content service, HTTP out.

Every route that answers from content (manifests, blobs, tag lists, readiness) asks the
content service, the one place that decides where bytes come from and which registries are
served; this module only parses, checks who is calling, and renders answers and errors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.config import DEFAULT_BLOB_FANOUT, DEFAULT_MAX_UPLOADS
from mirror.content.scrub import CorruptionReports
from mirror.content.service import ContentService
from mirror.errors import (
    Denied,
    EndpointUnknown,
    PaginationInvalid,
    RegistryError,
    ServiceUnavailable,
    StoreUnavailable,
    TooManyRequests,
    Unauthorized,
    Unsupported,
)
from mirror.metrics import SOURCE_LOCAL, SOURCE_NONE, Metrics
from mirror.oci.mediatypes import OCTET_STREAM
from mirror.oci.reference import parse_digest
from mirror.peers.auth import PEER_HEADER
from mirror.peers.fetcher import LAST_RESORT_PARAM, REPORT_PATH_PREFIX, UPLOADS_HEADER
from mirror.peers.referrals import (
    HOPS_HEADER,
    SHARER_PARAM,
    TRY_HEADER,
    parse_sharer,
    referral,
    well_formed_sharer,
)
from mirror.ranges import parse_range_header
from mirror.registry.access import AccessPolicy
from mirror.registry.paths import parse_target
from mirror.registry.responses import (
    API_VERSION_HEADER,
    error_response,
    send_blob,
    send_chunks,
    send_growing,
)
from mirror.request import Caller, Kind, TagPage, Target

log = logging.getLogger(__name__)

_READ_METHODS = frozenset({"GET", "HEAD"})
_KIND_KEY = web.RequestKey("kind", str)
_SOURCE_KEY = web.RequestKey("source", str)
_CALLER_KEY = web.RequestKey("caller", Caller)
_TARGET_KEY = web.RequestKey("target", Target)
# Requests told to a `PullObserver`: what a pull is made of.
_PULL_KINDS = frozenset({Kind.MANIFEST.value, Kind.BLOB.value})
# Callers another node sent here: served from this node only, counted as uploads.
_FROM_OTHER_NODES = frozenset({Caller.PEER, Caller.REDIRECTED})
# A refused peer prefers other holders this long (Retry-After): about the time a blob upload
# takes to end and free a slot.
_RETRY_AFTER_SECONDS = 1
# Sharers a referral names besides the ones this node sends the blob to: the latest it sent
# elsewhere, newest first (see `Uploads`).
_REFERRED_KEPT = 2
# An upload slot a holder keeps for a runtime it agreed to serve on a signed URL (its node's
# probe was answered 200) until the runtime's GET comes: it follows the redirect at once.
_RESERVED_SECONDS = 5.0
# A page size past this many digits is not a number any client means.
_MAX_PAGE_DIGITS = 9


class RouteProvider(Protocol):
    """The node's own API beside the pull API (`/mirror/v1/...`: pins, distributions,
    webhooks), each in a module of its own that adds its routes to the app."""

    def add_routes(self, app: web.Application) -> None: ...


@dataclass(frozen=True, slots=True)
class ObservedPull:
    """One manifest or blob request as the front answered it (the status page's recent pulls)."""

    at: float  # wall-clock time it was answered
    method: str
    kind: str  # manifest or blob
    ref: str | None  # registry/repository:tag or registry/repository@digest; None: unparsable
    digest: str | None  # Docker-Content-Digest of the answer
    source: str  # local, peer, upstream, or none (not answered with content)
    status: int
    body_bytes: int
    seconds: float
    caller: str | None  # runtime, peer, redirected; None: refused before it was known
    client: str | None  # the caller's address


class PullObserver(Protocol):
    """Told of every manifest and blob request once it is answered (`RegistryApi(pulls=)`)."""

    def observe(self, pull: ObservedPull) -> None: ...


class UploadSlots:
    """The blob bodies this node is sending to peers, bounded by `--max-uploads`.

    Uploads share the node's one uplink: past a few, another only makes every one slower,
    while in a rollout other nodes holding the blob (those that fetched it, or are fetching it,
    as the swarm serves while it downloads) have idle links. Refusing at once with a 429 costs
    the fetcher one round trip and sends it there (peers/fetcher.py).

    Counted: a peer's blob GET, from when it is accepted until its last byte is written.
    Manifests (KiBs, read whole) and HEADs (no body) cost too little to bound, and the node's
    own runtime is neither counted nor ever refused: serving it is what the node is for.
    Counted but never refused: a last-resort request (every holder its fetcher found was busy;
    refusing would send the cluster upstream for bytes it holds), and a runtime following a
    signed URL (it would take a 429 for a failure, not for "ask another holder"). So the
    bound holds for those too, the node that redirects its runtime first probes with a signed
    HEAD: that one can be refused, and an accepted probe keeps a slot (`reserve`) until the
    runtime's GET takes it over (`claim`) or `_RESERVED_SECONDS` pass.

    A request from a sharer (a node that serves the blob to peers while it arrives, named in the
    request: peers/referrals.py) is remembered with its blob while it is sent. Past `fanout`
    other sharers of the same blob, a refusable request is refused with a referral to them.
    Past the bound a request is referred the same way to the blob's sharers here, when there
    are any, and the first sharer of a blob that no other node is known to provide is taken
    anyway: the root of the blob's tree. Refused with nobody to name, a rollout's first
    fetchers of a blob all ended at a last resort here (which is never refused) instead of in
    its tree: at 16 nodes one 30 MiB layer went from the holder to 14 of them at once, and its
    link set the rollout's pace (docs/benchmarks.md). So past the bound a holder sends at most
    one body more for each blob only it provides.

    With a fan-out above 1 the sharers form a tree, and the referral names first the sharers
    this node sends the blob to, a different one first each time: a late node takes the free
    place nearest the holder, so the tree fills level by level and stays about log(N) deep
    (depth is what a rollout waits on: peers/referrals.py). With a fan-out of 1 the sharers
    form a chain, and the referral names first
    the sharers this node last referred elsewhere, newest first: the chain's far end as far as
    this node knows, where the fan-out is free; naming the sharer it sends to would make every
    late node walk the chain from its start (494 refusals for 16 nodes and 5 blobs). The other
    names follow, as fallbacks. A node named may not be receiving yet: the fetcher waits for
    it (up to `REFERRED_PATIENCE`) rather than hedging to the next name (peers/fetcher.py), and
    it answers busy if it has not started within `PEER_START_WAIT` (content/service.py), which
    also ends any wait of two nodes on each other.
    """

    def __init__(
        self,
        limit: int,
        fanout: int,
        metrics: Metrics,
        providers: Callable[[str], list[str]] = lambda digest: [],
    ) -> None:
        self.limit = limit  # 0: no bound
        self.fanout = fanout  # 0: no bound per blob
        # The ids (hex) of other nodes known here to provide a digest, asked only at the bound
        # (`_seeds`).
        self._providers = providers
        self.active = 0
        # digest -> sharers it is being sent to (in a tree, the one to name first at the front).
        self._sharers: dict[str, list[str]] = {}
        # digest -> sharers lately referred elsewhere, newest first; kept while it is sent.
        self._referred: dict[str, deque[str]] = {}
        # (digest, sharer) -> the expiries of the slots kept for runtimes on their way.
        self._reserved: dict[tuple[str, str | None], list[asyncio.TimerHandle]] = {}
        self._metrics = metrics

    def take(self, digest: str, sharer: str | None, *, refusable: bool) -> None:
        """Count one more upload of `digest` to `sharer` (None: not a sharer).

        Raises `TooManyRequests` (nothing counted) when it is `refusable` and this node is at
        its bound or `digest` at its fan-out, with a referral (`X-Mirror-Try`) to the sharers
        fetching `digest` from here when there are any (and a fan-out); the root of a blob's
        tree is taken past the bound (`_seeds`).
        """
        if refusable:
            others = [s for s in self._sharers.get(digest, ()) if s != sharer]
            if self.fanout and len(others) >= self.fanout:
                raise self._refer(
                    digest,
                    sharer,
                    others,
                    f"{len(others)} nodes fetch this blob from this node; ask them",
                )
            if self.limit and self.active >= self.limit and not self._seeds(digest, sharer, others):
                if self.fanout and others:
                    raise self._refer(
                        digest,
                        sharer,
                        others,
                        f"this node sends {self.active} blobs to peers; ask the nodes fetching "
                        "this one from it",
                    )
                self._metrics.peer_uploads_refused.inc()
                raise TooManyRequests(
                    f"this node sends {self.active} blobs to peers; ask another holder",
                    retry_after=_RETRY_AFTER_SECONDS,
                )
        self.active += 1
        self._metrics.peer_uploads.set(self.active)
        if sharer is not None:
            self._sharers.setdefault(digest, []).append(sharer)

    def _refer(
        self, digest: str, sharer: str | None, others: list[str], message: str
    ) -> TooManyRequests:
        """The 429 that sends `sharer` (or a peer that is none) to `digest`'s `others`."""
        self._metrics.peer_uploads_referred.inc()
        return TooManyRequests(
            message,
            retry_after=_RETRY_AFTER_SECONDS,
            headers={TRY_HEADER: self._referral(digest, sharer, others)},
        )

    def _seeds(self, digest: str, sharer: str | None, others: list[str]) -> bool:
        """Whether a request past the bound is the root of `digest`'s tree, taken anyway: the
        first sharer of the blob here, when no other node is known to provide it (this node's
        own provider records: all of them in a cluster smaller than the DHT's k). Refused, it
        and every fetcher after it would have nobody to go to but a last resort here, which is
        never refused: the holder would send the blob to all of them at once."""
        asking = parse_sharer(sharer)
        if not (self.fanout and asking is not None and not others):
            return False
        return all(node == asking.node_id.hex() for node in self._providers(digest))

    def reserve(
        self, digest: str, sharer: str | None, *, refusable: bool = True
    ) -> Callable[[], None]:
        """Keep a slot for a runtime a node will redirect here (its probe): `take` (refusable
        unless a last resort), given back unless `claim`ed within `_RESERVED_SECONDS`.
        Returns what gives it back now (the probe failed), if it is still kept."""
        self.take(digest, sharer, refusable=refusable)
        key = (digest, sharer)
        handles = self._reserved.setdefault(key, [])

        def lapse() -> None:
            if handle in handles:
                handle.cancel()
                handles.remove(handle)
                if not handles:
                    del self._reserved[key]
                self.give_back(digest, sharer)

        handle = asyncio.get_running_loop().call_later(_RESERVED_SECONDS, lapse)
        handles.append(handle)
        return lapse

    def claim(self, digest: str, sharer: str | None) -> bool:
        """Take over a slot `reserve` kept for this GET; False when none is kept (not counted)."""
        handles = self._reserved.get((digest, sharer))
        if not handles:
            return False
        handles.pop(0).cancel()
        if not handles:
            del self._reserved[(digest, sharer)]
        return True

    def _referral(self, digest: str, sharer: str | None, others: list[str]) -> str:
        """The referral for `sharer`, who is then remembered as the newest referred."""
        referred = self._referred.setdefault(digest, deque(maxlen=_REFERRED_KEPT))
        far_end = [s for s in referred if s != sharer]
        if self.fanout == 1:  # a chain: where its far end is, the fan-out is free
            named = far_end + [s for s in reversed(others) if s not in far_end]
        else:  # a tree, filled level by level: this node's own sharers, each first in turn
            named = others + [s for s in far_end if s not in others]
            sharers = self._sharers[digest]
            sharers.append(sharers.pop(0))  # the next referral names another one first
        if sharer is not None:
            if sharer in referred:
                referred.remove(sharer)
            referred.appendleft(sharer)
        return referral(named)

    def give_back(self, digest: str, sharer: str | None) -> None:
        self.active -= 1
        self._metrics.peer_uploads.set(self.active)
        if sharer is not None:
            sharers = self._sharers[digest]
            sharers.remove(sharer)
            if not sharers:
                del self._sharers[digest]
                self._referred.pop(digest, None)


class RegistryApi:
    def __init__(
        self,
        metrics: Metrics,
        content: ContentService,
        *,
        access: AccessPolicy | None = None,
        reports: CorruptionReports | None = None,
        max_uploads: int = DEFAULT_MAX_UPLOADS,
        blob_fanout: int = DEFAULT_BLOB_FANOUT,
        extensions: Sequence[RouteProvider] = (),
        pulls: PullObserver | None = None,
        known_providers: Callable[[str], list[str]] = lambda digest: [],
    ) -> None:
        """`known_providers`: the ids (hex) of the other nodes this one knows to provide a
        digest, from its own records without asking the cluster (`DhtNode.local_providers`),
        for the upload bound (`UploadSlots`)."""
        self._metrics = metrics
        self._pulls = pulls
        self._extensions = tuple(extensions)
        self._content = content
        self._access = access or AccessPolicy(allowed_clients=(), verifier=None)
        self._reports = reports
        self._uploads = UploadSlots(max_uploads, blob_fanout, metrics, known_providers)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._observe])
        app.on_response_prepare.append(self._tell_uploads)
        app.router.add_route("*", "/v2", self._base)
        app.router.add_route("*", "/v2/", self._base)
        app.router.add_route("*", "/v2/{path:.*}", self._pull)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_route("*", REPORT_PATH_PREFIX + "{digest}", self._report)
        for extension in self._extensions:
            extension.add_routes(app)
        return app

    @web.middleware
    async def _observe(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Render errors as OCI JSON (never a traceback) and record every API request."""
        started = time.perf_counter()
        try:
            response = await handler(request)
        except RegistryError as error:
            if isinstance(error, Denied | Unauthorized):
                self._metrics.refused_requests.labels(error.code.lower()).inc()
            response = error_response(error)
            if isinstance(error, TooManyRequests):
                response.headers["Retry-After"] = str(error.retry_after)
                response.headers.update(error.headers)
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
            seconds = time.perf_counter() - started
            self._metrics.observe(
                method=request.method,
                kind=kind,
                status=response.status,
                source=request.get(_SOURCE_KEY, SOURCE_NONE),
                seconds=seconds,
                body_bytes=sent if response.status < 300 else 0,
            )
            if self._pulls is not None and kind in _PULL_KINDS:
                self._pulls.observe(_pull(request, response, kind, sent, seconds))
        return response

    async def _base(self, request: web.Request) -> web.Response:
        request[_KIND_KEY] = "base"
        if request.method not in _READ_METHODS:
            raise Unsupported(f"{request.method} is not supported by this mirror")
        return web.json_response({}, headers=API_VERSION_HEADER)

    async def _tell_uploads(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every answer to a peer carries this node's uploads (`X-Mirror-Uploads`), so
        fetchers learn each holder's load without asking (peers/fetcher.py)."""
        if request.get(_CALLER_KEY) in _FROM_OTHER_NODES:
            response.headers[UPLOADS_HEADER] = str(self._uploads.active)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _report(self, request: web.Request) -> web.Response:
        """A peer's signed report that a blob it streamed from here did not match its digest.

        Only a signed peer may report: the node's own runtime (unsigned, even from loopback) is
        refused like an outsider, so nothing but a cluster member can make the node re-hash.
        The answer comes at once; the re-hash, and an eviction if the copy really is wrong,
        follow in the background (content/scrub.py).
        """
        request[_KIND_KEY] = "report"
        if self._access.classify(request) is not Caller.PEER:
            raise Denied("only peers of the cluster may report a corrupt blob")
        if request.method != "POST":
            raise Unsupported(f"{request.method} is not supported: a report is a POST")
        digest = parse_digest(request.match_info["digest"])
        if self._reports is None:
            raise EndpointUnknown("this node takes no reports")
        outcome = self._reports.report(digest)
        body = {"digest": str(digest), "outcome": outcome}
        return web.json_response(body, status=202, headers=API_VERSION_HEADER)

    async def _readyz(self, request: web.Request) -> web.Response:
        if await self._content.ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready: the store or the router does not answer\n")

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        request[_KIND_KEY] = "other"
        caller = self._access.classify(request)
        request[_CALLER_KEY] = caller
        target = parse_target(request.match_info["path"], request.query.get("ns"))
        request[_KIND_KEY] = target.kind.value
        request[_TARGET_KEY] = target
        if request.method not in _READ_METHODS:
            raise Unsupported(f"{request.method} is not supported: this mirror only serves pulls")
        if target.kind is not Kind.BLOB and caller is Caller.REDIRECTED:
            raise Denied("a signed URL reaches a blob only")
        if target.kind is Kind.MANIFEST:
            return await self._manifest(request, target, caller)
        if target.kind is Kind.TAGS:
            return await self._tags(request, target, _tag_page(request))
        if caller in _FROM_OTHER_NODES and request.method == "GET":
            return await self._upload(request, target, caller)
        if caller is Caller.REDIRECTED:
            return await self._probe(request, target)
        return await self._blob(request, target, caller)

    async def _probe(self, request: web.Request, target: Target) -> web.StreamResponse:
        """A node's signed HEAD before it redirects its runtime here: answered 200 only when
        this node serves the blob and keeps an upload slot for the runtime (`UploadSlots`)."""
        digest = str(target.digest)
        sharer = well_formed_sharer(request.query.get(SHARER_PARAM))
        last_resort = request.query.get(LAST_RESORT_PARAM) == "1"
        let_go = self._uploads.reserve(digest, sharer, refusable=not last_resort)
        try:
            return await self._blob(request, target, Caller.REDIRECTED)
        except BaseException:
            let_go()
            raise

    async def _upload(
        self, request: web.Request, target: Target, caller: Caller
    ) -> web.StreamResponse:
        """A blob body for a peer, counted in `UploadSlots` while it is sent.

        Refused before any store is asked, so a busy node answers in microseconds; only a
        fetcher's request (signed in a header: it knows a 429 means "ask another holder")
        that is not a last resort can be refused.
        """
        refusable = PEER_HEADER in request.headers and request.query.get(LAST_RESORT_PARAM) != "1"
        digest = str(target.digest)
        sharer = well_formed_sharer(request.query.get(SHARER_PARAM))
        if caller is not Caller.REDIRECTED or not self._uploads.claim(digest, sharer):
            self._uploads.take(digest, sharer, refusable=refusable)
        try:
            return await self._blob(request, target, caller)
        finally:
            self._uploads.give_back(digest, sharer)

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

    async def _tags(self, request: web.Request, target: Target, page: TagPage) -> web.Response:
        """Tags held for one repository, paginated with `n` and `last` as the spec describes."""
        tags = await self._content.tags(target, page)
        request[_SOURCE_KEY] = SOURCE_LOCAL
        body = {"name": target.repository, "tags": tags}
        return web.json_response(body, headers=API_VERSION_HEADER)

    async def _blob(
        self, request: web.Request, target: Target, caller: Caller
    ) -> web.StreamResponse:
        assert target.digest is not None
        answer = await self._content.blob(
            target,
            caller,
            parse_range_header(request.headers.get("Range")),
            head=request.method == "HEAD",
        )
        try:
            request[_SOURCE_KEY] = answer.source
            if answer.redirect is not None:
                return self._redirect(answer.redirect, str(target.digest))
            headers = {
                **API_VERSION_HEADER,
                "Docker-Content-Digest": str(target.digest),
                "Content-Type": OCTET_STREAM,
                "Accept-Ranges": "bytes",
                "ETag": f'"{target.digest}"',
            }
            if caller is not Caller.RUNTIME:
                headers[HOPS_HEADER] = str(answer.hops)
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
            if answer.growing is not None:
                return await send_growing(
                    request, answer.growing, length, status=status, headers=headers
                )
            return await send_chunks(request, answer.chunks, length, status=status, headers=headers)
        finally:
            await answer.close()

    def _redirect(self, url: str, digest: str) -> web.Response:
        """A 307 sending the runtime to a peer holding the blob, at a signed single-use URL."""
        self._metrics.peer_redirects.labels("sent").inc()
        headers = {**API_VERSION_HEADER, "Location": url, "Docker-Content-Digest": digest}
        return web.Response(status=307, headers=headers)


def _pull(
    request: web.Request, response: web.StreamResponse, kind: str, sent: int, seconds: float
) -> ObservedPull:
    target = request.get(_TARGET_KEY)
    ref = None
    if target is not None:
        reference = f":{target.tag.tag}" if target.tag else f"@{target.digest}"
        ref = f"{target.registry}/{target.repository}{reference}"
    caller = request.get(_CALLER_KEY)
    return ObservedPull(
        at=time.time(),
        method=request.method,
        kind=kind,
        ref=ref,
        digest=response.headers.get("Docker-Content-Digest"),
        source=request.get(_SOURCE_KEY, SOURCE_NONE),
        status=response.status,
        body_bytes=sent if response.status < 300 else 0,
        seconds=seconds,
        caller=caller.value if caller is not None else None,
        client=request.remote,
    )


def _tag_page(request: web.Request) -> TagPage:
    """`n` and `last` of a tags/list request; `n` must be a plain non-negative number."""
    limit = request.query.get("n")
    if limit is not None and not (
        limit.isascii() and limit.isdigit() and len(limit) <= _MAX_PAGE_DIGITS
    ):
        raise PaginationInvalid(f"n must be a non-negative integer, not {limit[:40]!r}")
    return TagPage(limit=None if limit is None else int(limit), last=request.query.get("last"))
