"""The typed configuration of a node, built once by mirror.cli and passed down.

mirror.cli is the one module that looks at the process's variables: ``MIRROR_<FLAG>`` for
every flag, and the few that other programs define and mirror honours (``DOCKER_HOST``, what
Kubernetes and Nomad put into a workload). Everything else gets what it needs from here, so
a test hands a module its settings instead of patching the process, and no setting can be
read differently in two places.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from mirror.errors import ConfigError
from mirror.ports import port_number

if TYPE_CHECKING:
    from mirror.clusterkey import ClusterKey
    from mirror.routing.bootstrap.base import BootstrapSource
    from mirror.routing.bootstrap.kubernetes import KubernetesSettings
    from mirror.routing.bootstrap.nomad import NomadSettings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class StoreKind(StrEnum):
    AUTO = "auto"
    CONTAINERD = "containerd"
    DOCKER = "docker"
    CACHE = "cache"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class PeerTransfer(StrEnum):
    """How a blob a peer holds reaches this node's runtime (--peer-transfer)."""

    # This node fetches it from the peer, verified, and serves it.
    SHARE = "share"
    # A 307 to a signed single-use URL at a peer that holds it or whose runtime is receiving
    # it; the peer sends the bytes.
    REDIRECT = "redirect"
    # Redirect where the store shows what its runtime is receiving (containerd: the node then
    # shares the runtime's own download), share elsewhere (Docker, the node cache alone),
    # where only the node's own fetch can be shared while it arrives.
    AUTO = "auto"

    def for_store(self, shows_receiving: bool) -> PeerTransfer:
        """What this setting means for a store that does, or does not, show what its
        runtime is receiving: SHARE or REDIRECT, never AUTO."""
        if self is PeerTransfer.AUTO:
            return PeerTransfer.REDIRECT if shows_receiving else PeerTransfer.SHARE
        return self


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """`HOST:PORT` or `[IPv6]:PORT`; an empty host means all interfaces."""
    host, separator, port_text = text.rpartition(":")
    if not separator or not (port_text.isascii() and port_text.isdigit()):
        raise ConfigError(f"{text!r} is not HOST:PORT")
    port = port_number(port_text, allow_zero=True)
    if port is None:
        raise ConfigError(f"port {port_text} is out of range in {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Address(host or "0.0.0.0", port)


_DURATION = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """`20ms`, `1.5s`, `10m`, `1h`, or a bare number of seconds; in seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"{text!r} is not a duration such as 20ms, 5s or 10m")
    seconds = float(match["number"]) * _UNIT_SECONDS[match["unit"]]
    if seconds <= 0:
        raise ConfigError(f"duration {text!r} must be positive")
    return seconds


def parse_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError as exc:
        raise ConfigError(f"{text!r} is not an IP address") from exc


def parse_cidr(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ConfigError(f"{text!r} is not a CIDR such as 10.0.0.0/8") from exc


_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]i?B?|B)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


@dataclass(frozen=True, slots=True)
class CacheSize:
    """A byte count, or a share of the cache directory's file system (resolved at start)."""

    bytes: int | None = None
    fraction: float | None = None

    def __str__(self) -> str:
        return f"{self.fraction * 100:g}%" if self.fraction is not None else f"{self.bytes}B"


def parse_cache_size(text: str) -> CacheSize:
    """`20%` of the disk, or `50GiB`, `500MB`, `1T`, plain bytes."""
    cleaned = text.strip()
    if cleaned.endswith("%"):
        try:
            percent = float(cleaned[:-1])
        except ValueError as exc:
            raise ConfigError(f"{text!r} is not a percentage such as 20%") from exc
        if not 0 < percent <= 100:
            raise ConfigError(f"{text!r} must be between 0% and 100%")
        return CacheSize(fraction=percent / 100)
    match = _SIZE.fullmatch(cleaned)
    if match is None:
        raise ConfigError(f"{text!r} is not a size such as 50GiB, 500MB or 20%")
    unit = (match["unit"] or "").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit and unit[0] != "B" else 0
    value = int(float(match["number"]) * base**power)
    if value <= 0:
        raise ConfigError(f"cache size {text!r} must be positive")
    return CacheSize(bytes=value)


def parse_mib_per_second(text: str) -> int:
    """A rate in MiB/s (`20`, `2.5`), in bytes per second; `0` means off."""
    try:
        mib = float(text.strip())
    except ValueError as exc:
        raise ConfigError(f"{text!r} is not a rate in MiB/s such as 20") from exc
    if not 0 <= mib < 1024**2:
        raise ConfigError(f"rate {text!r} must be between 0 and 1048576 MiB/s")
    return int(mib * 1024**2)


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{text!r} is not true or false")


_NODE_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?")


def parse_node_name(text: str) -> str:
    """A Kubernetes node name (a DNS subdomain): it goes into an API path."""
    cleaned = text.strip()
    if not _NODE_NAME.fullmatch(cleaned):
        raise ConfigError(f"{text!r} is not a Kubernetes node name")
    return cleaned


def parse_connection_cap(text: str) -> int:
    """A number of connections, `0` meaning no cap."""
    cleaned = text.strip()
    if not (cleaned.isascii() and cleaned.isdigit()) or len(cleaned) > 9:
        raise ConfigError(f"{text!r} is not a number of connections such as 512 (0: no cap)")
    return int(cleaned)


# Blob bodies a node sends to peers at once (--max-uploads). containerd fetches up to three
# layers of an image at once (max_concurrent_downloads), so eight serve two or three pulling
# nodes at full parallelism, and a few TCP streams already fill a node's link (a 10 Gbit/s
# link split eight ways still gives each stream about 150 MB/s). Past that another upload
# only slices the same link thinner, while a node that already fetched the blob (or is
# fetching it: the swarm) has an idle one; refusing sends the request there.
DEFAULT_MAX_UPLOADS = 8


def parse_upload_cap(text: str) -> int:
    """A number of concurrent uploads to peers, `0` meaning no bound."""
    cleaned = text.strip()
    if not (cleaned.isascii() and cleaned.isdigit()) or len(cleaned) > 6:
        raise ConfigError(f"{text!r} is not a number of uploads such as 8 (0: no bound)")
    return int(cleaned)


# Peers one node sends one blob to at once while other nodes fetching it from it could serve
# instead (--blob-fanout): past it a sharer's request is referred to them (peers/referrals.py).
# Two makes a rollout a tree about log2(N) deep: each node downloads the blob once and uploads
# it about once. One made a chain N deep, whose end waits on every node's commit in turn
# (docs/benchmarks.md, "A tree, not a chain"). 0: no per-blob bound.
DEFAULT_BLOB_FANOUT = 2


# --peer-ranges and --peer-range-size (peers/ranged.py): pieces of a whole blob fetched from
# peers at once (1: one stream), and the size of each piece. One stream by default: in a rollout
# whose nodes all start at once, pieces asked of nodes still downloading wait on each other
# (docs/benchmarks.md, "Parallel ranges"); pieces suit a late fetch from complete holders.
DEFAULT_PEER_RANGES = 1
DEFAULT_PEER_RANGE_SIZE = 8 * 1024 * 1024
_MAX_PEER_RANGES = 64
_MIN_PEER_RANGE_SIZE = 64 * 1024
_MAX_PEER_RANGE_SIZE = 1024**3


def parse_peer_ranges(text: str) -> int:
    """Pieces of one blob fetched from peers at once, 1 to 64 (1: one stream)."""
    cleaned = text.strip()
    if not (cleaned.isascii() and cleaned.isdigit()) or not 1 <= int(cleaned) <= _MAX_PEER_RANGES:
        raise ConfigError(f"{text!r} is not a number of pieces from 1 to {_MAX_PEER_RANGES}")
    return int(cleaned)


def parse_peer_range_size(text: str) -> int:
    """The bytes of one piece: `8MiB`, `512KiB`, plain bytes; 64 KiB to 1 GiB."""
    parsed = parse_cache_size(text) if not text.strip().endswith("%") else CacheSize()
    if parsed.bytes is None or not _MIN_PEER_RANGE_SIZE <= parsed.bytes <= _MAX_PEER_RANGE_SIZE:
        raise ConfigError(f"{text!r} is not a piece size from 64KiB to 1GiB such as 8MiB")
    return parsed.bytes


@dataclass(frozen=True, slots=True)
class ContainerdConfig:
    socket: Path
    namespace: str
    # None: ask containerd's introspection API where its content store lives.
    content_path: Path | None


# dockerd's socket when neither --docker-host, MIRROR_DOCKER_HOST nor DOCKER_HOST names one.
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Peer-to-peer settings. Without a cluster key the node runs alone: no DHT, no peers."""

    cluster_key: ClusterKey | None
    router_addr: Address
    # What peers dial for this node's registry; None: the registry address, or if that is a
    # wildcard, the address of the interface that routes outwards.
    advertise_ip: str | None
    bootstrap: tuple[BootstrapSource, ...]
    resolve_timeout: float
    advertise_ttl: float
    # Runtimes allowed besides loopback; peers are recognised by their signature instead.
    allow_clients: tuple[IPNetwork, ...]
    # How a blob a peer holds reaches this node's runtime (AUTO: by the store, `for_store`).
    peer_transfer: PeerTransfer = PeerTransfer.AUTO
    # Blob bodies sent to peers at once; past it a peer's request is refused with a 429 and
    # goes to another holder (a last-resort request is served anyway). 0: no bound.
    max_uploads: int = DEFAULT_MAX_UPLOADS
    # Sharers one blob goes to at once from this node; past it a sharer's request is referred
    # to those sharers (peers/referrals.py). 0: no per-blob bound.
    blob_fanout: int = DEFAULT_BLOB_FANOUT
    # A whole blob from peers in this many pieces at once, each of `peer_range_size` bytes,
    # from several providers (peers/ranged.py); 1: one stream from one provider at a time.
    peer_ranges: int = DEFAULT_PEER_RANGES
    peer_range_size: int = DEFAULT_PEER_RANGE_SIZE


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Fetching from registries outside the cluster when no node holds the content."""

    # False: an OCI 404 lets the runtime go upstream itself (Spegel's behaviour).
    fallback: bool
    # Registry -> base URL, from --upstream REGISTRY=URL.
    overrides: tuple[tuple[str, str], ...]
    auth_file: Path | None
    tag_timeout: float
    # Longest wait for an upstream response's headers, token fetch included (not the body).
    timeout: float


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Bounds on the connections of the registry and metrics ports (registry/connections.py)."""

    # A connection must send a whole request head within this many seconds of opening, or of
    # the first byte of its next request; a response being sent is never cut.
    request_head_timeout: float
    # Open connections one client IP may hold on a port; past it new ones are closed. 0: no cap.
    max_connections_per_client: int


class WorkloadSource(StrEnum):
    """Orchestrators whose workloads' images a node pins (--prefetch-from)."""

    NOMAD = "nomad"
    KUBERNETES = "kubernetes"


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    """Images a node keeps in its runtime before they are needed (mirror/prefetch/)."""

    # The TOML file of pins (re-read when it changes); None: no file.
    file: Path | None = None
    # This node's labels, which pins' `nodes` tables match (--node-label KEY=VALUE).
    node_labels: tuple[tuple[str, str], ...] = ()
    # Orchestrators whose workloads that can run on this node are pinned.
    workloads: tuple[WorkloadSource, ...] = ()
    # Pinned tags are re-resolved this often (seconds); a moved tag is taken again.
    recheck: float = 300.0
    # How often the prefetch file is looked at for changes (seconds).
    file_poll: float = 2.0
    # Nomad: how to reach the API, and the node's datacenter and node pool, which a job must
    # be able to place on (set when workloads include NOMAD).
    nomad: NomadSettings | None = None
    nomad_datacenter: str | None = None
    nomad_node_pool: str = "default"
    # The shared secret webhook senders prove themselves with (--webhook-token-file); None:
    # the /mirror/v1/events/ receivers answer 404.
    webhook_token: bytes | None = None
    # Kubernetes: how to reach the API (set when workloads include KUBERNETES), one
    # namespace's workloads or None for all, and this node's name, whose labels are read.
    kubernetes: KubernetesSettings | None = None
    kubernetes_namespace: str | None = None
    node_name: str | None = None


@dataclass(frozen=True, slots=True)
class RunConfig:
    store: StoreKind
    containerd: ContainerdConfig
    # --docker-host, else MIRROR_DOCKER_HOST, else DOCKER_HOST, else DEFAULT_DOCKER_HOST.
    docker_host: str
    cache_dir: Path
    cache_size: CacheSize
    registry_addr: Address
    metrics_addr: Address
    http_limits: HttpLimits
    log_level: LogLevel
    routing: RoutingConfig
    upstream: UpstreamConfig
    # None: every registry is mirrored; otherwise requests for others get a 404 at once.
    mirrored_registries: frozenset[str] | None
    resolve_tags: bool
    # Bytes per second the background scrub reads to re-verify cached blobs; 0: no scrub.
    scrub_rate: int
    prefetch: PrefetchConfig = PrefetchConfig()
