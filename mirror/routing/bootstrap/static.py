"""``static:HOST[:PORT][,HOST[:PORT]...]``: a fixed list of peers, for small or fixed clusters.

The list is fixed but names in it are resolved on every bootstrap, not once at start: a
name that does not resolve yet (DNS not ready) or that moved to another IP is picked up on
the next attempt.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Sequence

from mirror.routing.bootstrap.base import (
    BootstrapSource,
    BootstrapSpec,
    Peer,
    check_name,
    dedup,
    format_peer,
    ip_or_none,
    parse_port,
    sorted_ips,
)

log = logging.getLogger(__name__)

# A lookup that takes longer than this is treated as failed; the caller retries later, so
# waiting longer would only delay a node's start behind a dead resolver.
NAME_LOOKUP_TIMEOUT = 5.0


class StaticBootstrap(BootstrapSource):
    """A fixed list of ``(host, port)``; names are resolved on every call, not once."""

    def __init__(self, targets: Sequence[Peer], *, timeout: float = NAME_LOOKUP_TIMEOUT) -> None:
        self.targets = tuple(targets)
        self.timeout = timeout

    def __str__(self) -> str:
        return "static:" + ",".join(format_peer(host, port) for host, port in self.targets)

    async def addresses(self) -> list[Peer]:
        resolved = await asyncio.gather(*(self._resolve(host, port) for host, port in self.targets))
        return dedup(peer for peers in resolved for peer in peers)

    async def _resolve(self, host: str, port: int) -> list[Peer]:
        literal = ip_or_none(host)
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
        ips = sorted_ips(str(info[4][0]) for info in infos)
        return [(ip, port) for ip in ips]


def static_factory(spec: BootstrapSpec) -> StaticBootstrap:
    """Build a ``static:`` source; ConfigError for an empty list or a malformed entry."""
    if not spec.value.strip():
        raise spec.error("empty address list; expected HOST[:PORT][,HOST[:PORT]...]")
    targets = []
    for raw in spec.value.split(","):
        item = raw.strip()
        if not item:
            raise spec.error("empty entry in the address list")
        targets.append(_parse_host_port(spec, item))
    return StaticBootstrap(targets)


def _parse_host_port(spec: BootstrapSpec, item: str) -> Peer:
    """``HOST``, ``HOST:PORT``, ``[IPv6]`` or ``[IPv6]:PORT``; HOST an IPv4 or a name."""
    if item.startswith("["):
        host, bracket, rest = item[1:].partition("]")
        if not bracket or not isinstance(ip_or_none(host), ipaddress.IPv6Address):
            raise spec.error(f"{item!r} is not [IPv6] or [IPv6]:PORT")
        if rest and not rest.startswith(":"):
            raise spec.error(f"unexpected {rest!r} after {'[' + host + ']'!r}")
        return str(ipaddress.ip_address(host)), _port_or_default(spec, rest)
    if item.count(":") > 1:
        raise spec.error(f"{item!r}: write IPv6 addresses in brackets, e.g. [{item}]")
    host, _, rest = item.partition(":")
    if not host:
        raise spec.error(f"{item!r} has no host")
    if ip_or_none(host) is None:
        check_name(spec, host)
    return host, _port_or_default(spec, ":" + rest if ":" in item else "")


def _port_or_default(spec: BootstrapSpec, colon_port: str) -> int:
    """``""`` -> the default port; ``":N"`` -> N."""
    return parse_port(spec, colon_port[1:]) if colon_port else spec.default_port
