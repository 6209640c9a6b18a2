"""The typed configuration of a node, built once from flags and environment and passed down."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from mirror.errors import ConfigError


class StoreKind(StrEnum):
    AUTO = "auto"
    CONTAINERD = "containerd"
    CACHE = "cache"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """`HOST:PORT` or `[IPv6]:PORT`; an empty host means all interfaces."""
    host, separator, port_text = text.rpartition(":")
    if not separator or not port_text.isdigit():
        raise ConfigError(f"{text!r} is not HOST:PORT")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range in {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Address(host or "0.0.0.0", port)


@dataclass(frozen=True, slots=True)
class ContainerdConfig:
    socket: Path
    namespace: str
    # None: ask containerd's introspection API where its content store lives.
    content_path: Path | None


@dataclass(frozen=True, slots=True)
class RunConfig:
    store: StoreKind
    containerd: ContainerdConfig
    cache_dir: Path
    registry_addr: Address
    metrics_addr: Address
    log_level: LogLevel
