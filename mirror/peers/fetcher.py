"""Fetching manifests and blobs from the peers the DHT names, verified and with failover.

- The DHT is asked for providers of the digest (or tag); this node is never among them.
- The first provider is asked at once; if it has not answered `hedge_after` later, the next one
  is asked too, and the first to answer wins (the other request is cancelled).
- A blob is hashed as it streams. Its last chunk is held back until the digest is checked, so a
  client never receives the whole of a wrong body: on a mismatch the response is cut, the peers
  that sent it are told (a signed report: they re-hash their copy and evict it if it is really
  wrong, content/scrub.py) and are not asked for that digest again for a minute.
- When a peer dies mid-blob, the stream continues from another provider with a Range request
  from the first missing byte; the client sees one whole, correct body.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

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
from mirror.peers.auth import PEER_HEADER, RequestSigner
from mirror.ranges import ByteRange, RangeRequest, parse_content_range, unsatisfied_size
from mirror.routing.router import Provider, Router

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
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


@dataclass(frozen=True, slots=True)
class PeerManifest:
    body: bytes
    media_type: str
    digest: str


@dataclass(slots=True)
class PeerBlob:
    """A blob (or a slice of it) streaming from peers: headers known, body not yet read."""

    size: int
    offset: int
    length: int
    chunks: AsyncIterator[bytes] | None


class _PeerSlowOrFailed(Exception):
    """One attempt at one peer failed; the caller moves on to the next provider."""


class PeerFetcher:
    def __init__(
        self,
        router: Router,
        signer: RequestSigner,
        metrics: Metrics,
        *,
        hedge_after: float = 0.15,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._router = router
        self._signer = signer
        self._metrics = metrics
        self._hedge_after = hedge_after
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._clock = clock
        # (node id, key) -> until when that node is not asked for that key; node id -> for all.
        self._distrusted: dict[tuple[bytes, str], float] = {}
        self._distrusted_nodes: dict[bytes, float] = {}
        # node id -> key -> when it last sent wrong bytes for that key.
        self._strikes: dict[bytes, dict[str, float]] = {}
        self._reports: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

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

    async def providers(
        self, key_text: str, exclude: AbstractSet[bytes] = frozenset()
    ) -> list[Provider]:
        started = self._clock()
        found = await self._router.find_providers(key_text, want=_PROVIDERS_WANTED)
        now = self._clock()
        usable = [p for p in found if p.node_id not in exclude and self._trusted(p, key_text, now)]
        result = "found" if usable else "missing"
        self._metrics.peer_lookup_duration.labels(result).observe(now - started)
        random.shuffle(usable)
        return usable

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
            return PeerManifest(body, media_type, actual)
        return None

    async def blob(
        self, digest: Digest, path: str, requested: RangeRequest | None, *, head: bool = False
    ) -> PeerBlob | None:
        """Open the blob (or the client's range of it) at the first provider that answers.

        With `head`, only the headers are fetched and `chunks` is None.
        """
        tried: set[bytes] = set()
        while candidates := await self.providers(str(digest), exclude=tried):
            tried.update(p.node_id for p in candidates)
            found = await self.blob_from(candidates, digest, path, requested, head=head)
            if found is not None:
                return found
        return None

    async def blob_from(
        self,
        candidates: list[Provider],
        digest: Digest,
        path: str,
        requested: RangeRequest | None,
        *,
        head: bool = False,
    ) -> PeerBlob | None:
        """Like `blob`, from these providers (the node that claimed an upstream fetch)."""
        method = "HEAD" if head else "GET"
        range_header = requested.header() if requested is not None else None
        winner = await self._first_answer(candidates, path, range_header, method)
        if winner is None:
            return None
        provider, response = winner
        size, offset, length = _extent(response)
        if head:
            response.release()
            return PeerBlob(size, offset, length, None)
        log.info("streaming %s from %s", digest, provider.address)
        chunks = self._stream(digest, path, provider, response, candidates, size, offset, length)
        return PeerBlob(size, offset, length, chunks)

    async def _first_answer(
        self,
        candidates: list[Provider],
        path: str,
        range_header: str | None,
        method: str = "GET",
    ) -> tuple[Provider, aiohttp.ClientResponse] | None:
        """Ask providers in turn, hedging to the next when one is slow; first good answer wins."""
        waiting = list(candidates)
        running: dict[asyncio.Task[aiohttp.ClientResponse], Provider] = {}
        try:
            while waiting or running:
                if waiting and (not running or len(running) < 2):
                    provider = waiting.pop(0)
                    task = asyncio.create_task(self._request(provider, path, range_header, method))
                    running[task] = provider
                timeout = self._hedge_after if waiting else None
                done, _ = await asyncio.wait(
                    running, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    provider = running.pop(task)
                    try:
                        return provider, task.result()
                    except _PeerSlowOrFailed as exc:
                        self._failed(provider, "unavailable", exc)
                    except RangeNotSatisfiable:
                        raise
            return None
        finally:
            for task in running:
                task.cancel()
            for task in running:
                try:
                    response = await task
                except (_PeerSlowOrFailed, RangeNotSatisfiable, asyncio.CancelledError):
                    continue
                response.close()

    async def _request(
        self, provider: Provider, path: str, range_header: str | None, method: str
    ) -> aiohttp.ClientResponse:
        assert self._session is not None, "PeerFetcher.start() was not called"
        headers = {PEER_HEADER: self._signer.sign(method, path)}
        if range_header is not None:
            headers["Range"] = range_header
        try:
            # `encoded`: sent exactly as signed (the peer checks the raw request target).
            url = URL(f"http://{provider.address}{path}", encoded=True)
            response = await self._session.request(
                method, url, headers=headers, allow_redirects=False
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _PeerSlowOrFailed(str(exc) or type(exc).__name__) from exc
        if response.status in (200, 206):
            return response
        response.release()
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
    ) -> AsyncIterator[bytes]:
        end = offset + length
        position = offset
        verify = offset == 0 and length == size
        hasher = _PipelinedHasher(digest.algorithm) if verify else None
        used = [provider]
        spares = [p for p in candidates if p is not provider]
        held: bytes | None = None
        try:
            while True:
                try:
                    async for chunk in response.content.iter_chunked(_CHUNK):
                        chunk = chunk[: end - position]
                        if not chunk:
                            continue
                        position += len(chunk)
                        if hasher is not None:
                            await hasher.update(chunk)
                        if held is not None:
                            yield held
                        held = chunk
                    if position < end:
                        raise _PeerSlowOrFailed(f"ended at byte {position} of {end}")
                    break
                except (_PeerSlowOrFailed, aiohttp.ClientError, TimeoutError, OSError) as exc:
                    response.close()
                    self._failed(provider, "broken", exc)
                    resumed = await self._resume(digest, path, spares, used, position, end)
                    if resumed is None:
                        raise PeerUnavailable(
                            f"no peer could continue {digest} from byte {position}"
                        ) from exc
                    provider, response = resumed
                    used.append(provider)
                    log.info("resuming %s at byte %d from %s", digest, position, provider.address)
            if hasher is not None and await hasher.hexdigest() != digest.hex:
                # After a resume the culprit is unknown: tell each. A report costs a good
                # holder one re-hash, never its copy.
                for bad in used:
                    self._distrust(bad, str(digest), f"{digest} streamed with a wrong digest")
                    self._report(bad, digest)
                raise DigestMismatch(f"peers sent bytes that do not hash to {digest}")
            if held is not None:
                yield held
        finally:
            response.close()

    async def _resume(
        self,
        digest: Digest,
        path: str,
        spares: list[Provider],
        used: list[Provider],
        position: int,
        end: int,
    ) -> tuple[Provider, aiohttp.ClientResponse] | None:
        """Continue from `position` at another provider, asking the DHT again if none is left."""
        range_header = ByteRange(position, end - position).header()
        for _ in range(2):
            if not spares:
                spares.extend(await self.providers(str(digest), exclude={p.node_id for p in used}))
            if not spares:
                return None
            candidates = list(spares)
            spares.clear()
            try:
                winner = await self._first_answer(candidates, path, range_header)
            except RangeNotSatisfiable:
                winner = None
            if winner is not None:
                provider, response = winner
                if response.status == 206 and _extent(response)[1] == position:
                    spares.extend(p for p in candidates if p is not provider)
                    return winner
                response.close()
                self._failed(provider, "ignored-range", None)
        return None

    def _failed(self, provider: Provider, reason: str, error: object) -> None:
        self._metrics.peer_fetch_failures.labels(reason).inc()
        log.info("peer %s failed (%s): %s", provider.address, reason, error)

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


class _PipelinedHasher:
    """Hashes on a worker thread while the event loop forwards the bytes.

    Hashing is the largest cost of proxying a blob (SHA-256 runs at about 1.5 GiB/s per core).
    hashlib releases the GIL for large updates, so chunk N is hashed while chunk N+1 is being
    received and chunk N written; at most one chunk is in flight, keeping memory bounded and the
    updates in order.
    """

    def __init__(self, algorithm: str) -> None:
        self._hash = hashlib.new(algorithm)
        self._pending: asyncio.Future[None] | None = None

    async def update(self, chunk: bytes) -> None:
        if self._pending is not None:
            await self._pending
        self._pending = asyncio.get_running_loop().run_in_executor(None, self._hash.update, chunk)

    async def hexdigest(self) -> str:
        if self._pending is not None:
            await self._pending
            self._pending = None
        return self._hash.hexdigest()


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
