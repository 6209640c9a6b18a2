"""What the loopback throughput benchmarks share: blobs in a node cache, child processes, curl.

`blob_throughput.py` (mirror against nginx) and `peer_throughput.py` (a blob through a peer
against the same blob locally) measure the same way: a random blob written into a temporary node
cache, servers started as child processes on free loopback ports, curl downloading to /dev/null,
CPU seconds read from /proc, a note of how busy the rest of the machine was, and the same
options and exit handling. Keeping those pieces here means the two benchmarks measure and clean
up identically, so their figures can be read side by side.

The namespace benchmarks, `cold_pull.py` (a cold pull from a shaped upstream) and `rollout.py`
(a warm rollout from one holder over shaped node links), share the lab at the end of this
module: one network namespace per simulated node on a bridge, a private containerd per node,
`ctr` pulls released together, a mirror per node and distribution registries, all removed
however the run ends.

The scripts are run by path (`.venv/bin/python bench/blob_throughput.py`), which puts this
directory on sys.path: they import this module as `common`.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import gzip
import hashlib
import json
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.cri

import grpc
from harness.containerd import _config_text as containerd_config_text
from harness.containerd import write_hosts_toml
from harness.images import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    canonical_json,
    run_skopeo,
)
from harness.process import ManagedProcess
from harness.registry import REGISTRY_BINARY, Registry

from bench.cri import api_pb2, api_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
GIB = 1024 * MIB
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
WRITE_CHUNK = 8 * MIB


@dataclass(frozen=True, slots=True)
class Blob:
    """A blob in a node cache: the file, its sha256 in hex and its size in bytes."""

    path: Path
    hex: str
    size: int

    @property
    def digest(self) -> str:
        return f"sha256:{self.hex}"

    def url_path(self, repository: str) -> str:
        """Its registry API path; the node serves a cached blob under any repository name."""
        return f"/v2/{repository}/blobs/{self.digest}"


@dataclass(frozen=True, slots=True)
class Fetch:
    """What curl reported for one download."""

    mib_per_s: float
    ttfb: float


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

    def ensure_running(self, when: str = "") -> None:
        """Raise, with the end of its log, if it has exited; `when` says at what point."""
        code = self.proc.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with status {code}{when}:\n" + self.log_tail())

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


def start(name: str, argv: list[str], log: Path) -> Child:
    """Start `argv` in a new session with its output in `log`, so a stop reaches all it spawns."""
    with open(log, "wb") as output:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Child(name=name, proc=proc, log=log)


def mirror_argv(
    python: str,
    cache_dir: Path,
    registry_addr: str,
    metrics_addr: str,
    extra: Sequence[str] = (),
) -> list[str]:
    """`python -m mirror run` serving `cache_dir`, quiet so its log holds only what went wrong."""
    return [
        python,
        "-m",
        "mirror",
        "run",
        "--store",
        "cache",
        "--cache-dir",
        str(cache_dir),
        "--registry-addr",
        registry_addr,
        "--metrics-addr",
        metrics_addr,
        *extra,
        "--log-level",
        "warning",
    ]


def add_run_arguments(parser: argparse.ArgumentParser, *, rounds: int, warmup_per: str) -> None:
    """--size-mib, --rounds, --warmup: here so both benchmarks take and check them alike."""
    parser.add_argument("--size-mib", type=int, default=1024, help="blob size (default: 1024)")
    parser.add_argument(
        "--rounds", type=int, default=rounds, help=f"measured rounds (default: {rounds})"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help=f"unmeasured fetches per {warmup_per} first (default: 1)",
    )


def add_target_arguments(parser: argparse.ArgumentParser, *, ratio: str, target: float) -> None:
    """--target and --strict: the speed ratio a benchmark must reach, and whether missing fails."""
    parser.add_argument(
        "--target", type=float, default=target, help=f"ratio {ratio} to meet (default: {target})"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when the ratio misses --target"
    )


def add_tool_arguments(parser: argparse.ArgumentParser, *, python_runs: str) -> None:
    """--curl, --python and --tmp-dir: which programs to run, and where their files go."""
    parser.add_argument("--curl", default="curl", help="curl binary (default: curl on PATH)")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help=f"Python that runs {python_runs} (default: this one)",
    )
    parser.add_argument(
        "--tmp-dir", default=None, help="where to create the temporary directory (default: $TMPDIR)"
    )


def parse_run_arguments(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> argparse.Namespace:
    """Parse, rejecting the sizes and round counts (see add_run_arguments) nothing can measure."""
    args = parser.parse_args(argv)
    if args.size_mib < 1:
        parser.error("--size-mib must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def _blob_dir(cache_dir: Path) -> Path:
    blob_dir = cache_dir / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    return blob_dir


def store_bytes(cache_dir: Path, data: bytes) -> Blob:
    """A small blob at blobs/sha256/<its sha256>, where a node's cache store looks for it."""
    digest = hashlib.sha256(data).hexdigest()
    path = _blob_dir(cache_dir) / digest
    path.write_bytes(data)
    return Blob(path=path, hex=digest, size=len(data))


def make_blob(cache_dir: Path, size: int) -> Blob:
    """Random bytes at blobs/sha256/<their sha256>, synced so writeback does not disturb timing."""
    blob_dir = _blob_dir(cache_dir)
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


def free_ports(
    count: int, host: str = "127.0.0.1", kind: socket.SocketKind = socket.SOCK_STREAM
) -> list[int]:
    """Distinct ports on `host` nobody uses (all held open until every one is chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, kind))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def http_status(url: str, method: str = "GET") -> int | None:
    """The HTTP status `url` answers with, or None while nothing answers at all."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, OSError):
        return None


def wait_for(
    child: Child, url: str, timeout: float, late: str, *, method: str = "GET", when: str = ""
) -> float:
    """Poll `url` until it answers 200; fail early if `child` dies. Returns the seconds waited.

    After `timeout` seconds the error starts with `late`; `when` ends the one for a child that
    exited (see Child.ensure_running). Both carry the end of the child's log.
    """
    started = time.monotonic()
    pause = 0.01
    while True:
        child.ensure_running(when)
        if http_status(url, method) == 200:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{late}:\n" + child.log_tail())
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def require_tools(*tools: str) -> None:
    """Fail before anything is written or started if a program the benchmark runs is missing."""
    for tool in tools:
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed")


def congestion_control() -> str:
    """The kernel's TCP congestion control: it shapes loopback throughput as much as any server."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "unknown"


def curl_fetch(curl: str, url: str, expected_size: int) -> Fetch:
    """One full download with curl to /dev/null: speed as curl measured it, time to first byte.

    The same client for every server, so differences in the figures are the servers'.
    """
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


def cpu_seconds(pids: Iterable[int], *, kernel_only: bool = False) -> float:
    """User plus system CPU time the processes used so far (none for one that is gone); with
    `kernel_only`, the system time alone: what they spent in the kernel on their behalf."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = _stat_fields(pid)
            ticks += int(fields[12]) + (0 if kernel_only else int(fields[11]))
    return ticks / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """CPU time of this process's finished children: the curl runs, since servers still run."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    """CPU time all CPUs spent on anything but idling and waiting for I/O, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    # guest time is already counted in user and nice
    return (sum(fields[:8]) - idle - iowait) / CLOCK_TICKS


def own_cpu_seconds(server_pids: Iterable[int]) -> float:
    """CPU time of this benchmark: itself, its finished children (curl) and the servers."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime + children_cpu_seconds() + cpu_seconds(server_pids)


class OtherLoad:
    """How much of the machine processes other than the benchmark's used, from creation on.

    Loopback figures swing widely when anything else runs, so this is reported next to them.
    `server_pids` is called at the start and at the end, so servers whose workers come and go
    are counted with the processes they have at each point.
    """

    def __init__(self, server_pids: Callable[[], Iterable[int]]) -> None:
        self._server_pids = server_pids
        self._busy = machine_busy_seconds()
        self._own = own_cpu_seconds(server_pids())
        self._started = time.monotonic()

    def share(self) -> float:
        """Their CPU time so far as a share (0 to 1) of what all the machine's CPUs had."""
        elapsed = time.monotonic() - self._started
        busy = machine_busy_seconds() - self._busy
        foreign = busy - (own_cpu_seconds(self._server_pids()) - self._own)
        return max(0.0, foreign) / (elapsed * (os.cpu_count() or 1))

    @staticmethod
    def describe(share: float) -> str:
        return (
            f"other processes used {share:.0%} of the machine's {os.cpu_count()} CPUs"
            " during the rounds" + ("; expect noisy figures" if share > 0.1 else "")
        )


def memory_status(pid: int) -> dict[str, float]:
    """VmHWM (peak resident set) and VmRSS of a process, in MiB: streaming must keep them flat."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) / 1024
    return values


class MemorySampler:
    """The peak resident set of some processes while a `with` block runs, sampled on a thread.

    VmHWM is the kernel's own peak, but per process and since the process started; sampling
    VmRSS gives the peak of one stretch of work, summed over several processes (an nginx master
    and its workers). The pids are fixed when the sampler is made: a scan of /proc per sample
    would cost more than the sample.
    """

    def __init__(self, pids: Sequence[int], interval: float = 0.02) -> None:
        self._pids = list(pids)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self.peak_mib = 0.0
        self.samples = 0

    def _sample(self) -> None:
        total = 0.0
        for pid in self._pids:
            with contextlib.suppress(OSError, KeyError):
                total += memory_status(pid)["VmRSS"]
        self.peak_mib = max(self.peak_mib, total)
        self.samples += 1

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self._interval):
                break

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` (0 to 1) quantile, interpolated between the closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True, slots=True)
class Transfer:
    """One transfer of a parallel curl run, as curl reported it (seconds from its start)."""

    status: int
    size: int
    ttfb: float
    total: float
    exit_code: int


class ParallelCurl:
    """Many requests from one curl process, `concurrency` at a time (`curl --parallel`).

    One event-driven C client serves every server alike and costs far less CPU than a Python
    client would on the same cores. Each body goes to /dev/null; curl reports every transfer's
    status, size, time to first byte and total time. `start()` returns at once, so two runs
    (GETs and HEADs, say) can load a server together; `wait()` collects the results and the
    wall time from start to curl's exit.
    """

    _WRITE_OUT = "%{http_code} %{size_download} %{time_starttransfer} %{time_total} %{exitcode}\\n"

    def __init__(
        self,
        curl: str,
        urls: Sequence[str],
        config: Path,
        *,
        head: bool,
        concurrency: int,
        source: str | None = None,
    ) -> None:
        """`source`: the local address to connect from (`--interface`), so several runs can
        stand for several clients (127.0.0.2, 127.0.0.3, ... on loopback)."""
        if not 1 <= concurrency <= 300:
            raise ValueError("curl runs 1 to 300 transfers at a time")
        lines: list[str] = []
        for url in urls:
            lines += [f'url = "{url}"', 'output = "/dev/null"']
        config.write_text("\n".join(lines) + "\n")
        self._argv = [
            curl,
            "--silent",
            "--no-progress-meter",
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            str(concurrency),
            *(["--head"] if head else []),
            *(["--interface", source] if source else []),
            "--write-out",
            self._WRITE_OUT,
            "--config",
            str(config),
        ]
        self._expected = len(urls)
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread
        self._output = ("", "")
        self._started = self._ended = 0.0

    def start(self) -> ParallelCurl:
        self._started = time.perf_counter()
        self._proc = subprocess.Popen(
            self._argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        # Collected on a thread, so the wall time ends when curl does, not when wait() is called
        # (runs started together are waited for one after the other).
        self._reader = threading.Thread(target=self._collect, name="curl-reader", daemon=True)
        self._reader.start()
        return self

    def _collect(self) -> None:
        assert self._proc is not None
        self._output = self._proc.communicate()
        self._ended = time.perf_counter()

    def wait(self) -> tuple[list[Transfer], float]:
        """Every transfer (in the order they ended) and the run's wall time in seconds."""
        assert self._proc is not None, "start() first"
        self._reader.join()
        stdout, stderr = self._output
        wall = self._ended - self._started
        transfers = []
        for line in stdout.splitlines():
            status, size, ttfb, total, code = line.split()
            transfers.append(
                Transfer(int(status), int(float(size)), float(ttfb), float(total), int(code))
            )
        if len(transfers) != self._expected:
            raise RuntimeError(
                f"curl reported {len(transfers)} of {self._expected} transfers"
                f" (status {self._proc.returncode}): {stderr.strip()[-500:]}"
            )
        return transfers, wall


def listen_overflows() -> int:
    """TcpExt ListenOverflows of this network namespace: connections dropped because a
    listening socket's accept queue (its backlog) was full. The client retries the SYN after
    about a second, so each one costs a request a second."""
    with open("/proc/net/netstat") as netstat:
        lines = [line.split() for line in netstat if line.startswith("TcpExt:")]
    names, values = lines[0], lines[1]
    return int(values[names.index("ListenOverflows")])


def nginx_version(nginx: str) -> str:
    done = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=True)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")


def nginx_user_directive() -> str:
    """As root nginx would run its workers as "nobody", which cannot read a 0700 temp dir:
    run them as the user the benchmark (and so the mirror) runs as. Empty when not root."""
    if os.geteuid() != 0:
        return ""
    return f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"


@contextlib.contextmanager
def workspace(parent: str | None, prefix: str) -> Iterator[Path]:
    """A temporary directory for blobs, configs and logs, deleted however the benchmark ends."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into SystemExit, so the `with` blocks stop the servers and delete files."""
    raise SystemExit(128 + signum)


def run_benchmark(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`run(args)`, cleaned up after on SIGTERM and Ctrl-C too; failures become exit statuses."""
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; stopped everything this benchmark started", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


# --- the servers the blob benchmarks compare: a mirror node and nginx ---------------------------

BENCH_REPOSITORY = "bench"


@dataclass(frozen=True, slots=True)
class Server:
    """A server under test (a mirror node or nginx): its process and where it answers."""

    name: str
    child: Child
    base_url: str

    @property
    def ready_url(self) -> str:
        return self.base_url + "/readyz"

    def blob_url(self, blob: Blob) -> str:
        return self.base_url + blob.url_path(BENCH_REPOSITORY)

    def pids(self) -> list[int]:
        """The process and its direct children: an nginx master and its workers."""
        return process_tree(self.child.proc.pid)


def start_mirror_server(python: str, work: Path, cache_dir: Path) -> Server:
    """`mirror run --store cache` on free loopback ports, serving `cache_dir`."""
    registry_port, metrics_port = free_ports(2)
    argv = mirror_argv(python, cache_dir, f"127.0.0.1:{registry_port}", f"127.0.0.1:{metrics_port}")
    child = start("mirror", argv, work / "mirror.log")
    return Server("mirror", child, f"http://127.0.0.1:{registry_port}")


def nginx_config(work: Path, port: int, location: str, *, workers: int, connections: int) -> str:
    """nginx as a fair baseline: sendfile, no access log, `location` beside a `/readyz`."""
    temp = work / "nginx-temp"
    return f"""\
daemon off;
master_process on;
worker_processes {workers};
{nginx_user_directive()}
pid {work / "nginx.pid"};
error_log {work / "nginx-error.log"} warn;

events {{
    worker_connections {connections};
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
        {location}
        location = /readyz {{
            return 200 "ready\\n";
        }}
    }}
}}
"""


def start_nginx(
    nginx: str, work: Path, location: str, *, workers: int = 1, connections: int = 64
) -> Server:
    """nginx on a free loopback port with `nginx_config`; its files live under `work`."""
    (port,) = free_ports(1)
    (work / "nginx-temp").mkdir()
    config = work / "nginx.conf"
    config.write_text(nginx_config(work, port, location, workers=workers, connections=connections))
    argv = [nginx, "-p", str(work), "-c", str(config), "-e", str(work / "nginx-error.log")]
    child = start("nginx", argv, work / "nginx.log")
    return Server("nginx", child, f"http://127.0.0.1:{port}")


# --- network-namespace labs: cold_pull.py and rollout.py --------------------------------------
#
# Every simulated node is a network namespace joined to one bridge by a veth pair (eth0 inside,
# `<namespace>-h` on the bridge), with its own containerd, its `ctr` pulls and maybe a mirror,
# all started with `ip netns exec` (which execs: the pid is the daemon's). A `Lab` records each
# namespace, link and process it makes and removes every one of them, however the run ends.

REGISTRY_PORT = 5000
MIRROR_PORT = 5000
METRICS_PORT = 9090
ROUTER_PORT = 5001
CONTAINERD_NAMESPACE = "k8s.io"
NS_READY_TIMEOUT = 60.0
CONNECT_TIMEOUT = 90.0
PULL_TIMEOUT = 900.0
# What pulls with unpacking (`--pull-client`): ctr's client-side pull, or CRI's PullImage.
PULL_CLIENTS = ("ctr", "cri")
LAYER_COPY_CHUNK = 4 * MIB

# gorilla/handlers combined log: `IP - - [date] "GET /v2/... HTTP/1.1" 200 1234 "" "agent"`.
_ACCESS_RE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<uri>\S+) [^"]*" '
    r"(?P<status>\d{3}) (?P<size>\d+|-)"
)
_SYNC_PARAM = "harness-sync"
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


def run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a short command, capturing its output; raise with its stderr if it fails."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


# Namespaces given a CPU share of their own (`Lab.cap_cpu`) -> their cgroup: every process
# `in_ns` starts there joins it (or, when the share is split, the part `in_ns` names) first.
_CPU_CAPS: dict[str, CpuCap] = {}
CPU_CGROUPS = Path("/sys/fs/cgroup/cpu")  # the cgroup v1 cpu controller
# A short period: a capped process runs a little every 10 ms instead of 10 ms in every 100,
# so a chain of nodes passing bytes on is not stalled by throttled gaps that do not line up.
_CPU_PERIOD_US = 10_000
# The parts of a node's split CPU share (`--node-cgroups split`): its runtime and pull client,
# and the service it pulls through (the mirror, or the registry of the floor or the proxy).
RUNTIME_PART = "runtime"
SERVICE_PART = "service"
NODE_CGROUP_LAYOUTS = ("one", "split", "pinned", "apart")


@dataclass(frozen=True, slots=True)
class CpuCap:
    """A namespace's cgroup, its quota the namespace's share of the CPUs; `split`: with a
    child of equal weight for each part (`RUNTIME_PART`, `SERVICE_PART`); `cpu`: the one CPU
    its processes run on (None: any); `service`: a cgroup of its own, with a share of its own,
    for the service part (None: it shares the namespace's)."""

    group: Path
    split: bool
    cpu: int | None = None
    service: Path | None = None

    def procs(self, part: str) -> Path:
        if part == SERVICE_PART and self.service is not None:
            return self.service / "cgroup.procs"
        return (self.group / part if self.split else self.group) / "cgroup.procs"


def in_ns(namespace: str, *argv: str, part: str = RUNTIME_PART) -> list[str]:
    """`argv` run inside a network namespace (`ip netns exec` execs it: same pid), in the
    namespace's CPU cgroup when it has one, or that cgroup's `part` when its share is split
    (the shell joins it, then execs: same pid too), and on its one CPU when it is pinned
    (`taskset` execs too)."""
    inner = ["ip", "netns", "exec", namespace, *argv]
    cap = _CPU_CAPS.get(namespace)
    if cap is None:
        return inner
    if cap.cpu is not None:
        inner = ["taskset", "--cpu-list", str(cap.cpu), *inner]
    return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cap.procs(part)), *inner]


def throttled_seconds(namespace: str) -> float | None:
    """How long the CPU cap held `namespace`'s processes back so far (its cgroup's cpu.stat
    `throttled_time`), None when the namespace has no cap."""
    cap = _CPU_CAPS.get(namespace)
    if cap is None:
        return None
    for line in (cap.group / "cpu.stat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == "throttled_time":
            return int(value) / 1e9
    return None


def poll(condition: Callable[[], bool], what: str, timeout: float) -> float:
    """Poll `condition` with a growing pause until true; raise after `timeout` seconds."""
    started = time.monotonic()
    pause = 0.01
    while not condition():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.2)
    return time.monotonic() - started


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def metric_samples(text: str, name: str) -> Iterator[tuple[dict[str, str], float]]:
    """The samples of `name` in Prometheus text `text`: each one's labels and value."""
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        head, _, value = line.rpartition(" ")
        parts = head[len(name) :].strip("{}").split(",") if "{" in head else []
        labels = dict(part.split("=", 1) for part in parts)
        yield {key: quoted.strip('"') for key, quoted in labels.items()}, float(value)


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    matching = (
        value
        for found, value in metric_samples(text, name)
        if all(found.get(key) == wanted for key, wanted in labels.items())
    )
    return sum(matching, 0.0)


def rate_bits(rate: str) -> float | None:
    """tc's `100mbit` as bits per second (None for a form this script does not know)."""
    match = re.fullmatch(r"([0-9.]+)([a-z]*)", rate.strip().lower())
    if match is None or match[2] not in _RATE_UNITS:
        return None
    return float(match[1]) * _RATE_UNITS[match[2]]


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


# the image -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Image:
    layout: Path
    manifest_digest: str
    blobs: dict[str, int]  # every blob a pull fetches (manifest, config, layers) -> size

    @property
    def size(self) -> int:
        return sum(self.blobs.values())


class _HashingWriter:
    """A write-only file object that hashes what passes through it on its way to `target`."""

    def __init__(self, target: object) -> None:
        self._target = target
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return int(self._target.write(data))  # type: ignore[attr-defined]

    def flush(self) -> None:
        self._target.flush()  # type: ignore[attr-defined]


class _RandomReader:
    """Random bytes for tarfile to copy into a layer, never more than one chunk in memory."""

    def read(self, size: int = -1) -> bytes:
        return os.urandom(LAYER_COPY_CHUNK if size < 0 else size)


def _random_layer(blob_dir: Path, name: str, size: int) -> tuple[str, int, str]:
    """A tar+gzip layer holding one file of `size` random bytes, written as it is made.

    Stored gzip (level 0, mtime 0, no file name): random bytes do not compress, and level 0
    takes no time. The tar has fixed owners and times, like the harness's layers, and never
    more than one chunk of it is in memory, so a 1 GiB layer costs no more RAM than a small one.
    Returns the layer's digest, its size and its diff_id (the digest of the tar, which the
    image config lists and containerd checks when it unpacks).
    """
    partial = blob_dir / "layer.partial"
    with open(partial, "wb") as handle:
        compressed = _HashingWriter(handle)
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=compressed, compresslevel=0, mtime=0)
        uncompressed = _HashingWriter(gz)
        with tarfile.open(
            fileobj=uncompressed,  # type: ignore[arg-type]
            mode="w|",
            format=tarfile.PAX_FORMAT,
            copybufsize=LAYER_COPY_CHUNK,
        ) as tar:
            directory = tarfile.TarInfo(str(Path(name).parent))
            directory.type, directory.mode = tarfile.DIRTYPE, 0o755
            data = tarfile.TarInfo(name)
            data.mode, data.size = 0o644, size
            for info in (directory, data):
                info.mtime = info.uid = info.gid = 0
                info.uname = info.gname = ""
            tar.addfile(directory)
            tar.addfile(data, _RandomReader())  # type: ignore[arg-type]
        gz.close()
        handle.flush()
        os.fsync(handle.fileno())
        length = handle.tell()
    digest = compressed.hash.hexdigest()
    os.replace(partial, blob_dir / digest)
    return f"sha256:{digest}", length, f"sha256:{uncompressed.hash.hexdigest()}"


def layer_sizes(total_mib: int, shares: Sequence[float]) -> list[int]:
    """The sizes of layers that split `total_mib` MiB by `shares` (4 KiB at the least)."""
    return [max(4096, int(total_mib * MIB * share)) for share in shares]


def build_image(layout: Path, sizes: Sequence[int], tag: str) -> Image:
    """An OCI layout: one linux manifest for this machine's architecture, one random layer of
    each size (stored gzip), a config naming their diff_ids, and `tag` in index.json."""
    blob_dir = layout / "blobs" / "sha256"
    blob_dir.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    blobs: dict[str, int] = {}

    def add(data: bytes, media_type: str) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blob_dir / digest).write_bytes(data)
        blobs[f"sha256:{digest}"] = len(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    layers, diff_ids = [], []
    for index, size in enumerate(sizes):
        digest, length, diff_id = _random_layer(blob_dir, f"layer{index}/data.bin", size)
        blobs[digest] = length
        layers.append({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": length})
        diff_ids.append(diff_id)
    config = {
        "architecture": host_arch(),
        "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_desc = add(canonical_json(config), OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc,
        "layers": layers,
    }
    top = add(canonical_json(manifest), OCI_MANIFEST)
    ref = {**top, "annotations": {"org.opencontainers.image.ref.name": tag}}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [ref]}
    (layout / "index.json").write_bytes(canonical_json(index))
    return Image(layout=layout, manifest_digest=str(top["digest"]), blobs=blobs)


def push_image(image: Image, tag: str, ref: str) -> None:
    """Push the layout's `tag` to `ref` on a plain-HTTP registry, digests unchanged."""
    run_skopeo(
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        f"oci:{image.layout}:{tag}",
        f"docker://{ref}",
    )


# daemons in namespaces -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Traffic:
    """What a registry answered to GETs, from its access log."""

    sent: int  # body bytes of every GET
    blob_bytes: int  # of those, the bytes of blob GETs
    blob_gets: int


class NamespacedRegistry(Registry):
    """The harness's distribution registry, listening on `address` inside `namespace`."""

    def __init__(
        self, base_dir: Path, namespace: str, address: str, *, extra_config: str = ""
    ) -> None:
        self._address = address  # before __init__, which writes the config from `host`
        super().__init__(base_dir, port=REGISTRY_PORT, extra_config=extra_config)
        self.process = ManagedProcess(
            in_ns(namespace, REGISTRY_BINARY, "serve", str(self.config_path), part=SERVICE_PART),
            base_dir,
            "registry",
            stdout_path=self.access_log_path,
        )

    @property
    def host(self) -> str:
        return f"{self._address}:{self.port}"

    def log_size(self) -> int:
        """The access log's length now, every request answered so far included."""
        self.sync_access_log()
        return self.access_log_path.stat().st_size if self.access_log_path.exists() else 0

    def traffic_since(self, offset: int) -> Traffic:
        """What GETs logged after byte `offset` of the access log were answered with."""
        self.sync_access_log()
        with open(self.access_log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        sent = blob_bytes = blob_gets = 0
        for line in text.splitlines():
            match = _ACCESS_RE.match(line)
            if match is None or _SYNC_PARAM in line or match["method"] != "GET":
                continue
            size = 0 if match["size"] == "-" else int(match["size"])
            sent += size
            if "/blobs/" in match["uri"]:
                blob_gets += 1
                blob_bytes += size
        return Traffic(sent, blob_bytes, blob_gets)

    def holds_blobs(self, image: Image) -> bool:
        """Every blob of `image` is in this registry's storage at its full size."""
        root = self.storage_dir / "docker" / "registry" / "v2" / "blobs" / "sha256"
        for digest, size in image.blobs.items():
            hex_digest = digest.split(":", 1)[1]
            data = root / hex_digest[:2] / hex_digest / "data"
            if not data.is_file() or data.stat().st_size != size:
                return False
        return True


def containerd_config(base: Path, *, cri_hosts_dir: Path | None = None) -> str:
    """The harness's containerd config with root, state and sockets under `base`; CRI off
    unless given the hosts.toml directory its pulls go through."""
    return containerd_config_text(
        base / "root", base / "state", base, base, cri_hosts_dir=cri_hosts_dir
    )


@dataclass
class Node:
    index: int
    namespace: str
    ip: str
    base: Path | None = None  # this mode's directory: containerd, hosts.toml, mirror cache
    containerd: ManagedProcess | None = None
    mirror: ManagedProcess | None = None

    @property
    def socket(self) -> Path:
        assert self.base is not None
        return self.base / "containerd.sock"

    @property
    def content_dir(self) -> Path:
        assert self.base is not None
        return self.base / "root" / "io.containerd.content.v1.content" / "blobs"

    @property
    def hosts_dir(self) -> Path:
        assert self.base is not None
        return self.base / "hosts"

    @property
    def mirror_url(self) -> str:
        return f"http://{self.ip}:{MIRROR_PORT}"

    def ctr_argv(self, *args: str) -> list[str]:
        return ["ctr", "-a", str(self.socket), "-n", CONTAINERD_NAMESPACE, *args]

    def metrics_text(self) -> str:
        url = f"http://{self.ip}:{METRICS_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def write_hosts(self, registry_host: str, server_url: str, mirror_urls: Sequence[str]) -> None:
        """hosts.toml for `registry_host`: the mirrors first, `server_url` behind them."""
        write_hosts_toml(self.hosts_dir, registry_host, server_url, mirror_urls)


@dataclass(frozen=True, slots=True)
class LabNames:
    """How one benchmark names what it makes, so an earlier run's leftovers can be found."""

    prefix: str  # namespaces `PREFIX-<short>`, links `PREFIX-<short>-h`, bridge `PREFIX-br0`
    subnet: str  # the first three octets of the /24 on the bridge
    tmp_prefix: str  # its temporary directory's name

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br0"

    @property
    def bridge_ip(self) -> str:
        return f"{self.subnet}.1"


class Lab:
    """Namespaces, links and processes this run made; `close` removes every one of them."""

    def __init__(
        self, names: LabNames, *, pull_progress: bool = False, pull_client: str = "ctr"
    ) -> None:
        self.names = names
        self.pull_progress = pull_progress
        self.pull_client = pull_client  # "ctr" or "cri" (see PULL_CLIENTS)
        self.namespaces: list[str] = []
        self.links: list[str] = []
        self.processes: list[ManagedProcess] = []
        self.cgroups: list[Path] = []
        self._pinned = 0  # namespaces pinned to a CPU so far (`cap_cpu`)
        self._pulls: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self.closing = False

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def add_bridge(self) -> None:
        bridge = self.names.bridge
        run("ip", "link", "add", bridge, "type", "bridge")
        self.links.append(bridge)
        run("ip", "addr", "add", f"{self.names.bridge_ip}/24", "dev", bridge)
        run("ip", "link", "set", bridge, "up")

    def add_host(self, short: str, ip: str) -> str:
        """Namespace `PREFIX-<short>` with eth0 at `ip`, plugged into the bridge; its name."""
        namespace = f"{self.names.prefix}-{short}"
        outer, inner = f"{namespace}-h", f"{namespace}-i"
        run("ip", "netns", "add", namespace)
        self.namespaces.append(namespace)
        run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        self.links.append(outer)
        run("ip", "link", "set", inner, "netns", namespace)
        run("ip", "-n", namespace, "link", "set", inner, "name", "eth0")
        run("ip", "-n", namespace, "addr", "add", f"{ip}/24", "dev", "eth0")
        run("ip", "-n", namespace, "link", "set", "eth0", "up")
        run("ip", "-n", namespace, "link", "set", "lo", "up")
        run("ip", "link", "set", outer, "master", self.names.bridge)
        run("ip", "link", "set", outer, "up")
        return namespace

    def cap_cpu(self, namespace: str, cpus: float, *, layout: str = "one") -> None:
        """Give every process later started in `namespace` `cpus` CPUs at most, together: a
        cgroup of its own (cgroup v1 `cpu.cfs_quota_us`), so simulated nodes whose shares add
        up to less than the machine each run as on a small machine of their own instead of
        competing for the host's cores.

        `layout` (`NODE_CGROUP_LAYOUTS`): "one" cgroup for all the namespace's processes.
        "split": the share has two parts of equal weight (`cpu.shares`), as on a real node,
        where the runtime (a system service) and the mirror (a pod, or a Nomad allocation)
        are in cgroups of their own: the runtime and its pull client in one, the service they
        pull through in the other. In one group the scheduler shares the CPU among threads
        instead, containerd's many against the mirror's one. Measured at 16 nodes, the split
        had fewer probes answered late and the same time per CPU second (docs/benchmarks.md).
        "pinned": one cgroup whose processes all run on one CPU, the namespaces taking the
        machine's CPUs in turn. A quota is handed to each CPU in slices of up to
        `sched_cfs_bandwidth_slice_us` (5 ms), more than a 0.1-CPU share's whole period (1 ms of
        every 10): a thread of the node that wakes on the other CPU than its runtime can take
        the period's quota there and leave the runtime throttled. On one CPU a node's threads
        share one run queue, as a small machine's do, and only its CPU time counts.
        "apart": the runtime and its pull client in the namespace's cgroup, the service they
        pull through in a cgroup of its own with a share of its own, as large: a node whose
        mirror runs as a pod (or a Nomad task) with a CPU limit of its own beside a system
        containerd, and has the CPU for both, where in the other layouts every CPU second
        the service takes is one the runtime waits for. The shares then promise the host's
        CPUs twice over; the machine's busy share, printed with every case, says whether
        that bound."""
        if layout not in NODE_CGROUP_LAYOUTS:
            raise ValueError(f"unknown node cgroup layout {layout!r}")
        if not (CPU_CGROUPS / "cpu.cfs_quota_us").exists():
            raise RuntimeError(
                f"--cpus-per-node needs the cgroup v1 cpu controller at {CPU_CGROUPS}"
            )
        parent = CPU_CGROUPS / self.names.prefix
        if not parent.exists():
            parent.mkdir()
            self.cgroups.append(parent)
        group = self._capped_group(parent / namespace, cpus)
        split = layout == "split"
        if split:
            for part in (RUNTIME_PART, SERVICE_PART):
                (group / part).mkdir()
                self.cgroups.append(group / part)
        service = None
        if layout == "apart":
            service = self._capped_group(parent / f"{namespace}-{SERVICE_PART}", cpus)
        cpu = None
        if layout == "pinned":
            usable = sorted(os.sched_getaffinity(0))
            cpu = usable[self._pinned % len(usable)]
            self._pinned += 1
        _CPU_CAPS[namespace] = CpuCap(group, split, cpu, service)

    def _capped_group(self, group: Path, cpus: float) -> Path:
        """A new cgroup at `group` (removed on `close`) whose processes use `cpus` CPUs at most."""
        group.mkdir()
        self.cgroups.append(group)
        (group / "cpu.cfs_period_us").write_text(str(_CPU_PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(max(1000, round(cpus * _CPU_PERIOD_US))))
        return group

    def start(self, argv: Sequence[str], log_dir: Path, name: str) -> ManagedProcess:
        process = ManagedProcess(argv, log_dir, name, cwd=REPO)
        self.track(process)
        process.start()
        return process

    def track(self, process: ManagedProcess) -> None:
        self.processes.append(process)

    def pids(self) -> list[int]:
        with self._lock:
            pulls = [proc.pid for proc in self._pulls]
        return [p.pid for p in self.processes if p.pid is not None and p.running] + pulls

    def spawn_pull(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as output:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        with self._lock:
            self._pulls.add(proc)
        return proc

    def pull_done(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._pulls.discard(proc)

    def stop(self, processes: Sequence[ManagedProcess]) -> None:
        """Stop processes in parallel (SIGTERM, SIGKILL after a while) and forget them."""
        threads = [threading.Thread(target=p.stop, args=(STOP_TIMEOUT,)) for p in processes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for process in processes:
            if process in self.processes:
                self.processes.remove(process)

    def close(self) -> None:
        """Remove everything, ignoring Ctrl-C and SIGTERM meanwhile so nothing is left half-way."""
        previous = {
            sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        self.closing = True
        try:
            with self._lock:
                pulls = list(self._pulls)
            for proc in pulls:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            self.stop(list(self.processes))
            for namespace in self.namespaces:
                # Only descendants of what this run started can be in its own namespaces.
                listed = run("ip", "netns", "pids", namespace, check=False).stdout.split()
                for pid in listed:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
            for link in reversed(self.links):
                run("ip", "link", "del", link, check=False)
            for namespace in self.namespaces:
                run("ip", "netns", "del", namespace, check=False)
                _CPU_CAPS.pop(namespace, None)
            for group in reversed(self.cgroups):
                remove_cgroup(group)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def remove_cgroup(group: Path) -> None:
    """rmdir a cgroup whose processes were killed (it is busy until the kernel reaped them)."""
    deadline = time.monotonic() + 10
    while group.exists():
        try:
            group.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def leftovers(names: LabNames, tmp_parent: Path) -> tuple[list[str], list[str], list[Path]]:
    """Namespaces, links, temporary directories and CPU cgroups named like this benchmark's."""
    namespaces = [
        line.split()[0]
        for line in run("ip", "netns", "list").stdout.splitlines()
        if line.split() and line.split()[0].startswith(f"{names.prefix}-")
    ]
    links = []
    for line in run("ip", "-o", "link", "show").stdout.splitlines():
        name = line.split(":", 2)[1].strip().split("@", 1)[0]
        if name.startswith(f"{names.prefix}-"):
            links.append(name)
    dirs = sorted(tmp_parent.glob(f"{names.tmp_prefix}*"))
    groups = CPU_CGROUPS / names.prefix
    if groups.is_dir():  # the deepest first: a cgroup is removed after its children
        nested = [p for p in groups.rglob("*") if p.is_dir()]
        dirs += [*sorted(nested, key=lambda p: -len(p.parts)), groups]
    return namespaces, links, dirs


def check_leftovers(names: LabNames, tmp_parent: Path, clean: bool) -> None:
    """Refuse to start next to an earlier run's namespaces, links or directories (or a run
    in progress); with `clean`, remove them first."""
    namespaces, links, dirs = leftovers(names, tmp_parent)
    if not (namespaces or links or dirs):
        return
    listing = ", ".join([*namespaces, *links, *(str(d) for d in dirs)])
    if not clean:
        raise RuntimeError(
            f"leftovers of an earlier run (or a run in progress): {listing}; "
            "run again with --clean-leftovers to remove them"
        )
    print(f"removing leftovers of an earlier run: {listing}", flush=True)
    for namespace in namespaces:
        for pid in run("ip", "netns", "pids", namespace, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    for link in links:
        run("ip", "link", "del", link, check=False)
    for namespace in namespaces:
        run("ip", "netns", "del", namespace, check=False)
    for directory in dirs:
        if directory.is_relative_to(CPU_CGROUPS):
            remove_cgroup(directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    namespaces, links, dirs = leftovers(names, tmp_parent)
    if namespaces or links or dirs:
        raise RuntimeError(f"could not remove: {namespaces + links + [str(d) for d in dirs]}")


def check_subnet(names: LabNames) -> None:
    """Refuse to add a second route to the benchmark's subnet."""
    routes = run("ip", "-4", "route", "show").stdout
    if re.search(rf"(^|\s){re.escape(names.subnet)}\.", routes):
        raise RuntimeError(f"{names.subnet}.0/24 is already routed here:\n{routes}")


def add_node_cgroups_argument(parser: argparse.ArgumentParser) -> None:
    """`--node-cgroups`: how a node's `--cpus-per-node` share is laid out (`Lab.cap_cpu`)."""
    parser.add_argument(
        "--node-cgroups",
        choices=NODE_CGROUP_LAYOUTS,
        default=NODE_CGROUP_LAYOUTS[0],
        help="with --cpus-per-node: 'one' (default) puts every process of a node in one "
        "cgroup, where the scheduler shares the CPU among threads; 'split' gives the node's "
        "runtime and the service it pulls through (the mirror, or the floor's registry) a "
        "cgroup each, of equal weight, within the node's share, as on a real node; 'pinned' "
        "is 'one' with the node's processes on one CPU (the nodes take the CPUs in turn), so "
        "a thread waking on another CPU cannot hold the node's quota from its runtime; "
        "'apart' gives the service a cgroup and a share of its own, as large as the "
        "runtime's, as a mirror pod with its own CPU limit beside a system containerd",
    )


def add_lab_arguments(parser: argparse.ArgumentParser, *, unit: str) -> None:
    """--resolve-timeout, --mirror-log-level, --keep-logs and --clean-leftovers."""
    parser.add_argument(
        "--resolve-timeout", default="50ms", help="mirror --resolve-timeout (default: 50ms)"
    )
    parser.add_argument(
        "--mirror-log-level", default="info", help="mirror --log-level (default: info)"
    )
    parser.add_argument(
        "--keep-logs",
        default=None,
        help=f"copy every daemon's and pull's log of each {unit} into this directory",
    )
    parser.add_argument(
        "--clean-leftovers",
        action="store_true",
        help="remove namespaces, links and temporary directories an earlier run left",
    )
    parser.add_argument(
        "--ctr-progress",
        action="store_true",
        help="let every `ctr` pull draw its progress table (polls containerd 10 times a second; "
        "off by default: a kubelet's pull does not, see `pull_argv`)",
    )
    parser.add_argument(
        "--pull-client",
        choices=PULL_CLIENTS,
        default="ctr",
        help="what pulls with unpacking: `ctr images pull` (ctr fetches and hands every byte "
        "to containerd over gRPC) or `cri`, the CRI PullImage call a kubelet makes "
        "(containerd fetches and unpacks in its own process); content-only fetches always "
        "use `ctr content fetch` (default: ctr)",
    )


def add_shaping_arguments(
    parser: argparse.ArgumentParser, *, rate: str, burst: str, links: str
) -> None:
    """--rate, --burst and --latency of the `tc ... tbf` on `links` (see `shape_egress`)."""
    parser.add_argument("--rate", default=rate, help=f"tbf rate of {links} (default: {rate})")
    parser.add_argument("--burst", default=burst, help=f"tbf burst (default: {burst})")
    parser.add_argument("--latency", default="50ms", help="tbf latency (default: 50ms)")


def add_lab_tool_arguments(parser: argparse.ArgumentParser) -> None:
    """--python (what runs the mirrors) and --tmp-dir."""
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="Python that runs the mirror nodes (default: this one)",
    )
    parser.add_argument(
        "--tmp-dir", default=None, help="where to create the temporary directory (default: $TMPDIR)"
    )


def prepare_lab(names: LabNames, args: argparse.Namespace) -> Path:
    """Check what a namespace lab needs before anything is made: root, the programs, no
    leftovers of an earlier run (removed with --clean-leftovers), a free subnet. Returns the
    directory the temporary one goes in."""
    if os.geteuid() != 0:
        raise RuntimeError("needs root: it creates network namespaces, veths and a bridge")
    require_tools("ip", "tc", "containerd", "ctr", "skopeo", REGISTRY_BINARY)
    tmp_parent = Path(args.tmp_dir or tempfile.gettempdir())
    check_leftovers(names, tmp_parent, args.clean_leftovers)
    check_subnet(names)
    return tmp_parent


def check_socket_paths(work: Path, deepest: str) -> None:
    """containerd's sockets must fit sun_path (108 bytes): refuse a temp dir that is too deep."""
    if len(str(work / deepest / "containerd.sock.ttrpc")) > 100:
        raise RuntimeError(f"{work} is too long a path for containerd's sockets")


def shape_egress(namespace: str | None, dev: str, rate: str, burst: str, latency: str) -> None:
    """A token bucket (`tc ... tbf`) on what `dev` (in `namespace`, or this one) sends."""
    argv = ["tc", "qdisc", "add", "dev", dev, "root", "tbf"]
    argv += ["rate", rate, "burst", burst, "latency", latency]
    run(*(in_ns(namespace, *argv) if namespace else argv))


def qdisc_bytes(namespace: str | None, dev: str) -> int:
    """Bytes the root qdisc of `dev` (in `namespace`, or this one) has sent so far."""
    argv = ["tc", "-s", "-j", "qdisc", "show", "dev", dev]
    out = run(*(in_ns(namespace, *argv) if namespace else argv))
    return sum(int(q.get("bytes", 0)) for q in json.loads(out.stdout) if q.get("root"))


def udp_datagrams(namespace: str) -> tuple[int, int]:
    """UDP datagrams received and sent so far inside `namespace` (`/proc/net/snmp`): on a
    benchmark node only the mirror's DHT speaks UDP, so this is its message count."""
    lines = run(*in_ns(namespace, "cat", "/proc/net/snmp")).stdout.splitlines()
    names, values = (line.split() for line in lines if line.startswith("Udp:"))
    counters = dict(zip(names[1:], map(int, values[1:]), strict=True))
    return counters["InDatagrams"], counters["OutDatagrams"]


def congestion_control_in(namespace: str) -> str:
    """The TCP congestion control inside a namespace (new namespaces copy the host's)."""
    done = run(*in_ns(namespace, "cat", "/proc/sys/net/ipv4/tcp_congestion_control"))
    return done.stdout.strip()


def keygen(python: str, out: Path) -> None:
    argv = [python, "-m", "mirror", "keygen", "--out", str(out)]
    subprocess.run(argv, check=True, cwd=REPO, capture_output=True, timeout=60)


# per node: containerd, mirror, pulls -----------------------------------------------------------


def start_containerd(lab: Lab, node: Node, base: Path) -> None:
    """A fresh containerd for `node` (new root, state and content store) under `base`."""
    node.base = base
    base.mkdir(parents=True)
    config = base / "config.toml"
    cri_hosts_dir = node.hosts_dir if lab.pull_client == "cri" else None
    config.write_text(containerd_config(base, cri_hosts_dir=cri_hosts_dir))
    node.containerd = lab.start(
        in_ns(node.namespace, "containerd", "--config", str(config)), base, "containerd"
    )


def wait_containerd(node: Node) -> None:
    def answers() -> bool:
        assert node.containerd is not None
        node.containerd.ensure_running()
        if not node.socket.exists():
            return False
        done = subprocess.run(
            node.ctr_argv("version"), capture_output=True, timeout=10, check=False
        )
        return done.returncode == 0

    poll(answers, f"containerd of node {node.index}", NS_READY_TIMEOUT)


@dataclass(frozen=True, slots=True)
class MirrorSettings:
    """What every mirror of a run is started with (see start_mirror)."""

    python: str
    key_file: Path
    routers: tuple[str, ...]  # HOST:PORT of every node's router, for static bootstrap
    upstream: str  # HOST:PORT of the upstream registry, fetched over plain HTTP
    resolve_timeout: str
    log_level: str
    extra: tuple[str, ...] = ()


def start_mirror(lab: Lab, node: Node, settings: MirrorSettings) -> None:
    """`python -m mirror run --store containerd` on `node`, serving its containerd's content."""
    assert node.base is not None
    argv = [
        settings.python,
        "-m",
        "mirror",
        "run",
        "--store=containerd",
        f"--containerd-sock={node.socket}",
        f"--cache-dir={node.base / 'cache'}",
        f"--cluster-key-file={settings.key_file}",
        f"--router-addr={node.ip}:{ROUTER_PORT}",
        f"--bootstrap=static:{','.join(settings.routers)}",
        f"--upstream={settings.upstream}=http://{settings.upstream}",
        f"--registry-addr={node.ip}:{MIRROR_PORT}",
        f"--metrics-addr={node.ip}:{METRICS_PORT}",
        f"--resolve-timeout={settings.resolve_timeout}",
        # containerd reaches its mirror from the node's own address, not from loopback.
        f"--allow-client={node.ip}/32",
        f"--log-level={settings.log_level}",
        *settings.extra,
    ]
    node.mirror = lab.start(in_ns(node.namespace, *argv, part=SERVICE_PART), node.base, "mirror")


def wait_mirrors(nodes: Sequence[Node]) -> float:
    """Until every mirror is ready and knows all the others; the seconds that took."""
    started = time.monotonic()
    for node in nodes:

        def ready(node: Node = node) -> bool:
            assert node.mirror is not None
            node.mirror.ensure_running()
            return http_ok(f"{node.mirror_url}/readyz")

        poll(ready, f"mirror of node {node.index} to be ready", NS_READY_TIMEOUT)
    for node in nodes:

        def connected(node: Node = node) -> bool:
            assert node.mirror is not None
            node.mirror.ensure_running()
            try:
                text = node.metrics_text()
            except (urllib.error.URLError, OSError):
                return False
            return metric_sum(text, "mirror_dht_contacts") >= len(nodes) - 1

        poll(connected, f"mirror of node {node.index} to know its peers", CONNECT_TIMEOUT)
    return time.monotonic() - started


def pull_argv(
    node: Node, ref: str, *, mirrored: bool, unpack: bool, progress: bool = False
) -> list[str]:
    """`ctr images pull` (fetch and unpack) or `ctr content fetch` (the same transfers, no
    unpacking and no image record) of `ref` on `node`, through its hosts.toml if `mirrored`.

    Without `progress` the pull runs with ctr's `--debug`, the only way to turn its progress
    table off: drawing it, ctr asks containerd for every ingest's status and every blob's info
    ten times a second for as long as the pull lasts, which inside a node's CPU cap costs the
    pull a share of its CPU that grows with the pull's own length. A kubelet's pull through CRI
    polls nothing of the kind, so the benchmarks leave it out for every mode alike.
    """
    # Straight to upstream: --plain-http (containerd 1.6 rejects a hosts.toml that names
    # only a server: "invalid `host` tree").
    where = ["--hosts-dir", str(node.hosts_dir)] if mirrored else ["--plain-http"]
    command = ("images", "pull") if unpack else ("content", "fetch")
    quiet = [] if progress else ["--debug"]
    return in_ns(node.namespace, *node.ctr_argv(*quiet, *command, *where, ref))


class PullFailed(Exception):
    """One node's pull did not end well; the message says which node and why."""


# A node's pull: prepares, waits at the barrier (every node's pull starts together), pulls,
# and returns its (start, end) on the monotonic clock, or None when the lab is closing.
NodePull = Callable[[Node, threading.Barrier], "tuple[float, float] | None"]


def pull_all(
    lab: Lab, nodes: Sequence[Node], ref: str, *, mirrored: bool, unpack: bool
) -> tuple[float, list[float]]:
    """Every node pulls at the same moment; (completion, per-node seconds in node order).

    Completion runs from the first pull's start to the last pull's end.
    """
    if unpack and lab.pull_client == "cri":
        return pull_at_once(nodes, cri_pull(ref, mirrored=mirrored))

    def pull(node: Node, barrier: threading.Barrier) -> tuple[float, float] | None:
        assert node.base is not None
        log = node.base / "pull.log"
        argv = pull_argv(node, ref, mirrored=mirrored, unpack=unpack, progress=lab.pull_progress)
        barrier.wait()
        began = time.monotonic()
        proc = lab.spawn_pull(argv, log)
        try:
            code = proc.wait(timeout=PULL_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        ended = time.monotonic()
        lab.pull_done(proc)
        if lab.closing:
            return None  # stopped by the clean-up; its directory may be gone already
        if code != 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            tail = log.read_text(errors="replace")[-2000:]
            raise PullFailed(f"node {node.index}: ctr pull ended with {code}:\n{tail}")
        return began, ended

    return pull_at_once(nodes, pull)


def cri_pull(ref: str, *, mirrored: bool) -> NodePull:
    """A node's pull as a kubelet's: CRI's PullImage of `ref` asked of the node's containerd,
    which fetches and unpacks in its own process, inside the node's CPU cap; the call itself
    (a gRPC client in this process) costs the node nothing.

    CRI reads only hosts.toml, so a pull straight from upstream (not `mirrored`) gets one
    naming upstream as its sole host (containerd 1.6 rejects a file with only a server).
    """
    registry_host = ref.split("/", 1)[0]
    request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref))

    def pull(node: Node, barrier: threading.Barrier) -> tuple[float, float] | None:
        if not mirrored:
            node.write_hosts(registry_host, f"http://{registry_host}", [f"http://{registry_host}"])
        with grpc.insecure_channel(f"unix://{node.socket}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=NS_READY_TIMEOUT)
            except grpc.FutureTimeoutError:
                raise PullFailed(f"node {node.index}: containerd's socket did not answer") from None
            barrier.wait()
            began = time.monotonic()
            try:
                api_pb2_grpc.ImageServiceStub(channel).PullImage(request, timeout=PULL_TIMEOUT)
            except grpc.RpcError as error:
                raise PullFailed(f"node {node.index}: CRI PullImage failed: {error}") from None
            return began, time.monotonic()

    return pull


def pull_at_once(nodes: Sequence[Node], pull: NodePull) -> tuple[float, list[float]]:
    """`pull` on every node, each on a thread, released together; as `pull_all` returns."""
    barrier = threading.Barrier(len(nodes))
    spans: list[tuple[float, float] | None] = [None] * len(nodes)
    failures: list[str] = []

    def run(slot: int, node: Node) -> None:
        try:
            spans[slot] = pull(node, barrier)
        except threading.BrokenBarrierError:
            pass  # another node's pull failed before the start
        except PullFailed as failure:
            failures.append(str(failure))
            barrier.abort()

    threads = [
        threading.Thread(target=run, args=(slot, node), daemon=True)
        for slot, node in enumerate(nodes)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError("\n".join(failures))
    done = [span for span in spans if span is not None]
    completion = max(end for _, end in done) - min(begin for begin, _ in done)
    return completion, [end - begin for begin, end in done]


def verify_pulled(nodes: Sequence[Node], image: Image, ref: str, *, unpack: bool) -> None:
    """Every node holds the image under its name (when unpacked) and every blob in full."""
    for node in nodes:
        listed = run(*node.ctr_argv("images", "ls", "-q")).stdout.split()
        if ref not in listed and unpack:
            raise RuntimeError(f"node {node.index} has no image {ref}: {listed}")
        for digest, size in image.blobs.items():
            path = node.content_dir / digest.replace(":", "/", 1)
            if not path.is_file() or path.stat().st_size != size:
                raise RuntimeError(f"node {node.index} lacks {digest} ({size} bytes)")


def pids_of(processes: Sequence[ManagedProcess | None]) -> list[int]:
    """The pids of those of `processes` that run (were started and not reaped)."""
    return [p.pid for p in processes if p is not None and p.pid is not None]


def cpu_groups(
    nodes: Sequence[Node], started: Sequence[ManagedProcess], upstream: ManagedProcess
) -> dict[str, Callable[[], float]]:
    """CPU seconds so far of each kind of process a mode runs, as callables: the pulls (once
    reaped), the containerds, upstream, the registries in `started`, the mirrors."""

    def of(processes: Sequence[ManagedProcess | None]) -> Callable[[], float]:
        pids = pids_of(processes)
        return lambda: cpu_seconds(pids)

    groups = {
        "ctr": children_cpu_seconds,
        "containerd": of([node.containerd for node in nodes]),
        "upstream": of([upstream]),
    }
    registries = [p for p in started if p.name == "registry"]
    if registries:
        # One proxy on the holder, or (the rollout's local mode) one registry on each node.
        groups["proxy" if len(registries) == 1 else "registries"] = of(registries)
    if any(node.mirror is not None for node in nodes):
        groups["mirrors"] = of([node.mirror for node in nodes])
    return groups


def mirror_notes(nodes: Sequence[Node]) -> list[str]:
    """What the mirrors did, summed over the nodes, from their /metrics."""
    totals: dict[str, float] = {}
    per_node_upstream = []
    for node in nodes:
        text = node.metrics_text()
        values = {
            "coalesced node": metric_sum(text, "mirror_coalesced_waits_total", where="node"),
            "coalesced cluster": metric_sum(text, "mirror_coalesced_waits_total", where="cluster"),
            "blob GETs from local": metric_sum(
                text, "mirror_requests_total", kind="blob", method="GET", source="local"
            ),
            "from peer": metric_sum(
                text, "mirror_requests_total", kind="blob", method="GET", source="peer"
            ),
            "from upstream": metric_sum(
                text, "mirror_requests_total", kind="blob", method="GET", source="upstream"
            ),
            "peer failures": metric_sum(text, "mirror_peer_fetch_failures_total"),
            "upstream blob fetches": metric_sum(text, "mirror_upstream_fetches_total", kind="blob"),
        }
        per_node_upstream.append(metric_sum(text, "mirror_upstream_bytes_total") / MIB)
        for key, value in values.items():
            totals[key] = totals.get(key, 0.0) + value
    summary = ", ".join(f"{key} {value:g}" for key, value in totals.items())
    fetched = " ".join(f"{mib:.1f}" for mib in per_node_upstream)
    return [f"mirrors: {summary}", f"MiB each mirror received from upstream: {fetched}"]


def cpu_note(cpu_used: dict[str, float], completion: float) -> str:
    """The CPU seconds each kind of process used during the pulls, against what the machine
    had in that time: every simulated node shares the host's CPUs."""
    cpus = os.cpu_count() or 1
    total = sum(cpu_used.values())
    return (
        "CPU seconds during the pulls: "
        + ", ".join(f"{name} {seconds:.1f}" for name, seconds in cpu_used.items())
        + f"; {total:.1f} in all, at least {total / cpus:.1f}s on {cpus} CPUs"
        f" (the machine had {completion * cpus:.1f})"
    )


def copy_logs(keep_logs: str | None, mode: str, mode_dir: Path) -> None:
    """Copy every `*.log` under `mode_dir` to `keep_logs/mode/` (when asked to keep logs)."""
    if keep_logs is None or not mode_dir.exists():
        return
    target = Path(keep_logs) / mode
    for log in mode_dir.rglob("*.log"):
        destination = target / log.relative_to(mode_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, destination)
