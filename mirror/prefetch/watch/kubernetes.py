"""``KubernetesWorkloads``: the images of the workloads that can run on this node.

What it follows: Deployments, DaemonSets and StatefulSets (``apps/v1``) and CronJobs
(``batch/v1``), in every namespace or in one. Pods are not watched: a workload's pod
template names its images before any pod exists, which is the point of prefetching, and a
template changes far less often than pods come and go.

How, per kind, as client-go's reflector does: a list (paged with ``limit``/``continue``)
gives the objects and the list's ``resourceVersion``; a watch from there (``watch=1``,
``allowWatchBookmarks=true``) streams ADDED, MODIFIED and DELETED events, one JSON object a
line. Every event and every BOOKMARK moves the resourceVersion on, so when the server ends a
watch (after ``timeoutSeconds``) or the connection drops, the next watch starts where the
last one stopped and nothing is listed again. Only when the server no longer has that
resourceVersion (HTTP 410 Gone, or an ERROR event with code 410), or the stream carried
something that is not an event, may events have been lost: the kind is then listed again and
its workloads replaced whole, which also drops those deleted in between.

Which workloads count: those whose pod template's ``nodeSelector`` the node's labels
satisfy. Node affinity, taints and tolerations are not evaluated (affinity needs the
scheduler's view, taints need the Node object): a workload they keep elsewhere costs a
prefetched image nobody runs here, while a miss costs a pull at the worst moment. A
Deployment scaled to 0 and a suspended CronJob count too: they are one scale-up or resume
away from running.

Images: ``containers`` and ``initContainers`` of the pod template (a CronJob's is
``spec.jobTemplate.spec.template``).

Access: the bootstrap's in-cluster settings (API address, the service-account token read
again for every request because it rotates, the cluster CA). The service account needs
``list`` and ``watch`` on the four resources, cluster-wide or in ``namespace``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from mirror.bodies import read_capped
from mirror.errors import BodyTooLarge, ConfigError
from mirror.prefetch.model import ImageRef
from mirror.prefetch.watch.base import Backoff, Images, Once, Retry, failure_kind, union
from mirror.routing.bootstrap.http import (
    CONNECT_TIMEOUT,
    MAX_PAGES,
    MAX_RESPONSE_BYTES,
    REQUEST_TIMEOUT,
    LookupFailed,
    describe,
    error_detail,
    get_json,
    open_session,
)
from mirror.routing.bootstrap.kubernetes import (
    KUBERNETES_PAGE_SIZE,
    KubernetesSettings,
    object_list,
    read_token,
)

log = logging.getLogger(__name__)

# How long the server keeps one watch open (client-go picks 5 to 10 minutes). A watch that
# ends is taken up again from its resourceVersion, so this only bounds a silent dead stream.
DEFAULT_WATCH_TIMEOUT = 300
# One event is one object; etcd refuses objects over 1.5 MiB, so this is never reached by a
# real server and bounds what a broken one can make the node hold.
MAX_EVENT_BYTES = MAX_RESPONSE_BYTES
# A watch that ends at once with nothing in it is a failure (retried with backoff), not a
# server's timeoutSeconds: re-watching at once would poll the server hot.
_EARLY_END = 1.0
_ERROR_BODY_BYTES = 64 * 1024
_NAMESPACE_RE = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1123 label

WorkloadKey = tuple[str, str]  # (namespace, name)


class WatchExpired(Exception):
    """The server no longer has the resourceVersion (410): events were lost; list again."""


class WatchBroken(LookupFailed):
    """The stream carried something that is not a watch event: what follows cannot be
    trusted, so the kind is listed again (after the backoff, in case it keeps happening)."""


@dataclass(frozen=True, slots=True)
class WorkloadKind:
    """A workload resource and where its pod template sits in an object."""

    plural: str
    group_version: str
    singular: str
    template: tuple[str, ...]


KINDS = (
    WorkloadKind("deployments", "apps/v1", "deployment", ("spec", "template")),
    WorkloadKind("daemonsets", "apps/v1", "daemonset", ("spec", "template")),
    WorkloadKind("statefulsets", "apps/v1", "statefulset", ("spec", "template")),
    WorkloadKind("cronjobs", "batch/v1", "cronjob", ("spec", "jobTemplate", "spec", "template")),
)


@dataclass(slots=True)
class _KindState:
    """One kind's workloads that count (their images), and whether it was tried and listed."""

    workloads: dict[WorkloadKey, frozenset[ImageRef]] = field(default_factory=dict)
    attempted: bool = False
    listed: bool = False


@dataclass(slots=True)
class _Cursor:
    """Where one kind's watch stands: the last resourceVersion seen, and, since the list that
    started it, how many watches were opened and how many events they carried."""

    version: str
    watches: int = 0
    events: int = 0


class KubernetesWorkloads:
    """The images of the workloads whose pod templates can run on this node.

    ``settings`` are the in-cluster settings (``in_cluster_settings``); ``node_labels`` are
    this node's labels, for ``nodeSelector``; ``namespace`` limits the watch to one
    namespace (None: all of them).
    """

    def __init__(
        self,
        settings: KubernetesSettings,
        node_labels: Mapping[str, str],
        *,
        namespace: str | None = None,
        page_size: int = KUBERNETES_PAGE_SIZE,
        timeout: float = REQUEST_TIMEOUT,
        watch_timeout: int = DEFAULT_WATCH_TIMEOUT,
        backoff: Backoff | None = None,
    ) -> None:
        if namespace is not None and not _NAMESPACE_RE.fullmatch(namespace):
            raise ConfigError(f"{namespace!r} is not a valid namespace (lower-case RFC 1123 label)")
        self.settings = settings
        self.node_labels = dict(node_labels)
        self.namespace = namespace
        self.page_size = page_size
        self.timeout = timeout
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff()

    def __str__(self) -> str:
        return f"kubernetes workloads in {self.namespace or 'all namespaces'}"

    async def images(self) -> AsyncIterator[frozenset[ImageRef]]:
        """See ``WorkloadWatch``: the first set once every kind was tried and one listed."""
        states = {kind.plural: _KindState() for kind in KINDS}
        changed = asyncio.Event()
        once = Once()
        async with open_session(self.timeout) as session:
            tasks = [
                asyncio.create_task(
                    self._follow(session, kind, states[kind.plural], changed, once),
                    name=f"prefetch watch kubernetes {kind.plural}",
                )
                for kind in KINDS
            ]
            for task in tasks:
                task.add_done_callback(lambda _: changed.set())
            try:
                shown: frozenset[ImageRef] | None = None
                while True:
                    await changed.wait()
                    changed.clear()
                    for task in tasks:
                        if task.done():
                            task.result()  # a bug surfaces here rather than a silent stop
                    if not all(state.attempted for state in states.values()):
                        continue
                    if not any(state.listed for state in states.values()):
                        continue
                    current = union(
                        images for state in states.values() for images in state.workloads.values()
                    )
                    if current != shown:
                        shown = current
                        yield current
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(
        self,
        session: aiohttp.ClientSession,
        kind: WorkloadKind,
        state: _KindState,
        changed: asyncio.Event,
        once: Once,
    ) -> None:
        """List, then watch from the list's resourceVersion; forever, never raising."""
        retry = Retry(f"prefetch watch (kubernetes {kind.plural})", log, self.backoff)
        cursor: _Cursor | None = None
        while True:
            if cursor is None:
                try:
                    state.workloads, version = await self._list(session, kind, once)
                except LookupFailed as exc:
                    state.attempted = True
                    changed.set()
                    message = f"listing failed: {exc}{self._hint(exc, kind)}"
                    await retry.failed(failure_kind(exc), message)
                    continue
                state.attempted = state.listed = True
                changed.set()
                retry.succeeded()
                cursor = _Cursor(version)
            started, events = time.monotonic(), cursor.events
            cursor.watches += 1
            try:
                await self._watch(session, kind, state, cursor, changed, once)
            except WatchExpired as exc:
                if cursor.watches == 1 and cursor.events == 0:
                    # The version of a list just made is already gone: listing again at once
                    # could go on forever, so this waits like any failure.
                    message = f"the version of a fresh list expired at once: {exc}"
                    await retry.failed("expired", message)
                else:
                    log.info("prefetch watch (kubernetes %s): %s; listing again", kind.plural, exc)
                cursor = None
                continue
            except WatchBroken as exc:
                cursor = None
                await retry.failed(failure_kind(exc), f"watch failed: {exc}; listing again")
                continue
            except LookupFailed as exc:
                message = f"watch failed: {exc}{self._hint(exc, kind)}"
                await retry.failed(failure_kind(exc), message)
                continue
            if cursor.events > events:
                retry.succeeded()
            elif time.monotonic() - started < _EARLY_END:
                await retry.failed("ended at once", "the watch ended at once, with no event")

    async def _list(
        self, session: aiohttp.ClientSession, kind: WorkloadKind, once: Once
    ) -> tuple[dict[WorkloadKey, frozenset[ImageRef]], str]:
        """The kind's workloads that count, and the resourceVersion to watch from."""
        workloads: dict[WorkloadKey, frozenset[ImageRef]] = {}
        continue_token = ""
        for _ in range(MAX_PAGES):
            params = {"limit": str(self.page_size)}
            if continue_token:
                params["continue"] = continue_token
            body, _ = await get_json(
                session,
                self._url(kind),
                params=params,
                headers=self._headers(),
                ssl_context=self.settings.ssl_context,
            )
            items, continue_token, version = object_list(body)
            for item in items:
                key = _key(item)
                images = None if key is None else self._images(kind, key, item, once)
                if key is not None and images is not None:
                    workloads[key] = images
            if not continue_token:
                if not version:
                    raise LookupFailed("unexpected response: no metadata.resourceVersion")
                return workloads, version
        raise LookupFailed(f"over {MAX_PAGES} pages")

    async def _watch(
        self,
        session: aiohttp.ClientSession,
        kind: WorkloadKind,
        state: _KindState,
        cursor: _Cursor,
        changed: asyncio.Event,
        once: Once,
    ) -> None:
        """Apply one watch's events until the server ends it; failures as exceptions."""
        params = {
            "watch": "1",
            "resourceVersion": cursor.version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_timeout),
        }
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=min(CONNECT_TIMEOUT, self.timeout),
            sock_read=self.watch_timeout + self.timeout,
        )
        headers = self._headers()
        try:
            async with session.get(
                self._url(kind),
                params=params,
                headers=headers,
                ssl=self.settings.ssl_context,
                allow_redirects=False,
                timeout=timeout,
            ) as response:
                if response.status != 200:
                    body = await read_capped(response, _ERROR_BODY_BYTES)
                    detail = error_detail(body)
                    if response.status == 410:
                        raise WatchExpired(f"HTTP 410{detail}")
                    raise LookupFailed(f"HTTP {response.status}{detail}", status=response.status)
                buffer = bytearray()
                async for chunk in response.content.iter_any():
                    start = len(buffer)
                    buffer += chunk
                    end = buffer.find(b"\n", start)
                    while end >= 0:
                        line = bytes(buffer[:end])
                        del buffer[: end + 1]
                        if line.strip():
                            self._apply(kind, state, cursor, changed, line, once)
                        end = buffer.find(b"\n")
                    if len(buffer) > MAX_EVENT_BYTES:
                        raise WatchBroken(f"an event over {MAX_EVENT_BYTES} bytes")
                if buffer.strip():
                    self._apply(kind, state, cursor, changed, bytes(buffer), once)
        except BodyTooLarge:
            raise LookupFailed(f"HTTP error body over {_ERROR_BODY_BYTES} bytes") from None
        except TimeoutError:
            raise LookupFailed("timed out") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise LookupFailed(describe(exc)) from None

    def _apply(
        self,
        kind: WorkloadKind,
        state: _KindState,
        cursor: _Cursor,
        changed: asyncio.Event,
        line: bytes,
        once: Once,
    ) -> None:
        """One watch event into ``state``; the cursor moves on past it."""
        try:
            event = json.loads(line)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise WatchBroken(f"malformed event: {exc}") from None
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise WatchBroken("malformed event: not an object with an object")
        event_type, obj = event.get("type"), event["object"]
        if event_type == "ERROR":
            code, message = obj.get("code"), obj.get("message")
            if code == 410:
                raise WatchExpired(f"ERROR 410: {message}")
            status = code if isinstance(code, int) and not isinstance(code, bool) else None
            raise LookupFailed(f"ERROR event {code}: {message}", status=status)
        metadata = obj.get("metadata")
        version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        if not isinstance(version, str) or not version:
            raise WatchBroken(f"malformed {event_type} event: no metadata.resourceVersion")
        key = _key(obj)
        if event_type in ("ADDED", "MODIFIED") and key is not None:
            images = self._images(kind, key, obj, once)
            if images is None:
                if state.workloads.pop(key, None) is not None:
                    changed.set()
            elif state.workloads.get(key) != images:
                state.workloads[key] = images
                changed.set()
        elif event_type == "DELETED" and key is not None:
            if state.workloads.pop(key, None) is not None:
                changed.set()
        elif event_type not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
            raise WatchBroken(f"unknown event type {event_type!r}")
        cursor.version = version
        cursor.events += 1

    def _images(
        self, kind: WorkloadKind, key: WorkloadKey, obj: dict[str, Any], once: Once
    ) -> frozenset[ImageRef] | None:
        """The images of the workload's pod template; None when its nodeSelector rules us out."""
        pod_spec = _path(obj, (*kind.template, "spec"))
        selector = pod_spec.get("nodeSelector")
        if isinstance(selector, dict) and any(
            self.node_labels.get(label) != value for label, value in selector.items()
        ):
            return None
        images = Images(f"{kind.singular} {key[0]}/{key[1]}", log, once)
        for field_name in ("initContainers", "containers"):
            containers = pod_spec.get(field_name)
            for container in containers if isinstance(containers, list) else []:
                text = container.get("image") if isinstance(container, dict) else None
                if isinstance(text, str) and text:
                    images.add(text)
        return images.result()

    def _url(self, kind: WorkloadKind) -> URL:
        base = f"/apis/{kind.group_version}"
        if self.namespace:
            return self.settings.api.with_path(f"{base}/namespaces/{self.namespace}/{kind.plural}")
        return self.settings.api.with_path(f"{base}/{kind.plural}")

    def _headers(self) -> dict[str, str]:
        token = read_token(self.settings.token_path)
        return {"Authorization": f"Bearer {token}", "Accept": "application/json"}

    def _hint(self, exc: LookupFailed, kind: WorkloadKind) -> str:
        if exc.status == 401:
            return " (is the service-account token valid?)"
        if exc.status == 403:
            group = kind.group_version.partition("/")[0]
            where = f"in namespace {self.namespace}" if self.namespace else "cluster-wide"
            return f" (the service account needs list and watch on {kind.plural}.{group} {where})"
        return ""


def _key(obj: object) -> WorkloadKey | None:
    """(namespace, name) of an object; None for one without a name (nothing to key it by)."""
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str):
        return None
    namespace = metadata.get("namespace")
    return (namespace if isinstance(namespace, str) else "", metadata["name"])


def _path(obj: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """The object at ``path``, or an empty one where any step is missing or not an object."""
    current: dict[str, Any] = obj
    for step in path:
        value = current.get(step)
        if not isinstance(value, dict):
            return {}
        current = value
    return current


async def node_labels(
    settings: KubernetesSettings, node: str, *, timeout: float = 5.0
) -> dict[str, str]:
    """The labels of Kubernetes node `node` (`GET /api/v1/nodes/NAME`), which workloads'
    `nodeSelector`s and pins' `nodes` tables match; `LookupFailed` when they cannot be read.

    A pod cannot see its node's labels through the downward API, so the node asks the API
    server once at start (the chart grants `get` on nodes).
    """
    url = settings.api.with_path(f"/api/v1/nodes/{node}")
    token = read_token(settings.token_path)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    async with open_session(timeout) as session:
        body, _ = await get_json(
            session, url, params={}, headers=headers, ssl_context=settings.ssl_context
        )
    labels = _path(body, ("metadata",)).get("labels") if isinstance(body, dict) else None
    if not isinstance(labels, dict):
        return {}
    return {str(key): str(value) for key, value in labels.items() if isinstance(value, str)}
