#!/usr/bin/env python3
"""DHT benchmark: lookup latency, miss latency and advertise throughput of the provider DHT.

Starts `--nodes` DHT nodes (default 64) in this one process, on 127.0.0.1 with free UDP ports,
all with the same cluster key and the production defaults (k=20, alpha=3, rpc_timeout 250 ms,
resolve_timeout 20 ms, sealed datagrams). Each node bootstraps from the first three, in turn.

Phases, each printed as it ends:

1. advertise: every key is announced by `--providers-per-key` random nodes, `--concurrency`
   provides in flight at once (default 8); then `--serial` provides one at a time, for the
   latency of a single provide. The rate is bound by the one core doing every node's work: more
   in flight adds no throughput here, only queueing (at 32, some RPCs then miss their 250 ms
   timeout because the loop is saturated, which a real cluster of separate processes would not
   see). The CPU time per operation is printed to tell cost from waiting.
2. lookup: `--lookups` find_providers(key) (want=2, the default) of random provided keys, one at
   a time, each from a random node that does not provide that key. p50/p99/max, and how many
   found at least one / `want` providers within the deadline.
3. miss: `--misses` lookups of keys nobody provides: these walk until the k closest nodes have
   answered, or the deadline.
4. dead: `--dead` nodes close without a word (they stay in everyone's routing table), then the
   lookup and miss phases run again: lookups must still find, misses end at the deadline.

All nodes share one event loop and one CPU core, so every RPC's work on both ends lands on the
same core: the figures are what a node sees when the whole cluster is this one process, an upper
bound for one node of a real cluster. Run it on an idle machine: `.venv/bin/python
bench/dht_bench.py [--nodes 64] [--keys 250] [--lookups 500] [--misses 200] [--dead 8]
[--concurrency 8]`.
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
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mirror.clusterkey import ClusterKey
from mirror.routing.dht import DhtNode
from mirror.routing.keys import stable_node_id


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def describe(samples: Sequence[float]) -> str:
    ms = [sample * 1000 for sample in samples]
    return (
        f"p50 {percentile(ms, 0.5):6.2f} ms  p99 {percentile(ms, 0.99):6.2f} ms  "
        f"max {max(ms):6.2f} ms  mean {statistics.fmean(ms):6.2f} ms  (n={len(ms)})"
    )


async def timed(operation: Callable[[], Awaitable[object]]) -> tuple[float, object]:
    started = time.perf_counter()
    result = await operation()
    return time.perf_counter() - started, result


def cpu_ms_each(cpu_started: float, count: int) -> str:
    """CPU time of the whole process (every node's share of the work) per operation."""
    return f"{(time.process_time() - cpu_started) * 1000 / count:.2f} ms CPU each"


async def start_cluster(args: argparse.Namespace, key: ClusterKey) -> list[DhtNode]:
    nodes = []
    for index in range(args.nodes):
        address = f"10.{index // 250}.{index % 250}.1:5000"
        node = DhtNode(
            node_id=stable_node_id(address),
            http_address=address,
            cluster_key=key,
            resolve_timeout=args.resolve_timeout,
        )
        await node.listen("127.0.0.1", 0)
        nodes.append(node)
    seeds = [node.router_address for node in nodes[:3]]
    started = time.perf_counter()
    for node in nodes:
        await node.bootstrap(seeds)
    contacts = [node.contact_count() for node in nodes]
    print(
        f"bootstrap: {args.nodes} nodes in {time.perf_counter() - started:.2f} s, contacts per "
        f"node min {min(contacts)} median {statistics.median(contacts):.0f} max {max(contacts)}"
    )
    return nodes


async def advertise(
    args: argparse.Namespace, nodes: list[DhtNode], rng: random.Random
) -> tuple[dict[str, set[int]], float]:
    holders: dict[str, set[int]] = {}
    jobs = []
    for _ in range(args.keys):
        text = f"sha256:{rng.getrandbits(256):064x}"
        holders[text] = set(rng.sample(range(len(nodes)), args.providers_per_key))
        jobs.extend((text, holder) for holder in holders[text])
    limit = asyncio.Semaphore(args.concurrency)

    async def one(text: str, holder: int) -> bool:
        async with limit:
            return await nodes[holder].provide(text)

    cpu_started = time.process_time()
    elapsed, results = await timed(
        lambda: asyncio.gather(*(one(text, holder) for text, holder in jobs))
    )
    assert isinstance(results, list)
    rate = len(jobs) / elapsed
    print(
        f"advertise: {len(jobs)} provides, {args.concurrency} in flight: {elapsed:.2f} s = "
        f"{rate:.0f} provides/s, {cpu_ms_each(cpu_started, len(jobs))}; "
        f"stored {sum(results)}/{len(jobs)}"
    )
    serial = []
    cpu_started = time.process_time()
    for _ in range(args.serial):
        text = f"sha256:{rng.getrandbits(256):064x}"
        holder = rng.randrange(len(nodes))
        holders[text] = {holder}
        seconds, _ = await timed(lambda n=nodes[holder], t=text: n.provide(t))
        serial.append(seconds)
    print(
        f"advertise: {args.serial} provides one at a time: {describe(serial)} = "
        f"{len(serial) / sum(serial):.0f} provides/s, {cpu_ms_each(cpu_started, args.serial)}"
    )
    return holders, rate


async def lookups(
    args: argparse.Namespace,
    nodes: list[DhtNode],
    holders: dict[str, set[int]],
    alive: list[int],
    rng: random.Random,
    label: str,
) -> list[float]:
    texts = [text for text, owners in holders.items() if len(owners) == args.providers_per_key]
    durations, found_any, found_want = [], 0, 0
    cpu_started = time.process_time()
    for _ in range(args.lookups):
        text = rng.choice(texts)
        asker = rng.choice([index for index in alive if index not in holders[text]])
        seconds, result = await timed(lambda n=nodes[asker], t=text: n.find_providers(t))
        assert isinstance(result, list)
        durations.append(seconds)
        found_any += bool(result)
        found_want += len(result) >= 2
    print(
        f"{label}: {describe(durations)}, {cpu_ms_each(cpu_started, args.lookups)}; "
        f"found >=1: {found_any}/{args.lookups}, >=2 (want): {found_want}/{args.lookups}"
    )
    return durations


async def misses(
    args: argparse.Namespace, nodes: list[DhtNode], alive: list[int], rng: random.Random, label: str
) -> list[float]:
    durations = []
    cpu_started = time.process_time()
    for attempt in range(args.misses):
        asker = nodes[rng.choice(alive)]
        seconds, result = await timed(lambda n=asker, a=attempt: n.find_providers(f"missing-{a}"))
        assert result == []
        durations.append(seconds)
    print(f"{label}: {describe(durations)}, {cpu_ms_each(cpu_started, args.misses)}")
    return durations


async def main(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}; {args.nodes} nodes in one process, resolve_timeout "
        f"{args.resolve_timeout * 1000:.0f} ms"
    )
    nodes = await start_cluster(args, ClusterKey(os.urandom(32)))
    try:
        holders, rate = await advertise(args, nodes, rng)
        everyone = list(range(len(nodes)))
        found = await lookups(args, nodes, holders, everyone, rng, "lookup")
        missed = await misses(args, nodes, everyone, rng, "miss")
        summary = (
            f"SUMMARY: nodes={args.nodes} lookup_p50_ms={percentile(found, 0.5) * 1000:.2f} "
            f"lookup_p99_ms={percentile(found, 0.99) * 1000:.2f} "
            f"miss_p50_ms={percentile(missed, 0.5) * 1000:.2f} "
            f"miss_p99_ms={percentile(missed, 0.99) * 1000:.2f} provides_per_s={rate:.0f}"
        )
        if args.dead:
            holding = {index for owners in holders.values() for index in owners}
            candidates = [index for index in everyone if index >= 3]
            dead = set(rng.sample(candidates, args.dead))
            for index in dead:
                await nodes[index].close()
            alive = [index for index in everyone if index not in dead]
            print(f"dead: closed {args.dead} nodes ({len(dead & holding)} of them providers)")
            live_holders = {text: owners - dead for text, owners in holders.items()}
            live_holders = {
                text: owners
                for text, owners in live_holders.items()
                if len(owners) == args.providers_per_key
            }
            found_dead = await lookups(args, nodes, live_holders, alive, rng, "lookup, dead")
            missed_dead = await misses(args, nodes, alive, rng, "miss, dead")
            summary += (
                f" dead={args.dead} dead_lookup_p99_ms={percentile(found_dead, 0.99) * 1000:.2f}"
                f" dead_miss_p99_ms={percentile(missed_dead, 0.99) * 1000:.2f}"
            )
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
        print(summary)
    finally:
        for node in nodes:
            await node.close()
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--keys", type=int, default=250, help="keys announced (default 250)")
    parser.add_argument("--providers-per-key", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8, help="provides in flight")
    parser.add_argument("--serial", type=int, default=50, help="provides timed one at a time")
    parser.add_argument("--lookups", type=int, default=500)
    parser.add_argument("--misses", type=int, default=200)
    parser.add_argument("--dead", type=int, default=8, help="nodes closed for the last phase")
    parser.add_argument("--resolve-timeout", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.dead >= args.nodes - 3 or args.providers_per_key > args.nodes - 1:
        parser.error("too few nodes for --dead / --providers-per-key")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args(sys.argv[1:]))))
