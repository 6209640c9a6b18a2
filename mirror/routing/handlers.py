"""What this node answers to each RPC: one method per name in `rpc.REQUESTS`.

Every method receives the sender's address and the already validated arguments (rpc.py checks
types and arity before any of this runs) and returns the reply body: a plain value, or
`wire.Packed` bytes assembled within the datagram budget. Nothing here awaits: requests are
served in the order they arrive, which is what serialises competing claims.

The rules that make records trustworthy live here: a node can only announce, withdraw, claim or
release for itself (its id in the arguments must be the sender's), kademlia's plain values are
refused (`store` answers False), and every honest request welcomes its sender into the routing
table. Broadcast messages are relayed and kept by broadcast.py's `Flooder`. From kademlia it
uses only `Node`, to name the sender to the routing table.
"""

from __future__ import annotations

import logging

from kademlia.node import Node

from mirror.routing import wire
from mirror.routing.broadcast import Flooder
from mirror.routing.providers import ClaimStore, ProviderStore, answer_claim
from mirror.routing.router import Provider
from mirror.routing.rpc import Address
from mirror.routing.settings import DhtSettings
from mirror.routing.table import ContactTable
from mirror.routing.wire import HandOffRecord

log = logging.getLogger(__name__)


class RequestHandlers:
    """The requests node `own_id` serves, over its records, claims and routing table."""

    def __init__(
        self,
        own_id: bytes,
        *,
        settings: DhtSettings,
        table: ContactTable,
        providers: ProviderStore,
        claims: ClaimStore,
        broadcasts: Flooder,
    ) -> None:
        self._own = own_id
        self._settings = settings
        self._table = table
        self._providers = providers
        self._claims = claims
        self._broadcasts = broadcasts

    def _welcome(self, sender: Address, nodeid: bytes) -> Node:
        source = Node(nodeid, sender[0], sender[1])
        self._table.welcome(source)
        return source

    def ping(self, sender: Address, nodeid: bytes) -> bytes:
        self._welcome(sender, nodeid)
        return bytes(self._own)

    def store(self, sender: Address, nodeid: bytes, key: bytes, value: object) -> bool:
        log.debug("refused a plain store from %s", sender)
        return False

    def find_node(self, sender: Address, nodeid: bytes, key: bytes) -> wire.Packed:
        source = self._welcome(sender, nodeid)
        # Capped like get_providers replies: the lookup converges as well on 12 contacts per
        # reply as on k, and each contact costs pure-Python msgpack time on both ends.
        neighbours = self._table.neighbours(key, self._settings.max_contacts_per_reply, source)
        contacts, _ = wire.fit_packed(map(wire.contact_entry, neighbours), wire.MAX_BODY_BYTES)
        return wire.Packed(contacts)

    def find_value(self, sender: Address, nodeid: bytes, key: bytes) -> wire.Packed:
        return self.find_node(sender, nodeid, key)  # there are no plain values to return

    def add_provider(
        self,
        sender: Address,
        nodeid: bytes,
        key: bytes,
        provider_id: bytes,
        address: str,
        ttl: float,
    ) -> bool:
        """Store the sender as a provider of `key`: a node can only ever announce itself."""
        return self.add_providers(sender, nodeid, [key], provider_id, address, ttl) > 0

    def add_providers(
        self,
        sender: Address,
        nodeid: bytes,
        keys: list[bytes],
        provider_id: bytes,
        address: str,
        ttl: float,
    ) -> int:
        """Store the sender as a provider of each of `keys`; replies how many were stored."""
        if provider_id != nodeid or nodeid == self._own:
            log.debug("refused add_provider from %s for another node's id", sender)
            return 0
        self._welcome(sender, nodeid)
        provider = Provider(provider_id, address)
        for key in keys:
            self._providers.put(key, provider, self._ttl(ttl))
        return len(keys)

    def remove_provider(
        self, sender: Address, nodeid: bytes, key: bytes, provider_id: bytes
    ) -> bool:
        if provider_id != nodeid:
            return False
        self._welcome(sender, nodeid)
        return self._providers.remove(key, provider_id)

    def get_providers(self, sender: Address, nodeid: bytes, key: bytes) -> wire.Packed:
        """Up to N providers of `key` and the closest contacts we know, in one datagram."""
        source = self._welcome(sender, nodeid)
        found = self._providers.providers(
            key, exclude=(nodeid,), limit=self._settings.max_providers_per_reply
        )
        budget = wire.MAX_BODY_BYTES - 1  # the outer [providers, contacts] header
        providers, used = wire.fit_packed(map(wire.provider_entry, found), budget - 3)
        neighbours = self._table.neighbours(key, self._settings.max_contacts_per_reply, source)
        contacts, _ = wire.fit_packed(map(wire.contact_entry, neighbours), budget - used)
        return wire.Packed(wire.array_header(2) + providers + contacts)

    def hand_off(self, sender: Address, nodeid: bytes, records: list[HandOffRecord]) -> int:
        """Records a peer passes on because this node is now among the closest to their keys."""
        self._welcome(sender, nodeid)
        stored = 0
        for record in records:
            if record.provider.node_id == self._own:
                continue  # our own records are ours to announce
            self._providers.put(record.key, record.provider, self._ttl(record.ttl))
            stored += 1
        return stored

    def claim(
        self,
        sender: Address,
        nodeid: bytes,
        key: bytes,
        provider_id: bytes,
        address: str,
        ttl: float,
    ) -> list[object] | None:
        """Record the sender as the node fetching `key`, unless another node's claim is live
        or a node announced it holds `key` (`answer_claim`).

        Replies with the node to fetch from after this call (the sender when it won or
        renewed), or nil when refused: a node can only ever claim for itself. Claims are not
        provider records: never served by get_providers, never handed off.
        """
        if provider_id != nodeid or nodeid == self._own:
            log.debug("refused a claim from %s for another node's id", sender)
            return None
        self._welcome(sender, nodeid)
        claimer = Provider(provider_id, address)
        holder = answer_claim(self._claims, self._providers, key, claimer, self._ttl(ttl))
        return wire.claim_reply(holder)

    def release(self, sender: Address, nodeid: bytes, key: bytes, provider_id: bytes) -> bool:
        """Drop the sender's claim of `key`; True if it held a live one."""
        if provider_id != nodeid:
            return False
        self._welcome(sender, nodeid)
        return self._claims.release(key, provider_id)

    def broadcast(
        self,
        sender: Address,
        nodeid: bytes,
        message_id: bytes,
        origin: bytes,
        topic: str,
        hops: int,
        body: bytes,
    ) -> bool:
        """A broadcast message passed on by a peer; True if it was new here (see broadcast.py)."""
        if nodeid == self._own:
            return False
        source = self._welcome(sender, nodeid)
        return self._broadcasts.received(source, message_id, origin, topic, hops, body)

    def recent(self, sender: Address, nodeid: bytes, topic: str, before: int) -> wire.Packed:
        """A page of the recent messages of `topic` this node keeps, in one datagram."""
        self._welcome(sender, nodeid)
        return self._broadcasts.page(topic, before)

    def _ttl(self, asked: float) -> float:
        """No record outlives this node's own TTL, whatever its sender asked for."""
        return min(asked, self._settings.record_ttl)
