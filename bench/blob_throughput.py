#!/usr/bin/env python3
"""Blob throughput: the mirror node against nginx serving the same file with sendfile.

One large random blob is written into a temporary node cache at blobs/sha256/<hex>. A mirror node
(`python -m mirror run --store cache`) and an nginx (its own temporary config: one worker,
sendfile on, tcp_nopush on, access_log off) both serve it at /v2/bench/blobs/sha256:<hex> on
free loopback ports. The same client, curl writing to /dev/null, fetches it from each server in
turn for several rounds (the order flips every round); the sizes are verified, the median MiB/s
of each server and the ratio mirror/nginx are printed. One extra round fetches a byte range with
an aiohttp client from both, to show that ranges (sendfile from an offset) stream fast too.

Alongside the speeds it reports the CPU seconds per GiB that the server and curl used (on
loopback the kernel's TCP work lands on whichever side happens to run it, so read the two
together) and how much of the machine other processes used during the rounds: loopback figures
swing widely when anything else runs.

nginx runs with worker_processes 1: the mirror is one process with one event loop, and a single
download is served by one worker anyway, so one worker is the like-for-like setting.

Run it with the project's venv: `.venv/bin/python bench/blob_throughput.py [--size-mib N]
[--rounds N] [--memory] [--nginx-extra 'tcp_nopush off;']`. Everything it starts is stopped
and its temporary directory deleted on exit, Ctrl-C and errors included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass

import aiohttp
from common import (
    BENCH_REPOSITORY,
    GIB,
    MIB,
    READY_TIMEOUT,
    Blob,
    OtherLoad,
    Server,
    add_run_arguments,
    add_target_arguments,
    add_tool_arguments,
    children_cpu_seconds,
    congestion_control,
    cpu_seconds,
    curl_fetch,
    make_blob,
    memory_status,
    nginx_version,
    parse_run_arguments,
    require_tools,
    run_benchmark,
    start_mirror_server,
    start_nginx,
    wait_for,
    workspace,
)


@dataclass(frozen=True, slots=True)
class Sample:
    """One download: its speed, and CPU seconds per GiB used by the server and by curl."""

    mib_per_s: float
    server_cpu: float
    client_cpu: float


@dataclass(frozen=True, slots=True)
class RangeResult:
    offset: int
    length: int
    mib_per_s: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Blob throughput of the mirror node against nginx (sendfile) on loopback."
    )
    add_run_arguments(parser, rounds=5, warmup_per="server")
    parser.add_argument(
        "--memory", action="store_true", help="report the mirror process's peak RSS (VmHWM)"
    )
    parser.add_argument("--no-range", action="store_true", help="skip the aiohttp range round")
    add_target_arguments(parser, ratio="mirror/nginx", target=0.9)
    parser.add_argument("--nginx", default="nginx", help="nginx binary (default: nginx on PATH)")
    parser.add_argument(
        "--nginx-extra",
        default="",
        metavar="DIRECTIVES",
        help="extra directives for nginx's blob location, e.g. 'sendfile_max_chunk 0;'",
    )
    add_tool_arguments(parser, python_runs="the mirror node")
    args = parse_run_arguments(parser, argv)
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def blob_location(blob: Blob, extra: str) -> str:
    """The one blob, at the path the mirror serves it under, for nginx."""
    return f"""location = {blob.url_path(BENCH_REPOSITORY)} {{
            alias {blob.path};
            {extra}
        }}"""


def measure(curl: str, server: Server, blob: Blob) -> Sample:
    """One curl download with the CPU seconds per GiB it cost the server and the client."""
    pids = server.pids()
    server_before = cpu_seconds(pids)
    client_before = children_cpu_seconds()
    speed = curl_fetch(curl, server.blob_url(blob), blob.size).mib_per_s
    gibs = blob.size / GIB
    return Sample(
        mib_per_s=speed,
        server_cpu=(cpu_seconds(pids) - server_before) / gibs,
        client_cpu=(children_cpu_seconds() - client_before) / gibs,
    )


async def fetch_range(url: str, blob: Blob, offset: int, length: int) -> RangeResult:
    """GET a byte range with aiohttp, count it and check its first and last bytes."""
    probe = 4096
    with open(blob.path, "rb") as handle:
        head_expected = os.pread(handle.fileno(), probe, offset)
        tail_expected = os.pread(handle.fileno(), probe, offset + length - probe)
    end = offset + length - 1
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        started = time.perf_counter()
        async with session.get(url, headers={"Range": f"bytes={offset}-{end}"}) as response:
            if response.status != 206:
                raise RuntimeError(f"range GET {url} answered HTTP {response.status}")
            content_range = response.headers.get("Content-Range")
            if content_range != f"bytes {offset}-{end}/{blob.size}":
                raise RuntimeError(f"range GET {url}: unexpected Content-Range {content_range}")
            received = 0
            head = b""
            tail = b""
            async for chunk in response.content.iter_any():
                received += len(chunk)
                if len(head) < probe:
                    head += chunk[: probe - len(head)]
                tail = chunk[-probe:] if len(chunk) >= probe else (tail + chunk)[-probe:]
        elapsed = time.perf_counter() - started
    if received != length:
        raise RuntimeError(f"range GET {url} sent {received} bytes instead of {length}")
    if head != head_expected or tail != tail_expected:
        raise RuntimeError(f"range GET {url} sent the wrong bytes")
    return RangeResult(offset=offset, length=length, mib_per_s=length / elapsed / MIB)


def run(args: argparse.Namespace) -> int:
    require_tools(args.nginx, args.curl)
    version = nginx_version(args.nginx)
    size = args.size_mib * MIB
    with workspace(args.tmp_dir, "mirror-bench-") as work, contextlib.ExitStack() as processes:
        cache_dir = work / "cache"
        print(f"writing a {args.size_mib} MiB random blob under {work} ...", flush=True)
        blob = make_blob(cache_dir, size)
        mirror = start_mirror_server(args.python, work, cache_dir)
        processes.callback(mirror.child.stop)
        nginx = start_nginx(args.nginx, work, blob_location(blob, args.nginx_extra))
        processes.callback(nginx.child.stop)
        servers = (mirror, nginx)
        for server in servers:
            wait_for(
                server.child,
                server.ready_url,
                READY_TIMEOUT,
                f"{server.name} was not ready after {READY_TIMEOUT:.0f}s",
                when=" before it was ready",
            )
        ready_memory = memory_status(mirror.child.proc.pid) if args.memory else {}

        print(
            f"blob sha256:{blob.hex[:16]}... {args.size_mib} MiB; mirror {mirror.base_url}, "
            f"nginx {version} {nginx.base_url} (worker_processes 1 {args.nginx_extra}); "
            f"client: curl -> /dev/null; tcp congestion control {congestion_control()}",
            flush=True,
        )
        for server in servers:
            for _ in range(args.warmup):
                curl_fetch(args.curl, server.blob_url(blob), size)

        samples: dict[str, list[Sample]] = {server.name: [] for server in servers}
        other_load = OtherLoad(lambda: [pid for server in servers for pid in server.pids()])
        for number in range(args.rounds):
            order = servers if number % 2 == 0 else servers[::-1]
            for server in order:
                samples[server.name].append(measure(args.curl, server, blob))
            print(
                f"round {number + 1}: "
                + "  ".join(
                    f"{s.name} {samples[s.name][-1].mib_per_s:7.1f} MiB/s"
                    f" (cpu/GiB {samples[s.name][-1].server_cpu:.2f}s,"
                    f" curl {samples[s.name][-1].client_cpu:.2f}s)"
                    for s in servers
                ),
                flush=True,
            )

        foreign_share = other_load.share()

        ranges: dict[str, RangeResult] = {}
        if not args.no_range:
            # Half the blob from an odd offset: sendfile from a position that is not page-aligned.
            offset = size // 4 + 1
            length = size // 2
            for server in servers:
                ranges[server.name] = asyncio.run(
                    fetch_range(server.blob_url(blob), blob, offset, length)
                )

        served_memory = memory_status(mirror.child.proc.pid) if args.memory else {}
        for server in servers:
            code = server.child.proc.poll()
            if code is not None:
                raise RuntimeError(f"{server.name} exited with status {code} while measured")

    medians = {name: statistics.median(s.mib_per_s for s in runs) for name, runs in samples.items()}
    ratio = medians["mirror"] / medians["nginx"]
    met = ratio >= args.target
    print()
    print(
        f"{'server':<8} {'median MiB/s':>13} {'min':>8} {'max':>8}"
        f" {'server cpu s/GiB':>17} {'curl cpu s/GiB':>15}"
    )
    for name, runs in samples.items():
        speeds = [sample.mib_per_s for sample in runs]
        print(
            f"{name:<8} {medians[name]:13.1f} {min(speeds):8.1f} {max(speeds):8.1f}"
            f" {statistics.median(s.server_cpu for s in runs):17.2f}"
            f" {statistics.median(s.client_cpu for s in runs):15.2f}"
        )
    paired = statistics.median(
        m.mib_per_s / n.mib_per_s for m, n in zip(samples["mirror"], samples["nginx"], strict=True)
    )
    print(
        f"ratio mirror/nginx: {ratio:.3f} of the medians, {paired:.3f} median of the per-round"
        f" ratios (target >= {args.target:.2f})"
    )
    print(OtherLoad.describe(foreign_share))
    if ranges:
        sample = ranges["mirror"]
        print(
            f"range round (aiohttp client, {sample.length // MIB} MiB from offset {sample.offset}):"
            f" mirror {ranges['mirror'].mib_per_s:.1f} MiB/s,"
            f" nginx {ranges['nginx'].mib_per_s:.1f} MiB/s"
        )
    if args.memory:
        print(
            f"mirror memory: VmHWM {served_memory['VmHWM']:.1f} MiB after serving"
            f" ({ready_memory['VmHWM']:.1f} MiB when ready),"
            f" VmRSS {served_memory['VmRSS']:.1f} MiB"
        )
    print(
        f"SUMMARY: mirror {medians['mirror']:.0f} MiB/s, nginx {medians['nginx']:.0f} MiB/s, "
        f"ratio {ratio:.2f} ({'meets' if met else 'BELOW'} target {args.target:.2f}); "
        f"median of {args.rounds} x {args.size_mib} MiB over loopback"
    )
    return 1 if args.strict and not met else 0


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
