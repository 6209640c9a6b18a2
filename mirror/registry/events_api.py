"""`/mirror/v1/events/`: registries tell the cluster a tag was pushed, so it can pull it early.

Two senders, one route each, both `POST` only:

- `/mirror/v1/events/distribution`: the CNCF distribution registry's notifications (its
  `notifications.endpoints` config), an envelope `{"events": [...]}` with the token in
  `Authorization: Bearer TOKEN` (a header the endpoint's config sets). The registry sends an
  event per blob and per manifest, pushes and pulls alike; only a manifest pushed under a tag
  is a push event here. The registry is `request.host` of the event, the name the pusher used,
  which is what runtimes will pull by.
- `/mirror/v1/events/harbor`: Harbor's project webhook (an HTTP policy, "Default" payload
  format), `{"type": "PUSH_ARTIFACT", "event_data": {"resources": [{"digest", "tag",
  "resource_url"}], "repository": {"repo_full_name"}}}`, with the token in the policy's auth
  header (`Bearer TOKEN`). The registry is the host of `resource_url`, Harbor's external name.
- `/mirror/v1/events/dockerhub?token=TOKEN`: Docker Hub's repository webhook, one push per
  request. Docker Hub sends no custom headers, hence the token in the query. Its
  `callback_url` is not called: the callback only marks the delivery in Docker Hub's UI, and a
  URL taken from a request body is not one the node should fetch.

The token (`--webhook-token-file`) is compared in constant time; without one the routes answer
404, as if they did not exist. Every event is checked against the reference grammar; one that
does not pass is counted and skipped, so one odd event never makes the registry re-send (and us
re-take) the whole envelope. Only a body that is not an envelope at all is a 400. The answer is
a 202 with the counts at once: `PushSink.pushed` returns at once and the work (resolving,
pulling onto nodes) happens later, as a registry waits for the answer before sending the next
notification.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections import Counter
from typing import Literal

from aiohttp import web

from mirror.errors import (
    DigestInvalid,
    EndpointUnknown,
    NameInvalid,
    RequestInvalid,
    Unauthorized,
    Unsupported,
)
from mirror.metrics import Metrics
from mirror.oci.mediatypes import MANIFEST_TYPES
from mirror.oci.reference import parse_digest, validate_registry, validate_repository, validate_tag
from mirror.prefetch.model import ImageRef, PushEvent, PushSink, parse_image_ref
from mirror.registry.responses import API_VERSION_HEADER

log = logging.getLogger(__name__)

EVENTS_PATH = "/mirror/v1/events"
DISTRIBUTION_PATH = f"{EVENTS_PATH}/distribution"
DOCKERHUB_PATH = f"{EVENTS_PATH}/dockerhub"
HARBOR_PATH = f"{EVENTS_PATH}/harbor"
# distribution batches at most a few events per envelope and Docker Hub sends one push: a
# body past this is not a notification, and must not cost the node more memory than this.
MAX_BODY = 1 << 20
_CHUNK = 64 * 1024

Source = Literal["distribution", "dockerhub", "harbor"]
Outcome = Literal["accepted", "ignored", "invalid", "unauthorized"]
SOURCES: tuple[Source, ...] = ("distribution", "dockerhub", "harbor")
OUTCOMES: tuple[Outcome, ...] = ("accepted", "ignored", "invalid", "unauthorized")


class EventsApi:
    """The webhook receivers; `token` None turns them off (404)."""

    def __init__(self, sink: PushSink, token: bytes | None, metrics: Metrics) -> None:
        self._sink = sink
        self._token = token
        self._counter = metrics.webhook_events
        # Every series exists from the start, at 0: an alert on "unauthorized" needs no first.
        for source in SOURCES:
            for outcome in OUTCOMES:
                self._counter.labels(source, outcome)

    def add_routes(self, app: web.Application) -> None:
        # Any method: a GET is answered with OCI error JSON (405) rather than aiohttp's page.
        app.router.add_route("*", DISTRIBUTION_PATH, self._distribution)
        app.router.add_route("*", DOCKERHUB_PATH, self._dockerhub)
        app.router.add_route("*", HARBOR_PATH, self._harbor)

    async def _distribution(self, request: web.Request) -> web.Response:
        self._admit(request, "distribution", _bearer(request.headers.get("Authorization")))
        document = await self._document(request, "distribution")
        events = document.get("events")
        if not isinstance(events, list):
            self._count("distribution", "invalid")
            raise RequestInvalid('the body must be a notification envelope {"events": [...]}')
        tally: Counter[Outcome] = Counter()
        self._take("distribution", [_distribution_push(event) for event in events], tally)
        return self._answer("distribution", tally)

    async def _dockerhub(self, request: web.Request) -> web.Response:
        self._admit(request, "dockerhub", request.query.get("token"))
        document = await self._document(request, "dockerhub")
        push_data, repository = document.get("push_data"), document.get("repository")
        if not (
            isinstance(push_data, dict)
            and isinstance(push_data.get("tag"), str)
            and isinstance(repository, dict)
            and isinstance(repository.get("repo_name"), str)
        ):
            self._count("dockerhub", "invalid")
            raise RequestInvalid(
                "the body must be a Docker Hub webhook with push_data.tag and repository.repo_name"
            )
        tally: Counter[Outcome] = Counter()
        try:
            # Each part checked alone first: a `:` or `@` in one must not make another reference.
            tag = validate_tag(push_data["tag"])
            name = validate_repository(repository["repo_name"])
            ref = parse_image_ref(f"docker.io/{name}:{tag}")
        except NameInvalid as exc:
            log.warning("Docker Hub event skipped: %s", exc)
            tally["invalid"] += 1
        else:
            self._hand_on(ref, "dockerhub")
            tally["accepted"] += 1
        return self._answer("dockerhub", tally)

    async def _harbor(self, request: web.Request) -> web.Response:
        self._admit(request, "harbor", _bearer(request.headers.get("Authorization")))
        document = await self._document(request, "harbor")
        data = document.get("event_data")
        resources = data.get("resources") if isinstance(data, dict) else None
        if not isinstance(document.get("type"), str) or not isinstance(resources, list):
            self._count("harbor", "invalid")
            raise RequestInvalid(
                "the body must be a Harbor webhook with type and event_data.resources"
            )
        tally: Counter[Outcome] = Counter()
        if document["type"] != "PUSH_ARTIFACT":
            tally["ignored"] += 1
            return self._answer("harbor", tally)
        assert isinstance(data, dict)
        repository = data.get("repository")
        name = repository.get("repo_full_name") if isinstance(repository, dict) else None
        self._take("harbor", [_harbor_push(resource, name) for resource in resources], tally)
        return self._answer("harbor", tally)

    def _take(
        self, source: Source, found: list[ImageRef | str | None], tally: Counter[Outcome]
    ) -> None:
        """Hand on each push a body's entries name (an entry is a push, not one: None, or why
        it cannot be used), counting each."""
        for index, entry in enumerate(found):
            if isinstance(entry, ImageRef):
                self._hand_on(entry, source)
                tally["accepted"] += 1
            elif entry is None:
                tally["ignored"] += 1
            else:
                log.warning("%s entry %d skipped: %s", source, index, entry)
                tally["invalid"] += 1

    def _admit(self, request: web.Request, source: Source, presented: str | None) -> None:
        """Off (404), not a POST (405), or without the token (401): nothing more is read."""
        if self._token is None:
            raise EndpointUnknown("this node takes no webhooks (no --webhook-token-file)")
        if request.method != "POST":
            raise Unsupported(f"{request.method} is not supported: webhooks are POSTs")
        if presented is None or not _same(presented, self._token):
            self._count(source, "unauthorized")
            raise Unauthorized("the webhook token is missing or wrong")

    async def _document(self, request: web.Request, source: Source) -> dict[str, object]:
        """The body as a JSON object, read up to `MAX_BODY`; `RequestInvalid` otherwise."""
        try:
            raw = await _read_body(request)
            document = json.loads(raw)
        except RequestInvalid:
            self._count(source, "invalid")
            raise
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            self._count(source, "invalid")
            raise RequestInvalid(f"the body is not JSON: {exc}") from None
        if not isinstance(document, dict):
            self._count(source, "invalid")
            raise RequestInvalid("the body must be a JSON object")
        return document

    def _hand_on(self, ref: ImageRef, source: Source) -> None:
        log.info("%s: %s was pushed", source, ref)
        try:
            self._sink.pushed(PushEvent(ref, source))
        except Exception:
            # The sender did its part; failing the request would only make it send again.
            log.exception("the push sink failed to take %s from %s", ref, source)

    def _answer(self, source: Source, tally: Counter[Outcome]) -> web.Response:
        for outcome, count in tally.items():
            self._count(source, outcome, count)
        body = {outcome: tally[outcome] for outcome in ("accepted", "ignored", "invalid")}
        return web.json_response(body, status=202, headers=API_VERSION_HEADER)

    def _count(self, source: Source, outcome: Outcome, count: int = 1) -> None:
        self._counter.labels(source, outcome).inc(count)


def _distribution_push(event: object) -> ImageRef | str | None:
    """A tag push's reference, None for an event that is not one, or why it cannot be used."""
    if not isinstance(event, dict):
        return "not a JSON object"
    if event.get("action") != "push":
        return None
    target = event.get("target")
    if not isinstance(target, dict):
        return "no target"
    media_type = target.get("mediaType")
    if not isinstance(media_type, str):
        return "target.mediaType is not a string"
    if media_type.partition(";")[0].strip().lower() not in MANIFEST_TYPES:
        return None  # a blob (application/octet-stream, a layer type) or a kind we do not serve
    tag = target.get("tag")
    if tag is None or tag == "":
        return None  # pushed by digest: a child of an index, or an untagged push
    request = event.get("request")
    host = request.get("host") if isinstance(request, dict) else None
    repository, digest = target.get("repository"), target.get("digest")
    if not isinstance(host, str):
        return "request.host is not a string"
    if not isinstance(repository, str):
        return "target.repository is not a string"
    if not isinstance(tag, str):
        return "target.tag is not a string"
    if digest is not None and not isinstance(digest, str):
        return "target.digest is not a string"
    try:
        return ImageRef(
            validate_registry(host),
            validate_repository(repository),
            validate_tag(tag),
            parse_digest(digest) if digest is not None else None,
        )
    except (NameInvalid, DigestInvalid) as exc:
        return str(exc)


def _harbor_push(resource: object, repository: object) -> ImageRef | str | None:
    """A pushed tag of a Harbor `PUSH_ARTIFACT` resource; None for an untagged push, or why
    it cannot be used."""
    if not isinstance(resource, dict):
        return "not an object"
    tag, digest, url = resource.get("tag"), resource.get("digest"), resource.get("resource_url")
    if not tag:
        return None
    if not (isinstance(tag, str) and isinstance(url, str) and isinstance(repository, str)):
        return "tag, resource_url and repository.repo_full_name must be strings"
    try:
        registry = validate_registry(url.split("/", 1)[0])
        return ImageRef(
            registry,
            validate_repository(repository),
            validate_tag(tag),
            parse_digest(digest) if isinstance(digest, str) and digest else None,
        )
    except (NameInvalid, DigestInvalid) as exc:
        return str(exc)


def _bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header (scheme in any case), or None."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _same(presented: str, token: bytes) -> bool:
    """Constant time in the content: how much of a guess is right does not show in timing."""
    try:
        given = presented.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from an undecodable header byte
        return False
    return hmac.compare_digest(given, token)


async def _read_body(request: web.Request) -> bytes:
    too_large = f"a webhook body is at most {MAX_BODY} bytes"
    if (request.content_length or 0) > MAX_BODY:
        raise RequestInvalid(too_large)
    body = bytearray()
    while chunk := await request.content.read(_CHUNK):
        body += chunk
        if len(body) > MAX_BODY:
            raise RequestInvalid(too_large)
    return bytes(body)
