"""A real dnsmasq serving fixed A/AAAA records on loopback, for DNS bootstrap tests.

It stands in for the cluster DNS (a Kubernetes headless service, Consul): one name with
several records. Names under its domain that it does not know get NXDOMAIN (``--local``),
as a cluster DNS would answer; it never forwards anywhere (``--no-resolv``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import dns.exception
import dns.resolver

from .net import POLL_INTERVAL, free_port
from .process import ManagedProcess

DNSMASQ_BINARY = "dnsmasq"
DOMAIN = "mirror.test"


def free_udp_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host``: dnsmasq binds both for DNS."""
    for _ in range(100):
        port = free_port(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free for both UDP and TCP")


class Dnsmasq:
    """dnsmasq on ``127.0.0.1:port`` answering ``records`` (name -> IPv4/IPv6 addresses).

    Each address becomes one ``--host-record``; several for one name give several A (or
    AAAA) records in one answer. Names should lie under ``DOMAIN``.
    """

    def __init__(
        self,
        base_dir: Path,
        records: Mapping[str, Sequence[str]],
        *,
        port: int | None = None,
    ) -> None:
        if not records:
            raise ValueError("dnsmasq needs at least one record (readiness queries it)")
        self.base_dir = base_dir
        self.records = {name: list(ips) for name, ips in records.items()}
        self.host = "127.0.0.1"
        self.port = port or free_udp_tcp_port(self.host)
        base_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            DNSMASQ_BINARY,
            "--keep-in-foreground",  # --no-daemon is debug mode: no pid file, serial TCP
            "--conf-file=/dev/null",  # ignore /etc/dnsmasq.conf and its conf-dir
            "--no-resolv",
            "--no-hosts",
            f"--local=/{DOMAIN}/",
            f"--listen-address={self.host}",
            "--bind-interfaces",
            f"--port={self.port}",
            f"--pid-file={base_dir / 'dnsmasq.pid'}",
            "--log-facility=-",  # stderr, i.e. the ManagedProcess log
            "--log-queries",
        ]
        argv += [f"--host-record={n},{ip}" for n, ips in self.records.items() for ip in ips]
        self.process = ManagedProcess(argv, base_dir, "dnsmasq")

    @property
    def address(self) -> tuple[str, int]:
        """``(ip, port)`` as DnsBootstrap's ``nameserver`` takes it."""
        return (self.host, self.port)

    def start(self, timeout: float = 10.0) -> None:
        """Start and return once a real query for the first record is answered."""
        self.process.start()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.process.stop()
            raise

    def stop(self) -> None:
        self.process.stop()

    def _wait_ready(self, timeout: float) -> None:
        name, ips = next(iter(self.records.items()))
        rdtype = "AAAA" if ":" in ips[0] else "A"
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.cache = None
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            self.process.ensure_running()
            try:
                resolver.resolve(name, rdtype, lifetime=0.2)
                return
            except dns.exception.DNSException as exc:
                last_error = exc
            time.sleep(POLL_INTERVAL)
        raise TimeoutError(
            f"dnsmasq on port {self.port} did not answer in {timeout}s: {last_error}"
        )
