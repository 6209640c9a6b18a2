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
- mirror-redirect (not a default mode): the same with `--peer-transfer=redirect`.
- mirror: every node runs a mirror (`--peer-transfer=share`, one cluster key, static bootstrap
  of every router, `--upstream` for the upstream, `--allow-client` for its own address since
  containerd does not reach it over loopback); its containerd's hosts.toml points at its own
  mirror. The cluster is formed first
  (every node's `mirror_dht_contacts` reaches N-1), then all N pull at once. The mirrors'
  /metrics (coalesced waits, where blobs came from, bytes each received from upstream) are
  printed after the pulls.

The pulls of a mode start together (threads released by one barrier, each running
`ip netns exec cpb-nI ctr images pull --hosts-dir ...`; ctr fetches and containerd unpacks;
with `--no-unpack`, `ctr content fetch`: the same transfers without the unpacking; every pull
without ctr's progress table unless `--ctr-progress`, see `common.pull_argv`; with
`--pull-client cri`, CRI's PullImage, as a kubelet pulls: containerd fetches and unpacks in its
own process). `--cpus-per-node` gives every node (the baseline's one and each of N alike) a CPU
share of its own, as on real machines, instead of letting all of them share this host's cores.
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
import os
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    MIB,
    REGISTRY_PORT,
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
    keygen,
    layer_sizes,
    mirror_notes,
    prepare_lab,
    pull_all,
    push_image,
    qdisc_bytes,
    rate_bits,
    run_benchmark,
    shape_egress,
    start_containerd,
    start_mirror,
    verify_pulled,
    wait_containerd,
    wait_mirrors,
    workspace,
)

NAMES = LabNames(prefix="cpb", subnet="10.213.0", tmp_prefix="cold-pull-")
UPSTREAM_IP = f"{NAMES.subnet}.2"
PROXY_IP = f"{NAMES.subnet}.3"
FIRST_NODE_OCTET = 11
MAX_NODES = 200
REPOSITORY = "bench/app"
TAG = "v1"
MODES = ("baseline", "direct", "proxy", "mirror", "mirror-redirect")
DEFAULT_MODES = ("baseline", "direct", "proxy", "mirror")
MIRROR_MODES = ("mirror", "mirror-redirect")
# Shares of the image each layer gets: a few big ones and some small ones, like a real image.
LAYER_SHARES = (0.40, 0.25, 0.15, 0.10, 0.06, 0.04)
READY_TIMEOUT = 60.0
TARGET_TIME = 1.3
TARGET_BYTES = 1.05


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
        args = self.args
        shape_egress(self.upstream_ns, "eth0", args.rate, args.burst, args.latency)
        capped = []
        if "proxy" in self.args.modes:
            capped.append(self.lab.add_host("px", PROXY_IP))
        for index in range(self.args.nodes):
            ip = f"{NAMES.subnet}.{FIRST_NODE_OCTET + index}"
            self.nodes.append(Node(index, self.lab.add_host(f"n{index}", ip), ip))
            capped.append(self.nodes[-1].namespace)
        if args.cpus_per_node is not None:
            for namespace in capped:
                self.lab.cap_cpu(namespace, args.cpus_per_node, layout=args.node_cgroups)

    def start_upstream(self) -> None:
        upstream = NamespacedRegistry(self.work / "upstream", self.upstream_ns, UPSTREAM_IP)
        self.lab.track(upstream.process)
        upstream.start(timeout=READY_TIMEOUT)
        self.upstream = upstream
        sizes = layer_sizes(self.args.image_mib, LAYER_SHARES)
        image = build_image(self.work / "image", sizes, TAG)
        push_image(image, TAG, self.ref)
        self.image = image

    def wire_bytes(self) -> int:
        """Bytes the shaped qdisc on upstream's eth0 has sent so far."""
        return qdisc_bytes(self.upstream_ns, "eth0")

    # per mode --------------------------------------------------------------------------------

    def mirror_settings(self, mode: str) -> MirrorSettings:
        upstream = f"{UPSTREAM_IP}:{REGISTRY_PORT}"
        return MirrorSettings(
            python=self.args.python,
            key_file=self.key_file,
            routers=tuple(f"{n.ip}:{ROUTER_PORT}" for n in self.nodes),
            upstream=upstream,
            resolve_timeout=self.args.resolve_timeout,
            log_level=self.args.mirror_log_level,
            # Pinned: the default, `auto`, redirects on containerd.
            extra=(f"--peer-transfer={'redirect' if mode == 'mirror-redirect' else 'share'}",),
        )

    def run_mode(self, mode: str) -> ModeResult:
        assert self.upstream is not None and self.image is not None
        nodes = self.nodes[:1] if mode == "baseline" else list(self.nodes)
        mode_dir = self.work / mode
        mode_started: list[ManagedProcess] = []
        notes: list[str] = []
        print(f"\n== {mode}: {len(nodes)} node(s)", flush=True)
        for node in self.nodes:
            node.containerd = node.mirror = None
        try:
            for node in nodes:
                start_containerd(self.lab, node, mode_dir / f"n{node.index}")
                assert node.containerd is not None
                mode_started.append(node.containerd)
            for node in nodes:
                wait_containerd(node)
            upstream_url = self.upstream.url
            mirrors: list[str] = []
            if mode == "proxy":
                proxy = NamespacedRegistry(
                    mode_dir / "proxy",
                    f"{NAMES.prefix}-px",
                    PROXY_IP,
                    extra_config=f"proxy:\n  remoteurl: {upstream_url}\n",
                )
                self.lab.track(proxy.process)
                mode_started.append(proxy.process)
                proxy.start(timeout=READY_TIMEOUT)
                mirrors = [proxy.url]
            if mode in MIRROR_MODES:
                settings = self.mirror_settings(mode)
                for node in nodes:
                    start_mirror(self.lab, node, settings)
                    assert node.mirror is not None
                    mode_started.append(node.mirror)
                took = wait_mirrors(nodes)
                notes.append(f"cluster formed {took:.1f}s after the mirrors were started")
            mirrored = mode == "proxy" or mode in MIRROR_MODES
            for node in nodes if mirrored else []:
                urls = [node.mirror_url] if mode in MIRROR_MODES else mirrors
                node.write_hosts(self.upstream.host, upstream_url, urls)
            offset = self.upstream.log_size()
            wire_before = self.wire_bytes()
            groups = cpu_groups(nodes, mode_started, self.upstream.process)
            load = OtherLoad(self.lab.pids)
            cpu_before = {name: cpu() for name, cpu in groups.items()}
            unpack = not self.args.no_unpack
            completion, per_node = pull_all(
                self.lab, nodes, self.ref, mirrored=mirrored, unpack=unpack
            )
            other = load.share()
            cpu_used = {name: cpu() - cpu_before[name] for name, cpu in groups.items()}
            notes.append(cpu_note(cpu_used, completion))
            verify_pulled(nodes, self.image, self.ref, unpack=unpack)
            if mode in MIRROR_MODES:
                notes += mirror_notes(nodes)
            # Stop the proxy and mirrors first: whatever they still fetch is counted too.
            self.lab.stop(mode_started)
            mode_started.clear()
            traffic = self.upstream.traffic_since(offset)
            wire = self.wire_bytes() - wire_before
        finally:
            self.lab.stop(mode_started)
            copy_logs(self.args.keep_logs, mode, mode_dir)
            shutil.rmtree(mode_dir, ignore_errors=True)
        result = ModeResult(
            mode, len(nodes), completion, per_node, traffic.sent, wire, traffic.blob_gets, other
        )
        result.notes = notes
        print(self.describe(result), flush=True)
        return result

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
        if r.mode in MIRROR_MODES:
            met = t1 is not None and time_ratio <= TARGET_TIME and bytes_ratio <= TARGET_BYTES
            part += (
                f" (targets <= {TARGET_TIME}x, <= {TARGET_BYTES}x: {'met' if met else 'MISSED'})"
            )
            verdict = max(verdict, 0 if met else 1)
        parts.append(part)
    print(
        f"SUMMARY: {args.nodes} nodes, {image.size / MIB:.0f} MiB image, upstream at {args.rate}: "
        + "; ".join(parts)
    )
    return verdict if args.strict else 0


def run_bench(args: argparse.Namespace) -> int:
    tmp_parent = prepare_lab(NAMES, args)
    expected = rate_bits(args.rate)
    with (
        workspace(str(tmp_parent), NAMES.tmp_prefix) as work,
        Lab(NAMES, pull_progress=args.ctr_progress, pull_client=args.pull_client) as lab,
    ):
        check_socket_paths(work, "baseline/n0")
        bench = Bench(args, work, lab)
        bench.build_network()
        bench.start_upstream()
        if set(MIRROR_MODES) & set(args.modes):
            keygen(args.python, bench.key_file)
        image = bench.image
        assert image is not None
        cc = congestion_control_in(bench.upstream_ns)
        print(
            f"image {image.size / MIB:.1f} MiB in {len(image.blobs)} blobs, pushed to "
            f"{bench.ref}; upstream egress tbf rate {args.rate} burst {args.burst} latency "
            f"{args.latency}; TCP congestion control {cc}; {os.cpu_count()} CPUs; pulls by "
            f"{'CRI PullImage' if args.pull_client == 'cri' and not args.no_unpack else 'ctr'}"
            + (
                f"; every node capped at {args.cpus_per_node} CPUs ({args.node_cgroups} cgroups)"
                if args.cpus_per_node
                else ""
            ),
            flush=True,
        )
        if expected:
            print(f"the image alone takes {image.size * 8 / expected:.1f}s at {args.rate}")
        try:
            results = [bench.run_mode(mode) for mode in args.modes]
        finally:
            copy_logs(args.keep_logs, "upstream", work / "upstream")
        return report(results, image, args)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Cold concurrent pull of one image by N containerd nodes in network "
        "namespaces, upstream behind a shaped link: direct, through a proxy registry, "
        "through mirror."
    )
    parser.add_argument("--nodes", type=int, default=8, help="nodes pulling at once (default: 8)")
    parser.add_argument(
        "--cpus-per-node",
        type=float,
        default=None,
        help="CPUs each node (and the proxy) may use together, e.g. 0.25: every simulated "
        "machine its own share, the same for the single node of the baseline as for each of "
        "N, as on real machines (keep N x share within the host's CPUs; upstream, the outside "
        "registry, is not capped); default: no cap, all share the host",
    )
    add_node_cgroups_argument(parser)
    parser.add_argument("--image-mib", type=int, default=75, help="image size (default: 75)")
    add_shaping_arguments(parser, rate="100mbit", burst="128kb", links="upstream's egress")
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated, run in this order (default: {','.join(DEFAULT_MODES)}; also: "
        "mirror-redirect)",
    )
    add_lab_arguments(parser, unit="mode")
    parser.add_argument(
        "--no-unpack",
        action="store_true",
        help="fetch with `ctr content fetch` (no unpacking): the transfers without the CPU "
        "containerd spends unpacking, which every node pays with or without a mirror",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when mode mirror misses a target"
    )
    add_lab_tool_arguments(parser)
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
