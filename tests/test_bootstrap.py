"""Bootstrap sources and the rebootstrap loop: specs, static names, real DNS (dnsmasq)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
from harness.dnsmasq import DOMAIN, Dnsmasq

from mirror.errors import ConfigError
from mirror.routing.bootstrap import (
    BootstrapSource,
    DnsBootstrap,
    Rebootstrapper,
    StaticBootstrap,
    gather_addresses,
    parse_bootstrap,
)

PORT = 7000
PEERS = f"peers.{DOMAIN}"
V4_ONLY = f"v4only.{DOMAIN}"
LOGGER = "mirror.routing.bootstrap"
DEADLINE = 5.0


# --- parsing -------------------------------------------------------------------------------


def test_parse_static_entries() -> None:
    source = parse_bootstrap("static:10.0.0.1:7001, 10.0.0.2,[::1]:7002,[fe80::1],node-a.svc", PORT)
    assert isinstance(source, StaticBootstrap)
    assert source.targets == (
        ("10.0.0.1", 7001),
        ("10.0.0.2", PORT),
        ("::1", 7002),
        ("fe80::1", PORT),
        ("node-a.svc", PORT),
    )


def test_parse_dns_with_and_without_port() -> None:
    server = ("127.0.0.1", 5353)
    source = parse_bootstrap("dns:mirror.default.svc.cluster.local", PORT, dns_server=server)
    assert isinstance(source, DnsBootstrap)
    assert (source.name, source.port, source.nameserver) == (
        "mirror.default.svc.cluster.local",
        PORT,
        server,
    )
    source = parse_bootstrap("dns:mirror.service.consul:7003", PORT)
    assert isinstance(source, DnsBootstrap)
    assert (source.name, source.port, source.nameserver) == ("mirror.service.consul", 7003, None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "expected KIND:VALUE with KIND one of dns, kubernetes, nomad, static"),
        ("10.0.0.1", "expected KIND:VALUE"),
        ("10.0.0.1:7000", "expected KIND:VALUE"),
        ("consul:mirror", "KIND one of dns, kubernetes, nomad, static"),
        ("static:", "empty address list"),
        ("static:10.0.0.1,,10.0.0.2", "empty entry"),
        ("static:10.0.0.1:x", "port 'x' is not a number"),
        ("static:10.0.0.1:", "port '' is not a number"),
        ("static:10.0.0.1:0", "port 0 is out of range 1-65535"),
        ("static:10.0.0.1:65536", "port 65536 is out of range"),
        ("static:::1:7000", "write IPv6 addresses in brackets"),
        ("static:[::1", "is not [IPv6] or [IPv6]:PORT"),
        ("static:[10.0.0.1]:7000", "is not [IPv6]"),
        ("static:[::1]7000", "unexpected '7000'"),
        ("static::7000", "has no host"),
        ("static:bad_host!:7000", "'bad_host!' is not a valid host name"),
        ("static:10.0.0.300", "'10.0.0.300' is not a valid IPv4 address"),
        ("dns:", "missing name"),
        ("dns::7000", "missing name"),
        ("dns:peers:70000", "port 70000 is out of range"),
        ("dns:peers:1:2", "expected dns:NAME[:PORT]"),
        ("dns:10.0.0.1", "is an IP address, not a name; use static:10.0.0.1"),
        ("dns:-peers", "not a valid host name"),
    ],
)
def test_parse_rejects_bad_specs(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_bootstrap(text, PORT)
    message = str(info.value)
    assert expected in message
    assert message.startswith(f"--bootstrap {text!r}: ")
    assert "\n" not in message


# --- static --------------------------------------------------------------------------------


async def test_static_ips_are_normalised_and_deduplicated() -> None:
    source = StaticBootstrap(
        [("127.0.0.2", PORT), ("::1", PORT), ("127.0.0.2", PORT), ("0:0::1", PORT), ("::1", 7001)]
    )
    assert await source.addresses() == [("127.0.0.2", PORT), ("::1", PORT), ("::1", 7001)]


async def test_static_resolves_localhost_to_ips() -> None:
    addresses = await parse_bootstrap("static:localhost,127.0.0.1", PORT).addresses()
    assert ("127.0.0.1", PORT) in addresses
    assert len(addresses) == len(set(addresses))  # localhost's 127.0.0.1 counted once
    for host, port in addresses:
        assert port == PORT
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)


async def test_static_unresolvable_name_gives_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    source = StaticBootstrap([("no-such-host.invalid", PORT), ("127.0.0.2", PORT)], timeout=2.0)
    assert await source.addresses() == [("127.0.0.2", PORT)]
    assert "cannot resolve no-such-host.invalid" in caplog.text


async def test_gather_excludes_own_address() -> None:
    sources: list[BootstrapSource] = [
        StaticBootstrap([("127.0.0.1", PORT), ("127.0.0.2", PORT)]),
        StaticBootstrap([("127.0.0.2", PORT), ("127.0.0.1", 7001)]),
    ]
    addresses = await gather_addresses(sources, exclude={("127.0.0.1", PORT)})
    assert addresses == [("127.0.0.2", PORT), ("127.0.0.1", 7001)]


async def test_gather_survives_a_broken_source(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(BootstrapSource):
        async def addresses(self) -> list[tuple[str, int]]:
            raise RuntimeError("bug")

    caplog.set_level(logging.ERROR, logger=LOGGER)
    sources = [Broken(), StaticBootstrap([("127.0.0.2", PORT)])]
    assert await gather_addresses(sources) == [("127.0.0.2", PORT)]
    assert "source failed" in caplog.text


# --- DNS against a real dnsmasq ------------------------------------------------------------


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    server = Dnsmasq(
        tmp_path / "dnsmasq",
        {
            # Out of order on purpose: the source sorts, DNS may rotate.
            PEERS: ["127.0.0.3", "127.0.0.2", "127.0.0.4", "::1"],
            V4_ONLY: ["127.0.0.9"],
        },
    )
    server.start()
    yield server
    server.stop()


async def test_dns_returns_all_a_and_aaaa_records(dnsmasq: Dnsmasq) -> None:
    source = DnsBootstrap(PEERS, PORT, nameserver=dnsmasq.address)
    expected = [("127.0.0.2", PORT), ("127.0.0.3", PORT), ("127.0.0.4", PORT), ("::1", PORT)]
    assert await source.addresses() == expected
    assert await source.addresses() == expected  # asked again, same order
    assert "query[AAAA] " + PEERS in dnsmasq.process.log_text()


async def test_dns_spec_port_applies_to_every_record(dnsmasq: Dnsmasq) -> None:
    source = parse_bootstrap(f"dns:{PEERS}:7001", PORT, dns_server=dnsmasq.address)
    addresses = await source.addresses()
    assert [host for host, _ in addresses] == ["127.0.0.2", "127.0.0.3", "127.0.0.4", "::1"]
    assert {port for _, port in addresses} == {7001}


async def test_dns_name_without_aaaa_is_fine(
    dnsmasq: Dnsmasq, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    source = DnsBootstrap(V4_ONLY, PORT, nameserver=dnsmasq.address)
    assert await source.addresses() == [("127.0.0.9", PORT)]
    assert caplog.text == ""


async def test_dns_unknown_name_gives_nothing(
    dnsmasq: Dnsmasq, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    source = DnsBootstrap(f"nobody.{DOMAIN}", PORT, nameserver=dnsmasq.address)
    assert await source.addresses() == []
    assert "no such name" in caplog.text


async def test_dns_stopped_server_gives_nothing_within_lifetime(
    dnsmasq: Dnsmasq, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    dnsmasq.stop()
    source = DnsBootstrap(PEERS, PORT, nameserver=dnsmasq.address, lifetime=0.5)
    started = time.monotonic()
    assert await source.addresses() == []
    assert time.monotonic() - started < 0.5 + 1.0
    assert "lookup failed" in caplog.text


async def test_dns_silent_server_gives_nothing_within_lifetime(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A nameserver that takes packets and never answers: only the lifetime ends the wait."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        source = DnsBootstrap(PEERS, PORT, nameserver=silent.getsockname(), lifetime=0.5)
        started = time.monotonic()
        assert await source.addresses() == []
        elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 0.5 + 1.0
    assert "lookup failed" in caplog.text


# --- Rebootstrapper ------------------------------------------------------------------------


class FakeNode:
    """Stands in for the DHT node: records bootstrap calls, holds a settable contact count.

    ``changed`` is set on every bootstrap call and every contact_count read, so tests wait
    for the loop to make progress instead of sleeping.
    """

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, int]]] = []
        self.contacts = 0
        self.reads = 0
        self.failures_left = 0
        self.answer: int | None = None  # None: as many contacts as addresses given
        self.changed = asyncio.Event()

    async def bootstrap(self, addresses: list[tuple[str, int]]) -> int:
        self.calls.append(addresses)
        self.changed.set()
        if self.failures_left:
            self.failures_left -= 1
            raise ConnectionError("bootstrap RPCs failed")
        self.contacts = len(addresses) if self.answer is None else self.answer
        return self.contacts

    def contact_count(self) -> int:
        self.reads += 1
        self.changed.set()
        return self.contacts

    async def wait_until(self, calls: int = 0, reads: int = 0) -> None:
        async def reached() -> None:
            while len(self.calls) < calls or self.reads < reads:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(reached(), DEADLINE)


@contextlib.asynccontextmanager
async def running(rebootstrapper: Rebootstrapper) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(rebootstrapper.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


OWN = ("127.0.0.1", PORT)
PEER_SOURCE = StaticBootstrap([OWN, ("127.0.0.2", PORT), ("127.0.0.3", PORT)])


def make(
    node: FakeNode,
    *,
    refresh_interval: float = 60.0,
    sources: Sequence[BootstrapSource] | None = None,
) -> Rebootstrapper:
    return Rebootstrapper(
        sources if sources is not None else [PEER_SOURCE],
        node.bootstrap,
        node.contact_count,
        own_address=OWN,
        check_interval=0.01,
        refresh_interval=refresh_interval,
    )


async def test_bootstraps_at_start_and_when_table_empties() -> None:
    node = FakeNode()
    async with running(make(node)):
        await node.wait_until(calls=1)
        assert node.calls == [[("127.0.0.2", PORT), ("127.0.0.3", PORT)]]  # never ourselves
        # While the table holds contacts the loop keeps checking but does not bootstrap.
        await node.wait_until(reads=node.reads + 5)
        assert len(node.calls) == 1
        node.contacts = 0  # every peer went away
        await node.wait_until(calls=2)
        assert node.calls[1] == node.calls[0]


async def test_failing_bootstrap_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    node = FakeNode()
    node.failures_left = 1
    async with running(make(node)) as task:
        await node.wait_until(calls=2)
        assert not task.done()
        assert node.contacts == 2
    assert "bootstrap failed" in caplog.text
    assert "bootstrap RPCs failed" in caplog.text


async def test_refreshes_periodically_while_connected() -> None:
    node = FakeNode()
    async with running(make(node, refresh_interval=0.05)):
        await node.wait_until(calls=3)
    assert node.contacts == 2


async def test_lone_node_keeps_retrying() -> None:
    """Peers found but none answer (the bootstrap gives 0 contacts): back off, never stop."""
    node = FakeNode()
    node.answer = 0
    async with running(make(node, refresh_interval=0.05)) as task:
        await node.wait_until(calls=4)
        assert not task.done()


async def test_bootstrap_once_without_peers_skips_the_callable() -> None:
    node = FakeNode()
    node.contacts = 3  # others found us meanwhile
    rebootstrapper = make(node, sources=[StaticBootstrap([OWN])])
    assert await rebootstrapper.bootstrap_once() == 3
    assert node.calls == []


async def test_bootstrap_once_propagates_callable_errors() -> None:
    node = FakeNode()
    node.failures_left = 1
    with pytest.raises(ConnectionError):
        await make(node).bootstrap_once()


async def test_rebootstraps_from_dns(dnsmasq: Dnsmasq) -> None:
    node = FakeNode()
    source = DnsBootstrap(PEERS, PORT, nameserver=dnsmasq.address)
    rebootstrapper = Rebootstrapper(
        [source],
        node.bootstrap,
        node.contact_count,
        own_address=("127.0.0.3", PORT),
        check_interval=0.01,
    )
    async with running(rebootstrapper):
        await node.wait_until(calls=1)
    assert node.calls == [[("127.0.0.2", PORT), ("127.0.0.4", PORT), ("::1", PORT)]]
