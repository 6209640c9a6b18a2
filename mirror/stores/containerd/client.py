"""A small async client for the parts of containerd's gRPC API that mirror reads.

mirror serves blobs that a node's containerd already holds, so it needs only: which images
exist (Images), whether digests are present *in a namespace* and how big (Content.Info, List),
the bytes (Content.Read, or the file under ``content_root()``), and a feed of changes
(Events.Subscribe). Everything else in containerd's API is deliberately left out; the
``api`` package holds a hand-written subset of the protos with containerd 1.6's field numbers.

Every call carries the namespace as ``containerd-namespace`` metadata: containerd scopes
images and content visibility per namespace (``k8s.io`` for the CRI, ``moby`` for Docker's
containerd store), even though the blobs on disk are shared.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from typing import Final

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message

from mirror.stores.containerd.api import (
    content_events_pb2,
    content_pb2,
    content_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    image_events_pb2,
    images_pb2,
    images_pb2_grpc,
    introspection_pb2,
    introspection_pb2_grpc,
)

__all__ = [
    "ContainerdClient",
    "ContainerdError",
    "ContainerdEvent",
    "ContainerdNotFound",
    "ContainerdUnavailable",
    "ContentInfo",
    "ImageRecord",
]

NAMESPACE_METADATA_KEY: Final = "containerd-namespace"
# What a call creates (content, ingests, snapshots) while it carries this joins the lease.
LEASE_METADATA_KEY: Final = "containerd-lease"
CONTENT_PLUGIN_TYPE: Final = "io.containerd.content.v1"

# Content.Read answers in ~1 MiB messages; gRPC's default 4 MiB cap leaves little headroom
# and other replies (a big Images.List) can exceed it, so allow more.
MAX_RECEIVE_MESSAGE_BYTES: Final = 16 * 1024 * 1024

# Event payload class per topic. containerd's Envelope.event.type_url is the bare message name
# (e.g. "containerd.services.images.v1.ImageCreate", no "type.googleapis.com/" prefix), so
# Any.Unpack refuses it; the topic identifies the payload just as well.
# "/content/create" is only published by containerd >= 2.0.
_EVENT_TYPES: Final[Mapping[str, type[Message]]] = {
    "/images/create": image_events_pb2.ImageCreate,
    "/images/update": image_events_pb2.ImageUpdate,
    "/images/delete": image_events_pb2.ImageDelete,
    "/content/create": content_events_pb2.ContentCreate,
    "/content/delete": content_events_pb2.ContentDelete,
}

# Codes meaning "containerd is not there (or not answering)": the caller should back off or
# fall back, not treat the request as bad.
_UNAVAILABLE_CODES: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
)


class ContainerdError(Exception):
    """containerd answered with an error mirror has no specific handling for.

    ``code`` is the gRPC status code, kept so callers can log it without importing grpc.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class ContainerdUnavailable(ContainerdError):
    """The socket is missing, refuses connections, or containerd did not answer in time."""


class ContainerdNotFound(ContainerdError):
    """A streamed read named content this namespace does not have (or that GC removed).

    Calls that return a single record report absence as ``None`` instead; a stream can only
    find out once it has started, so it raises this.
    """


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """An image name and the descriptor it points at (manifest or index)."""

    name: str
    digest: str
    media_type: str
    size: int
    labels: dict[str, str]


@dataclass(frozen=True, slots=True)
class ContentInfo:
    """A blob committed in this namespace: its size and containerd's labels for it.

    Labels include ``containerd.io/distribution.source.<registry>=<repo>`` for pulled blobs.
    """

    digest: str
    size: int
    labels: dict[str, str]


@dataclass(frozen=True, slots=True)
class ContainerdEvent:
    """One event from Events.Subscribe, reduced to what mirror reacts to.

    ``name`` is set for ``/images/*`` topics, ``digest`` for ``/content/*`` topics; both are
    ``None`` for other topics (delivered when the filters let them through).
    """

    namespace: str
    topic: str
    name: str | None
    digest: str | None


def _translate(err: grpc.aio.AioRpcError, what: str) -> ContainerdError:
    """Turn a gRPC failure into one of this module's error types."""
    code = err.code()
    message = f"containerd {what}: {code.name}: {err.details()}"
    if code in _UNAVAILABLE_CODES:
        return ContainerdUnavailable(message, code)
    if code == grpc.StatusCode.NOT_FOUND:
        return ContainerdNotFound(message, code)
    return ContainerdError(message, code)


def _target(socket_path: str) -> str:
    """gRPC target for a unix socket; ``unix://`` requires an absolute path."""
    return "unix://" + os.path.abspath(socket_path)


class ContainerdClient:
    """Async client bound to one containerd socket and one namespace.

    The gRPC channel is created on first use, inside the running event loop (``grpc.aio``
    binds a channel to the loop it was created in), so the client may be constructed
    anywhere. Unary calls get ``timeout`` as their deadline; streams have no overall deadline
    (a blob read may take long and a subscription lasts forever), but a ``read_content``
    stream that goes silent for ``timeout`` is treated as containerd being unavailable.
    """

    def __init__(self, socket_path: str, namespace: str, *, timeout: float = 5.0) -> None:
        if not namespace:
            raise ValueError("containerd namespace must not be empty")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.socket_path = socket_path
        self.namespace = namespace
        self.timeout = timeout
        self._metadata: Final = ((NAMESPACE_METADATA_KEY, namespace),)
        self._channel: grpc.aio.Channel | None = None
        self._images: images_pb2_grpc.ImagesStub | None = None
        self._content: content_pb2_grpc.ContentStub | None = None
        self._introspection: introspection_pb2_grpc.IntrospectionStub | None = None
        self._events: events_pb2_grpc.EventsStub | None = None

    def _ensure_channel(self) -> None:
        if self._channel is not None:
            return
        channel = grpc.aio.insecure_channel(
            _target(self.socket_path),
            options=[
                ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
                # A local socket is cheap to retry; gRPC's default 1 s..120 s backoff would keep
                # failing calls long after a restarted containerd is back.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
                # gRPC uses this as the connect (handshake) timeout, not as a backoff: keep it
                # at the call timeout so a busy containerd is not dropped mid-handshake.
                ("grpc.min_reconnect_backoff_ms", max(100, int(self.timeout * 1000))),
            ],
        )
        self._channel = channel
        # grpcio-tools generates the stubs without annotations.
        self._images = images_pb2_grpc.ImagesStub(channel)  # type: ignore[no-untyped-call]
        self._content = content_pb2_grpc.ContentStub(channel)  # type: ignore[no-untyped-call]
        self._introspection = introspection_pb2_grpc.IntrospectionStub(channel)  # type: ignore[no-untyped-call]
        self._events = events_pb2_grpc.EventsStub(channel)  # type: ignore[no-untyped-call]

    def channel(self) -> grpc.aio.Channel:
        """The channel (opened on first use), for stubs of services this client leaves out.

        prefetch's runtime writes content, snapshots and images through it rather than open a
        second connection. ``close()`` closes it: take it again after a close.
        """
        self._ensure_channel()
        assert self._channel is not None
        return self._channel

    def metadata(self, *, lease: str | None = None) -> tuple[tuple[str, str], ...]:
        """Call metadata naming this namespace and, if given, the lease the call works under."""
        if lease is None:
            return self._metadata
        return (*self._metadata, (LEASE_METADATA_KEY, lease))

    @property
    def _images_stub(self) -> images_pb2_grpc.ImagesStub:
        self._ensure_channel()
        assert self._images is not None
        return self._images

    @property
    def _content_stub(self) -> content_pb2_grpc.ContentStub:
        self._ensure_channel()
        assert self._content is not None
        return self._content

    @property
    def _introspection_stub(self) -> introspection_pb2_grpc.IntrospectionStub:
        self._ensure_channel()
        assert self._introspection is not None
        return self._introspection

    @property
    def _events_stub(self) -> events_pb2_grpc.EventsStub:
        self._ensure_channel()
        assert self._events is not None
        return self._events

    async def close(self) -> None:
        """Close the channel, cancelling streams still open; the client may be reused after."""
        channel, self._channel = self._channel, None
        self._images = self._content = self._introspection = self._events = None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> ContainerdClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _plugins(self, filters: list[str]) -> introspection_pb2.PluginsResponse:
        try:
            response: introspection_pb2.PluginsResponse = await self._introspection_stub.Plugins(
                introspection_pb2.PluginsRequest(filters=filters),
                metadata=self._metadata,
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise _translate(err, "Introspection.Plugins") from err
        return response

    async def check(self) -> None:
        """Raise ``ContainerdUnavailable`` within ``timeout`` unless containerd answers.

        Uses Introspection.Plugins because every containerd serves it and it touches no
        namespace data; the filter keeps the reply small.
        """
        try:
            await self._plugins([f'type=="{CONTENT_PLUGIN_TYPE}"'])
        except ContainerdUnavailable:
            raise
        except ContainerdError as err:
            # It answered, but not as a healthy containerd would: still unusable for mirror.
            raise ContainerdUnavailable(str(err), err.code) from err

    async def content_root(self) -> str | None:
        """Directory of the content store (``blobs/sha256/<hex>`` below it), if exported.

        Reading blobs from the file is about twice as fast as Content.Read; the directory is
        only usable when mirror runs on the same host (or mount namespace) as containerd.
        """
        response = await self._plugins([f'type=="{CONTENT_PLUGIN_TYPE}"'])
        for plugin in response.plugins:
            root: str = plugin.exports.get("root", "")
            if plugin.type == CONTENT_PLUGIN_TYPE and root:
                return root
        return None

    @staticmethod
    def _image_record(image: images_pb2.Image) -> ImageRecord:
        target = image.target
        return ImageRecord(
            name=image.name,
            digest=target.digest,
            media_type=target.media_type,
            size=target.size,
            labels=dict(image.labels),
        )

    async def get_image(self, name: str) -> ImageRecord | None:
        """The image named ``name`` in this namespace, or ``None`` if there is none."""
        try:
            response: images_pb2.GetImageResponse = await self._images_stub.Get(
                images_pb2.GetImageRequest(name=name),
                metadata=self._metadata,
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise _translate(err, "Images.Get") from err
        return self._image_record(response.image)

    async def list_images(self) -> list[ImageRecord]:
        """Every image in this namespace (containerd sends them in one reply)."""
        try:
            response: images_pb2.ListImagesResponse = await self._images_stub.List(
                images_pb2.ListImagesRequest(),
                metadata=self._metadata,
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise _translate(err, "Images.List") from err
        return [self._image_record(image) for image in response.images]

    async def content_info(self, digest: str) -> ContentInfo | None:
        """Size and labels of ``digest``, or ``None`` if this namespace does not have it.

        A blob on disk that belongs only to another namespace is also ``None``: serving it
        would leak content across namespaces, and containerd's GC does not protect it for us.
        A malformed digest raises ``ContainerdError`` (INVALID_ARGUMENT).
        """
        try:
            response: content_pb2.InfoResponse = await self._content_stub.Info(
                content_pb2.InfoRequest(digest=digest),
                metadata=self._metadata,
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise _translate(err, "Content.Info") from err
        return _content_info(response.info)

    async def list_content(self, digests: Collection[str]) -> list[ContentInfo]:
        """Those of ``digests`` this namespace holds, in one call: ``Content.List`` with a
        filter per digest (containerd ORs them). A digest of another namespace, or not a
        digest at all, is left out like a missing one.

        One call rather than a ``content_info`` each: every gRPC call wakes gRPC's threads
        about twenty times, and a walk of an image asks about all its blobs at once.
        """
        if not digests:
            return []
        call = self._content_stub.List(
            content_pb2.ListContentRequest(filters=[f'digest=="{digest}"' for digest in digests]),
            metadata=self._metadata,
            timeout=self.timeout,
        )
        found: list[ContentInfo] = []
        try:
            async for response in call:
                assert isinstance(response, content_pb2.ListContentResponse)
                found.extend(_content_info(info) for info in response.info)
        except grpc.aio.AioRpcError as err:
            raise _translate(err, "Content.List") from err
        return found

    async def some_content(self) -> list[ContentInfo]:
        """The first of this namespace's content: the first message of ``Content.List``
        (containerd sends up to 100 a message), or nothing when it holds none. Enough to find
        one blob without listing the thousands a node may hold."""
        call = self._content_stub.List(
            content_pb2.ListContentRequest(), metadata=self._metadata, timeout=self.timeout
        )
        try:
            response = await call.read()
        except grpc.aio.AioRpcError as err:
            raise _translate(err, "Content.List") from err
        finally:
            call.cancel()
        if response is grpc.aio.EOF:
            return []
        assert isinstance(response, content_pb2.ListContentResponse)
        return [_content_info(info) for info in response.info]

    def read_content(self, digest: str, offset: int = 0, size: int = 0) -> AsyncIterator[bytes]:
        """Stream ``size`` bytes of ``digest`` from ``offset`` (``size`` 0: to the end).

        Chunks arrive as containerd sends them (~1 MiB). Raises ``ContainerdNotFound`` on
        the first iteration if the digest is not in this namespace, and
        ``ContainerdUnavailable`` if containerd goes silent for ``timeout`` mid-stream.
        Stop iterating (or ``aclose()`` the iterator) to cancel the read.
        """
        if offset < 0 or size < 0:
            raise ValueError("offset and size must not be negative")
        return self._read_content(digest, offset, size)

    async def _read_content(self, digest: str, offset: int, size: int) -> AsyncIterator[bytes]:
        call = self._content_stub.Read(
            content_pb2.ReadContentRequest(digest=digest, offset=offset, size=size),
            metadata=self._metadata,
        )
        try:
            while True:
                try:
                    response = await asyncio.wait_for(call.read(), self.timeout)
                except TimeoutError as err:
                    raise ContainerdUnavailable(
                        f"containerd Content.Read: no data for {self.timeout}s",
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ) from err
                except grpc.aio.AioRpcError as err:
                    raise _translate(err, f"Content.Read {digest}") from err
                if response is grpc.aio.EOF:
                    return
                assert isinstance(response, content_pb2.ReadContentResponse)
                if response.data:
                    yield response.data
        finally:
            call.cancel()

    def subscribe(self, filters: list[str]) -> AsyncIterator[ContainerdEvent]:
        """Stream events matching any of ``filters`` (containerd filter syntax).

        Examples: ``topic~="/images/"``, ``topic=="/content/delete"``,
        ``namespace=="k8s.io"``. containerd delivers events of *all* namespaces to a
        subscriber regardless of the namespace metadata, so filter on ``namespace`` (or check
        ``ContainerdEvent.namespace``) when only one matters. The stream has no deadline;
        ``ContainerdUnavailable`` ends it when containerd goes away, and the caller should
        re-list after resubscribing since events in between are lost. There is no
        acknowledgement that the subscription is registered: events published right after
        the call starts may be missed.
        """
        return self._subscribe(list(filters))

    async def _subscribe(self, filters: list[str]) -> AsyncIterator[ContainerdEvent]:
        call = self._events_stub.Subscribe(
            events_pb2.SubscribeRequest(filters=filters),
            metadata=self._metadata,
        )
        try:
            while True:
                try:
                    envelope = await call.read()
                except grpc.aio.AioRpcError as err:
                    raise _translate(err, "Events.Subscribe") from err
                if envelope is grpc.aio.EOF:
                    return
                assert isinstance(envelope, events_pb2.Envelope)
                yield _decode_event(envelope)
        finally:
            call.cancel()


def _content_info(info: content_pb2.Info) -> ContentInfo:
    return ContentInfo(digest=info.digest, size=info.size, labels=dict(info.labels))


def _decode_event(envelope: events_pb2.Envelope) -> ContainerdEvent:
    """Reduce an envelope to a ContainerdEvent, decoding the payload by topic.

    An undecodable payload still yields the event (topic and namespace are enough to trigger
    a re-list), just without name/digest.
    """
    name: str | None = None
    digest: str | None = None
    payload_type = _EVENT_TYPES.get(envelope.topic)
    if payload_type is not None:
        payload = payload_type()
        try:
            payload.ParseFromString(envelope.event.value)
        except DecodeError:
            pass
        else:
            if envelope.topic.startswith("/images/"):
                name = getattr(payload, "name", None)
            else:
                digest = getattr(payload, "digest", None)
    return ContainerdEvent(
        namespace=envelope.namespace, topic=envelope.topic, name=name, digest=digest
    )
