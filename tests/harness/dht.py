"""In-process DHT nodes on loopback for the routing tests: one key, stable ids, a cluster."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import umsgpack

from mirror.clusterkey import ClusterKey
from mirror.metrics import Metrics
from mirror.routing.auth import DatagramSealer
from mirror.routing.dht import DhtNode
from mirror.routing.keys import stable_node_id
from mirror.routing.router import Provider
from mirror.routing.wire import REQUEST, RESPONSE, decode

KEY = ClusterKey(b"test cluster key, 32 bytes long!")
SEALER = DatagramSealer(KEY.purpose("dht"))


def http_address(index: int) -> str:
    """A distinct advertised address per node (never dialled: the DHT only stores it)."""
    return f"10.0.{index // 250}.{index % 250 + 1}:5000"


def make_node(index: int, **options: Any) -> DhtNode:
    address = http_address(index)
    options.setdefault("node_id", stable_node_id(address))
    options.setdefault("metrics", Metrics())
    return DhtNode(http_address=address, cluster_key=KEY, **options)


@asynccontextmanager
async def cluster(size: int, **options: Any) -> AsyncIterator[list[DhtNode]]:
    """`size` nodes on 127.0.0.1, each bootstrapped (in turn) from the first three."""
    nodes = [make_node(index, **options) for index in range(size)]
    try:
        for node in nodes:
            await node.listen("127.0.0.1", 0)
        seeds = [node.router_address for node in nodes[:3]]
        for node in nodes:
            await node.bootstrap(seeds)
        yield nodes
    finally:
        for node in nodes:
            await node.close()


def provider(node: DhtNode) -> Provider:
    return Provider(node.node_id, node.http_address)


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)


class RawPeer:
    """A UDP socket that sends hand-made datagrams to one node and reads its replies.

    It stands for a peer that does not follow the protocol (or an outsider): the tests craft
    every byte it sends.
    """

    def __init__(self, transport: asyncio.DatagramTransport, inbox: _Inbox) -> None:
        self.transport = transport
        self.inbox = inbox

    def send(self, datagram: bytes) -> None:
        self.transport.sendto(datagram)

    def request(self, name: str, args: list[object], **seal: Any) -> bytes:
        """Send a sealed request; returns its message id."""
        msg_id = os.urandom(20)
        self.send(SEALER.seal(REQUEST + msg_id + umsgpack.packb([name, args]), **seal))
        return msg_id

    async def reply(self, timeout: float = 2.0) -> tuple[bytes, bytes, object]:
        """Next reply as (raw datagram, msg id, decoded body).

        Requests from the node are skipped: fake contacts announced from this socket get
        pinged when their bucket fills up.
        """
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.inbox.queue.get()
                payload, _ = SEALER.open(raw)
                if payload[:1] == RESPONSE:
                    return raw, payload[1:21], decode(payload[21:])

    async def next_request(self, timeout: float = 2.0) -> tuple[bytes, str, list[object]]:
        """Next request the node sent this socket, as (msg id, name, args); replies skipped."""
        async with asyncio.timeout(timeout):
            while True:
                payload, _ = SEALER.open(await self.inbox.queue.get())
                if payload[:1] == REQUEST:
                    name, args = decode(payload[21:])
                    return payload[1:21], name, args

    def answer(self, msg_id: bytes, body: object) -> None:
        """Reply to the node's request `msg_id` with `body`."""
        self.send(SEALER.seal(RESPONSE + msg_id + umsgpack.packb(body)))

    async def call_with_size(self, name: str, args: list[object]) -> tuple[object, int]:
        """The reply's body and the size of its datagram."""
        msg_id = self.request(name, args)
        while True:
            raw, reply_id, body = await self.reply()
            if reply_id == msg_id:
                return body, len(raw)

    async def call(self, name: str, args: list[object]) -> object:
        return (await self.call_with_size(name, args))[0]

    async def barrier(self, node: DhtNode) -> None:
        """Return once `node` processed everything sent before (a ping that adds no contact)."""
        assert await self.call("ping", [node.node_id]) == node.node_id


async def raw_peer(node: DhtNode) -> RawPeer:
    loop = asyncio.get_running_loop()
    transport, inbox = await loop.create_datagram_endpoint(
        _Inbox, local_addr=("127.0.0.1", 0), remote_addr=node.router_address
    )
    return RawPeer(transport, inbox)
