"""``kubernetes:`` and ``nomad:`` bootstrap sources, against fake API servers in this process.

Neither a Kubernetes API server nor a Nomad agent can run here, so small aiohttp servers
stand in for them. They answer with the shapes the API references document, and nothing
here shows how a real server deviates from its documentation:

- Kubernetes (``discovery.k8s.io/v1``): an ``EndpointSliceList`` filtered by the
  ``kubernetes.io/service-name`` label selector, paged by ``limit`` with
  ``metadata.continue``; errors as ``Status`` objects (401, 403 Forbidden, 410 Expired with
  a fresh continue token). It serves HTTPS with a certificate from a throwaway CA made with
  ``cryptography``, whose certificate is the service account's ``ca.crt``, and it accepts
  only the Bearer token it was told is current, as a real API server checks the projected
  token.
- Nomad (``GET /v1/service/:service_name``): a JSON list of service registrations shaped
  like the documented sample response, ``per_page``/``next_token`` paging with the
  ``X-Nomad-NextToken`` header, ``namespace`` and ``region`` parameters, and plain-text
  errors ("Permission denied") as Nomad's HTTP server writes them. It serves plain HTTP, a
  Unix socket (the Task API) and HTTPS with client certificates.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mirror.cli import orchestrator_env
from mirror.errors import ConfigError
from mirror.routing.bootstrap import BootstrapSpec, parse_bootstrap
from mirror.routing.bootstrap.env import KubernetesEnv, NomadEnv, OrchestratorEnv
from mirror.routing.bootstrap.kubernetes import KubernetesBootstrap, kubernetes_factory
from mirror.routing.bootstrap.nomad import NomadBootstrap, nomad_factory

PORT = 7000
LOGGER = "mirror.routing.bootstrap"
NS = "mirror"
SERVICE = "mirror-peers"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.service-account.token"
NOMAD_VARIABLES = (
    "NOMAD_ADDR",
    "NOMAD_TOKEN",
    "NOMAD_NAMESPACE",
    "NOMAD_REGION",
    "NOMAD_CACERT",
    "NOMAD_CAPATH",
    "NOMAD_CLIENT_CERT",
    "NOMAD_CLIENT_KEY",
    "NOMAD_SKIP_VERIFY",
    "NOMAD_TLS_SERVER_NAME",
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def spec(
    text: str,
    default_port: int = PORT,
    *,
    kubernetes: KubernetesEnv | None = None,
    nomad: NomadEnv | None = None,
) -> BootstrapSpec:
    kind, _, value = text.partition(":")
    env = OrchestratorEnv(kubernetes or KubernetesEnv(), nomad or NomadEnv())
    return BootstrapSpec(text, kind, value, default_port, env=env)


def nomad_env(variables: dict[str, str]) -> NomadEnv:
    """The NomadEnv mirror.cli builds from these variables (so tests name them as users do)."""
    assert set(variables) <= set(NOMAD_VARIABLES), set(variables) - set(NOMAD_VARIABLES)
    return orchestrator_env(variables).nomad


def kubernetes_env(variables: dict[str, str], account: Path) -> KubernetesEnv:
    """The KubernetesEnv mirror.cli builds from these variables, with a test's account dir."""
    built = orchestrator_env(variables).kubernetes
    return KubernetesEnv(built.service_host, built.service_port, service_account_dir=account)


# --- a throwaway PKI -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A CA and two leaves it signed, as PEM files: a server (127.0.0.1) and a client."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server_cert, self.server_key)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.ca_cert)
        return context


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirror test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(name: str, usage: x509.ObjectIdentifier) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path

    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key = leaf("server", ExtendedKeyUsageOID.SERVER_AUTH)
    client_cert, client_key = leaf("client", ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(ca_path, server_cert, server_key, client_cert, client_key)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@contextlib.asynccontextmanager
async def serving(
    app: web.Application, *, ssl_context: ssl.SSLContext | None = None, unix: Path | None = None
) -> AsyncIterator[int]:
    """Run ``app`` on 127.0.0.1 (or a Unix socket) until the block ends; yields the TCP port."""
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site: web.BaseSite
    if unix is not None:
        site = web.UnixSite(runner, str(unix))
    else:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    try:
        yield 0 if unix is not None else runner.addresses[0][1]
    finally:
        await runner.cleanup()


def closed_port() -> int:
    """A TCP port that nothing listens on (bound, then closed): connecting is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- a fake Kubernetes API server ----------------------------------------------------------


def endpoint(ip: str, ready: bool | None = True) -> dict[str, Any]:
    """An Endpoint as the EndpointSlice controller writes it; ``ready=None`` leaves it out."""
    conditions = {} if ready is None else {"ready": ready, "serving": ready, "terminating": False}
    return {
        "addresses": [ip],
        "conditions": conditions,
        "nodeName": "node-1",
        "targetRef": {"kind": "Pod", "namespace": NS, "name": f"mirror-{ip}"},
    }


def endpoint_slice(
    name: str,
    address_type: str,
    endpoints: list[dict[str, Any]] | None,
    *,
    service: str = SERVICE,
    namespace: str = NS,
    ports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports
        if ports is not None
        else [{"name": "registry", "protocol": "TCP", "port": 5000}],
    }


def status(code: int, reason: str, message: str, **metadata: str) -> web.Response:
    """A ``Status`` object, the body of every Kubernetes API error."""
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": metadata,
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)


class FakeKubernetes:
    """Lists EndpointSlices by namespace and service-name label, paged by ``limit``.

    ``token`` is the one Bearer token accepted. ``overrides`` maps a request number (0 is
    the first) to a handler answering that request instead, for errors and stalls.
    """

    def __init__(self, account: Path) -> None:
        self.account = account
        self.token = TOKEN
        self.slices: list[dict[str, Any]] = []
        self.overrides: dict[int, Handler] = {}
        self.requests: list[dict[str, str]] = []
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        path = "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
        app.router.add_get(path, self.list_slices)
        return app

    async def list_slices(self, request: web.Request) -> web.StreamResponse:
        number = len(self.requests)
        self.requests.append(dict(request.query))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return status(401, "Unauthorized", "Unauthorized")
        if number in self.overrides:
            return await self.overrides[number](request)
        namespace = request.match_info["namespace"]
        label, _, wanted = request.query.get("labelSelector", "").partition("=")
        assert label == "kubernetes.io/service-name"
        matching = [
            item
            for item in self.slices
            if item["metadata"]["namespace"] == namespace
            and item["metadata"]["labels"]["kubernetes.io/service-name"] == wanted
        ]
        start = int(request.query.get("continue", "0") or "0")
        limit = int(request.query.get("limit", "0") or "0") or len(matching)
        page, rest = matching[start : start + limit], matching[start + limit :]
        metadata: dict[str, Any] = {"resourceVersion": "4711"}
        if rest:
            metadata["continue"] = str(start + limit)
            metadata["remainingItemCount"] = len(rest)
        return web.json_response(
            {
                "kind": "EndpointSliceList",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": metadata,
                "items": page,
            }
        )

    def variables(self, **changes: str) -> dict[str, str]:
        """What Kubernetes would set in a pod to reach this server, with ``changes``."""
        variables = {
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.port),
        }
        variables.update(changes)
        return variables

    def source(
        self, text: str = f"kubernetes:{NS}/{SERVICE}", **changes: str
    ) -> KubernetesBootstrap:
        env = kubernetes_env(self.variables(**changes), self.account)
        return kubernetes_factory(spec(text, kubernetes=env))


@pytest.fixture
async def kube(tmp_path: Path, pki: Pki) -> AsyncIterator[FakeKubernetes]:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(TOKEN + "\n")
    (account / "ca.crt").write_bytes(pki.ca_cert.read_bytes())
    server = FakeKubernetes(account)
    async with serving(server.app(), ssl_context=pki.server_context()) as port:
        server.port = port
        yield server


def standard_slices() -> list[dict[str, Any]]:
    """Three slices of the service (IPv4, IPv6, FQDN) and one of another service."""
    return [
        endpoint_slice(
            f"{SERVICE}-v4",
            "IPv4",
            [
                endpoint("10.0.0.3"),
                endpoint("10.0.0.1", ready=None),  # no ready condition: counts as ready
                endpoint("10.0.0.2", ready=False),  # starting or terminating: skipped
            ],
        ),
        endpoint_slice(f"{SERVICE}-v6", "IPv6", [endpoint("fd00::2"), endpoint("fd00::1")]),
        endpoint_slice(f"{SERVICE}-fqdn", "FQDN", [endpoint("peer.example.com")]),
        endpoint_slice("other-abcde", "IPv4", [endpoint("10.9.9.9")], service="other"),
    ]


EXPECTED = [("10.0.0.1", PORT), ("10.0.0.3", PORT), ("fd00::1", PORT), ("fd00::2", PORT)]


async def test_kubernetes_pages_through_ready_ip_endpoints(kube: FakeKubernetes) -> None:
    kube.slices = standard_slices()
    source = kube.source()
    source.page_size = 2
    assert await source.addresses() == EXPECTED
    selector = f"kubernetes.io/service-name={SERVICE}"
    assert kube.requests == [
        {"labelSelector": selector, "limit": "2"},
        {"labelSelector": selector, "limit": "2", "continue": "2"},
    ]


async def test_kubernetes_spec_port_and_named_udp_port(kube: FakeKubernetes) -> None:
    router = [
        {"name": "registry", "protocol": "TCP", "port": 5000},
        {"name": "router", "protocol": "UDP", "port": 5001},
    ]
    kube.slices = [
        endpoint_slice("a", "IPv4", [endpoint("10.0.0.1")], ports=router),
        endpoint_slice("b", "IPv4", [endpoint("10.0.0.2")], ports=router[:1]),  # no router
        endpoint_slice(
            "c", "IPv4", [endpoint("10.0.0.3")], ports=[{"name": "router", "port": 5002}]
        ),  # protocol unset means TCP
    ]
    assert await kube.source(f"kubernetes:{NS}/{SERVICE}:7001").addresses() == [
        ("10.0.0.1", 7001),
        ("10.0.0.2", 7001),
        ("10.0.0.3", 7001),
    ]
    assert await kube.source(f"kubernetes:{NS}/{SERVICE}:router").addresses() == [
        ("10.0.0.1", 5001)
    ]


async def test_kubernetes_rereads_a_rotated_token(kube: FakeKubernetes) -> None:
    kube.slices = standard_slices()
    source = kube.source()
    assert await source.addresses() == EXPECTED
    kube.token = "rotated-token"
    (kube.account / "token").write_text("rotated-token")
    assert await source.addresses() == EXPECTED


async def test_kubernetes_wrong_token_is_rejected(
    kube: FakeKubernetes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    kube.slices = standard_slices()
    source = kube.source()
    kube.token = "a-token-we-do-not-have"
    assert await source.addresses() == []
    assert "HTTP 401: Unauthorized (is the service-account token valid?)" in caplog.text


async def test_kubernetes_empty_list_warns_of_a_missing_service(
    kube: FakeKubernetes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert await kube.source().addresses() == []
    assert f"no EndpointSlices for service {SERVICE} in namespace {NS}" in caplog.text
    caplog.clear()
    kube.slices = [endpoint_slice("a", "IPv4", [endpoint("10.0.0.1", ready=False)])]
    kube.slices.append(endpoint_slice("b", "IPv4", None))  # no endpoints at all: null
    assert await kube.source().addresses() == []
    assert "no ready endpoints" in caplog.text


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (
            lambda: status(
                403,
                "Forbidden",
                'endpointslices.discovery.k8s.io is forbidden: User "system:serviceaccount:'
                'mirror:default" cannot list resource "endpointslices"',
            ),
            "HTTP 403: endpointslices.discovery.k8s.io is forbidden: User "
            '"system:serviceaccount:mirror:default" cannot list resource "endpointslices" '
            "(the service account needs 'list' on endpointslices.discovery.k8s.io in "
            "namespace mirror)",
        ),
        (
            lambda: status(500, "InternalError", "etcdserver: request timed out"),
            "HTTP 500: etcdserver: request timed out",
        ),
        (
            lambda: web.Response(text='{"items": [', content_type="application/json"),
            "malformed JSON",
        ),
        (
            lambda: web.json_response([{"addressType": "IPv4"}]),
            "unexpected response: not a JSON object",
        ),
    ],
    ids=["403", "500", "malformed-json", "not-a-list-object"],
)
async def test_kubernetes_errors_give_nothing(
    kube: FakeKubernetes,
    caplog: pytest.LogCaptureFixture,
    response: Callable[[], web.Response],
    expected: str,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    kube.slices = standard_slices()

    async def fail(request: web.Request) -> web.Response:
        return response()

    kube.overrides[0] = fail
    assert await kube.source().addresses() == []
    assert f"listing EndpointSlices failed: {expected}" in caplog.text


async def test_kubernetes_expired_continue_keeps_earlier_pages(
    kube: FakeKubernetes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    kube.slices = standard_slices()

    async def expired(request: web.Request) -> web.Response:
        message = "The provided continue parameter is too old to display a consistent list result."
        return status(410, "Expired", message, **{"continue": "fresh-token"})

    kube.overrides[1] = expired
    source = kube.source()
    source.page_size = 1
    assert await source.addresses() == [("10.0.0.1", PORT), ("10.0.0.3", PORT)]
    assert "HTTP 410: The provided continue parameter is too old" in caplog.text
    assert "using the 2 addresses of earlier pages" in caplog.text


async def test_kubernetes_untrusted_certificate_gives_nothing(
    kube: FakeKubernetes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    kube.slices = standard_slices()
    other = make_pki(tmp_path / "other-pki")
    (kube.account / "ca.crt").write_bytes(other.ca_cert.read_bytes())
    assert await kube.source().addresses() == []
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
    assert kube.requests == []  # the token never left


async def test_kubernetes_refused_connection_gives_nothing(
    kube: FakeKubernetes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    source = kube.source(KUBERNETES_SERVICE_PORT=str(closed_port()))
    assert await source.addresses() == []
    assert "cannot connect to 127.0.0.1:" in caplog.text


async def test_kubernetes_stalled_server_gives_nothing_within_timeout(
    kube: FakeKubernetes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def stall(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.json_response({})

    kube.overrides[0] = stall
    source = kube.source()
    source.timeout = 0.3
    started = time.monotonic()
    assert await source.addresses() == []
    assert time.monotonic() - started < 0.3 + 1.0
    assert "timed out" in caplog.text


async def test_kubernetes_token_deleted_after_start_gives_nothing(
    kube: FakeKubernetes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    source = kube.source()
    (kube.account / "token").unlink()
    assert await source.addresses() == []
    assert "cannot read token" in caplog.text
    assert kube.requests == []


# --- a fake Nomad agent --------------------------------------------------------------------


def registration(alloc: str, address: str, port: int = 25000) -> dict[str, Any]:
    """A service registration shaped like the API reference's sample response."""
    return {
        "Address": address,
        "AllocID": alloc,
        "CreateIndex": 14,
        "Datacenter": "dc1",
        "ID": f"_nomad-task-{alloc}-mirror-{SERVICE}-registry",
        "JobID": "mirror",
        "ModifyIndex": 24,
        "Namespace": NS,
        "NodeID": "7406e90b-de16-d118-80fe-60d0f2730cb3",
        "Port": port,
        "ServiceName": SERVICE,
        "Tags": ["registry"],
    }


class FakeNomad:
    """``GET /v1/service/:name`` over registrations kept per (namespace, service).

    With ``token`` set (ACLs on), requests without that ``X-Nomad-Token`` get Nomad's
    plain-text 403. Paging follows the documented contract: ``per_page`` items, and the
    next item's ID in ``X-Nomad-NextToken``.
    """

    def __init__(self) -> None:
        self.token: str | None = None
        self.registrations: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.requests: list[tuple[dict[str, str], str | None]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/service/{name}", self.read_service)
        return app

    async def read_service(self, request: web.Request) -> web.Response:
        sent_token = request.headers.get("X-Nomad-Token")
        self.requests.append((dict(request.query), sent_token))
        if self.token is not None and sent_token != self.token:
            return web.Response(status=403, text="Permission denied")
        namespace = request.query.get("namespace", "default")
        found = self.registrations.get((namespace, request.match_info["name"]), [])
        start = 0
        if "next_token" in request.query:
            ids = [item["ID"] for item in found]
            start = ids.index(request.query["next_token"])
        per_page = int(request.query.get("per_page", "0")) or len(found)
        page = found[start : start + per_page]
        headers = {"X-Nomad-Index": "24", "X-Nomad-KnownLeader": "true"}
        if start + per_page < len(found):
            headers["X-Nomad-NextToken"] = found[start + per_page]["ID"]
        return web.json_response(page, headers=headers)


NOMAD_REGISTRATIONS = [
    registration("5f0730ca", "10.0.0.2", 22686),
    registration("a831f7f2", "10.0.0.1", 25854),
    registration("177160af", "10.0.0.2", 29702),  # a second allocation on the same host
    registration("ba731da0", "fd00::1", 27232),
]


@pytest.fixture
async def nomad() -> AsyncIterator[tuple[FakeNomad, int]]:
    server = FakeNomad()
    async with serving(server.app()) as port:
        yield server, port


async def test_nomad_lists_registrations_with_the_router_port(
    nomad: tuple[FakeNomad, int],
) -> None:
    server, port = nomad
    server.token = "workload-identity-jwt"
    server.registrations[(NS, SERVICE)] = NOMAD_REGISTRATIONS
    env = NomadEnv(
        addr=f"http://127.0.0.1:{port}",
        token="workload-identity-jwt",
        namespace=NS,
        region="europe",
    )
    source = nomad_factory(spec(f"nomad:{SERVICE}", nomad=env))
    assert await source.addresses() == [("10.0.0.1", PORT), ("10.0.0.2", PORT), ("fd00::1", PORT)]
    assert server.requests == [({"namespace": NS, "region": "europe"}, "workload-identity-jwt")]
    source = nomad_factory(spec(f"nomad:{SERVICE}:7001", nomad=env))
    assert {port for _, port in await source.addresses()} == {7001}


async def test_nomad_without_token_or_namespace_sends_neither(
    nomad: tuple[FakeNomad, int],
) -> None:
    server, port = nomad
    server.registrations[("default", SERVICE)] = NOMAD_REGISTRATIONS[:1]
    env = NomadEnv(addr=f"http://127.0.0.1:{port}")
    source = nomad_factory(spec(f"nomad:{SERVICE}", nomad=env))
    assert await source.addresses() == [("10.0.0.2", PORT)]
    assert server.requests == [({}, None)]


async def test_nomad_follows_next_tokens(nomad: tuple[FakeNomad, int]) -> None:
    server, port = nomad
    server.registrations[("default", SERVICE)] = NOMAD_REGISTRATIONS
    env = NomadEnv(addr=f"http://127.0.0.1:{port}")
    source = nomad_factory(spec(f"nomad:{SERVICE}", nomad=env))
    source.page_size = 3
    assert await source.addresses() == [("10.0.0.1", PORT), ("10.0.0.2", PORT), ("fd00::1", PORT)]
    assert [query for query, _ in server.requests] == [
        {"per_page": "3"},
        {"per_page": "3", "next_token": NOMAD_REGISTRATIONS[3]["ID"]},
    ]


async def test_nomad_empty_list_warns(
    nomad: tuple[FakeNomad, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    _, port = nomad
    env = NomadEnv(addr=f"http://127.0.0.1:{port}", namespace=NS)
    assert await nomad_factory(spec(f"nomad:{SERVICE}", nomad=env)).addresses() == []
    assert (
        f"no registrations of service {SERVICE} (is the job running, and in namespace mirror?)"
        in caplog.text
    )


async def test_nomad_wrong_token_gets_403(
    nomad: tuple[FakeNomad, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server, port = nomad
    server.token = "the-right-token"
    server.registrations[("default", SERVICE)] = NOMAD_REGISTRATIONS
    env = NomadEnv(addr=f"http://127.0.0.1:{port}", token="a-wrong-token")
    assert await nomad_factory(spec(f"nomad:{SERVICE}", nomad=env)).addresses() == []
    assert (
        "reading the service failed: HTTP 403: Permission denied "
        "(the token needs read-job in the namespace)"
    ) in caplog.text


async def test_nomad_refused_connection_gives_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    env = NomadEnv(addr=f"http://127.0.0.1:{closed_port()}")
    assert await nomad_factory(spec(f"nomad:{SERVICE}", nomad=env)).addresses() == []
    assert "cannot connect to 127.0.0.1:" in caplog.text


async def test_nomad_skips_addresses_that_are_not_ips(
    nomad: tuple[FakeNomad, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server, port = nomad
    server.registrations[("default", SERVICE)] = [
        registration("5f0730ca", "node-1.example.com"),
        registration("a831f7f2", "10.0.0.1"),
    ]
    env = NomadEnv(addr=f"http://127.0.0.1:{port}")
    source = nomad_factory(spec(f"nomad:{SERVICE}", nomad=env))
    assert await source.addresses() == [("10.0.0.1", PORT)]
    assert "registration address 'node-1.example.com' is not an IP address" in caplog.text


async def test_nomad_task_api_socket(tmp_path: Path) -> None:
    server = FakeNomad()
    server.token = "workload-identity-jwt"
    server.registrations[("default", SERVICE)] = NOMAD_REGISTRATIONS[:2]
    socket_path = tmp_path / "api.sock"
    async with serving(server.app(), unix=socket_path):
        env = NomadEnv(addr=f"unix://{socket_path}", token="workload-identity-jwt")
        source = nomad_factory(spec(f"nomad:{SERVICE}", nomad=env))
        assert await source.addresses() == [("10.0.0.1", PORT), ("10.0.0.2", PORT)]


async def test_nomad_mutual_tls(pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server = FakeNomad()
    server.registrations[("default", SERVICE)] = NOMAD_REGISTRATIONS[:1]
    context = pki.server_context(require_client_cert=True)
    async with serving(server.app(), ssl_context=context) as port:
        tls = NomadEnv(
            addr=f"https://127.0.0.1:{port}",
            cacert=str(pki.ca_cert),
            client_cert=str(pki.client_cert),
            client_key=str(pki.client_key),
        )
        source = nomad_factory(spec(f"nomad:{SERVICE}", nomad=tls))
        assert await source.addresses() == [("10.0.0.2", PORT)]
        # A CA that did not sign the server: refused, unless verification is skipped.
        other = make_pki(tmp_path / "other-pki")
        untrusted = replace(tls, cacert=str(other.ca_cert))
        source = nomad_factory(spec(f"nomad:{SERVICE}", nomad=untrusted))
        assert await source.addresses() == []
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
        skipping = replace(untrusted, skip_verify="true")
        source = nomad_factory(spec(f"nomad:{SERVICE}", nomad=skipping))
        assert await source.addresses() == [("10.0.0.2", PORT)]
        # Without a client certificate the server ends the handshake.
        caplog.clear()
        anonymous = NomadEnv(addr=tls.addr, cacert=str(pki.ca_cert))
        source = nomad_factory(spec(f"nomad:{SERVICE}", nomad=anonymous))
        assert await source.addresses() == []
        assert "reading the service failed" in caplog.text
    assert len(server.requests) == 2


# --- parsing and settings ------------------------------------------------------------------


@pytest.fixture
def service_account(tmp_path: Path, pki: Pki) -> Path:
    """The standard service-account files, for parse_bootstrap."""
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(TOKEN)
    (account / "ca.crt").write_bytes(pki.ca_cert.read_bytes())
    return account


def test_parse_kubernetes(service_account: Path) -> None:
    variables = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    pod = OrchestratorEnv(kubernetes=kubernetes_env(variables, service_account))
    source = parse_bootstrap(f"kubernetes:{NS}/{SERVICE}", PORT, env=pod)
    assert isinstance(source, KubernetesBootstrap)
    assert (source.namespace, source.service, source.port) == (NS, SERVICE, PORT)
    assert (
        str(source.url)
        == f"https://[fd00::1]/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
    )
    assert source.token_path == service_account / "token"
    assert str(source) == f"kubernetes:{NS}/{SERVICE}:{PORT}"
    source = parse_bootstrap("kubernetes:kube-system/mirror:7001", PORT, env=pod)
    assert isinstance(source, KubernetesBootstrap)
    assert source.port == 7001
    source = parse_bootstrap("kubernetes:default/mirror:router-udp", PORT, env=pod)
    assert isinstance(source, KubernetesBootstrap)
    assert source.port == "router-udp"


def test_parse_nomad() -> None:
    source = parse_bootstrap(f"nomad:{SERVICE}", PORT, env=orchestrator_env({}))
    assert isinstance(source, NomadBootstrap)
    assert (source.service, source.port) == (SERVICE, PORT)
    assert str(source.settings.address) == "http://127.0.0.1:4646/"
    assert source.settings.token is None
    variables = {
        "NOMAD_ADDR": "https://nomad.service.consul:4646",
        "NOMAD_SKIP_VERIFY": "1",
        "NOMAD_NAMESPACE": "mirror",
    }
    source = parse_bootstrap("nomad:Mirror-Router:7001", PORT, env=orchestrator_env(variables))
    assert isinstance(source, NomadBootstrap)
    assert (source.service, source.port, source.settings.namespace) == (
        "Mirror-Router",
        7001,
        "mirror",
    )
    assert source.settings.ssl_context is not None
    assert source.settings.ssl_context.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kubernetes:", "expected kubernetes:NAMESPACE/SERVICE[:PORT]"),
        ("kubernetes:mirror", "expected kubernetes:NAMESPACE/SERVICE[:PORT]"),
        ("kubernetes:mirror/", "expected kubernetes:NAMESPACE/SERVICE[:PORT]"),
        ("kubernetes:/mirror", "expected kubernetes:NAMESPACE/SERVICE[:PORT]"),
        ("kubernetes:a/b/c", "'a/b/c': expected kubernetes:NAMESPACE/SERVICE"),
        ("kubernetes:ns/svc:1:2", "expected kubernetes:NAMESPACE/SERVICE[:PORT]"),
        ("kubernetes:Mirror/svc", "'Mirror' is not a valid namespace"),
        ("kubernetes:ns/9svc", "'9svc' is not a valid Service name"),
        ("kubernetes:ns/svc-", "'svc-' is not a valid Service name"),
        ("kubernetes:ns/svc:0", "port 0 is out of range 1-65535"),
        ("kubernetes:ns/svc:65536", "port 65536 is out of range"),
        ("kubernetes:ns/svc:", "port '' is neither a number nor a valid port name"),
        ("kubernetes:ns/svc:router_udp", "port 'router_udp' is neither a number nor"),
        ("kubernetes:ns/svc:a--b", "port 'a--b' is neither"),
        ("kubernetes:ns/svc:a-very-long-port-name", "is neither a number nor a valid port"),
        ("nomad:", "expected nomad:SERVICE[:PORT]"),
        ("nomad::7000", "expected nomad:SERVICE[:PORT]"),
        ("nomad:svc:1:2", "expected nomad:SERVICE[:PORT]"),
        ("nomad:bad_name", "'bad_name' is not a valid Nomad service name"),
        ("nomad:svc:x", "port 'x' is not a number"),
        ("nomad:svc:70000", "port 70000 is out of range"),
    ],
)
def test_parse_rejects_bad_orchestrator_specs(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_bootstrap(text, PORT)
    message = str(info.value)
    assert expected in message
    assert message.startswith(f"--bootstrap {text!r}: ")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"KUBERNETES_SERVICE_HOST": None}, "KUBERNETES_SERVICE_HOST is not set: kubernetes: "),
        ({"KUBERNETES_SERVICE_PORT": ""}, "KUBERNETES_SERVICE_PORT is not set"),
        ({"KUBERNETES_SERVICE_PORT": "https"}, "KUBERNETES_SERVICE_PORT 'https' is not a port"),
        ({"KUBERNETES_SERVICE_PORT": "0"}, "KUBERNETES_SERVICE_PORT '0' is not a port"),
        (
            {"KUBERNETES_SERVICE_HOST": "bad host"},
            "KUBERNETES_SERVICE_HOST 'bad host' is not a host",
        ),
    ],
)
def test_kubernetes_factory_rejects_bad_environment(
    service_account: Path, variables: dict[str, str | None], expected: str
) -> None:
    values: dict[str, str | None] = {
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
    }
    values.update(variables)
    text = f"kubernetes:{NS}/{SERVICE}"
    complete = {name: value for name, value in values.items() if value is not None}
    env = kubernetes_env(complete, service_account)
    with pytest.raises(ConfigError) as info:
        kubernetes_factory(spec(text, kubernetes=env))
    assert str(info.value).startswith(f"--bootstrap {text!r}: {expected}")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("no-token", "cannot read token {account}/token: No such file or directory"),
        ("empty-token", "token file {account}/token is empty"),
        ("no-ca", "cannot load CA certificate {account}/ca.crt: No such file or directory"),
        ("garbage-ca", "cannot load CA certificate {account}/ca.crt: "),
    ],
)
def test_kubernetes_factory_rejects_bad_service_account(
    service_account: Path, change: str, expected: str
) -> None:
    if change == "no-token":
        (service_account / "token").unlink()
    elif change == "empty-token":
        (service_account / "token").write_text("\n")
    elif change == "no-ca":
        (service_account / "ca.crt").unlink()
    else:
        (service_account / "ca.crt").write_text("not a certificate\n")
    variables = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    text = f"kubernetes:{NS}/{SERVICE}"
    with pytest.raises(ConfigError) as info:
        kubernetes_factory(spec(text, kubernetes=kubernetes_env(variables, service_account)))
    message = str(info.value)
    assert message.startswith(f"--bootstrap {text!r}: " + expected.format(account=service_account))
    assert "\n" not in message


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"NOMAD_ADDR": "127.0.0.1:4646"}, "expected http://HOST:PORT, https://… or unix://…"),
        ({"NOMAD_ADDR": "ftp://nomad:4646"}, "NOMAD_ADDR 'ftp://nomad:4646': expected http://"),
        ({"NOMAD_ADDR": "http://"}, "NOMAD_ADDR 'http://': expected"),
        ({"NOMAD_ADDR": "unix://"}, "NOMAD_ADDR 'unix://' names no socket path"),
        (
            {"NOMAD_ADDR": "unix:///secrets/api.sock"},
            "the Task API, which always needs NOMAD_TOKEN",
        ),
        ({"NOMAD_SKIP_VERIFY": "maybe"}, "NOMAD_SKIP_VERIFY 'maybe' is not a boolean"),
        ({"NOMAD_TOKEN": "secret\r\nX-Injected: 1"}, "NOMAD_TOKEN holds characters a header"),
        (
            {"NOMAD_ADDR": "https://nomad:4646", "NOMAD_CLIENT_CERT": "/tls/cli.pem"},
            "NOMAD_CLIENT_CERT and NOMAD_CLIENT_KEY must be set together",
        ),
        (
            {"NOMAD_ADDR": "https://nomad:4646", "NOMAD_CACERT": "/nonexistent/ca.pem"},
            "cannot load CA /nonexistent/ca.pem: No such file or directory",
        ),
        (
            {
                "NOMAD_ADDR": "https://nomad:4646",
                "NOMAD_CLIENT_CERT": "/nonexistent/cli.pem",
                "NOMAD_CLIENT_KEY": "/nonexistent/cli-key.pem",
            },
            "cannot load client certificate /nonexistent/cli.pem: No such file or directory",
        ),
    ],
)
def test_nomad_factory_rejects_bad_environment(variables: dict[str, str], expected: str) -> None:
    text = f"nomad:{SERVICE}"
    with pytest.raises(ConfigError) as info:
        nomad_factory(spec(text, nomad=nomad_env(variables)))
    message = str(info.value)
    assert message.startswith(f"--bootstrap {text!r}: ")
    assert expected in message
    assert "\n" not in message
