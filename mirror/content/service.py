"""Finding a request's content: this node, a download under way, the peers, then upstream.

The order, for a request from the node's runtime:

1. **This node**: the runtime's store, then the node cache.
2. **A download under way on this node**: join it (many clients, one fetch).
3. **Peers** that the DHT says hold it. A whole blob is fetched as a download of this node's,
   exactly like an upstream fetch: announced at once, served to local readers and to peers
   while it arrives, kept in the node cache. So every node that fetches a blob becomes one
   more source of it in the middle of a rollout, not only once its runtime stored it.
4. **Upstream**, once for the whole cluster: the node closest to the digest in the DHT records
   a claim; the first node to claim fetches from upstream and announces itself a provider at
   once; the others fetch from it (as in 3) while it downloads. If the claimant cannot be
   reached, a node fetches by itself: a duplicate fetch is better than a failed pull.

A `Range` on a blob nobody here has is a resume (its whole fetch is elsewhere): passed through
from a peer or upstream, never kept. A HEAD only asks the peers.

A peer's request is answered from steps 1 and 2 only, so it never loops through the cluster.
Tag lists and readiness come from here too, so registry policy (`--mirrored-registries`) holds
for every request the HTTP front serves.

Tags are resolved upstream first (a HEAD with a short timeout) so `latest` is never stale; when
upstream does not answer, from this node and then the cluster, so pulls keep working during an
outage. Manifests fetched by digest are immutable and kept in the node cache.

A tag that cannot be resolved at all may have a source (`TagAliases`, "expected <- source"):
the runtime is then answered with the source's manifest, and the digests that manifest leads
to are fetched from the source's repository, so a cluster whose own registry is down still
pulls the expected name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace

from mirror.config import PeerTransfer
from mirror.content.downloads import (
    Download,
    DownloadAbandoned,
    DownloadFailed,
    Downloads,
    Opener,
    Source,
)
from mirror.content.sources import PeerSource, TagAliases, UpstreamSource
from mirror.errors import (
    BlobUnknown,
    ManifestUnknown,
    MirrorError,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    UpstreamError,
)
from mirror.metrics import SOURCE_LOCAL, SOURCE_PEER, SOURCE_RECEIVING, SOURCE_UPSTREAM, Metrics
from mirror.oci.mediatypes import referenced_digests
from mirror.oci.reference import Digest, TagRef, parse_digest
from mirror.peers.fetcher import PeerBlob
from mirror.ranges import ByteRange, RangeRequest
from mirror.request import Caller, Kind, TagPage, Target
from mirror.routing.router import Provider, Router
from mirror.stores.base import BlobSource, PartReader, ReceivingBlob, Store
from mirror.stores.cache import CacheStore
from mirror.stores.manifests import read_manifest

log = logging.getLogger(__name__)

# How long a peer's request for a blob this node is about to fetch waits for the fetch to start
# before it is answered busy (`_started_for_peer`).
PEER_START_WAIT = 3.0
# How long a claim on an upstream fetch lives unless renewed (the fetcher renews it at half).
_CLAIM_TTL = 30.0
# Digests reached through an alias, remembered so their fetches go to the source's repository.
_ALIASED_DIGESTS = 4096
# Blobs this node sent its runtime to a peer for, remembered (the latest) so that what the
# runtime receives of them may be served to others (`_until_sourced`).
_SOURCED_DIGESTS = 4096
# How long the first blob a runtime is sent to a peer for waits for the others of its pull
# before they are announced together (`_announce_receiving`).
RECEIVING_GATHER_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class ContentPolicy:
    # None: every registry is mirrored.
    mirrored_registries: frozenset[str] | None
    # Answer tags from this node and the cluster when upstream does not answer.
    resolve_tags: bool
    tag_timeout: float
    # REDIRECT: a runtime's blob GET that a peer holds whole gets a 307 to that peer.
    peer_transfer: PeerTransfer = PeerTransfer.SHARE


@dataclass(slots=True)
class ManifestAnswer:
    digest: str
    body: bytes
    media_type: str
    source: str
    # The source whose manifest answered an expected name that could not be resolved.
    alias: Target | None = None


@dataclass(slots=True)
class BlobAnswer:
    """A blob ready to send: an open local blob (sendfile), a download here or the runtime's
    own (`growing`: sent with sendfile from its file as it grows), or a stream of chunks.

    For a download here, `chunks` is the same reader as `growing`, for callers that want bytes.
    """

    source: str
    size: int
    byte_range: ByteRange | None
    local: BlobSource | None = None
    chunks: AsyncIterator[bytes] | None = None
    growing: PartReader | None = None
    # A signed URL at a peer serving the blob: sent as a 307, the peer sends the bytes.
    redirect: str | None = None
    # How far these bytes are from a holder, told to peers (peers/referrals.py): 0 from this
    # node's store or its download from upstream, more from a peer's (what its runtime
    # receives from a peer, or this node's download from one).
    hops: int = 0
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.byte_range.length if self.byte_range else self.size

    async def close(self) -> None:
        if self.local is not None:
            await self.local.close()
        if self.growing is not None:
            await self.growing.aclose()
        for closer in self._closers:
            await closer()


class ContentService:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        policy: ContentPolicy,
        *,
        cache: CacheStore | None = None,
        peers: PeerSource | None = None,
        router: Router | None = None,
        upstream: UpstreamSource | None = None,
        aliases: TagAliases | None = None,
    ) -> None:
        self._store = store
        self._aliases = aliases
        # digest -> the source repository it was reached through (bounded, oldest dropped).
        self._aliased: OrderedDict[Digest, Target] = OrderedDict()
        # Digests this node sent its runtime to a peer for, oldest first (see `_until_sourced`),
        # and the requests from other nodes waiting for that.
        self._sourced: OrderedDict[Digest, int | None] = OrderedDict()
        self._awaiting_source: dict[Digest, asyncio.Event] = {}
        self._metrics = metrics
        self._policy = policy
        self._cache = cache
        self._peers = peers
        self._router = router
        self._upstream = upstream if cache is not None else None
        self._downloads = Downloads(cache) if cache is not None else None
        self._background: set[asyncio.Task[None]] = set()
        # Blobs the runtime is receiving, waiting to be announced together.
        self._receiving_unannounced: list[Digest] = []

    async def close(self) -> None:
        if self._downloads is not None:
            await self._downloads.close()
        for task in list(self._background):
            task.cancel()

    async def ready(self) -> bool:
        """Whether this node can serve: its store answers and its router takes requests."""
        if self._router is not None and not self._router.ready():
            return False
        return await self._store.ready()

    def _check_mirrored(self, target: Target) -> None:
        mirrored = self._policy.mirrored_registries
        if mirrored is not None and target.registry not in mirrored:
            raise _unknown(target, f"registry {target.registry} is not mirrored here")

    # --- tags --------------------------------------------------------------------------------

    async def tags(self, target: Target, page: TagPage) -> list[str]:
        """Tags this node holds for one repository, sorted, one page of them."""
        self._check_mirrored(target)
        tags = sorted(
            entry.ref.tag
            for entry in await self._store.images()
            if entry.ref.registry == target.registry and entry.ref.repository == target.repository
        )
        if not tags:
            raise NameUnknown(f"no tags of {target.registry}/{target.repository} are held here")
        if page.last is not None:
            tags = [tag for tag in tags if tag > page.last]
        return tags if page.limit is None else tags[: page.limit]

    # --- manifests ---------------------------------------------------------------------------

    async def manifest(self, target: Target, caller: Caller) -> ManifestAnswer:
        self._check_mirrored(target)
        if target.digest is not None:
            digest = target.digest
            target = self._through_alias(target, digest)
            answer = await self._manifest_by_digest(target, digest, caller)
            if digest in self._aliased:  # an index's children come from the source too
                self._remember_aliased(answer, target)
            return answer
        assert target.tag is not None
        try:
            return await self._manifest_by_tag(target, caller)
        except (ManifestUnknown, NameUnknown) as exc:
            source = None
            if caller is Caller.RUNTIME and self._aliases is not None:
                source = self._aliases.source_for(target.tag)
            if source is None:
                raise
            log.warning("%s cannot be resolved (%s): answering with %s", target.tag, exc, source)
            answer = await self.manifest(source, caller)
            self._remember_aliased(answer, source)
            self._metrics.alias_answers.labels(str(target.tag), _name(source)).inc()
            return replace(answer, alias=source)

    def _remember_aliased(self, answer: ManifestAnswer, source: Target) -> None:
        """Digests `answer` leads to are fetched from the `source` repository from now on."""
        repository = Target(Kind.MANIFEST, source.registry, source.repository, None, None)
        for text in [answer.digest, *referenced_digests(answer.body)]:
            try:
                digest = parse_digest(text)
            except RegistryError:
                continue
            self._aliased[digest] = repository
            self._aliased.move_to_end(digest)
        while len(self._aliased) > _ALIASED_DIGESTS:
            self._aliased.popitem(last=False)

    def _through_alias(self, target: Target, digest: Digest) -> Target:
        """`target` with the source's repository when `digest` was reached through an alias."""
        source = self._aliased.get(digest)
        if source is None or self._aliases is None:
            return target
        return replace(target, registry=source.registry, repository=source.repository)

    async def _manifest_by_tag(self, target: Target, caller: Caller) -> ManifestAnswer:
        assert target.tag is not None
        if caller is Caller.RUNTIME and self._upstream is not None:
            try:
                ref = await self._upstream.head_manifest(
                    target.registry,
                    target.repository,
                    target.tag.tag,
                    timeout=self._policy.tag_timeout,
                )
            except UpstreamError as exc:
                log.info("upstream did not resolve %s (%s): asking the cluster", target.tag, exc)
            else:
                if ref is None:
                    raise ManifestUnknown(f"{target.tag} does not exist upstream")
                answer = await self._manifest_by_digest(target, parse_digest(ref.digest), caller)
                await self._remember_tag(target.tag, answer)
                return answer
            if not self._policy.resolve_tags:
                raise ManifestUnknown(f"upstream did not answer for {target.tag}")
        elif caller is Caller.RUNTIME and not self._policy.resolve_tags:
            raise ManifestUnknown(f"{target.tag}: tags are only resolved upstream")
        local = await self._local_manifest_by_tag(target.tag)
        if local is not None:
            return local
        if caller is Caller.RUNTIME and self._peers is not None:
            fetched = await self._peers.manifest(str(target.tag), _peer_path(target), None)
            if fetched is not None:
                return ManifestAnswer(fetched.digest, fetched.body, fetched.media_type, SOURCE_PEER)
        raise ManifestUnknown(f"{target.tag} is not held in the cluster")

    async def _remember_tag(self, ref: TagRef, answer: ManifestAnswer) -> None:
        """Keep the tag upstream just confirmed, so it still resolves during an outage."""
        if self._cache is not None:
            await self._cache.set_tag(ref, parse_digest(answer.digest))

    async def _local_manifest_by_tag(self, ref: TagRef) -> ManifestAnswer | None:
        digest = await self._store.resolve(ref)
        return None if digest is None else await self._local_manifest(digest)

    async def _local_manifest(self, digest: Digest) -> ManifestAnswer | None:
        found = await read_manifest(self._store, digest)
        if found is None:
            return None
        body, media_type = found
        return ManifestAnswer(str(digest), body, media_type, SOURCE_LOCAL)

    async def _manifest_by_digest(
        self, target: Target, digest: Digest, caller: Caller
    ) -> ManifestAnswer:
        local = await self._local_manifest(digest)
        if local is not None:
            return local
        if caller is not Caller.RUNTIME:
            raise ManifestUnknown(f"manifest {digest} is not held here")
        if self._peers is not None:
            fetched = await self._peers.manifest(str(digest), _peer_path(target, digest), digest)
            if fetched is not None:
                await self._keep_manifest(digest, fetched.body)
                return ManifestAnswer(fetched.digest, fetched.body, fetched.media_type, SOURCE_PEER)
        if self._upstream is not None:
            try:
                found = await self._upstream.get_manifest(
                    target.registry, target.repository, str(digest)
                )
            except UpstreamError as exc:
                raise ManifestUnknown(f"upstream could not give {digest}: {exc}") from exc
            if found is not None:
                await self._keep_manifest(digest, found.body)
                return ManifestAnswer(found.digest, found.body, found.media_type, SOURCE_UPSTREAM)
        raise ManifestUnknown(f"manifest {digest} is not held in the cluster")

    async def _keep_manifest(self, digest: Digest, body: bytes) -> None:
        if self._cache is None:
            return
        # The cache verifies the bytes against the digest before keeping them.
        try:
            await self._cache.put(digest, body)
        except (MirrorError, OSError) as exc:
            log.warning("cannot cache manifest %s: %s", digest, exc)

    # --- blobs -------------------------------------------------------------------------------

    async def blob(
        self,
        target: Target,
        caller: Caller,
        requested: RangeRequest | None,
        *,
        head: bool,
        redirect: bool = True,
    ) -> BlobAnswer:
        """The blob `target` names (or the `requested` slice of it), ready to send.

        `redirect=False` wants the bytes here even in redirect mode (the prefetcher keeps them).
        """
        self._check_mirrored(target)
        assert target.digest is not None, "a blob is always asked for by digest"
        digest = target.digest
        target = self._through_alias(target, digest)
        try:
            return await self._find_blob(target, digest, caller, requested, head, redirect)
        except DownloadAbandoned as exc:
            if caller is not Caller.RUNTIME:
                raise BlobUnknown(f"blob {digest} is not held here") from exc
            # The request this one joined started no fetch (it only asked, or failed before
            # fetching): look again for itself.
            return await self._find_blob(target, digest, caller, requested, head, redirect)

    async def _find_blob(
        self,
        target: Target,
        digest: Digest,
        caller: Caller,
        requested: RangeRequest | None,
        head: bool,
        redirect: bool,
    ) -> BlobAnswer:
        held = await self._held_here(digest)
        if isinstance(held, Download):
            from_node = caller is not Caller.RUNTIME
            if from_node and requested is not None and _ahead_of(held, requested):
                raise BlobUnknown(f"{requested.header()} of {digest} is not here yet")
            if from_node:
                await _started_for_peer(held)
            self._metrics.coalesced_waits.labels("node").inc()
            return await self._from_download(held, requested, head)
        if held is not None:
            return await _local_answer(held, requested)
        if caller is not Caller.RUNTIME:
            receiving = await self._store.receiving(digest)
            if receiving is None:
                if self._sourced.get(digest) is not None:
                    # Sent to a source, but containerd shows its ingest only once the source's
                    # answer gave the size: busy for a moment, not without the blob.
                    raise TooManyRequests(
                        f"{digest} has not started arriving here yet; ask another node",
                        retry_after=1,
                    )
                raise BlobUnknown(f"blob {digest} is not held here")
            hops = 0  # committed: verified whole, it depends on no source
            if not receiving.committed:
                try:
                    hops = await self._until_sourced(digest)
                except BaseException:
                    await receiving.close()
                    raise
            return await _receiving_answer(digest, receiving, caller, requested, head, hops)
        path = _peer_path(target, digest)
        redirecting = (
            redirect
            and self._policy.peer_transfer is PeerTransfer.REDIRECT
            and not head
            and self._peers is not None
        )
        # The runtime shares what it receives (its store shows it): it fetches as a sharer.
        sharing = redirecting and self._store.shows_receiving and requested is None
        if redirecting:
            # A range too (a runtime resuming after a holder died): the runtime's client keeps
            # its Range header when it follows the 307, and the holder honours it.
            answer = await self._redirected(digest, path, sharing)
            if answer is not None:
                return answer
        if requested is not None:
            return await self._range_elsewhere(target, digest, path, requested, head)
        if self._downloads is None:  # no node cache: nothing is fetched here, only passed on
            answer = await self._from_peers(None, digest, path, head)
            if answer is None:
                raise BlobUnknown(f"blob {digest} is not held in the cluster")
            return answer
        # Reserved before peers or upstream are asked: other requests here, local or from
        # peers, wait for this one's fetch instead of starting their own.
        download, reserved = self._downloads.reserve(digest)
        if not reserved:
            self._metrics.coalesced_waits.labels("node").inc()
            return await self._from_download(download, None, head)
        try:
            answer = await self._from_peers(download, digest, path, head)
            if answer is None:
                answer = await self._fetch_once(
                    target, digest, path, download, head, redirecting, sharing
                )
            return answer
        finally:
            self._downloads.settle(download, f"no fetch of {digest} was started")

    async def _redirected(
        self, digest: Digest, path: str, sharing: bool, among: list[Provider] | None = None
    ) -> BlobAnswer | None:
        """A 307 for the runtime to a provider (`among` these, else the DHT's) serving the
        blob; None when none does. A sharing runtime's node announces itself at once."""
        assert self._peers is not None
        redirect = await self._peers.redirect_url(digest, path, sharing=sharing, among=among)
        if redirect is None:
            return None
        if sharing:
            hops = None if redirect.hops is None else redirect.hops + 1
            self._mark_sourced(digest, hops)
            if hops is not None:
                self._spawn(self._announce_receiving(digest))
        return BlobAnswer(SOURCE_PEER, 0, None, redirect=redirect.url)

    def _mark_sourced(self, digest: Digest, hops: int | None) -> None:
        """The runtime was sent to a source for `digest`, `hops` from a holder: its fetch may
        be served from now on (None: the source did not say; it is not served)."""
        self._sourced[digest] = hops
        self._sourced.move_to_end(digest)
        while len(self._sourced) > _SOURCED_DIGESTS:
            self._sourced.popitem(last=False)
        waiting = self._awaiting_source.pop(digest, None)
        if waiting is not None:
            waiting.set()

    async def _until_sourced(self, digest: Digest) -> int:
        """Wait (at most `PEER_START_WAIT`) until what the runtime receives of `digest` may be
        served, and return its hops: this node sent its runtime to a source for it that said
        how far it is from a holder.

        containerd opens its ingest before it asks this node for the blob, so an ingest alone
        may be waiting on this very node's choice of a source. Served before that choice, or
        from a source of unknown hops, it could close a cycle of nodes feeding each other an
        ingest nobody fills; hops only grow down a chain, so one that is served always leads
        back to a holder (peers/referrals.py). Past the wait, or for a source of unknown hops,
        the asker is told this node is busy, as for a download that has not started."""
        if digest not in self._sourced:
            waiting = self._awaiting_source.setdefault(digest, asyncio.Event())
            try:
                async with asyncio.timeout(PEER_START_WAIT):
                    await waiting.wait()
            except TimeoutError:
                if self._awaiting_source.get(digest) is waiting:
                    del self._awaiting_source[digest]
        hops = self._sourced.get(digest)
        if hops is None:
            raise TooManyRequests(
                f"{digest} has no source here yet; ask another node", retry_after=1
            )
        return hops

    async def _range_elsewhere(
        self, target: Target, digest: Digest, path: str, requested: RangeRequest, head: bool
    ) -> BlobAnswer:
        """A range of a blob nobody here has: a resume, its whole fetch is elsewhere.

        Passed through from a peer, else from upstream; not kept, not announced.
        """
        if self._peers is not None:
            found = await self._peers.blob(digest, path, requested, head=head)
            if found is not None:
                return _peer_answer(found, requested)
        if self._upstream is None or self._downloads is None:
            raise BlobUnknown(f"blob {digest} is not held in the cluster")
        return await self._upstream_range(target, digest, requested, head)

    async def _from_peers(
        self, download: Download | None, digest: Digest, path: str, head: bool
    ) -> BlobAnswer | None:
        """Step 3: the blob from peers that hold it (or fetch it); None when none does.

        The peer's stream becomes `download` (this request's reservation): see `_share`. A
        HEAD only asks, and without a node cache (`download` None) the stream is passed on.
        """
        if self._peers is None:
            return None
        found = await self._peers.blob(
            digest,
            path,
            None,
            head=head,
            sharing=download is not None,
            nearer_than=self._sourced.get(digest),
        )
        if found is None:
            return None
        if download is None:
            return _peer_answer(found, None)
        return await self._share(download, found, head)

    async def _share(self, download: Download, found: PeerBlob, head: bool) -> BlobAnswer:
        """Fetch the peer's stream `found` as `download`, a download like an upstream one.

        Begun at once and announced at once: while it arrives, this node's readers and peers
        (ranges too) read it from the growing temp file, so a rollout's later nodes fetch from
        this one instead of all from the first holder. The peer fetcher still verifies the
        digest (holding its last chunk back), reports and distrusts bad peers, and resumes from
        another provider when its peer dies mid-blob. The blob is kept in the node cache, so
        this node stays a provider after its runtime took it; the announcement is withdrawn
        if the fetch fails or the cache could not keep it.
        """
        assert self._downloads is not None
        if found.chunks is None:  # a HEAD: nothing is fetched, the reservation is let go
            self._downloads.abandon(download, f"{download.digest} was only asked for (HEAD)")
            return _peer_answer(found, None)
        # A source that did not say its hops (an older node) is taken for a holder.
        hops = (found.hops or 0) + 1
        self._downloads.begin(download, _peer_opener(found), origin=SOURCE_PEER, hops=hops)
        self._spawn(self._announce(download, claimed=False))
        return await self._from_download(download, None, head)

    async def _held_here(self, digest: Digest) -> BlobSource | Download | None:
        """This node's copy of `digest`, or the download of it under way here.

        The downloads and the cache are looked at together after the store answered, with no
        await in between: a download that ended while the store was being asked has moved into
        the cache by then, so a blob this node fetches is never reported missing.
        """
        local = await self._store.open(digest)
        if local is not None:
            return local
        running = self._downloads.get(digest) if self._downloads is not None else None
        if running is not None:
            return running
        if self._cache is not None and self._cache.holds(digest):
            return await self._cache.open(digest)
        return None

    async def _fetch_once(
        self,
        target: Target,
        digest: Digest,
        path: str,
        download: Download,
        head: bool,
        redirecting: bool = False,
        sharing: bool = False,
    ) -> BlobAnswer:
        """Step 4: from upstream, once for the cluster, into this request's reservation.

        The node that wins the claim fetches; one that loses fetches from the winner instead,
        which serves it while it downloads (`_share`: this node is then a provider too), or,
        `redirecting`, sends its runtime there (the reservation is let go: the runtime's own
        fetch is this node's copy).
        """
        assert self._downloads is not None
        if self._upstream is None:
            raise BlobUnknown(f"blob {digest} is not held in the cluster")
        with download.deciding_claim():
            holder = await self._claim(digest)
        if holder is not None and self._peers is not None and redirecting:
            answer = await self._redirected(digest, path, sharing, [holder])
            if answer is not None:
                self._downloads.abandon(download, f"the runtime was sent to {holder.address}")
                return answer
        if holder is not None and self._peers is not None:
            found = await self._peers.blob_from(
                [holder], digest, path, None, head=head, nearer_than=self._sourced.get(digest)
            )
            if found is not None:
                self._metrics.coalesced_waits.labels("cluster").inc()
                return await self._share(download, found, head)
            log.info("claimant %s of %s did not serve it; fetching it here", holder.address, digest)
        upstream = self._upstream

        async def open_upstream() -> Source | None:
            blob = await upstream.get_blob(target.registry, target.repository, digest)
            if blob is None:
                return None
            return Source(blob.size, blob.chunks(), blob.close)

        self._downloads.begin(download, open_upstream)
        self._spawn(self._announce(download, claimed=True))
        return await self._from_download(download, None, head)

    async def _claim(self, digest: Digest) -> Provider | None:
        if self._router is None:
            return None
        try:
            return await self._router.claim(str(digest), _CLAIM_TTL)
        except Exception:
            log.warning("claiming %s failed; fetching it here", digest, exc_info=True)
            return None

    async def _announce(self, download: Download, *, claimed: bool) -> None:
        """Announce the fetch at once, so late-comers find it by lookup; let go if not kept.

        `claimed`: this node won the cluster's claim on the upstream fetch. After a successful
        fetch the claim is kept until it expires: the claimant holds the blob then, and a node
        whose lookup raced the announcement still streams from it instead of fetching again.
        A fetch that failed, or a blob streamed through without being kept (the cache could
        not hold it), is not held: the announcement is withdrawn (unless the node's store got
        the blob meanwhile, the runtime having pulled it) and the claim let go.
        """
        if self._router is None:
            return
        key = str(download.digest)
        with contextlib.suppress(Exception):
            await self._router.provide(key)
        while True:
            try:
                async with asyncio.timeout(_CLAIM_TTL / 2):
                    succeeded = await asyncio.shield(download.finished)
                break
            except TimeoutError:
                # A long download keeps its claim alive, or another node would fetch too.
                if claimed:
                    with contextlib.suppress(Exception):
                        await self._router.claim(key, _CLAIM_TTL)
            except (MirrorError, asyncio.CancelledError):
                succeeded = False
                break
        if succeeded and download.kept:
            return
        with contextlib.suppress(Exception):
            if await self._store.stat(download.digest) is None:
                await self._router.withdraw(key)
        if claimed:
            with contextlib.suppress(Exception):
                await self._router.release(key)

    async def _announce_receiving(self, digest: Digest) -> None:
        """Announce a blob the runtime was just sent to fetch from a peer: from now on its
        ingest serves peers as it grows (`Store.receiving`), so the nodes that come later
        fetch from this one instead of all from the first holder. Not withdrawn: should the
        runtime give up, a peer asking is told this node is busy and asks another provider,
        and the record lapses; once the runtime holds the blob, the advertiser keeps
        announcing it."""
        if self._router is None:
            return
        self._receiving_unannounced.append(digest)
        if len(self._receiving_unannounced) > 1:
            return  # the first of the batch announces it
        # A runtime asks for an image's blobs over a second or two (three at a time, the next
        # as one ends): announced together, each peer gets one message for them, not one per
        # blob (routing/announce.py). Peers fetching at the same time meet this node through
        # the referrals of the provider both fetch from (peers/referrals.py), not through
        # these records: they are for the nodes that come later.
        await asyncio.sleep(RECEIVING_GATHER_SECONDS)
        batch, self._receiving_unannounced = self._receiving_unannounced, []
        router = self._router
        results = await asyncio.gather(
            *(router.provide(str(each)) for each in batch), return_exceptions=True
        )
        for each, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                log.warning("announcing %s failed: %s", each, result)

    def _spawn(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _from_download(
        self, download: Download, requested: RangeRequest | None, head: bool
    ) -> BlobAnswer:
        try:
            size = await download.wait_started()
        except DownloadAbandoned:
            raise
        except DownloadFailed as exc:
            raise BlobUnknown(f"{download.digest} could not be fetched: {exc}") from exc
        if size is None:
            raise BlobUnknown(f"blob {download.digest} does not exist upstream")
        byte_range = requested.resolve(size) if requested is not None else None
        offset, length = (byte_range.offset, byte_range.length) if byte_range else (0, size)
        reader = None if head else download.read(offset, length)
        return BlobAnswer(
            download.origin, size, byte_range, chunks=reader, growing=reader, hops=download.hops
        )

    async def _upstream_range(
        self, target: Target, digest: Digest, requested: RangeRequest, head: bool
    ) -> BlobAnswer:
        """A range of a blob nobody here has: passed through, not cached (it is a resume)."""
        assert self._upstream is not None
        try:
            blob = await self._upstream.get_blob(
                target.registry, target.repository, digest, requested
            )
        except UpstreamError as exc:
            raise BlobUnknown(f"upstream could not give {digest}: {exc}") from exc
        if blob is None:
            raise BlobUnknown(f"blob {digest} does not exist upstream")
        byte_range = ByteRange(blob.offset, blob.length) if blob.status == 206 else None
        if head:
            await blob.close()
            return BlobAnswer(SOURCE_UPSTREAM, blob.size, byte_range)
        return BlobAnswer(
            SOURCE_UPSTREAM, blob.size, byte_range, chunks=blob.chunks(), _closers=[blob.close]
        )


async def _started_for_peer(download: Download) -> None:
    """Wait for a download a peer joins to start receiving, at most `PEER_START_WAIT` while
    it waits on another node.

    A peer is sent here by a referral while this node may still be finding its own source
    (peers/referrals.py); it usually starts within a round trip or two. Past the bound the peer
    is told this node is busy and asks the next node it was named: no two nodes can wait on
    each other for longer than that.

    A download that waits on no node (`Download.waits_on_no_node`) is waited for without that
    bound: begun from upstream, or this node's claim on it being decided (bounded itself,
    routing/claims.py). It closes no cycle, and the peer is most likely a node that lost the
    claim to this one: told busy (once more as a last resort), it would fetch the blob from
    upstream a second time. The bound starts again when the claim is decided. The upstream
    client bounds how long a fetch takes to start.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PEER_START_WAIT
    while not download.started.is_set():
        if download.waits_on_no_node:
            await download.state_changed()
            deadline = loop.time() + PEER_START_WAIT
            continue
        try:
            async with asyncio.timeout_at(deadline):
                await download.state_changed()
        except TimeoutError:
            raise TooManyRequests(
                f"{download.digest} has not started arriving here yet; ask another node",
                retry_after=1,
            ) from None


def _ahead_of(download: Download, requested: RangeRequest) -> bool:
    """Whether a peer's range starts at bytes `download` has not received yet.

    Such a peer resumes after its own source failed, and may be where this node's bytes come
    from (a chain of sharers: peers/referrals.py): waiting would wait on itself until a read
    timeout. Refused at once, it asks a holder that is further on. A whole blob (a node
    joining the swarm) waits for the bytes as they come.
    """
    if requested.first is None:
        return False
    finished = download.size is not None and download.received >= download.size
    return not finished and requested.first >= download.received


def _unknown(target: Target, message: str) -> RegistryError:
    if target.kind is Kind.BLOB:
        return BlobUnknown(message)
    if target.kind is Kind.TAGS:
        return NameUnknown(message)
    return ManifestUnknown(message)


async def _local_answer(local: BlobSource, requested: RangeRequest | None) -> BlobAnswer:
    try:
        byte_range = requested.resolve(local.size) if requested is not None else None
    except BaseException:
        await local.close()
        raise
    return BlobAnswer(SOURCE_LOCAL, local.size, byte_range, local=local)


async def _receiving_answer(
    digest: Digest,
    blob: ReceivingBlob,
    caller: Caller,
    requested: RangeRequest | None,
    head: bool,
    hops: int,
) -> BlobAnswer:
    """A peer's (or a redirected runtime's) answer from the blob the runtime is receiving,
    `hops` from a holder.

    A range that starts beyond what arrived is refused at once, as for a download here
    (`_ahead_of`): its asker may be where these bytes come from.
    """
    try:
        byte_range = requested.resolve(blob.size) if requested is not None else None
        first = requested.first if requested is not None else None
        if first is not None and first >= blob.received():
            raise BlobUnknown(f"bytes from {first} of {digest} are not here yet")
    except BaseException:
        await blob.close()
        raise
    if head:
        await blob.close()
        return BlobAnswer(SOURCE_RECEIVING, blob.size, byte_range, hops=hops)
    offset, length = (byte_range.offset, byte_range.length) if byte_range else (0, blob.size)
    log.info("sending %s as the runtime receives it (to a %s caller)", digest, caller.value)
    reader = blob.reader(offset, length)
    return BlobAnswer(SOURCE_RECEIVING, blob.size, byte_range, growing=reader, hops=hops)


def _peer_answer(found: PeerBlob, requested: RangeRequest | None) -> BlobAnswer:
    byte_range = ByteRange(found.offset, found.length) if requested is not None else None
    return BlobAnswer(SOURCE_PEER, found.size, byte_range, chunks=found.chunks)


def _peer_opener(found: PeerBlob) -> Opener:
    """The origin of a download: a peer's verified stream of a whole blob, already open.

    The peer fetcher checks a whole blob against its digest, holding its last chunk back until
    it matches, so the download does not hash it again. A holder that answered with a part of
    it is not verified by the fetcher: the download checks it.
    """
    chunks = found.chunks
    assert chunks is not None
    verified = found.offset == 0 and found.length == found.size

    async def close() -> None:
        # Lets go of the peer's connection now, not whenever the generator is collected.
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    async def opener() -> Source:
        return Source(found.size, chunks, close, verified=verified, sink=found.sink)

    return opener


def _name(target: Target) -> str:
    """A manifest target as an image reference, for logs and metrics."""
    reference = f":{target.tag.tag}" if target.tag else f"@{target.digest}"
    return f"{target.registry}/{target.repository}{reference}"


def _peer_path(target: Target, digest: Digest | None = None) -> str:
    """The canonical request a peer (or its logs) sees: the registry always in `ns`."""
    ns = urllib.parse.quote(target.registry, safe="")
    if digest is not None:
        kind = "blobs" if target.kind is Kind.BLOB else "manifests"
        return f"/v2/{target.repository}/{kind}/{digest}?ns={ns}"
    assert target.tag is not None
    return f"/v2/{target.repository}/manifests/{target.tag.tag}?ns={ns}"
