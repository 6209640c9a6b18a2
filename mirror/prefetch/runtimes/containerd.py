"""containerd as a prefetch target: the plan written into its own store, unpacked, named.

`take` leaves what ``ctr images pull`` leaves, so containerd, its CRI plugin and ``ctr run``
use the image with every registry down. The bytes come from the prefetcher's `BlobReader`
(this node, its peers, upstream once for the cluster), never from a pull by containerd.

1. A lease (``mirror-prefetch-<random>``, ``containerd.io/gc.expire`` a day on, in case mirror
   dies mid-import) holds everything the import touches. Blobs and snapshots that are already
   there join it before they are looked at, and what is written joins it as it is written, so
   the garbage collector can take nothing between the first look and the image record.
2. Every blob the namespace lacks is streamed in with Content.Write under its expected digest
   and size; containerd checks both when it commits (the small JSON blobs, read whole, are
   checked here first, so a corrupt config reads as a digest mismatch, not as bad JSON). Blobs
   carry the labels a pull gives them: ``containerd.io/gc.ref.content.m.<i>`` from an index to
   every manifest it lists, ``...config`` and ``...l.<i>`` from a manifest to its config and
   layers (these keep the children once the lease is gone), and
   ``containerd.io/distribution.source.<host>=<repository,...>`` naming where the bytes came
   from (`ImagePlan.fetched`; host without port, as containerd writes it). Labels missing on
   blobs that were already there are added; other labels are left as they are.
3. The layers are unpacked as containerd's unpacker does: Snapshots.Prepare above the parent
   chain ID, Diff.Apply, the applied (uncompressed) digest checked against the config's
   ``rootfs.diff_ids``, Snapshots.Commit under the layer's chain ID. A chain ID already
   committed is skipped, one committed meanwhile by another unpack is taken as done. Layers get
   ``containerd.io/uncompressed=<diff ID>``, the config
   ``containerd.io/gc.ref.snapshot.<snapshotter>=<top chain ID>`` (what keeps the snapshots).
4. Last, the image record is created, or pointed at the target if it exists, with
   ``io.cri-containerd.image=managed`` so the CRI plugin lists it. A failure before it leaves no
   name behind; ending the lease hands what was written to the collector.

The record is named ``str(plan.name)``, the name fully qualified as containerd's tools write it:
``docker.io/library/busybox:latest``, ``registry:5000/team/app@sha256:...`` for a digest-only
pin, ``registry/app:v1@sha256:...`` for a pin naming both (as ``ctr images pull`` names that
reference). The CRI plugin resolves a pod's ``app:v1@sha256:...`` as ``app@sha256:...``, so
for Kubernetes pin such an image by tag or by digest alone.

Every failure of containerd (unreachable, refused, a digest or diff ID that does not match)
is a `RuntimeImportError` with a one-line reason, `holds` included; a `MirrorError` from the
`BlobReader` passes through unchanged, so the caller can tell a source that failed from a
runtime that did.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import grpc
import grpc.aio
from google.protobuf import field_mask_pb2

from mirror.errors import DigestInvalid, RuntimeImportError
from mirror.oci.mediatypes import DOCKER_MANIFEST, MAX_MANIFEST_SIZE, OCI_MANIFEST
from mirror.oci.reference import parse_digest
from mirror.prefetch.model import BlobReader, Descriptor, ImagePlan
from mirror.stores.containerd.api import (
    content_pb2,
    content_pb2_grpc,
    descriptor_pb2,
    diff_pb2,
    diff_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    snapshots_pb2,
    snapshots_pb2_grpc,
)
from mirror.stores.containerd.client import (
    ContainerdClient,
    ContainerdError,
    ContainerdNotFound,
)

__all__ = ["ContainerdRuntime", "chain_ids"]

log = logging.getLogger(__name__)

DEFAULT_SNAPSHOTTER: Final = "overlayfs"
DEFAULT_TIMEOUT: Final = 10.0

CRI_IMAGE_LABEL: Final = "io.cri-containerd.image"
CRI_IMAGE_MANAGED: Final = "managed"
CONTENT_REF_LABEL: Final = "containerd.io/gc.ref.content."
SNAPSHOT_REF_LABEL: Final = "containerd.io/gc.ref.snapshot."
SOURCE_LABEL: Final = "containerd.io/distribution.source."
UNCOMPRESSED_LABEL: Final = "containerd.io/uncompressed"
# Set on the snapshots an unpack prepares and commits, as containerd's unpacker does (remote
# snapshotters find the layer by it).
SNAPSHOT_CHAIN_LABEL: Final = "containerd.io/snapshot.ref"
LEASE_EXPIRE_LABEL: Final = "containerd.io/gc.expire"
LEASE_PREFIX: Final = "mirror-prefetch-"
# Long enough for any import; only matters when mirror dies before deleting its lease.
LEASE_LIFETIME: Final = timedelta(hours=24)

# Bytes per Content.Write message: containerd refuses messages over 16 MiB.
WRITE_CHUNK: Final = 1024 * 1024
# The largest image config read into memory (they are a few KiB; Docker caps them near 8 MiB).
MAX_CONFIG_SIZE: Final = 8 * 1024 * 1024
# Diff.Apply decompresses and writes a whole layer: its deadline grows with the layer, at this
# many compressed bytes a second on the slowest disk mirror should still wait for.
SLOWEST_UNPACK_RATE: Final = 4 * 1024 * 1024
# Keys tried for one layer's snapshot, as containerd's unpacker tries them.
PREPARE_ATTEMPTS: Final = 3
# containerd refuses a label whose key and value together exceed this.
MAX_LABEL_SIZE: Final = 4096

_MANIFEST_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
# What a best-effort cleanup (lease, ingest, snapshot) may meet; the lease's expiry and the
# garbage collector finish what it leaves, so none of these replaces the import's outcome.
_CLEANUP_ERRORS: Final = (grpc.aio.AioRpcError, grpc.aio.UsageError)


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chain ID of each stack of layers, bottom first, as the OCI image spec defines it.

    The bottom layer's is its diff ID; each next one is the sha256 of ``"<parent chain ID>
    <diff ID>"``. containerd names a committed snapshot by it, so it says what is unpacked.
    """
    chain: list[str] = []
    for diff_id in diff_ids:
        if chain:
            diff_id = "sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest()
        chain.append(diff_id)
    return chain


def config_diff_ids(config: bytes, layers: int) -> list[str]:
    """The config's ``rootfs.diff_ids``: well-formed digests, one per layer of the manifest."""
    try:
        ids = json.loads(config)["rootfs"]["diff_ids"]
    except (ValueError, TypeError, KeyError) as exc:
        raise RuntimeImportError(f"image config has no rootfs.diff_ids ({exc!r})") from None
    if not isinstance(ids, list) or not all(isinstance(diff_id, str) for diff_id in ids):
        raise RuntimeImportError("image config's rootfs.diff_ids is not a list of digests")
    try:
        for diff_id in ids:
            parse_digest(diff_id)
    except DigestInvalid as exc:
        raise RuntimeImportError(f"image config's rootfs.diff_ids: {exc}") from None
    if len(ids) != layers:
        raise RuntimeImportError(f"image config lists {len(ids)} diff IDs for {layers} layers")
    return ids


def manifest_labels(plan: ImagePlan) -> dict[str, str]:
    """The manifest's references to its config and layers, keyed as containerd's pull keys them."""
    labels = {f"{CONTENT_REF_LABEL}config": str(plan.config.digest)}
    for i, layer in enumerate(plan.layers):
        labels[f"{CONTENT_REF_LABEL}l.{i}"] = str(layer.digest)
    return labels


def index_labels(index: bytes) -> dict[str, str]:
    """The index's references to every manifest it lists, all platforms, as a pull sets them.

    Image manifests are ``m.<i>``; anything else (a nested index) is numbered apart as
    ``<i>``, as containerd's ``ChildGCLabels`` does.
    """
    try:
        entries = json.loads(index)["manifests"]
        children = [(entry.get("mediaType"), entry["digest"]) for entry in entries]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise RuntimeImportError(f"image index lists no manifests ({exc!r})") from None
    labels: dict[str, str] = {}
    counts = {"m.": 0, "": 0}
    for media_type, digest in children:
        kind = "m." if media_type in _MANIFEST_TYPES else ""
        labels[f"{CONTENT_REF_LABEL}{kind}{counts[kind]}"] = str(digest)
        counts[kind] += 1
    return labels


def source_label(registry: str, repository: str, existing: Mapping[str, str]) -> dict[str, str]:
    """``containerd.io/distribution.source.<host>``: the repositories the blob came from.

    containerd keys it by host name without port and keeps the repositories sorted and
    comma-separated; a label that would grow past containerd's size limit is left as it is.
    """
    key = SOURCE_LABEL + _host_name(registry)
    current = existing.get(key, "")
    value = ",".join(sorted({*filter(None, current.split(",")), repository}))
    if len(key) + len(value) > MAX_LABEL_SIZE:
        return {}
    return {key: value}


def _host_name(registry: str) -> str:
    """The registry without its port, as Go's ``url.Hostname`` gives it (``[::1]:80``: ``::1``)."""
    if registry.startswith("["):
        return registry[1:].partition("]")[0]
    return registry.partition(":")[0]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _refused(what: str, err: grpc.aio.AioRpcError) -> RuntimeImportError:
    return RuntimeImportError(
        f"containerd {what}: {err.code().name}: {_one_line(err.details() or '')}"
    )


@contextlib.contextmanager
def _as_import_error(what: str) -> Iterator[None]:
    """Turn containerd's failures (gRPC errors, the client's errors) into `RuntimeImportError`."""
    try:
        yield
    except grpc.aio.AioRpcError as err:
        raise _refused(what, err) from err
    except ContainerdError as err:
        raise RuntimeImportError(_one_line(f"containerd {what}: {err}")) from err


def _code(err: grpc.aio.AioRpcError) -> grpc.StatusCode:
    code: grpc.StatusCode = err.code()
    return code


@dataclass(frozen=True, slots=True)
class _Stubs:
    """The services an import uses, on the client's channel."""

    content: Any
    images: Any
    snapshots: Any
    diff: Any
    leases: Any

    @classmethod
    def on(cls, channel: grpc.aio.Channel) -> _Stubs:
        # grpcio-tools generates the stubs without annotations.
        return cls(
            content=content_pb2_grpc.ContentStub(channel),  # type: ignore[no-untyped-call]
            images=images_pb2_grpc.ImagesStub(channel),  # type: ignore[no-untyped-call]
            snapshots=snapshots_pb2_grpc.SnapshotsStub(channel),  # type: ignore[no-untyped-call]
            diff=diff_pb2_grpc.DiffStub(channel),  # type: ignore[no-untyped-call]
            leases=leases_pb2_grpc.LeasesStub(channel),  # type: ignore[no-untyped-call]
        )


class ContainerdRuntime:
    """One containerd namespace (``k8s.io`` for the CRI, ``moby`` for Docker's containerd
    store, ``default`` for ``ctr``) and the snapshotter its images are unpacked for.

    ``timeout`` bounds every call but Diff.Apply (which gets more per byte of the layer) and
    every message of a Content.Write. Nothing here reads the environment.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        namespace: str,
        *,
        snapshotter: str = DEFAULT_SNAPSHOTTER,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if not snapshotter:
            raise ValueError("snapshotter must not be empty")
        self._client = ContainerdClient(os.fspath(socket_path), namespace, timeout=timeout)
        self.snapshotter = snapshotter
        self.timeout = timeout

    @property
    def name(self) -> str:
        return "containerd"

    @property
    def namespace(self) -> str:
        return self._client.namespace

    async def start(self) -> None:
        """`RuntimeImportError` unless containerd answers within the timeout."""
        with _as_import_error(f"at {self._client.socket_path}"):
            await self._client.check()

    async def close(self) -> None:
        await self._client.close()

    async def holds(self, plan: ImagePlan) -> bool:
        """The name points at the target, every blob is in the namespace, the image unpacked.

        Unpacked means the snapshot named by the chain ID of the config's diff IDs exists for
        this runtime's snapshotter. A config that cannot be read as one is "not held": `take`
        then fails with the reason.
        """
        if not _names_its_target(plan):
            return False
        with _as_import_error(f"check of {plan.name}"):
            record = await self._client.get_image(str(plan.name))
            if record is None or record.digest != str(plan.target.digest):
                return False
            for descriptor in plan.descriptors:
                info = await self._client.content_info(str(descriptor.digest))
                if info is None or info.size != descriptor.size:
                    return False
            try:
                config = await _gather(
                    self._client.read_content(str(plan.config.digest)),
                    plan.config,
                    MAX_CONFIG_SIZE,
                )
                top = chain_ids(config_diff_ids(config, len(plan.layers)))
            except (ContainerdNotFound, RuntimeImportError):
                return False
            return not top or await self.unpacked(top[-1])

    async def take(self, plan: ImagePlan, blobs: BlobReader) -> None:
        """Write what the namespace lacks, unpack, then name the image (see the module doc)."""
        if not _names_its_target(plan):
            raise RuntimeImportError(
                f"{plan.name} names a digest other than its target {plan.target.digest}"
            )
        with _as_import_error(f"import of {plan.name}"):
            stubs = self._stubs()
            async with self._lease(stubs) as lease:
                await _Import(self, self._client, stubs, plan, blobs, lease).run()

    def _stubs(self) -> _Stubs:
        """Stubs on the client's channel (cheap; a closed channel is reopened)."""
        return _Stubs.on(self._client.channel())

    @contextlib.asynccontextmanager
    async def _lease(self, stubs: _Stubs) -> AsyncIterator[str]:
        """A lease for one import, deleted when it ends however it ends."""
        expires = (datetime.now(UTC) + LEASE_LIFETIME).strftime("%Y-%m-%dT%H:%M:%SZ")
        request = leases_pb2.CreateRequest(
            id=LEASE_PREFIX + secrets.token_hex(8), labels={LEASE_EXPIRE_LABEL: expires}
        )
        reply = await stubs.leases.Create(
            request, metadata=self._client.metadata(), timeout=self.timeout
        )
        lease: str = reply.lease.id
        try:
            yield lease
        finally:
            try:
                await stubs.leases.Delete(
                    leases_pb2.DeleteRequest(id=lease),
                    metadata=self._client.metadata(),
                    timeout=self.timeout,
                )
            except _CLEANUP_ERRORS as err:
                log.warning("containerd: lease %s not deleted: %s", lease, err)

    async def unpacked(self, chain_id: str) -> bool:
        """Whether this snapshotter has a committed snapshot named ``chain_id``."""
        request = snapshots_pb2.StatSnapshotRequest(snapshotter=self.snapshotter, key=chain_id)
        try:
            reply = await self._stubs().snapshots.Stat(
                request, metadata=self._client.metadata(), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as err:
            if _code(err) == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        committed: bool = reply.info.kind == snapshots_pb2.COMMITTED
        return committed


def _names_its_target(plan: ImagePlan) -> bool:
    """A name with a digest must name the target: containerd would not check that for us."""
    return plan.name.digest is None or plan.name.digest == plan.target.digest


@contextlib.asynccontextmanager
async def _closing(chunks: AsyncIterator[bytes]) -> AsyncIterator[AsyncIterator[bytes]]:
    """Close a generator of chunks left half read, so its stream or download ends now."""
    try:
        yield chunks
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


async def _gather(chunks: AsyncIterator[bytes], descriptor: Descriptor, limit: int) -> bytes:
    """A small blob read whole: refused above ``limit``, or past its descriptor's size."""
    if descriptor.size > limit:
        raise RuntimeImportError(
            f"{descriptor.digest} is {descriptor.size} bytes, more than the {limit} read whole"
        )
    parts: list[bytes] = []
    size = 0
    async with _closing(chunks):
        async for chunk in chunks:
            size += len(chunk)
            if size > descriptor.size:
                raise RuntimeImportError(
                    f"{descriptor.digest}: more than the {descriptor.size} bytes it should have"
                )
            parts.append(chunk)
    return b"".join(parts)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _pieces(chunk: bytes, size: int) -> Iterator[bytes]:
    """``chunk`` in messages of at most ``size`` bytes."""
    if len(chunk) <= size:
        yield chunk
        return
    view = memoryview(chunk)
    for start in range(0, len(chunk), size):
        yield bytes(view[start : start + size])


@dataclass
class _Import:
    """One `take`: the plan, where its bytes come from, and the lease it works under.

    ``labels`` remembers each blob's labels as last seen or set, so no label is written twice.
    """

    runtime: ContainerdRuntime
    client: ContainerdClient
    stubs: _Stubs
    plan: ImagePlan
    blobs: BlobReader
    lease: str
    labels: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def timeout(self) -> float:
        return self.runtime.timeout

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self.client.metadata(lease=self.lease)

    async def run(self) -> None:
        plan = self.plan
        config = await self.document(plan.config, MAX_CONFIG_SIZE, lambda _: {})
        diff_ids = config_diff_ids(config, len(plan.layers))
        for layer in plan.layers:
            await self.blob(layer, {})
        await self.blob(plan.manifest, manifest_labels(plan))
        if plan.target.digest != plan.manifest.digest:
            await self.document(plan.target, MAX_MANIFEST_SIZE, index_labels)
        top = await self.unpack(diff_ids)
        if top is not None:
            await self.label(plan.config, {SNAPSHOT_REF_LABEL + self.runtime.snapshotter: top})
        await self.name()

    # Content

    async def protect(self, kind: str, resource: str) -> None:
        """Put a blob or snapshot in the lease, whether or not it exists yet."""
        request = leases_pb2.AddResourceRequest(
            id=self.lease, resource=leases_pb2.Resource(id=resource, type=kind)
        )
        await self.stubs.leases.AddResource(
            request, metadata=self.client.metadata(), timeout=self.timeout
        )

    async def present(self, descriptor: Descriptor) -> bool:
        """Whether the namespace holds the blob (protected from here on); its labels noted."""
        await self.protect("content", str(descriptor.digest))
        info = await self.client.content_info(str(descriptor.digest))
        if info is None:
            return False
        if info.size != descriptor.size:
            raise RuntimeImportError(
                f"containerd holds {descriptor.digest} as {info.size} bytes, "
                f"the plan says {descriptor.size}"
            )
        self.labels[str(descriptor.digest)] = info.labels
        return True

    async def blob(self, descriptor: Descriptor, children: Mapping[str, str]) -> None:
        """The blob in the namespace, with its references to ``children`` and its source."""
        if not await self.present(descriptor):
            chunks = self.blobs.read(descriptor)
            if await self.write(descriptor, chunks, self.wanted(descriptor, children)):
                return
            await self.present(descriptor)  # another import wrote it meanwhile: its labels
        await self.label(descriptor, self.wanted(descriptor, children))

    async def document(
        self,
        descriptor: Descriptor,
        limit: int,
        children_of: Callable[[bytes], Mapping[str, str]],
    ) -> bytes:
        """A small JSON blob (config, index) put in the namespace like `blob`, and its bytes.

        Read from containerd when it is there, else from the reader and checked against its
        digest before it is parsed (for its children) and written.
        """
        digest = str(descriptor.digest)
        if await self.present(descriptor):
            data = await _gather(self.client.read_content(digest), descriptor, limit)
        else:
            data = await _gather(self.blobs.read(descriptor), descriptor, limit)
            actual = "sha256:" + hashlib.sha256(data).hexdigest()
            if actual != digest:
                raise RuntimeImportError(f"blob {digest}: the bytes read hash to {actual}")
            if await self.write(
                descriptor, _once(data), self.wanted(descriptor, children_of(data))
            ):
                return data
            await self.present(descriptor)  # another import wrote it meanwhile: its labels
        await self.label(descriptor, self.wanted(descriptor, children_of(data)))
        return data

    def wanted(self, descriptor: Descriptor, children: Mapping[str, str]) -> dict[str, str]:
        """The labels a pull would give the blob, given the labels it has."""
        fetched = self.plan.fetched
        existing = self.labels.get(str(descriptor.digest), {})
        return {**children, **source_label(fetched.registry, fetched.repository, existing)}

    async def label(self, descriptor: Descriptor, wanted: Mapping[str, str]) -> None:
        """Set the labels in ``wanted`` that the blob lacks; its other labels stay."""
        digest = str(descriptor.digest)
        existing = self.labels.setdefault(digest, {})
        changed = {key: value for key, value in wanted.items() if existing.get(key) != value}
        if not changed:
            return
        request = content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=digest, labels=changed),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{key}" for key in changed]),
        )
        await self.stubs.content.Update(request, metadata=self.metadata(), timeout=self.timeout)
        existing.update(changed)

    async def write(
        self, descriptor: Descriptor, chunks: AsyncIterator[bytes], labels: Mapping[str, str]
    ) -> bool:
        """Stream the blob in and commit it with ``labels``; False if it appeared meanwhile.

        The ingest's ref is unique to this import, so it never waits on another writer's lock;
        two imports of one blob both write, and the second commit finds it there. An ingest
        that does not end in a commit is aborted.
        """
        digest, size = str(descriptor.digest), descriptor.size
        ref = f"{self.lease}-{digest}"
        call = self.stubs.content.Write(metadata=self.metadata())
        committed = False
        try:
            opened = await self.exchange(
                call,
                content_pb2.WriteContentRequest(
                    action=content_pb2.STAT, ref=ref, total=size, expected=digest
                ),
            )
            offset = opened.offset
            if offset != size:
                offset = await self.stream(call, descriptor, chunks)
            # else another namespace holds the blob: containerd shares it without a byte sent.
            done = await self.exchange(
                call,
                content_pb2.WriteContentRequest(
                    action=content_pb2.COMMIT,
                    total=size,
                    expected=digest,
                    offset=offset,
                    labels=dict(labels),
                ),
            )
            committed = True
        except grpc.aio.AioRpcError as err:
            if _code(err) == grpc.StatusCode.ALREADY_EXISTS:
                committed = True
                return False
            raise _refused(f"write of {digest}", err) from err
        finally:
            call.cancel()
            if not committed:
                await self.abort(ref)
        if done.digest != digest:
            raise RuntimeImportError(f"containerd committed {done.digest} for {digest}")
        self.labels[digest] = dict(labels)
        log.debug("containerd: wrote %s (%d bytes)", digest, size)
        return True

    async def stream(self, call: Any, descriptor: Descriptor, chunks: AsyncIterator[bytes]) -> int:
        """Send the blob's bytes; the offset reached, which must be its size."""
        offset = 0
        async with _closing(chunks):
            async for chunk in chunks:
                for piece in _pieces(chunk, WRITE_CHUNK):
                    if offset + len(piece) > descriptor.size:
                        raise RuntimeImportError(
                            f"blob {descriptor.digest}: more than the {descriptor.size} bytes "
                            "it should have"
                        )
                    request = content_pb2.WriteContentRequest(
                        action=content_pb2.WRITE, offset=offset, data=piece
                    )
                    offset = (await self.exchange(call, request)).offset
        if offset != descriptor.size:
            raise RuntimeImportError(
                f"blob {descriptor.digest}: {offset} bytes read, it should have {descriptor.size}"
            )
        return offset

    async def exchange(self, call: Any, request: content_pb2.WriteContentRequest) -> Any:
        """One message of a Write session and containerd's answer to it, within the timeout."""
        try:
            return await asyncio.wait_for(self._exchange(call, request), self.timeout)
        except TimeoutError:
            raise RuntimeImportError(
                f"containerd Content.Write: no answer in {self.timeout}s"
            ) from None

    @staticmethod
    async def _exchange(call: Any, request: content_pb2.WriteContentRequest) -> Any:
        with contextlib.suppress(asyncio.InvalidStateError):
            # Finished already (containerd refused the previous message): read says why.
            await call.write(request)
        reply = await call.read()
        if reply is grpc.aio.EOF:
            raise RuntimeImportError("containerd ended a Content.Write without an answer")
        return reply

    async def abort(self, ref: str) -> None:
        """Drop an unfinished ingest now rather than when the lease ends."""
        try:
            await self.stubs.content.Abort(
                content_pb2.AbortRequest(ref=ref), metadata=self.metadata(), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as err:
            if _code(err) != grpc.StatusCode.NOT_FOUND:
                log.warning("containerd: ingest %s not aborted: %s", ref, err.details())
        except grpc.aio.UsageError as err:
            log.warning("containerd: ingest %s not aborted: %s", ref, err)

    # Snapshots

    async def unpack(self, diff_ids: Sequence[str]) -> str | None:
        """Unpack every layer not unpacked yet, bottom first; the top chain ID (None: no layers).

        ``containerd.io/uncompressed`` goes on every layer, also on those already unpacked:
        the config, checked against its digest, vouches for the diff ID, and whoever committed
        the snapshot under its chain ID checked the layer against it.
        """
        parent = ""
        for layer, diff_id, chain_id in zip(
            self.plan.layers, diff_ids, chain_ids(diff_ids), strict=True
        ):
            await self.protect(f"snapshots/{self.runtime.snapshotter}", chain_id)
            if not await self.runtime.unpacked(chain_id):
                await self.apply(layer, diff_id, parent, chain_id)
            await self.label(layer, {UNCOMPRESSED_LABEL: diff_id})
            parent = chain_id
        return parent or None

    async def apply(self, layer: Descriptor, diff_id: str, parent: str, chain_id: str) -> None:
        """Prepare above ``parent``, unpack the layer, commit as ``chain_id``; tidy on failure."""
        labels = {SNAPSHOT_CHAIN_LABEL: chain_id}
        prepared = await self.prepare(parent, chain_id, labels)
        if prepared is None:
            return
        key, mounts = prepared
        try:
            applied = await self.stubs.diff.Apply(
                diff_pb2.ApplyRequest(diff=_descriptor(layer), mounts=mounts),
                metadata=self.metadata(),
                timeout=self.timeout + layer.size / SLOWEST_UNPACK_RATE,
            )
            if applied.applied.digest != diff_id:
                raise RuntimeImportError(
                    f"layer {layer.digest} unpacks to {applied.applied.digest}, "
                    f"its image config says {diff_id}"
                )
            await self.stubs.snapshots.Commit(
                snapshots_pb2.CommitSnapshotRequest(
                    snapshotter=self.runtime.snapshotter, name=chain_id, key=key, labels=labels
                ),
                metadata=self.metadata(),
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as err:
            await self.remove(key)
            if _code(err) == grpc.StatusCode.ALREADY_EXISTS:
                return  # another unpack committed the same chain ID first: it is there
            raise _refused(f"unpack of layer {layer.digest}", err) from err
        except BaseException:
            await self.remove(key)
            raise
        log.debug("containerd: unpacked %s as %s", layer.digest, chain_id)

    async def prepare(
        self, parent: str, chain_id: str, labels: Mapping[str, str]
    ) -> tuple[str, Any] | None:
        """A fresh active snapshot above ``parent`` and its mounts; None if ``chain_id`` is
        committed meanwhile.

        containerd answers ALREADY_EXISTS both for a key in use and, because of the
        ``containerd.io/snapshot.ref`` label, for a chain ID another unpack has committed; like
        containerd's unpacker, tell the two apart by looking, and try a new key for the first.
        """
        for _ in range(PREPARE_ATTEMPTS):
            key = f"extract-{secrets.token_hex(8)} {chain_id}"  # containerd's own key format
            request = snapshots_pb2.PrepareSnapshotRequest(
                snapshotter=self.runtime.snapshotter, key=key, parent=parent, labels=labels
            )
            try:
                reply = await self.stubs.snapshots.Prepare(
                    request, metadata=self.metadata(), timeout=self.timeout
                )
            except grpc.aio.AioRpcError as err:
                if _code(err) != grpc.StatusCode.ALREADY_EXISTS:
                    raise
                if await self.runtime.unpacked(chain_id):
                    return None
                continue
            return key, reply.mounts
        raise RuntimeImportError(f"containerd refused every snapshot key for {chain_id}")

    async def remove(self, key: str) -> None:
        """Drop a prepared snapshot that will not be committed (the lease would, later)."""
        try:
            await self.stubs.snapshots.Remove(
                snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.runtime.snapshotter, key=key),
                metadata=self.metadata(),
                timeout=self.timeout,
            )
        except _CLEANUP_ERRORS as err:
            log.warning("containerd: snapshot %r not removed: %s", key, err)

    # The name

    async def name(self) -> None:
        """Create the image record, or point it at the target; untouched if it already is."""
        name, target = str(self.plan.name), self.plan.target
        record = await self.client.get_image(name)
        if (
            record is not None
            and (record.digest, record.media_type, record.size)
            == (str(target.digest), target.media_type, target.size)
            and record.labels.get(CRI_IMAGE_LABEL) == CRI_IMAGE_MANAGED
        ):
            return
        image = images_pb2.Image(
            name=name, labels={CRI_IMAGE_LABEL: CRI_IMAGE_MANAGED}, target=_descriptor(target)
        )
        metadata = self.client.metadata()
        if record is None:
            try:
                await self.stubs.images.Create(
                    images_pb2.CreateImageRequest(image=image),
                    metadata=metadata,
                    timeout=self.timeout,
                )
                return
            except grpc.aio.AioRpcError as err:
                if _code(err) != grpc.StatusCode.ALREADY_EXISTS:
                    raise
        # Other labels on the record (set by the CRI or an operator) stay as they are.
        mask = field_mask_pb2.FieldMask(paths=["target", f"labels.{CRI_IMAGE_LABEL}"])
        await self.stubs.images.Update(
            images_pb2.UpdateImageRequest(image=image, update_mask=mask),
            metadata=metadata,
            timeout=self.timeout,
        )


def _descriptor(descriptor: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(
        media_type=descriptor.media_type, digest=str(descriptor.digest), size=descriptor.size
    )
