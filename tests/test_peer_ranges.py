"""A large blob from several peers at once (--peer-ranges): pieces in parallel, bytes in order.

The peers are small aiohttp servers on loopback, as in test_peer_fetcher.py, each answering
Range requests for one 40 MiB blob; some misbehave (die mid-piece, answer 429, corrupt their
bytes). The provider list comes from the in-memory router.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.clusterkey import ClusterKey
from mirror.errors import DigestMismatch
from mirror.metrics import Metrics
from mirror.oci.reference import parse_digest
from mirror.peers.auth import PEER_HEADER, RequestSigner, RequestVerifier
from mirror.peers.fetcher import PeerFetcher
from mirror.ranges import resolve_range
from mirror.routing.memory import MemoryCluster
from mirror.routing.router import Provider

MIB = 1024 * 1024
KEY = ClusterKey.from_text(ClusterKey.generate())
BLOB = os.urandom(40 * MIB)
DIGEST = parse_digest("sha256:" + hashlib.sha256(BLOB).hexdigest())
PATH = f"/v2/app/blobs/{DIGEST}"
PIECE = 2 * MIB
WINDOW = 4

Behaviour = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Peers:
    servers: list[TestServer] = field(default_factory=list)
    # (peer index, Range header) of every blob request, and the indexes that got a report.
    seen: list[tuple[int, str | None]] = field(default_factory=list)
    reports: list[int] = field(default_factory=list)

    async def add(self, behaviour: Behaviour) -> Provider:
        verifier = RequestVerifier(KEY)
        index = len(self.servers)

        async def handle(request: web.Request) -> web.StreamResponse:
            assert verifier.verify(
                request.headers.get(PEER_HEADER, ""), request.method, request.raw_path
            )
            if request.method == "POST":
                self.reports.append(index)
                return web.json_response({"outcome": "queued"}, status=202)
            self.seen.append((index, request.headers.get("Range")))
            return await behaviour(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        self.servers.append(server)
        return Provider(bytes([index + 1]) * 20, f"127.0.0.1:{server.port}")

    def requests_to(self, index: int) -> int:
        return sum(1 for peer, _ in self.seen if peer == index)


@pytest.fixture
async def peers() -> AsyncIterator[Peers]:
    created = Peers()
    yield created
    for server in created.servers:
        await server.close()


def serving(blob: bytes) -> Behaviour:
    async def behaviour(request: web.Request) -> web.StreamResponse:
        byte_range = resolve_range(request.headers.get("Range"), len(blob))
        if byte_range is None:
            return web.Response(body=blob)
        return web.Response(
            status=206,
            body=blob[byte_range.offset : byte_range.end],
            headers={"Content-Range": byte_range.content_range(len(blob))},
        )

    return behaviour


good = serving(BLOB)


async def dying_mid_piece(request: web.Request) -> web.StreamResponse:
    """Answers the range asked for, sends half of it and drops the connection."""
    byte_range = resolve_range(request.headers.get("Range"), len(BLOB))
    assert byte_range is not None
    response = web.StreamResponse(
        status=206,
        headers={
            "Content-Range": byte_range.content_range(len(BLOB)),
            "Content-Length": str(byte_range.length),
        },
    )
    await response.prepare(request)
    await response.write(BLOB[byte_range.offset : byte_range.offset + byte_range.length // 2])
    assert request.transport is not None
    request.transport.abort()
    return response


async def busy(request: web.Request) -> web.StreamResponse:
    return web.Response(status=429, headers={"Retry-After": "10"})


def fetcher_for(*providers: Provider, metrics: Metrics | None = None) -> PeerFetcher:
    cluster = MemoryCluster()
    cluster.providers[str(DIGEST)] = {p.node_id: p for p in providers}
    router = cluster.router(b"\xff" * 20, "127.0.0.1:9")
    # No hedging within the tests' time: which provider got which request stays exact.
    return PeerFetcher(
        router,
        RequestSigner(KEY),
        metrics or Metrics(),
        hedge_after=5.0,
        ranges=WINDOW,
        range_size=PIECE,
    )


async def read_all(fetcher: PeerFetcher) -> bytes:
    blob = await fetcher.blob(DIGEST, PATH, None)
    assert blob is not None and blob.chunks is not None
    assert (blob.size, blob.offset, blob.length) == (len(BLOB), 0, len(BLOB))
    return b"".join([chunk async for chunk in blob.chunks])


def piece_starts(peers: Peers, index: int) -> list[int]:
    return [int(r[6:].split("-")[0]) for peer, r in peers.seen if peer == index and r]


async def test_a_large_blob_comes_in_pieces_from_every_provider(peers: Peers) -> None:
    providers = [await peers.add(good) for _ in range(3)]
    fetcher = fetcher_for(*providers)
    await fetcher.start()
    try:
        assert await read_all(fetcher) == BLOB
    finally:
        await fetcher.close()
    # Every request is one piece (a Range of at most PIECE bytes), and each provider had some.
    assert len(peers.seen) == len(BLOB) // PIECE
    for _, range_header in peers.seen:
        assert range_header is not None
        first, last = (int(n) for n in range_header[6:].split("-"))
        assert first % PIECE == 0 and last - first + 1 == PIECE
    assert all(peers.requests_to(index) >= 1 for index in range(3)), peers.seen
    assert fetcher.piece_buffer.now == 0


async def test_a_piece_whose_provider_dies_is_continued_elsewhere(peers: Peers) -> None:
    dying = await peers.add(dying_mid_piece)
    spares = [await peers.add(good), await peers.add(good)]
    metrics = Metrics()
    fetcher = fetcher_for(dying, *spares, metrics=metrics)
    await fetcher.start()
    try:
        assert await read_all(fetcher) == BLOB
    finally:
        await fetcher.close()
    assert peers.requests_to(0) >= 1
    # Each piece the dying provider began was continued from its first missing byte.
    continued = piece_starts(peers, 1) + piece_starts(peers, 2)
    for start in piece_starts(peers, 0):
        assert start + PIECE // 2 in continued
    assert metrics.registry.get_sample_value(
        "mirror_peer_fetch_failures_total", {"reason": "broken"}
    )
    assert fetcher.piece_buffer.now == 0


async def test_a_provider_answering_429_gets_no_more_pieces_for_a_while(peers: Peers) -> None:
    providers = [await peers.add(good), await peers.add(good), await peers.add(busy)]
    metrics = Metrics()
    fetcher = fetcher_for(*providers, metrics=metrics)
    await fetcher.start()
    try:
        assert await read_all(fetcher) == BLOB
    finally:
        await fetcher.close()
    # An idle provider is tried: the pieces starting before its first answer came back may
    # each ask it (on a loaded machine a piece of the first window can be through before that
    # answer is read, and one more piece start). Once its 429 is known it is passed over for
    # its Retry-After: no later piece asks it, and every piece came from the other two.
    refused = piece_starts(peers, 2)
    assert 0 < len(refused) <= WINDOW, peers.seen
    assert peers.requests_to(0) + peers.requests_to(1) == len(BLOB) // PIECE
    steered = metrics.registry.get_sample_value("mirror_peer_fetches_steered_total")
    assert steered == len(refused)


async def test_a_corrupt_provider_is_caught_and_nothing_wrong_is_handed_out(peers: Peers) -> None:
    damaged = bytearray(BLOB)
    for offset in range(PIECE // 2, len(BLOB), PIECE):  # a wrong byte in every piece it sends
        damaged[offset] ^= 0xFF
    providers = [await peers.add(good), await peers.add(good), await peers.add(serving(damaged))]
    fetcher = fetcher_for(*providers)
    await fetcher.start()
    received = bytearray()
    try:
        blob = await fetcher.blob(DIGEST, PATH, None)
        assert blob is not None and blob.chunks is not None
        with pytest.raises(DigestMismatch):
            async for chunk in blob.chunks:
                received += chunk
        await fetcher.reports_sent()
        # The last chunk was held back: the client never had the whole (wrong) body.
        assert len(received) < len(BLOB)
        # Which piece was wrong cannot be told: every provider that sent one is reported and
        # not asked for this digest again for a while.
        assert peers.requests_to(2) >= 1
        senders = {index for index in range(3) if peers.requests_to(index)}
        assert set(peers.reports) == senders
        assert await fetcher.blob(DIGEST, PATH, None) is None
    finally:
        await fetcher.close()
    assert fetcher.piece_buffer.now == 0


async def test_pieces_held_in_memory_are_bounded_by_the_window(peers: Peers) -> None:
    providers = [await peers.add(good) for _ in range(3)]
    fetcher = fetcher_for(*providers)
    await fetcher.start()
    gauge = fetcher.piece_buffer
    try:
        blob = await fetcher.blob(DIGEST, PATH, None)
        assert blob is not None and blob.chunks is not None
        chunks = aiter(blob.chunks)
        received = bytearray(await anext(chunks))
        # The reader stalls after its first chunk: the window fills and stops there (the
        # first chunk is handed out, every other byte of the first WINDOW pieces is held).
        async with asyncio.timeout(10):
            while gauge.now + len(received) < WINDOW * PIECE:
                await asyncio.sleep(0.01)
        assert len(peers.seen) == WINDOW
        async for chunk in chunks:
            received += chunk
        assert bytes(received) == BLOB
    finally:
        await fetcher.close()
    assert WINDOW * PIECE - MIB <= gauge.peak <= WINDOW * PIECE + MIB
    assert gauge.now == 0


async def test_a_blob_of_one_piece_is_one_request(peers: Peers) -> None:
    small = BLOB[: PIECE - 5]
    provider = await peers.add(serving(small))
    cluster = MemoryCluster()
    digest = parse_digest("sha256:" + hashlib.sha256(small).hexdigest())
    cluster.providers[str(digest)] = {provider.node_id: provider}
    fetcher = PeerFetcher(
        cluster.router(b"\xff" * 20, "127.0.0.1:9"),
        RequestSigner(KEY),
        Metrics(),
        ranges=WINDOW,
        range_size=PIECE,
    )
    await fetcher.start()
    try:
        blob = await fetcher.blob(digest, f"/v2/app/blobs/{digest}", None)
        assert blob is not None and blob.chunks is not None
        assert b"".join([chunk async for chunk in blob.chunks]) == small
    finally:
        await fetcher.close()
    assert peers.seen == [(0, f"bytes=0-{PIECE - 1}")]
