"""`/mirror/v1/status`, `/mirror/v1/measure` and the status page.

On the registry port (`StatusApi(page=False)`, a `RegistryApi` extension):

- `GET /mirror/v1/status`: the report (collector.py), for the node's own clients (loopback,
  `--allow-client`) and signed peers, like `/mirror/v1/prefetch`;
- `POST /mirror/v1/measure` with `{"ref": IMAGE}`: pull the image through this node into
  nothing and answer each step's source and time (measure.py). The node's own clients only:
  it makes the node fetch.

On the metrics address (`StatusApi(page=True)`, added to the metrics app), where an operator's
browser goes:

- `GET /`: the page (page.py), which reads `mirror/v1/status` every 2 s;
- `GET /mirror/v1/status`: the same report, to whoever reaches the metrics address, as
  `/metrics` is (bind `--metrics-addr` accordingly);
- `POST /mirror/v1/measure`: as above, the node's own clients only.

A measure needs `Content-Type: application/json`: a form on another site cannot send that
without the browser asking first, so no page elsewhere can make the node fetch through an
operator's browser. One measure runs at a time; another meanwhile is answered 429.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from mirror.errors import (
    Denied,
    RegistryError,
    RequestInvalid,
    ServiceUnavailable,
    StoreUnavailable,
    TooManyRequests,
)
from mirror.registry.access import AccessPolicy
from mirror.registry.prefetch_api import read_refs_request
from mirror.registry.responses import error_response
from mirror.request import Caller
from mirror.status.collector import StatusCollector
from mirror.status.measure import MEASURE_PATH, Measurer
from mirror.status.page import PAGE

STATUS_PATH = "/mirror/v1/status"
_NO_STORE = {"Cache-Control": "no-store"}
# The page loads nothing from anywhere: inline style and script, requests to its own origin.
_PAGE_HEADERS = {
    **_NO_STORE,
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class StatusApi:
    def __init__(
        self,
        collector: StatusCollector,
        access: AccessPolicy,
        measurer: Measurer | None = None,
        *,
        page: bool = False,
    ) -> None:
        """`page`: routes of the metrics address (the page, and the report for anyone who
        reaches it); otherwise those of the registry port (the report for clients and peers)."""
        self._collector = collector
        self._access = access
        self._measurer = measurer
        self._page = page

    def add_routes(self, app: web.Application) -> None:
        if self._page:
            app.router.add_get("/", self._index)
            app.router.add_get(STATUS_PATH, _rendered(self._status))
            app.router.add_post(MEASURE_PATH, _rendered(self._measure))
        else:  # the registry front's middleware renders errors and counts refusals
            app.router.add_get(STATUS_PATH, self._status)
            app.router.add_post(MEASURE_PATH, self._measure)

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html", headers=_PAGE_HEADERS)

    async def _status(self, request: web.Request) -> web.Response:
        if not self._page and self._access.classify(request) not in (Caller.RUNTIME, Caller.PEER):
            raise Denied("only this node's clients and its peers may read its status")
        return web.json_response(await self._collector.report(), headers=_NO_STORE)

    async def _measure(self, request: web.Request) -> web.Response:
        if self._access.classify(request) is not Caller.RUNTIME:
            raise Denied("only this node's own clients may measure a pull")
        if request.content_type != "application/json":
            raise RequestInvalid("a measure is a JSON body: Content-Type: application/json")
        ref = (await read_refs_request(request))["ref"]
        if self._measurer is None:
            raise Denied("this node measures no pulls")
        measurement = await self._measurer.measure(ref)
        return web.json_response(measurement.as_json(), headers=_NO_STORE)


def _rendered(handler: Handler) -> Handler:
    """Errors as OCI error JSON here too, as the registry front's middleware renders them: the
    metrics app has no such middleware."""

    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except StoreUnavailable as error:
            return error_response(ServiceUnavailable(str(error)))
        except RegistryError as error:
            response = error_response(error)
            if isinstance(error, TooManyRequests):
                response.headers["Retry-After"] = str(error.retry_after)
            return response

    return answer
