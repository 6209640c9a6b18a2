#!/usr/bin/env python3
"""Peer-proxied blob throughput and node memory: a blob from a peer against the same blob locally.

A two-node cluster runs on loopback (node A on 127.0.0.21, node B on 127.0.0.22, both
`python -m mirror run --store cache` with one cluster key and a static bootstrap of both routers).
Before A starts, one large random blob is written into its cache at blobs/sha256/<hex>, together
with a small config blob, an OCI image manifest whose one layer is the big blob, and the tag
docker.io/bench/blob:latest pointing at that manifest (the advertiser only walks tagged images).
A announces the three digests in the DHT; B's cache stays empty. Once B answers a HEAD for the
blob with 200 (it found A through the DHT), the same client, curl writing to /dev/null, fetches
the blob for several rounds, alternating (the order flips every round):

- local: GET from node A, which sends it from its cache with sendfile;
- peer: GET from node B, which looks the digest up in the DHT, requests it from A with a signed
  peer request, hashes it as it streams and passes it on (the last chunk held until verified).

It prints the median MiB/s of each, the ratio peer/local (target >= 0.8), curl's time to first
byte (for the peer request it includes B's DHT lookup and its request to A), the CPU seconds per
GiB used by A, B and curl, and memory from /proc/PID/status: VmRSS of both nodes idle after
start, and node B's peak resident set (VmHWM) after the peer rounds, which must stay flat: the
blob is streamed, never buffered. A final series of small GETs (the config blob) measures time to
first byte without the transfer itself.

Run it with the project's venv: `.venv/bin/python bench/peer_throughput.py [--size-mib N]
[--rounds N]`. Everything it starts is stopped and its temporary directory deleted on exit,
Ctrl-C and errors included.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

MIB = 1024 * 1024
GIB = 1024 * MIB
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
HOST_A = "127.0.0.21"
HOST_B = "127.0.0.22"
REGISTRY = "docker.io"
REPOSITORY = "bench/blob"
TAG = "latest"
READY_TIMEOUT = 30.0
FOUND_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
WRITE_CHUNK = 8 * MIB
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
MODES = ("local", "peer")


@dataclass(frozen=True, slots=True)
class Blob:
    hex: str
    size: int

    @property
    def digest(self) -> str:
        return f"sha256:{self.hex}"

    @property
    def url_path(self) -> str:
        return f"/v2/{REPOSITORY}/blobs/{self.digest}"


@dataclass(slots=True)
class Child:
    """A process this benchmark started, in its own session so a stop reaches its children."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole process group if it does not exit in time."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"{self.name} ignored SIGTERM; killing it", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Anything left in the group goes too. The group id is the leader's pid, which the kernel
        # does not hand out again while the group has members.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


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
        return self.base_url + blob.url_path

    def ensure_running(self) -> None:
        code = self.child.proc.poll()
        if code is not None:
            raise RuntimeError(
                f"node {self.name} exited with status {code}:\n" + self.child.log_tail()
            )


@dataclass(frozen=True, slots=True)
class Fetch:
    """What curl reported for one download."""

    mib_per_s: float
    ttfb: float


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
    parser.add_argument("--size-mib", type=int, default=1024, help="blob size (default: 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (default: 3)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="unmeasured fetches per mode first (default: 1)"
    )
    parser.add_argument(
        "--small-fetches",
        type=int,
        default=20,
        help="GETs of the small config blob per mode, for time to first byte (default: 20)",
    )
    parser.add_argument(
        "--target", type=float, default=0.8, help="ratio peer/local to meet (default: 0.8)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when the ratio misses --target"
    )
    parser.add_argument("--curl", default="curl", help="curl binary (default: curl on PATH)")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="Python that runs the mirror nodes (default: this one)",
    )
    parser.add_argument(
        "--tmp-dir", default=None, help="where to create the temporary directory (default: $TMPDIR)"
    )
    args = parser.parse_args(argv)
    if args.size_mib < 1:
        parser.error("--size-mib must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.warmup < 0 or args.small_fetches < 0:
        parser.error("--warmup and --small-fetches must not be negative")
    return args


def store_bytes(cache_dir: Path, data: bytes) -> Blob:
    blob_dir = cache_dir / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()
    (blob_dir / digest).write_bytes(data)
    return Blob(hex=digest, size=len(data))


def make_blob(cache_dir: Path, size: int) -> Blob:
    """Random bytes at blobs/sha256/<their sha256>, synced so writeback does not disturb timing."""
    blob_dir = cache_dir / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_dir / "blob.partial"
    digest = hashlib.sha256()
    with open(partial, "wb") as handle:
        remaining = size
        while remaining:
            chunk = os.urandom(min(WRITE_CHUNK, remaining))
            digest.update(chunk)
            handle.write(chunk)
            remaining -= len(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, blob_dir / digest.hexdigest())
    return Blob(hex=digest.hexdigest(), size=size)


def make_image(cache_dir: Path, layer: Blob) -> tuple[Blob, Blob]:
    """A config blob, a manifest with `layer` as its one layer, and a tag: (config, manifest)."""
    config_doc = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
    }
    config = store_bytes(cache_dir, json.dumps(config_doc, sort_keys=True).encode())
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config.digest, "size": config.size},
        "layers": [{"mediaType": LAYER_TYPE, "digest": layer.digest, "size": layer.size}],
    }
    manifest = store_bytes(cache_dir, json.dumps(manifest_doc, indent=2).encode())
    tag_file = cache_dir / "tags" / REGISTRY / REPOSITORY / f"@{TAG}"
    tag_file.parent.mkdir(parents=True)
    tag_file.write_text(manifest.digest)
    return config, manifest


def free_port(host: str, kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_tcp_ports(host: str, count: int) -> list[int]:
    """Distinct TCP ports nobody listens on (all held open until every one is chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


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
    python: str, work: Path, name: str, host: str, key_file: Path, routers: dict[str, str]
) -> Node:
    port, metrics_port = free_tcp_ports(host, 2)
    argv = [
        python,
        "-m",
        "mirror",
        "run",
        "--store",
        "cache",
        "--cache-dir",
        str(work / f"cache-{name}"),
        "--registry-addr",
        f"{host}:{port}",
        "--metrics-addr",
        f"{host}:{metrics_port}",
        "--cluster-key-file",
        str(key_file),
        "--router-addr",
        routers[host],
        "--bootstrap",
        "static:" + ",".join(routers.values()),
        "--resolve-timeout",
        "200ms",
        "--log-level",
        "warning",
    ]
    log = work / f"node-{name}.log"
    with open(log, "wb") as output:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    child = Child(name=f"node {name}", proc=proc, log=log)
    return Node(name=name, child=child, host=host, port=port, metrics_port=metrics_port)


def http_status(url: str, method: str = "GET") -> int | None:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, OSError):
        return None


def wait_for(node: Node, url: str, method: str, what: str, timeout: float) -> float:
    """Poll `url` until it answers 200; fail early if the node dies. Returns the seconds waited."""
    started = time.monotonic()
    pause = 0.01
    while True:
        node.ensure_running()
        if http_status(url, method) == 200:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{what} not within {timeout:.0f}s:\n" + node.child.log_tail())
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def curl_fetch(curl: str, url: str, expected_size: int) -> Fetch:
    """One full download with curl to /dev/null: speed as curl measured it, time to first byte."""
    write_out = "%{speed_download} %{size_download} %{http_code} %{time_starttransfer}"
    done = subprocess.run(
        [curl, "-s", "-o", "/dev/null", "-w", write_out, url],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"curl {url} failed with status {done.returncode}: {done.stderr}")
    speed, size, status, ttfb = done.stdout.split()
    if status != "200":
        raise RuntimeError(f"{url} answered HTTP {status}")
    if int(float(size)) != expected_size:
        raise RuntimeError(f"{url} sent {size} bytes instead of {expected_size}")
    return Fetch(mib_per_s=float(speed) / MIB, ttfb=float(ttfb))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    """CPU time all CPUs spent on anything but idling and waiting for I/O, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS


def own_cpu_seconds(nodes: tuple[Node, ...]) -> float:
    """CPU time of this benchmark: itself, its finished children (curl) and the nodes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return (
        own.ru_utime
        + own.ru_stime
        + children_cpu_seconds()
        + sum(cpu_seconds(n.pid) for n in nodes)
    )


def memory_status(pid: int) -> dict[str, float]:
    """VmHWM and VmRSS of a process, in MiB."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) / 1024
    return values


def lookup_totals(node: Node) -> tuple[float, float]:
    """(sum of seconds, count) of the node's DHT lookups that found providers, from /metrics."""
    url = f"http://{node.host}:{node.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    totals = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for part in totals:
            if line.startswith(f"mirror_peer_lookup_duration_seconds_{part}{{") and (
                'result="found"' in line
            ):
                totals[part] = float(line.rpartition(" ")[2])
    return totals["sum"], totals["count"]


def measure(curl: str, url: str, size: int, node_a: Node, node_b: Node) -> Sample:
    before = cpu_seconds(node_a.pid), cpu_seconds(node_b.pid), children_cpu_seconds()
    fetch = curl_fetch(curl, url, size)
    gibs = size / GIB
    return Sample(
        fetch=fetch,
        cpu_a=(cpu_seconds(node_a.pid) - before[0]) / gibs,
        cpu_b=(cpu_seconds(node_b.pid) - before[1]) / gibs,
        cpu_curl=(children_cpu_seconds() - before[2]) / gibs,
    )


def congestion_control() -> str:
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "unknown"


def raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def workspace(parent: str | None) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="mirror-peer-bench-", dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def run(args: argparse.Namespace) -> int:
    if shutil.which(args.curl) is None:
        raise RuntimeError(f"{args.curl} is not installed")
    size = args.size_mib * MIB
    with workspace(args.tmp_dir) as work, contextlib.ExitStack() as processes:
        cache_a = work / "cache-A"
        (work / "cache-B").mkdir()
        print(f"writing a {args.size_mib} MiB random blob under {work} ...", flush=True)
        blob = make_blob(cache_a, size)
        config, manifest = make_image(cache_a, blob)
        key_file = work / "cluster.key"
        keygen(args.python, key_file)
        routers = {
            host: f"{host}:{free_port(host, socket.SOCK_DGRAM)}" for host in (HOST_A, HOST_B)
        }

        node_a = start_node(args.python, work, "A", HOST_A, key_file, routers)
        processes.callback(node_a.child.stop)
        node_b = start_node(args.python, work, "B", HOST_B, key_file, routers)
        processes.callback(node_b.child.stop)
        nodes = (node_a, node_b)
        for node in nodes:
            wait_for(
                node, node.base_url + "/readyz", "GET", f"node {node.name} ready", READY_TIMEOUT
            )
        found_after = wait_for(
            node_b,
            node_b.url(blob),
            "HEAD",
            "node B finding the blob through the DHT",
            FOUND_TIMEOUT,
        )
        # Let the first announcements and lookups settle before the idle sample.
        time.sleep(1.0)
        idle = {node.name: memory_status(node.pid) for node in nodes}
        print(
            f"blob {blob.digest[:23]}... {args.size_mib} MiB in tagged image "
            f"{REGISTRY}/{REPOSITORY}:{TAG} ({manifest.digest[:23]}...); node A {node_a.base_url}"
            f" (holds it), node B {node_b.base_url} (empty cache) found it after"
            f" {ms(found_after)}; client: curl -> /dev/null; tcp congestion control"
            f" {congestion_control()}",
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

        urls = {"local": node_a.url(blob), "peer": node_b.url(blob)}
        for _ in range(args.warmup):
            for mode in MODES:
                curl_fetch(args.curl, urls[mode], size)

        samples: dict[str, list[Sample]] = {mode: [] for mode in MODES}
        lookups_before = lookup_totals(node_b)
        busy_before, own_before = machine_busy_seconds(), own_cpu_seconds(nodes)
        started = time.monotonic()
        for number in range(args.rounds):
            order = MODES if number % 2 == 0 else MODES[::-1]
            for mode in order:
                samples[mode].append(measure(args.curl, urls[mode], size, node_a, node_b))
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
        elapsed = time.monotonic() - started
        foreign = (machine_busy_seconds() - busy_before) - (own_cpu_seconds(nodes) - own_before)
        foreign_share = max(0.0, foreign) / (elapsed * (os.cpu_count() or 1))
        lookups_after = lookup_totals(node_b)
        served = {node.name: memory_status(node.pid) for node in nodes}

        small: dict[str, list[float]] = {mode: [] for mode in MODES}
        small_urls = {"local": node_a.url(config), "peer": node_b.url(config)}
        for _ in range(args.small_fetches):
            for mode in MODES:
                small[mode].append(curl_fetch(args.curl, small_urls[mode], config.size).ttfb)
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
            f"time to first byte, {args.small_fetches} GETs of the {config.size}-byte config blob:"
            f" local {ms(statistics.median(small['local']))},"
            f" peer {ms(statistics.median(small['peer']))} (medians;"
            f" peer max {ms(max(small['peer']))})"
        )
    print(
        f"other processes used {foreign_share:.0%} of the machine's {os.cpu_count()} CPUs"
        " during the rounds" + ("; expect noisy figures" if foreign_share > 0.1 else "")
    )
    served_gib = (args.rounds + args.warmup) * size / GIB
    print(
        f"memory: node B VmHWM {served['B']['VmHWM']:.1f} MiB after proxying {served_gib:.1f} GiB"
        f" (VmRSS {idle['B']['VmRSS']:.1f} MiB idle, {served['B']['VmRSS']:.1f} MiB after);"
        f" node A VmHWM {served['A']['VmHWM']:.1f} MiB (VmRSS {idle['A']['VmRSS']:.1f} MiB idle)"
    )
    print(
        f"SUMMARY: peer {medians['peer']:.0f} MiB/s, local {medians['local']:.0f} MiB/s, "
        f"ratio {ratio:.2f} ({'meets' if met else 'BELOW'} target {args.target:.2f}); "
        f"node B peak RSS {served['B']['VmHWM']:.0f} MiB (idle {idle['B']['VmRSS']:.0f} MiB); "
        f"median of {args.rounds} x {args.size_mib} MiB over loopback"
    )
    return 1 if args.strict and not met else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; stopped everything this benchmark started", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
