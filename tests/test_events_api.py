"""The webhook receivers: what becomes a push event, and what is refused before anything happens.

The routes run in the real registry front (`RegistryApi(..., extensions=[...])`, its error
middleware included) on loopback; the sink records what it is given. Envelopes are shaped as
distribution 2.8 sends them (docs: /work/shared/NOTES.md): one POST per event, one event per
blob and one for the manifest, only the manifest's carrying a tag.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import ClientResponse, ClientSession
from aiohttp.test_utils import TestServer
from harness.memory_runtime import RecordingSink
from harness.memory_store import MemoryStore

from mirror.content.service import ContentPolicy, ContentService
from mirror.metrics import Metrics
from mirror.oci.mediatypes import DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCTET_STREAM
from mirror.oci.reference import parse_digest
from mirror.prefetch.model import ImageRef, PushEvent
from mirror.registry.api import RegistryApi
from mirror.registry.events_api import (
    DISTRIBUTION_PATH,
    DOCKERHUB_PATH,
    HARBOR_PATH,
    MAX_BODY,
    OUTCOMES,
    SOURCES,
    EventsApi,
)

POLICY = ContentPolicy(mirrored_registries=None, resolve_tags=True, tag_timeout=1.0)
TOKEN = "s3cret-webhook-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
EVENTS_TYPE = {"Content-Type": "application/vnd.docker.distribution.events.v1+json"}
HOST = "127.0.0.1:5000"
REPOSITORY = "team/app"
MANIFEST_DIGEST = "sha256:" + "d" * 64
LAYERS = ["sha256:" + char * 64 for char in "123"]
CONFIG = "sha256:" + "c" * 64


class BrokenSink:
    def pushed(self, event: PushEvent) -> None:
        raise RuntimeError("the distributor is broken")


@dataclass
class Receiver:
    url: str
    http: ClientSession
    metrics: Metrics
    sink: RecordingSink

    async def post(
        self,
        path: str,
        body: object = None,
        *,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> ClientResponse:
        raw = data if data is not None else json.dumps(body).encode()
        return await self.http.post(self.url + path, data=raw, headers=headers or {})

    async def envelope(self, *events: dict[str, Any]) -> ClientResponse:
        return await self.post(
            DISTRIBUTION_PATH, {"events": list(events)}, headers={**BEARER, **EVENTS_TYPE}
        )

    def count(self, source: str, outcome: str) -> float:
        labels = {"source": source, "outcome": outcome}
        value = self.metrics.registry.get_sample_value("mirror_webhook_events_total", labels)
        assert value is not None, "every series exists from the start"
        return value


Serve = Callable[..., Awaitable[Receiver]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """`await serve(token=b"...", sink=...)`: the registry front with the receivers on it."""
    servers: list[TestServer] = []
    sessions: list[ClientSession] = []

    async def make(token: bytes | None = TOKEN.encode(), sink: Any = None) -> Receiver:
        metrics = Metrics()
        recording = RecordingSink()
        events = EventsApi(sink if sink is not None else recording, token, metrics)
        api = RegistryApi(
            metrics, ContentService(MemoryStore(), metrics, POLICY), extensions=[events]
        )
        server = TestServer(api.app(), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        http = ClientSession()
        sessions.append(http)
        return Receiver(f"http://127.0.0.1:{server.port}", http, metrics, recording)

    yield make
    for http in sessions:
        await http.close()
    for server in servers:
        await server.close()


def event(
    target: dict[str, Any], *, action: str = "push", host: str = HOST, method: str = "PUT"
) -> dict[str, Any]:
    """One event as distribution 2.8 writes it."""
    return {
        "id": str(uuid.uuid4()),
        "timestamp": "2026-12-01T10:00:00.000000000Z",
        "action": action,
        "target": target,
        "request": {
            "id": str(uuid.uuid4()),
            "addr": "127.0.0.1:40412",
            "host": host,
            "method": method,
            "useragent": "skopeo/1.9.3",
        },
        "actor": {},
        "source": {"addr": "registry-host:5000", "instanceID": str(uuid.uuid4())},
    }


def blob_event(digest: str, size: int = 4096, repository: str = REPOSITORY) -> dict[str, Any]:
    return event(
        {
            "mediaType": OCTET_STREAM,
            "size": size,
            "digest": digest,
            "length": size,
            "repository": repository,
            "url": f"http://{HOST}/v2/{repository}/blobs/{digest}",
        }
    )


def manifest_event(
    digest: str = MANIFEST_DIGEST,
    tag: str | None = "v1",
    *,
    media_type: str = OCI_MANIFEST,
    repository: str = REPOSITORY,
    host: str = HOST,
    action: str = "push",
) -> dict[str, Any]:
    target: dict[str, Any] = {
        "mediaType": media_type,
        "size": 1021,
        "digest": digest,
        "length": 1021,
        "repository": repository,
        "url": f"http://{host}/v2/{repository}/manifests/{digest}",
    }
    if tag is not None:
        target["tag"] = tag
    return event(target, action=action, host=host, method="PUT" if action == "push" else "GET")


async def errors_of(response: ClientResponse) -> list[str]:
    body = await response.json()
    return [error["code"] for error in body["errors"]]


# --- distribution ----------------------------------------------------------------------------


async def test_a_tagged_push_as_distribution_sends_it_is_one_event(serve: Serve) -> None:
    """A 3-layer image: five POSTs (three layers, the config, the manifest), one event each."""
    receiver = await serve()
    for digest in [*LAYERS, CONFIG]:
        response = await receiver.envelope(blob_event(digest))
        assert response.status == 202
        assert await response.json() == {"accepted": 0, "ignored": 1, "invalid": 0}
    assert receiver.sink.events == []
    response = await receiver.envelope(manifest_event())
    assert response.status == 202
    assert await response.json() == {"accepted": 1, "ignored": 0, "invalid": 0}
    assert receiver.sink.events == [
        PushEvent(ImageRef(HOST, REPOSITORY, "v1", parse_digest(MANIFEST_DIGEST)), "distribution")
    ]
    assert receiver.count("distribution", "accepted") == 1
    assert receiver.count("distribution", "ignored") == 4


async def test_one_envelope_of_many_events_takes_the_good_and_counts_the_rest(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mirror.registry.events_api")
    receiver = await serve()
    index_digest = "sha256:" + "e" * 64
    response = await receiver.envelope(
        blob_event(LAYERS[0]),
        manifest_event(action="pull"),  # a pull of the manifest
        manifest_event(tag=None),  # an index's child, pushed by digest
        manifest_event(tag=""),
        manifest_event(media_type="application/vnd.docker.distribution.manifest.v1+prettyjws"),
        manifest_event(repository="Team/App"),
        manifest_event(tag="bad tag"),
        manifest_event(digest="sha256:abc"),
        manifest_event(host="not a host"),
        {**manifest_event(), "request": "nowhere"},
        {**manifest_event(), "target": None},
        "not an event",
        manifest_event(index_digest, "prod-1", media_type=DOCKER_MANIFEST_LIST, host="reg.example"),
    )
    assert response.status == 202
    assert await response.json() == {"accepted": 1, "ignored": 5, "invalid": 7}
    (pushed,) = receiver.sink.events
    assert pushed.ref == ImageRef("reg.example", REPOSITORY, "prod-1", parse_digest(index_digest))
    assert pushed.trigger == "distribution"
    assert receiver.count("distribution", "invalid") == 7
    assert "invalid repository name 'Team/App'" in caplog.text


async def test_a_media_type_with_parameters_is_still_a_manifest(serve: Serve) -> None:
    receiver = await serve()
    response = await receiver.envelope(manifest_event(media_type=OCI_MANIFEST + "; charset=utf-8"))
    assert await response.json() == {"accepted": 1, "ignored": 0, "invalid": 0}


async def test_a_push_without_a_digest_keeps_its_tag(serve: Serve) -> None:
    receiver = await serve()
    pushed = manifest_event()
    del pushed["target"]["digest"]
    await receiver.envelope(pushed)
    assert [e.ref for e in receiver.sink.events] == [ImageRef(HOST, REPOSITORY, "v1")]


async def test_an_empty_envelope_is_fine(serve: Serve) -> None:
    receiver = await serve()
    response = await receiver.envelope()
    assert response.status == 202
    assert await response.json() == {"accepted": 0, "ignored": 0, "invalid": 0}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
    ],
)
async def test_without_the_token_nothing_happens(serve: Serve, headers: dict[str, str]) -> None:
    receiver = await serve()
    response = await receiver.post(
        DISTRIBUTION_PATH, {"events": [manifest_event()]}, headers=headers
    )
    assert response.status == 401
    assert await errors_of(response) == ["UNAUTHORIZED"]
    assert receiver.sink.events == []
    assert receiver.count("distribution", "unauthorized") == 1
    assert receiver.count("distribution", "accepted") == 0


async def test_the_token_in_the_query_is_not_enough_for_distribution(serve: Serve) -> None:
    receiver = await serve()
    response = await receiver.post(
        f"{DISTRIBUTION_PATH}?token={TOKEN}", {"events": [manifest_event()]}
    )
    assert response.status == 401


async def test_the_bearer_scheme_is_case_insensitive(serve: Serve) -> None:
    receiver = await serve()
    response = await receiver.post(
        DISTRIBUTION_PATH,
        {"events": [manifest_event()]},
        headers={"Authorization": f"bearer  {TOKEN}"},
    )
    assert response.status == 202 and len(receiver.sink.events) == 1


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe\xfd", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (b"[]", "a JSON object"),
        (b'"events"', "a JSON object"),
        (b"{}", "notification envelope"),
        (b'{"events": {"action": "push"}}', "notification envelope"),
        (b'{"events": null}', "notification envelope"),
    ],
)
async def test_a_body_that_is_no_envelope_is_a_400(serve: Serve, data: bytes, reason: str) -> None:
    receiver = await serve()
    response = await receiver.post(DISTRIBUTION_PATH, data=data, headers=BEARER)
    assert response.status == 400
    body = await response.json()
    assert reason in body["errors"][0]["message"]
    assert receiver.count("distribution", "invalid") == 1
    assert receiver.sink.events == []


async def test_a_body_over_the_cap_is_refused(serve: Serve) -> None:
    receiver = await serve()
    padding = b" " * MAX_BODY
    response = await receiver.post(
        DISTRIBUTION_PATH, data=json.dumps({"events": []}).encode() + padding, headers=BEARER
    )
    assert response.status == 400
    assert "at most 1048576 bytes" in (await response.json())["errors"][0]["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: read until the cap
        yield b'{"events": []}'
        for _ in range(20):
            yield b" " * (64 * 1024)

    response = await receiver.http.post(
        receiver.url + DISTRIBUTION_PATH, data=chunks(), headers=BEARER
    )
    assert response.status == 400
    # At the cap exactly, the body is read.
    at_cap = b'{"events": []}'
    at_cap += b" " * (MAX_BODY - len(at_cap))
    response = await receiver.post(DISTRIBUTION_PATH, data=at_cap, headers=BEARER)
    assert response.status == 202
    assert receiver.count("distribution", "invalid") == 2


# --- Docker Hub ------------------------------------------------------------------------------


def dockerhub(repo_name: str = "svendowideit/testhook", tag: str = "latest") -> dict[str, Any]:
    """Docker Hub's documented webhook payload."""
    namespace, _, name = repo_name.rpartition("/")
    return {
        "callback_url": f"https://registry.hub.docker.com/u/{repo_name}/hook/2141b5bi5i5b02bec211i4eeih0242eg11000a/",
        "push_data": {"pushed_at": 1417566161, "pusher": "trustedbuilder", "tag": tag},
        "repository": {
            "comment_count": 0,
            "date_created": 1417494799,
            "description": "",
            "dockerfile": "FROM busybox\n",
            "full_description": "Docker Hub based automated build from a GitHub repo",
            "is_official": False,
            "is_private": True,
            "is_trusted": True,
            "name": name,
            "namespace": namespace,
            "owner": namespace,
            "repo_name": repo_name,
            "repo_url": f"https://registry.hub.docker.com/u/{repo_name}/",
            "star_count": 0,
            "status": "Active",
        },
    }


async def test_a_docker_hub_push(serve: Serve) -> None:
    receiver = await serve()
    response = await receiver.post(f"{DOCKERHUB_PATH}?token={TOKEN}", dockerhub())
    assert response.status == 202
    assert await response.json() == {"accepted": 1, "ignored": 0, "invalid": 0}
    response = await receiver.post(f"{DOCKERHUB_PATH}?token={TOKEN}", dockerhub("nginx", "1.27"))
    assert response.status == 202
    assert receiver.sink.events == [
        PushEvent(ImageRef("docker.io", "svendowideit/testhook", "latest"), "dockerhub"),
        PushEvent(ImageRef("docker.io", "library/nginx", "1.27"), "dockerhub"),
    ]
    assert receiver.count("dockerhub", "accepted") == 2


@pytest.mark.parametrize("query", ["", "?token=", "?token=wrong", f"?token={TOKEN}%20"])
async def test_a_docker_hub_push_without_the_query_token(serve: Serve, query: str) -> None:
    receiver = await serve()
    # The header does not stand in for the query token: Docker Hub cannot send one.
    response = await receiver.post(DOCKERHUB_PATH + query, dockerhub(), headers=BEARER)
    assert response.status == 401
    assert await errors_of(response) == ["UNAUTHORIZED"]
    assert receiver.sink.events == []
    assert receiver.count("dockerhub", "unauthorized") == 1


@pytest.mark.parametrize(
    ("repo_name", "tag"),
    [("Svendowideit/testhook", "latest"), ("a/b", "bad tag"), ("a/b:c", "d"), ("a/b@x", "d")],
)
async def test_a_docker_hub_push_of_a_bad_name_is_counted(
    serve: Serve, repo_name: str, tag: str
) -> None:
    receiver = await serve()
    response = await receiver.post(f"{DOCKERHUB_PATH}?token={TOKEN}", dockerhub(repo_name, tag))
    assert response.status == 202
    assert await response.json() == {"accepted": 0, "ignored": 0, "invalid": 1}
    assert receiver.sink.events == []


@pytest.mark.parametrize(
    "body",
    [
        {"push_data": {"tag": "latest"}},
        {"repository": {"repo_name": "a/b"}},
        {"push_data": {"tag": 1}, "repository": {"repo_name": "a/b"}},
        {"push_data": "latest", "repository": {"repo_name": "a/b"}},
        {"events": []},
    ],
)
async def test_a_docker_hub_body_of_another_shape_is_a_400(serve: Serve, body: object) -> None:
    receiver = await serve()
    response = await receiver.post(f"{DOCKERHUB_PATH}?token={TOKEN}", body)
    assert response.status == 400
    assert receiver.count("dockerhub", "invalid") == 1


# --- both ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [DISTRIBUTION_PATH, DOCKERHUB_PATH])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_only_post(serve: Serve, path: str, method: str) -> None:
    receiver = await serve()
    response = await receiver.http.request(
        method, f"{receiver.url}{path}?token={TOKEN}", headers=BEARER
    )
    assert response.status == 405
    assert await errors_of(response) == ["UNSUPPORTED"]


@pytest.mark.parametrize("path", [DISTRIBUTION_PATH, DOCKERHUB_PATH])
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_without_a_token_configured_the_routes_are_not_there(
    serve: Serve, path: str, method: str
) -> None:
    receiver = await serve(token=None)
    body = {"events": [manifest_event()]} if path == DISTRIBUTION_PATH else dockerhub()
    response = await receiver.http.request(
        method, f"{receiver.url}{path}?token=", json=body, headers={"Authorization": "Bearer "}
    )
    assert response.status == 404
    assert receiver.sink.events == []
    assert all(receiver.count(s, o) == 0 for s in SOURCES for o in OUTCOMES)


async def test_a_failing_sink_does_not_fail_the_sender(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="mirror.registry.events_api")
    receiver = await serve(sink=BrokenSink())
    response = await receiver.envelope(manifest_event(), manifest_event(tag="v2"))
    assert response.status == 202
    assert await response.json() == {"accepted": 2, "ignored": 0, "invalid": 0}
    assert "the push sink failed" in caplog.text


async def test_the_counter_has_a_fixed_set_of_series(serve: Serve) -> None:
    receiver = await serve()
    await receiver.envelope(manifest_event(), blob_event(CONFIG), "junk")
    await receiver.post(DISTRIBUTION_PATH, {"events": []})
    series = {
        (sample.labels["source"], sample.labels["outcome"])
        for metric in receiver.metrics.registry.collect()
        if metric.name == "mirror_webhook_events"
        for sample in metric.samples
        if sample.name == "mirror_webhook_events_total"
    }
    assert series == {(s, o) for s in SOURCES for o in OUTCOMES}
    assert [receiver.count("distribution", o) for o in OUTCOMES] == [1, 1, 1, 1]


# --- Harbor ----------------------------------------------------------------------------------


def harbor(kind: str = "PUSH_ARTIFACT", *resources: dict[str, Any]) -> dict[str, Any]:
    """A Harbor project webhook, "Default" payload format (goharbor.io, configure webhooks)."""
    return {
        "type": kind,
        "occur_at": 1796150000,
        "operator": "admin",
        "event_data": {
            "resources": list(resources)
            or [
                {
                    "digest": MANIFEST_DIGEST,
                    "tag": "v1",
                    "resource_url": "harbor.example.com/team/app:v1",
                }
            ],
            "repository": {
                "date_created": 1796150000,
                "name": "app",
                "namespace": "team",
                "repo_full_name": "team/app",
                "repo_type": "private",
            },
        },
    }


async def test_a_harbor_push(serve: Serve) -> None:
    receiver = await serve()
    response = await receiver.post(HARBOR_PATH, harbor(), headers=BEARER)
    assert response.status == 202
    assert await response.json() == {"accepted": 1, "ignored": 0, "invalid": 0}
    assert receiver.sink.events == [
        PushEvent(
            ImageRef("harbor.example.com", "team/app", "v1", parse_digest(MANIFEST_DIGEST)),
            "harbor",
        )
    ]


async def test_harbor_events_other_than_a_tagged_push_are_ignored(serve: Serve) -> None:
    receiver = await serve()
    response = await receiver.post(HARBOR_PATH, harbor("PULL_ARTIFACT"), headers=BEARER)
    assert await response.json() == {"accepted": 0, "ignored": 1, "invalid": 0}
    untagged = {"digest": MANIFEST_DIGEST, "tag": "", "resource_url": "h.example.com/team/app"}
    bad = {"digest": "sha256:zz", "tag": "v1", "resource_url": "h.example.com/team/app:v1"}
    response = await receiver.post(
        HARBOR_PATH, harbor("PUSH_ARTIFACT", untagged, bad), headers=BEARER
    )
    assert await response.json() == {"accepted": 0, "ignored": 1, "invalid": 1}
    assert receiver.sink.events == []


async def test_harbor_needs_the_token_and_its_shape(serve: Serve) -> None:
    receiver = await serve()
    response = await receiver.post(HARBOR_PATH, harbor())
    assert response.status == 401
    response = await receiver.post(HARBOR_PATH, {"type": "PUSH_ARTIFACT"}, headers=BEARER)
    assert response.status == 400
    assert receiver.sink.events == []


def test_the_query_token_never_reaches_the_access_log(caplog: pytest.LogCaptureFixture) -> None:
    """Docker Hub can only send the token in the query, which the debug access log prints."""
    import mirror.node  # noqa: F401 - installs the access log's filter

    caplog.set_level(logging.INFO, logger="mirror.access")
    line = f'127.0.0.1 "POST {DOCKERHUB_PATH}?token={TOKEN}&x=1 HTTP/1.1" 202 42'
    logging.getLogger("mirror.access").info(line)
    assert TOKEN not in caplog.text
    assert "token=REDACTED&x=1" in caplog.text
