"""The records one node keeps: provider records, and the claims of fetches in progress.

A provider record lives for its TTL unless its owner re-announces it; nothing else ever extends
it, so a node that stopped (or stopped holding the content) drops out of every answer within one
TTL. Claims follow the same rule, one holder per key at a time.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import time
from collections.abc import Callable, Container
from dataclasses import dataclass

from mirror.routing.router import Provider


@dataclass(slots=True)
class _Record:
    address: str
    expires_at: float


class ProviderStore:
    """In-memory provider records keyed by 20-byte DHT key, with exact expiry.

    Reads skip expired records whatever the timer did, and a single timer (armed for the earliest
    expiry) deletes them so that `len()`, and the gauge fed by `on_change`, stay exact.
    """

    def __init__(
        self,
        *,
        on_change: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._records: dict[bytes, dict[bytes, _Record]] = {}
        # (expires_at, key, node_id); entries outdated by a re-announce or removal are skipped.
        self._expiries: list[tuple[float, bytes, bytes]] = []
        self._count = 0
        self._on_change = on_change
        self._clock = clock
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    def __len__(self) -> int:
        return self._count

    def put(self, key: bytes, provider: Provider, ttl: float) -> None:
        """Add or refresh `provider` for `key`, live for `ttl` seconds from now."""
        expires_at = self._clock() + ttl
        providers = self._records.setdefault(key, {})
        record = providers.get(provider.node_id)
        if record is None:
            providers[provider.node_id] = _Record(provider.address, expires_at)
            self._count += 1
            self._changed()
        else:
            record.address = provider.address
            record.expires_at = expires_at
        heapq.heappush(self._expiries, (expires_at, key, provider.node_id))
        self._arm(expires_at)

    def remove(self, key: bytes, node_id: bytes) -> bool:
        """Drop `node_id`'s record for `key`; False if there was none."""
        providers = self._records.get(key)
        if providers is None or providers.pop(node_id, None) is None:
            return False
        if not providers:
            del self._records[key]
        self._count -= 1
        self._changed()
        return True

    def providers(
        self, key: bytes, *, exclude: Container[bytes] = (), limit: int | None = None
    ) -> list[Provider]:
        """Live providers of `key`, minus `exclude`d node ids.

        With a `limit`, a random sample: every asker then learns a different subset, which
        spreads fetches across all holders instead of sending everyone to the same few.
        """
        now = self._clock()
        live = [
            Provider(node_id, record.address)
            for node_id, record in self._records.get(key, {}).items()
            if record.expires_at > now and node_id not in exclude
        ]
        if limit is not None and len(live) > limit:
            return random.sample(live, limit)
        return live

    def remaining(self, key: bytes) -> list[tuple[Provider, float]]:
        """Live providers of `key` with the seconds each has left (what a hand-off carries)."""
        now = self._clock()
        return [
            (Provider(node_id, record.address), record.expires_at - now)
            for node_id, record in self._records.get(key, {}).items()
            if record.expires_at > now
        ]

    def freshest(self, key: bytes, *, exclude: Container[bytes] = ()) -> Provider | None:
        """The live provider of `key` whose record was renewed last (the likeliest to be up),
        minus `exclude`d node ids; None if there is none."""
        now = self._clock()
        live = [
            (record.expires_at, node_id, record.address)
            for node_id, record in self._records.get(key, {}).items()
            if record.expires_at > now and node_id not in exclude
        ]
        if not live:
            return None
        _, node_id, address = max(live)
        return Provider(node_id, address)

    def stored_keys(self) -> list[bytes]:
        return list(self._records)

    def purge(self) -> int:
        """Delete every expired record now; returns how many went."""
        now = self._clock()
        removed = 0
        while self._expiries and self._expiries[0][0] <= now:
            _, key, node_id = heapq.heappop(self._expiries)
            providers = self._records.get(key)
            record = None if providers is None else providers.get(node_id)
            if providers is None or record is None or record.expires_at > now:
                continue  # removed since, or re-announced: a later heap entry covers it
            del providers[node_id]
            if not providers:
                del self._records[key]
            removed += 1
        if removed:
            self._count -= removed
            self._changed()
        return removed

    def close(self) -> None:
        """Stop the expiry timer (records stay readable, and still expire on read)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = float("inf")

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self._count)

    def _arm(self, at: float) -> None:
        if at >= self._timer_at:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (plain unit use): expiry still applies on read and purge()
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_later(max(0.0, at - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        self.purge()
        if self._expiries:
            self._arm(self._expiries[0][0])


@dataclass(slots=True)
class _Claim:
    holder: Provider
    expires_at: float


class ClaimStore:
    """Claims of upstream fetches in progress: at most one live holder per key, with expiry.

    Kept apart from provider records: a claim says "this node is downloading it now", not "this
    node holds it", so it is never served by get_providers nor handed off. Every call completes
    without yielding to the event loop, so competing claims are serialised. Expired claims are
    ignored on read and swept on every write (no gauge needs an exact count of them).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._claims: dict[bytes, _Claim] = {}
        # (expires_at, key); entries outdated by a renewal or a release are skipped.
        self._expiries: list[tuple[float, bytes]] = []
        self._clock = clock

    def __len__(self) -> int:
        self._sweep(self._clock())
        return len(self._claims)

    def claim(self, key: bytes, provider: Provider, ttl: float) -> Provider:
        """Make `provider` the holder of `key` for `ttl` seconds unless another's claim is live.

        The holder renewing its own claim restarts its TTL. Returns the holder after the call.
        """
        now = self._clock()
        self._sweep(now)
        current = self._claims.get(key)
        if (
            current is not None
            and current.expires_at > now
            and current.holder.node_id != provider.node_id
        ):
            return current.holder
        expires_at = now + ttl
        self._claims[key] = _Claim(provider, expires_at)
        heapq.heappush(self._expiries, (expires_at, key))
        return provider

    def release(self, key: bytes, node_id: bytes) -> bool:
        """Drop `node_id`'s claim of `key`; False if it held no live claim."""
        current = self._claims.get(key)
        if current is None or current.holder.node_id != node_id:
            return False
        del self._claims[key]
        return current.expires_at > self._clock()

    def holder(self, key: bytes) -> Provider | None:
        """The live holder of `key`, if any."""
        current = self._claims.get(key)
        if current is None or current.expires_at <= self._clock():
            return None
        return current.holder

    def _sweep(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            _, key = heapq.heappop(self._expiries)
            current = self._claims.get(key)
            if current is not None and current.expires_at <= now:
                del self._claims[key]


def answer_claim(
    claims: ClaimStore, records: ProviderStore, key: bytes, claimer: Provider, ttl: float
) -> Provider:
    """What an arbiter answers a claim of `key` with: the node the claimer should fetch from,
    or the claimer itself when it now holds the claim (it won, or renewed its own).

    A live claim of another node wins, as before. Without one, a node that announced it holds
    `key` (a record kept here: the arbiter is the node closest to the key, so it keeps the
    key's records) is named instead of granting a claim: the bytes are in the cluster, and a
    claimer whose own provider lookup came back empty (cut short on a starved node, or
    started before the record reached it) would otherwise fetch them from upstream again. A
    record may outlive what it says; a claimer that finds the named node not serving fetches
    the blob itself (content/service.py), as after a claimant that failed.
    """
    current = claims.holder(key)
    if current is None:
        holder = records.freshest(key, exclude=(claimer.node_id,))
        if holder is not None:
            return holder
    return claims.claim(key, claimer, ttl)
