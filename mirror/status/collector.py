"""The status report: one JSON document of what this node is, knows, holds and did lately.

Read from the parts through small protocols, each one method or two the part already has (or a
read-only accessor added for this): the routing table's contacts, the peer fetcher's view of
its peers' load, the upstream client's health per registry, the store's images, the node
cache's size, the pins and distributions, the pulls the registry front answered, and the
advertised keys from the node's own metrics. No part knows of this module; `node.py` wires it.

Sections (see docs/status.md for every field):

- `node`: id, addresses, store, cache use against its bound, version, uptime, platform;
- `peers`: every contact of the routing table and every peer this node fetched from, with
  when it was last heard of, its round trip, and its uploads as this node knows them;
- `holdings`: the images the store holds, by tag, with their size, and the keys announced;
- `pulls`: the recent manifest and blob requests, newest first, and where their bytes came from;
- `upstream`: when each registry last answered and last failed;
- `pins` and `distributions`: as `/mirror/v1/prefetch` and `/mirror/v1/distributions` show them.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mirror.errors import MirrorError
from mirror.metrics import Metrics
from mirror.oci.mediatypes import INDEX_TYPES
from mirror.oci.reference import Digest, parse_digest
from mirror.peers.fetcher import PeerLoad
from mirror.prefetch.resolve import Platform
from mirror.routing.table import Contact
from mirror.status.pulls import PullLog
from mirror.stores.base import ImageEntry, Store
from mirror.stores.manifests import read_manifest
from mirror.upstream.client import RegistryHealth

log = logging.getLogger(__name__)

# The report lists this many images at most (the count says how many there are).
MAX_IMAGES = 500
# ... and this many distributions, the newest.
MAX_DISTRIBUTIONS = 20
# Image sizes are remembered for this many manifests (a digest's size never changes).
_SIZES_KEPT = 4096


class ContactSource(Protocol):
    """The routing table's contacts (`DhtNode.contacts`)."""

    def contacts(self) -> list[Contact]: ...


class PeerLoadSource(Protocol):
    """What the peer fetcher knows of the peers it asked (`PeerFetcher.peer_loads`)."""

    def peer_loads(self) -> list[PeerLoad]: ...


class UpstreamHealthSource(Protocol):
    """When each upstream registry last answered and failed (`UpstreamClient.health`)."""

    def health(self) -> dict[str, RegistryHealth]: ...


class JsonView(Protocol):
    def as_json(self) -> dict[str, object]: ...


class PinSource(Protocol):
    """The pins and their progress (`Prefetcher.statuses`)."""

    def statuses(self) -> Sequence[JsonView]: ...


class DistributionSource(Protocol):
    """The distributions this node knows, newest first (`Distributor.distributions`)."""

    def distributions(self) -> Sequence[JsonView]: ...


class CacheUse(Protocol):
    """The node cache's size and bound (`CacheStore`)."""

    @property
    def total_bytes(self) -> int: ...

    @property
    def max_bytes(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What the node is, fixed at start."""

    node_id: bytes | None  # None: running alone, no DHT
    address: str  # the registry address peers dial (advertised), or the registry address alone
    registry_addr: str
    metrics_addr: str
    router_addr: str | None
    store: str
    version: str
    platform: Platform
    runtime: str | None = None  # the runtime pins are kept in; None: the node cache


@dataclass(slots=True)
class _ImageSize:
    bytes: int  # manifests, config and layers of the node's platform
    platform: str | None  # the index entry counted; None: a single-platform image


class StatusCollector:
    def __init__(
        self,
        info: NodeInfo,
        *,
        store: Store,
        metrics: Metrics,
        pulls: PullLog,
        cache: CacheUse | None = None,
        contacts: ContactSource | None = None,
        peers: PeerLoadSource | None = None,
        upstream: UpstreamHealthSource | None = None,
        pins: PinSource | None = None,
        distributions: DistributionSource | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._info = info
        self._store = store
        self._metrics = metrics
        self._pulls = pulls
        self._cache = cache
        self._contacts = contacts
        self._peers = peers
        self._upstream = upstream
        self._pins = pins
        self._distributions = distributions
        self._clock = clock
        self._started = clock()
        self._sizes: OrderedDict[Digest, _ImageSize] = OrderedDict()

    async def report(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "generated_at": now,
            "node": self._node(now),
            "peers": self._peer_list(now),
            "holdings": await self._holdings(),
            "pulls": [record.as_json() for record in self._pulls.recent()],
            "upstream": self._upstream_health(),
            "pins": [pin.as_json() for pin in self._pins.statuses()] if self._pins else [],
            "distributions": [
                distribution.as_json()
                for distribution in (
                    self._distributions.distributions()[:MAX_DISTRIBUTIONS]
                    if self._distributions
                    else []
                )
            ],
        }

    # --- node --------------------------------------------------------------------------------

    def _node(self, now: float) -> dict[str, Any]:
        info = self._info
        cache = None
        if self._cache is not None:
            cache = {"bytes": self._cache.total_bytes, "max_bytes": self._cache.max_bytes}
        return {
            "id": info.node_id.hex() if info.node_id is not None else None,
            "address": info.address,
            "registry_addr": info.registry_addr,
            "metrics_addr": info.metrics_addr,
            "router_addr": info.router_addr,
            "store": info.store,
            "runtime": info.runtime,
            "platform": str(info.platform),
            "version": info.version,
            "started_at": self._started,
            "uptime_seconds": max(0.0, now - self._started),
            "cache": cache,
        }

    # --- peers -------------------------------------------------------------------------------

    def _peer_list(self, now: float) -> list[dict[str, Any]]:
        """Contacts and the peers fetched from, merged by node id."""
        loads = {load.node_id: load for load in self._peers.peer_loads()} if self._peers else {}
        contacts = {c.node_id: c for c in self._contacts.contacts()} if self._contacts else {}
        peers = []
        for node_id in contacts.keys() | loads.keys():
            contact, load = contacts.get(node_id), loads.get(node_id)
            seen = [contact.last_seen] if contact is not None and contact.last_seen else []
            if load is not None and load.seen_ago is not None:
                seen.append(now - load.seen_ago)
            peers.append(
                {
                    "id": node_id.hex(),
                    "address": load.address if load is not None else None,
                    "router": f"{contact.host}:{contact.port}" if contact is not None else None,
                    "contact": contact is not None,
                    "last_seen": max(seen) if seen else None,
                    "rtt_ms": _ms(contact.round_trip) if contact is not None else None,
                    "uploads": load.uploads if load is not None else None,
                    "uploads_reported_ago": load.reported_ago if load is not None else None,
                    "in_flight": load.in_flight if load is not None else None,
                    "throughput": load.throughput if load is not None else None,
                }
            )
        return sorted(peers, key=lambda peer: (peer["address"] or peer["router"] or "", peer["id"]))

    # --- holdings ----------------------------------------------------------------------------

    async def _holdings(self) -> dict[str, Any]:
        error: str | None = None
        try:
            entries = sorted(await self._store.images(), key=lambda entry: str(entry.ref))
        except (MirrorError, OSError) as exc:
            log.info("status: the store did not list its images: %s", exc)
            entries, error = [], str(exc)
        images = [await self._image(entry) for entry in entries[:MAX_IMAGES]]
        return {
            "images": images,
            "images_total": len(entries),
            "error": error,
            "announced_keys": {
                kind: int(
                    self._metrics.registry.get_sample_value(
                        "mirror_advertised_keys", {"kind": kind}
                    )
                    or 0
                )
                for kind in ("digest", "tag")
            },
        }

    async def _image(self, entry: ImageEntry) -> dict[str, Any]:
        size = await self._size(entry.digest)
        return {
            "ref": str(entry.ref),
            "digest": str(entry.digest),
            "size": size.bytes if size is not None else None,
            "platform": size.platform if size is not None else None,
        }

    async def _size(self, digest: Digest) -> _ImageSize | None:
        """The compressed size of the image as this node's runtime pulls it; None when the
        manifests are not all held here (remembered only once known: it never changes)."""
        known = self._sizes.get(digest)
        if known is not None:
            self._sizes.move_to_end(digest)
            return known
        try:
            size = await self._measure_size(digest)
        except (MirrorError, OSError, ValueError) as exc:
            log.debug("status: no size for %s: %s", digest, exc)
            return None
        if size is not None:
            self._sizes[digest] = size
            while len(self._sizes) > _SIZES_KEPT:
                self._sizes.popitem(last=False)
        return size

    async def _measure_size(self, digest: Digest) -> _ImageSize | None:
        found = await read_manifest(self._store, digest)
        if found is None:
            return None
        body, media_type = found
        total, platform = len(body), None
        if media_type in INDEX_TYPES:
            entry = platform_entry(json.loads(body), self._info.platform)
            if entry is None:
                return None
            digest, platform = parse_digest(entry["digest"]), str(self._info.platform)
            child = await read_manifest(self._store, digest)
            if child is None:
                return None
            body = child[0]
            total += len(body)
        document = json.loads(body)
        if not isinstance(document, dict) or not isinstance(document.get("layers"), list):
            return None
        parts = [document.get("config"), *document["layers"]]
        sizes = [part.get("size") for part in parts if isinstance(part, dict)]
        total += sum(size for size in sizes if isinstance(size, int) and size > 0)
        return _ImageSize(total, platform)

    # --- upstream ----------------------------------------------------------------------------

    def _upstream_health(self) -> list[dict[str, Any]]:
        if self._upstream is None:
            return []
        return [
            {
                "registry": registry,
                "last_success": health.last_success,
                "last_error": health.last_error,
                "error": health.error,
                "healthy": health.last_error is None
                or (health.last_success is not None and health.last_success > health.last_error),
            }
            for registry, health in self._upstream.health().items()
        ]


def platform_entry(index: object, platform: Platform) -> dict[str, Any] | None:
    entries = index.get("manifests") if isinstance(index, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if (
            isinstance(entry, dict)
            and isinstance(entry.get("platform"), dict)
            and isinstance(entry.get("digest"), str)
            and platform.matches(entry["platform"])
        ):
            return entry
    return None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
