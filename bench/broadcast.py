#!/usr/bin/env python3
"""Broadcast benchmark: time until every node has a message, and datagrams per message.

For each cluster size in `--nodes` (default 64 and 128) and each relay fanout in `--fanouts`
(default `all`: a node passes a message on to every contact; a number N: to N random ones),
starts that many DHT nodes in this one process on 127.0.0.1 (production defaults: k=20,
rpc_timeout 250 ms, sealed datagrams), each bootstrapped from the first three in turn, and
subscribes every node to one topic. Then `--broadcasts` times, one after the other: a random
node broadcasts a `--size`-byte message; the time from the call until the last other node's
subscriber ran is recorded, or the nodes it never reached (waiting at most `--wait` seconds);
once every node's sends are answered or timed out, the datagrams of that broadcast are counted
(every sealed datagram sent: requests and their replies). The same again after closing
`--dead` nodes (by default 6 per 64) without a word: they stay in every routing table.

Printed per case: p50 and max time-to-all, broadcasts that missed a live node (and how many
nodes in all), requests and datagrams per broadcast, copies each node received, the hops the
first copy to reach each node had made (median and max over every node), and CPU time
per broadcast (every node's share: the whole cluster runs on one core here, so time-to-all
includes queueing behind the other 63 or 127 nodes' work).

Run on an idle machine: `.venv/bin/python bench/broadcast.py [--nodes 64,128]
[--fanouts all,8] [--broadcasts 50] [--dead-per-64 6] [--size 300]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mirror.clusterkey import ClusterKey
from mirror.routing.auth import SealedTransport
from mirror.routing.broadcast import Flooder
from mirror.routing.dht import DhtNode
from mirror.routing.keys import stable_node_id

TOPIC = "bench"

_datagrams = 0
_sendto = SealedTransport.sendto


def _counting_sendto(self: SealedTransport, data: bytes, addr: Any = None) -> None:
    global _datagrams
    _datagrams += 1
    _sendto(self, data, addr)


SealedTransport.sendto = _counting_sendto  # type: ignore[method-assign]

# Hops of each copy a node saw first (the path its message took), for the hop limit.
_first_hops: list[int] = []
_received = Flooder.received


def _recording_received(self: Flooder, *args: Any) -> bool:
    new = _received(self, *args)
    if new:
        _first_hops.append(args[4])
    return new


Flooder.received = _recording_received  # type: ignore[method-assign]


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


class Inboxes:
    """Per node, whether the current broadcast's message has arrived (and how often)."""

    def __init__(self, nodes: list[DhtNode]) -> None:
        self.count = [0] * len(nodes)
        self.at = [0.0] * len(nodes)
        self.waiting: dict[int, asyncio.Future[None]] = {}
        self.message = b""
        for index, node in enumerate(nodes):
            node.subscribe(TOPIC, lambda message, i=index: self.delivered(i, message))

    def expect(self, message: bytes, receivers: list[int]) -> None:
        loop = asyncio.get_running_loop()
        self.message = message
        self.waiting = {index: loop.create_future() for index in receivers}
        self.count = [0] * len(self.count)

    def delivered(self, index: int, message: bytes) -> None:
        if message != self.message:
            return  # a late copy of an earlier broadcast (cannot happen: settled in between)
        self.count[index] += 1
        self.at[index] = time.perf_counter()
        future = self.waiting.get(index)
        if future is not None and not future.done():
            future.set_result(None)


async def start_cluster(size: int, fanout: int | None, key: ClusterKey) -> list[DhtNode]:
    nodes = []
    for index in range(size):
        address = f"10.{index // 250}.{index % 250}.1:5000"
        node = DhtNode(
            node_id=stable_node_id(address),
            http_address=address,
            cluster_key=key,
            broadcast_fanout=fanout,
        )
        await node.listen("127.0.0.1", 0)
        nodes.append(node)
    seeds = [node.router_address for node in nodes[:3]]
    for node in nodes:
        await node.bootstrap(seeds)
    return nodes


async def run_case(
    args: argparse.Namespace, size: int, fanout: int | None, rng: random.Random
) -> list[str]:
    nodes = await start_cluster(size, fanout, ClusterKey(os.urandom(32)))
    rows = []
    try:
        contacts = [node.contact_count() for node in nodes]
        print(
            f"{size} nodes, fanout {fanout or 'all'}: contacts per node min {min(contacts)} "
            f"median {statistics.median(contacts):.0f} max {max(contacts)}"
        )
        inboxes = Inboxes(nodes)
        alive = list(range(size))
        rows.append(await measure(args, nodes, alive, inboxes, rng, size, fanout, 0))
        dead = rng.sample(range(3, size), args.dead_per_64 * size // 64)
        for index in dead:
            await nodes[index].close()
        alive = [index for index in alive if index not in dead]
        rows.append(await measure(args, nodes, alive, inboxes, rng, size, fanout, len(dead)))
    finally:
        for node in nodes:
            await node.close()
    return rows


async def measure(
    args: argparse.Namespace,
    nodes: list[DhtNode],
    alive: list[int],
    inboxes: Inboxes,
    rng: random.Random,
    size: int,
    fanout: int | None,
    dead: int,
) -> str:
    global _datagrams
    times, requests, datagrams, missed_nodes, missed_broadcasts = [], [], [], 0, 0
    _first_hops.clear()
    cpu_started = time.process_time()
    for number in range(args.broadcasts):
        origin = rng.choice(alive)
        receivers = [index for index in alive if index != origin]
        message = number.to_bytes(4, "big") + os.urandom(args.size - 4)
        inboxes.expect(message, receivers)
        sent_before = sum(node._flooder.sent for node in nodes)
        _datagrams = 0
        started = time.perf_counter()
        await nodes[origin].broadcast(TOPIC, message)
        _, late = await asyncio.wait(inboxes.waiting.values(), timeout=args.wait)
        if late:
            missed_broadcasts += 1
            missed_nodes += len(late)
        else:
            times.append(max(inboxes.at[index] for index in receivers) - started)
        for index in alive:
            await nodes[index]._flooder.settle()
        assert all(inboxes.count[index] <= 1 for index in receivers), "delivered twice"
        requests.append(sum(node._flooder.sent for node in nodes) - sent_before)
        datagrams.append(_datagrams)
    cpu_ms = (time.process_time() - cpu_started) * 1000 / args.broadcasts
    ms = [seconds * 1000 for seconds in times] or [float("nan")]
    copies = statistics.fmean(requests) / len(alive)
    row = (
        f"| {size} | {fanout or 'all'} | {dead} | {percentile(ms, 0.5):.1f} | {max(ms):.1f} | "
        f"{missed_broadcasts}/{args.broadcasts} ({missed_nodes} nodes) | "
        f"{statistics.fmean(requests):.0f} | {statistics.fmean(datagrams):.0f} | "
        f"{copies:.1f} | {statistics.median(_first_hops):.0f} / {max(_first_hops)} | {cpu_ms:.0f} |"
    )
    print(row, flush=True)
    return row


async def main(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}; {args.broadcasts} broadcasts of {args.size} bytes per case"
    )
    header = (
        "| nodes | fanout | dead | time-to-all p50 ms | max ms | missed a node | "
        "requests / broadcast | datagrams / broadcast | copies / node | hops p50 / max | "
        "CPU ms / broadcast |\n"
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    rows = []
    for size in args.nodes:
        for fanout in args.fanouts:
            rows += await run_case(args, size, fanout, rng)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print(header)
    print("\n".join(rows))
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="64,128", help="cluster sizes (default 64,128)")
    parser.add_argument("--fanouts", default="all", help="relay fanouts: all or numbers")
    parser.add_argument("--broadcasts", type=int, default=50, help="per case (default 50)")
    parser.add_argument("--dead-per-64", type=int, default=6, help="nodes closed per 64")
    parser.add_argument("--size", type=int, default=300, help="message bytes (default 300)")
    parser.add_argument("--wait", type=float, default=5.0, help="seconds before a miss")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    args.nodes = [int(size) for size in args.nodes.split(",")]
    args.fanouts = [None if f == "all" else int(f) for f in args.fanouts.split(",")]
    if min(args.nodes) < 8 or not 4 <= args.size <= 1024:
        parser.error("at least 8 nodes; --size from 4 to 1024")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args(sys.argv[1:]))))
