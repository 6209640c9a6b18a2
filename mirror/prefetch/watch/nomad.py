"""``NomadWorkloads``: the images of the Nomad jobs that can place on this node.

How it follows Nomad: a blocking query on ``GET /v1/jobs`` (``namespace=*``: every namespace
the token may list) returns as soon as any job changes, or after ``wait``, with the state's
``X-Nomad-Index``; the next query sends that ``index``. A job's list stub carries its
``ModifyIndex``, so only a job that is new or changed is read whole (``GET /v1/job/:id``),
and a job gone from the list drops its images. An index that goes backwards (a restored
snapshot) is simply taken: the list is whole every time, so nothing needs resetting.

Which jobs count, decided from the stub when it says enough (no read for a job that cannot
place here) and again from the job read whole:

- datacenters: one of the job's ``Datacenters`` matches the node's datacenter. Since Nomad
  1.5 an entry may be a glob (``["*"]`` is the default), matched as Nomad matches it: ``*``
  is any run of characters, nothing else is special. An empty or missing list counts as
  ``["*"]``, Nomad's default.
- node pool: the job's ``NodePool`` is the node's pool, or the built-in ``all`` (every
  node). The server stores the pool it resolved (a namespace's default included), so a job
  without one comes from a Nomad before 1.6, which has no pools: it counts as ``default``,
  the pool of every node that names none.
- stopped (``Stop``) and ``dead`` jobs are left out. A dead job has no allocation and no
  evaluation left; it runs again only when submitted again, which changes its ModifyIndex
  and brings it back. A periodic or parameterized job stays ``running`` until it is stopped
  (Nomad's own rule), so its images stay in for as long as it can launch.
- child jobs (``ParentID`` set: a periodic launch, a dispatch) are left out: they run their
  parent's task groups and the parent is in. This also keeps the number of jobs read whole
  independent of how often a periodic job fires.

Placement constraints, affinities and spreads are not evaluated: the set is what *can*
place here, as a prefetcher wants it.

Tasks: ``config.image`` of drivers ``docker`` (a leading ``https://`` stripped, as the driver
does; a task that ``load``s its image from an artifact is skipped: no registry has it),
``containerd-driver`` and ``podman`` (``docker://`` stripped, other transports skipped). An
image with Nomad interpolation (``${...}``) is resolved on the client only when the task
starts, so it is skipped, with one log line.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from mirror.errors import ConfigError
from mirror.prefetch.model import ImageRef
from mirror.prefetch.watch.base import Backoff, Images, Once, Retry, failure_kind, union
from mirror.routing.bootstrap.http import REQUEST_TIMEOUT, LookupFailed, get_json, open_session
from mirror.routing.bootstrap.nomad import NomadSettings

log = logging.getLogger(__name__)

# Nomad's own default wait; it caps a wait at 10 minutes and adds up to wait/16 of jitter to
# spread the wake-ups, which the request timeout must allow for.
DEFAULT_WAIT = 300.0
_MAX_WAIT = 600.0
_JITTER_FRACTION = 16

DEFAULT_NODE_POOL = "default"
_POOL_ALL = "all"
_DRIVERS = frozenset({"docker", "containerd-driver", "podman"})
# Podman transports that read an image from somewhere other than a registry.
_PODMAN_LOCAL = (
    "containers-storage:",
    "dir:",
    "docker-archive:",
    "docker-daemon:",
    "oci:",
    "oci-archive:",
)

JobKey = tuple[str, str]  # (namespace, job ID)


@dataclass(frozen=True, slots=True)
class _Job:
    """What is kept per job: the ModifyIndex it was judged at, and its images (maybe none)."""

    modify_index: int
    images: frozenset[ImageRef]


class NomadWorkloads:
    """The images of the Nomad jobs that can place on this node (see the module docstring).

    ``settings`` are the bootstrap's (address, token, region, TLS; ``settings.namespace`` is
    not used: the node runs jobs of every namespace, so ``namespace`` defaults to ``*``).
    ``datacenter`` and ``node_pool`` are the node's own, as its Nomad client is configured.
    """

    def __init__(
        self,
        settings: NomadSettings,
        *,
        datacenter: str,
        node_pool: str = DEFAULT_NODE_POOL,
        namespace: str = "*",
        wait: float = DEFAULT_WAIT,
        timeout: float = REQUEST_TIMEOUT,
        backoff: Backoff | None = None,
    ) -> None:
        if not datacenter or not node_pool:
            raise ConfigError("a Nomad watch needs the node's datacenter and node pool")
        if node_pool == _POOL_ALL:
            raise ConfigError("node pool 'all' is for jobs only: a node is never in it")
        if not 0 < wait <= _MAX_WAIT:
            raise ConfigError(f"a blocking query waits 0 to {_MAX_WAIT:g} seconds, not {wait:g}")
        self.settings = settings
        self.datacenter = datacenter
        self.node_pool = node_pool
        self.namespace = namespace
        self.wait = wait
        self.timeout = timeout
        self.backoff = backoff or Backoff()

    def __str__(self) -> str:
        return f"nomad jobs for {self.datacenter}/{self.node_pool}"

    async def images(self) -> AsyncIterator[frozenset[ImageRef]]:
        retry = Retry(f"prefetch watch ({self})", log, self.backoff)
        once = Once()
        jobs: dict[JobKey, _Job] = {}
        index = 0
        shown: frozenset[ImageRef] | None = None
        blocking = self.wait + self.wait / _JITTER_FRACTION + self.timeout
        socket_path = self.settings.socket_path
        async with (
            open_session(blocking, socket_path=socket_path) as listing,
            open_session(self.timeout, socket_path=socket_path) as reading,
        ):
            while True:
                try:
                    stubs, answered = await self._list(listing, index)
                except LookupFailed as exc:
                    await retry.failed(failure_kind(exc), f"listing jobs failed: {exc}{_hint(exc)}")
                    continue
                failure = await self._refresh(reading, jobs, stubs, once)
                if failure is None:
                    retry.succeeded()
                    index = answered
                current = union(job.images for job in jobs.values())
                if current != shown:
                    shown = current
                    yield current
                if failure is not None:
                    # The index stays, so the next list answers at once and the job is read
                    # again; until then its last known images stand.
                    message = f"reading a job failed: {failure}{_hint(failure)}"
                    await retry.failed(f"read {failure_kind(failure)}", message)

    async def _list(self, session: aiohttp.ClientSession, index: int) -> tuple[list[Any], int]:
        """The job stubs and the index they are current at; blocks while ``index`` is current."""
        params = self._params()
        params["namespace"] = self.namespace
        if index:
            params["index"] = str(index)
            params["wait"] = f"{round(self.wait * 1000)}ms"
        body, headers = await get_json(
            session,
            self.settings.address.with_path("/v1/jobs"),
            params=params,
            headers=self._headers(),
            ssl_context=self.settings.ssl_context,
            server_hostname=self.settings.tls_server_name,
            socket_path=self.settings.socket_path,
        )
        if body is None:
            body = []  # Go encodes an empty list as null
        if not isinstance(body, list):
            raise LookupFailed("unexpected response: not a JSON list of jobs")
        text = headers.get("X-Nomad-Index", "")
        if not (text.isascii() and text.isdigit()):
            raise LookupFailed(f"unexpected response: X-Nomad-Index {text!r} is not an index")
        # Never 0 again: index 0 does not block, so a server answering 0 would be polled hot.
        return body, max(int(text), 1)

    async def _refresh(
        self,
        session: aiohttp.ClientSession,
        jobs: dict[JobKey, _Job],
        stubs: list[Any],
        once: Once,
    ) -> LookupFailed | None:
        """Bring ``jobs`` up to ``stubs``; the first failed read, or None if all were read.

        A read the server could not answer (no answer, 5xx) ends the pass: the next reads
        would fail alike. One it refused (a token without read-job in that namespace) does
        not, so one unreadable job cannot keep every job after it out.
        """
        listed: dict[JobKey, dict[str, Any]] = {}
        for stub in stubs:
            key = _stub_key(stub)
            if key is None:
                if once.first("malformed stub"):
                    log.warning("prefetch watch (%s): skipped a malformed job stub", self)
                continue
            listed[key] = stub
        for gone in jobs.keys() - listed.keys():
            del jobs[gone]
        failure: LookupFailed | None = None
        for key, stub in listed.items():
            modify_index = stub["ModifyIndex"]
            known = jobs.get(key)
            if known is not None and known.modify_index == modify_index:
                continue
            if not self._may_place(stub):
                jobs[key] = _Job(modify_index, frozenset())
                continue
            try:
                job = await self._read(session, key)
            except LookupFailed as exc:
                if exc.status == 404:  # deleted since the list; the next list agrees
                    jobs.pop(key, None)
                    continue
                if exc.status is None or exc.status >= 500:
                    return exc
                failure = failure or exc
                continue
            placed = self._may_place(job)
            jobs[key] = _Job(modify_index, _job_images(key, job, once) if placed else frozenset())
        return failure

    async def _read(self, session: aiohttp.ClientSession, key: JobKey) -> dict[str, Any]:
        namespace, job_id = key
        params = self._params()
        params["namespace"] = namespace
        url = self.settings.address.with_path(f"/v1/job/{quote(job_id, safe='')}", encoded=True)
        body, _ = await get_json(
            session,
            url,
            params=params,
            headers=self._headers(),
            ssl_context=self.settings.ssl_context,
            server_hostname=self.settings.tls_server_name,
            socket_path=self.settings.socket_path,
        )
        if not isinstance(body, dict):
            raise LookupFailed(f"unexpected response for job {namespace}/{job_id}: not an object")
        return body

    def _may_place(self, job: dict[str, Any]) -> bool:
        """Whether a job (stub or whole) can place on this node, as the module docstring says."""
        if job.get("ParentID") or job.get("Stop") is True or job.get("Status") == "dead":
            return False
        datacenters = [dc for dc in _items(job.get("Datacenters")) if isinstance(dc, str)]
        if datacenters and not any(_glob(dc, self.datacenter) for dc in datacenters):
            return False
        pool = job.get("NodePool") or DEFAULT_NODE_POOL
        return pool in (_POOL_ALL, self.node_pool)

    def _params(self) -> dict[str, str]:
        return {"region": self.settings.region} if self.settings.region else {}

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.settings.token:
            headers["X-Nomad-Token"] = self.settings.token
        return headers


def _job_images(key: JobKey, job: dict[str, Any], once: Once) -> frozenset[ImageRef]:
    images = Images(f"nomad job {key[0]}/{key[1]}", log, once)
    for task in _tasks(job):
        driver, config = task.get("Driver"), task.get("Config")
        if driver not in _DRIVERS or not isinstance(config, dict):
            continue
        text = config.get("image")
        if not isinstance(text, str) or not text:
            continue
        image = text
        if driver == "docker":
            if config.get("load"):
                continue  # loaded from an artifact, not pulled: no registry has it
            image = image.removeprefix("https://")
        elif driver == "podman":
            if image.startswith(_PODMAN_LOCAL):
                images.skip(text, "a podman transport that does not pull from a registry")
                continue
            image = image.removeprefix("docker://")
        if "${" in image:
            images.skip(text, "Nomad interpolation, resolved on the client only at task start")
            continue
        images.add(image)
    return images.result()


def _tasks(job: dict[str, Any]) -> Iterable[dict[str, Any]]:
    for group in _items(job.get("TaskGroups")):
        if isinstance(group, dict):
            yield from (task for task in _items(group.get("Tasks")) if isinstance(task, dict))


def _stub_key(stub: object) -> JobKey | None:
    """(namespace, ID) of a well-formed stub (one with an ID and an integer ModifyIndex)."""
    if not isinstance(stub, dict):
        return None
    job_id, modify_index = stub.get("ID"), stub.get("ModifyIndex")
    namespace = stub.get("Namespace") or "default"
    if not isinstance(job_id, str) or not job_id or not isinstance(namespace, str):
        return None
    if not isinstance(modify_index, int) or isinstance(modify_index, bool):
        return None
    return namespace, job_id


@functools.lru_cache(maxsize=256)
def _glob_pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


def _glob(pattern: str, subject: str) -> bool:
    """Nomad's datacenter match (go-glob): ``*`` is any run of characters, nothing else."""
    return _glob_pattern(pattern).fullmatch(subject) is not None


def _hint(exc: LookupFailed) -> str:
    if exc.status == 403:
        return " (the token needs list-jobs and read-job in the namespaces to watch)"
    return ""


def _items(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
