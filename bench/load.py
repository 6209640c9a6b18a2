"""Many clients at once: a cache-store mirror node against nginx serving the same blob files.

The question is whether a node stays fast and its memory flat when a whole cluster's worth of
runtimes pull from it at the same moment: by default 300 concurrent GETs of 16 MiB blobs (the
`get` phase), then 1,000 HEADs, 300 at a time (`head`), then both batches together (`mixed`:
HEAD latency while blobs stream). The same requests go to nginx serving the very files the
node's cache holds, in the same run, rounds alternating which server goes first, so the ratios
mirror/nginx compare like with like.

Both servers run on free loopback ports: the node as `python -m mirror run --store cache`, nginx
with its own temporary config (`worker_processes 1`, like the node's one event loop; `sendfile
on`, `tcp_nopush on`, as `blob_throughput.py` configures it; its default listen backlog, 511).
The client is `curl --parallel` (a C client costs the shared cores far less than a Python one
would), one process per client address: each batch is spread over `--clients` loopback
addresses (127.0.0.101... for GETs, 127.0.0.151... for HEADs), as pulls from many nodes would
be, which also keeps every address under a per-client connection cap. Every GET must answer 200
with the whole blob, every HEAD 200; failures are counted and make the exit status 1.

Memory: the node's resident set is sampled from /proc every 20 ms while it serves, its VmRSS is
printed after every round (flat means it does not grow with rounds), and its VmHWM (peak since
start) is read at the end. `drops` counts connections the kernel dropped because a server's
accept queue was full (TcpExt ListenOverflows during its phases): each costs its request a
SYN retransmission, about one second.

Run from the repository root: `.venv/bin/python bench/load.py` (see --help).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from common import (
    BENCH_REPOSITORY,
    MIB,
    READY_TIMEOUT,
    Blob,
    MemorySampler,
    OtherLoad,
    ParallelCurl,
    Server,
    Transfer,
    add_tool_arguments,
    congestion_control,
    cpu_seconds,
    listen_overflows,
    make_blob,
    memory_status,
    nginx_version,
    percentile,
    require_tools,
    run_benchmark,
    start_mirror_server,
    start_nginx,
    wait_for,
    workspace,
)

PHASES = ("get", "head", "mixed")


@dataclass(frozen=True, slots=True)
class Batch:
    """One kind of request within a phase: how many, how fast, how long each took."""

    requests: int
    failures: int
    wall: float
    latencies: list[float]
    ttfbs: list[float]

    @property
    def per_second(self) -> float:
        return self.requests / self.wall

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 0.5)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 0.99)


@dataclass(frozen=True, slots=True)
class Phase:
    """What one server did in one phase of one round."""

    gets: Batch | None
    heads: Batch | None
    peak_rss: float
    cpu: float
    # Connections the kernel dropped because the server's accept queue was full.
    overflows: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Concurrent GETs and HEADs: a mirror node against nginx on the same files."
    )
    parser.add_argument("--size-mib", type=int, default=16, help="blob size (default: 16)")
    parser.add_argument(
        "--blobs", type=int, default=8, help="distinct blobs the requests cycle over (default: 8)"
    )
    parser.add_argument("--gets", type=int, default=300, help="blob GETs per phase (default: 300)")
    parser.add_argument("--heads", type=int, default=1000, help="HEADs per phase (default: 1000)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=300,
        help="requests in flight per batch of GETs or of HEADs (default: 300)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=4,
        help="client addresses each batch is spread over, one curl each: 127.0.0.101... for"
        " GETs, 127.0.0.151... for HEADs (default: 4)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (default: 3)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="unmeasured GET batches per server (default: 1)"
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help="comma-separated subset of get,head,mixed (default: all three)",
    )
    parser.add_argument("--nginx", default="nginx", help="nginx binary (default: nginx on PATH)")
    parser.add_argument(
        "--nginx-workers", type=int, default=1, help="nginx worker_processes (default: 1)"
    )
    parser.add_argument(
        "--nginx-extra",
        default="",
        metavar="DIRECTIVES",
        help="extra directives for nginx's blob location, e.g. 'tcp_nopush off;'",
    )
    add_tool_arguments(parser, python_runs="the mirror node")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.blobs < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--size-mib, --blobs and --rounds must be at least 1, --warmup at least 0")
    if args.gets < 1 or args.heads < 1:
        parser.error("--gets and --heads must be at least 1")
    if not 1 <= args.clients <= 40:
        parser.error("--clients must be between 1 and 40")
    if not args.clients <= args.concurrency <= 300 * args.clients:
        parser.error("--concurrency must be between --clients and 300 per client")
    args.phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    if not args.phases or set(args.phases) - set(PHASES):
        parser.error("--phases takes get, head and mixed")
    return args


def blobs_location(blob_dir: Path, extra: str) -> str:
    """Any `/v2/bench/blobs/sha256:<hex>` from the directory the node's cache keeps blobs in."""
    pattern = f"^/v2/{BENCH_REPOSITORY}/blobs/sha256:([0-9a-f]{{64}})$"
    return f"""location ~ "{pattern}" {{
            alias {blob_dir}/$1;
            {extra}
        }}"""


def batch(transfers: list[Transfer], wall: float, expected_size: int | None) -> Batch:
    """Sum up one curl run; a transfer fails unless it is a 200 of the right size."""
    failures = sum(
        1
        for t in transfers
        if t.exit_code != 0
        or t.status != 200
        or (expected_size is not None and t.size != expected_size)
    )
    return Batch(
        requests=len(transfers),
        failures=failures,
        wall=wall,
        latencies=[t.total for t in transfers],
        ttfbs=[t.ttfb for t in transfers],
    )


def clients(
    args: argparse.Namespace, server: Server, blobs: list[Blob], work: Path, *, head: bool
) -> list[ParallelCurl]:
    """One batch (all GETs or all HEADs), spread over `--clients` curl runs from distinct
    loopback addresses, as many runtimes pulling at once would come from distinct nodes."""
    count = args.heads if head else args.gets
    urls = [server.blob_url(blobs[i % len(blobs)]) for i in range(count)]
    runs = []
    for index in range(args.clients):
        mine = urls[index :: args.clients]
        if not mine:
            continue
        # This client's share of the concurrency, so the batch has `--concurrency` in flight.
        share = args.concurrency // args.clients + (index < args.concurrency % args.clients)
        kind = "head" if head else "get"
        runs.append(
            ParallelCurl(
                args.curl,
                mine,
                work / f"{kind}{index}.curl",
                head=head,
                concurrency=max(1, min(share, 300)),
                source=f"127.0.0.{(151 if head else 101) + index}",
            )
        )
    return runs


def collect(runs: list[ParallelCurl], expected_size: int | None) -> Batch:
    """The runs of one batch together: all their transfers, the longest wall time."""
    transfers: list[Transfer] = []
    wall = 0.0
    for run in runs:
        done, seconds = run.wait()
        transfers += done
        wall = max(wall, seconds)
    return batch(transfers, wall, expected_size)


def run_phase(
    args: argparse.Namespace, server: Server, blobs: list[Blob], phase: str, work: Path
) -> Phase:
    gets = heads = None
    pids = server.pids()
    cpu_before = cpu_seconds(pids)
    overflows_before = listen_overflows()
    with MemorySampler(pids) as memory:
        get_runs = clients(args, server, blobs, work, head=False) if phase != "head" else []
        head_runs = clients(args, server, blobs, work, head=True) if phase != "get" else []
        for run in get_runs + head_runs:
            run.start()
        if get_runs:
            gets = collect(get_runs, expected_size=blobs[0].size)
        if head_runs:
            heads = collect(head_runs, expected_size=None)
    server.child.ensure_running(f" during the {phase} phase")
    return Phase(
        gets,
        heads,
        memory.peak_mib,
        cpu_seconds(pids) - cpu_before,
        listen_overflows() - overflows_before,
    )


def median_of(phases: list[Phase], pick: str, stat: str) -> float:
    batches = [getattr(p, pick) for p in phases]
    return float(statistics.median(getattr(b, stat) for b in batches if b is not None))


def report(
    args: argparse.Namespace,
    results: dict[str, dict[str, list[Phase]]],
    memory: dict[str, float],
    nginx_peak: float,
    foreign: float,
) -> int:
    print()
    print(
        f"medians over {args.rounds} rounds; latency = curl's time_total per request, from the"
        " start of its transfer; ratio = mirror/nginx (throughput: above 1 is the mirror faster;"
        " latency: below 1 is the mirror faster); cpu s = server CPU seconds per phase; drops ="
        " connections dropped on a full accept queue over all rounds (the phase's, both batches)"
    )
    header = (
        f"{'phase':<6} {'requests':<9} {'server':<7} {'req/s':>8} {'MiB/s':>8}"
        f" {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'ttfb p99':>9} {'cpu s':>6} {'fail':>5}"
        f" {'drops':>6}"
    )
    print(header)
    failures = 0
    ratios: dict[str, tuple[float, float, float]] = {}
    for phase in args.phases:
        for pick in ("gets", "heads"):
            if getattr(results["mirror"][phase][0], pick) is None:
                continue
            row: dict[str, tuple[float, float, float]] = {}
            for name in ("mirror", "nginx"):
                phases = results[name][phase]
                rps = median_of(phases, pick, "per_second")
                p50 = median_of(phases, pick, "p50")
                p99 = median_of(phases, pick, "p99")
                worst = max(max(getattr(p, pick).latencies) for p in phases)
                ttfb99 = statistics.median(percentile(getattr(p, pick).ttfbs, 0.99) for p in phases)
                fails = sum(getattr(p, pick).failures for p in phases)
                drops = sum(p.overflows for p in phases)
                failures += fails
                mib = rps * args.size_mib if pick == "gets" else 0.0
                cpu = statistics.median(p.cpu for p in phases)
                row[name] = (rps, p50, p99)
                print(
                    f"{phase:<6} {pick[:-1].upper():<9} {name:<7} {rps:8.1f} {mib:8.0f}"
                    f" {p50 * 1000:9.1f} {p99 * 1000:9.1f} {worst * 1000:9.1f}"
                    f" {ttfb99 * 1000:9.1f} {cpu:6.2f} {fails:5d} {drops:6d}"
                )
            m, n = row["mirror"], row["nginx"]
            key = f"{phase} {pick[:-1].upper()}"
            ratios[key] = (m[0] / n[0], m[1] / n[1], m[2] / n[2])
            print(
                f"{'':<6} {'':<9} {'ratio':<7} {ratios[key][0]:8.2f} {'':>8}"
                f" {ratios[key][1]:9.2f} {ratios[key][2]:9.2f}"
            )
    print(OtherLoad.describe(foreign))
    print(
        f"mirror memory: VmRSS {memory['ready_rss']:.1f} MiB when ready, sampled peak"
        f" {memory['peak']:.1f} MiB while serving, VmHWM {memory['hwm']:.1f} MiB at the end"
        f" ({memory['ready_hwm']:.1f} when ready), VmRSS {memory['end_rss']:.1f} MiB at the end;"
        f" nginx (master + workers) sampled peak {nginx_peak:.1f} MiB"
    )
    parts = [
        f"{key}: req/s x{r[0]:.2f}, p50 x{r[1]:.2f}, p99 x{r[2]:.2f}" for key, r in ratios.items()
    ]
    print(
        "SUMMARY (mirror/nginx): "
        + "; ".join(parts)
        + f"; mirror peak RSS {memory['peak']:.1f} MiB (idle {memory['ready_rss']:.1f})"
        + (f"; {failures} FAILED requests" if failures else "; every request succeeded")
    )
    return 1 if failures else 0


def run(args: argparse.Namespace) -> int:
    require_tools(args.nginx, args.curl)
    version = nginx_version(args.nginx)
    size = args.size_mib * MIB
    with workspace(args.tmp_dir, "mirror-load-") as work, contextlib.ExitStack() as processes:
        cache_dir = work / "cache"
        print(f"writing {args.blobs} random blobs of {args.size_mib} MiB under {work} ...")
        blobs = [make_blob(cache_dir, size) for _ in range(args.blobs)]
        mirror = start_mirror_server(args.python, work, cache_dir)
        processes.callback(mirror.child.stop)
        nginx = start_nginx(
            args.nginx,
            work,
            blobs_location(blobs[0].path.parent, args.nginx_extra),
            workers=args.nginx_workers,
            connections=4096,
        )
        processes.callback(nginx.child.stop)
        servers = (mirror, nginx)
        for server in servers:
            wait_for(
                server.child,
                server.base_url + "/readyz",
                READY_TIMEOUT,
                f"{server.name} was not ready after {READY_TIMEOUT:.0f}s",
                when=" before it was ready",
            )
        ready = memory_status(mirror.child.proc.pid)
        print(
            f"mirror {mirror.base_url}, nginx {version} {nginx.base_url} (worker_processes"
            f" {args.nginx_workers} {args.nginx_extra}); {args.gets} GETs of {args.size_mib} MiB"
            f" and {args.heads} HEADs per phase, {args.concurrency} in flight per batch, over"
            f" {args.blobs} blobs; client: curl --parallel from {args.clients} loopback addresses"
            " per batch; tcp congestion control"
            f" {congestion_control()}",
            flush=True,
        )
        for server in servers:
            for _ in range(args.warmup):
                warm = run_phase(args, server, blobs, "get", work)
                assert warm.gets is not None
                if warm.gets.failures:
                    print(f"warning: {warm.gets.failures} failed GETs warming up {server.name}")

        results: dict[str, dict[str, list[Phase]]] = {
            s.name: {phase: [] for phase in args.phases} for s in servers
        }
        nginx_peak = 0.0
        mirror_peak = 0.0
        other_load = OtherLoad(lambda: [pid for server in servers for pid in server.pids()])
        for number in range(args.rounds):
            order = servers if number % 2 == 0 else servers[::-1]
            line = []
            for phase in args.phases:
                for server in order:
                    done = run_phase(args, server, blobs, phase, work)
                    results[server.name][phase].append(done)
                    if server is nginx:
                        nginx_peak = max(nginx_peak, done.peak_rss)
                    else:
                        mirror_peak = max(mirror_peak, done.peak_rss)
                    for pick in (done.gets, done.heads):
                        if pick is not None:
                            kind = "GET" if pick is done.gets else "HEAD"
                            line.append(
                                f"{phase}/{kind} {server.name} {pick.per_second:.0f}/s"
                                f" p99 {pick.p99 * 1000:.0f}ms"
                                + (f" FAIL {pick.failures}" if pick.failures else "")
                            )
            rss = memory_status(mirror.child.proc.pid)["VmRSS"]
            print(
                f"round {number + 1}: " + ", ".join(line) + f"; mirror VmRSS after {rss:.1f} MiB",
                flush=True,
            )
        foreign = other_load.share()
        end = memory_status(mirror.child.proc.pid)
        memory = {
            "ready_rss": ready["VmRSS"],
            "ready_hwm": ready["VmHWM"],
            "peak": mirror_peak,
            "hwm": end["VmHWM"],
            "end_rss": end["VmRSS"],
        }
        for server in servers:
            server.child.ensure_running(" after the rounds")
    return report(args, results, memory, nginx_peak, foreign)


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
