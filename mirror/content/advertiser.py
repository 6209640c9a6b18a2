"""Announcing what this node holds in the DHT, and withdrawing what it no longer holds.

The advertiser keeps one set: the keys it has announced. It compares that set with a fresh
inventory of the store at start, whenever the store reports a change (containerd's event stream),
and on every re-announce tick. New keys are announced at once, vanished keys withdrawn at once;
on a tick every key is announced again, before provider records expire at their TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Protocol

from mirror.metrics import Metrics
from mirror.routing.router import Router
from mirror.stores.base import Store
from mirror.stores.inventory import Inventory, take_inventory

log = logging.getLogger(__name__)

# Announcements in flight at once: enough to saturate the DHT, few enough not to flood it.
_CONCURRENCY = 32
# Changes arriving together (a pull creates many events) cause one rescan.
_SETTLE_SECONDS = 0.05


class Advertiser:
    def __init__(self, store: Store, router: Router, metrics: Metrics, *, ttl: float) -> None:
        self._store = store
        self._router = router
        self._metrics = metrics
        self._reannounce_every = ttl / 2
        self._announced: Inventory = Inventory()
        self._changed = asyncio.Event()
        self.synced = asyncio.Event()

    @property
    def announced(self) -> set[str]:
        return self._announced.keys()

    async def run(self) -> None:
        watcher = asyncio.create_task(self._watch())
        try:
            await self.sync(reannounce=False)
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._reannounce_every):
                        await self._changed.wait()
                reannounce = not self._changed.is_set()
                await asyncio.sleep(0 if reannounce else _SETTLE_SECONDS)
                self._changed.clear()
                await self.sync(reannounce=reannounce)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch(self) -> None:
        async for _ in self._store.changes():
            self._changed.set()

    async def sync(self, *, reannounce: bool) -> None:
        """Bring the DHT in line with the store; a failing store leaves the last state."""
        try:
            held = await take_inventory(self._store)
        except Exception:
            log.warning(
                "cannot take the store's inventory; keeping what is announced", exc_info=True
            )
            return
        previous = self._announced.keys()
        current = held.keys()
        gone = previous - current
        fresh = current if reannounce else current - previous
        await self._each(self._router.withdraw, gone)
        failed = await self._each(self._router.provide, fresh)
        self._announced = held
        self._metrics.advertised_keys.labels("digest").set(len(held.digests))
        self._metrics.advertised_keys.labels("tag").set(len(held.tags))
        if fresh or gone:
            log.info(
                "announced %d keys, withdrew %d (%d not stored by any node)",
                len(fresh),
                len(gone),
                failed,
            )
        self.synced.set()

    async def _each(self, operation: _KeyOperation, keys: Iterable[str]) -> int:
        """Run `operation` on every key with bounded concurrency; count the ones that failed."""
        limit = asyncio.Semaphore(_CONCURRENCY)

        async def one(key: str) -> bool:
            async with limit:
                try:
                    return (await operation(key)) is not False
                except Exception:
                    log.debug("DHT operation on %s failed", key, exc_info=True)
                    return False

        results = await asyncio.gather(*(one(key) for key in keys))
        return results.count(False)


class _KeyOperation(Protocol):
    async def __call__(self, text: str, /) -> object: ...
