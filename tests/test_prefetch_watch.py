"""Workload watches (``NomadWorkloads``, ``KubernetesWorkloads``) against fake API servers.

Neither a Nomad agent nor a Kubernetes API server can run here, so small aiohttp servers in
this process stand in for them. They answer with the shapes the API references document, and
nothing here shows how a real server deviates from its documentation:

- Nomad: ``GET /v1/jobs`` returns job list stubs (the fields of Nomad's ``JobListStub``:
  ``Datacenters``, ``NodePool``, ``Stop``, ``Status``, ``ParentID``, ``ModifyIndex``, ...)
  with ``X-Nomad-Index``, and holds a blocking query (``index``, ``wait``) until the state's
  index passes ``index`` or ``wait`` runs out; ``GET /v1/job/:id?namespace=`` returns the
  job as registered (``TaskGroups[].Tasks[].Driver``, ``.Config.image``), or 404.
- Kubernetes: ``apps/v1`` Deployments, DaemonSets, StatefulSets and ``batch/v1`` CronJobs,
  listed across namespaces or in one (``limit``/``continue`` paging, the list's
  ``metadata.resourceVersion``) and watched (``watch=1&resourceVersion=...&
  allowWatchBookmarks=true``): one JSON event a line, ADDED/MODIFIED/DELETED/BOOKMARK/ERROR,
  410 Gone (as an HTTP status or an ERROR event's Status) for a resourceVersion compacted
  away. It serves HTTPS with a throwaway self-signed certificate, the pod's ``ca.crt``, and
  accepts only the service-account token.

Synchronisation is by events the fake servers set (a blocking query is held, a watch is open
at a resourceVersion, a log line was written), never by sleeping; every wait has a deadline
only so that a broken watch fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import ssl
from collections import Counter, defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness.net import free_port
from yarl import URL

from mirror.errors import ConfigError
from mirror.prefetch.model import ImageRef, parse_image_ref
from mirror.prefetch.watch import Backoff, KubernetesWorkloads, NomadWorkloads, WorkloadWatch
from mirror.prefetch.watch.kubernetes import node_labels
from mirror.routing.bootstrap.env import KubernetesEnv, NomadEnv
from mirror.routing.bootstrap.http import LookupFailed
from mirror.routing.bootstrap.kubernetes import KubernetesSettings, in_cluster_settings
from mirror.routing.bootstrap.nomad import NomadSettings, nomad_settings

LOGGER = "mirror.prefetch.watch"
DEADLINE = 10.0
FAST = Backoff(first=0.001, maximum=0.005)
NOMAD_TOKEN = "nomad-workload-identity"
KUBE_TOKEN = "eyJhbGciOiJSUzI1NiJ9.service-account.token"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def refs(*texts: str) -> frozenset[ImageRef]:
    return frozenset(parse_image_ref(text) for text in texts)


async def next_set(images: AsyncIterator[frozenset[ImageRef]]) -> frozenset[ImageRef]:
    """The watch's next set (the deadline only turns a hang into a failure)."""
    async with asyncio.timeout(DEADLINE):
        return await anext(images)


async def within(awaitable: Awaitable[Any]) -> Any:
    async with asyncio.timeout(DEADLINE):
        return await awaitable


@contextlib.asynccontextmanager
async def serving(
    app: web.Application, *, port: int = 0, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    """Run ``app`` on 127.0.0.1 until the block ends; yields its port."""
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


class LogWatch(logging.Handler):
    """The watch's log lines, and a way to wait until one containing a text was written."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.waiting: list[tuple[str, asyncio.Event]] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.lines.append(line)
        for text, event in self.waiting:
            if text in line:
                event.set()

    async def written(self, text: str, times: int = 1) -> None:
        """Until ``times`` lines containing ``text`` were written."""
        while self.count(text) < times:
            event = asyncio.Event()
            self.waiting.append((text, event))
            await within(event.wait())
            self.waiting.remove((text, event))

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)


@pytest.fixture
def logs() -> Iterator[LogWatch]:
    handler = LogWatch()
    logger = logging.getLogger(LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@contextlib.asynccontextmanager
async def watching(watch: WorkloadWatch) -> AsyncIterator[AsyncIterator[frozenset[ImageRef]]]:
    """The watch's image sets; closed (every request and task stopped) when the block ends."""
    images = watch.images()
    assert isinstance(images, AsyncGenerator)
    try:
        yield images
    finally:
        await images.aclose()


# --- a fake Nomad agent --------------------------------------------------------------------


def docker(name: str, image: str, **config: Any) -> dict[str, Any]:
    return task(name, "docker", {"image": image, "ports": ["http"], **config})


def task(name: str, driver: str, config: dict[str, Any]) -> dict[str, Any]:
    """A task as ``GET /v1/job/:id`` returns it (the fields that matter, and a few that not)."""
    return {
        "Name": name,
        "Driver": driver,
        "User": "",
        "Config": config,
        "Env": None,
        "Services": None,
        "Resources": {"CPU": 100, "MemoryMB": 300},
        "Leader": False,
    }


def nomad_job(
    job_id: str,
    *tasks: dict[str, Any],
    namespace: str = "default",
    datacenters: tuple[str, ...] = ("dc1",),
    node_pool: str | None = "default",
    job_type: str = "service",
    status: str = "running",
    stop: bool = False,
    parent: str = "",
    periodic: bool = False,
    parameterized: bool = False,
) -> dict[str, Any]:
    """A job as Nomad stores and returns it; ``node_pool=None`` is a Nomad before 1.6."""
    job: dict[str, Any] = {
        "Region": "global",
        "Namespace": namespace,
        "ID": job_id,
        "ParentID": parent,
        "Name": job_id,
        "Type": job_type,
        "Priority": 50,
        "AllAtOnce": False,
        "Datacenters": list(datacenters),
        "Constraints": None,
        "Affinities": None,
        "Spreads": None,
        "TaskGroups": [{"Name": "group", "Count": 1, "Tasks": list(tasks)}],
        "Periodic": {"Enabled": True, "Spec": "*/15 * * * *", "SpecType": "cron"}
        if periodic
        else None,
        "ParameterizedJob": {"Payload": "optional", "MetaRequired": None}
        if parameterized
        else None,
        "Dispatched": False,
        "Payload": None,
        "Meta": None,
        "Stop": stop,
        "Status": status,
        "StatusDescription": "",
        "Stable": False,
        "Version": 0,
        "SubmitTime": 1700000000000000000,
        "CreateIndex": 0,
        "ModifyIndex": 0,
        "JobModifyIndex": 0,
    }
    if node_pool is not None:
        job["NodePool"] = node_pool
    return job


def stub_of(job: dict[str, Any]) -> dict[str, Any]:
    """The job's entry in ``GET /v1/jobs``, as Nomad's ``Job.Stub`` builds it."""
    stub = {
        "ID": job["ID"],
        "ParentID": job["ParentID"],
        "Name": job["Name"],
        "Namespace": job["Namespace"],
        "Datacenters": job["Datacenters"],
        "Multiregion": None,
        "Type": job["Type"],
        "Priority": job["Priority"],
        "Periodic": job["Periodic"] is not None,
        "ParameterizedJob": job["ParameterizedJob"] is not None,
        "Stop": job["Stop"],
        "Status": job["Status"],
        "StatusDescription": job["StatusDescription"],
        "JobSummary": {
            "JobID": job["ID"],
            "Namespace": job["Namespace"],
            "Summary": {"group": {"Queued": 0, "Complete": 0, "Failed": 0, "Running": 1}},
            "Children": {"Pending": 0, "Running": 0, "Dead": 0},
            "CreateIndex": job["CreateIndex"],
            "ModifyIndex": job["ModifyIndex"],
        },
        "CreateIndex": job["CreateIndex"],
        "ModifyIndex": job["ModifyIndex"],
        "JobModifyIndex": job["JobModifyIndex"],
        "SubmitTime": job["SubmitTime"],
    }
    if "NodePool" in job:
        stub["NodePool"] = job["NodePool"]
    return stub


class FakeNomad:
    """``/v1/jobs`` with blocking queries and ``/v1/job/:id``, over jobs the test puts.

    ``list_failures`` and ``read_failures`` answer the next requests of their kind instead.
    ``blocked(index)`` is set once a blocking query waits at ``index``.
    """

    def __init__(self, index: int = 100) -> None:
        self.index = index
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.list_failures: list[Handler] = []
        self.read_failures: list[Handler] = []
        self.list_queries: list[dict[str, str]] = []
        self.reads: list[tuple[str, str]] = []
        self.unreadable: set[tuple[str, str]] = set()  # read-job denied, list-jobs allowed
        self.blocked_at: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self._bump = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/jobs", self.list_jobs)
        app.router.add_get("/v1/job/{job_id}", self.read_job)
        return app

    def put(self, job: dict[str, Any]) -> None:
        self.index += 1
        job["ModifyIndex"] = job["JobModifyIndex"] = self.index
        job["CreateIndex"] = job["CreateIndex"] or self.index
        self.jobs[(job["Namespace"], job["ID"])] = job
        self._wake()

    def remove(self, namespace: str, job_id: str) -> None:
        self.index += 1
        del self.jobs[(namespace, job_id)]
        self._wake()

    def blocked(self, index: int) -> Awaitable[bool]:
        return self.blocked_at[index].wait()

    def _wake(self) -> None:
        self._bump.set()
        self._bump = asyncio.Event()

    def _denied(self, request: web.Request) -> web.Response | None:
        if request.headers.get("X-Nomad-Token") != NOMAD_TOKEN:
            return web.Response(status=403, text="Permission denied")
        return None

    async def list_jobs(self, request: web.Request) -> web.StreamResponse:
        self.list_queries.append(dict(request.query))
        if denied := self._denied(request):
            return denied
        if self.list_failures:
            return await self.list_failures.pop(0)(request)
        assert request.query["namespace"] == "*"
        if "index" in request.query:
            wanted = int(request.query["index"])
            wait = int(request.query["wait"].removesuffix("ms")) / 1000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    while self.index <= wanted:
                        bump = self._bump
                        self.blocked_at[wanted].set()
                        await bump.wait()
        stubs = [stub_of(job) for _, job in sorted(self.jobs.items())]
        headers = {"X-Nomad-Index": str(self.index), "X-Nomad-KnownLeader": "true"}
        return web.json_response(stubs, headers=headers)

    async def read_job(self, request: web.Request) -> web.StreamResponse:
        key = (request.query.get("namespace", "default"), request.match_info["job_id"])
        self.reads.append(key)
        if denied := self._denied(request):
            return denied
        if self.read_failures:
            return await self.read_failures.pop(0)(request)
        if key in self.unreadable:
            return web.Response(status=403, text="Permission denied")
        if key not in self.jobs:
            return web.Response(status=404, text="job not found")
        return web.json_response(self.jobs[key], headers={"X-Nomad-Index": str(self.index)})


NOMAD_SETTINGS = NomadSettings(URL("http://127.0.0.1:4646"))


def nomad_watch(port: int, **options: Any) -> NomadWorkloads:
    """A watch for a node in dc1/default, with the settings the bootstrap builds from env."""
    env = NomadEnv(addr=f"http://127.0.0.1:{port}", token=NOMAD_TOKEN, namespace="mirror")
    options = {"datacenter": "dc1", "wait": 30.0, "backoff": FAST, **options}
    return NomadWorkloads(nomad_settings(ConfigError, env), **options)


@pytest.fixture
async def nomad() -> AsyncIterator[tuple[FakeNomad, int]]:
    server = FakeNomad()
    async with serving(server.app()) as port:
        yield server, port


def answer(status: int, text: str) -> Handler:
    async def respond(request: web.Request) -> web.Response:
        return web.Response(status=status, text=text, content_type="application/json")

    return respond


async def test_nomad_initial_set_across_namespaces_and_drivers(
    nomad: tuple[FakeNomad, int],
) -> None:
    server, port = nomad
    server.put(nomad_job("web", docker("nginx", "nginx:1.25"), docker("sidecar", "envoy:v1")))
    server.put(
        nomad_job(
            "mixed",
            task("ctr", "containerd-driver", {"image": "ghcr.io/acme/worker:2"}),
            task("pod", "podman", {"image": "docker://quay.io/acme/api:3"}),
            docker("private", "https://registry.example.com:5000/team/app:4"),
            task("bin", "exec", {"command": "/bin/true"}),
            task("java", "java", {"jar_path": "local/app.jar"}),
            task("raw", "raw_exec", {"command": "echo", "image": "ignored:1"}),
            namespace="batch-team",
        )
    )
    async with watching(nomad_watch(port)) as images:
        assert await next_set(images) == refs(
            "nginx:1.25",
            "envoy:v1",
            "ghcr.io/acme/worker:2",
            "quay.io/acme/api:3",
            "registry.example.com:5000/team/app:4",
        )
    assert sorted(server.reads) == [("batch-team", "mixed"), ("default", "web")]
    assert server.list_queries[0] == {"namespace": "*"}  # not NOMAD_NAMESPACE: every job counts


@dataclass(frozen=True)
class Placement:
    job: dict[str, Any]
    included: bool
    datacenter: str = "dc1"
    node_pool: str = "default"


IMAGE = "registry.example.com/app:1"


def placed(**options: Any) -> dict[str, Any]:
    return nomad_job("app", docker("app", IMAGE), **options)


@pytest.mark.parametrize(
    "case",
    [
        Placement(placed(), included=True),
        Placement(placed(datacenters=("dc2",)), included=False),
        Placement(placed(datacenters=("dc2", "dc1")), included=True),
        Placement(placed(datacenters=("*",)), included=True),
        Placement(placed(datacenters=("dc*",)), included=True),
        Placement(placed(datacenters=("eu-*-1",)), included=True, datacenter="eu-west-1"),
        Placement(placed(datacenters=("eu-*-1",)), included=False, datacenter="eu-west-2"),
        Placement(placed(datacenters=("dc1*x",)), included=False),
        Placement(placed(datacenters=("DC1",)), included=False),
        Placement(placed(datacenters=("d?1",)), included=False),  # only * is special
        Placement(placed(datacenters=()), included=True),  # Nomad's default: ["*"]
        Placement(placed(node_pool="gpu"), included=False),
        Placement(placed(node_pool="gpu"), included=True, node_pool="gpu"),
        Placement(placed(node_pool="default"), included=False, node_pool="gpu"),
        Placement(placed(node_pool="all"), included=True, node_pool="gpu"),
        Placement(placed(node_pool=None), included=True),  # Nomad before 1.6: no pools
        Placement(placed(stop=True), included=False),
        Placement(placed(job_type="batch", status="dead"), included=False),
        Placement(placed(job_type="batch", status="pending"), included=True),
        Placement(placed(job_type="batch", periodic=True), included=True),
        Placement(placed(job_type="batch", parameterized=True), included=True),
        Placement(placed(job_type="batch", periodic=True, stop=True, status="dead"), False),
        Placement(placed(job_type="batch", parent="nightly", status="running"), False),
        Placement(placed(job_type="system"), included=True),
    ],
    ids=[
        "same-dc",
        "other-dc",
        "one-of-dcs",
        "glob-all",
        "glob-prefix",
        "glob-middle",
        "glob-middle-other",
        "glob-suffix-mismatch",
        "dc-case-sensitive",
        "no-other-wildcards",
        "no-dcs",
        "other-pool",
        "same-pool",
        "default-pool-on-gpu-node",
        "pool-all",
        "before-pools",
        "stopped",
        "dead-batch",
        "pending-batch",
        "periodic-parent",
        "parameterized-parent",
        "stopped-periodic",
        "child-job",
        "system",
    ],
)
async def test_nomad_jobs_that_cannot_place_here_are_left_out(case: Placement) -> None:
    server = FakeNomad()
    server.put(case.job)
    anywhere = {"datacenters": ("*",), "node_pool": "all"}
    server.put(nomad_job("always", docker("always", "busybox:1.36"), **anywhere))
    async with serving(server.app()) as port:
        watch = nomad_watch(port, datacenter=case.datacenter, node_pool=case.node_pool)
        async with watching(watch) as images:
            found = await next_set(images)
    expected = refs("busybox:1.36", IMAGE) if case.included else refs("busybox:1.36")
    assert found == expected
    if not case.included:
        assert ("default", "app") not in server.reads  # the list stub said enough


async def test_nomad_blocking_query_returns_when_a_job_is_added(
    nomad: tuple[FakeNomad, int],
) -> None:
    server, port = nomad
    server.put(nomad_job("web", docker("nginx", "nginx:1.25")))
    async with watching(nomad_watch(port)) as images:
        assert await next_set(images) == refs("nginx:1.25")
        waiting = asyncio.ensure_future(next_set(images))
        index = server.index
        await within(server.blocked(index))
        assert not waiting.done()
        assert server.list_queries[-1] == {"namespace": "*", "index": str(index), "wait": "30000ms"}
        server.put(nomad_job("cache", docker("redis", "redis:7"), namespace="ops"))
        assert await within(waiting) == refs("nginx:1.25", "redis:7")
    assert server.reads == [("default", "web"), ("ops", "cache")]  # web was not read again


async def test_nomad_changed_image_replaces_the_old_one(nomad: tuple[FakeNomad, int]) -> None:
    server, port = nomad
    server.put(nomad_job("web", docker("nginx", "nginx:1.25")))
    server.put(nomad_job("db", docker("postgres", "postgres:16")))
    async with watching(nomad_watch(port)) as images:
        assert await next_set(images) == refs("nginx:1.25", "postgres:16")
        waiting = asyncio.ensure_future(next_set(images))
        await within(server.blocked(server.index))
        server.put(nomad_job("web", docker("nginx", "nginx:1.27")))
        assert await within(waiting) == refs("nginx:1.27", "postgres:16")
    assert Counter(server.reads) == {("default", "web"): 2, ("default", "db"): 1}


async def test_nomad_removed_or_stopped_jobs_drop_their_images(
    nomad: tuple[FakeNomad, int],
) -> None:
    server, port = nomad
    server.put(nomad_job("web", docker("nginx", "nginx:1.25")))
    server.put(nomad_job("db", docker("postgres", "postgres:16")))
    server.put(nomad_job("queue", docker("rabbit", "rabbitmq:3")))
    async with watching(nomad_watch(port)) as images:
        assert await next_set(images) == refs("nginx:1.25", "postgres:16", "rabbitmq:3")
        server.remove("default", "db")
        assert await next_set(images) == refs("nginx:1.25", "rabbitmq:3")
        server.put(nomad_job("queue", docker("rabbit", "rabbitmq:3"), stop=True))
        assert await next_set(images) == refs("nginx:1.25")


async def test_nomad_interpolated_and_unparsable_images_are_skipped_and_logged_once(
    nomad: tuple[FakeNomad, int], logs: LogWatch
) -> None:
    server, port = nomad
    tasks = [
        docker("templated", "registry.example.com/app:${NOMAD_META_version}"),
        docker("broken", "Registry.Example.com/UPPER:case!"),
        docker("loaded", "local-only:1", load="app.tar"),  # from an artifact, not a registry
        task("pod", "podman", {"image": "oci-archive:/local/app.tar"}),
        docker("fine", "nginx:1.25"),
    ]
    server.put(nomad_job("web", *tasks))
    async with watching(nomad_watch(port)) as images:
        assert await next_set(images) == refs("nginx:1.25")
        server.put(nomad_job("web", *tasks, docker("more", "redis:7")))  # read whole again
        assert await next_set(images) == refs("nginx:1.25", "redis:7")
    assert logs.count("${NOMAD_META_version}") == 1
    assert "Nomad interpolation" in logs.lines[0]
    assert logs.count("UPPER") == 1
    assert logs.count("oci-archive") == 1
    assert logs.count("local-only") == 0


async def test_nomad_server_errors_are_retried_and_the_last_set_kept(
    nomad: tuple[FakeNomad, int], logs: LogWatch
) -> None:
    server, port = nomad
    server.put(nomad_job("web", docker("nginx", "nginx:1.25")))
    async with watching(nomad_watch(port)) as images:
        assert await next_set(images) == refs("nginx:1.25")
        waiting = asyncio.ensure_future(next_set(images))
        await within(server.blocked(server.index))
        server.list_failures = [
            answer(500, "rpc error: No cluster leader"),
            answer(500, "rpc error: No cluster leader (again)"),
            answer(200, '[{"ID": "web", '),  # cut short
            answer(200, '{"not": "a list"}'),
        ]
        server.put(nomad_job("db", docker("postgres", "postgres:16")))
        # The held query answers; the next four fail, then one blocks again.
        assert await within(waiting) == refs("nginx:1.25", "postgres:16")
        waiting = asyncio.ensure_future(next_set(images))
        await within(server.blocked(server.index))
        assert not server.list_failures
        assert not waiting.done()  # the failures changed nothing: no set in between
        server.read_failures = [answer(500, "rpc error: timeout")]
        server.put(nomad_job("cache", docker("redis", "redis:7")))
        # The read fails: the set stays as it was (nothing yielded), and the next list, at the
        # old index, answers at once, so the job is read again.
        assert await within(waiting) == refs("nginx:1.25", "postgres:16", "redis:7")
    assert logs.count("listing jobs failed: HTTP 500: rpc error: No cluster leader") == 1
    assert logs.count("listing jobs failed: malformed JSON") == 1
    assert logs.count("listing jobs failed: unexpected response: not a JSON list") == 1
    assert logs.count("reading a job failed: HTTP 500: rpc error: timeout") == 1
    assert Counter(server.reads)[("default", "cache")] == 2


async def test_nomad_unreadable_job_does_not_keep_the_others_out(
    nomad: tuple[FakeNomad, int], logs: LogWatch
) -> None:
    server, port = nomad
    server.unreadable.add(("secrets", "vault"))
    server.put(nomad_job("vault", docker("vault", "hashicorp/vault:1.17"), namespace="secrets"))
    server.put(nomad_job("web", docker("nginx", "nginx:1.25"), namespace="web"))  # read after
    async with watching(nomad_watch(port)) as images:
        assert await next_set(images) == refs("nginx:1.25")
        waiting = asyncio.ensure_future(next_set(images))
        await logs.written("reading a job failed: HTTP 403: Permission denied (the token needs")
        server.unreadable.clear()  # the ACL policy was fixed
        assert await within(waiting) == refs("nginx:1.25", "hashicorp/vault:1.17")
    assert logs.count("HTTP 403") == 1


async def test_nomad_refused_connection_and_restart_keep_the_last_set(logs: LogWatch) -> None:
    port = free_port()
    first = FakeNomad(index=100)
    first.put(nomad_job("web", docker("nginx", "nginx:1.25")))
    async with watching(nomad_watch(port)) as images:
        waiting = asyncio.ensure_future(next_set(images))
        await logs.written(f"cannot connect to 127.0.0.1:{port}")
        assert not waiting.done()
        async with serving(first.app(), port=port):
            assert await within(waiting) == refs("nginx:1.25")
            waiting = asyncio.ensure_future(next_set(images))
            await within(first.blocked(first.index))
        # The agent went away while a query was held: refused from now on.
        await logs.written("cannot connect", times=2)
        second = FakeNomad(index=500)
        second.put(nomad_job("web", docker("nginx", "nginx:1.25")))
        second.put(nomad_job("db", docker("postgres", "postgres:16")))
        assert not waiting.done()
        async with serving(second.app(), port=port):
            assert await within(waiting) == refs("nginx:1.25", "postgres:16")
    # Once per kind and outage, however many retries each outage took.
    assert logs.count("cannot connect") == 2
    assert logs.count("the API answers again") == 2


async def test_nomad_wrong_token_is_logged_with_a_hint(
    nomad: tuple[FakeNomad, int], logs: LogWatch
) -> None:
    _, port = nomad
    env = NomadEnv(addr=f"http://127.0.0.1:{port}", token="a-wrong-token")
    watch = NomadWorkloads(nomad_settings(ConfigError, env), datacenter="dc1", backoff=FAST)
    async with watching(watch) as images:
        waiting = asyncio.ensure_future(next_set(images))
        await logs.written("HTTP 403: Permission denied (the token needs list-jobs")
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting


# --- a fake Kubernetes API server ----------------------------------------------------------

RESOURCES = {
    "deployments": ("apps/v1", "Deployment"),
    "daemonsets": ("apps/v1", "DaemonSet"),
    "statefulsets": ("apps/v1", "StatefulSet"),
    "cronjobs": ("batch/v1", "CronJob"),
}
NODE_LABELS = {
    "kubernetes.io/hostname": "node-1",
    "kubernetes.io/os": "linux",
    "node.kubernetes.io/instance-type": "m5.large",
}


def pod_template(
    name: str,
    images: tuple[str, ...],
    init: tuple[str, ...] = (),
    node_selector: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [
            {"name": f"c{i}", "image": image, "ports": [{"containerPort": 8080}]}
            for i, image in enumerate(images)
        ],
        "restartPolicy": "Always",
    }
    if init:
        spec["initContainers"] = [{"name": f"i{i}", "image": image} for i, image in enumerate(init)]
    if node_selector is not None:
        spec["nodeSelector"] = node_selector
    return {"metadata": {"labels": {"app": name}}, "spec": spec}


def workload(
    plural: str,
    namespace: str,
    name: str,
    *images: str,
    init: tuple[str, ...] = (),
    node_selector: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A workload as the API returns it: metadata, a spec with its pod template, a status."""
    group_version, kind = RESOURCES[plural]
    template = pod_template(name, images, init, node_selector)
    spec: dict[str, Any]
    if plural == "cronjobs":
        spec = {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": template}}}
    else:
        spec = {"selector": {"matchLabels": {"app": name}}, "template": template}
        if plural != "daemonsets":
            spec["replicas"] = 2
        if plural == "statefulsets":
            spec["serviceName"] = name
    return {
        "apiVersion": group_version,
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{plural}-{namespace}-{name}",
            "generation": 1,
            "labels": {"app": name},
        },
        "spec": spec,
        "status": {"observedGeneration": 1},
    }


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A ``Status`` object: the body of an API error and the object of an ERROR event."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


CLOSE = object()


class FakeKubernetes:
    """Lists and watches the four workload resources over objects the test puts.

    Every change gets the next resourceVersion and goes into the resource's history, which a
    watch replays from its resourceVersion. ``put(..., seen=False)`` changes an object as if
    its events had been compacted away: a watch from before it gets 410 Gone.
    """

    def __init__(self) -> None:
        self.version = 1000
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
        self.history: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.compacted: dict[str, int] = defaultdict(int)
        self.watchers: dict[str, list[asyncio.Queue[object]]] = defaultdict(list)
        self.lists: Counter[str] = Counter()
        self.list_queries: list[tuple[str, dict[str, str]]] = []
        self.watches: list[tuple[str, str, int]] = []  # (plural, resourceVersion, status)
        self.failures: dict[str, list[Handler]] = defaultdict(list)
        self.open = asyncio.Condition()
        self.active: set[tuple[str, str]] = set()
        self.nodes: dict[str, dict[str, str]] = {}  # node name -> labels

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/nodes/{name}", self.node)
        app.router.add_get("/apis/{group}/{version}/{plural}", self.handle)
        app.router.add_get("/apis/{group}/{version}/namespaces/{namespace}/{plural}", self.handle)
        app.on_shutdown.append(self.shutdown)
        return app

    async def node(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {KUBE_TOKEN}":
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        labels = self.nodes.get(request.match_info["name"])
        if labels is None:
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        body = {"kind": "Node", "metadata": {"name": request.match_info["name"], "labels": labels}}
        return web.json_response(body)

    async def shutdown(self, app: web.Application) -> None:
        """End every open watch, as an API server going down does."""
        for plural in list(self.watchers):
            self.close(plural)

    def put(self, obj: dict[str, Any], *, seen: bool = True) -> int:
        plural = obj["kind"].lower() + "s"
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        event_type = "MODIFIED" if key in self.objects[plural] else "ADDED"
        self.version += 1
        obj = json.loads(json.dumps(obj))
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.objects[plural][key] = obj
        if seen:
            self._publish(plural, {"type": event_type, "object": obj})
        else:
            self.compacted[plural] = self.version
        return self.version

    def delete(self, plural: str, namespace: str, name: str) -> int:
        obj = self.objects[plural].pop((namespace, name))
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self._publish(plural, {"type": "DELETED", "object": obj})
        return self.version

    def bookmark(self, plural: str, advance: int = 7) -> int:
        """Other resources changed meanwhile: a BOOKMARK tells watchers the newer version."""
        self.version += advance
        group_version, kind = RESOURCES[plural]
        obj = {"kind": kind, "apiVersion": group_version}
        obj["metadata"] = {"resourceVersion": str(self.version)}  # type: ignore[assignment]
        self._send(plural, {"type": "BOOKMARK", "object": obj})
        return self.version

    def expire(self, plural: str) -> None:
        """An ERROR event with a 410 Status on open watches, then the end of the stream."""
        message = f"too old resource version: 1 ({self.version})"
        self._send(plural, {"type": "ERROR", "object": status(410, "Expired", message)})
        self.close(plural)

    def send_raw(self, plural: str, line: bytes) -> None:
        self._send(plural, line)

    def close(self, plural: str) -> None:
        self._send(plural, CLOSE)

    async def watching(self, plural: str, version: int | str) -> None:
        """Until a watch of ``plural`` from ``version`` is open."""
        async with self.open:
            await within(self.open.wait_for(lambda: (plural, str(version)) in self.active))

    def _publish(self, plural: str, event: dict[str, Any]) -> None:
        self.history[plural].append(event)
        self._send(plural, event)

    def _send(self, plural: str, item: object) -> None:
        for queue in self.watchers[plural]:
            queue.put_nowait(item)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        plural = request.match_info["plural"]
        group_version = f"{request.match_info['group']}/{request.match_info['version']}"
        assert RESOURCES[plural][0] == group_version
        if request.headers.get("Authorization") != f"Bearer {KUBE_TOKEN}":
            return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)
        if self.failures[plural]:
            return await self.failures[plural].pop(0)(request)
        namespace = request.match_info.get("namespace")
        if request.query.get("watch") in ("1", "true"):
            assert request.query["allowWatchBookmarks"] == "true"
            return await self.watch(request, plural, namespace)
        return self.list(request, plural, namespace)

    def list(self, request: web.Request, plural: str, namespace: str | None) -> web.Response:
        self.lists[plural] += 1
        self.list_queries.append((plural, dict(request.query)))
        items = [
            obj
            for (ns, _), obj in sorted(self.objects[plural].items())
            if namespace is None or ns == namespace
        ]
        start = int(request.query.get("continue") or 0)
        limit = int(request.query.get("limit") or 0) or len(items)
        metadata: dict[str, Any] = {"resourceVersion": str(self.version)}
        if start + limit < len(items):
            metadata["continue"] = str(start + limit)
            metadata["remainingItemCount"] = len(items) - start - limit
        body = {
            "kind": RESOURCES[plural][1] + "List",
            "apiVersion": RESOURCES[plural][0],
            "metadata": metadata,
            "items": [
                {key: value for key, value in obj.items() if key not in ("kind", "apiVersion")}
                for obj in items[start : start + limit]
            ],
        }
        return web.json_response(body)

    async def watch(
        self, request: web.Request, plural: str, namespace: str | None
    ) -> web.StreamResponse:
        version = request.query["resourceVersion"]
        if int(version) < self.compacted[plural]:
            self.watches.append((plural, version, 410))
            message = f"too old resource version: {version} ({self.compacted[plural]})"
            return web.json_response(status(410, "Expired", message), status=410)
        self.watches.append((plural, version, 200))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        queue: asyncio.Queue[object] = asyncio.Queue()
        self.watchers[plural].append(queue)
        backlog = [
            event
            for event in self.history[plural]
            if int(event["object"]["metadata"]["resourceVersion"]) > int(version)
        ]
        async with self.open:
            self.active.add((plural, version))
            self.open.notify_all()
        try:
            # The queue was registered with the backlog taken, without an await in between:
            # every event is in exactly one of them.
            for event in backlog:
                await self._write(response, event, namespace)
            while (item := await queue.get()) is not CLOSE:
                await self._write(response, item, namespace)
        finally:
            self.watchers[plural].remove(queue)
            async with self.open:
                self.active.discard((plural, version))
        return response

    @staticmethod
    async def _write(response: web.StreamResponse, item: object, namespace: str | None) -> None:
        if isinstance(item, bytes):
            await response.write(item)
            return
        assert isinstance(item, dict)
        event_namespace = item["object"].get("metadata", {}).get("namespace")
        if namespace is not None and event_namespace not in (None, namespace):
            return
        await response.write(json.dumps(item).encode() + b"\n")


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA: the pod's ``ca.crt``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "ca.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


KUBE_SETTINGS = KubernetesSettings(
    URL("https://127.0.0.1:6443"), Path("/nonexistent/token"), ssl.create_default_context()
)


@dataclass
class Kube:
    server: FakeKubernetes
    env: KubernetesEnv

    def watch(self, **options: Any) -> KubernetesWorkloads:
        """A watch with the in-cluster settings the bootstrap builds from the pod's env."""
        settings = in_cluster_settings(self.env, ConfigError)
        options = {"backoff": FAST, **options}
        return KubernetesWorkloads(settings, options.pop("labels", NODE_LABELS), **options)


@pytest.fixture
async def kube(tmp_path: Path) -> AsyncIterator[Kube]:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(KUBE_TOKEN + "\n")
    cert, key = make_certificate(account)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = FakeKubernetes()
    async with serving(server.app(), ssl_context=context) as port:
        yield Kube(server, KubernetesEnv("127.0.0.1", str(port), service_account_dir=account))


def standard_workloads(server: FakeKubernetes) -> None:
    server.put(workload("deployments", "shop", "api", "registry.example.com/shop/api:1.4"))
    server.put(workload("deployments", "shop", "web", "nginx:1.25", init=("busybox:1.36",)))
    server.put(workload("deployments", "kube-system", "coredns", "coredns/coredns:1.11.1"))
    server.put(workload("daemonsets", "kube-system", "proxy", "kube-proxy:v1.30"))
    server.put(workload("statefulsets", "data", "pg", "postgres:16", init=("alpine:3.20",)))
    server.put(workload("cronjobs", "ops", "backup", "ghcr.io/acme/backup:7"))


STANDARD = refs(
    "registry.example.com/shop/api:1.4",
    "nginx:1.25",
    "busybox:1.36",
    "coredns/coredns:1.11.1",
    "kube-proxy:v1.30",
    "postgres:16",
    "alpine:3.20",
    "ghcr.io/acme/backup:7",
)


async def test_kubernetes_initial_list_of_every_kind_across_namespaces(kube: Kube) -> None:
    standard_workloads(kube.server)
    async with watching(kube.watch(page_size=1)) as images:
        assert await next_set(images) == STANDARD
    assert kube.server.lists == {
        "deployments": 3,
        "daemonsets": 1,
        "statefulsets": 1,
        "cronjobs": 1,
    }
    assert [query for plural, query in kube.server.list_queries if plural == "deployments"] == [
        {"limit": "1"},
        {"limit": "1", "continue": "1"},
        {"limit": "1", "continue": "2"},
    ]


async def test_kubernetes_one_namespace(kube: Kube) -> None:
    standard_workloads(kube.server)
    async with watching(kube.watch(namespace="shop")) as images:
        assert await next_set(images) == refs(
            "registry.example.com/shop/api:1.4", "nginx:1.25", "busybox:1.36"
        )
        version = kube.server.version
        await kube.server.watching("deployments", version)
        kube.server.put(workload("deployments", "other", "x", "other:1"))
        kube.server.put(workload("deployments", "shop", "cart", "cart:2"))
        assert await next_set(images) == refs(
            "registry.example.com/shop/api:1.4", "nginx:1.25", "busybox:1.36", "cart:2"
        )


async def test_kubernetes_watch_events_change_the_set(kube: Kube) -> None:
    server = kube.server
    standard_workloads(server)
    async with watching(kube.watch()) as images:
        assert await next_set(images) == STANDARD
        server.put(workload("deployments", "shop", "cart", "cart:2"))
        assert await next_set(images) == STANDARD | refs("cart:2")
        server.put(workload("deployments", "shop", "cart", "cart:3", init=("migrate:3",)))
        assert await next_set(images) == STANDARD | refs("cart:3", "migrate:3")
        # A status-only change (same images) yields nothing: the next set is the delete's.
        status_only = workload("deployments", "shop", "cart", "cart:3", init=("migrate:3",))
        status_only["status"] = {"observedGeneration": 2, "readyReplicas": 2}
        server.put(status_only)
        server.delete("deployments", "shop", "cart")
        assert await next_set(images) == STANDARD
        server.delete("cronjobs", "ops", "backup")
        assert await next_set(images) == STANDARD - refs("ghcr.io/acme/backup:7")
    assert server.lists["deployments"] == 1


async def test_kubernetes_unparsable_image_is_skipped_and_logged_once(
    kube: Kube, logs: LogWatch
) -> None:
    server = kube.server
    server.put(workload("deployments", "shop", "api", "Shop/API:latest!", "api-proxy:2"))
    async with watching(kube.watch()) as images:
        assert await next_set(images) == refs("api-proxy:2")
        for generation in (2, 3):  # status updates: MODIFIED, same template
            updated = workload("deployments", "shop", "api", "Shop/API:latest!", "api-proxy:2")
            updated["status"] = {"observedGeneration": generation}
            server.put(updated)
        server.put(workload("deployments", "shop", "api", "Shop/API:latest!", "api-proxy:3"))
        assert await next_set(images) == refs("api-proxy:3")
    assert logs.count("deployment shop/api: image 'Shop/API:latest!' skipped") == 1


async def test_kubernetes_node_selector_that_does_not_match_leaves_a_workload_out(
    kube: Kube,
) -> None:
    server = kube.server
    server.put(
        workload("daemonsets", "gpu", "driver", "nvidia/driver:550", node_selector={"gpu": "true"})
    )
    linux = {"kubernetes.io/os": "linux"}
    server.put(
        workload("daemonsets", "kube-system", "proxy", "kube-proxy:v1.30", node_selector=linux)
    )
    server.put(workload("cronjobs", "ops", "report", "report:1", node_selector={"disktype": "ssd"}))
    async with watching(kube.watch()) as images:
        assert await next_set(images) == refs("kube-proxy:v1.30")
        windows = {"kubernetes.io/os": "windows"}
        server.put(
            workload(
                "daemonsets", "kube-system", "proxy", "kube-proxy:v1.30", node_selector=windows
            )
        )
        assert await next_set(images) == frozenset()
        server.put(workload("cronjobs", "ops", "report", "report:1", node_selector=linux))
        assert await next_set(images) == refs("report:1")
    labelled = kube.watch(labels={**NODE_LABELS, "gpu": "true", "disktype": "ssd"})
    async with watching(labelled) as images:
        assert await next_set(images) == refs("nvidia/driver:550", "report:1")


async def test_kubernetes_bookmark_moves_the_resource_version_on(kube: Kube) -> None:
    server = kube.server
    standard_workloads(server)
    async with watching(kube.watch()) as images:
        assert await next_set(images) == STANDARD
        listed = server.version
        await server.watching("statefulsets", listed)
        bookmark = server.bookmark("statefulsets")
        server.close("statefulsets")  # the next watch starts from the bookmark, not the list
        await server.watching("statefulsets", bookmark)
        server.put(workload("statefulsets", "data", "redis", "redis:7"))
        assert await next_set(images) == STANDARD | refs("redis:7")
    assert [(v, s) for p, v, s in server.watches if p == "statefulsets"] == [
        (str(listed), 200),
        (str(bookmark), 200),
    ]
    assert server.lists["statefulsets"] == 1


async def test_kubernetes_closed_stream_is_watched_again_from_the_last_version(
    kube: Kube,
) -> None:
    server = kube.server
    standard_workloads(server)
    async with watching(kube.watch()) as images:
        assert await next_set(images) == STANDARD
        last = server.put(workload("deployments", "shop", "cart", "cart:2"))
        assert await next_set(images) == STANDARD | refs("cart:2")
        server.close("deployments")
        await server.watching("deployments", last)
        server.delete("deployments", "shop", "cart")
        assert await next_set(images) == STANDARD
    assert server.lists["deployments"] == 1


async def test_kubernetes_gone_as_http_410_lists_again(kube: Kube, logs: LogWatch) -> None:
    server = kube.server
    standard_workloads(server)
    async with watching(kube.watch()) as images:
        assert await next_set(images) == STANDARD
        listed = server.version
        await server.watching("deployments", listed)
        # A change whose event the server no longer has, then the stream ends: the next
        # watch from `listed` is 410 Gone, and only a new list shows the change.
        server.put(
            workload("deployments", "shop", "api", "registry.example.com/shop/api:1.5"), seen=False
        )
        server.close("deployments")
        expected = STANDARD - refs("registry.example.com/shop/api:1.4")
        assert await next_set(images) == expected | refs("registry.example.com/shop/api:1.5")
    assert (("deployments", str(listed), 410)) in server.watches
    assert server.lists["deployments"] == 2
    assert logs.count("listing again") == 1


async def test_kubernetes_gone_as_error_event_lists_again_and_drops_deleted(kube: Kube) -> None:
    server = kube.server
    standard_workloads(server)
    async with watching(kube.watch()) as images:
        assert await next_set(images) == STANDARD
        await server.watching("daemonsets", server.version)
        # Deleted while the events were lost: only the new list drops it.
        del server.objects["daemonsets"][("kube-system", "proxy")]
        server.expire("daemonsets")
        assert await next_set(images) == STANDARD - refs("kube-proxy:v1.30")
    assert server.lists["daemonsets"] == 2


async def test_kubernetes_garbage_on_the_stream_lists_again(kube: Kube, logs: LogWatch) -> None:
    server = kube.server
    standard_workloads(server)
    async with watching(kube.watch()) as images:
        assert await next_set(images) == STANDARD
        await server.watching("cronjobs", server.version)
        server.objects["cronjobs"].clear()  # gone without events
        server.send_raw("cronjobs", b'{"type": "ADDED", "object": \n')
        assert await next_set(images) == STANDARD - refs("ghcr.io/acme/backup:7")
    assert logs.count("watch failed: malformed event") == 1
    assert server.lists["cronjobs"] == 2


async def test_kubernetes_forbidden_kind_does_not_hold_back_the_others(
    kube: Kube, logs: LogWatch
) -> None:
    server = kube.server
    standard_workloads(server)

    async def forbidden(request: web.Request) -> web.Response:
        message = (
            'cronjobs.batch is forbidden: User "system:serviceaccount:mirror:mirror" '
            'cannot list resource "cronjobs" in API group "batch" at the cluster scope'
        )
        return web.json_response(status(403, "Forbidden", message), status=403)

    async def broken(request: web.Request) -> web.Response:
        return web.Response(text='{"items": [', content_type="application/json")

    allowed = asyncio.Event()

    async def forbidden_until_allowed(request: web.Request) -> web.Response:
        if not allowed.is_set():
            server.failures["cronjobs"].append(forbidden_until_allowed)
        return await forbidden(request)

    server.failures["cronjobs"] = [forbidden_until_allowed]
    server.failures["daemonsets"] = [broken]
    async with watching(kube.watch()) as images:
        first = await next_set(images)
        # Every kind was tried once: the set has what listed (the DaemonSets' retry may
        # already have listed them, or not: a later set has them either way).
        assert first <= STANDARD - refs("ghcr.io/acme/backup:7")
        assert first >= STANDARD - refs("ghcr.io/acme/backup:7", "kube-proxy:v1.30")
        await logs.written("cronjobs.batch is forbidden")
        allowed.set()
        found = first
        while found != STANDARD:
            found = await next_set(images)
    assert logs.count("cronjobs.batch is forbidden") == 1
    assert logs.count("needs list and watch on cronjobs.batch cluster-wide") == 1
    assert logs.count("listing failed: malformed JSON") == 1
    assert server.lists["cronjobs"] == 1 and not server.failures["cronjobs"]


async def test_kubernetes_unreachable_api_keeps_the_last_set(
    tmp_path: Path, logs: LogWatch
) -> None:
    """The API server goes away after the initial set: nothing is yielded, nothing raised."""
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(KUBE_TOKEN)
    cert, key = make_certificate(account)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    port = free_port()
    env = KubernetesEnv("127.0.0.1", str(port), service_account_dir=account)
    watch = Kube(FakeKubernetes(), env).watch()
    first = FakeKubernetes()
    standard_workloads(first)
    async with watching(watch) as images:
        async with serving(first.app(), port=port, ssl_context=context):
            assert await next_set(images) == STANDARD
            waiting = asyncio.ensure_future(next_set(images))
            for plural in RESOURCES:
                await first.watching(plural, first.version)
        for plural in RESOURCES:
            await logs.written(f"kubernetes {plural}): watch failed: cannot connect")
        assert not waiting.done()
        second = FakeKubernetes()
        second.version = first.version
        standard_workloads(second)
        second.delete("deployments", "kube-system", "coredns")
        async with serving(second.app(), port=port, ssl_context=context):
            assert await within(waiting) == STANDARD - refs("coredns/coredns:1.11.1")
            # Counted while the server is up: stopping it (before the watch) fails them again.
            for plural in RESOURCES:
                assert logs.count(f"kubernetes {plural}): watch failed: cannot connect") == 1


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: NomadWorkloads(NOMAD_SETTINGS, datacenter=""), "datacenter and node pool"),
        (lambda: NomadWorkloads(NOMAD_SETTINGS, datacenter="dc1", node_pool=""), "node pool"),
        (
            lambda: NomadWorkloads(NOMAD_SETTINGS, datacenter="dc1", node_pool="all"),
            "node pool 'all' is for jobs only",
        ),
        (lambda: NomadWorkloads(NOMAD_SETTINGS, datacenter="dc1", wait=0), "0 to 600 seconds"),
        (lambda: NomadWorkloads(NOMAD_SETTINGS, datacenter="dc1", wait=900), "not 900"),
        (
            lambda: KubernetesWorkloads(KUBE_SETTINGS, NODE_LABELS, namespace="Shop"),
            "'Shop' is not a valid namespace",
        ),
    ],
    ids=["no-datacenter", "no-pool", "pool-all", "no-wait", "long-wait", "bad-namespace"],
)
def test_watch_arguments_are_checked(build: Callable[[], object], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        build()


async def test_kubernetes_node_labels_are_read_from_the_api(kube: Kube) -> None:
    kube.server.nodes["node-a"] = {"role": "edge", "kubernetes.io/os": "linux"}
    settings = in_cluster_settings(kube.env, ConfigError)
    assert await node_labels(settings, "node-a") == {"role": "edge", "kubernetes.io/os": "linux"}
    with pytest.raises(LookupFailed, match="HTTP 404"):
        await node_labels(settings, "node-b")
