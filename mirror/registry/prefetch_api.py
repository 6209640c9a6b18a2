"""`/mirror/v1/prefetch`: what this node keeps in its runtime, and "take this image now".

`GET` answers JSON: this node's runtime, labels and platform, each pin origin (file, watches,
API) with its problem if any, and per image its wanted digest, state (waiting, fetching, held,
failed with the error), progress, and the source used. `GET ?ref=IMAGE` answers one image.
`POST` with `{"ref": IMAGE, "source": IMAGE}` pins an image until the node restarts and tries
it at once: what `mirror prefetch` sends, then polls.

Only the node's own clients (loopback, `--allow-client`) and signed peers may ask: pinning is
a way to make the node fetch, which an outsider must not have.
"""

from __future__ import annotations

from aiohttp import web

from mirror.bodies import read_json_request
from mirror.errors import Denied, NameUnknown, RequestInvalid
from mirror.prefetch.model import ImageRef, parse_image_ref
from mirror.prefetch.prefetcher import Prefetcher
from mirror.prefetch.resolve import Platform
from mirror.registry.access import AccessPolicy
from mirror.registry.responses import API_VERSION_HEADER
from mirror.request import Caller

PREFETCH_PATH = "/mirror/v1/prefetch"
# A pin request is two image references: far below this.
_MAX_BODY = 16 * 1024


async def read_refs_request(
    request: web.Request, *, optional: tuple[str, ...] = ()
) -> dict[str, ImageRef]:
    """A JSON body `{"ref": IMAGE, ...}` of image references, parsed: `ref` always, the
    `optional` fields when given (absent, null or empty: left out). `RequestInvalid` for
    another shape, `NameInvalid` for a reference that is not one. The node's own API takes
    images this way: pins, distributions, measuring a pull."""
    document = await read_json_request(request, _MAX_BODY)
    allowed = ("ref", *optional)
    shape = "{" + ", ".join(f'"{name}": IMAGE' for name in allowed) + "}"
    if not isinstance(document, dict) or "ref" not in document:
        raise RequestInvalid(f"the body must be {shape}")
    unknown = sorted(set(document) - set(allowed))
    if unknown:
        raise RequestInvalid(f"unknown fields {', '.join(unknown)}: the body must be {shape}")
    refs = {}
    for name in allowed:
        text = document.get(name)
        if name != "ref" and not text:
            continue
        if not isinstance(text, str):
            raise RequestInvalid(f"{name} must be an image reference (a string)")
        refs[name] = parse_image_ref(text)
    return refs


class PrefetchApi:
    def __init__(self, prefetcher: Prefetcher, platform: Platform, access: AccessPolicy) -> None:
        self._prefetcher = prefetcher
        self._platform = platform
        self._access = access

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(PREFETCH_PATH, self._status)
        app.router.add_post(PREFETCH_PATH, self._request)

    def _check_caller(self, request: web.Request) -> None:
        if self._access.classify(request) not in (Caller.RUNTIME, Caller.PEER):
            raise Denied("only this node's clients and its peers may use the prefetch API")

    async def _status(self, request: web.Request) -> web.Response:
        self._check_caller(request)
        wanted = request.query.get("ref")
        if wanted is not None:
            status = self._prefetcher.status(parse_image_ref(wanted))
            if status is None:
                raise NameUnknown(f"{wanted} is not pinned on this node")
            return web.json_response(status.as_json(), headers=API_VERSION_HEADER)
        body = {
            "runtime": self._prefetcher.runtime_name,
            "platform": str(self._platform),
            "labels": dict(self._prefetcher.labels),
            "origins": self._prefetcher.origins(),
            "images": [status.as_json() for status in self._prefetcher.statuses()],
        }
        return web.json_response(body, headers=API_VERSION_HEADER)

    async def _request(self, request: web.Request) -> web.Response:
        self._check_caller(request)
        refs = await read_refs_request(request, optional=("source",))
        status = self._prefetcher.request(refs["ref"], refs.get("source"))
        return web.json_response(status.as_json(), status=202, headers=API_VERSION_HEADER)
