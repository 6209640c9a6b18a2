"""``kubernetes:NAMESPACE/SERVICE[:PORT]``: the ready endpoints of a Service, from the API.

``dns:`` covers a headless Service too, but the API needs no cluster DNS, and EndpointSlices
say which pods are ready, so a node is not handed peers that are still starting or already
terminating. The EndpointSlices are listed through the pod's service account.

Settings come from what Kubernetes puts into every pod, not from flags: the API server's
address (``KUBERNETES_SERVICE_HOST``/``_PORT``, handed over by mirror.cli as a
``KubernetesEnv``) and the service-account token and CA files. They are checked when the
spec is parsed, so a pod without a service account stops ``mirror run`` with a one-line
ConfigError instead of logging a warning at every refresh. Only the token file is read
again on every lookup, because projected tokens rotate. The prefetch Kubernetes watch reaches
the API the same way (``in_cluster_settings``, ``read_token``).

Ports: the API describes the workload's registry (HTTP) side, while the DHT speaks UDP on
the router port. So the port of every address is the spec's PORT or, without one, the
router port of this node (``default_port``: a DaemonSet runs every node with the same
flags). PORT may also be a port *name*: each EndpointSlice's UDP port of that name is used,
so a Service that declares ``{name: router, protocol: UDP}`` can carry the number. It is
never picked implicitly, so a port in the Service cannot silently override the flag.

Like every source, it logs a failed lookup and returns what it has (usually ``[]``); the
Rebootstrapper asks again later.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yarl import URL

from mirror.errors import ConfigError
from mirror.ports import port_number
from mirror.routing.bootstrap.base import (
    BootstrapSource,
    BootstrapSpec,
    Peer,
    ip_or_none,
    ordered,
    parse_port,
    valid_port_number,
)
from mirror.routing.bootstrap.env import KubernetesEnv
from mirror.routing.bootstrap.http import (
    MAX_PAGES,
    REQUEST_TIMEOUT,
    LookupFailed,
    describe,
    get_json,
    open_session,
)

log = logging.getLogger(__name__)

# kubectl's chunk size: small enough for the API server, large enough for one request.
KUBERNETES_PAGE_SIZE = 500

_NAMESPACE_RE = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1123 label
_SERVICE_RE = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1035 label
_PORT_NAME_RE = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,13}[a-z0-9])?")  # IANA service name
_HOST_RE = re.compile(r"[A-Za-z0-9_](?:[-A-Za-z0-9_.]{0,251}[A-Za-z0-9_])?")


class KubernetesBootstrap(BootstrapSource):
    """The ready endpoints of one Service, from its EndpointSlices, over the API server.

    ``port`` is an ``int`` used for every address, or the name of the UDP port each
    EndpointSlice must declare (see the module docstring). Only the first address of an
    endpoint is used: the API leaves further ones without meaning, and kube-proxy ignores
    them too. FQDN slices are skipped because the DHT keys contacts by IP.
    """

    def __init__(
        self,
        namespace: str,
        service: str,
        port: int | str,
        *,
        api: URL,
        token_path: Path,
        ssl_context: ssl.SSLContext,
        page_size: int = KUBERNETES_PAGE_SIZE,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.namespace = namespace
        self.service = service
        self.port = port
        self.api = api
        self.token_path = token_path
        self.ssl_context = ssl_context
        self.page_size = page_size
        self.timeout = timeout

    def __str__(self) -> str:
        return f"kubernetes:{self.namespace}/{self.service}:{self.port}"

    @property
    def url(self) -> URL:
        path = f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices"
        return self.api.with_path(path)

    async def addresses(self) -> list[Peer]:
        try:
            token = read_token(self.token_path)
        except LookupFailed as exc:
            log.warning("bootstrap %s: %s", self, exc)
            return []
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        peers: list[Peer] = []
        problems: set[str] = set()
        slices = 0
        continue_token = ""
        async with open_session(self.timeout) as session:
            for _ in range(MAX_PAGES):
                params = {
                    "labelSelector": f"kubernetes.io/service-name={self.service}",
                    "limit": str(self.page_size),
                }
                if continue_token:
                    params["continue"] = continue_token
                try:
                    body, _ = await get_json(
                        session,
                        self.url,
                        params=params,
                        headers=headers,
                        ssl_context=self.ssl_context,
                    )
                    items, continue_token, _ = object_list(body)
                except LookupFailed as exc:
                    self._warn_failure(exc, peers)
                    return ordered(peers)
                slices += len(items)
                for item in items:
                    peers.extend(self._slice_peers(item, problems))
                if not continue_token:
                    break
            else:
                log.warning("bootstrap %s: over %d pages; using those read", self, MAX_PAGES)
        if problems:
            log.warning("bootstrap %s: skipped: %s", self, "; ".join(sorted(problems)))
        if slices == 0:
            log.warning(
                "bootstrap %s: no EndpointSlices for service %s in namespace %s "
                "(does the Service exist?)",
                self,
                self.service,
                self.namespace,
            )
        elif not peers:
            log.info("bootstrap %s: no ready endpoints", self)
        return ordered(peers)

    def _slice_peers(self, item: object, problems: set[str]) -> list[Peer]:
        if not isinstance(item, dict):
            problems.add("a list item that is not an object")
            return []
        address_type = item.get("addressType")
        if address_type not in ("IPv4", "IPv6"):
            return []  # FQDN: no IP to contact
        port = self._slice_port(item)
        if port is None:
            problems.add(f"EndpointSlices without a UDP port named {self.port!r}")
            return []
        version = 4 if address_type == "IPv4" else 6
        peers = []
        for endpoint in _list_or_empty(item.get("endpoints")):
            if not isinstance(endpoint, dict):
                continue
            conditions = endpoint.get("conditions")
            if isinstance(conditions, dict) and conditions.get("ready") is False:
                continue  # absent or null means ready, says the API
            addresses = _list_or_empty(endpoint.get("addresses"))
            if not addresses:
                continue
            ip = ip_or_none(addresses[0])
            if ip is None or ip.version != version:
                problems.add(f"{addresses[0]!r} is not an {address_type} address")
                continue
            peers.append((str(ip), port))
        return peers

    def _slice_port(self, item: dict[str, Any]) -> int | None:
        if isinstance(self.port, int):
            return self.port
        for entry in _list_or_empty(item.get("ports")):
            if (
                isinstance(entry, dict)
                and entry.get("name") == self.port
                and (entry.get("protocol") or "TCP") == "UDP"  # TCP when unset, per the API
                and valid_port_number(entry.get("port"))
            ):
                return int(entry["port"])
        return None

    def _warn_failure(self, exc: LookupFailed, peers: list[Peer]) -> None:
        hint = {
            401: " (is the service-account token valid?)",
            403: " (the service account needs 'list' on endpointslices.discovery.k8s.io "
            f"in namespace {self.namespace})",
            410: " (the continue token expired; the next refresh starts over)",
        }.get(exc.status or 0, "")
        kept = f"; using the {len(peers)} addresses of earlier pages" if peers else ""
        log.warning("bootstrap %s: listing EndpointSlices failed: %s%s%s", self, exc, hint, kept)


def kubernetes_factory(spec: BootstrapSpec) -> KubernetesBootstrap:
    """Build a ``kubernetes:NAMESPACE/SERVICE[:PORT|:PORTNAME]`` source from ``spec.env``."""
    namespace, service, port = _parse_kubernetes_value(spec)
    settings = in_cluster_settings(spec.env.kubernetes, spec.error)
    return KubernetesBootstrap(
        namespace,
        service,
        port,
        api=settings.api,
        token_path=settings.token_path,
        ssl_context=settings.ssl_context,
    )


@dataclass(frozen=True, slots=True)
class KubernetesSettings:
    """How a pod reaches its API server: the URL, the token file and the CA, checked.

    The token is a path, not a value: projected tokens rotate, so every request reads it
    again (``read_token``).
    """

    api: URL
    token_path: Path
    ssl_context: ssl.SSLContext


def in_cluster_settings(
    env: KubernetesEnv, error: Callable[[str], ConfigError]
) -> KubernetesSettings:
    """Check what Kubernetes put into the pod; ``error(problem)`` builds the ConfigError raised.

    ``error`` names the flag that asked for the API (``BootstrapSpec.error`` for
    ``--bootstrap``). The token is read once here only to fail early when the pod has none
    (``automountServiceAccountToken: false``).
    """
    api = URL.build(
        scheme="https",
        host=_api_host(error, "KUBERNETES_SERVICE_HOST", env.service_host),
        port=_api_port(error, "KUBERNETES_SERVICE_PORT", env.service_port),
    )
    token_path = env.service_account_dir / "token"
    try:
        read_token(token_path)
    except LookupFailed as exc:
        raise error(f"{exc} (kubernetes: needs the pod's service-account token)") from None
    ca_path = env.service_account_dir / "ca.crt"
    try:
        ssl_context = ssl.create_default_context(cafile=str(ca_path))
    except OSError as exc:  # ssl.SSLError included
        raise error(f"cannot load CA certificate {ca_path}: {describe(exc)}") from None
    return KubernetesSettings(api, token_path, ssl_context)


def _parse_kubernetes_value(spec: BootstrapSpec) -> tuple[str, str, int | str]:
    usage = "expected kubernetes:NAMESPACE/SERVICE[:PORT]"
    target, separator, port_text = spec.value.partition(":")
    namespace, slash, service = target.partition("/")
    if not slash or not namespace or not service or ":" in port_text:
        raise spec.error(usage)
    if "/" in service:
        raise spec.error(f"{target!r}: {usage}")
    if not _NAMESPACE_RE.fullmatch(namespace):
        raise spec.error(f"{namespace!r} is not a valid namespace (lower-case RFC 1123 label)")
    if not _SERVICE_RE.fullmatch(service):
        raise spec.error(f"{service!r} is not a valid Service name (lower-case RFC 1035 label)")
    if not separator:
        return namespace, service, spec.default_port
    if port_text.isascii() and port_text.isdigit():
        return namespace, service, parse_port(spec, port_text)
    if (
        not _PORT_NAME_RE.fullmatch(port_text)
        or "--" in port_text
        or not any("a" <= c <= "z" for c in port_text)
    ):
        raise spec.error(f"port {port_text!r} is neither a number nor a valid port name")
    return namespace, service, port_text


def _api_host(error: Callable[[str], ConfigError], name: str, value: str | None) -> str:
    if not value:
        raise error(f"{name} is not set: kubernetes: works inside a pod only")
    if ip_or_none(value) is None and not _HOST_RE.fullmatch(value):
        raise error(f"{name} {value!r} is not a host name or IP address")
    return value


def _api_port(error: Callable[[str], ConfigError], name: str, value: str | None) -> int:
    if not value:
        raise error(f"{name} is not set: kubernetes: works inside a pod only")
    port = port_number(value)
    if port is None:
        raise error(f"{name} {value!r} is not a port number")
    return port


def object_list(body: object) -> tuple[list[Any], str, str]:
    """Items, continue token and resourceVersion of a Kubernetes list (EndpointSlices here,
    workloads in prefetch/watch/kubernetes.py); LookupFailed if the body is not one."""
    if not isinstance(body, dict):
        raise LookupFailed("unexpected response: not a JSON object")
    items = body.get("items")
    if items is None:
        items = []  # Go encodes an empty list as null
    if not isinstance(items, list):
        raise LookupFailed("unexpected response: 'items' is not a list")
    metadata = body.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    token, version = metadata.get("continue"), metadata.get("resourceVersion")
    return (
        items,
        token if isinstance(token, str) else "",
        version if isinstance(version, str) else "",
    )


def read_token(path: Path) -> str:
    """The service-account token, read now (it rotates); LookupFailed if it is unusable."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise LookupFailed(f"cannot read token {path}: {describe(exc)}") from None
    if not token:
        raise LookupFailed(f"token file {path} is empty")
    if not token.isprintable():
        raise LookupFailed(f"token file {path} holds characters a header cannot carry")
    return token


def _list_or_empty(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
