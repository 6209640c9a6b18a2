"""Cluster-wide claims of upstream fetches: one node downloads, the others stream from it.

A claim is kept by an arbiter: the node closest to the key (this node itself when it knows none
closer). The arbiter serialises competing claims (its handler never yields, see handlers.py), so
every node claiming a key at the same moment learns the same single holder.

The hard part is that every claimer must pick the same arbiter. A node that was merely slow to
answer the lookup therefore stays a candidate: on a busy machine a late reply is far likelier
than a dead node, and dropping it would elect a second arbiter and a second upstream fetch.
When the arbiter does not answer the claim, the next closest node arbitrates: every claimer
falls back the same way, so a dead arbiter still yields one fetch.

A slow arbiter is the other half: a starved claimer whose claim the arbiter answered too late
falls back to the next node, which knows nothing of the grant the arbiter made a moment before,
and would grant a second fetch. So the winner copies its claim, at once, to the arbiters after
the one that granted it: a claimer falling back there learns the same holder. The copy is an
ordinary claim (a node still claims only for itself), sent without waiting for its reply; the
fallback comes only after whole RPC timeouts, so the copy is there first unless the winner was
itself starved that long.

A starved arbiter is the third: on a node whose CPU is that scarce, every reply comes late,
seconds late (measured in the cold-pull benchmark at 0.15 CPU per node: late DHT replies
0.25-9 s after their request, half of them over 1 s). Falling back from an arbiter that is
only slow splits the claim whenever the next one is the claimer itself. So an arbiter that did
not answer in its tries, but sent this node anything since the claim was sent (a request of
its own, an answer), is alive: it is asked once more, with `_SLOW_ARBITER_TIMEOUTS`. A dead
one sends nothing and is passed over as quickly as before.

From kademlia it uses only `Node` (the candidates, as the lookup and the routing table give
them); the lookup is ours (lookup.py), and the calls go through `DhtClient`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from kademlia.node import Node

from mirror.routing.client import DhtClient
from mirror.routing.keys import dht_key, distance
from mirror.routing.lookup import IterativeLookup
from mirror.routing.providers import ClaimStore, ProviderStore, answer_claim
from mirror.routing.router import Provider
from mirror.routing.settings import DhtSettings
from mirror.routing.table import ContactTable

log = logging.getLogger(__name__)

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
# An arbiter that did not answer but was heard from meanwhile is asked once more, this long.
_SLOW_ARBITER_TIMEOUTS = 16


def claim_deadline(rpc_timeout: float) -> float:
    """The longest a claim can take: its lookup, then at each arbiter at most two tries and,
    if it is alive but slow, one longer."""
    per_arbiter = 2 * _CLAIM_REQUEST_TIMEOUTS + _SLOW_ARBITER_TIMEOUTS
    return (_CLAIM_LOOKUP_TIMEOUTS + _CLAIM_ARBITERS * per_arbiter) * rpc_timeout


class Claimer:
    """This node's side of claims: asking arbiters, and releasing where it asked."""

    def __init__(
        self,
        own: Provider,
        *,
        settings: DhtSettings,
        client: DhtClient,
        table: ContactTable,
        store: ClaimStore,
        records: ProviderStore,
    ) -> None:
        self._own = own
        self._settings = settings
        self._client = client
        self._table = table
        self._store = store  # the claims this node keeps as an arbiter
        self._records = records  # the provider records it keeps, which a claim may name
        # Key -> the remote arbiters our claim of it was sent to, and until when it lives:
        # `release` goes straight there (a claim may be held even if its reply was lost).
        self._claimed_at: dict[bytes, tuple[tuple[Node, ...], float]] = {}

    async def claim(self, text: str, ttl: float) -> Provider | None:
        """Claim the upstream fetch of `text` for this node; None when this node holds it.

        Otherwise the provider (node id and HTTP address) to stream from: the node that
        already holds a live claim, or one the arbiter knows holds the blob (`answer_claim`).
        Claiming again as the holder renews the claim; it lives `ttl` seconds (at most
        `record_ttl`) from the last claim, unless released.

        Hard deadline (`claim_deadline`): the lookup gets `_CLAIM_LOOKUP_TIMEOUTS` RPC timeouts,
        each of at most `_CLAIM_ARBITERS` arbiters two tries of `_CLAIM_REQUEST_TIMEOUTS` (one
        if it did not answer the lookup either: a late reply, or a dead node), and one more of
        `_SLOW_ARBITER_TIMEOUTS` if it was heard from meanwhile (slow, not dead). If none answers,
        returns None: acting alone costs a duplicate upstream fetch, waiting on unreachable
        nodes would cost the pull itself. Concurrent claims from one node for the
        same text all win: coalescing inside a node is the caller's job.
        """
        key = dht_key(text)
        ttl = min(ttl, self._settings.record_ttl)
        self._forget_expired_claims()
        candidates, silent = await self._candidates(key)
        arbiters = self._arbiters(key, candidates)
        for position, arbiter in enumerate(arbiters):
            if arbiter is None:
                holder: Provider | None = answer_claim(
                    self._store, self._records, key, self._own, ttl
                )
            else:
                tries = 1 if arbiter.id in silent else 2
                holder = await self._claim_at(arbiter, key, ttl, tries)
            if holder is not None:
                fallbacks = arbiters[position + 1 :]
                break
            log.info("claim of %s: no answer from %s", text, arbiter)
        else:
            log.warning("claim of %s: no arbiter answered, fetching alone", text)
            return None
        if holder.node_id == self._own.node_id:
            self._copy_claim(text, key, ttl, fallbacks)
            return None
        log.debug("claim of %s: %s is fetching it", text, holder.address)
        return holder

    def _copy_claim(self, text: str, key: bytes, ttl: float, fallbacks: list[Node | None]) -> None:
        """Claim `key` at the arbiters a claimer would fall back to, without waiting.

        A copy refused for another holder means that one already won there (the split this
        copy exists to prevent came first): logged, and this node still fetches, as the
        arbiter that answered first granted it.
        """

        def check(holder: Provider | None) -> None:
            if holder is not None and holder.node_id != self._own.node_id:
                log.info("claim of %s is split: %s holds or fetches it too", text, holder.address)

        def copied(done: asyncio.Future[Provider | None]) -> None:
            if not done.cancelled():
                check(done.result())

        for fallback in fallbacks:
            if fallback is None:
                check(answer_claim(self._store, self._records, key, self._own, ttl))
                continue
            self._remember_asked(key, fallback, ttl)
            copy = self._client.claim(
                fallback, key, self._own.address, ttl, timeout=self._settings.rpc_timeout
            )
            copy.add_done_callback(copied)

    async def release(self, text: str) -> None:
        """Best effort: drop this node's claim of `text`, once its fetch ended (either way).

        The release goes to the arbiters the claim was sent to (remembered by `claim`, so no
        lookup is needed) and takes at most one RPC timeout; a claim never released expires.
        """
        key = dht_key(text)
        self._store.release(key, self._own.node_id)
        asked, _ = self._claimed_at.pop(key, ((), 0.0))
        if not asked:
            return
        # Shielded, like every RPC future awaited here: cancelling the caller must not cancel
        # futures the endpoint resolves itself (reply, timeout, or at once when it is closed).
        await asyncio.shield(asyncio.gather(*(self._client.release(node, key) for node in asked)))

    def _arbiters(self, key: bytes, candidates: list[Node]) -> list[Node | None]:
        """The arbiters of `key`, closest first; None stands for this node.

        A claim is asked of them in order up to this node (whose own store always answers);
        the ones after the arbiter that grants it get a copy (`_copy_claim`).
        """
        own = distance(self._own.node_id, key)
        closer = [node for node in candidates if distance(node.id, key) < own]
        farther = [node for node in candidates if distance(node.id, key) > own]
        return [*closer, None, *farther][:_CLAIM_ARBITERS]

    async def _claim_at(self, arbiter: Node, key: bytes, ttl: float, tries: int) -> Provider | None:
        """The arbiter's answer to our claim, in `tries` tries, and one longer if it was heard
        from meanwhile (alive, only slow); None if it never answered."""
        self._remember_asked(key, arbiter, ttl)
        asked_at = time.time()  # the clock the contact table notes what it hears with
        for _ in range(tries):
            reply = await self._ask(arbiter, key, ttl, _CLAIM_REQUEST_TIMEOUTS)
            if reply is not None:
                return reply
        if not self._table.heard_from_since(arbiter.id, asked_at):
            return None
        log.info(
            "claim of %s at %s: no answer yet, but it is alive; waiting longer", key.hex(), arbiter
        )
        return await self._ask(arbiter, key, ttl, _SLOW_ARBITER_TIMEOUTS)

    async def _ask(self, arbiter: Node, key: bytes, ttl: float, timeouts: int) -> Provider | None:
        # Shielded, like every RPC future awaited here (see `release`).
        return await asyncio.shield(
            self._client.claim(
                arbiter,
                key,
                self._own.address,
                ttl,
                timeout=timeouts * self._settings.rpc_timeout,
            )
        )

    def _remember_asked(self, key: bytes, arbiter: Node, ttl: float) -> None:
        """Note where a claim of `key` goes before it is sent: a lost reply may hide a grant."""
        asked, _ = self._claimed_at.get(key, ((), 0.0))
        if all(node.id != arbiter.id for node in asked):
            asked = (*asked, arbiter)
        self._claimed_at[key] = (asked, time.monotonic() + ttl)

    def _forget_expired_claims(self) -> None:
        now = time.monotonic()
        for key in [key for key, (_, until) in self._claimed_at.items() if until <= now]:
            del self._claimed_at[key]

    async def _candidates(self, key: bytes) -> tuple[list[Node], set[bytes]]:
        """Nodes that may arbitrate the claim of `key`, closest first, and the silent ones.

        Every node the lookup heard of, whether it answered or not, and every node the routing
        table knows: a reply that came late, or a lookup cut short by a busy moment, must not
        shrink the candidates, or nodes would disagree on the arbiter and two would fetch. The
        ids of those that did not answer the lookup come second: a dead node others still
        list gets one try at the claim, not two, so it costs a claim less time. A table known
        whole (table.py) is every candidate there is: no walk.
        """
        if self._table.known_whole():
            return self._table.closest(key), set()
        client = self._client
        lookup = IterativeLookup(
            key,
            self_id=self._own.node_id,
            query=lambda node: client.find_node(node, key),
            k=self._settings.ksize,
            alpha=self._settings.alpha,
        )
        known = self._table.closest(key)
        try:
            async with asyncio.timeout(_CLAIM_LOOKUP_TIMEOUTS * self._settings.rpc_timeout):
                await lookup.run(known)
        except TimeoutError:
            log.debug("claim lookup for %s cut short: keeping every known node", key.hex())
        merged = {node.id: node for node in [*lookup.heard_of(), *known]}
        candidates = sorted(
            (node for node in merged.values() if node.id != self._own.node_id),
            key=lambda node: distance(node.id, key),
        )
        return candidates, lookup.silent()
