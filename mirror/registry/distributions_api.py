"""`/mirror/v1/distributions`: pushed images spreading over the cluster, and their progress.

- `GET /mirror/v1/distributions`: the distributions this node knows, newest first: those it
  started (it saw the push; it has every node's reports) and those it takes part in.
- `GET /mirror/v1/distributions/{id}`: one of them.
- `POST /mirror/v1/distributions` with `{"ref": IMAGE}`: start one by hand (`mirror
  distribute`), as if the tag had just been pushed.
- `POST /mirror/v1/distributions/{id}/report?node=ADDRESS`: a node's progress, sent to the
  distribution's origin. Peers only: the request is signed with the cluster key.

Reading and starting are for the node's own clients (loopback, `--allow-client`) and peers.
"""

from __future__ import annotations

from aiohttp import web

from mirror.bodies import read_json_request
from mirror.errors import Denied, NameInvalid, NameUnknown, RequestInvalid, Unsupported
from mirror.oci.reference import is_registry
from mirror.prefetch.distributor import Distributor, parse_report
from mirror.prefetch.model import PushEvent
from mirror.registry.access import AccessPolicy
from mirror.registry.prefetch_api import read_refs_request
from mirror.registry.responses import API_VERSION_HEADER
from mirror.request import Caller

DISTRIBUTIONS_PATH = "/mirror/v1/distributions"
_MAX_BODY = 16 * 1024


class DistributionsApi:
    def __init__(self, distributor: Distributor, access: AccessPolicy) -> None:
        self._distributor = distributor
        self._access = access

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(DISTRIBUTIONS_PATH, self._list)
        app.router.add_post(DISTRIBUTIONS_PATH, self._start)
        app.router.add_get(DISTRIBUTIONS_PATH + "/{id}", self._one)
        app.router.add_route("*", DISTRIBUTIONS_PATH + "/{id}/report", self._report)

    def _caller(self, request: web.Request) -> Caller:
        caller = self._access.classify(request)
        if caller not in (Caller.RUNTIME, Caller.PEER):
            raise Denied("only this node's clients and its peers may use the distributions API")
        return caller

    async def _list(self, request: web.Request) -> web.Response:
        self._caller(request)
        body = {"distributions": [d.as_json() for d in self._distributor.distributions()]}
        return web.json_response(body, headers=API_VERSION_HEADER)

    async def _one(self, request: web.Request) -> web.Response:
        self._caller(request)
        distribution = self._distributor.get(request.match_info["id"])
        if distribution is None:
            raise NameUnknown(f"no distribution {request.match_info['id']!r} is known here")
        return web.json_response(distribution.as_json(), headers=API_VERSION_HEADER)

    async def _start(self, request: web.Request) -> web.Response:
        if self._caller(request) is not Caller.RUNTIME:
            raise Denied("a distribution is started by a node's own clients")
        ref = (await read_refs_request(request))["ref"]
        if ref.tag is None:
            raise NameInvalid(f"{ref} names no tag: a distribution follows a pushed tag")
        distribution = self._distributor.start(PushEvent(ref, "cli"))
        return web.json_response(distribution.as_json(), status=202, headers=API_VERSION_HEADER)

    async def _report(self, request: web.Request) -> web.Response:
        if self._access.classify(request) is not Caller.PEER:
            raise Denied("only peers of the cluster report on a distribution")
        if request.method != "POST":
            raise Unsupported(f"{request.method} is not supported: a report is a POST")
        node = request.query.get("node", "")
        if not is_registry(node):
            raise RequestInvalid("node must be the reporting node's HOST:PORT")
        progress = parse_report(await read_json_request(request, _MAX_BODY))
        if progress is None:
            raise RequestInvalid("the body is not a distribution report")
        if not self._distributor.record(request.match_info["id"], node, progress):
            raise NameUnknown(f"no distribution {request.match_info['id']!r} is known here")
        return web.json_response({"recorded": True}, status=202, headers=API_VERSION_HEADER)
