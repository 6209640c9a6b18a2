"""Where a node finds its first DHT peers, and the loop that keeps it connected.

A ``--bootstrap`` value names a *source* of peer addresses rather than the addresses
themselves, because in a cluster peers come and go: a headless Kubernetes service or a
Consul name is asked again on every bootstrap, so a node that restarts, or a cluster that
was down entirely, finds whoever is there now. Sources return IP addresses only (the DHT
keys contacts by IP) and never raise for a failed lookup: an empty answer just means
"try again later", which is the ``Rebootstrapper``'s job.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

from mirror.errors import ConfigError

log = logging.getLogger(__name__)

Peer = tuple[str, int]

# A lookup that takes longer than this is treated as failed; the caller retries later, so
# waiting longer would only delay a node's start behind a dead resolver.
DNS_LIFETIME = 2.0
NAME_LOOKUP_TIMEOUT = 5.0

_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


# --- sources -------------------------------------------------------------------------------


class BootstrapSource(ABC):
    """Something that can be asked, repeatedly, for the current addresses of peers."""

    @abstractmethod
    async def addresses(self) -> list[Peer]:
        """IP addresses with ports, deduplicated, in a stable order; ``[]`` if lookup failed.

        A lookup failure is logged, never raised: the caller retries on its own schedule.
        """


class StaticBootstrap(BootstrapSource):
    """A fixed list of ``(host, port)``; names are resolved on every call, not once.

    Resolving late means a name that did not resolve at start (DNS not ready yet) or that
    moved to another IP is picked up on the next bootstrap.
    """

    def __init__(self, targets: Sequence[Peer], *, timeout: float = NAME_LOOKUP_TIMEOUT) -> None:
        self.targets = tuple(targets)
        self.timeout = timeout

    def __str__(self) -> str:
        return "static:" + ",".join(_format_peer(host, port) for host, port in self.targets)

    async def addresses(self) -> list[Peer]:
        resolved = await asyncio.gather(*(self._resolve(host, port) for host, port in self.targets))
        return _dedup(peer for peers in resolved for peer in peers)

    async def _resolve(self, host: str, port: int) -> list[Peer]:
        literal = _ip_or_none(host)
        if literal is not None:
            return [(str(literal), port)]
        loop = asyncio.get_running_loop()
        try:
            # SOCK_DGRAM: the DHT speaks UDP, and one socket type gives one row per address.
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM), self.timeout
            )
        except OSError as exc:  # socket.gaierror, and TimeoutError from wait_for
            log.warning("bootstrap: cannot resolve %s: %s", host, str(exc) or "timed out")
            return []
        ips = _sorted_ips(str(info[4][0]) for info in infos)
        return [(ip, port) for ip in ips]


class DnsBootstrap(BootstrapSource):
    """All A and AAAA records of one name, as a headless service or Consul DNS serves them.

    Asks DNS directly (not ``getaddrinfo``) so that every record comes back, not only the
    ones the system resolver prefers. ``nameserver=None`` reads ``/etc/resolv.conf`` anew
    on each call, search domains included, so short service names work inside a pod.
    """

    def __init__(
        self,
        name: str,
        port: int,
        *,
        nameserver: Peer | None = None,
        lifetime: float = DNS_LIFETIME,
    ) -> None:
        self.name = name
        self.port = port
        self.nameserver = nameserver
        self.lifetime = lifetime

    def __str__(self) -> str:
        return f"dns:{self.name}:{self.port}"

    async def addresses(self) -> list[Peer]:
        try:
            resolver = self._resolver()
        except dns.exception.DNSException as exc:
            log.warning("bootstrap %s: no DNS resolver: %s", self, exc)
            return []
        (v4, v4_error), (v6, v6_error) = await asyncio.gather(
            self._query(resolver, "A"), self._query(resolver, "AAAA")
        )
        errors = [error for error in (v4_error, v6_error) if error is not None]
        if errors:
            log.warning("bootstrap %s: lookup failed: %s", self, "; ".join(errors))
        elif not v4 and not v6:
            log.warning("bootstrap %s: name has no A or AAAA records", self)
        return [(ip, self.port) for ip in _sorted_ips(v4) + _sorted_ips(v6)]

    def _resolver(self) -> dns.asyncresolver.Resolver:
        resolver = dns.asyncresolver.Resolver(configure=self.nameserver is None)
        if self.nameserver is not None:
            resolver.nameservers = [self.nameserver[0]]
            resolver.port = self.nameserver[1]
        resolver.lifetime = self.lifetime
        resolver.timeout = min(resolver.timeout, self.lifetime)
        resolver.cache = None  # every bootstrap must see the peers of now
        return resolver

    async def _query(
        self, resolver: dns.asyncresolver.Resolver, rdtype: str
    ) -> tuple[list[str], str | None]:
        """Addresses of one record type, or an error text; a name without that type is ``[]``."""
        try:
            # Search domains belong to the system resolver; a given nameserver gets the name
            # as written (else the machine's own domain would be appended to it).
            answer = await resolver.resolve(
                self.name, rdtype, search=self.nameserver is None, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return [], f"{rdtype}: no such name"
        except (dns.exception.DNSException, OSError) as exc:
            return [], f"{rdtype}: {str(exc) or type(exc).__name__}"
        return [str(record.address) for record in answer], None


async def gather_addresses(
    sources: Sequence[BootstrapSource], *, exclude: AbstractSet[Peer] = frozenset()
) -> list[Peer]:
    """The union of all sources in their order, without ``exclude`` (our own router address).

    Sources are asked concurrently so a slow one does not add to the others' time. One
    that raises (a bug, since lookups must not) is logged and counted as empty, so it does
    not cut a node off from peers the other sources know.
    """
    excluded = {_normalise(peer) for peer in exclude}
    results = await asyncio.gather(*(_ask(source) for source in sources))
    return [peer for peer in _dedup(p for ps in results for p in ps) if peer not in excluded]


async def _ask(source: BootstrapSource) -> list[Peer]:
    try:
        return await source.addresses()
    except Exception:
        log.exception("bootstrap %s: source failed", source)
        return []


# --- keeping connected ---------------------------------------------------------------------


class Rebootstrapper:
    """Bootstrap at start, again whenever the routing table is empty, and every so often.

    An empty table means the node lost every peer (it started first, or the cluster
    restarted under it); a periodic refresh also pulls in peers that joined while the table
    was merely small. Attempts that end with no contacts back off exponentially (up to
    ``refresh_interval``) so a lone first node does not query DNS every ``check_interval``.
    """

    def __init__(
        self,
        sources: Sequence[BootstrapSource],
        bootstrap: Callable[[list[Peer]], Awaitable[int]],
        contact_count: Callable[[], int],
        *,
        own_address: Peer,
        check_interval: float = 1.0,
        refresh_interval: float = 60.0,
    ) -> None:
        self._sources = tuple(sources)
        self._bootstrap = bootstrap
        self._contact_count = contact_count
        self._own_address = own_address
        self._check_interval = check_interval
        self._refresh_interval = refresh_interval

    async def bootstrap_once(self) -> int:
        """Gather addresses and bootstrap from them; the contact count after.

        With no addresses the bootstrap callable is not called. Its exceptions propagate:
        ``run`` is the place that shrugs them off.
        """
        peers = await gather_addresses(self._sources, exclude={self._own_address})
        if not peers:
            log.info("bootstrap: no peers found besides ourselves")
            return self._contact_count()
        log.debug("bootstrap: contacting %s", ", ".join(_format_peer(*p) for p in peers))
        return await self._bootstrap(peers)

    async def run(self) -> None:
        """Keep the node connected until cancelled; a failing attempt is logged and retried."""
        loop = asyncio.get_running_loop()
        failures = 0
        next_attempt = loop.time()  # the first round bootstraps, whatever the table holds
        while True:
            now = loop.time()
            if now >= next_attempt or (failures == 0 and self._contact_count() == 0):
                contacts = await self._attempt()
                now = loop.time()
                if contacts > 0:
                    failures = 0
                    next_attempt = now + self._refresh_interval
                else:
                    failures += 1
                    backoff = self._check_interval * 2 ** (failures - 1)
                    next_attempt = now + min(backoff, self._refresh_interval)
            await asyncio.sleep(self._check_interval)

    async def _attempt(self) -> int:
        try:
            return await self.bootstrap_once()
        except Exception:
            log.exception("bootstrap failed; retrying")
            return 0


# --- parsing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BootstrapSpec:
    """One ``--bootstrap`` value split into kind and value, with what its parser may need.

    Each kind's factory gets the whole spec, so a new kind (``kubernetes:``, ``nomad:``)
    plugs in through ``register_kind`` without parse_bootstrap changing its signature.
    """

    text: str
    kind: str
    value: str
    default_port: int
    dns_server: Peer | None = None

    def error(self, problem: str) -> ConfigError:
        """A one-line ConfigError naming the flag value, for factories to raise."""
        return ConfigError(f"--bootstrap {self.text!r}: {problem}")


SourceFactory = Callable[[BootstrapSpec], BootstrapSource]
_KINDS: dict[str, SourceFactory] = {}


def register_kind(kind: str, factory: SourceFactory) -> None:
    """Make ``KIND:VALUE`` specs build their source with ``factory``."""
    _KINDS[kind] = factory


def bootstrap_kinds() -> list[str]:
    """The known kinds, sorted (for help and error texts)."""
    return sorted(_KINDS)


def parse_bootstrap(
    text: str, default_port: int, *, dns_server: Peer | None = None
) -> BootstrapSource:
    """Build the source one ``--bootstrap KIND:VALUE`` names; ConfigError if it is unusable."""
    kind, separator, value = text.partition(":")
    factory = _KINDS.get(kind) if separator else None
    if factory is None:
        raise ConfigError(
            f"--bootstrap {text!r}: expected KIND:VALUE with KIND one of "
            f"{', '.join(bootstrap_kinds())} (e.g. static:10.0.0.5:{default_port})"
        )
    return factory(BootstrapSpec(text, kind, value, default_port, dns_server))


def _static_factory(spec: BootstrapSpec) -> BootstrapSource:
    if not spec.value.strip():
        raise spec.error("empty address list; expected HOST[:PORT][,HOST[:PORT]...]")
    targets = []
    for raw in spec.value.split(","):
        item = raw.strip()
        if not item:
            raise spec.error("empty entry in the address list")
        targets.append(_parse_host_port(spec, item))
    return StaticBootstrap(targets)


def _dns_factory(spec: BootstrapSpec) -> BootstrapSource:
    name, separator, port_text = spec.value.partition(":")
    if not name:
        raise spec.error("missing name; expected dns:NAME[:PORT]")
    if ":" in port_text:
        raise spec.error("expected dns:NAME[:PORT]")
    if _ip_or_none(name) is not None:
        raise spec.error(f"{name!r} is an IP address, not a name; use static:{name}")
    _check_name(spec, name)
    port = _parse_port(spec, port_text) if separator else spec.default_port
    return DnsBootstrap(name, port, nameserver=spec.dns_server)


register_kind("static", _static_factory)
register_kind("dns", _dns_factory)

# The orchestrator kinds (HTTP API clients) live in their own module, which subclasses
# BootstrapSource: it is imported here, below what it uses, and its factories are looked
# up when a spec is parsed, so either module may be imported first.
from mirror.routing import orchestrators  # noqa: E402

register_kind("kubernetes", lambda spec: orchestrators.kubernetes_factory(spec))
register_kind("nomad", lambda spec: orchestrators.nomad_factory(spec))


def _parse_host_port(spec: BootstrapSpec, item: str) -> Peer:
    """``HOST``, ``HOST:PORT``, ``[IPv6]`` or ``[IPv6]:PORT``; HOST an IPv4 or a name."""
    if item.startswith("["):
        host, bracket, rest = item[1:].partition("]")
        if not bracket or not isinstance(_ip_or_none(host), ipaddress.IPv6Address):
            raise spec.error(f"{item!r} is not [IPv6] or [IPv6]:PORT")
        if rest and not rest.startswith(":"):
            raise spec.error(f"unexpected {rest!r} after {'[' + host + ']'!r}")
        return str(ipaddress.ip_address(host)), _port_or_default(spec, rest)
    if item.count(":") > 1:
        raise spec.error(f"{item!r}: write IPv6 addresses in brackets, e.g. [{item}]")
    host, _, rest = item.partition(":")
    if not host:
        raise spec.error(f"{item!r} has no host")
    if _ip_or_none(host) is None:
        _check_name(spec, host)
    return host, _port_or_default(spec, ":" + rest if ":" in item else "")


def _port_or_default(spec: BootstrapSpec, colon_port: str) -> int:
    """``""`` -> the default port; ``":N"`` -> N."""
    return _parse_port(spec, colon_port[1:]) if colon_port else spec.default_port


def _parse_port(spec: BootstrapSpec, text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise spec.error(f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise spec.error(f"port {port} is out of range 1-65535")
    return port


def _check_name(spec: BootstrapSpec, name: str) -> None:
    labels = name.removesuffix(".").split(".")
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise spec.error(f"{name!r} is not a valid host name")
    if all(label.isdigit() for label in labels):
        raise spec.error(f"{name!r} is not a valid IPv4 address")


# --- helpers -------------------------------------------------------------------------------


def _ip_or_none(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _normalise(peer: Peer) -> Peer:
    """One spelling per address (``::0001`` is ``::1``) so dedup and exclude compare right."""
    ip = _ip_or_none(peer[0])
    return (peer[0] if ip is None else str(ip), peer[1])


def _dedup(peers: Iterable[Peer]) -> list[Peer]:
    return list(dict.fromkeys(_normalise(peer) for peer in peers))


def _sorted_ips(ips: Iterable[str]) -> list[str]:
    """IPv4 before IPv6, numerically: DNS rotates record order, a bootstrap list should not."""
    parsed = {ipaddress.ip_address(ip) for ip in ips}
    return [str(ip) for ip in sorted(parsed, key=lambda ip: (ip.version, ip))]


def _format_peer(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
