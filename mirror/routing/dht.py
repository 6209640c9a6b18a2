"""`DhtNode`: this node's membership in the cluster DHT of provider records; a `Router` and a
`Broadcaster`.

A facade that wires the routing modules together, one job each: rpc.py (the UDP endpoint:
sealing, validation, pending calls), handlers.py (what this node answers), client.py (what it
asks), table.py (who it knows), lookup.py (iterative lookups), crawl.py (bootstrap and the
maintenance walks), providers.py (the records and claims it keeps for others), claims.py
(claiming a fetch) and broadcast.py (flooding small messages to every node). What remains here
is the public surface: lifecycle, announcing and finding providers, and broadcast.

Every network operation is bounded in time: lookups for a pull have a hard deadline of
`resolve_timeout` (a miss must cost a pull milliseconds, not seconds), maintenance lookups
(provide, withdraw, bootstrap) a few RPC timeouts, and a claim `claim_deadline`.

Nothing from kademlia is used here. Its `Server` and protocol are not used at all: they would
have to be disabled piece by piece (plain values, unbounded refresh, 5 s timeouts, no
authentication); the only parts of the package left are `RoutingTable` and `Node` (table.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from mirror.clusterkey import ClusterKey
from mirror.errors import ConfigError
from mirror.metrics import Metrics
from mirror.routing import wire
from mirror.routing.announce import Announcer
from mirror.routing.auth import DatagramSealer
from mirror.routing.broadcast import Flooder
from mirror.routing.claims import Claimer
from mirror.routing.client import DhtClient, settle
from mirror.routing.crawl import Crawler
from mirror.routing.errors import DhtError, DhtNotRunning, Malformed
from mirror.routing.handlers import RequestHandlers
from mirror.routing.keys import ID_BYTES, dht_key, distance
from mirror.routing.lookup import IterativeLookup
from mirror.routing.messages import check_message, check_topic
from mirror.routing.providers import ClaimStore, ProviderStore
from mirror.routing.router import Provider
from mirror.routing.rpc import Address, RpcEndpoint
from mirror.routing.settings import DhtSettings
from mirror.routing.table import Contact, ContactTable

# Provider, dht_key and stable_node_id are re-exported: callers name them from here.

log = logging.getLogger(__name__)


# A key announced less than this fraction of the record TTL ago is not announced again: its
# records are fresh wherever they were stored (a re-announce tick comes at half the TTL).
_FRESH_FRACTION = 4
# A peer's answer to an announcement is awaited this many RPC timeouts (announce.py).
_ANNOUNCE_TIMEOUTS = 4


class DhtNode:
    """This node's membership in the cluster DHT of provider records (see `DhtSettings`)."""

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
        broadcast_fanout: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if not isinstance(node_id, bytes) or len(node_id) != ID_BYTES:
            raise ConfigError(f"a DHT node id is {ID_BYTES} bytes")
        try:
            wire.http_address(http_address)
        except Malformed as exc:
            raise ConfigError(f"not a host:port address: {http_address!r}") from exc
        self.node_id = node_id
        self.http_address = http_address
        self._settings = settings = DhtSettings(
            ksize=ksize,
            alpha=alpha,
            rpc_timeout=rpc_timeout,
            resolve_timeout=resolve_timeout,
            record_ttl=record_ttl,
            max_providers_per_reply=max_providers_per_reply,
            max_contacts_per_reply=max_contacts_per_reply,
            broadcast_fanout=broadcast_fanout,
        )
        self._metrics = metrics
        self._store = ProviderStore(on_change=self._records_changed)
        self._claims = ClaimStore()
        sealer = DatagramSealer(cluster_key.purpose("dht"))
        self._rpc = RpcEndpoint(sealer, rpc_timeout=rpc_timeout, metrics=metrics)
        self._client = DhtClient(self._rpc, node_id)
        self._announcer = Announcer(
            self._client,
            address=http_address,
            ttl=record_ttl,
            answer_within=_ANNOUNCE_TIMEOUTS * rpc_timeout,
        )
        self._table = ContactTable(
            node_id, ksize=ksize, records=self._store, client=self._client, metrics=metrics
        )
        self._flooder = Flooder(
            node_id,
            client=self._client,
            table=self._table,
            fanout=broadcast_fanout,
            rpc_timeout=rpc_timeout,
        )
        handlers = RequestHandlers(
            node_id,
            settings=settings,
            table=self._table,
            providers=self._store,
            claims=self._claims,
            broadcasts=self._flooder,
        )
        self._rpc.attach(handlers, self._table)
        self._crawler = Crawler(
            node_id, settings=settings, endpoint=self._rpc, client=self._client, table=self._table
        )
        self._claimer = Claimer(
            self._self_provider(),
            settings=settings,
            client=self._client,
            table=self._table,
            store=self._claims,
            records=self._store,
        )
        self._refresh: asyncio.Task[None] | None = None
        # Hashed key -> when this node last announced it with success (`provide`), oldest first:
        # keys no longer fresh are dropped from the front as new ones come.
        self._provided: OrderedDict[bytes, float] = OrderedDict()

    # ----------------------------------------------------------------- lifecycle

    async def listen(self, host: str, port: int) -> None:
        """Bind the UDP endpoint (port 0 picks a free one; see `router_address`)."""
        if self._rpc.listening:
            raise DhtError("the DHT node is already listening")
        loop = asyncio.get_running_loop()
        try:
            await loop.create_datagram_endpoint(lambda: self._rpc, local_addr=(host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for the DHT on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        self._refresh = asyncio.create_task(self._crawler.refresh_forever(), name="dht-refresh")
        log.debug("DHT node %s listening on %s", self.node_id.hex(), self.router_address)

    async def close(self) -> None:
        """Stop the endpoint; outstanding lookups end at once with what they had."""
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
            self._refresh = None
        self._announcer.close()
        await self._rpc.close()
        self._store.close()

    def ready(self) -> bool:
        """True while listening: the node answers and can look up."""
        return self._rpc.listening

    @property
    def router_address(self) -> Address:
        """The bound UDP address (``0.0.0.0`` or ``::`` when bound to every interface)."""
        self._running()
        sockname = self._rpc.extra_info("sockname")
        return (sockname[0], sockname[1])

    def contact_count(self) -> int:
        return self._table.contact_count()

    async def wait_for_contact(self) -> None:
        """Return once this node has known a peer (at once if it ever did)."""
        await self._table.wait_for_contact()

    def contacts(self) -> list[Contact]:
        """This node's contacts, last seen and round trip: introspection (the status page)."""
        return self._table.peers()

    def local_providers(self, key: str) -> list[Provider]:
        """Live records this node itself stores for `key` (its own included): introspection."""
        return self._store.providers(dht_key(key))

    def local_claim(self, key: str) -> Provider | None:
        """The live claim of `key` this node itself keeps (as the closest node): introspection."""
        return self._claims.holder(dht_key(key))

    # ----------------------------------------------------------------- membership

    async def bootstrap(self, addresses: list[Address]) -> int:
        """Ping `addresses` (skipping our own), then crawl towards our own id.

        Returns the number of contacts known afterwards; bounded (see `Crawler.bootstrap`).
        """
        self._running()
        return await self._crawler.bootstrap(addresses, self.router_address)

    # ----------------------------------------------------------------- Router

    async def provide(self, key: str) -> bool:
        """Announce this node as a provider of `key` to the k nodes closest to it.

        True if at least one node (this one included, when it is among the closest) stored
        the record. Re-announcing before `record_ttl` runs out is the caller's job.
        """
        self._running()
        hashed = dht_key(key)
        ksize, ttl = self._settings.ksize, self._settings.record_ttl
        now = time.monotonic()
        if now - self._provided.get(hashed, -math.inf) < ttl / _FRESH_FRACTION:
            # A node announces what it starts fetching and again when its runtime stored it,
            # seconds apart: the records from the first are fresh at every node that took them.
            return True
        with self._announcer.looking_up():
            closest = await self._crawler.closest_nodes(hashed, settle_small=True)
        stored_here = len(closest) < ksize or distance(self.node_id, hashed) < distance(
            closest[-1].id, hashed
        )
        if stored_here:
            self._store.put(hashed, self._self_provider(), ttl)
        accepted = await self._announcer.announce(hashed, closest)
        log.debug("provided %s: %d remote copies, local=%s", key, accepted, stored_here)
        if stored_here or accepted > 0:
            self._remember_provided(hashed, now)
            return True
        return False

    def _remember_provided(self, hashed: bytes, now: float) -> None:
        self._provided[hashed] = now
        self._provided.move_to_end(hashed)
        fresh = self._settings.record_ttl / _FRESH_FRACTION
        while self._provided and now - next(iter(self._provided.values())) >= fresh:
            self._provided.popitem(last=False)

    async def withdraw(self, key: str) -> None:
        """Best effort: drop our record from the closest nodes (the rest expire with the TTL)."""
        hashed = dht_key(key)
        self._provided.pop(hashed, None)
        self._store.remove(hashed, self.node_id)
        if not self._rpc.listening:
            return
        closest = await self._crawler.closest_nodes(hashed, settle_small=True)
        await settle(self._client.remove_provider(node, hashed) for node in closest)

    async def find_providers(
        self, key: str, want: int = 2, *, timeout: float | None = None
    ) -> list[Provider]:
        """Providers of `key` other than this node, local records first.

        Stops as soon as `want` are known, and in any case at the deadline (`timeout`, by default
        `resolve_timeout`), returning what was found by then (possibly nothing). May return more
        than `want` when one reply carried more: the extra ones are fallbacks for the caller.
        While the routing table is known whole (a network of fewer than k nodes, table.py),
        every record was sent here: local ones are the answer, and nobody is asked. Not when
        there is none: records announced before this node (re)started reach it only with their
        next announcement, so a miss here is still looked up.
        """
        client = self._running()
        started = time.perf_counter()
        hashed = dht_key(key)
        lookup = IterativeLookup(
            hashed,
            self_id=self.node_id,
            query=lambda node: client.get_providers(node, hashed),
            k=self._settings.ksize,
            alpha=self._settings.alpha,
            want=want,
            accept=self._is_peer,
            settle_below=self._settings.ksize,
            providers=self._store.providers(
                hashed,
                exclude=(self.node_id,),
                limit=max(want, self._settings.max_providers_per_reply),
            ),
        )
        if not lookup.satisfied() and not (lookup.providers and self._table.known_whole()):
            deadline = self._settings.resolve_timeout if timeout is None else timeout
            remaining = deadline - (time.perf_counter() - started)
            seeds = self._table.closest(hashed)
            if remaining > 0 and seeds:
                try:
                    async with asyncio.timeout(remaining):
                        await lookup.run(seeds)
                except TimeoutError:
                    log.debug("provider lookup for %s hit its %.3f s deadline", key, remaining)
        return list(lookup.providers.values())

    async def claim(self, key: str, ttl: float = 30.0) -> Provider | None:
        """Claim the upstream fetch of `key` for this node, across the cluster.

        None: this node holds the claim and should fetch; else the provider already fetching
        it. Bounded by `claim_deadline`; how the arbiter is chosen, and why: claims.py.
        """
        if not (math.isfinite(ttl) and ttl > 0):
            raise ValueError("a claim's ttl is a positive number of seconds")
        self._running()
        return await self._claimer.claim(key, ttl)

    async def release(self, key: str) -> None:
        """Best effort: drop this node's claim of `key`; at most one RPC timeout."""
        await self._claimer.release(key)

    # ----------------------------------------------------------------- Broadcaster

    async def broadcast(self, topic: str, message: bytes) -> None:
        """Send `message` to every live node but this one: to each contact now, relayed from
        there (broadcast.py). Returns once the first hop is sent; never waits on a reply.

        `ValueError` for a message over `messages.MAX_MESSAGE_BYTES` (1 KiB) or a bad topic.
        """
        check_message(topic, message)
        self._running()
        self._flooder.originate(topic, message)

    def subscribe(self, topic: str, handler: Callable[[bytes], None]) -> None:
        """Call `handler(message)` once for each message of `topic` broadcast by another node."""
        self._flooder.subscribe(topic, handler)

    async def recent(self, topic: str) -> list[bytes]:
        """Messages of `topic` from other nodes kept here or by a few contacts, oldest first.

        Bounded by a few RPC timeouts; what it returns will not reach the subscribers again.
        """
        check_topic(topic)
        self._running()
        return await self._flooder.recent(topic)

    # ----------------------------------------------------------------- internals

    def _running(self) -> DhtClient:
        """The client to call others with; raises `DhtNotRunning` unless listening."""
        if not self._rpc.listening:
            raise DhtNotRunning("the DHT node is not listening")
        return self._client

    def _self_provider(self) -> Provider:
        return Provider(self.node_id, self.http_address)

    def _is_peer(self, provider: Provider) -> bool:
        return provider.node_id != self.node_id and provider.address != self.http_address

    def _records_changed(self, count: int) -> None:
        if self._metrics is not None:
            self._metrics.dht_provider_records.set(count)
