#!/usr/bin/env python3
"""Cold concurrent pull: N containerd nodes pull one image at once, upstream behind a slow link.

Topology (all made by this script, all removed at the end, Ctrl-C and errors included):

    root namespace: bridge cpb-br0 10.213.0.1/24 (unshaped; also how this script reaches
    every daemon)
      ├── cpb-up   10.213.0.2   upstream `docker-registry`; its eth0 egress (what upstream
      │                          sends) shaped with `tc qdisc ... tbf rate RATE`
      ├── cpb-px   10.213.0.3   mode proxy: `docker-registry` with `proxy: remoteurl: upstream`
      └── cpb-nI   10.213.0.11+I node I: its own containerd (started with `ip netns exec`), the
                                 `ctr images pull` client, and in mode mirror its own
                                 `python -m mirror run --store containerd`

Each namespace is joined to the bridge by a veth pair. The image (one OCI manifest, config and six
tar+gzip layers of random bytes, `--image-mib` in all) is built in an OCI layout and pushed to the
upstream once with skopeo. Then the modes run one after the other, each on fresh containerd state
(new root, state and content directories), a fresh proxy storage and fresh mirror caches:

- baseline: node 0 alone pulls straight from upstream: T1.
- direct: all N nodes pull straight from upstream at once (`ctr images pull --plain-http`:
  containerd 1.6 rejects a hosts.toml that names only a server).
- proxy: all N pull through one distribution registry in proxy mode (hosts.toml mirror).
- mirror: every node runs a mirror (one cluster key, static bootstrap of every router, `--upstream`
  for the upstream, `--allow-client` for its own address since containerd does not reach it over
  loopback); its containerd's hosts.toml points at its own mirror. The cluster is formed first
  (every node's `mirror_dht_contacts` reaches N-1), then all N pull at once. The mirrors'
  /metrics (coalesced waits, where blobs came from, bytes each received from upstream) are
  printed after the pulls.

The pulls of a mode start together (threads released by one barrier, each running
`ip netns exec cpb-nI ctr images pull --hosts-dir ...`; ctr fetches and containerd unpacks;
with `--no-unpack`, `ctr content fetch`: the same transfers without the unpacking).
Completion time is from the first pull's start to the last pull's end. Upstream bytes are the sum
of the response body sizes in the upstream registry's access log (GETs of manifests and blobs)
for the mode; the bytes the shaped qdisc sent (`tc -s`, IP packets with headers, ACKs excluded as
they flow the other way) are shown beside them. Both are divided by the image size (manifest,
config and layers). Each mode also prints the CPU seconds its processes used during the pulls
(ctr, containerd, registries, mirrors) against what the machine had: every simulated node shares
the host's CPUs, and a run that needs them all is CPU-bound, not network-bound.

Run as root with the project's venv: `.venv/bin/python bench/cold_pull.py [--nodes 8]
[--image-mib 75] [--rate 100mbit] [--modes baseline,direct,proxy,mirror]`. It refuses to start
when namespaces, links or temporary directories of an earlier run are left (`--clean-leftovers`
removes them). `--keep-logs DIR` copies every daemon's and pull's log of each mode there
(with `--mirror-log-level debug` the mirrors log their DHT claims and RPC timeouts). Results are
in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    MIB,
    OtherLoad,
    children_cpu_seconds,
    cpu_seconds,
    require_tools,
    run_benchmark,
    workspace,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness.containerd import write_hosts_toml
from harness.images import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    canonical_json,
    make_layer,
    run_skopeo,
    sha256_digest,
)
from harness.process import ManagedProcess
from harness.registry import REGISTRY_BINARY, Registry

REPO = Path(__file__).resolve().parent.parent
PREFIX = "cpb"
BRIDGE = f"{PREFIX}-br0"
TMP_PREFIX = "cold-pull-"
SUBNET = "10.213.0"
BRIDGE_IP = f"{SUBNET}.1"
UPSTREAM_IP = f"{SUBNET}.2"
PROXY_IP = f"{SUBNET}.3"
FIRST_NODE_OCTET = 11
MAX_NODES = 200
REGISTRY_PORT = 5000
MIRROR_PORT = 5000
METRICS_PORT = 9090
ROUTER_PORT = 5001
REPOSITORY = "bench/app"
TAG = "v1"
CONTAINERD_NAMESPACE = "k8s.io"
MODES = ("baseline", "direct", "proxy", "mirror")
# Shares of the image each layer gets: a few big ones and some small ones, like a real image.
LAYER_SHARES = (0.40, 0.25, 0.15, 0.10, 0.06, 0.04)
READY_TIMEOUT = 60.0
CONNECT_TIMEOUT = 90.0
PULL_TIMEOUT = 900.0
STOP_TIMEOUT = 10.0
TARGET_TIME = 1.3
TARGET_BYTES = 1.05

# gorilla/handlers combined log: `IP - - [date] "GET /v2/... HTTP/1.1" 200 1234 "" "agent"`.
_ACCESS_RE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<uri>\S+) [^"]*" '
    r"(?P<status>\d{3}) (?P<size>\d+|-)"
)
_SYNC_PARAM = "harness-sync"
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


# --- small helpers ---------------------------------------------------------------------------


def run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a short command, capturing its output; raise with its stderr if it fails."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def in_ns(namespace: str, *argv: str) -> list[str]:
    """`argv` run inside a network namespace (`ip netns exec` execs it: same pid)."""
    return ["ip", "netns", "exec", namespace, *argv]


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


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    total = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        head, _, value = line.rpartition(" ")
        found = set(head[len(name) :].strip("{}").split(",")) if "{" in head else set()
        if wanted <= found:
            total += float(value)
    return total


def rate_bits(rate: str) -> float | None:
    """tc's `100mbit` as bits per second (None for a form this script does not know)."""
    match = re.fullmatch(r"([0-9.]+)([a-z]*)", rate.strip().lower())
    if match is None or match[2] not in _RATE_UNITS:
        return None
    return float(match[1]) * _RATE_UNITS[match[2]]


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


# --- the image --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Image:
    layout: Path
    manifest_digest: str
    blobs: dict[str, int]  # every blob a pull fetches (manifest, config, layers) -> size

    @property
    def size(self) -> int:
        return sum(self.blobs.values())


def build_image(layout: Path, total_mib: int) -> Image:
    """An OCI layout: one linux manifest for this machine's architecture, six random layers."""
    blob_dir = layout / "blobs" / "sha256"
    blob_dir.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    blobs: dict[str, int] = {}

    def add(data: bytes, media_type: str) -> dict[str, object]:
        digest = sha256_digest(data)
        (blob_dir / digest.split(":", 1)[1]).write_bytes(data)
        blobs[digest] = len(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    layers, diff_ids = [], []
    for index, share in enumerate(LAYER_SHARES):
        size = max(4096, int(total_mib * MIB * share))
        # Stored gzip (level 0): random bytes do not compress, and level 0 takes no time.
        data, diff_id = make_layer({f"layer{index}/data.bin": os.urandom(size)}, compresslevel=0)
        layers.append(add(data, OCI_LAYER_GZIP))
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
    ref = {**top, "annotations": {"org.opencontainers.image.ref.name": TAG}}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [ref]}
    (layout / "index.json").write_bytes(canonical_json(index))
    return Image(layout=layout, manifest_digest=str(top["digest"]), blobs=blobs)


# --- daemons in namespaces --------------------------------------------------------------------


class NamespacedRegistry(Registry):
    """The harness's distribution registry, listening on `address` inside `namespace`."""

    def __init__(
        self, base_dir: Path, namespace: str, address: str, *, extra_config: str = ""
    ) -> None:
        self._address = address  # before __init__, which writes the config from `host`
        super().__init__(base_dir, port=REGISTRY_PORT, extra_config=extra_config)
        self.process = ManagedProcess(
            in_ns(namespace, REGISTRY_BINARY, "serve", str(self.config_path)),
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

    def traffic_since(self, offset: int) -> tuple[int, int]:
        """(body bytes of GETs answered, blob GETs) logged after byte `offset` of the log."""
        self.sync_access_log()
        with open(self.access_log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        sent = blob_gets = 0
        for line in text.splitlines():
            match = _ACCESS_RE.match(line)
            if match is None or _SYNC_PARAM in line or match["method"] != "GET":
                continue
            sent += 0 if match["size"] == "-" else int(match["size"])
            blob_gets += "/blobs/" in match["uri"]
        return sent, blob_gets


def containerd_config(base: Path) -> str:
    def q(path: Path) -> str:
        return json.dumps(str(path))

    return f"""\
version = 2
root = {q(base / "root")}
state = {q(base / "state")}
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = {q(base / "containerd.sock")}

[ttrpc]
  address = {q(base / "containerd.sock.ttrpc")}

[debug]
  address = {q(base / "debug.sock")}
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = {q(base / "opt")}
"""


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


class Lab:
    """Namespaces, links and processes this run made; `close` removes every one of them."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self.links: list[str] = []
        self.processes: list[ManagedProcess] = []
        self._pulls: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self.closing = False

    def add_bridge(self) -> None:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        self.links.append(BRIDGE)
        run("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")

    def add_host(self, short: str, ip: str) -> str:
        """Namespace `cpb-<short>` with eth0 at `ip`, plugged into the bridge; its name."""
        namespace, outer, inner = f"{PREFIX}-{short}", f"{PREFIX}-{short}-h", f"{PREFIX}-{short}-i"
        run("ip", "netns", "add", namespace)
        self.namespaces.append(namespace)
        run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        self.links.append(outer)
        run("ip", "link", "set", inner, "netns", namespace)
        run("ip", "-n", namespace, "link", "set", inner, "name", "eth0")
        run("ip", "-n", namespace, "addr", "add", f"{ip}/24", "dev", "eth0")
        run("ip", "-n", namespace, "link", "set", "eth0", "up")
        run("ip", "-n", namespace, "link", "set", "lo", "up")
        run("ip", "link", "set", outer, "master", BRIDGE)
        run("ip", "link", "set", outer, "up")
        return namespace

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
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# --- leftovers of an earlier run --------------------------------------------------------------


def leftovers(tmp_parent: Path) -> tuple[list[str], list[str], list[Path]]:
    """Namespaces, links and temporary directories named like this benchmark's."""
    namespaces = [
        line.split()[0]
        for line in run("ip", "netns", "list").stdout.splitlines()
        if line.split() and line.split()[0].startswith(f"{PREFIX}-")
    ]
    links = []
    for line in run("ip", "-o", "link", "show").stdout.splitlines():
        name = line.split(":", 2)[1].strip().split("@", 1)[0]
        if name.startswith(f"{PREFIX}-"):
            links.append(name)
    dirs = sorted(tmp_parent.glob(f"{TMP_PREFIX}*"))
    return namespaces, links, dirs


def check_leftovers(tmp_parent: Path, clean: bool) -> None:
    namespaces, links, dirs = leftovers(tmp_parent)
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
        shutil.rmtree(directory, ignore_errors=True)
    namespaces, links, dirs = leftovers(tmp_parent)
    if namespaces or links or dirs:
        raise RuntimeError(f"could not remove: {namespaces + links + [str(d) for d in dirs]}")


def check_subnet() -> None:
    """Refuse to add a second route to the benchmark's subnet."""
    routes = run("ip", "-4", "route", "show").stdout
    if re.search(rf"(^|\s){re.escape(SUBNET)}\.", routes):
        raise RuntimeError(f"{SUBNET}.0/24 is already routed here:\n{routes}")


# --- one mode ---------------------------------------------------------------------------------


@dataclass
class ModeResult:
    mode: str
    nodes: int
    completion: float
    per_node: list[float]
    upstream_bytes: int
    wire_bytes: int
    blob_gets: int
    other_load: float
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, lab: Lab) -> None:
        self.args = args
        self.work = work
        self.lab = lab
        self.nodes: list[Node] = []
        self.upstream: NamespacedRegistry | None = None
        self.upstream_ns = ""
        self.image: Image | None = None
        self.ref = f"{UPSTREAM_IP}:{REGISTRY_PORT}/{REPOSITORY}:{TAG}"
        self.key_file = work / "cluster.key"

    # set-up ----------------------------------------------------------------------------------

    def build_network(self) -> None:
        self.lab.add_bridge()
        self.upstream_ns = self.lab.add_host("up", UPSTREAM_IP)
        run(
            *in_ns(self.upstream_ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf"),
            *("rate", self.args.rate, "burst", self.args.burst, "latency", self.args.latency),
        )
        if "proxy" in self.args.modes:
            self.lab.add_host("px", PROXY_IP)
        for index in range(self.args.nodes):
            ip = f"{SUBNET}.{FIRST_NODE_OCTET + index}"
            self.nodes.append(Node(index, self.lab.add_host(f"n{index}", ip), ip))

    def start_upstream(self) -> None:
        upstream = NamespacedRegistry(self.work / "upstream", self.upstream_ns, UPSTREAM_IP)
        self.lab.track(upstream.process)
        upstream.start(timeout=READY_TIMEOUT)
        self.upstream = upstream
        image = build_image(self.work / "image", self.args.image_mib)
        run_skopeo(
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            f"oci:{image.layout}:{TAG}",
            f"docker://{self.ref}",
        )
        self.image = image

    def keygen(self) -> None:
        argv = [self.args.python, "-m", "mirror", "keygen", "--out", str(self.key_file)]
        subprocess.run(argv, check=True, cwd=REPO, capture_output=True, timeout=60)

    def wire_bytes(self) -> int:
        """Bytes the shaped qdisc on upstream's eth0 has sent so far."""
        out = run(*in_ns(self.upstream_ns, "tc", "-s", "-j", "qdisc", "show", "dev", "eth0"))
        return sum(int(q.get("bytes", 0)) for q in json.loads(out.stdout) if q.get("root"))

    # per mode --------------------------------------------------------------------------------

    def start_containerd(self, node: Node, base: Path) -> None:
        node.base = base
        base.mkdir(parents=True)
        config = base / "config.toml"
        config.write_text(containerd_config(base))
        node.containerd = self.lab.start(
            in_ns(node.namespace, "containerd", "--config", str(config)), base, "containerd"
        )

    def wait_containerd(self, node: Node) -> None:
        def answers() -> bool:
            assert node.containerd is not None
            node.containerd.ensure_running()
            if not node.socket.exists():
                return False
            done = subprocess.run(
                node.ctr_argv("version"), capture_output=True, timeout=10, check=False
            )
            return done.returncode == 0

        poll(answers, f"containerd of node {node.index}", READY_TIMEOUT)

    def start_mirror(self, node: Node) -> None:
        assert node.base is not None
        routers = ",".join(f"{n.ip}:{ROUTER_PORT}" for n in self.nodes)
        upstream = f"{UPSTREAM_IP}:{REGISTRY_PORT}"
        argv = [
            self.args.python,
            "-m",
            "mirror",
            "run",
            "--store=containerd",
            f"--containerd-sock={node.socket}",
            f"--cache-dir={node.base / 'cache'}",
            f"--cluster-key-file={self.key_file}",
            f"--router-addr={node.ip}:{ROUTER_PORT}",
            f"--bootstrap=static:{routers}",
            f"--upstream={upstream}=http://{upstream}",
            f"--registry-addr={node.ip}:{MIRROR_PORT}",
            f"--metrics-addr={node.ip}:{METRICS_PORT}",
            f"--resolve-timeout={self.args.resolve_timeout}",
            # containerd reaches its mirror from the node's own address, not from loopback.
            f"--allow-client={node.ip}/32",
            f"--log-level={self.args.mirror_log_level}",
        ]
        node.mirror = self.lab.start(in_ns(node.namespace, *argv), node.base, "mirror")

    def wait_mirrors(self, nodes: list[Node]) -> float:
        started = time.monotonic()
        for node in nodes:

            def ready(node: Node = node) -> bool:
                assert node.mirror is not None
                node.mirror.ensure_running()
                return http_ok(f"{node.mirror_url}/readyz")

            poll(ready, f"mirror of node {node.index} to be ready", READY_TIMEOUT)
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

    def pull_all(self, nodes: list[Node], mirrored: bool) -> tuple[float, list[float]]:
        """Every node pulls at the same moment; (completion, per-node seconds)."""
        barrier = threading.Barrier(len(nodes))
        spans: list[tuple[float, float] | None] = [None] * len(nodes)
        failures: list[str] = []

        def pull(slot: int, node: Node) -> None:
            assert node.base is not None
            log = node.base / "pull.log"
            # Straight to upstream: --plain-http (containerd 1.6 rejects a hosts.toml that
            # names only a server: "invalid `host` tree").
            where = ["--hosts-dir", str(node.hosts_dir)] if mirrored else ["--plain-http"]
            # `content fetch`: the same transfers, without unpacking (or an image record).
            command = ("content", "fetch") if self.args.no_unpack else ("images", "pull")
            argv = in_ns(node.namespace, *node.ctr_argv(*command, *where, self.ref))
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                return
            began = time.monotonic()
            proc = self.lab.spawn_pull(argv, log)
            try:
                code = proc.wait(timeout=PULL_TIMEOUT)
            except subprocess.TimeoutExpired:
                code = None
            ended = time.monotonic()
            self.lab.pull_done(proc)
            if self.lab.closing:
                return  # stopped by the clean-up; its directory may be gone already
            if code != 0:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                tail = log.read_text(errors="replace")[-2000:]
                failures.append(f"node {node.index}: ctr pull ended with {code}:\n{tail}")
                return
            spans[slot] = (began, ended)

        threads = [
            threading.Thread(target=pull, args=(slot, node), daemon=True)
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

    def verify(self, nodes: list[Node]) -> None:
        """Every node holds the image under its name and every blob at its full size."""
        assert self.image is not None
        for node in nodes:
            listed = run(*node.ctr_argv("images", "ls", "-q")).stdout.split()
            if self.ref not in listed and not self.args.no_unpack:
                raise RuntimeError(f"node {node.index} has no image {self.ref}: {listed}")
            for digest, size in self.image.blobs.items():
                path = node.content_dir / digest.replace(":", "/", 1)
                if not path.is_file() or path.stat().st_size != size:
                    raise RuntimeError(f"node {node.index} lacks {digest} ({size} bytes)")

    def cpu_groups(
        self, nodes: list[Node], started: list[ManagedProcess]
    ) -> dict[str, Callable[[], float]]:
        """CPU seconds so far of each kind of process a mode runs, as callables."""
        assert self.upstream is not None

        def of(processes: list[ManagedProcess | None]) -> Callable[[], float]:
            pids = [p.pid for p in processes if p is not None and p.pid is not None]
            return lambda: cpu_seconds(pids)

        groups = {
            "ctr": children_cpu_seconds,  # the pulls, once reaped
            "containerd": of([node.containerd for node in nodes]),
            "upstream": of([self.upstream.process]),
        }
        proxies = [p for p in started if p.name == "registry"]
        if proxies:
            groups["proxy"] = of(list(proxies))
        if any(node.mirror is not None for node in nodes):
            groups["mirrors"] = of([node.mirror for node in nodes])
        return groups

    def mirror_notes(self, nodes: list[Node]) -> list[str]:
        """What the mirrors did, summed over the nodes, from their /metrics."""
        totals: dict[str, float] = {}
        per_node_upstream = []
        for node in nodes:
            text = node.metrics_text()
            values = {
                "coalesced node": metric_sum(text, "mirror_coalesced_waits_total", where="node"),
                "coalesced cluster": metric_sum(
                    text, "mirror_coalesced_waits_total", where="cluster"
                ),
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
                "upstream blob fetches": metric_sum(
                    text, "mirror_upstream_fetches_total", kind="blob"
                ),
            }
            per_node_upstream.append(metric_sum(text, "mirror_upstream_bytes_total") / MIB)
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + value
        summary = ", ".join(f"{key} {value:g}" for key, value in totals.items())
        fetched = " ".join(f"{mib:.1f}" for mib in per_node_upstream)
        return [f"mirrors: {summary}", f"MiB each mirror received from upstream: {fetched}"]

    def run_mode(self, mode: str) -> ModeResult:
        assert self.upstream is not None
        nodes = self.nodes[:1] if mode == "baseline" else list(self.nodes)
        mode_dir = self.work / mode
        mode_started: list[ManagedProcess] = []
        notes: list[str] = []
        print(f"\n== {mode}: {len(nodes)} node(s)", flush=True)
        for node in self.nodes:
            node.containerd = node.mirror = None
        try:
            for node in nodes:
                self.start_containerd(node, mode_dir / f"n{node.index}")
                assert node.containerd is not None
                mode_started.append(node.containerd)
            for node in nodes:
                self.wait_containerd(node)
            upstream_url = self.upstream.url
            mirrors: list[str] = []
            if mode == "proxy":
                proxy = NamespacedRegistry(
                    mode_dir / "proxy",
                    f"{PREFIX}-px",
                    PROXY_IP,
                    extra_config=f"proxy:\n  remoteurl: {upstream_url}\n",
                )
                self.lab.track(proxy.process)
                mode_started.append(proxy.process)
                proxy.start(timeout=READY_TIMEOUT)
                mirrors = [proxy.url]
            if mode == "mirror":
                for node in nodes:
                    self.start_mirror(node)
                    assert node.mirror is not None
                    mode_started.append(node.mirror)
                took = self.wait_mirrors(nodes)
                notes.append(f"cluster formed {took:.1f}s after the mirrors were started")
            mirrored = mode in ("proxy", "mirror")
            for node in nodes if mirrored else []:
                urls = [node.mirror_url] if mode == "mirror" else mirrors
                write_hosts_toml(node.hosts_dir, self.upstream.host, upstream_url, urls)
            offset = self.upstream.log_size()
            wire_before = self.wire_bytes()
            groups = self.cpu_groups(nodes, mode_started)
            load = OtherLoad(self.lab.pids)
            cpu_before = {name: cpu() for name, cpu in groups.items()}
            completion, per_node = self.pull_all(nodes, mirrored)
            other = load.share()
            cpu_used = {name: cpu() - cpu_before[name] for name, cpu in groups.items()}
            cpus = os.cpu_count() or 1
            notes.append(
                "CPU seconds during the pulls: "
                + ", ".join(f"{name} {seconds:.1f}" for name, seconds in cpu_used.items())
                + f"; {sum(cpu_used.values()):.1f} in all, at least "
                f"{sum(cpu_used.values()) / cpus:.1f}s on {cpus} CPUs"
                f" (the machine had {completion * cpus:.1f})"
            )
            self.verify(nodes)
            if mode == "mirror":
                notes += self.mirror_notes(nodes)
            # Stop the proxy and mirrors first: whatever they still fetch is counted too.
            self.lab.stop(mode_started)
            mode_started.clear()
            sent, blob_gets = self.upstream.traffic_since(offset)
            wire = self.wire_bytes() - wire_before
        finally:
            self.lab.stop(mode_started)
            self.keep_logs(mode, mode_dir)
            shutil.rmtree(mode_dir, ignore_errors=True)
        result = ModeResult(mode, len(nodes), completion, per_node, sent, wire, blob_gets, other)
        result.notes = notes
        print(self.describe(result), flush=True)
        return result

    def keep_logs(self, mode: str, mode_dir: Path) -> None:
        if self.args.keep_logs is None or not mode_dir.exists():
            return
        target = Path(self.args.keep_logs) / mode
        for log in mode_dir.rglob("*.log"):
            destination = target / log.relative_to(mode_dir)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, destination)

    def describe(self, result: ModeResult) -> str:
        assert self.image is not None
        times = sorted(result.per_node)
        lines = [
            f"completion {result.completion:.2f}s; per node min {times[0]:.2f}s, median "
            f"{statistics.median(times):.2f}s, max {times[-1]:.2f}s",
            f"upstream sent {result.upstream_bytes / MIB:.1f} MiB in GET bodies "
            f"({result.upstream_bytes / self.image.size:.2f}x the image, {result.blob_gets} blob "
            f"GETs), {result.wire_bytes / MIB:.1f} MiB on the shaped link",
            OtherLoad.describe(result.other_load),
            *result.notes,
        ]
        return "\n".join("  " + line for line in lines)


# --- report -----------------------------------------------------------------------------------


def report(results: list[ModeResult], image: Image, args: argparse.Namespace) -> int:
    baseline = next((r for r in results if r.mode == "baseline"), None)
    t1 = baseline.completion if baseline else None
    header = (
        f"{'mode':<9} {'nodes':>5} {'time s':>8} {'time/T1':>8} {'upstream MiB':>13} "
        f"{'bytes/image':>12} {'wire/image':>11} {'blob GETs':>10}"
    )
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        ratio = f"{r.completion / t1:.2f}" if t1 else "-"
        print(
            f"{r.mode:<9} {r.nodes:>5} {r.completion:>8.2f} {ratio:>8} "
            f"{r.upstream_bytes / MIB:>13.1f} {r.upstream_bytes / image.size:>12.2f} "
            f"{r.wire_bytes / image.size:>11.2f} {r.blob_gets:>10}"
        )
    print(
        f"image {image.size / MIB:.1f} MiB ({image.size} bytes, {len(image.blobs)} blobs); "
        "bytes/image: GET bodies in upstream's access log; wire/image: bytes the shaped qdisc sent"
    )
    parts = []
    verdict = 0
    for r in results:
        if r.mode == "baseline":
            parts.append(f"T1 {r.completion:.2f}s")
            continue
        time_ratio = r.completion / t1 if t1 else float("nan")
        bytes_ratio = r.upstream_bytes / image.size
        part = f"{r.mode} {time_ratio:.2f}x T1, {bytes_ratio:.2f}x image"
        if r.mode == "mirror":
            met = t1 is not None and time_ratio <= TARGET_TIME and bytes_ratio <= TARGET_BYTES
            part += (
                f" (targets <= {TARGET_TIME}x, <= {TARGET_BYTES}x: {'met' if met else 'MISSED'})"
            )
            verdict = 0 if met else 1
        parts.append(part)
    print(
        f"SUMMARY: {args.nodes} nodes, {image.size / MIB:.0f} MiB image, upstream at {args.rate}: "
        + "; ".join(parts)
    )
    return verdict if args.strict else 0


def run_bench(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise RuntimeError("needs root: it creates network namespaces, veths and a bridge")
    require_tools("ip", "tc", "containerd", "ctr", "skopeo", REGISTRY_BINARY)
    tmp_parent = Path(args.tmp_dir or tempfile.gettempdir())
    check_leftovers(tmp_parent, args.clean_leftovers)
    check_subnet()
    expected = rate_bits(args.rate)
    with workspace(str(tmp_parent), TMP_PREFIX) as work, closing(Lab()) as lab:
        if len(str(work / "baseline" / "n0" / "containerd.sock.ttrpc")) > 100:
            raise RuntimeError(f"{work} is too long a path for containerd's sockets")
        bench = Bench(args, work, lab)
        bench.build_network()
        bench.start_upstream()
        if "mirror" in args.modes:
            bench.keygen()
        image = bench.image
        assert image is not None
        cc = run(*in_ns(bench.upstream_ns, "cat", "/proc/sys/net/ipv4/tcp_congestion_control"))
        print(
            f"image {image.size / MIB:.1f} MiB in {len(image.blobs)} blobs, pushed to "
            f"{bench.ref}; upstream egress tbf rate {args.rate} burst {args.burst} latency "
            f"{args.latency}; TCP congestion control {cc.stdout.strip()}; {os.cpu_count()} CPUs",
            flush=True,
        )
        if expected:
            print(f"the image alone takes {image.size * 8 / expected:.1f}s at {args.rate}")
        try:
            results = [bench.run_mode(mode) for mode in args.modes]
        finally:
            bench.keep_logs("upstream", work / "upstream")
        return report(results, image, args)


@contextlib.contextmanager
def closing(lab: Lab) -> Iterator[Lab]:
    try:
        yield lab
    finally:
        lab.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Cold concurrent pull of one image by N containerd nodes in network "
        "namespaces, upstream behind a shaped link: direct, through a proxy registry, "
        "through mirror."
    )
    parser.add_argument("--nodes", type=int, default=8, help="nodes pulling at once (default: 8)")
    parser.add_argument("--image-mib", type=int, default=75, help="image size (default: 75)")
    parser.add_argument(
        "--rate", default="100mbit", help="tbf rate of upstream's egress (default: 100mbit)"
    )
    parser.add_argument("--burst", default="128kb", help="tbf burst (default: 128kb)")
    parser.add_argument("--latency", default="50ms", help="tbf latency (default: 50ms)")
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated, run in this order (default: {','.join(MODES)})",
    )
    parser.add_argument(
        "--resolve-timeout", default="50ms", help="mirror --resolve-timeout (default: 50ms)"
    )
    parser.add_argument(
        "--mirror-log-level", default="info", help="mirror --log-level (default: info)"
    )
    parser.add_argument(
        "--keep-logs",
        default=None,
        help="copy every daemon's and pull's log of each mode into this directory",
    )
    parser.add_argument(
        "--clean-leftovers",
        action="store_true",
        help="remove namespaces, links and temporary directories an earlier run left",
    )
    parser.add_argument(
        "--no-unpack",
        action="store_true",
        help="fetch with `ctr content fetch` (no unpacking): the transfers without the CPU "
        "containerd spends unpacking, which every node pays with or without a mirror",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when mode mirror misses a target"
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="Python that runs the mirror nodes (default: this one)",
    )
    parser.add_argument(
        "--tmp-dir", default=None, help="where to create the temporary directory (default: $TMPDIR)"
    )
    args = parser.parse_args(argv)
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in args.modes if mode not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes takes a list of {', '.join(MODES)}")
    if not 1 <= args.nodes <= MAX_NODES:
        parser.error(f"--nodes must be between 1 and {MAX_NODES}")
    if args.image_mib < 1:
        parser.error("--image-mib must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(run_bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
