#!/usr/bin/env python3
"""Peer blob throughput and node memory: a blob through a peer against the same blob locally.

A two-node cluster runs on loopback (node A on 127.0.0.21, node B on 127.0.0.22, both
`python -m mirror run --store cache` with one cluster key and a static bootstrap of both routers,
B with `--peer-transfer` as given). Before A starts, one large random blob per round (warm-up
included) is written into its cache at blobs/sha256/<hex>, with small random blobs for the time
to first byte, a config blob, an OCI image manifest listing them all as layers, and the tag
docker.io/bench/blob:latest pointing at that manifest (the advertiser only walks tagged images).
A announces every digest in the DHT; B's cache stays empty. Every blob is fetched through B once
only: B keeps what it fetched (share) and serves a blob asked for again after a redirect itself
(redirect), so a second fetch of one blob would measure B's own cache. Once B answers a HEAD for
each blob with 200 (it found A through the DHT), the same client, curl writing to /dev/null,
fetches each round's blob, alternating (the order flips every round):

- local: GET from node A, which sends it from its cache with sendfile;
- peer: GET from node B. With `--peer-transfer share` (the default) B looks the digest up in the
  DHT, requests it from A with a signed peer request, hashes it as it arrives and passes it on.
  With `--peer-transfer redirect` B looks it up, probes A with a HEAD on a signed URL and answers
  307 to a signed URL at A, which curl follows (`-L`): A sends it with sendfile.

It prints the median MiB/s of each, the ratio peer/local (target >= 0.8), curl's time to first
byte (for the peer request it includes B's DHT lookup and its request to A, or the redirect),
the CPU seconds per GiB used by A, B and curl, and memory from /proc/PID/status: VmRSS of both
nodes idle after start, and node B's peak resident set (VmHWM) after the peer rounds, which must
stay flat: the blob is streamed, never buffered. A final series of GETs of small blobs measures
time to first byte without the transfer itself.

Run it with the project's venv: `.venv/bin/python bench/peer_throughput.py [--size-mib N]
[--rounds N] [--peer-transfer share|redirect]`. Everything it starts is stopped and its
temporary directory deleted on exit, Ctrl-C and errors included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common import (
    GIB,
    MIB,
    READY_TIMEOUT,
    Blob,
    Child,
    Fetch,
    OtherLoad,
    add_run_arguments,
    add_target_arguments,
    add_tool_arguments,
    children_cpu_seconds,
    congestion_control,
    cpu_seconds,
    curl_fetch,
    free_ports,
    make_blob,
    memory_status,
    mirror_argv,
    parse_run_arguments,
    require_tools,
    run_benchmark,
    start,
    store_bytes,
    wait_for,
    workspace,
)

HOST_A = "127.0.0.21"
HOST_B = "127.0.0.22"
REGISTRY = "docker.io"
REPOSITORY = "bench/blob"
TAG = "latest"
FOUND_TIMEOUT = 60.0
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
MODES = ("local", "peer")
PEER_TRANSFERS = ("share", "redirect")
SMALL_SIZE = 159  # bytes, about a config blob


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    child: Child
    host: str
    port: int
    metrics_port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.child.proc.pid

    def url(self, blob: Blob) -> str:
        return self.base_url + blob.url_path(REPOSITORY)

    def ensure_running(self) -> None:
        self.child.ensure_running()


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured download and the CPU seconds per GiB it cost node A, node B and curl."""

    fetch: Fetch
    cpu_a: float
    cpu_b: float
    cpu_curl: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Peer-proxied blob throughput and node memory of a two-node mirror cluster."
    )
    add_run_arguments(parser, rounds=3, warmup_per="mode")
    parser.add_argument(
        "--small-fetches",
        type=int,
        default=20,
        help="GETs of the small config blob per mode, for time to first byte (default: 20)",
    )
    parser.add_argument(
        "--peer-transfer",
        choices=PEER_TRANSFERS,
        default="share",
        help="how node B serves a blob node A holds: share (B fetches and passes it on) or "
        "redirect (B answers 307 to a signed URL at A; curl follows it with -L) "
        "(default: share)",
    )
    parser.add_argument(
        "--b-arg",
        action="append",
        default=[],
        help="one more flag for node B, e.g. --b-arg=--peer-ranges=4 (repeatable)",
    )
    add_target_arguments(parser, ratio="peer/local", target=0.8)
    add_tool_arguments(parser, python_runs="the mirror nodes")
    args = parse_run_arguments(parser, argv)
    if args.warmup < 0 or args.small_fetches < 0:
        parser.error("--warmup and --small-fetches must not be negative")
    return args


def make_image(cache_dir: Path, layers: list[Blob]) -> tuple[Blob, Blob]:
    """A config blob, a manifest listing `layers`, and a tag: (config, manifest)."""
    config_doc = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
    }
    config = store_bytes(cache_dir, json.dumps(config_doc, sort_keys=True).encode())
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config.digest, "size": config.size},
        "layers": [
            {"mediaType": LAYER_TYPE, "digest": layer.digest, "size": layer.size}
            for layer in layers
        ],
    }
    manifest = store_bytes(cache_dir, json.dumps(manifest_doc, indent=2).encode())
    tag_file = cache_dir / "tags" / REGISTRY / REPOSITORY / f"@{TAG}"
    tag_file.parent.mkdir(parents=True)
    tag_file.write_text(manifest.digest)
    return config, manifest


def keygen(python: str, path: Path) -> None:
    done = subprocess.run(
        [python, "-m", "mirror", "keygen", "--out", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"mirror keygen failed with status {done.returncode}: {done.stderr}")


def start_node(
    python: str,
    work: Path,
    name: str,
    host: str,
    key_file: Path,
    routers: dict[str, str],
    extra: tuple[str, ...] = (),
) -> Node:
    port, metrics_port = free_ports(2, host)
    cluster = [
        *extra,
        "--cluster-key-file",
        str(key_file),
        "--router-addr",
        routers[host],
        "--bootstrap",
        "static:" + ",".join(routers.values()),
        "--resolve-timeout",
        "200ms",
    ]
    argv = mirror_argv(
        python, work / f"cache-{name}", f"{host}:{port}", f"{host}:{metrics_port}", cluster
    )
    child = start(f"node {name}", argv, work / f"node-{name}.log")
    return Node(name=name, child=child, host=host, port=port, metrics_port=metrics_port)


def metrics_text(node: Node) -> str:
    url = f"http://{node.host}:{node.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def lookup_totals(node: Node) -> tuple[float, float]:
    """(sum of seconds, count) of the node's DHT lookups that found providers, from /metrics."""
    totals = {"sum": 0.0, "count": 0.0}
    for line in metrics_text(node).splitlines():
        for part in totals:
            if line.startswith(f"mirror_peer_lookup_duration_seconds_{part}{{") and (
                'result="found"' in line
            ):
                totals[part] = float(line.rpartition(" ")[2])
    return totals["sum"], totals["count"]


def metric_sum(node: Node, name: str, *labels: str) -> float:
    """The sum of the samples of `name` whose labels include all of `labels` (`key="value"`)."""
    total = 0.0
    for line in metrics_text(node).splitlines():
        head, _, value = line.rpartition(" ")
        if head.partition("{")[0] == name and all(label in head for label in labels):
            total += float(value)
    return total


def curl_following(curl: str, url: str, expected_size: int) -> Fetch:
    """Like `curl_fetch`, following one redirect (`-L`): the figures cover the whole exchange
    (the 307 from B, then the body from A), and a fetch that was not redirected is an error."""
    write_out = (
        "%{speed_download} %{size_download} %{http_code} %{time_starttransfer} %{num_redirects}"
    )
    done = subprocess.run(
        [curl, "-s", "-L", "--max-redirs", "1", "-o", "/dev/null", "-w", write_out, url],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"curl {url} failed with status {done.returncode}: {done.stderr}")
    speed, size, status, ttfb, redirects = done.stdout.split()
    if status != "200" or redirects != "1":
        raise RuntimeError(f"{url} answered HTTP {status} after {redirects} redirects, not 1")
    if int(float(size)) != expected_size:
        raise RuntimeError(f"{url} sent {size} bytes instead of {expected_size}")
    return Fetch(mib_per_s=float(speed) / MIB, ttfb=float(ttfb))


def fetch(curl: str, url: str, size: int, *, follow: bool) -> Fetch:
    return curl_following(curl, url, size) if follow else curl_fetch(curl, url, size)


def measure(curl: str, url: str, size: int, node_a: Node, node_b: Node, *, follow: bool) -> Sample:
    before = cpu_seconds([node_a.pid]), cpu_seconds([node_b.pid]), children_cpu_seconds()
    fetch_ = fetch(curl, url, size, follow=follow)
    gibs = size / GIB
    return Sample(
        fetch=fetch_,
        cpu_a=(cpu_seconds([node_a.pid]) - before[0]) / gibs,
        cpu_b=(cpu_seconds([node_b.pid]) - before[1]) / gibs,
        cpu_curl=(children_cpu_seconds() - before[2]) / gibs,
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def run(args: argparse.Namespace) -> int:
    require_tools(args.curl)
    size = args.size_mib * MIB
    redirect = args.peer_transfer == "redirect"
    with workspace(args.tmp_dir, "mirror-peer-bench-") as work, contextlib.ExitStack() as processes:
        cache_a = work / "cache-A"
        (work / "cache-B").mkdir()
        count = args.warmup + args.rounds
        print(f"writing {count} random blobs of {args.size_mib} MiB under {work} ...", flush=True)
        blobs = [make_blob(cache_a, size) for _ in range(count)]
        smalls = [store_bytes(cache_a, os.urandom(SMALL_SIZE)) for _ in range(args.small_fetches)]
        _config, manifest = make_image(cache_a, blobs + smalls)
        key_file = work / "cluster.key"
        keygen(args.python, key_file)
        routers = {
            host: f"{host}:{free_ports(1, host, socket.SOCK_DGRAM)[0]}" for host in (HOST_A, HOST_B)
        }

        node_a = start_node(args.python, work, "A", HOST_A, key_file, routers)
        processes.callback(node_a.child.stop)
        transfer = (f"--peer-transfer={args.peer_transfer}", *args.b_arg)
        node_b = start_node(args.python, work, "B", HOST_B, key_file, routers, transfer)
        processes.callback(node_b.child.stop)
        nodes = (node_a, node_b)
        for node in nodes:
            wait_for(
                node.child,
                node.base_url + "/readyz",
                READY_TIMEOUT,
                f"node {node.name} ready not within {READY_TIMEOUT:.0f}s",
            )
        # A HEAD is answered by B itself (never redirected, nothing fetched): found, not fetched.
        found_after = wait_for(
            node_b.child,
            node_b.url(blobs[-1]),
            FOUND_TIMEOUT,
            f"node B finding the blobs through the DHT not within {FOUND_TIMEOUT:.0f}s",
            method="HEAD",
        )
        for blob in [*blobs, *smalls]:
            wait_for(node_b.child, node_b.url(blob), FOUND_TIMEOUT, "B finding", method="HEAD")
        # Let the first announcements and lookups settle before the idle sample.
        time.sleep(1.0)
        idle = {node.name: memory_status(node.pid) for node in nodes}
        print(
            f"{count} blobs of {args.size_mib} MiB ({args.warmup} warm-up) and"
            f" {len(smalls)} of {SMALL_SIZE} bytes in tagged image {REGISTRY}/{REPOSITORY}:{TAG}"
            f" ({manifest.digest[:23]}...); node A {node_a.base_url} (holds them), node B"
            f" {node_b.base_url} (empty cache, --peer-transfer={args.peer_transfer}) found the"
            f" last after {ms(found_after)}; client: curl -> /dev/null"
            f"{' (-L for B)' if redirect else ''}; tcp congestion control {congestion_control()}",
            flush=True,
        )
        print(
            "idle after start: "
            + ", ".join(
                f"node {name} VmRSS {m['VmRSS']:.1f} MiB (VmHWM {m['VmHWM']:.1f})"
                for name, m in idle.items()
            ),
            flush=True,
        )

        nodes_by_mode = {"local": node_a, "peer": node_b}
        follows = {"local": False, "peer": redirect}
        for blob in blobs[: args.warmup]:
            for mode in MODES:
                fetch(args.curl, nodes_by_mode[mode].url(blob), size, follow=follows[mode])

        samples: dict[str, list[Sample]] = {mode: [] for mode in MODES}
        lookups_before = lookup_totals(node_b)
        other_load = OtherLoad(lambda: [node.pid for node in nodes])
        for number, blob in enumerate(blobs[args.warmup :]):
            order = MODES if number % 2 == 0 else MODES[::-1]
            for mode in order:
                url = nodes_by_mode[mode].url(blob)
                sample = measure(args.curl, url, size, node_a, node_b, follow=follows[mode])
                samples[mode].append(sample)
                node_a.ensure_running()
                node_b.ensure_running()
            print(
                f"round {number + 1}: "
                + "  ".join(
                    f"{mode} {samples[mode][-1].fetch.mib_per_s:7.1f} MiB/s"
                    f" (ttfb {ms(samples[mode][-1].fetch.ttfb)}; cpu s/GiB"
                    f" A {samples[mode][-1].cpu_a:.2f} B {samples[mode][-1].cpu_b:.2f}"
                    f" curl {samples[mode][-1].cpu_curl:.2f})"
                    for mode in MODES
                ),
                flush=True,
            )
        foreign_share = other_load.share()
        lookups_after = lookup_totals(node_b)
        served = {node.name: memory_status(node.pid) for node in nodes}

        small: dict[str, list[float]] = {mode: [] for mode in MODES}
        for blob in smalls:
            for mode in MODES:
                url = nodes_by_mode[mode].url(blob)
                small[mode].append(fetch(args.curl, url, blob.size, follow=follows[mode]).ttfb)
        relayed = metric_sum(node_b, "mirror_served_bytes_total", 'kind="blob"')
        redirects = metric_sum(node_b, "mirror_peer_redirects_total", 'result="sent"')
        for node in nodes:
            node.ensure_running()

    medians = {
        mode: statistics.median(s.fetch.mib_per_s for s in runs) for mode, runs in samples.items()
    }
    ratio = medians["peer"] / medians["local"]
    met = ratio >= args.target
    print()
    print(
        f"{'mode':<6} {'median MiB/s':>13} {'min':>8} {'max':>8} {'ttfb':>9}"
        f" {'A cpu s/GiB':>12} {'B cpu s/GiB':>12} {'curl cpu s/GiB':>15}"
    )
    for mode, runs in samples.items():
        speeds = [sample.fetch.mib_per_s for sample in runs]
        print(
            f"{mode:<6} {medians[mode]:13.1f} {min(speeds):8.1f} {max(speeds):8.1f}"
            f" {ms(statistics.median(s.fetch.ttfb for s in runs)):>9}"
            f" {statistics.median(s.cpu_a for s in runs):12.2f}"
            f" {statistics.median(s.cpu_b for s in runs):12.2f}"
            f" {statistics.median(s.cpu_curl for s in runs):15.2f}"
        )
    paired = statistics.median(
        p.fetch.mib_per_s / loc.fetch.mib_per_s
        for p, loc in zip(samples["peer"], samples["local"], strict=True)
    )
    print(
        f"ratio peer/local: {ratio:.3f} of the medians, {paired:.3f} median of the per-round"
        f" ratios (target >= {args.target:.2f})"
    )
    lookup_sum = lookups_after[0] - lookups_before[0]
    lookup_count = lookups_after[1] - lookups_before[1]
    if lookup_count:
        print(f"node B's DHT lookups during the rounds: {ms(lookup_sum / lookup_count)} mean")
    if small["local"]:
        print(
            f"time to first byte, GETs of {len(smalls)} blobs of {SMALL_SIZE} bytes:"
            f" local {ms(statistics.median(small['local']))},"
            f" peer {ms(statistics.median(small['peer']))} (medians;"
            f" peer max {ms(max(small['peer']))})"
        )
    print(OtherLoad.describe(foreign_share))
    print(
        f"node B sent {redirects:.0f} redirects and {relayed / MIB:.1f} MiB of blob bodies"
        f" (--peer-transfer={args.peer_transfer})"
    )
    served_gib = (args.rounds + args.warmup) * size / GIB
    print(
        f"memory: node B VmHWM {served['B']['VmHWM']:.1f} MiB after {served_gib:.1f} GiB through"
        f" it (VmRSS {idle['B']['VmRSS']:.1f} MiB idle, {served['B']['VmRSS']:.1f} MiB after);"
        f" node A VmHWM {served['A']['VmHWM']:.1f} MiB (VmRSS {idle['A']['VmRSS']:.1f} MiB idle)"
    )
    print(
        f"SUMMARY ({args.peer_transfer}): peer {medians['peer']:.0f} MiB/s, local"
        f" {medians['local']:.0f} MiB/s, ratio {ratio:.2f} ({'meets' if met else 'BELOW'} target"
        f" {args.target:.2f}); node B peak RSS {served['B']['VmHWM']:.0f} MiB (idle"
        f" {idle['B']['VmRSS']:.0f} MiB); median of {args.rounds} x {args.size_mib} MiB over"
        " loopback"
    )
    return 1 if args.strict and not met else 0


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
