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
import grp
import hashlib
import os
import pwd
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

import aiohttp

MIB = 1024 * 1024
GIB = 1024 * MIB
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REPOSITORY = "bench"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
WRITE_CHUNK = 8 * MIB


@dataclass(frozen=True, slots=True)
class Blob:
    path: Path
    hex: str
    size: int

    @property
    def url_path(self) -> str:
        return f"/v2/{REPOSITORY}/blobs/sha256:{self.hex}"


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
        # Anything left in the group (an orphaned nginx worker, say) goes too. The group id is
        # the leader's pid, which the kernel does not hand out again while the group has members.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    child: Child
    base_url: str
    ready_url: str

    def blob_url(self, blob: Blob) -> str:
        return self.base_url + blob.url_path


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
    parser.add_argument("--size-mib", type=int, default=1024, help="blob size (default: 1024)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default: 5)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="unmeasured fetches per server first (default: 1)"
    )
    parser.add_argument(
        "--memory", action="store_true", help="report the mirror process's peak RSS (VmHWM)"
    )
    parser.add_argument("--no-range", action="store_true", help="skip the aiohttp range round")
    parser.add_argument(
        "--target", type=float, default=0.9, help="ratio mirror/nginx to meet (default: 0.9)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when the ratio misses --target"
    )
    parser.add_argument("--nginx", default="nginx", help="nginx binary (default: nginx on PATH)")
    parser.add_argument(
        "--nginx-extra",
        default="",
        metavar="DIRECTIVES",
        help="extra directives for nginx's blob location, e.g. 'sendfile_max_chunk 0;'",
    )
    parser.add_argument("--curl", default="curl", help="curl binary (default: curl on PATH)")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="Python that runs the mirror node (default: this one)",
    )
    parser.add_argument(
        "--tmp-dir", default=None, help="where to create the temporary directory (default: $TMPDIR)"
    )
    args = parser.parse_args(argv)
    if args.size_mib < 1:
        parser.error("--size-mib must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def make_blob(cache_dir: Path, size: int) -> Blob:
    """Random bytes at blobs/sha256/<their sha256>, synced so writeback does not disturb timing."""
    blob_dir = cache_dir / "blobs" / "sha256"
    blob_dir.mkdir(parents=True)
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
    path = blob_dir / digest.hexdigest()
    os.replace(partial, path)
    return Blob(path=path, hex=digest.hexdigest(), size=size)


def free_ports(count: int) -> list[int]:
    """Distinct loopback ports nobody listens on (all held open until every one is chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def start(name: str, argv: list[str], log: Path) -> Child:
    with open(log, "wb") as output:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Child(name=name, proc=proc, log=log)


def wait_ready(server: Server) -> None:
    """Poll the readiness URL until it answers 200; fail early if the process dies."""
    deadline = time.monotonic() + READY_TIMEOUT
    pause = 0.01
    while True:
        code = server.child.proc.poll()
        if code is not None:
            raise RuntimeError(
                f"{server.name} exited with status {code} before it was ready:\n"
                + server.child.log_tail()
            )
        try:
            with urllib.request.urlopen(server.ready_url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{server.name} was not ready after {READY_TIMEOUT:.0f}s:\n"
                + server.child.log_tail()
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def start_mirror(python: str, work: Path, cache_dir: Path) -> Server:
    registry_port, metrics_port = free_ports(2)
    argv = [
        python,
        "-m",
        "mirror",
        "run",
        "--store",
        "cache",
        "--cache-dir",
        str(cache_dir),
        "--registry-addr",
        f"127.0.0.1:{registry_port}",
        "--metrics-addr",
        f"127.0.0.1:{metrics_port}",
        "--log-level",
        "warning",
    ]
    child = start("mirror", argv, work / "mirror.log")
    base = f"http://127.0.0.1:{registry_port}"
    return Server(name="mirror", child=child, base_url=base, ready_url=base + "/readyz")


def nginx_config(work: Path, port: int, blob: Blob, extra: str) -> str:
    # As root, nginx would run its worker as "nobody", which cannot read our 0700 temp dir; run
    # it as the same user the mirror runs as instead. Otherwise the directive would be ignored.
    user = ""
    if os.geteuid() == 0:
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
    temp = work / "nginx-temp"
    return f"""\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {work / "nginx.pid"};
error_log {work / "nginx-error.log"} warn;

events {{
    worker_connections 64;
}}

http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 5;
    default_type application/octet-stream;
    client_body_temp_path {temp / "body"};
    proxy_temp_path {temp / "proxy"};
    fastcgi_temp_path {temp / "fastcgi"};
    uwsgi_temp_path {temp / "uwsgi"};
    scgi_temp_path {temp / "scgi"};

    server {{
        listen 127.0.0.1:{port};
        location = {blob.url_path} {{
            alias {blob.path};
            {extra}
        }}
        location = /readyz {{
            return 200 "ready\\n";
        }}
    }}
}}
"""


def start_nginx(nginx: str, work: Path, blob: Blob, extra: str) -> Server:
    (port,) = free_ports(1)
    (work / "nginx-temp").mkdir()
    config = work / "nginx.conf"
    config.write_text(nginx_config(work, port, blob, extra))
    argv = [nginx, "-p", str(work), "-c", str(config), "-e", str(work / "nginx-error.log")]
    child = start("nginx", argv, work / "nginx.log")
    base = f"http://127.0.0.1:{port}"
    return Server(name="nginx", child=child, base_url=base, ready_url=base + "/readyz")


def congestion_control() -> str:
    """The kernel's TCP congestion control: it shapes loopback throughput as much as any server."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "unknown"


def nginx_version(nginx: str) -> str:
    done = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=True)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")


def curl_fetch(curl: str, url: str, expected_size: int) -> float:
    """One full download with curl to /dev/null; returns MiB/s as curl measured it."""
    write_out = "%{speed_download} %{size_download} %{http_code}"
    done = subprocess.run(
        [curl, "-s", "-o", "/dev/null", "-w", write_out, url],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"curl {url} failed with status {done.returncode}: {done.stderr}")
    speed, size, status = done.stdout.split()
    if status != "200":
        raise RuntimeError(f"{url} answered HTTP {status}")
    if int(float(size)) != expected_size:
        raise RuntimeError(f"{url} sent {size} bytes instead of {expected_size}")
    return float(speed) / MIB


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces): state is index 0."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()


def process_tree(root: int) -> list[int]:
    """`root` and its direct children (an nginx master and its workers)."""
    pids = [root]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            if int(_stat_fields(int(entry))[1]) == root:
                pids.append(int(entry))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time the processes used so far."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time all CPUs spent on anything but idling and waiting for I/O, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    # guest time is already counted in user and nice
    return (sum(fields[:8]) - idle - iowait) / CLOCK_TICKS


def own_cpu_seconds(servers: tuple[Server, ...]) -> float:
    """CPU time of this benchmark: itself, its finished children (curl) and the servers."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime + children_cpu_seconds()
    for server in servers:
        total += cpu_seconds(process_tree(server.child.proc.pid))
    return total


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(curl: str, server: Server, blob: Blob) -> Sample:
    """One curl download with the CPU seconds per GiB it cost the server and the client."""
    pids = process_tree(server.child.proc.pid)
    server_before = cpu_seconds(pids)
    client_before = children_cpu_seconds()
    speed = curl_fetch(curl, server.blob_url(blob), blob.size)
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


def memory_status(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS of a process, in KiB."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0])
    return values


def raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def workspace(parent: str | None) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-", dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    for tool in (args.nginx, args.curl):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed")
    version = nginx_version(args.nginx)
    size = args.size_mib * MIB
    with workspace(args.tmp_dir) as work, contextlib.ExitStack() as processes:
        cache_dir = work / "cache"
        print(f"writing a {args.size_mib} MiB random blob under {work} ...", flush=True)
        blob = make_blob(cache_dir, size)
        mirror = start_mirror(args.python, work, cache_dir)
        processes.callback(mirror.child.stop)
        nginx = start_nginx(args.nginx, work, blob, args.nginx_extra)
        processes.callback(nginx.child.stop)
        wait_ready(mirror)
        wait_ready(nginx)
        ready_memory = memory_status(mirror.child.proc.pid) if args.memory else {}
        servers = (mirror, nginx)

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
        busy_before, own_before = machine_busy_seconds(), own_cpu_seconds(servers)
        started = time.monotonic()
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

        elapsed = time.monotonic() - started
        foreign = (machine_busy_seconds() - busy_before) - (own_cpu_seconds(servers) - own_before)
        foreign_share = max(0.0, foreign) / (elapsed * (os.cpu_count() or 1))

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
    print(
        f"other processes used {foreign_share:.0%} of the machine's {os.cpu_count()} CPUs"
        " during the rounds" + ("; expect noisy figures" if foreign_share > 0.1 else "")
    )
    if ranges:
        sample = ranges["mirror"]
        print(
            f"range round (aiohttp client, {sample.length // MIB} MiB from offset {sample.offset}):"
            f" mirror {ranges['mirror'].mib_per_s:.1f} MiB/s,"
            f" nginx {ranges['nginx'].mib_per_s:.1f} MiB/s"
        )
    if args.memory:
        print(
            f"mirror memory: VmHWM {served_memory['VmHWM'] / 1024:.1f} MiB after serving"
            f" ({ready_memory['VmHWM'] / 1024:.1f} MiB when ready),"
            f" VmRSS {served_memory['VmRSS'] / 1024:.1f} MiB"
        )
    print(
        f"SUMMARY: mirror {medians['mirror']:.0f} MiB/s, nginx {medians['nginx']:.0f} MiB/s, "
        f"ratio {ratio:.2f} ({'meets' if met else 'BELOW'} target {args.target:.2f}); "
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
