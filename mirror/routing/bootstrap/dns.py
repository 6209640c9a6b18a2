"""``dns:NAME[:PORT]``: every A and AAAA record of one name, for headless services and Consul.

DNS is asked directly (dnspython, not ``getaddrinfo``) so that every record comes back, not
only the ones the system resolver prefers, and no answer is cached between bootstraps.
"""

from __future__ import annotations

import asyncio
import logging

import dns.asyncresolver
import dns.exception
import dns.resolver

from mirror.routing.bootstrap.base import (
    BootstrapSource,
    BootstrapSpec,
    Peer,
    check_name,
    ip_or_none,
    parse_port,
    sorted_ips,
)

log = logging.getLogger(__name__)

# A lookup that takes longer than this is treated as failed; the caller retries later, so
# waiting longer would only delay a node's start behind a dead resolver.
DNS_LIFETIME = 2.0


class DnsBootstrap(BootstrapSource):
    """All A and AAAA records of one name, as a headless service or Consul DNS serves them.

    ``nameserver=None`` reads ``/etc/resolv.conf`` anew on each call, search domains
    included, so short service names work inside a pod.
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
        return [(ip, self.port) for ip in sorted_ips(v4) + sorted_ips(v6)]

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


def dns_factory(spec: BootstrapSpec) -> DnsBootstrap:
    """Build a ``dns:`` source, asking ``spec.dns_server`` (``--dns-server``) when set."""
    name, separator, port_text = spec.value.partition(":")
    if not name:
        raise spec.error("missing name; expected dns:NAME[:PORT]")
    if ":" in port_text:
        raise spec.error("expected dns:NAME[:PORT]")
    if ip_or_none(name) is not None:
        raise spec.error(f"{name!r} is an IP address, not a name; use static:{name}")
    check_name(spec, name)
    port = parse_port(spec, port_text) if separator else spec.default_port
    return DnsBootstrap(name, port, nameserver=spec.dns_server)
