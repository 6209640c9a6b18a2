"""Fetching manifests and blobs from the peers the DHT names, verified and with failover.

- The DHT is asked for providers of the digest (or tag); this node is never among them.
- The first provider is asked at once; if it has not answered `hedge_after` later, the next one
  is asked too, and the first to answer wins (the other request is cancelled). A node a busy
  provider referred to is the exception: it may still be finding its own source, and is
  waited for up to `REFERRED_PATIENCE` (peers/referrals.py).
- A blob is hashed as it streams. Its last chunk is held back until the digest is checked, so a
  client never receives the whole of a wrong body: on a mismatch the response is cut, the peers
  that sent it are told (a signed report: they re-hash their copy and evict it if it is really
  wrong, content/scrub.py) and are not asked for that digest again for a minute.
- When a peer dies mid-blob, the stream continues from another provider with a Range request
  from the first missing byte; the client sees one whole, correct body.
- Providers are asked in the order of what this node knows of their load (`ProviderLoads`):
  the uploads each reported in its last answer, this node's own requests to each, and the
  throughput each delivered. A holder sending `--max-uploads` bodies already answers a blob
  request `429` at once; the next provider is asked without delay, and only when every one is
  busy is the least loaded asked again with a last-resort flag, which it serves anyway: the
  cluster never goes upstream for bytes it holds just because every holder is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TypeAlias

import aiohttp
from yarl import URL

from mirror.bodies import read_capped
from mirror.errors import (
    BodyTooLarge,
    DigestMismatch,
    MirrorError,
    PeerUnavailable,
    RangeNotSatisfiable,
)
from mirror.metrics import Metrics
from mirror.oci.mediatypes import MAX_MANIFEST_SIZE, detect_manifest_type
from mirror.oci.reference import Digest, parse_digest
from mirror.peers.auth import PEER_HEADER, RequestSigner, UrlSigner
from mirror.peers.ranged import BufferGauge, Opened, RangedStream
from mirror.peers.receiver import BodyBroken, Sink, SinkSlot, ThreadedBody, can_take_over
from mirror.peers.referrals import (
    HOPS_HEADER,
    TRY_HEADER,
    parse_hops,
    parse_referral,
    with_sharer,
)
from mirror.ranges import ByteRange, RangeRequest, parse_content_range, unsatisfied_size
from mirror.routing.router import Provider, Router

log = logging.getLogger(__name__)

# How long a node a referral named is waited for before the next name is asked too. It answers
# busy itself if its own download has not started within `PEER_START_WAIT` (3 s,
# content/service.py); this bounds the wait on one that cannot answer at all (its event loop
# stuck) without cutting short one that is about to.
REFERRED_PATIENCE = 4.0

_CHUNK = 1024 * 1024
# A blob's hash (`_PipelinedHasher`) takes this many bytes at least per worker call, and may
# fall this far behind its stream before the stream waits.
_HASH_BATCH = _CHUNK
_HASH_AHEAD = 4 * _CHUNK
# A peer that sent bytes not matching a digest is not asked for that digest again for this long:
# its node re-hashes and evicts a bad copy on our report within seconds, and bytes damaged on the
# way (the node's copy is fine) should not cost that peer more than this. Other digests it holds
# are still fetched from it: one rotten file says nothing about the rest of a disk.
_DISTRUST_SECONDS = 60.0
# ...unless it sent wrong bytes for this many different digests within _STRIKE_WINDOW: then it
# is a failing disk or a hostile node, and it is not asked for anything for _DISTRUST_NODE_SECONDS.
_STRIKES_FOR_NODE = 3
_STRIKE_WINDOW = 600.0
_DISTRUST_NODE_SECONDS = 600.0
_PROVIDERS_WANTED = 3
# Where a node takes reports of a blob it served that did not match its digest (registry/api.py).
REPORT_PATH_PREFIX = "/mirror/v1/verify/"
# A report is a small request answered at once; past this it is given up (the peer may be down).
_REPORT_TIMEOUT = 5.0
# Every answer of a node to a signed peer request says how many blob bodies it is sending to
# peers at that moment (registry/api.py): fetchers learn each holder's load for free.
UPLOADS_HEADER = "X-Mirror-Uploads"
# `<path>&last-resort=1`: a blob request every provider refused as busy. The holder serves it
# past its bound. A query parameter, so the request signature covers it (no one on the way can
# add it); not `mirror-*`, which marks a signed URL (peers/auth.py).
LAST_RESORT_PARAM = "last-resort"
# A holder's reported uploads describe it for this long: a blob upload lasts seconds, so an
# older count says little about now (this node's own requests to it are known exactly anyway).
_REPORT_FRESH_SECONDS = 5.0
# A holder that answered 429 is asked last for its Retry-After (within these bounds), so this
# node's other fetches go elsewhere at once instead of each paying a round trip to learn it.
_BUSY_SECONDS_DEFAULT = 1.0
_BUSY_SECONDS_MAX = 10.0
# Bodies shorter than this measure latency more than throughput: they do not update the average.
_MIN_MEASURED_BYTES = 256 * 1024
# Weight of the newest measurement in a provider's throughput average (EWMA): a few blobs are
# enough to follow a holder whose link filled up.
_THROUGHPUT_WEIGHT = 0.3
# Providers whose expected rates are within this factor are equals and drawn in random order
# (a provider twice as good is never passed over).
_TIE_FACTOR = 1.25
# What is known of a provider not heard of for this long is forgotten (memory stays bounded).
_FORGET_SECONDS = 600.0
_FORGET_PAST = 256
# A provider probed before the runtime is redirected to it answers a HEAD from its own store at
# once. Past this without an answer the next provider is probed beside it, as if it had failed,
# and it is passed over if it has not even taken the connection (a dead node refuses it or never
# takes it). It is also the bound on connecting.
_PROBE_TIMEOUT = 1.0
# A provider that took the probe's connection is alive, only maybe starved of CPU (a rollout's
# nodes start their pulls together): its probe stays out, beside the next ones, this long in
# all, and its late answer still wins if nobody answered sooner. Cut at `_PROBE_TIMEOUT` and
# probed again, it did its work twice and every fetcher's probes doubled just when every node
# was shortest of CPU (docs/benchmarks.md).
_SLOW_PROBE_TIMEOUT = 4.0
# Probes out at once, and not yet `_PROBE_TIMEOUT` old, while choosing where to redirect: the
# next provider is probed beside one that has not answered within `hedge_after`.
_PROBES_AT_ONCE = 2
# Every provider busy: this many of them, least loaded first, are asked to serve the runtime
# anyway before its node serves it another way (each may take `_PROBE_TIMEOUT`).
_LAST_RESORT_PROBES = 3
# The node that claimed a blob's upstream fetch answers a probe once its download started. A
# probe that waited this long falls back to a GET from it, which waits on (content/service.py).
_CLAIMANT_PROBE_TIMEOUT = 4.0
# The runtime asking again for a digest it was redirected for within this long is retrying: the
# transfer broke, or the bytes did not hash and it refused them. It is not redirected again but
# served by its node, which verifies what the peers send and reports a bad copy to its holder.
_REDIRECT_RETRY_SECONDS = 300.0
_REDIRECTS_REMEMBERED = 4096
# Which peer served each key lately (`served_by`, for the status page): this many keys.
_SERVERS_REMEMBERED = 1024
# A blob fetched in pieces asks the DHT again for its providers this often: nodes that started
# fetching it meanwhile (and announced themselves at once) take pieces too.
_PIECE_LOOKUP_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class PeerManifest:
    body: bytes
    media_type: str
    digest: str


@dataclass(frozen=True, slots=True)
class Redirect:
    """Where the runtime is sent for a blob: a signed URL at a provider, and how many hops that
    provider's bytes are from a holder (None: it did not say; see peers/referrals.py)."""

    url: str
    hops: int | None


@dataclass(slots=True)
class PeerBlob:
    """A blob (or a slice of it) streaming from peers: headers known, body not yet read.

    `sink`: where the stream's long bodies can be written on their receiving threads instead
    of passing through `chunks` (peers/receiver.py); set its target before reading `chunks`,
    which then yields only what the target did not take. None: a stream in pieces or a HEAD.
    """

    size: int
    offset: int
    length: int
    chunks: AsyncIterator[bytes] | None
    sink: SinkSlot | None = None
    # How far the answering provider's bytes are from a holder (`X-Mirror-Hops`; None: unsaid).
    hops: int | None = None


@dataclass(frozen=True, slots=True)
class PeerLoad:
    """What this node knows of one peer it asked, read-only (the status page shows it)."""

    node_id: bytes
    address: str
    # Its uploads now as far as this node can tell (`_Load.uploads`), from its last report.
    uploads: int
    # Seconds since its last X-Mirror-Uploads report; None: it never sent one.
    reported_ago: float | None
    throughput: float | None  # bytes/s its bodies arrived at (EWMA)
    in_flight: int  # this node's requests to it, sent and not yet done
    seen_ago: float | None  # seconds since its last answer to this node


@dataclass(frozen=True, slots=True)
class _Serves:
    """A probed provider serves the blob, its bytes `hops` from a holder (None: unsaid)."""

    hops: int | None


_Probed: TypeAlias = _Serves | list[Provider] | None


class _PeerSlowOrFailed(Exception):
    """One attempt at one peer failed; the caller moves on to the next provider."""


class _PeerTooFar(Exception):
    """The peer serves the blob from further down a chain than the fetch may take it from."""


class _PeerBusy(Exception):
    """The peer answered 429: it holds its bound of uploads. Not a failure: ask another,
    the sharers it referred to first (peers/referrals.py)."""

    def __init__(self, message: str, referred: list[Provider]) -> None:
        super().__init__(message)
        self.referred = referred


@dataclass(slots=True)
class _Load:
    """What this node knows of one provider's load."""

    # X-Mirror-Uploads of its last answer, when it came, and how many of this node's blob
    # requests to it were in flight then (counted in `reported`).
    reported: int = 0
    reported_at: float = -math.inf
    own_at_report: int = 0
    # Until when it is asked last: it answered 429.
    busy_until: float = -math.inf
    # Bytes per second its bodies arrived at (EWMA); None until one was long enough to tell.
    throughput: float | None = None
    # This node's blob requests to it: sent and not answered, and answered with a body that is
    # still arriving (a body is closed once the holder sent its last byte, or it was dropped;
    # weakly held, so a response nobody closed but everybody forgot does not count for ever).
    pending: int = 0
    bodies: weakref.WeakSet[aiohttp.ClientResponse] = field(default_factory=weakref.WeakSet)
    seen_at: float = -math.inf
    address: str = ""  # where it was last asked (its HTTP host:port)

    def own(self) -> int:
        for body in [body for body in self.bodies if body.closed]:
            self.bodies.discard(body)
        return self.pending + len(self.bodies)

    def uploads(self, now: float) -> int:
        """The uploads it is likely sending now: its recent report, corrected by what this node
        started or finished since; without a recent report, this node's own requests."""
        own = self.own()
        if now - self.reported_at > _REPORT_FRESH_SECONDS:
            return own
        return max(own, self.reported + own - self.own_at_report)


class ProviderLoads:
    """The order in which providers are asked, from what this node knows of each one's load.

    Three things, each free to know: the uploads a provider reported in its last answer
    (`X-Mirror-Uploads`, trusted for a few seconds), this node's own blob requests to it in
    flight (known exactly, so even without reports one node does not pile onto one holder),
    and the throughput its bodies arrived at (an EWMA of bytes/s; a provider never measured is
    assumed as fast as the best one, so a new holder, such as a node still downloading, is
    tried). A provider ranks by the rate a new request can expect from it, throughput /
    (uploads + 1): an idle holder beats a busy one of the same speed, and a much faster one can
    beat an idle slow one. Rates within `_TIE_FACTOR` of each other are ordered at random,
    so the many nodes of a rollout, which know the same, spread over equal holders instead of
    all choosing the first. A provider that answered 429 goes last until its Retry-After ends.
    """

    def __init__(self, clock: Callable[[], float], rng: random.Random | None = None) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._loads: dict[bytes, _Load] = {}

    def of(self, provider: Provider) -> _Load:
        load = self._loads.get(provider.node_id)
        if load is None:
            if len(self._loads) >= _FORGET_PAST:
                self._forget(self._clock())
            load = self._loads[provider.node_id] = _Load()
        load.address = provider.address
        return load

    def snapshot(self) -> list[PeerLoad]:
        """What is known of every provider asked lately (read-only copies)."""
        now = self._clock()

        def ago(at: float) -> float | None:
            return None if at == -math.inf else now - at

        return [
            PeerLoad(
                node_id,
                load.address,
                load.uploads(now),
                ago(load.reported_at),
                load.throughput,
                load.own(),
                ago(load.seen_at),
            )
            for node_id, load in self._loads.items()
        ]

    def order(self, providers: list[Provider]) -> list[Provider]:
        """Busy ones last; otherwise the best expected rate first, equals at random."""
        now = self._clock()
        loads = {p.node_id: self.of(p) for p in providers}
        known = [load.throughput for load in loads.values() if load.throughput is not None]
        assumed = max(known, default=1.0)

        def rank(provider: Provider) -> tuple[bool, float]:
            load = loads[provider.node_id]
            throughput = load.throughput if load.throughput is not None else assumed
            rate = throughput / (load.uploads(now) + 1)
            return load.busy_until > now, -rate * self._rng.uniform(1.0, _TIE_FACTOR)

        return sorted(providers, key=rank)

    def least_loaded(self, providers: list[Provider]) -> list[Provider]:
        """For a last resort: fewest uploads first, then the fastest, equals at random."""
        now = self._clock()

        def rank(provider: Provider) -> tuple[int, float, float]:
            load = self.of(provider)
            return load.uploads(now), -(load.throughput or 0.0), self._rng.random()

        return sorted(providers, key=rank)

    def answered(
        self, provider: Provider, response: aiohttp.ClientResponse, *, upload: bool
    ) -> None:
        """Take in an answer's report; `upload`: a blob GET, counted in this node's own."""
        now = self._clock()
        load = self.of(provider)
        load.seen_at = now
        counted = upload and response.status in (200, 206)
        reported = _count(response.headers.get(UPLOADS_HEADER))
        if reported is not None:
            # The holder counted this request only if it is sending its body.
            load.reported = reported
            load.reported_at = now
            load.own_at_report = load.own() - (1 if upload and not counted else 0)
        if counted:
            load.bodies.add(response)
        if response.status == 429:
            retry_after = _count(response.headers.get("Retry-After"))
            wait = _BUSY_SECONDS_DEFAULT if retry_after is None else float(retry_after)
            load.busy_until = now + min(wait, _BUSY_SECONDS_MAX)

    def measured(self, provider: Provider, received: int, seconds: float) -> None:
        """A body (or a part of it) of `received` bytes arrived from `provider` in `seconds`."""
        if received < _MIN_MEASURED_BYTES or seconds <= 0:
            return
        load = self.of(provider)
        rate = received / seconds
        if load.throughput is None:
            load.throughput = rate
        else:
            load.throughput += _THROUGHPUT_WEIGHT * (rate - load.throughput)

    def _forget(self, now: float) -> None:
        self._loads = {
            node_id: load
            for node_id, load in self._loads.items()
            if now - load.seen_at < _FORGET_SECONDS or load.own()
        }


def _count(text: str | None) -> int | None:
    """A small non-negative count from a header (ASCII digits only), else None."""
    if text is None or not (text.isascii() and text.isdigit()) or len(text) > 6:
        return None
    return int(text)


class PeerFetcher:
    def __init__(
        self,
        router: Router,
        signer: RequestSigner,
        metrics: Metrics,
        *,
        hedge_after: float = 0.15,
        referred_patience: float = REFERRED_PATIENCE,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        url_signer: UrlSigner | None = None,
        ranges: int = 1,
        range_size: int = 8 * 1024 * 1024,
        own: Provider | None = None,
    ) -> None:
        self._router = router
        # This node as its peers reach it: named in a whole-blob request it will share
        # (peers/referrals.py), never asked itself. None: it does not share (tests, no cache).
        self._own = own
        # --peer-ranges and --peer-range-size: a whole blob in `ranges` pieces at once, each
        # of `range_size` bytes (peers/ranged.py); 1: one stream.
        self._ranges = ranges
        self._range_size = range_size
        # Bytes of pieces held by blobs fetched in pieces (all of them), now and at most.
        self.piece_buffer = BufferGauge()
        self._signer = signer
        self._url_signer = url_signer
        self._redirected: dict[str, float] = {}  # digest -> until when a request is a retry
        self._metrics = metrics
        self._hedge_after = hedge_after
        self._referred_patience = referred_patience
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._read_timeout = read_timeout
        self._clock = clock
        # (node id, key) -> until when that node is not asked for that key; node id -> for all.
        self._distrusted: dict[tuple[bytes, str], float] = {}
        self._distrusted_nodes: dict[bytes, float] = {}
        # node id -> key -> when it last sent wrong bytes for that key.
        self._strikes: dict[bytes, dict[str, float]] = {}
        self._reports: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._loads = ProviderLoads(clock)
        # Key (digest or tag text) -> the address of the peer whose answer was taken last.
        self._servers: OrderedDict[str, str] = OrderedDict()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout, auto_decompress=False)

    async def close(self) -> None:
        for task in list(self._reports):
            task.cancel()
        await asyncio.gather(*self._reports, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def reports_sent(self) -> None:
        """Until the reports started so far have been answered or given up (tests, shutdown)."""
        while self._reports:
            await asyncio.gather(*self._reports, return_exceptions=True)

    def peer_loads(self) -> list[PeerLoad]:
        """The peers this node asked lately and their load as it knows it: introspection."""
        return self._loads.snapshot()

    def served_by(self, key: str) -> str | None:
        """The address of the peer whose answer for `key` (a digest or a tag) was taken last."""
        return self._servers.get(key)

    def _served(self, provider: Provider, *keys: str) -> None:
        for key in keys:
            self._servers[key] = provider.address
            self._servers.move_to_end(key)
        while len(self._servers) > _SERVERS_REMEMBERED:
            self._servers.popitem(last=False)

    async def providers(
        self, key_text: str, exclude: AbstractSet[bytes] = frozenset()
    ) -> list[Provider]:
        started = self._clock()
        found = await self._router.find_providers(key_text, want=_PROVIDERS_WANTED)
        now = self._clock()
        usable = [p for p in self._trusted_among(found, key_text) if p.node_id not in exclude]
        result = "found" if usable else "missing"
        self._metrics.peer_lookup_duration.labels(result).observe(now - started)
        return self._loads.order(usable)

    async def manifest(
        self, key_text: str, path: str, expected: Digest | None
    ) -> PeerManifest | None:
        """The manifest at `path` (`/v2/...` with `?ns=`) from the first peer giving valid bytes."""
        tried: set[bytes] = set()
        while candidates := await self.providers(key_text, exclude=tried):
            tried.update(p.node_id for p in candidates)
            winner = await self._first_answer(candidates, path, None)
            if winner is None:
                continue
            provider, response = winner
            try:
                body = await read_capped(response, MAX_MANIFEST_SIZE)
            except (aiohttp.ClientError, TimeoutError, BodyTooLarge) as exc:
                self._failed(provider, "broken", exc)
                continue
            finally:
                response.release()
            actual = "sha256:" + hashlib.sha256(body).hexdigest()
            claimed = str(expected) if expected else response.headers.get("Docker-Content-Digest")
            media_type = detect_manifest_type(body)
            if (claimed and claimed != actual) or media_type is None:
                self._distrust(provider, key_text, f"manifest {path} does not match {claimed}")
                if claimed and claimed != actual:
                    self._report_claimed(provider, claimed)
                continue
            self._served(provider, key_text, actual)
            return PeerManifest(body, media_type, actual)
        return None

    async def blob(
        self,
        digest: Digest,
        path: str,
        requested: RangeRequest | None,
        *,
        head: bool = False,
        sharing: bool = False,
        nearer_than: int | None = None,
    ) -> PeerBlob | None:
        """Open the blob (or the client's range of it) at the first provider that answers.

        With `head`, only the headers are fetched and `chunks` is None. Providers that answer
        busy are set aside while the DHT is asked for others (a node of the swarm may have
        announced itself meanwhile); only when none is left is the least loaded asked again,
        as a last resort. `sharing`: this node serves the blob to peers while it arrives, and
        says so, so a busy provider can refer others to it (peers/referrals.py).
        `nearer_than`: only a provider whose bytes are fewer hops than this from a holder is
        taken (one that does not say is not): this node already served what its runtime
        receives at that many hops, and a source further down might be fed by it.
        """
        if sharing and self._own is not None:
            path = with_sharer(path, self._own)
        tried: set[bytes] = set()
        busy: list[Provider] = []
        ranged = requested is None and not head and self._ranges > 1
        while candidates := await self.providers(str(digest), exclude=tried):
            tried.update(p.node_id for p in candidates)
            found = await self._open_blob(
                candidates, digest, path, requested, head, busy, ranged, nearer_than
            )
            if found is not None:
                return found
        return await self._open_last_resort(
            busy, digest, path, requested, head, ranged, nearer_than
        )

    async def redirect_url(
        self,
        digest: Digest,
        path: str,
        *,
        sharing: bool = False,
        among: list[Provider] | None = None,
    ) -> Redirect | None:
        """A signed URL (`http://HOLDER/v2/...`) at a provider that serves `digest`.

        For --peer-transfer=redirect: the runtime fetches from the holder directly. Providers
        are probed in the order `providers` gives (least loaded first), the next one beside a
        probe not answered within `hedge_after` (`_probe_hedged`), with a HEAD on a signed URL
        of their own, which a holder answers from its own store, its download under way or its
        runtime's fetch in progress (registry/api.py). The first to answer 200 (one that took
        the probe's connection has `_SLOW_PROBE_TIMEOUT` to) gets a URL signed for one GET, and
        keeps an upload slot for it meanwhile; its answer says its hops (peers/referrals.py).
        `sharing`: this node's runtime will serve the blob to peers as it arrives (its store
        shows what the runtime receives), so it asks as a sharer: a provider at its fan-out
        answers 429 naming the sharers it sends the blob to, which are probed first, and a
        rollout's runtimes line up as a swarm instead of all fetching from the first holder.
        When every provider is busy, the least loaded that still answers a last-resort probe
        gets the runtime anyway (a signed GET is never refused). `among`: these providers only
        (the node a claim named), those trusted for the digest, each given
        `_CLAIMANT_PROBE_TIMEOUT` to answer, as it may not have its first bytes yet.

        None: nobody holds it, or this is a retry (see `_REDIRECT_RETRY_SECONDS`): the caller
        serves the blob another way.
        """
        if self._url_signer is None:
            return None
        now = self._clock()
        if self._redirected.get(str(digest), -math.inf) > now:
            self._metrics.peer_redirects.labels("retry").inc()
            log.info("%s asked for again after its redirect (a retry): served here", digest)
            return None
        if sharing and self._own is not None:
            path = with_sharer(path, self._own)
        busy: list[Provider] = []
        if among is None:
            timeout = _PROBE_TIMEOUT
            found = await self._probe_hedged(
                [],
                path,
                busy,
                late_after=timeout,
                answer_within=_SLOW_PROBE_TIMEOUT,
                refill=str(digest),
            )
        else:
            timeout = _CLAIMANT_PROBE_TIMEOUT
            queue = self._trusted_among(among, str(digest))
            found = await self._probe_hedged(
                queue, path, busy, late_after=timeout, answer_within=timeout
            )
        if found is not None:
            provider, serves = found
            return self._redirect_to(provider, digest, path, now, serves.hops)
        for holder in self._loads.least_loaded(busy)[:_LAST_RESORT_PROBES]:
            # Every provider was busy: the least loaded serves the runtime anyway, once it
            # confirms it still serves the blob (and says its hops).
            answer = await self._probe(holder, path, timeout, timeout, last_resort=True)
            if isinstance(answer, _Serves):
                self._metrics.peer_last_resort_fetches.inc()
                log.info(
                    "every provider of %s is busy; sending the runtime to %s",
                    digest,
                    holder.address,
                )
                return self._redirect_to(holder, digest, path, now, answer.hops)
        self._metrics.peer_redirects.labels("no-holder").inc()
        return None

    async def _probe_hedged(
        self,
        queue: list[Provider],
        path: str,
        busy: list[Provider],
        *,
        late_after: float,
        answer_within: float,
        refill: str | None = None,
    ) -> tuple[Provider, _Serves] | None:
        """The first of `queue`'s providers to serve `path` (probed in order, the queue topped up
        from the DHT's providers of `refill` when it runs dry), with its answer; None if none.

        A probe not answered within `hedge_after` has the next candidate probed beside it, as
        `_first_answer` does for bodies: a node too starved to answer soon (a rollout's nodes
        start their pulls together) costs the pull that long, not the probe's bound. At most
        `_PROBES_AT_ONCE` probes younger than `late_after` are out at once; an older one stays
        out, no longer counted, until it is answered or `answer_within` passes (each provider
        is probed once: a late answer is as good as an early one, and asking again would make
        a starved node do the work twice). Busy providers go into `busy`, and the sharers they
        name are probed next. A probe still out when another wins is cut off; if its provider
        had accepted it, the slot it keeps lapses by itself (`UploadSlots.reserve`).
        """
        loop = asyncio.get_running_loop()
        tried: set[bytes] = set()
        running: dict[asyncio.Task[_Probed], tuple[Provider, float]] = {}  # and when sent
        drained = False  # the DHT had no one new: ask it again only once a probe ended
        try:
            while True:
                now = loop.time()
                young = [sent for _, sent in running.values() if now - sent < late_after]
                if len(young) < _PROBES_AT_ONCE:
                    provider = _untried(queue, tried)
                    if provider is None and refill is not None and not drained:
                        queue = await self.providers(refill, exclude=tried)
                        drained = not queue
                        provider = _untried(queue, tried)
                    if provider is not None:
                        tried.add(provider.node_id)
                        probe = self._probe(provider, path, late_after, answer_within)
                        now = loop.time()
                        running[asyncio.create_task(probe)] = provider, now
                        young.append(now)
                if not running:
                    return None
                # Another candidate may come: hedge to it if the ones out are slow to answer,
                # or once the oldest of them is late.
                untried = any(p.node_id not in tried for p in queue)
                more = untried or (refill is not None and not drained)
                wait: float | None = None
                if more:
                    full = len(young) >= _PROBES_AT_ONCE
                    wait = max(0.0, min(young) + late_after - now) if full else self._hedge_after
                done, _ = await asyncio.wait(
                    running, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    provider, _ = running.pop(task)
                    answer = task.result()
                    drained = False
                    if isinstance(answer, _Serves):
                        return provider, answer
                    if isinstance(answer, list):  # busy: the sharers it named first
                        busy.append(provider)
                        queue[:0] = [p for p in answer if p.node_id not in tried]
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    def _redirect_to(
        self, holder: Provider, digest: Digest, path: str, now: float, hops: int | None
    ) -> Redirect:
        log.info("redirecting the runtime to %s for %s (%s hops)", holder.address, digest, hops)
        self._remember_redirect(str(digest), now)
        self._served(holder, str(digest))
        return Redirect(self._signed_url(holder, "GET", path), hops)

    def _remember_redirect(self, digest: str, now: float) -> None:
        if len(self._redirected) >= _REDIRECTS_REMEMBERED:
            self._redirected = {d: t for d, t in self._redirected.items() if t > now}
            while len(self._redirected) >= _REDIRECTS_REMEMBERED:  # the oldest go first
                del self._redirected[next(iter(self._redirected))]
        self._redirected.pop(digest, None)
        self._redirected[digest] = now + _REDIRECT_RETRY_SECONDS

    def _signed_url(self, provider: Provider, method: str, path: str) -> str:
        assert self._url_signer is not None
        return f"http://{provider.address}{self._url_signer.sign(method, provider.address, path)}"

    async def _probe(
        self,
        provider: Provider,
        path: str,
        connect_within: float,
        answer_within: float,
        *,
        last_resort: bool = False,
    ) -> _Probed:
        """Whether `provider` serves `path` on a signed URL now (and its hops); busy, with the
        sharers it referred to (maybe none); or None (it does not hold it, did not take the
        connection within `connect_within` or answer within `answer_within`, or is
        unreachable). A `last_resort` probe is not refused for being busy.

        Connecting and answering are bounded apart because they tell different things: a
        kernel takes a connection for a process starved of CPU, and refuses it, or drops it
        unanswered, for a process or machine that is gone."""
        assert self._session is not None, "PeerFetcher.start() was not called"
        if last_resort:
            path = _as_last_resort(path)
        url = URL(self._signed_url(provider, "HEAD", path), encoded=True)
        bounds = aiohttp.ClientTimeout(total=None, connect=connect_within, sock_read=answer_within)
        try:
            async with self._session.head(url, allow_redirects=False, timeout=bounds) as response:
                self._loads.answered(provider, response, upload=False)
                if response.status == 200:
                    return _Serves(parse_hops(response.headers.get(HOPS_HEADER)))
                if response.status == 429:
                    referred = parse_referral(response.headers.get(TRY_HEADER))
                    return [p for p in referred if p.node_id != self._own_id()]
                error = f"answered {response.status} to a signed URL"
        except aiohttp.SocketTimeoutError:
            self._failed(provider, "slow", f"took the probe, no answer in {answer_within:.0f}s")
            return None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = str(exc) or type(exc).__name__
        self._failed(provider, "unavailable", error)
        return None

    def _own_id(self) -> bytes | None:
        return self._own.node_id if self._own is not None else None

    async def blob_from(
        self,
        candidates: list[Provider],
        digest: Digest,
        path: str,
        requested: RangeRequest | None,
        *,
        head: bool = False,
        nearer_than: int | None = None,
    ) -> PeerBlob | None:
        """Like `blob`, from these providers (the node a claim named), those trusted for it."""
        candidates = self._trusted_among(candidates, str(digest))
        if not candidates:
            return None
        busy: list[Provider] = []
        found = await self._open_blob(
            candidates, digest, path, requested, head, busy, nearer_than=nearer_than
        )
        if found is None:
            found = await self._open_last_resort(
                busy, digest, path, requested, head, nearer_than=nearer_than
            )
        return found

    async def _open_last_resort(
        self,
        busy: list[Provider],
        digest: Digest,
        path: str,
        requested: RangeRequest | None,
        head: bool,
        ranged: bool = False,
        nearer_than: int | None = None,
    ) -> PeerBlob | None:
        """Every provider that answered was busy: ask the least loaded to serve it anyway.

        Going upstream instead would fetch bytes the cluster holds (each blob is fetched from
        upstream once); waiting and asking again would cost the pull a round of 429s.
        """
        if not busy:
            return None
        self._metrics.peer_last_resort_fetches.inc()
        ordered = self._loads.least_loaded(busy)
        log.info("every provider of %s is busy; asking %s anyway", digest, ordered[0].address)
        return await self._open_blob(
            ordered, digest, path, requested, head, None, ranged, nearer_than
        )

    async def _open_blob(
        self,
        candidates: list[Provider],
        digest: Digest,
        path: str,
        requested: RangeRequest | None,
        head: bool,
        busy: list[Provider] | None,
        ranged: bool = False,
        nearer_than: int | None = None,
    ) -> PeerBlob | None:
        """The first good answer of `candidates`; those that answer busy go into `busy`
        (None: this is the last resort, asked past their bound). `nearer_than`: see `blob`.

        `ranged` (a whole blob, --peer-ranges > 1): the first piece is asked for; when the
        blob is longer, the rest comes in pieces from several providers (`_ranged`)."""
        method = "HEAD" if head else "GET"
        range_header = requested.header() if requested is not None else None
        if ranged:
            range_header = ByteRange(0, self._range_size).header()
        try:
            winner = await self._first_answer(
                candidates,
                path,
                range_header,
                method,
                key=str(digest),
                upload=not head,
                busy=busy,
                last_resort=busy is None,
                nearer_than=nearer_than,
            )
        except RangeNotSatisfiable:
            if not ranged:
                raise
            # An empty blob has no first piece: asked for whole instead.
            return await self._open_blob(
                candidates, digest, path, None, head, busy, nearer_than=nearer_than
            )
        if winner is None:
            return None
        provider, response = winner
        size, offset, length = _extent(response)
        hops = parse_hops(response.headers.get(HOPS_HEADER))
        if head:
            response.release()
            return PeerBlob(size, offset, length, None, hops=hops)
        log.info("streaming %s from %s", digest, provider.address)
        self._served(provider, str(digest))
        if ranged and response.status == 206:
            if offset != 0:
                response.close()
                self._failed(provider, "ignored-range", None)
                return None
            if length < size:
                chunks = self._ranged(digest, path, (provider, response), candidates, size)
                return PeerBlob(size, 0, size, chunks, hops=hops)
        # One stream: not ranged, or the holder ignored the range, or one piece is the blob.
        slot = SinkSlot()
        chunks = self._stream(
            digest, path, provider, response, candidates, size, offset, length, slot
        )
        return PeerBlob(size, offset, length, chunks, slot, hops)

    async def _ranged(
        self,
        digest: Digest,
        path: str,
        first: Opened,
        candidates: list[Provider],
        size: int,
    ) -> AsyncIterator[bytes]:
        """The whole blob in pieces from several providers (peers/ranged.py), verified here.

        As for one provider, the digest is computed over the bytes in order and the last chunk
        is held back until it matches. A mismatch cannot be pinned on one piece (no piece has a
        digest of its own), so every provider that sent a piece is distrusted for this digest
        and reported, as after a resume: a report costs a good holder one re-hash.
        """
        pieces = _Pieces(self, digest, path, candidates)
        stream = RangedStream(
            pieces, size, self._range_size, self._ranges, first, self.piece_buffer, self._clock
        )
        hasher = _PipelinedHasher(digest.algorithm)
        chunks = stream.chunks()
        held: bytes | None = None
        try:
            async for chunk in chunks:
                await hasher.update(chunk)
                if held is not None:
                    yield held
                held = chunk
            if await hasher.hexdigest() != digest.hex:
                raise self._blame(stream.senders, digest)
            if held is not None:
                yield held
        finally:
            await chunks.aclose()
            await pieces.close()

    async def _first_answer(
        self,
        candidates: list[Provider],
        path: str,
        range_header: str | None,
        method: str = "GET",
        *,
        key: str = "",
        upload: bool = False,
        busy: list[Provider] | None = None,
        last_resort: bool = False,
        nearer_than: int | None = None,
    ) -> tuple[Provider, aiohttp.ClientResponse] | None:
        """Ask providers in turn, hedging to the next when one is slow; first good answer wins.

        `upload`: a blob GET, which a holder bounds. One that answers busy (429) is no failure:
        it goes into `busy` (for the caller's last resort) and the next provider is asked at
        once: first the sharers it referred to (not asked yet here, not this node, trusted for
        `key`), which are hedged away from only after `referred_patience`. `last_resort` asks
        past the holders' bounds.
        """
        waiting = list(candidates)
        asked = {p.node_id for p in candidates}
        # Nodes a busy provider referred to: one may still be finding its own source, so it is
        # hedged away from only after `referred_patience` (it answers busy past its own bound
        # first: referrals.py).
        referred: set[bytes] = set()
        if self._own is not None:
            asked.add(self._own.node_id)
        running: dict[asyncio.Task[aiohttp.ClientResponse], Provider] = {}
        try:
            while waiting or running:
                if waiting and (not running or len(running) < 2):
                    provider = waiting.pop(0)
                    task = asyncio.create_task(
                        self._request(
                            provider,
                            path,
                            range_header,
                            method,
                            upload=upload,
                            last_resort=last_resort,
                            nearer_than=nearer_than,
                        )
                    )
                    running[task] = provider
                patient = any(p.node_id in referred for p in running.values())
                timeout = None
                if waiting:
                    timeout = self._referred_patience if patient else self._hedge_after
                done, _ = await asyncio.wait(
                    running, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    provider = running.pop(task)
                    try:
                        return provider, task.result()
                    except _PeerBusy as exc:
                        fresh = self._referred(exc.referred, asked, key)
                        referred.update(p.node_id for p in fresh)
                        waiting[:0] = fresh
                        if busy is None:
                            self._failed(provider, "busy", exc)
                            continue
                        busy.append(provider)
                        self._metrics.peer_fetches_steered.inc()
                        log.info("peer %s is busy (%s): asking another", provider.address, exc)
                    except _PeerSlowOrFailed as exc:
                        self._failed(provider, "unavailable", exc)
                    except _PeerTooFar as exc:
                        self._failed(provider, "too-far", exc)
                    except RangeNotSatisfiable:
                        raise
            return None
        finally:
            for task in running:
                task.cancel()
            for task in running:
                try:
                    response = await task
                except (
                    _PeerSlowOrFailed,
                    _PeerBusy,
                    _PeerTooFar,
                    RangeNotSatisfiable,
                    asyncio.CancelledError,
                ):
                    continue
                response.close()

    def _referred(self, referred: list[Provider], asked: set[bytes], key: str) -> list[Provider]:
        """The sharers a busy provider referred to that are worth asking: new and trusted."""
        now = self._clock()
        fresh = [p for p in referred if p.node_id not in asked and self._trusted(p, key, now)]
        asked.update(p.node_id for p in fresh)
        if fresh:
            self._metrics.peer_referrals_followed.inc(len(fresh))
            log.info("referred to %s", ", ".join(p.address for p in fresh))
        return fresh

    async def _request(
        self,
        provider: Provider,
        path: str,
        range_header: str | None,
        method: str,
        *,
        upload: bool = False,
        last_resort: bool = False,
        nearer_than: int | None = None,
    ) -> aiohttp.ClientResponse:
        assert self._session is not None, "PeerFetcher.start() was not called"
        if last_resort:
            path = _as_last_resort(path)
        headers = {PEER_HEADER: self._signer.sign(method, path)}
        if range_header is not None:
            headers["Range"] = range_header
        load = self._loads.of(provider)
        load.pending += upload
        try:
            # `encoded`: sent exactly as signed (the peer checks the raw request target).
            url = URL(f"http://{provider.address}{path}", encoded=True)
            response = await self._session.request(
                method, url, headers=headers, allow_redirects=False
            )
            self._loads.answered(provider, response, upload=upload)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _PeerSlowOrFailed(str(exc) or type(exc).__name__) from exc
        finally:
            load.pending -= upload
        if response.status in (200, 206):
            if nearer_than is not None:
                hops = parse_hops(response.headers.get(HOPS_HEADER))
                if hops is None or hops >= nearer_than:
                    response.close()
                    raise _PeerTooFar(f"its bytes are {hops} hops from a holder")
            return response
        response.release()
        if response.status == 429:
            raise _PeerBusy(
                f"{response.headers.get(UPLOADS_HEADER, '?')} uploads",
                parse_referral(response.headers.get(TRY_HEADER)),
            )
        if response.status == 416:
            raise RangeNotSatisfiable(
                "range not satisfiable",
                size=unsatisfied_size(response.headers.get("Content-Range")),
            )
        raise _PeerSlowOrFailed(f"answered {response.status}")

    async def _stream(
        self,
        digest: Digest,
        path: str,
        provider: Provider,
        response: aiohttp.ClientResponse,
        candidates: list[Provider],
        size: int,
        offset: int,
        length: int,
        slot: SinkSlot,
    ) -> AsyncIterator[bytes]:
        end = offset + length
        position = offset
        verify = offset == 0 and length == size
        hasher = _PipelinedHasher(digest.algorithm) if verify else None
        used = [provider]
        spares = [p for p in candidates if p is not provider]
        held: bytes | None = None
        # What arrived from the current provider, and since when: its throughput.
        since, received = self._clock(), 0
        try:
            while True:
                try:
                    if held is not None and slot.target is not None:
                        # Not the last chunk after all: out before the new body's thread may
                        # write what follows it (the sink takes bytes only in order).
                        yield held
                        held = None
                    body = self._body(response, end - position, hasher, slot.target, position)
                    async with contextlib.aclosing(body):
                        async for chunk in body:
                            if isinstance(chunk, int):  # written by the receiving thread
                                position += chunk
                                received += chunk
                                continue
                            position += len(chunk)
                            received += len(chunk)
                            if held is not None:
                                yield held
                            held = chunk
                    if position < end:
                        raise _PeerSlowOrFailed(f"ended at byte {position} of {end}")
                    self._loads.measured(provider, received, self._clock() - since)
                    break
                except (
                    _PeerSlowOrFailed,
                    BodyBroken,
                    aiohttp.ClientError,
                    TimeoutError,
                    OSError,
                ) as exc:
                    response.close()
                    self._loads.measured(provider, received, self._clock() - since)
                    self._failed(provider, "broken", exc)
                    resumed = await self._resume(digest, path, spares, used, position, end)
                    if resumed is None:
                        raise PeerUnavailable(
                            f"no peer could continue {digest} from byte {position}"
                        ) from exc
                    provider, response = resumed
                    since, received = self._clock(), 0
                    used.append(provider)
                    log.info("resuming %s at byte %d from %s", digest, position, provider.address)
            if hasher is not None and await hasher.hexdigest() != digest.hex:
                raise self._blame(used, digest)
            if held is not None:
                yield held
        finally:
            response.close()

    async def _body(
        self,
        response: aiohttp.ClientResponse,
        remaining: int,
        hasher: _PipelinedHasher | None,
        sink: Sink | None = None,
        position: int = 0,
    ) -> AsyncGenerator[bytes | int, None]:
        """The rest of `response`'s body, `remaining` bytes from `position`, each added to
        `hasher` in order.

        A long body is received by a thread of its own (peers/receiver.py: a third of the CPU
        on this node), which writes it into `sink` when there is one (yielding the counts
        written); a short or unusual one comes through aiohttp, piece by piece as the
        connection received it (iter_chunked would copy them together on the event loop).
        """
        if can_take_over(response, remaining):
            digest = await hasher.settled() if hasher is not None else None
            body = ThreadedBody(
                response,
                remaining,
                digest,
                stall_seconds=self._read_timeout,
                sink=sink,
                offset=position,
            )
            try:
                async for piece in body:
                    yield piece
            finally:
                await body.aclose()
            return
        async for chunk, _ in response.content.iter_chunks():
            chunk = chunk[:remaining]
            if not chunk:
                continue
            remaining -= len(chunk)
            if hasher is not None:
                await hasher.update(chunk)
            yield chunk

    async def _resume(
        self,
        digest: Digest,
        path: str,
        spares: list[Provider],
        used: list[Provider],
        position: int,
        end: int,
    ) -> tuple[Provider, aiohttp.ClientResponse] | None:
        """Continue from `position` at another provider, asking the DHT again if none is left.

        Providers that answer busy are set aside; if no other one continues, the least loaded
        of them is asked as a last resort (a half-sent blob is not given up for a busy holder).
        """
        range_header = ByteRange(position, end - position).header()
        busy: list[Provider] = []
        for _ in range(2):
            if not spares:
                skip = {p.node_id for p in used} | {p.node_id for p in busy}
                spares.extend(await self.providers(str(digest), exclude=skip))
            if not spares:
                break
            candidates = list(spares)
            spares.clear()
            resumed = await self._resume_from(
                candidates, digest, path, range_header, position, busy
            )
            if resumed is not None:
                spares.extend(p for p in candidates if p is not resumed[0])
                return resumed
        if not busy:
            return None
        self._metrics.peer_last_resort_fetches.inc()
        ordered = self._loads.least_loaded(busy)
        log.info("every provider of %s is busy; resuming at %s anyway", digest, ordered[0].address)
        return await self._resume_from(ordered, digest, path, range_header, position, None)

    async def _resume_from(
        self,
        candidates: list[Provider],
        digest: Digest,
        path: str,
        range_header: str,
        position: int,
        busy: list[Provider] | None,
    ) -> tuple[Provider, aiohttp.ClientResponse] | None:
        """The first of `candidates` to send the rest from `position` (a 206 starting there)."""
        try:
            winner = await self._first_answer(
                candidates,
                path,
                range_header,
                key=str(digest),
                upload=True,
                busy=busy,
                last_resort=busy is None,
            )
        except RangeNotSatisfiable:
            return None
        if winner is None:
            return None
        provider, response = winner
        if response.status == 206 and _extent(response)[1] == position:
            return winner
        response.close()
        self._failed(provider, "ignored-range", None)
        return None

    def _failed(self, provider: Provider, reason: str, error: object) -> None:
        self._metrics.peer_fetch_failures.labels(reason).inc()
        log.info("peer %s failed (%s): %s", provider.address, reason, error)

    def _trusted_among(self, providers: list[Provider], key: str) -> list[Provider]:
        now = self._clock()
        return [p for p in providers if self._trusted(p, key, now)]

    def _trusted(self, provider: Provider, key: str, now: float) -> bool:
        return (
            self._distrusted.get((provider.node_id, key), 0.0) <= now
            and self._distrusted_nodes.get(provider.node_id, 0.0) <= now
        )

    def _distrust(self, provider: Provider, key: str, why: str) -> None:
        """Stop asking `provider` for `key` for a while; for anything, after repeated offences."""
        self._metrics.peer_fetch_failures.labels("digest-mismatch").inc()
        now = self._clock()
        self._distrusted = {pair: until for pair, until in self._distrusted.items() if until > now}
        self._distrusted[(provider.node_id, key)] = now + _DISTRUST_SECONDS
        strikes = {
            k: at
            for k, at in self._strikes.get(provider.node_id, {}).items()
            if now - at < _STRIKE_WINDOW
        }
        strikes[key] = now
        self._strikes[provider.node_id] = strikes
        if len(strikes) >= _STRIKES_FOR_NODE:
            self._distrusted_nodes[provider.node_id] = now + _DISTRUST_NODE_SECONDS
            log.warning(
                "distrusting peer %s for %.0fs for everything: wrong bytes for %d digests (%s)",
                provider.address,
                _DISTRUST_NODE_SECONDS,
                len(strikes),
                why,
            )
            return
        log.warning(
            "not asking peer %s for %s for %.0fs: %s", provider.address, key, _DISTRUST_SECONDS, why
        )

    def _report_claimed(self, provider: Provider, claimed: str) -> None:
        """Report a manifest that did not match the digest asked for or claimed."""
        try:
            digest = parse_digest(claimed)
        except MirrorError:
            return  # not a digest: nothing the holder could re-hash
        self._report(provider, digest)

    async def post_signed(self, address: str, path_qs: str, body: object) -> int:
        """POST `body` as JSON to another node's `path_qs`, signed as a peer request; its
        status. For messages between nodes (a distribution's progress to its origin);
        transport failures raise `PeerUnavailable`."""
        assert self._session is not None, "PeerFetcher.start() was not called"
        headers = {PEER_HEADER: self._signer.sign("POST", path_qs)}
        url = URL(f"http://{address}{path_qs}", encoded=True)
        try:
            async with asyncio.timeout(_REPORT_TIMEOUT):
                async with self._session.post(
                    url, json=body, headers=headers, allow_redirects=False
                ) as response:
                    await response.read()
                    return response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerUnavailable(f"{address} did not take {path_qs}: {exc}") from exc

    def _blame(self, senders: Iterable[Provider], digest: Digest) -> DigestMismatch:
        """Bytes from several peers (after a resume, or in pieces) did not hash to `digest`:
        the culprit is unknown, so each is distrusted for it and told. A report costs a good
        holder one re-hash, never its copy."""
        for bad in senders:
            self._distrust(bad, str(digest), f"{digest} streamed with a wrong digest")
            self._report(bad, digest)
        return DigestMismatch(f"peers sent bytes that do not hash to {digest}")

    def _report(self, provider: Provider, digest: Digest) -> None:
        """Tell `provider` its copy of `digest` did not hash; in the background, so the client's
        error is not delayed by it."""
        task = asyncio.create_task(self._send_report(provider, digest))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _send_report(self, provider: Provider, digest: Digest) -> None:
        assert self._session is not None, "PeerFetcher.start() was not called"
        path = f"{REPORT_PATH_PREFIX}{digest}"
        headers = {PEER_HEADER: self._signer.sign("POST", path)}
        url = URL(f"http://{provider.address}{path}", encoded=True)
        try:
            async with asyncio.timeout(_REPORT_TIMEOUT):
                async with self._session.post(
                    url, headers=headers, allow_redirects=False
                ) as response:
                    status = response.status
                    await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._metrics.corruption_reports_sent.labels("failed").inc()
            log.info("could not report %s to %s: %s", digest, provider.address, exc)
            return
        result = "accepted" if 200 <= status < 300 else "refused"
        self._metrics.corruption_reports_sent.labels(result).inc()
        log.info("reported %s to %s: %s (%d)", digest, provider.address, result, status)


class _Pieces:
    """Opens the pieces of one blob for `RangedStream`: each at the provider least loaded when
    it starts (this node's own pieces in flight count, so they spread), failing over, steering
    past busy ones and taking a last resort as a resume does (`PeerFetcher._resume`)."""

    def __init__(
        self, fetcher: PeerFetcher, digest: Digest, path: str, providers: list[Provider]
    ) -> None:
        self._fetcher = fetcher
        self._digest = digest
        self._path = path
        self._providers = list(providers)
        self._looked_up = fetcher._clock()
        self._lookup: asyncio.Task[None] | None = None

    async def open_piece(
        self, position: int, end: int, failed: Sequence[Provider]
    ) -> Opened | None:
        fetcher = self._fetcher
        now = fetcher._clock()
        if self._lookup is None and now - self._looked_up >= _PIECE_LOOKUP_SECONDS:
            self._looked_up = now
            self._lookup = asyncio.create_task(self._look_up())
        key = str(self._digest)
        skip = {p.node_id for p in failed}
        usable = [
            p for p in self._providers if p.node_id not in skip and fetcher._trusted(p, key, now)
        ]
        spares = fetcher._loads.order(usable)
        # Counted as this node's request to the first choice at once, not only when its request
        # task runs: the pieces starting together then spread instead of all choosing it.
        chosen = fetcher._loads.of(spares[0]) if spares else None
        if chosen is not None:
            chosen.pending += 1
        try:
            return await fetcher._resume(
                self._digest, self._path, spares, list(failed), position, end
            )
        finally:
            if chosen is not None:
                chosen.pending -= 1

    def piece_done(self, provider: Provider, received: int, seconds: float) -> None:
        self._fetcher._loads.measured(provider, received, seconds)

    def piece_broke(
        self, provider: Provider, received: int, seconds: float, error: BaseException
    ) -> None:
        self._fetcher._loads.measured(provider, received, seconds)
        self._fetcher._failed(provider, "broken", error)

    async def _look_up(self) -> None:
        try:
            found = await self._fetcher.providers(str(self._digest))
        except (MirrorError, OSError) as exc:
            log.info("looking up providers of %s again failed: %s", self._digest, exc)
            found = []
        known = {p.node_id for p in self._providers}
        self._providers.extend(p for p in found if p.node_id not in known)
        self._lookup = None

    async def close(self) -> None:
        if self._lookup is not None:
            self._lookup.cancel()
            await asyncio.gather(self._lookup, return_exceptions=True)
            self._lookup = None


class _PipelinedHasher:
    """Hashes on a worker thread while the event loop forwards the bytes.

    Hashing is the largest cost of proxying a blob (SHA-256 runs at about 1.5 GiB/s per core).
    hashlib releases the GIL for large updates, so the hash runs while the loop receives and
    passes on the next chunks. Chunks are queued and hashed in order, at least `_HASH_BATCH`
    bytes of them per worker call (a connection hands over pieces of up to 256 KiB, and every
    hand-off to a thread and back costs two context switches), one call at a time. `update`
    only waits when `_HASH_AHEAD` bytes are queued: the hash's latency (a worker must get a
    CPU and the GIL back) stays off the bytes' way, and memory stays bounded (what is queued,
    plus the batch being hashed).
    """

    def __init__(self, algorithm: str) -> None:
        self._hash = hashlib.new(algorithm)
        self._running: asyncio.Future[None] | None = None
        self._queued: list[bytes] = []
        self._queued_bytes = 0

    async def update(self, chunk: bytes) -> None:
        self._queued.append(chunk)
        self._queued_bytes += len(chunk)
        if self._queued_bytes < _HASH_BATCH:
            return
        if self._running is not None:
            if not self._running.done() and self._queued_bytes < _HASH_AHEAD:
                return
            await self._running
        self._start()
        # A stream whose bytes are all here already (pieces fetched ahead) would otherwise go
        # through without ever letting the loop's other tasks run.
        await asyncio.sleep(0)

    def _start(self) -> asyncio.Future[None]:
        batch, self._queued, self._queued_bytes = self._queued, [], 0
        self._running = asyncio.get_running_loop().run_in_executor(None, self._hash_all, batch)
        return self._running

    def _hash_all(self, batch: list[bytes]) -> None:
        for chunk in batch:
            self._hash.update(chunk)

    async def settled(self) -> hashlib._Hash:
        """The hash with every byte given so far in it, for a caller that updates it directly
        next (and gives nothing to `update` meanwhile)."""
        if self._running is not None:
            await self._running
        if self._queued:
            await self._start()
        return self._hash

    async def hexdigest(self) -> str:
        return (await self.settled()).hexdigest()


def _extent(response: aiohttp.ClientResponse) -> tuple[int, int, int]:
    """(blob size, offset, length) of a 200 or 206 answer."""
    length = response.content_length or 0
    if response.status != 206:
        return length, 0, length
    content_range = response.headers.get("Content-Range")
    parsed = parse_content_range(content_range)
    if parsed is None:
        raise PeerUnavailable(f"peer sent an unusable Content-Range {content_range!r}")
    byte_range, size = parsed
    return size, byte_range.offset, byte_range.length


def _as_last_resort(path: str) -> str:
    """`path` asking to be served past the holder's bound (`LAST_RESORT_PARAM`)."""
    return f"{path}{'&' if '?' in path else '?'}{LAST_RESORT_PARAM}=1"


def _untried(queue: list[Provider], tried: AbstractSet[bytes]) -> Provider | None:
    """The first provider of `queue` not probed yet, taken off it (those before it too)."""
    while queue:
        provider = queue.pop(0)
        if provider.node_id not in tried:
            return provider
    return None
