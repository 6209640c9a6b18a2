"""The node's view of the DHT: announce what it holds, find who holds what, claim fetches.

Built on kademlia's `Server` with `ProviderProtocol`; see protocol.py for what is changed and why.
Every network operation is bounded in time: lookups for a pull have a hard deadline of
`resolve_timeout` (a miss must cost a pull milliseconds, not seconds), maintenance lookups
(provide, withdraw, bootstrap) a few RPC timeouts, and a claim `claim_deadline`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import socket
import time
from collections.abc import Iterable
from typing import TypeVar

from kademlia.network import Server
from kademlia.node import Node

from mirror.clusterkey import ClusterKey
from mirror.errors import ConfigError
from mirror.metrics import Metrics
from mirror.routing import wire
from mirror.routing.auth import DatagramSealer
from mirror.routing.errors import DhtError, DhtNotRunning, Malformed, UnsupportedOperation
from mirror.routing.keys import ID_BYTES, dht_key, distance, stable_node_id
from mirror.routing.lookup import IterativeLookup
from mirror.routing.protocol import DhtSettings, NoValueStorage, ProviderProtocol
from mirror.routing.providers import ClaimStore, Provider, ProviderStore

__all__ = ["DhtNode", "Provider", "dht_key", "stable_node_id"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Maintenance lookups (provide, withdraw, bootstrap crawl) may take this many RPC timeouts.
_CRAWL_TIMEOUTS = 4
# A claim's node lookup may take this many RPC timeouts; the claim request itself gets
# `_CLAIM_REQUEST_TIMEOUTS` of them, twice per arbiter. A claim precedes a transfer of seconds:
# waiting a little longer on a busy arbiter is far cheaper than a second upstream download, which
# is what giving up (or asking another arbiter too soon) costs. Measured: with 24 processes
# starting pulls at once on 2 CPUs, 0.25 s replies were late often enough to split claims
# between two arbiters.
_CLAIM_LOOKUP_TIMEOUTS = 2
_CLAIM_REQUEST_TIMEOUTS = 4
# A claim nobody answers moves on to the next closest node, at most this many in all.
_CLAIM_ARBITERS = 2


def claim_deadline(rpc_timeout: float) -> float:
    """The longest a claim can take: its lookup, then at most two tries at each arbiter."""
    return (_CLAIM_LOOKUP_TIMEOUTS + 2 * _CLAIM_ARBITERS * _CLAIM_REQUEST_TIMEOUTS) * rpc_timeout


# How often buckets not touched for an hour (kademlia's "lonely" ones) are refreshed.
_REFRESH_INTERVAL = 600.0


class _DhtServer(Server):
    """kademlia's `Server` building a `ProviderProtocol`; its plain-value API is disabled."""

    protocol_class = ProviderProtocol

    def __init__(
        self,
        *,
        node_id: bytes,
        settings: DhtSettings,
        sealer: DatagramSealer,
        providers: ProviderStore,
        claims: ClaimStore,
        metrics: Metrics | None,
    ) -> None:
        super().__init__(
            ksize=settings.ksize, alpha=settings.alpha, node_id=node_id, storage=NoValueStorage()
        )
        self._settings = settings
        self._sealer = sealer
        self._providers = providers
        self._claims = claims
        self._metrics = metrics

    def _create_protocol(self) -> ProviderProtocol:
        return ProviderProtocol(
            self.node,
            self.storage,
            self.ksize,
            settings=self._settings,
            sealer=self._sealer,
            providers=self._providers,
            claims=self._claims,
            metrics=self._metrics,
        )

    def refresh_table(self, interval: float = 3600) -> None:
        """Disabled: `DhtNode` runs its own bounded refresh task (kademlia's is unbounded)."""

    async def bootstrap(self, addrs: list[tuple[str, int]]) -> list[Node]:
        raise UnsupportedOperation("use DhtNode.bootstrap")

    async def get(self, key: object) -> object:
        raise UnsupportedOperation("plain DHT values are disabled; use provider records")

    async def set(self, key: object, value: object) -> bool:
        raise UnsupportedOperation("plain DHT values are disabled; use provider records")

    async def set_digest(self, dkey: bytes, value: object) -> bool:
        raise UnsupportedOperation("plain DHT values are disabled; use provider records")


class DhtNode:
    """This node's membership in the cluster DHT of provider records.

    `ksize` copies of each record are kept (on the nodes closest to its key), `alpha` queries run
    in parallel per lookup, `rpc_timeout` bounds one RPC, `resolve_timeout` one `find_providers`,
    `record_ttl` how long a record (or a claim) lives unless re-announced. The two reply caps
    keep every reply inside one datagram (the byte budget in wire.py trims further if addresses
    are long).
    """

    def __init__(
        self,
        *,
        node_id: bytes,
        http_address: str,
        cluster_key: ClusterKey,
        ksize: int = 20,
        alpha: int = 3,
        rpc_timeout: float = 0.25,
        resolve_timeout: float = 0.02,
        record_ttl: float = 600.0,
        max_providers_per_reply: int = 8,
        max_contacts_per_reply: int = 12,
        metrics: Metrics | None = None,
    ) -> None:
        if not isinstance(node_id, bytes) or len(node_id) != ID_BYTES:
            raise ConfigError(f"a DHT node id is {ID_BYTES} bytes")
        try:
            wire.http_address(http_address)
        except Malformed as exc:
            raise ConfigError(f"not a host:port address: {http_address!r}") from exc
        for name, value in (("ksize", ksize), ("alpha", alpha)):
            if value < 1:
                raise ConfigError(f"DHT {name} must be at least 1")
        for name, number in (
            ("rpc_timeout", rpc_timeout),
            ("resolve_timeout", resolve_timeout),
            ("record_ttl", record_ttl),
        ):
            if not number > 0:
                raise ConfigError(f"DHT {name} must be positive")
        if max_providers_per_reply < 1 or max_contacts_per_reply < 1:
            raise ConfigError("DHT reply caps must be at least 1")
        self.node_id = node_id
        self.http_address = http_address
        self._settings = DhtSettings(
            ksize=ksize,
            alpha=alpha,
            rpc_timeout=rpc_timeout,
            record_ttl=record_ttl,
            max_providers_per_reply=max_providers_per_reply,
            max_contacts_per_reply=max_contacts_per_reply,
        )
        self._resolve_timeout = resolve_timeout
        self._metrics = metrics
        self._store = ProviderStore(on_change=self._records_changed)
        self._claims = ClaimStore()
        # Key -> the remote arbiters our claim of it was sent to, and until when it lives:
        # `release` goes straight there (a claim may be held even if its reply was lost).
        self._claimed_at: dict[bytes, tuple[tuple[Node, ...], float]] = {}
        self._server = _DhtServer(
            node_id=node_id,
            settings=self._settings,
            sealer=DatagramSealer(cluster_key.purpose("dht")),
            providers=self._store,
            claims=self._claims,
            metrics=metrics,
        )
        self._protocol: ProviderProtocol | None = None
        self._refresh: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- lifecycle

    async def listen(self, host: str, port: int) -> None:
        """Bind the UDP endpoint (port 0 picks a free one; see `router_address`)."""
        if self._protocol is not None:
            raise DhtError("the DHT node is already listening")
        try:
            await self._server.listen(port, interface=host)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for the DHT on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        self._protocol = self._server.protocol
        self._refresh = asyncio.create_task(self._refresh_loop(), name="dht-refresh")
        log.debug("DHT node %s listening on %s", self.node_id.hex(), self.router_address)

    async def close(self) -> None:
        """Stop the endpoint; outstanding lookups end at once with what they had."""
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
            self._refresh = None
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.shutdown()
        self._server.stop()
        self._store.close()
        if protocol is not None:
            # The port is free only once asyncio has closed the socket (a restart rebinds it).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await protocol.connection_closed.wait()

    @property
    def router_address(self) -> tuple[str, int]:
        """The bound UDP address (``0.0.0.0`` or ``::`` when bound to every interface)."""
        transport = self._running().transport
        sockname = transport.get_extra_info("sockname")
        return (sockname[0], sockname[1])

    def contact_count(self) -> int:
        return self._protocol.contact_count() if self._protocol is not None else 0

    def local_providers(self, text: str) -> list[Provider]:
        """Live records this node itself stores for `text` (its own included): introspection."""
        return self._store.providers(dht_key(text))

    def local_claim(self, text: str) -> Provider | None:
        """The live claim of `text` this node itself keeps (as the closest node): introspection."""
        return self._claims.holder(dht_key(text))

    # ----------------------------------------------------------------- membership

    async def bootstrap(self, addresses: list[tuple[str, int]]) -> int:
        """Ping `addresses` (skipping our own), then crawl towards our own id.

        Returns the number of contacts known afterwards. Dead or unresolvable addresses are
        skipped; the whole call takes at most about `_CRAWL_TIMEOUTS + 2` RPC timeouts.
        """
        protocol = self._running()
        own = self.router_address
        targets = [address for address in await self._resolve(addresses) if address != own]
        pings = {protocol.request_ping(address): address for address in targets}
        if pings:
            await asyncio.wait(pings)
        for future, (host, port) in pings.items():
            peer_id = future.result()
            if peer_id is not None and peer_id != self.node_id:
                protocol.welcome_if_new(Node(peer_id, host, port))
        await self._closest_nodes(self.node_id)
        count = self.contact_count()
        log.debug(
            "DHT bootstrap: %d of %d addresses answered, %d contacts",
            len(pings),
            len(addresses),
            count,
        )
        return count

    # ----------------------------------------------------------------- records

    async def provide(self, text: str) -> bool:
        """Announce this node as a provider of `text` to the k nodes closest to its key.

        True if at least one node (this one included, when it is among the closest) stored
        the record. Re-announcing before `record_ttl` runs out is the caller's job.
        """
        protocol = self._running()
        key = dht_key(text)
        closest = await self._closest_nodes(key)
        stored_here = len(closest) < self._settings.ksize or distance(self.node_id, key) < distance(
            closest[-1].id, key
        )
        if stored_here:
            self._store.put(key, self._self_provider(), self._settings.record_ttl)
        replies = await _settle(
            protocol.request_add_provider(node, key, self.http_address, self._settings.record_ttl)
            for node in closest
        )
        accepted = sum(1 for reply in replies if reply is True)
        log.debug("provided %s: %d remote copies, local=%s", text, accepted, stored_here)
        return stored_here or accepted > 0

    async def withdraw(self, text: str) -> None:
        """Best effort: drop our record from the closest nodes (the rest expire with the TTL)."""
        key = dht_key(text)
        self._store.remove(key, self.node_id)
        protocol = self._protocol
        if protocol is None:
            return
        closest = await self._closest_nodes(key)
        await _settle(protocol.request_remove_provider(node, key) for node in closest)

    async def find_providers(
        self, text: str, want: int = 2, *, timeout: float | None = None
    ) -> list[Provider]:
        """Providers of `text` other than this node, local records first.

        Stops as soon as `want` are known, and in any case at the deadline (`timeout`, by default
        `resolve_timeout`), returning what was found by then (possibly nothing). May return more
        than `want` when one reply carried more: the extra ones are fallbacks for the caller.
        """
        protocol = self._running()
        started = time.perf_counter()
        key = dht_key(text)
        lookup = IterativeLookup(
            key,
            self_id=self.node_id,
            query=lambda node: protocol.request_get_providers(node, key),
            k=self._settings.ksize,
            alpha=self._settings.alpha,
            want=want,
            accept=self._is_peer,
            providers=self._store.providers(
                key,
                exclude=(self.node_id,),
                limit=max(want, self._settings.max_providers_per_reply),
            ),
        )
        if not lookup.satisfied():
            deadline = self._resolve_timeout if timeout is None else timeout
            remaining = deadline - (time.perf_counter() - started)
            seeds = protocol.router.find_neighbors(Node(key), k=self._settings.ksize)
            if remaining > 0 and seeds:
                try:
                    async with asyncio.timeout(remaining):
                        await lookup.run(seeds)
                except TimeoutError:
                    log.debug("provider lookup for %s hit its %.3f s deadline", text, remaining)
        found = list(lookup.providers.values())
        if self._metrics is not None:
            self._metrics.peer_lookup_duration.labels("found" if found else "missing").observe(
                time.perf_counter() - started
            )
        return found

    # ----------------------------------------------------------------- claims

    async def claim(self, text: str, ttl: float = 30.0) -> Provider | None:
        """Claim the upstream fetch of `text` for this node, across the cluster.

        The claim is kept by an arbiter: the node closest to the key of `text` (this node itself
        when it knows none closer); it serialises competing claims. Returns None when this node
        holds the claim now and should fetch, or the provider (node id and HTTP address) of the
        node that already holds a live claim: stream from that one. Claiming again as the holder
        renews the claim; it lives `ttl` seconds (at most `record_ttl`) from the last claim,
        unless released.

        Every node must pick the same arbiter, so a node that was merely slow to answer the
        lookup stays a candidate: on a busy machine a late reply is far likelier than a dead
        node, and dropping it would elect a second arbiter and a second upstream fetch. When the
        arbiter does not answer the claim, the next closest node arbitrates: every claimer falls
        back the same way, so a dead arbiter still yields one fetch.

        Hard deadline (`claim_deadline`): the lookup gets `_CLAIM_LOOKUP_TIMEOUTS` RPC timeouts,
        each of at most `_CLAIM_ARBITERS` arbiters two tries of `_CLAIM_REQUEST_TIMEOUTS` (one
        if it did not answer the lookup either: a late reply, or a dead node). If none answers,
        returns None: acting alone costs a duplicate upstream fetch, waiting on unreachable
        nodes would cost the pull itself. Concurrent claims from one node for the
        same text all win: coalescing inside a node is the caller's job.
        """
        if not (math.isfinite(ttl) and ttl > 0):
            raise ValueError("a claim's ttl is a positive number of seconds")
        protocol = self._running()
        key = dht_key(text)
        ttl = min(ttl, self._settings.record_ttl)
        self._forget_expired_claims()
        candidates, silent = await self._claim_candidates(key)
        for arbiter in self._arbiters(key, candidates):
            if arbiter is None:
                holder = self._claims.claim(key, self._self_provider(), ttl)
                break
            tries = 1 if arbiter.id in silent else 2
            reply = await self._claim_at(protocol, arbiter, key, ttl, tries)
            if reply is not None:
                holder = reply
                break
            log.debug("claim of %s: no answer from %s", text, arbiter)
        else:
            log.debug("claim of %s: no arbiter answered, fetching alone", text)
            return None
        if holder.node_id == self.node_id:
            return None
        self._claimed_at.pop(key, None)
        log.debug("claim of %s: %s is fetching it", text, holder.address)
        return holder

    def _arbiters(self, key: bytes, candidates: list[Node]) -> list[Node | None]:
        """The nodes to ask for the claim of `key`, in order; None stands for this node."""
        own = distance(self.node_id, key)
        closer = [node for node in candidates if distance(node.id, key) < own]
        if len(closer) >= _CLAIM_ARBITERS:
            return list(closer[:_CLAIM_ARBITERS])
        return [*closer, None]

    async def _claim_at(
        self, protocol: ProviderProtocol, arbiter: Node, key: bytes, ttl: float, tries: int
    ) -> Provider | None:
        """The arbiter's answer to our claim, in `tries` tries; None if it never answered."""
        # Remembered before the reply: a claim whose reply is lost may still be held there.
        asked, _ = self._claimed_at.get(key, ((), 0.0))
        if all(node.id != arbiter.id for node in asked):
            asked = (*asked, arbiter)
        self._claimed_at[key] = (asked, time.monotonic() + ttl)
        for _ in range(tries):
            reply = await asyncio.shield(
                protocol.request_claim(
                    arbiter,
                    key,
                    self.http_address,
                    ttl,
                    timeout=_CLAIM_REQUEST_TIMEOUTS * self._settings.rpc_timeout,
                )
            )
            if reply is not None:
                return reply
        return None

    async def release(self, text: str) -> None:
        """Best effort: drop this node's claim of `text`, once its fetch ended (either way).

        The release goes to the arbiters the claim was sent to (remembered by `claim`, so no
        lookup is needed) and takes at most one RPC timeout; a claim never released expires.
        """
        key = dht_key(text)
        self._claims.release(key, self.node_id)
        asked, _ = self._claimed_at.pop(key, ((), 0.0))
        protocol = self._protocol
        if not asked or protocol is None:
            return
        await asyncio.shield(
            asyncio.gather(*(protocol.request_release(node, key) for node in asked))
        )

    def _forget_expired_claims(self) -> None:
        now = time.monotonic()
        for key in [key for key, (_, until) in self._claimed_at.items() if until <= now]:
            del self._claimed_at[key]

    # ----------------------------------------------------------------- internals

    def _running(self) -> ProviderProtocol:
        if self._protocol is None:
            raise DhtNotRunning("the DHT node is not listening")
        return self._protocol

    def _self_provider(self) -> Provider:
        return Provider(self.node_id, self.http_address)

    def _is_peer(self, provider: Provider) -> bool:
        return provider.node_id != self.node_id and provider.address != self.http_address

    def _records_changed(self, count: int) -> None:
        if self._metrics is not None:
            self._metrics.dht_provider_records.set(count)

    async def _claim_candidates(self, key: bytes) -> tuple[list[Node], set[bytes]]:
        """Nodes that may arbitrate the claim of `key`, closest first, and the silent ones.

        Every node the lookup heard of, whether it answered or not, and every node the routing
        table knows: a reply that came late, or a lookup cut short by a busy moment, must not
        shrink the candidates, or nodes would disagree on the arbiter and two would fetch. The
        ids of those that did not answer the lookup come second: a dead node others still
        list gets one try at the claim, not two, so it costs a claim less time.
        """
        protocol = self._protocol
        assert protocol is not None
        lookup = IterativeLookup(
            key,
            self_id=self.node_id,
            query=lambda node: protocol.request_find_node(node, key),
            k=self._settings.ksize,
            alpha=self._settings.alpha,
        )
        known = protocol.router.find_neighbors(Node(key), k=self._settings.ksize)
        try:
            async with asyncio.timeout(_CLAIM_LOOKUP_TIMEOUTS * self._settings.rpc_timeout):
                await lookup.run(known)
        except TimeoutError:
            log.debug("claim lookup for %s cut short: keeping every known node", key.hex())
        merged = {node.id: node for node in [*lookup.heard_of(), *known]}
        candidates = sorted(
            (node for node in merged.values() if node.id != self.node_id),
            key=lambda node: distance(node.id, key),
        )
        return candidates, lookup.silent()

    async def _closest_nodes(self, target: bytes, *, timeout: float | None = None) -> list[Node]:
        """The k live nodes closest to `target` (not this one), closest first.

        Found within `timeout` (by default the crawl deadline); a lookup cut by it returns the
        closest of the nodes that answered so far.
        """
        protocol = self._protocol
        if protocol is None:
            return []
        lookup = IterativeLookup(
            target,
            self_id=self.node_id,
            query=lambda node: protocol.request_find_node(node, target),
            k=self._settings.ksize,
            alpha=self._settings.alpha,
        )
        seeds = protocol.router.find_neighbors(Node(target), k=self._settings.ksize)
        try:
            async with asyncio.timeout(
                _CRAWL_TIMEOUTS * self._settings.rpc_timeout if timeout is None else timeout
            ):
                await lookup.run(seeds)
        except TimeoutError:
            log.debug("node lookup for %s hit its deadline", target.hex())
        return lookup.closest()

    async def _resolve(self, addresses: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """IP literals pass through; names are resolved concurrently within one RPC timeout.

        Unresolvable names are skipped: bootstrap must not fail because one seed is gone.
        """
        family = self._running().transport.get_extra_info("socket").family
        loop = asyncio.get_running_loop()

        async def one(host: str, port: int) -> tuple[str, int] | None:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                pass
            else:
                return (host, port)
            try:
                async with asyncio.timeout(self._settings.rpc_timeout):
                    infos = await loop.getaddrinfo(
                        host, port, family=family, type=socket.SOCK_DGRAM
                    )
            except (OSError, TimeoutError) as exc:
                log.debug("DHT bootstrap address %s:%s does not resolve: %s", host, port, exc)
                return None
            return (infos[0][4][0], infos[0][4][1]) if infos else None

        results = await asyncio.gather(*(one(host, port) for host, port in addresses))
        return [address for address in results if address is not None]

    async def _refresh_loop(self) -> None:
        """Refresh buckets nobody looked into for an hour (kademlia's section 2.3)."""
        while True:
            await asyncio.sleep(_REFRESH_INTERVAL)
            protocol = self._protocol
            if protocol is None:
                return
            try:
                refresh_ids = protocol.get_refresh_ids()
            except OverflowError:
                continue  # kademlia can draw 2**160, one past the id space; next time then
            for refresh_id in refresh_ids:
                await self._closest_nodes(refresh_id)


async def _settle(futures: Iterable[asyncio.Future[T]]) -> list[T]:
    """Results of RPC futures once all resolve; unlike gather, cancelling the caller spares them."""
    pending = list(futures)
    if pending:
        await asyncio.wait(pending)
    return [future.result() for future in pending]
