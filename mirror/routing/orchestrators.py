"""Bootstrap sources that ask an orchestrator's API for peers: Kubernetes and Nomad.

``kubernetes:NAMESPACE/SERVICE[:PORT]`` lists the EndpointSlices of a Service through the
pod's service account; ``nomad:SERVICE[:PORT]`` reads Nomad's native service
registrations. ``dns:`` covers a headless Service too, but the APIs need no cluster DNS
(Nomad's native services have none at all), and EndpointSlices say which pods are ready,
so a node is not handed peers that are still starting or already terminating.

Settings come from what the orchestrator puts into a workload, not from flags: the
in-cluster service account (``KUBERNETES_SERVICE_HOST``/``_PORT``, token and CA files) and
the ``NOMAD_*`` variables the ``nomad`` CLI reads. They are read and checked when the spec
is parsed, so a pod without a service account or a malformed ``NOMAD_ADDR`` stops ``mirror
run`` with a one-line ConfigError instead of logging a warning at every refresh. Only the
Kubernetes token file is read again on every lookup, because projected tokens rotate.

Ports: both APIs describe the workload's registry (HTTP) side, while the DHT speaks UDP on
the router port. So the port of every address is the spec's PORT or, without one, the
router port of this node (``default_port``: a DaemonSet or system job runs every node with
the same flags). For Kubernetes, PORT may also be a port *name*: each EndpointSlice's UDP
port of that name is used, so a Service that declares ``{name: router, protocol: UDP}``
can carry the number. It is never picked implicitly, so a port in the Service cannot
silently override the flag. A Nomad registration has a single ``Port``, the registered
service's (usually the registry's HTTP port), so it is ignored.

Like every source, these log a failed lookup and return what they have (usually ``[]``);
the Rebootstrapper asks again later.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

# Only names that bootstrap.py defines above its kind registrations: that module imports
# this one from there, and either may be imported first.
from mirror.routing.bootstrap import BootstrapSource, BootstrapSpec, Peer

log = logging.getLogger(__name__)

# A request slower than this counts as failed. The API servers are cluster-local, and a
# refresh comes soon enough that waiting longer would only delay a node's start.
REQUEST_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
# A server that keeps handing out continue tokens (a bug, or a huge cluster) is not
# followed forever; the pages read so far are used.
MAX_PAGES = 100
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
# kubectl's chunk size: small enough for the API server, large enough for one request.
KUBERNETES_PAGE_SIZE = 500

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
NOMAD_DEFAULT_ADDR = "http://127.0.0.1:4646"

_NAMESPACE_RE = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1123 label
_SERVICE_RE = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1035 label
_PORT_NAME_RE = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,13}[a-z0-9])?")  # IANA service name
_NOMAD_SERVICE_RE = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?")
_HOST_RE = re.compile(r"[A-Za-z0-9_](?:[-A-Za-z0-9_.]{0,251}[A-Za-z0-9_])?")
# strconv.ParseBool, which the nomad CLI uses for NOMAD_SKIP_VERIFY.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


class _LookupFailed(Exception):
    """A request that gave no usable answer; the text goes into one warning line."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# --- Kubernetes ----------------------------------------------------------------------------


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
            token = _read_token(self.token_path)
        except _LookupFailed as exc:
            log.warning("bootstrap %s: %s", self, exc)
            return []
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        peers: list[Peer] = []
        problems: set[str] = set()
        slices = 0
        continue_token = ""
        async with _session(self.timeout) as session:
            for _ in range(MAX_PAGES):
                params = {
                    "labelSelector": f"kubernetes.io/service-name={self.service}",
                    "limit": str(self.page_size),
                }
                if continue_token:
                    params["continue"] = continue_token
                try:
                    body, _ = await _get_json(
                        session,
                        self.url,
                        params=params,
                        headers=headers,
                        ssl_context=self.ssl_context,
                    )
                    items, continue_token = _slice_list(body)
                except _LookupFailed as exc:
                    self._warn_failure(exc, peers)
                    return _ordered(peers)
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
        return _ordered(peers)

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
            ip = _ip_or_none(addresses[0])
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
                and _valid_port_number(entry.get("port"))
            ):
                return int(entry["port"])
        return None

    def _warn_failure(self, exc: _LookupFailed, peers: list[Peer]) -> None:
        hint = {
            401: " (is the service-account token valid?)",
            403: " (the service account needs 'list' on endpointslices.discovery.k8s.io "
            f"in namespace {self.namespace})",
            410: " (the continue token expired; the next refresh starts over)",
        }.get(exc.status or 0, "")
        kept = f"; using the {len(peers)} addresses of earlier pages" if peers else ""
        log.warning("bootstrap %s: listing EndpointSlices failed: %s%s%s", self, exc, hint, kept)


def kubernetes_factory(
    spec: BootstrapSpec,
    *,
    environ: Mapping[str, str] | None = None,
    service_account_dir: Path | None = None,
) -> KubernetesBootstrap:
    """Build a ``kubernetes:NAMESPACE/SERVICE[:PORT|:PORTNAME]`` source.

    ``environ`` and ``service_account_dir`` default to the process environment and the
    standard mount point; tests pass their own. The token is read once here only to fail
    early when the pod has none (``automountServiceAccountToken: false``).
    """
    environ = os.environ if environ is None else environ
    account = SERVICE_ACCOUNT_DIR if service_account_dir is None else service_account_dir
    namespace, service, port = _parse_kubernetes_value(spec)
    api = URL.build(
        scheme="https",
        host=_environ_host(spec, environ, "KUBERNETES_SERVICE_HOST"),
        port=_environ_port(spec, environ, "KUBERNETES_SERVICE_PORT"),
    )
    token_path = account / "token"
    try:
        _read_token(token_path)
    except _LookupFailed as exc:
        raise spec.error(f"{exc} (kubernetes: needs the pod's service-account token)") from None
    ca_path = account / "ca.crt"
    try:
        ssl_context = ssl.create_default_context(cafile=str(ca_path))
    except OSError as exc:  # ssl.SSLError included
        raise spec.error(f"cannot load CA certificate {ca_path}: {_describe(exc)}") from None
    return KubernetesBootstrap(
        namespace, service, port, api=api, token_path=token_path, ssl_context=ssl_context
    )


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
        return namespace, service, _port_number(spec, port_text)
    if (
        not _PORT_NAME_RE.fullmatch(port_text)
        or "--" in port_text
        or not any("a" <= c <= "z" for c in port_text)
    ):
        raise spec.error(f"port {port_text!r} is neither a number nor a valid port name")
    return namespace, service, port_text


def _slice_list(body: object) -> tuple[list[object], str]:
    """The items and continue token of an EndpointSliceList; _LookupFailed if it is not one."""
    if not isinstance(body, dict):
        raise _LookupFailed("unexpected response: not a JSON object")
    items = body.get("items")
    if items is None:
        items = []  # Go encodes an empty list as null
    if not isinstance(items, list):
        raise _LookupFailed("unexpected response: 'items' is not a list")
    metadata = body.get("metadata")
    token = metadata.get("continue") if isinstance(metadata, dict) else None
    return items, token if isinstance(token, str) else ""


def _read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise _LookupFailed(f"cannot read token {path}: {_describe(exc)}") from None
    if not token:
        raise _LookupFailed(f"token file {path} is empty")
    if not token.isprintable():
        raise _LookupFailed(f"token file {path} holds characters a header cannot carry")
    return token


# --- Nomad ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NomadSettings:
    """Where and how to reach the Nomad HTTP API, as the ``nomad`` CLI reads it from env.

    ``socket_path`` is set for a ``unix://`` address (the Task API socket, which always
    needs a token); ``address`` is then a placeholder for the request URL.
    """

    address: URL
    socket_path: str | None = None
    token: str | None = None
    namespace: str | None = None
    region: str | None = None
    ssl_context: ssl.SSLContext | None = None
    tls_server_name: str | None = None


class NomadBootstrap(BootstrapSource):
    """The addresses of one Nomad service's registrations, with the router port.

    Registrations whose address is not an IP (a service ``address`` set to a name) are
    skipped. ``page_size`` sets ``per_page``; without it Nomad answers in one piece, and an
    ``X-Nomad-NextToken`` is followed either way.
    """

    def __init__(
        self,
        service: str,
        port: int,
        settings: NomadSettings,
        *,
        page_size: int | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.service = service
        self.port = port
        self.settings = settings
        self.page_size = page_size
        self.timeout = timeout

    def __str__(self) -> str:
        return f"nomad:{self.service}:{self.port}"

    async def addresses(self) -> list[Peer]:
        settings = self.settings
        url = settings.address.with_path(f"/v1/service/{self.service}")
        headers = {"Accept": "application/json"}
        if settings.token:
            headers["X-Nomad-Token"] = settings.token
        peers: list[Peer] = []
        problems: set[str] = set()
        registrations = 0
        next_token = ""
        async with _session(self.timeout, socket_path=settings.socket_path) as session:
            for _ in range(MAX_PAGES):
                params = self._params(next_token)
                try:
                    body, response_headers = await _get_json(
                        session,
                        url,
                        params=params,
                        headers=headers,
                        ssl_context=settings.ssl_context,
                        server_hostname=settings.tls_server_name,
                        socket_path=settings.socket_path,
                    )
                    page = _registration_list(body)
                except _LookupFailed as exc:
                    self._warn_failure(exc, peers)
                    return _ordered(peers)
                registrations += len(page)
                peers.extend(self._registration_peers(page, problems))
                next_token = response_headers.get("X-Nomad-NextToken", "")
                if not next_token:
                    break
            else:
                log.warning("bootstrap %s: over %d pages; using those read", self, MAX_PAGES)
        if problems:
            log.warning("bootstrap %s: skipped: %s", self, "; ".join(sorted(problems)))
        if registrations == 0:
            log.warning(
                "bootstrap %s: no registrations of service %s (is the job running, and in "
                "namespace %s?)",
                self,
                self.service,
                settings.namespace or "default",
            )
        return _ordered(peers)

    def _warn_failure(self, exc: _LookupFailed, peers: list[Peer]) -> None:
        hint = " (the token needs read-job in the namespace)" if exc.status == 403 else ""
        kept = f"; using the {len(peers)} addresses of earlier pages" if peers else ""
        log.warning("bootstrap %s: reading the service failed: %s%s%s", self, exc, hint, kept)

    def _params(self, next_token: str) -> dict[str, str]:
        params = {}
        if self.settings.namespace:
            params["namespace"] = self.settings.namespace
        if self.settings.region:
            params["region"] = self.settings.region
        if self.page_size:
            params["per_page"] = str(self.page_size)
        if next_token:
            params["next_token"] = next_token
        return params

    def _registration_peers(self, page: list[object], problems: set[str]) -> list[Peer]:
        peers = []
        for registration in page:
            address = registration.get("Address") if isinstance(registration, dict) else None
            ip = _ip_or_none(address)
            if ip is None:
                problems.add(f"registration address {address!r} is not an IP address")
                continue
            peers.append((str(ip), self.port))
        return peers


def nomad_factory(
    spec: BootstrapSpec, *, environ: Mapping[str, str] | None = None
) -> NomadBootstrap:
    """Build a ``nomad:SERVICE[:PORT]`` source; ``environ`` defaults to the process's."""
    environ = os.environ if environ is None else environ
    service, separator, port_text = spec.value.partition(":")
    if not service or ":" in port_text:
        raise spec.error("expected nomad:SERVICE[:PORT]")
    if not _NOMAD_SERVICE_RE.fullmatch(service):
        raise spec.error(f"{service!r} is not a valid Nomad service name")
    port = _port_number(spec, port_text) if separator else spec.default_port
    return NomadBootstrap(service, port, nomad_settings(spec, environ))


def nomad_settings(spec: BootstrapSpec, environ: Mapping[str, str]) -> NomadSettings:
    """Read ``NOMAD_ADDR``, ``NOMAD_TOKEN``, namespace, region and TLS variables; check them."""
    text = environ.get("NOMAD_ADDR") or NOMAD_DEFAULT_ADDR
    token = environ.get("NOMAD_TOKEN") or None
    if token is not None and not token.isprintable():
        raise spec.error("NOMAD_TOKEN holds characters a header cannot carry")
    namespace = environ.get("NOMAD_NAMESPACE") or None
    region = environ.get("NOMAD_REGION") or None
    skip_verify = _environ_bool(spec, environ, "NOMAD_SKIP_VERIFY")
    if text.startswith("unix://"):
        socket_path = text.removeprefix("unix://")
        if not socket_path:
            raise spec.error(f"NOMAD_ADDR {text!r} names no socket path")
        if token is None:
            raise spec.error(
                f"NOMAD_ADDR {text!r} is the Task API, which always needs NOMAD_TOKEN "
                "(a workload identity: identity { env = true })"
            )
        placeholder = URL("http://localhost")
        return NomadSettings(placeholder, socket_path, token, namespace, region)
    try:
        url = URL(text)
    except ValueError as exc:
        raise spec.error(f"NOMAD_ADDR {text!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise spec.error(f"NOMAD_ADDR {text!r}: expected http://HOST:PORT, https://… or unix://…")
    ssl_context = _nomad_ssl_context(spec, environ, skip_verify) if url.scheme == "https" else None
    server_name = environ.get("NOMAD_TLS_SERVER_NAME") or None
    base = url.with_path("/").with_query(None).with_fragment(None)
    return NomadSettings(base, None, token, namespace, region, ssl_context, server_name)


def _nomad_ssl_context(
    spec: BootstrapSpec, environ: Mapping[str, str], skip_verify: bool
) -> ssl.SSLContext:
    """The client TLS context from NOMAD_CACERT/CAPATH, NOMAD_CLIENT_CERT/KEY, SKIP_VERIFY."""
    cafile = environ.get("NOMAD_CACERT") or None
    capath = None if cafile else environ.get("NOMAD_CAPATH") or None  # as the CLI: CACERT wins
    cert = environ.get("NOMAD_CLIENT_CERT") or None
    key = environ.get("NOMAD_CLIENT_KEY") or None
    if (cert is None) != (key is None):
        raise spec.error("NOMAD_CLIENT_CERT and NOMAD_CLIENT_KEY must be set together")
    try:
        context = ssl.create_default_context(cafile=cafile, capath=capath)
    except OSError as exc:
        raise spec.error(f"cannot load CA {cafile or capath}: {_describe(exc)}") from None
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(cert, key)
        except OSError as exc:
            raise spec.error(f"cannot load client certificate {cert}: {_describe(exc)}") from None
    if skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _registration_list(body: object) -> list[object]:
    if body is None:
        return []
    if not isinstance(body, list):
        raise _LookupFailed("unexpected response: not a JSON list of registrations")
    return body


# --- shared --------------------------------------------------------------------------------


def _session(timeout: float, *, socket_path: str | None = None) -> aiohttp.ClientSession:
    """A session for one lookup: lookups are seconds to minutes apart, so none is kept open.

    ``trust_env`` stays off: an HTTP(S)_PROXY meant for upstream registries must not carry
    cluster API requests, and their tokens, elsewhere.
    """
    connector = aiohttp.UnixConnector(path=socket_path) if socket_path else None
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout, connect=min(CONNECT_TIMEOUT, timeout)),
    )


async def _get_json(
    session: aiohttp.ClientSession,
    url: URL,
    *,
    params: Mapping[str, str],
    headers: Mapping[str, str],
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None = None,
    socket_path: str | None = None,
) -> tuple[Any, CIMultiDictProxy[str]]:
    """GET and decode JSON; any failure, HTTP status other than 200 included, as _LookupFailed.

    Redirects are not followed, so a token never travels to another host. ``socket_path``
    only names the Unix socket in messages (the session's connector uses it).
    """
    try:
        async with session.get(
            url,
            params=params,
            headers=headers,
            ssl=ssl_context if ssl_context is not None else True,
            server_hostname=server_hostname,
            allow_redirects=False,
        ) as response:
            body = await _read_capped(response)
            status, response_headers = response.status, response.headers
    except TimeoutError:
        raise _LookupFailed("timed out") from None
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise _LookupFailed(_describe(exc, socket_path=socket_path)) from None
    if status != 200:
        raise _LookupFailed(f"HTTP {status}{_error_detail(body)}", status=status)
    try:
        return json.loads(body), response_headers
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _LookupFailed(f"malformed JSON: {exc}") from None


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    chunks = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise _LookupFailed(f"response larger than {MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _error_detail(body: bytes) -> str:
    """``: message`` from a Kubernetes Status object or a plain-text error, on one line."""
    text = body.decode("utf-8", "replace")
    try:
        decoded = json.loads(text)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("message"), str):
        text = decoded["message"]
    text = " ".join(text.split())
    if len(text) > 200:
        text = text[:200] + "…"
    return f": {text}" if text else ""


def _environ_host(spec: BootstrapSpec, environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name, "")
    if not value:
        raise spec.error(f"{name} is not set: kubernetes: works inside a pod only")
    if _ip_or_none(value) is None and not _HOST_RE.fullmatch(value):
        raise spec.error(f"{name} {value!r} is not a host name or IP address")
    return value


def _environ_port(spec: BootstrapSpec, environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name, "")
    if not value:
        raise spec.error(f"{name} is not set: kubernetes: works inside a pod only")
    if not _valid_port_number(int(value) if value.isascii() and value.isdigit() else None):
        raise spec.error(f"{name} {value!r} is not a port number")
    return int(value)


def _environ_bool(spec: BootstrapSpec, environ: Mapping[str, str], name: str) -> bool:
    value = environ.get(name, "")
    if value in _TRUE:
        return True
    if not value or value in _FALSE:
        return False
    raise spec.error(f"{name} {value!r} is not a boolean (true or false)")


def _port_number(spec: BootstrapSpec, text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise spec.error(f"port {text!r} is not a number")
    port = int(text)
    if not _valid_port_number(port):
        raise spec.error(f"port {port} is out of range 1-65535")
    return port


def _valid_port_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _list_or_empty(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _ip_or_none(text: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(text, str):
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _ordered(peers: Iterable[Peer]) -> list[Peer]:
    """Deduplicated, IPv4 before IPv6, numerically: API list order is not a promise."""
    unique = {(ipaddress.ip_address(host), port) for host, port in peers}
    return [(str(ip), port) for ip, port in sorted(unique, key=lambda p: (p[0].version, p))]


def _describe(exc: BaseException, *, socket_path: str | None = None) -> str:
    """One line: an OSError's strerror (callers name the path), where a connection failed."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        text = f"TLS to {exc.host}:{exc.port} failed: {exc.certificate_error}"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        reason = os.strerror(error.errno) if error.errno else error.strerror or str(error)
        where = socket_path or f"{exc.host}:{exc.port}"
        text = f"cannot connect to {where}: {reason}"
    elif isinstance(exc, OSError) and not isinstance(exc, aiohttp.ClientError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc)
    return " ".join((text or type(exc).__name__).split())
