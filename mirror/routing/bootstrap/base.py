"""What every bootstrap source shares: the interface, the parsed spec, and address helpers.

A ``--bootstrap`` value names a *source* of peer addresses rather than the addresses
themselves, because in a cluster peers come and go: a headless Kubernetes service or a
Consul name is asked again on every bootstrap, so a node that restarts, or a cluster that
was down entirely, finds whoever is there now. Sources return IP addresses only (the DHT
keys contacts by IP) and never raise for a failed lookup: an empty answer just means
"try again later", which is the ``Rebootstrapper``'s job.

This module imports no source. Every source module imports it, and the package's
``__init__`` imports every source, so the imports form a tree: no module needs another to
have finished loading first, and no table is filled in as a side effect of an import.
"""

from __future__ import annotations

import ipaddress
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mirror.errors import ConfigError
from mirror.ports import port_number
from mirror.routing.bootstrap.env import OrchestratorEnv

Peer = tuple[str, int]

_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


class BootstrapSource(ABC):
    """Something that can be asked, repeatedly, for the current addresses of peers."""

    @abstractmethod
    async def addresses(self) -> list[Peer]:
        """IP addresses with ports, deduplicated, in a stable order; ``[]`` if lookup failed.

        A lookup failure is logged, never raised: the caller retries on its own schedule.
        """


@dataclass(frozen=True, slots=True)
class BootstrapSpec:
    """One ``--bootstrap`` value split into kind and value, with what its parser may need.

    Every kind's factory gets the whole spec, so all factories share one signature:
    ``dns_server`` matters to ``dns:`` only, ``env`` to ``kubernetes:`` and ``nomad:`` only.
    """

    text: str
    kind: str
    value: str
    default_port: int
    dns_server: Peer | None = None
    env: OrchestratorEnv = field(default_factory=OrchestratorEnv)

    def error(self, problem: str) -> ConfigError:
        """A one-line ConfigError naming the flag value, for factories to raise."""
        return ConfigError(f"--bootstrap {self.text!r}: {problem}")


SourceFactory = Callable[[BootstrapSpec], BootstrapSource]


# --- checking what a spec says --------------------------------------------------------------


def parse_port(spec: BootstrapSpec, text: str) -> int:
    """A port number 1-65535 written in a spec; ConfigError otherwise."""
    if not (text.isascii() and text.isdigit()):
        raise spec.error(f"port {text!r} is not a number")
    port = port_number(text)
    if port is None:
        raise spec.error(f"port {text} is out of range 1-65535")
    return port


def valid_port_number(value: object) -> bool:
    """An int (not a bool) in 1-65535, as a port in a JSON answer must be."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def check_name(spec: BootstrapSpec, name: str) -> None:
    """ConfigError unless ``name`` is a DNS host name (and not a malformed IPv4 address)."""
    labels = name.removesuffix(".").split(".")
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise spec.error(f"{name!r} is not a valid host name")
    if all(label.isdigit() for label in labels):
        raise spec.error(f"{name!r} is not a valid IPv4 address")


# --- addresses ------------------------------------------------------------------------------


def ip_or_none(text: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address ``text`` spells, or None (also for what is not a string at all)."""
    if not isinstance(text, str):
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def normalise(peer: Peer) -> Peer:
    """One spelling per address (``::0001`` is ``::1``) so dedup and exclude compare right."""
    ip = ip_or_none(peer[0])
    return (peer[0] if ip is None else str(ip), peer[1])


def dedup(peers: Iterable[Peer]) -> list[Peer]:
    """Normalised, first occurrence kept, in the order given."""
    return list(dict.fromkeys(normalise(peer) for peer in peers))


def sorted_ips(ips: Iterable[str]) -> list[str]:
    """IPv4 before IPv6, numerically: DNS rotates record order, a bootstrap list should not."""
    parsed = {ipaddress.ip_address(ip) for ip in ips}
    return [str(ip) for ip in sorted(parsed, key=lambda ip: (ip.version, ip))]


def ordered(peers: Iterable[Peer]) -> list[Peer]:
    """IP peers deduplicated, IPv4 before IPv6, numerically: API list order is no promise."""
    unique = {(ipaddress.ip_address(host), port) for host, port in peers}
    return [(str(ip), port) for ip, port in sorted(unique, key=lambda p: (p[0].version, p))]


def format_peer(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
