#!/usr/bin/env python3
"""Warm rollout: one node already holds an image, N others pull it at once over shaped links.

Topology (all made by this script, all removed at the end, Ctrl-C and errors included):

    root namespace: bridge rob-br0 10.214.0.1/24 (also how this script reaches every daemon)
      ├── rob-up   10.214.0.2    upstream `docker-registry` (the image is pushed there)
      ├── rob-h    10.214.0.10   the holder: its containerd holds the image before the pulls;
      │                           mode proxy also runs the proxy-mode registry here
      └── rob-nI   10.214.0.10+I node I (1..N): its containerd, its `ctr` pulls, and in the
                                  mirror modes its own `python -m mirror run --store containerd`

Every veth is shaped with `tc ... tbf rate RATE` (default 1gbit) on both ends: eth0's egress
inside the namespace (what the node uploads) and the bridge end's egress (what it downloads).
So the holder's uplink is a real bottleneck: N nodes fetching everything from it need N times
the image through one RATE link.

Modes, each on fresh state (new containerds, new registry storage, new mirror caches):

- proxy: a distribution registry with `proxy.remoteurl` = upstream runs in the holder's
  namespace. The holder's containerd pulls the image through it first (so the proxy is warm,
  its storage holding every blob), then the N nodes pull through it (hosts.toml mirror).
- mirror: the holder's containerd pulls the image straight from upstream; then every node
  (holder included) starts a mirror (one cluster key, static bootstrap, `--upstream` for the
  upstream, which stays up: its blob bytes are counted and should be 0). Once the cluster is
  formed and the holder has announced the image, the N nodes pull, each through its own mirror.
  Every mirror runs with `--peer-transfer=share` (where the tree has the flag: its default,
  `auto`, redirects on containerd).
- mirror-redirect: the same with `--peer-transfer=redirect` on every mirror (skipped, with a
  message, when `mirror run --help` does not offer the flag).
- local: no sharing at all, the floor of any design on this machine: every node runs a
  distribution registry in its own namespace that already holds the image (a copy of
  upstream's storage, see `--registry-storage`), and pulls from it (hosts.toml mirror).
  Nothing crosses a link; what is left is what N nodes pulling at once cost the machine anyway
  (the runtimes' writes, hashing, unpacking, one local registry each), so its flatness N/1 is
  the best any mode can show here.
  Not a default mode (`--modes ...,local`).
- ring: the floor of any design that moves the bytes between nodes: every node and the holder
  run a distribution registry holding the image, and node i pulls from node i+1's (the last
  from the holder's) over the shaped links. Each registry serves exactly one node, as a perfect
  swarm would with no lookups, probes or announcements: what is left is what N transfers between
  namespaces at once cost this machine. Its flatness N/1 (N=1: one node pulling from the
  holder's registry) is the best a peer-to-peer mode can show here. Not a default mode.

The registries of local and ring hold copies of upstream's storage, one per node, as separate
machines would (`--registry-storage copy`, the default). With `link` they hard-link upstream's
files, so every registry serves the same pages of this host's page cache, which no cluster has:
at N=16 the runtimes' writes then cost a third less kernel time and the ring came out 10-30%
faster than with copies (docs/benchmarks.md, twenty-first session); earlier sessions' ring and
local figures were taken that way.

Each scenario (`--scenarios`, e.g. `75x4:8` = a 75 MiB image in 4 layers, 8 pulling nodes)
runs every mode with `ctr images pull` (fetch and unpack: "unpack") and with `ctr content
fetch` (the same transfers without unpacking: "fetch"), or only the kinds it names
(`75x4:1:fetch`); every pull runs without ctr's progress table (`--ctr-progress` brings it back,
see `pull_argv`). With `--pull-client cri` the "unpack" pulls are CRI's PullImage, the call a
kubelet makes: containerd fetches and unpacks in its own process, where `ctr images pull` fetches
in ctr and hands every byte to containerd over gRPC (`cri_pull`). Per case the script prints
the wall time (first pull's start to last pull's end), each node's time, upstream's blob bytes
over the image, the bytes each node uploaded (its eth0 qdisc's counter: the wire, headers
included), each node's UDP datagrams in and out (the DHT's messages), each mirror's peak RSS
(VmHWM), the CPU seconds of each kind of process against what the machine had, and whether the
run was CPU-bound.
At the end: a table, the ratios mirror/proxy, the flatness N/1 for content fetch, and the
targets of issue 10 (benchmarks, not asserts). `--rounds K` runs every case K times, round after
round: each ratio is taken within a round, and each target is judged on the median of its
rounds' ratios, every round's printed beside it (this host's speed drifts by a third within an
hour, so one round's ratio can land either side of a target).

Run as root with the project's venv: `.venv/bin/python bench/rollout.py [--scenarios
75x4:1:fetch,75x4:8,75x4:16,1024x1:8] [--modes proxy,mirror,mirror-redirect] [--rate 1gbit]`.
`--plan` lists the cases and exits; `--keep-logs DIR` keeps every daemon's and pull's log;
`--json FILE` writes the results. It refuses to start when namespaces, links or temporary
directories of an earlier run are left (`--clean-leftovers` removes them). Results are in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import (
    MIB,
    REGISTRY_PORT,
    REPO,
    ROUTER_PORT,
    Image,
    Lab,
    LabNames,
    ManagedProcess,
    MirrorSettings,
    NamespacedRegistry,
    Node,
    OtherLoad,
    add_lab_arguments,
    add_lab_tool_arguments,
    add_node_cgroups_argument,
    add_shaping_arguments,
    build_image,
    check_socket_paths,
    congestion_control_in,
    copy_logs,
    cpu_groups,
    cpu_note,
    cpu_seconds,
    keygen,
    layer_sizes,
    machine_busy_seconds,
    memory_status,
    metric_samples,
    metric_sum,
    mirror_notes,
    pids_of,
    poll,
    prepare_lab,
    pull_all,
    push_image,
    qdisc_bytes,
    rate_bits,
    run,
    run_benchmark,
    shape_egress,
    start_containerd,
    start_mirror,
    throttled_seconds,
    udp_datagrams,
    verify_pulled,
    wait_containerd,
    wait_mirrors,
    workspace,
)

NAMES = LabNames(prefix="rob", subnet="10.214.0", tmp_prefix="rollout-bench-")
UPSTREAM_IP = f"{NAMES.subnet}.2"
HOLDER_OCTET = 10  # node I (1..N) is at HOLDER_OCTET + I
MAX_NODES = 200
TAG = "v1"
MODES = ("proxy", "mirror", "mirror-redirect", "local", "ring")
DEFAULT_MODES = ("proxy", "mirror", "mirror-redirect")
KINDS = ("unpack", "fetch")
REDIRECT_FLAG = "--peer-transfer"
DEFAULT_SCENARIOS = "75x4:1:fetch,75x4:8,75x4:16,1024x1:8"
READY_TIMEOUT = 60.0
WARM_TIMEOUT = 120.0
ANNOUNCE_TIMEOUT = 60.0
CPU_BOUND = 0.9  # the machine busier than this share of its CPUs: the run is CPU-bound
# Targets of issue 10 (printed against, never asserted).
TARGET_PROXY_RATIO = 0.5  # warm rollout, N=8, unpack: mirror time <= 0.5x the proxy's
TARGET_FLATNESS = 1.5  # content fetch, N=16 <= 1.5x one node from one peer
TARGET_RSS_MIB = 150.0  # a mirror's peak RSS while serving and sharing the 1 GiB blob
# Mirror metrics worth printing when the tree has them (summed over the nodes).
EXTRA_METRICS = (
    "mirror_peer_uploads_refused_total",
    "mirror_peer_uploads_referred_total",
    "mirror_peer_referrals_followed_total",
    "mirror_peer_fetches_steered_total",
    "mirror_peer_last_resort_fetches_total",
    "mirror_peer_redirects_total",
)


def totals_by(texts: list[str], name: str, *labels: str) -> list[tuple[tuple[str, ...], float]]:
    """The samples of `name` summed over nodes by the values of `labels`, most first: how many
    HTTP requests (runtimes' and peers' probes alike) a rollout cost the mirrors, by method
    and status, or why fetches from peers failed."""
    totals: dict[tuple[str, ...], float] = {}
    for text in texts:
        for found, value in metric_samples(text, name):
            key = tuple(found.get(label, "?") for label in labels)
            totals[key] = totals.get(key, 0.0) + value
    return sorted(totals.items(), key=lambda item: -item[1])


# --- what to run ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scenario:
    """An image (`mib` MiB in `layers` layers) pulled by `nodes` nodes, in the given kinds."""

    mib: int
    layers: int
    nodes: int
    kinds: tuple[str, ...]

    @property
    def image_key(self) -> tuple[int, int]:
        return (self.mib, self.layers)

    @property
    def image_label(self) -> str:
        return f"{self.mib}x{self.layers}"


_SCENARIO_RE = re.compile(
    r"(?P<mib>\d+)(?:x(?P<layers>\d+))?:(?P<nodes>\d+)(?::(?P<kinds>[a-z+]+))?"
)


def parse_scenarios(text: str) -> list[Scenario]:
    """`MIB[xLAYERS]:N[:KIND[+KIND]]`, comma-separated: `75x4:8,75x4:1:fetch,1024x1:8`."""
    scenarios = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        match = _SCENARIO_RE.fullmatch(item)
        if match is None:
            raise ValueError(f"{item!r} is not MIB[xLAYERS]:N[:unpack|fetch|unpack+fetch]")
        kinds = tuple(match["kinds"].split("+")) if match["kinds"] else KINDS
        if any(kind not in KINDS for kind in kinds):
            raise ValueError(f"{item!r}: kinds are {' and '.join(KINDS)}")
        scenario = Scenario(
            int(match["mib"]), int(match["layers"] or 1), int(match["nodes"]), kinds
        )
        if scenario.mib < 1 or not 1 <= scenario.layers <= 64:
            raise ValueError(f"{item!r}: at least 1 MiB, 1 to 64 layers")
        if not 1 <= scenario.nodes <= MAX_NODES:
            raise ValueError(f"{item!r}: 1 to {MAX_NODES} nodes")
        scenarios.append(scenario)
    if not scenarios:
        raise ValueError("no scenario")
    return scenarios


def layer_shares(layers: int) -> list[float]:
    """Decreasing shares, the first layer the largest: 4 layers get 0.4, 0.3, 0.2 and 0.1."""
    weights = range(layers, 0, -1)
    return [weight / sum(weights) for weight in weights]


@dataclass(frozen=True, slots=True)
class Case:
    scenario: Scenario
    kind: str
    mode: str
    round: int = 1

    @property
    def label(self) -> str:
        s = self.scenario
        again = f"-r{self.round}" if self.round > 1 else ""
        return f"{s.image_label}-n{s.nodes}-{self.kind}-{self.mode}{again}"

    def describe(self, pull_client: str) -> str:
        s = self.scenario
        if self.kind == "fetch":
            how = "ctr content fetch"
        else:
            how = "CRI PullImage" if pull_client == "cri" else "ctr images pull"
        again = f", round {self.round}" if self.round > 1 else ""
        return f"{s.mib} MiB in {s.layers} layer(s), N={s.nodes}, {how}, mode {self.mode}{again}"


def plan(scenarios: list[Scenario], modes: list[str], rounds: int = 1) -> list[Case]:
    """Every case, `rounds` times over: round after round, so the cases a ratio compares ran
    close in time, and each ratio is taken within a round (this host's speed drifts)."""
    return [
        Case(scenario, kind, mode, number)
        for number in range(1, rounds + 1)
        for scenario in scenarios
        for kind in scenario.kinds
        for mode in modes
    ]


# --- results ----------------------------------------------------------------------------------


@dataclass
class CaseResult:
    image: str
    image_bytes: int
    nodes: int
    kind: str
    mode: str
    round: int = 1
    wall: float = 0.0
    per_node: list[float] = field(default_factory=list)
    # Seconds each node's CPU cap held its processes back during the pulls (--cpus-per-node).
    throttled: list[float] = field(default_factory=list)
    upstream_bytes: int = 0  # every GET body upstream sent during the pulls
    upstream_blob_bytes: int = 0
    upstream_blob_gets: int = 0
    holder_upload: int = 0  # bytes the holder's eth0 sent during the pulls
    node_uploads: list[int] = field(default_factory=list)
    # UDP datagrams (in, out) of each node during the pulls: the DHT's messages in mirror modes.
    node_datagrams: list[tuple[int, int]] = field(default_factory=list)
    holder_rss_mib: float | None = None  # mirror modes: VmHWM of each mirror
    node_rss_mib: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    # Of the runtimes' CPU seconds, those in the kernel (their writes into the page cache,
    # mostly, whose price on this VM depends on what else took its cheap memory first:
    # docs/benchmarks.md, twenty-first session).
    runtime_kernel_cpu: float = 0.0
    busy: float = 0.0  # share of all the machine's CPUs that was busy during the pulls
    own_load: float = 0.0  # of which this case's processes (the CPU seconds above)
    other_load: float = 0.0  # and other processes on the machine
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None

    @property
    def cpu_bound(self) -> bool:
        return self.busy >= CPU_BOUND

    @property
    def max_rss(self) -> float | None:
        values = [v for v in [self.holder_rss_mib, *self.node_rss_mib] if v is not None]
        return max(values) if values else None

    @property
    def ok(self) -> bool:
        return self.error is None and self.skipped is None


# --- the bench --------------------------------------------------------------------------------


class Rollout:
    def __init__(
        self, args: argparse.Namespace, work: Path, lab: Lab, *, transfer_flag: bool
    ) -> None:
        self.args = args
        self.transfer_flag = transfer_flag  # the mirrors take --peer-transfer
        self.work = work
        self.lab = lab
        self.upstream: NamespacedRegistry | None = None
        self.upstream_ns = ""
        self.holder = Node(0, "", f"{NAMES.subnet}.{HOLDER_OCTET}")
        self.nodes: list[Node] = []
        self.images: dict[tuple[int, int], tuple[Image, str]] = {}
        self.key_file = work / "cluster.key"

    # set-up ----------------------------------------------------------------------------------

    def build_network(self, nodes: int) -> None:
        args = self.args
        self.lab.add_bridge()
        self.upstream_ns = self.lab.add_host("up", UPSTREAM_IP)
        self.holder.namespace = self.lab.add_host("h", self.holder.ip)
        for index in range(1, nodes + 1):
            ip = f"{NAMES.subnet}.{HOLDER_OCTET + index}"
            self.nodes.append(Node(index, self.lab.add_host(f"n{index}", ip), ip))
        hosts = [self.upstream_ns, self.holder.namespace, *(n.namespace for n in self.nodes)]
        for namespace in hosts:
            if args.cpus_per_node is not None:
                self.lab.cap_cpu(namespace, args.cpus_per_node, layout=args.node_cgroups)
            shape_egress(namespace, "eth0", args.rate, args.burst, args.latency)
            shape_egress(None, f"{namespace}-h", args.rate, args.burst, args.latency)

    def start_upstream(self, scenarios: list[Scenario]) -> None:
        upstream = NamespacedRegistry(self.work / "upstream", self.upstream_ns, UPSTREAM_IP)
        self.lab.track(upstream.process)
        upstream.start(timeout=READY_TIMEOUT)
        self.upstream = upstream
        for key in dict.fromkeys(s.image_key for s in scenarios):
            mib, layers = key
            started = time.monotonic()
            layout = self.work / f"image-{mib}x{layers}"
            image = build_image(layout, layer_sizes(mib, layer_shares(layers)), TAG)
            ref = f"{UPSTREAM_IP}:{REGISTRY_PORT}/bench/rollout-{mib}x{layers}:{TAG}"
            push_image(image, TAG, ref)
            shutil.rmtree(layout, ignore_errors=True)  # upstream has it now
            sizes = ", ".join(f"{size / MIB:.1f}" for size in sorted(image.blobs.values())[::-1])
            print(
                f"image {ref}: {image.size / MIB:.1f} MiB in {len(image.blobs)} blobs "
                f"({sizes} MiB), built and pushed in {time.monotonic() - started:.1f}s",
                flush=True,
            )
            self.images[key] = (image, ref)

    # one case --------------------------------------------------------------------------------

    def mirror_settings(self, everyone: list[Node], redirect: bool) -> MirrorSettings:
        extra: list[str] = []
        if self.transfer_flag:
            extra.append(f"{REDIRECT_FLAG}={'redirect' if redirect else 'share'}")
        extra += self.args.mirror_arg
        return MirrorSettings(
            python=self.args.python,
            key_file=self.key_file,
            routers=tuple(f"{n.ip}:{ROUTER_PORT}" for n in everyone),
            upstream=f"{UPSTREAM_IP}:{REGISTRY_PORT}",
            resolve_timeout=self.args.resolve_timeout,
            log_level=self.args.mirror_log_level,
            extra=tuple(extra),
        )

    def run_case(self, case: Case) -> CaseResult:
        assert self.upstream is not None
        upstream = self.upstream
        image, ref = self.images[case.scenario.image_key]
        holder, nodes = self.holder, self.nodes[: case.scenario.nodes]
        everyone = [holder, *nodes]
        result = CaseResult(
            case.scenario.image_label, image.size, len(nodes), case.kind, case.mode, case.round
        )
        case_dir = self.work / case.label
        started: list[ManagedProcess] = []
        print(f"\n== {case.describe(self.args.pull_client)}", flush=True)
        for node in everyone:
            node.containerd = node.mirror = None
        try:
            for node in everyone:
                start_containerd(self.lab, node, case_dir / f"n{node.index}")
                assert node.containerd is not None
                started.append(node.containerd)
            for node in everyone:
                wait_containerd(node)
            if case.mode == "proxy":
                proxy = NamespacedRegistry(
                    case_dir / "proxy",
                    holder.namespace,
                    holder.ip,
                    extra_config=f"proxy:\n  remoteurl: {upstream.url}\n",
                )
                self.lab.track(proxy.process)
                started.append(proxy.process)
                proxy.start(timeout=READY_TIMEOUT)
                # The holder pulls through the proxy, which keeps every blob: a warm proxy.
                holder.write_hosts(upstream.host, upstream.url, [proxy.url])
                took, _ = pull_all(self.lab, [holder], ref, mirrored=True, unpack=True)
                waited = poll(
                    lambda: proxy.holds_blobs(image), "the proxy to store the image", WARM_TIMEOUT
                )
                result.notes.append(
                    f"set-up: the holder pulled through the proxy in {took:.1f}s; the proxy held "
                    f"every blob {waited:.1f}s later"
                )
                for node in nodes:
                    node.write_hosts(upstream.host, upstream.url, [proxy.url])
            elif case.mode == "local":
                for node in nodes:
                    local = self.local_registry(case_dir / f"local{node.index}", node)
                    started.append(local.process)
                    node.write_hosts(upstream.host, upstream.url, [local.url])
                result.notes.append(
                    "set-up: every node pulls from a registry of its own"
                    f" ({self.registry_storage_note()})"
                )
            elif case.mode == "ring":
                # Node i pulls from node i+1's registry, the last node from the holder's.
                served_by = [*nodes[1:], holder]
                for node, server in zip(nodes, served_by, strict=True):
                    ring = self.local_registry(case_dir / f"ring{server.index}", server)
                    started.append(ring.process)
                    node.write_hosts(upstream.host, upstream.url, [ring.url])
                result.notes.append(
                    "set-up: every node pulls from the next node's registry over its link"
                    f" ({self.registry_storage_note()})"
                )
            else:
                took, _ = pull_all(self.lab, [holder], ref, mirrored=False, unpack=True)
                settings = self.mirror_settings(everyone, case.mode == "mirror-redirect")
                for node in everyone:
                    start_mirror(self.lab, node, settings)
                    assert node.mirror is not None
                    started.append(node.mirror)
                formed = wait_mirrors(everyone)
                announced = poll(
                    lambda: self.announced(holder) >= len(image.blobs),
                    "the holder's mirror to announce the image",
                    ANNOUNCE_TIMEOUT,
                )
                result.notes.append(
                    f"set-up: the holder pulled from upstream in {took:.1f}s; the cluster formed "
                    f"{formed:.1f}s after the mirrors started, the image was announced "
                    f"{announced:.1f}s later"
                )
                for node in nodes:
                    node.write_hosts(upstream.host, upstream.url, [node.mirror_url])
            self.measure(case, result, image, ref, everyone, started)
            # Stop the proxy and mirrors first: whatever they still fetch is counted too.
            before_stop = upstream.log_size()
            self.lab.stop(started)
            started.clear()
            late = upstream.traffic_since(before_stop)
            result.upstream_bytes += late.sent
            result.upstream_blob_bytes += late.blob_bytes
            result.upstream_blob_gets += late.blob_gets
        finally:
            self.lab.stop(started)
            copy_logs(self.args.keep_logs, case.label, case_dir)
            shutil.rmtree(case_dir, ignore_errors=True)
        print(self.describe(result), flush=True)
        return result

    def registry_storage_note(self) -> str:
        if self.args.registry_storage == "link":
            return "their storage hard links to upstream's: one copy in the page cache for all"
        return "each holding a copy of upstream's storage"

    def local_registry(self, base: Path, node: Node) -> NamespacedRegistry:
        """A registry in `node`'s namespace holding what upstream holds: a copy of its storage,
        written out before the pulls (or hard links with `--registry-storage link`)."""
        assert self.upstream is not None
        local = NamespacedRegistry(base, node.namespace, node.ip)
        source = self.upstream.storage_dir / "docker"
        link = self.args.registry_storage == "link"
        run("cp", "-al" if link else "-a", str(source), str(local.storage_dir / "docker"))
        if not link:
            os.sync()  # not written back by the kernel's flusher during the pulls
        self.lab.track(local.process)
        local.start(timeout=READY_TIMEOUT)
        return local

    def announced(self, node: Node) -> float:
        try:
            text = node.metrics_text()
        except OSError:
            return 0.0
        return metric_sum(text, "mirror_advertised_keys", kind="digest")

    def uploads(self, nodes: list[Node]) -> list[int]:
        """Bytes each node's eth0 has sent so far (its uploads, headers included)."""
        return [qdisc_bytes(node.namespace, "eth0") for node in nodes]

    def measure(
        self,
        case: Case,
        result: CaseResult,
        image: Image,
        ref: str,
        everyone: list[Node],
        started: list[ManagedProcess],
    ) -> None:
        assert self.upstream is not None
        holder, nodes = everyone[0], everyone[1:]
        unpack = case.kind == "unpack"
        offset = self.upstream.log_size()
        sent_before = self.uploads(everyone)
        datagrams_before = [udp_datagrams(node.namespace) for node in nodes]
        groups = cpu_groups(everyone, started, self.upstream.process)
        load = OtherLoad(self.lab.pids)
        busy_before, clock = machine_busy_seconds(), time.monotonic()
        cpu_before = {name: cpu() for name, cpu in groups.items()}
        throttled_before = [throttled_seconds(node.namespace) for node in nodes]
        runtimes = pids_of([node.containerd for node in nodes])
        runtime_kernel_before = cpu_seconds(runtimes, kernel_only=True)
        result.wall, result.per_node = pull_all(self.lab, nodes, ref, mirrored=True, unpack=unpack)
        result.runtime_kernel_cpu = cpu_seconds(runtimes, kernel_only=True) - runtime_kernel_before
        result.throttled = [
            after - before
            for node, before in zip(nodes, throttled_before, strict=True)
            if before is not None and (after := throttled_seconds(node.namespace)) is not None
        ]
        elapsed = time.monotonic() - clock
        busy = (machine_busy_seconds() - busy_before) / (elapsed * (os.cpu_count() or 1))
        result.busy = min(1.0, busy)  # the two clocks differ by a tick or so
        result.other_load = load.share()
        result.cpu = {name: cpu() - cpu_before[name] for name, cpu in groups.items()}
        result.own_load = sum(result.cpu.values()) / (elapsed * (os.cpu_count() or 1))
        sent_after = self.uploads(everyone)
        sent = [after - before for after, before in zip(sent_after, sent_before, strict=True)]
        result.holder_upload, result.node_uploads = sent[0], sent[1:]
        # Read outside the CPU window, like the uploads: each read is a process of this script.
        result.node_datagrams = [
            (udp_in - in_before, udp_out - out_before)
            for node, (in_before, out_before) in zip(nodes, datagrams_before, strict=True)
            for udp_in, udp_out in [udp_datagrams(node.namespace)]
        ]
        traffic = self.upstream.traffic_since(offset)
        result.upstream_bytes = traffic.sent
        result.upstream_blob_bytes = traffic.blob_bytes
        result.upstream_blob_gets = traffic.blob_gets
        verify_pulled(nodes, image, ref, unpack=unpack)
        if holder.mirror is not None and holder.mirror.pid is not None:
            result.holder_rss_mib = memory_status(holder.mirror.pid)["VmHWM"]
            result.node_rss_mib = [
                memory_status(node.mirror.pid)["VmHWM"]
                for node in nodes
                if node.mirror is not None and node.mirror.pid is not None
            ]
            result.notes += mirror_notes(everyone)
            result.notes += self.extra_metrics(everyone)

    def extra_metrics(self, nodes: list[Node]) -> list[str]:
        """Served bytes per node, and the load-spreading metrics when this tree has them."""
        texts = [node.metrics_text() for node in nodes]
        served = [metric_sum(text, "mirror_served_bytes_total") / MIB for text in texts]
        lines = [
            "MiB each mirror served (mirror_served_bytes_total; holder first): "
            + " ".join(f"{mib:.0f}" for mib in served)
        ]
        found = {
            name: sum(metric_sum(text, name) for text in texts)
            for name in EXTRA_METRICS
            if any(name in text for text in texts)
        }
        if found:
            lines.append(
                "mirrors: " + ", ".join(f"{name} {value:g}" for name, value in found.items())
            )
        for title, name, labels in (
            ("requests the mirrors answered", "mirror_requests_total", ("method", "status")),
            ("fetches from peers that failed", "mirror_peer_fetch_failures_total", ("reason",)),
        ):
            if totals := [item for item in totals_by(texts, name, *labels) if item[1]]:
                lines.append(
                    f"{title} ({name}, all nodes; {' '.join(labels)}): "
                    + ", ".join(f"{' '.join(key)} {count:g}" for key, count in totals)
                )
        return lines

    def describe(self, result: CaseResult) -> str:
        times = result.per_node
        per_node = " ".join(f"{t:.2f}" for t in times)
        uploads = " ".join(f"{b / MIB:.0f}" for b in result.node_uploads)
        lines = [
            f"wall {result.wall:.2f}s (first start to last end); per node min {min(times):.2f}s, "
            f"median {statistics.median(times):.2f}s, max {max(times):.2f}s",
            f"per node (nodes 1..{result.nodes}): {per_node}",
            f"upstream: {result.upstream_blob_bytes / MIB:.1f} MiB of blobs "
            f"({result.upstream_blob_bytes / result.image_bytes:.2f}x the image, "
            f"{result.upstream_blob_gets} blob GETs), {result.upstream_bytes / 1024:.1f} KiB "
            "in all GET bodies",
            f"uploaded (eth0 qdisc bytes, MiB): holder {result.holder_upload / MIB:.0f} "
            f"({result.holder_upload / result.image_bytes:.2f}x the image); nodes {uploads}",
        ]
        if result.throttled:
            held = " ".join(f"{t:.1f}" for t in result.throttled)
            lines.insert(2, f"held back by the CPU cap (s, nodes 1..N): {held}")
        if any(sum(pair) for pair in result.node_datagrams):
            datagrams = " ".join(f"{got}/{sent}" for got, sent in result.node_datagrams)
            lines.append(f"DHT datagrams (UDP in/out, nodes 1..N): {datagrams}")
        if result.holder_rss_mib is not None:
            rss = " ".join(f"{mib:.0f}" for mib in result.node_rss_mib)
            lines.append(
                f"mirror peak RSS (VmHWM, MiB): holder {result.holder_rss_mib:.1f}; nodes {rss}"
            )
        lines.append(cpu_note(result.cpu, result.wall))
        if "containerd" in result.cpu:
            lines.append(
                f"containerd in the kernel: {result.runtime_kernel_cpu:.1f} of its "
                f"{result.cpu['containerd']:.1f} CPU s"
            )
        lines.append(
            f"the machine's CPUs were {result.busy:.0%} busy during the pulls"
            + (" (CPU-bound)" if result.cpu_bound else "")
            + f": this case's processes {result.own_load:.0%}, other processes "
            f"{result.other_load:.0%}"
            + ("; expect noisy figures" if result.other_load > 0.1 else "")
        )
        lines += result.notes
        return "\n".join("  " + line for line in lines)


# --- report -----------------------------------------------------------------------------------


def find(
    results: list[CaseResult], image: str, nodes: int, kind: str, mode: str, number: int = 1
) -> CaseResult | None:
    for r in results:
        if (r.image, r.nodes, r.kind, r.mode, r.round) == (
            image,
            nodes,
            kind,
            mode,
            number,
        ) and r.ok:
            return r
    return None


def judged_across_rounds(
    rounds: list[int], ratio: Callable[[int], float | None], target: float
) -> str:
    """`verdict` on the median over `rounds` of a ratio taken within each round, followed by
    each round's value when there were several."""
    values = [value for number in rounds if (value := ratio(number)) is not None]
    judged = verdict(statistics.median(values) if values else None, target)
    if len(values) < 2:
        return judged
    return judged + " over rounds " + ", ".join(f"{value:.2f}" for value in values)


def cpu_per_node(result: CaseResult) -> float:
    """The CPU seconds of a case's processes over its pulling nodes, upstream's left out: the
    runtimes' and pull clients' own, and an equal share of the services they pull through
    (the holder's mirror, or the proxy, spread over them)."""
    used = sum(seconds for name, seconds in result.cpu.items() if name != "upstream")
    return used / result.nodes


def verdict(value: float | None, target: float, *, below: bool = True) -> str:
    if value is None:
        return "not measured"
    met = value <= target if below else value < target
    return f"{value:.2f} ({'met' if met else 'MISSED'})"


def report(results: list[CaseResult], args: argparse.Namespace) -> None:
    rounds = sorted({r.round for r in results})
    several = len(rounds) > 1

    def tag(number: int) -> str:
        return f" (round {number})" if several else ""

    header = (
        f"{'image':<8} {'N':>3} {'kind':<6} {'mode':<18} {'wall s':>7} {'node min/med/max s':>19} "
        f"{'up blobs/img':>12} {'holder up/img':>13} {'max node up MiB':>15} {'max RSS':>8} "
        f"{'CPU s':>6} {'busy':>5} {'own':>4}"
    )
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        mode = f"{r.mode} #{r.round}" if several else r.mode
        lead = f"{r.image:<8} {r.nodes:>3} {r.kind:<6} {mode:<18}"
        if not r.ok:
            print(f"{lead} {'skipped' if r.skipped else 'FAILED'}: {r.skipped or r.error}")
            continue
        times = f"{min(r.per_node):.2f}/{statistics.median(r.per_node):.2f}/{max(r.per_node):.2f}"
        rss = f"{r.max_rss:.0f}" if r.max_rss is not None else "-"
        node_up = max(r.node_uploads) / MIB if r.node_uploads else 0.0
        print(
            f"{lead} {r.wall:>7.2f} {times:>19} {r.upstream_blob_bytes / r.image_bytes:>12.2f} "
            f"{r.holder_upload / r.image_bytes:>13.2f} {node_up:>15.0f} {rss:>8} "
            f"{sum(r.cpu.values()):>6.1f} {r.busy:>4.0%}{'*' if r.cpu_bound else ' '} "
            f"{r.own_load:>4.0%}"
        )
    print(
        "up blobs/img: blob bytes upstream sent over the image; holder up/img: bytes the holder's "
        "eth0 sent over the image; max RSS: the largest mirror VmHWM (MiB); busy: the machine's "
        f"CPUs during the pulls (* = CPU-bound, >= {CPU_BOUND:.0%}), own: the share this case's "
        f"processes used; links shaped to {args.rate}"
        + (f"; {args.cpus_per_node} CPUs per namespace" if args.cpus_per_node else "")
    )

    print("\nratios (mode time / proxy time, same image, N and kind):")
    keys = dict.fromkeys((r.image, r.nodes, r.kind) for r in results)
    for number in rounds:
        for image, nodes, kind in keys:
            proxy = find(results, image, nodes, kind, "proxy", number)
            for mode in ("mirror", "mirror-redirect"):
                other = find(results, image, nodes, kind, mode, number)
                if proxy and other:
                    print(
                        f"  {image} N={nodes} {kind}: {mode}/proxy "
                        f"{other.wall / proxy.wall:.2f}{tag(number)}"
                    )
    floors = [
        (
            "local",
            ("proxy", "mirror", "mirror-redirect", "ring"),
            "the floor",
            "every node pulling from its own copy",
        ),
        (
            "ring",
            ("mirror", "mirror-redirect"),
            "the network's floor",
            "every node pulling from the next one's registry",
        ),
    ]
    for floor, modes, name, what in floors:
        ratios = [
            f"  {image} N={nodes} {kind}: {mode}/{floor} {other.wall / base.wall:.2f}{tag(number)}"
            for number in rounds
            for image, nodes, kind in keys
            if (base := find(results, image, nodes, kind, floor, number))
            for mode in modes
            if (other := find(results, image, nodes, kind, mode, number))
        ]
        if ratios:
            print(f"against {name} (mode time / {floor} time: {what}):")
            print("\n".join(ratios))

    print(
        "flatness (content fetch, time at N over N=1, same mode and image; and the CPU seconds "
        "each pulling node used, its share of the mirrors' (or registries') included: with "
        "--cpus-per-node a node's time follows its CPU, which this host gives the same work "
        "at a cost that varies from run to run):"
    )
    for r in results:
        single = find(results, r.image, 1, "fetch", r.mode, r.round)
        if r.ok and r.kind == "fetch" and r.nodes > 1 and single:
            wide_cpu, single_cpu = cpu_per_node(r), cpu_per_node(single)
            print(
                f"  {r.image} {r.mode}: N={r.nodes} {r.wall:.2f}s / N=1 {single.wall:.2f}s = "
                f"{r.wall / single.wall:.2f}; CPU s per node {wide_cpu:.2f} / {single_cpu:.2f} "
                f"= {wide_cpu / single_cpu:.2f}{tag(r.round)}"
            )

    # The targets name the sizes; here they are the run's smallest and largest images.
    by_size = sorted({(r.image_bytes, r.image) for r in results if r.ok})
    small = by_size[0][1] if by_size else "-"
    large = by_size[-1][1] if by_size else "-"
    print(
        "\ntargets (issue 10; benchmarks, not asserts"
        + (f"; each the median of its ratio within each of {len(rounds)} rounds" if several else "")
        + "):"
    )

    def judged(wide: tuple[int, str, str], narrow: tuple[int, str, str], target: float) -> str:
        return judged_across_rounds(
            rounds,
            lambda number: (
                one.wall / other.wall
                if (one := find(results, small, *wide, number))
                and (other := find(results, small, *narrow, number))
                else None
            ),
            target,
        )

    for mode in ("mirror", "mirror-redirect"):
        print(
            f"  warm rollout {small} N=8 with unpack, {mode}/proxy <= {TARGET_PROXY_RATIO}: "
            + judged((8, "unpack", mode), (8, "unpack", "proxy"), TARGET_PROXY_RATIO)
        )
        print(
            f"  content fetch {small} N=16 / N=1 ({mode}) <= {TARGET_FLATNESS}: "
            + judged((16, "fetch", mode), (1, "fetch", mode), TARGET_FLATNESS)
        )
        rss = [
            r.max_rss
            for r in results
            if r.ok and r.mode == mode and r.image == large and r.max_rss is not None
        ]
        print(
            f"  peak mirror RSS serving and sharing {large} ({mode}) < {TARGET_RSS_MIB:.0f} MiB: "
            + verdict(max(rss) if rss else None, TARGET_RSS_MIB, below=False)
        )
    print("  cold 8-node pull <= 1.2x one node alone, upstream 1.00x: see bench/cold_pull.py")


# --- main ---------------------------------------------------------------------------------------


def redirect_supported(python: str) -> bool:
    done = subprocess.run(
        [python, "-m", "mirror", "run", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    return REDIRECT_FLAG in done.stdout


def tree_state(python: str) -> str:
    """Which mirror code the nodes run: the package `python` imports, and this checkout's
    commit with how many files under mirror/ differ from it (others edit it meanwhile)."""
    where = subprocess.run(
        [python, "-c", "import mirror; print(mirror.__file__)"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    ).stdout.strip()
    head = run("git", "-C", str(REPO), "rev-parse", "--short", "HEAD", check=False).stdout.strip()
    changed = run("git", "-C", str(REPO), "status", "--porcelain", check=False).stdout
    files = [line[3:] for line in changed.splitlines() if line[3:].startswith("mirror/")]
    return (
        f"mirror from {Path(where).parent if where else '?'}; checkout at {head or '?'} with "
        f"{len(files)} changed file(s) under mirror/"
    )


def run_bench(args: argparse.Namespace) -> int:
    cases = plan(args.scenarios, args.modes, args.rounds)
    if args.plan:
        for case in cases:
            print(case.describe(args.pull_client))
        return 0
    tmp_parent = prepare_lab(NAMES, args)
    # A tree whose mirrors take --peer-transfer: mode mirror pins `share` (the default is `auto`,
    # which means redirect on containerd), mode mirror-redirect needs it.
    transfer_flag = redirect_supported(args.python)
    results: list[CaseResult] = []
    with (
        workspace(str(tmp_parent), NAMES.tmp_prefix) as work,
        Lab(NAMES, pull_progress=args.ctr_progress, pull_client=args.pull_client) as lab,
    ):
        check_socket_paths(work, max((case.label for case in cases), key=len) + "/n200")
        bench = Rollout(args, work, lab, transfer_flag=transfer_flag)
        bench.build_network(max(s.nodes for s in args.scenarios))
        bench.start_upstream(args.scenarios)
        keygen(args.python, bench.key_file)
        expected = rate_bits(args.rate)
        print(
            f"links shaped to tbf rate {args.rate} burst {args.burst} latency {args.latency} "
            f"both ways; TCP congestion control {congestion_control_in(bench.upstream_ns)}; "
            f"{os.cpu_count()} CPUs; {tree_state(args.python)}",
            flush=True,
        )
        if args.cpus_per_node is not None:
            print(
                f"every namespace (upstream, holder, each node) capped at {args.cpus_per_node} "
                "CPUs for all its processes together (a cgroup each"
                + {
                    "split": "; split in two of equal weight: the runtime and its pull client, "
                    "the service they pull through)",
                    "pinned": "; each on one CPU, the namespaces taking the CPUs in turn)",
                    "apart": "; the service each node pulls through, the mirror or a "
                    "registry, in a cgroup of its own with as large a share)",
                }.get(args.node_cgroups, ")"),
                flush=True,
            )
        if expected:
            for image, _ in bench.images.values():
                print(
                    f"  {image.size / MIB:.0f} MiB takes {image.size * 8 / expected:.2f}s "
                    f"through one {args.rate} link"
                )
        if "mirror-redirect" in args.modes and not transfer_flag:
            print(
                f"mode mirror-redirect skipped: `mirror run --help` has no {REDIRECT_FLAG} "
                "(the redirect code is not in this tree yet)",
                flush=True,
            )
        try:
            for case in cases:
                if case.mode == "mirror-redirect" and not transfer_flag:
                    s = case.scenario
                    skipped = CaseResult(
                        s.image_label, 0, s.nodes, case.kind, case.mode, case.round
                    )
                    skipped.skipped = f"no {REDIRECT_FLAG} in this tree"
                    results.append(skipped)
                    continue
                try:
                    results.append(bench.run_case(case))
                except (RuntimeError, TimeoutError, subprocess.SubprocessError, OSError) as exc:
                    if args.stop_on_error:
                        raise
                    print(f"  FAILED: {exc}", file=sys.stderr, flush=True)
                    s = case.scenario
                    failed = CaseResult(s.image_label, 0, s.nodes, case.kind, case.mode, case.round)
                    failed.error = " ".join(str(exc).split())[:200]
                    results.append(failed)
        finally:
            copy_logs(args.keep_logs, "upstream", work / "upstream")
            if args.json:
                rows = [{**asdict(r), "cpu_bound": r.cpu_bound} for r in results]
                Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    report(results, args)
    return 1 if any(r.error for r in results) else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Warm rollout: a holder has the image, N containerd nodes in network "
        "namespaces pull it at once over shaped links, through a warm proxy-mode registry on "
        "the holder or through mirror."
    )
    parser.add_argument(
        "--scenarios",
        default=DEFAULT_SCENARIOS,
        help="comma-separated MIB[xLAYERS]:N[:unpack|fetch|unpack+fetch], run in this order "
        f"(default: {DEFAULT_SCENARIOS})",
    )
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help="comma-separated, run in this order for each scenario "
        f"(default: {','.join(DEFAULT_MODES)}; also: local, ring)",
    )
    add_shaping_arguments(parser, rate="1gbit", burst="512kb", links="every link, both ways")
    parser.add_argument(
        "--cpus-per-node",
        type=float,
        default=None,
        help="CPUs each namespace (upstream, holder, node) may use together, e.g. 0.1: every "
        "simulated machine its own share, so a run is not bound by this host's cores (keep "
        "(N + 2) x share under the host's CPUs); default: no cap, all share the host",
    )
    add_node_cgroups_argument(parser)
    parser.add_argument(
        "--registry-storage",
        choices=("copy", "link"),
        default="copy",
        help="what the registries of local and ring hold: a copy of upstream's storage each, "
        "as separate machines (default), or hard links to it, every registry then serving the "
        "same pages of this host's page cache (how runs before 2026-12-04 measured them)",
    )
    add_lab_arguments(parser, unit="case")
    parser.add_argument(
        "--mirror-arg",
        action="append",
        default=[],
        help="one more flag for every mirror, e.g. --mirror-arg=--scrub-rate=0 (repeatable)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every case this many times, round after round; ratios are taken within a "
        "round and each target is judged on their median (default: 1)",
    )
    parser.add_argument("--plan", action="store_true", help="list the cases and exit")
    parser.add_argument("--json", default=None, help="write every case's results to this file")
    parser.add_argument(
        "--stop-on-error",
        action="store_true",
        help="stop at the first failed case (default: report it and go on)",
    )
    add_lab_tool_arguments(parser)
    args = parser.parse_args(argv)
    try:
        args.scenarios = parse_scenarios(args.scenarios)
    except ValueError as exc:
        parser.error(f"--scenarios: {exc}")
    if args.rounds < 1:
        parser.error("--rounds takes a positive number")
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not args.modes or any(mode not in MODES for mode in args.modes):
        parser.error(f"--modes takes a list of {', '.join(MODES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(run_bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
