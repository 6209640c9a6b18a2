"""``nomad:SERVICE[:PORT]``: the addresses of a Nomad service's native registrations.

Nomad's native services have no DNS at all, so the HTTP API is the only way to list them.
Where and how to reach it comes from the ``NOMAD_*`` variables the ``nomad`` CLI reads
(handed over by mirror.cli as a ``NomadEnv``), which a job sets with ``identity { env =
true }`` or a template. They are checked when the spec is parsed, so a malformed
``NOMAD_ADDR`` stops ``mirror run`` with a one-line ConfigError instead of logging a warning
at every refresh.

Ports: a registration has a single ``Port``, the registered service's (usually the
registry's HTTP port), while the DHT speaks UDP on the router port. So it is ignored: the
port of every address is the spec's PORT or, without one, the router port of this node (a
system job runs every node with the same flags).

Like every source, it logs a failed lookup and returns what it has (usually ``[]``); the
Rebootstrapper asks again later.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from yarl import URL

from mirror.errors import ConfigError
from mirror.routing.bootstrap.base import (
    BootstrapSource,
    BootstrapSpec,
    Peer,
    ip_or_none,
    ordered,
    parse_port,
)
from mirror.routing.bootstrap.env import NomadEnv
from mirror.routing.bootstrap.http import (
    MAX_PAGES,
    REQUEST_TIMEOUT,
    LookupFailed,
    describe,
    get_json,
    open_session,
)

log = logging.getLogger(__name__)

NOMAD_DEFAULT_ADDR = "http://127.0.0.1:4646"

_NOMAD_SERVICE_RE = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?")
# strconv.ParseBool, which the nomad CLI uses for NOMAD_SKIP_VERIFY.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


@dataclass(frozen=True, slots=True)
class NomadSettings:
    """Where and how to reach the Nomad HTTP API: a checked, ready-to-use ``NomadEnv``.

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
        async with open_session(self.timeout, socket_path=settings.socket_path) as session:
            for _ in range(MAX_PAGES):
                params = self._params(next_token)
                try:
                    body, response_headers = await get_json(
                        session,
                        url,
                        params=params,
                        headers=headers,
                        ssl_context=settings.ssl_context,
                        server_hostname=settings.tls_server_name,
                        socket_path=settings.socket_path,
                    )
                    page = _registration_list(body)
                except LookupFailed as exc:
                    self._warn_failure(exc, peers)
                    return ordered(peers)
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
        return ordered(peers)

    def _warn_failure(self, exc: LookupFailed, peers: list[Peer]) -> None:
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
            ip = ip_or_none(address)
            if ip is None:
                problems.add(f"registration address {address!r} is not an IP address")
                continue
            peers.append((str(ip), self.port))
        return peers


def nomad_factory(spec: BootstrapSpec) -> NomadBootstrap:
    """Build a ``nomad:SERVICE[:PORT]`` source, reaching Nomad as ``spec.env.nomad`` says."""
    service, separator, port_text = spec.value.partition(":")
    if not service or ":" in port_text:
        raise spec.error("expected nomad:SERVICE[:PORT]")
    if not _NOMAD_SERVICE_RE.fullmatch(service):
        raise spec.error(f"{service!r} is not a valid Nomad service name")
    port = parse_port(spec, port_text) if separator else spec.default_port
    return NomadBootstrap(service, port, nomad_settings(spec.error, spec.env.nomad))


def nomad_settings(error: Callable[[str], ConfigError], env: NomadEnv) -> NomadSettings:
    """Check ``NOMAD_ADDR``, ``NOMAD_TOKEN``, namespace, region and TLS; build the settings.

    ``error(problem)`` builds the ConfigError raised, naming the flag that asked for Nomad
    (``BootstrapSpec.error`` for ``--bootstrap``; the prefetch Nomad watch has its own).
    """
    text = env.addr or NOMAD_DEFAULT_ADDR
    token = env.token or None
    if token is not None and not token.isprintable():
        raise error("NOMAD_TOKEN holds characters a header cannot carry")
    namespace = env.namespace or None
    region = env.region or None
    skip_verify = _parse_bool(error, "NOMAD_SKIP_VERIFY", env.skip_verify)
    if text.startswith("unix://"):
        socket_path = text.removeprefix("unix://")
        if not socket_path:
            raise error(f"NOMAD_ADDR {text!r} names no socket path")
        if token is None:
            raise error(
                f"NOMAD_ADDR {text!r} is the Task API, which always needs NOMAD_TOKEN "
                "(a workload identity: identity { env = true })"
            )
        placeholder = URL("http://localhost")
        return NomadSettings(placeholder, socket_path, token, namespace, region)
    try:
        url = URL(text)
    except ValueError as exc:
        raise error(f"NOMAD_ADDR {text!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise error(f"NOMAD_ADDR {text!r}: expected http://HOST:PORT, https://… or unix://…")
    ssl_context = _ssl_context(error, env, skip_verify) if url.scheme == "https" else None
    server_name = env.tls_server_name or None
    base = url.with_path("/").with_query(None).with_fragment(None)
    return NomadSettings(base, None, token, namespace, region, ssl_context, server_name)


def _ssl_context(
    error: Callable[[str], ConfigError], env: NomadEnv, skip_verify: bool
) -> ssl.SSLContext:
    """The client TLS context from NOMAD_CACERT/CAPATH, NOMAD_CLIENT_CERT/KEY, SKIP_VERIFY."""
    cafile = env.cacert or None
    capath = None if cafile else env.capath or None  # as the CLI: CACERT wins
    cert = env.client_cert or None
    key = env.client_key or None
    if (cert is None) != (key is None):
        raise error("NOMAD_CLIENT_CERT and NOMAD_CLIENT_KEY must be set together")
    try:
        context = ssl.create_default_context(cafile=cafile, capath=capath)
    except OSError as exc:
        raise error(f"cannot load CA {cafile or capath}: {describe(exc)}") from None
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(cert, key)
        except OSError as exc:
            raise error(f"cannot load client certificate {cert}: {describe(exc)}") from None
    if skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _parse_bool(error: Callable[[str], ConfigError], name: str, value: str | None) -> bool:
    """``value`` as Go's strconv.ParseBool reads it; unset or empty is false."""
    if value in _TRUE:
        return True
    if not value or value in _FALSE:
        return False
    raise error(f"{name} {value!r} is not a boolean (true or false)")


def _registration_list(body: object) -> list[object]:
    if body is None:
        return []
    if not isinstance(body, list):
        raise LookupFailed("unexpected response: not a JSON list of registrations")
    return body
