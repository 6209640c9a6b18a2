"""What the loopback throughput benchmarks share: blobs in a node cache, child processes, curl.

`blob_throughput.py` (mirror against nginx) and `peer_throughput.py` (a blob through a peer
against the same blob locally) measure the same way: a random blob written into a temporary node
cache, servers started as child processes on free loopback ports, curl downloading to /dev/null,
CPU seconds read from /proc, a note of how busy the rest of the machine was, and the same
options and exit handling. Keeping those pieces here means the two benchmarks measure and clean
up identically, so their figures can be read side by side.

The scripts are run by path (`.venv/bin/python bench/blob_throughput.py`), which puts this
directory on sys.path: they import this module as `common`.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import hashlib
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

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


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU time the processes used so far (none for one that is gone)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])
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
