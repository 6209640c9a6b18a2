"""dockerd's `certs.d`: a `hosts.toml` per registry, for dockerd resolving through containerd.

Which route a pull takes depends on the daemon (checked in moby's source):

- Docker 28 and later on the containerd image store (the `containerd-snapshotter` feature,
  opt-in from Docker 24, the default on fresh installs from 29) resolve every pull with
  containerd's registry hosts (daemon/hosts.go: `ConfigureHosts` with `HostDirFromRoot` of the
  certs directory). They read `<certs-dir>/<registry>/hosts.toml`, then `_default`, at every
  pull: the format `mirror configure containerd` writes, so the same writer makes the files,
  for every registry.
- Docker 24 to 27 on the containerd image store, and every release on the classic store, read
  only certificates there (`*.crt`, `*.cert`, `*.key`); their mirrors come from daemon.json's
  `registry-mirrors`, which applies to docker.io only (mirror.runtime.docker_daemon).

`mirror configure docker` always merges `registry-mirrors` into daemon.json, and writes the
`hosts.toml` files when the daemon reads them: asked from the Engine API by the caller
(mirror.cli; this package does not talk to dockerd), or forced with `--certs-d yes|no`.

Once a registry's `hosts.toml` lists a mirror, dockerd no longer applies `registry-mirrors` or
`insecure-registries` to it (it merges them only into a configuration of one host). So each
registry daemon.json names in `insecure-registries` gets a file of its own with Docker's
meaning: HTTPS without verification, then plain HTTP. An insecure range (a CIDR) names no
directory: the registries in it that have none go through `_default` as secure ones.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mirror.errors import ConfigError, NameInvalid
from mirror.oci.reference import validate_registry
from mirror.runtime import containerd_hosts, docker_daemon, files

DEFAULT_CERTS_DIR = Path("/etc/docker/certs.d")
HEADER = "Written by `mirror configure docker`; `mirror cleanup docker` restores the original."
# The first Docker release that reads hosts.toml from its certs directory.
FIRST_HOSTS_TOML_RELEASE = 28
INSECURE_KEY = "insecure-registries"
HOT_RELOAD_HINT = "dockerd reads hosts.toml at every pull: no reload needed for those files"
_MAJOR = re.compile(r"v?(\d+)\.")


class CertsMode(StrEnum):
    """`--certs-d`: whether to write the `hosts.toml` files."""

    AUTO = "auto"  # when the daemon answers that it reads them
    YES = "yes"
    NO = "no"  # and restore those written before


def parse_certs_mode(text: str) -> CertsMode:
    try:
        return CertsMode(text.strip().lower())
    except ValueError:
        raise ValueError("expected auto, yes or no") from None


@dataclass(frozen=True, slots=True)
class DaemonStore:
    """What the Engine API said about the daemon's image store (`GET /info`)."""

    version: str
    containerd_image_store: bool


@dataclass(frozen=True, slots=True)
class NoAnswer:
    """The daemon could not be asked; `reason` is one line."""

    reason: str


EngineAnswer = DaemonStore | NoAnswer


@dataclass(frozen=True, slots=True)
class DockerConfig:
    daemon_json: Path
    # The node's mirror URLs, tried in this order before anything else.
    mirrors: tuple[str, ...]
    certs_dir: Path = DEFAULT_CERTS_DIR
    certs: CertsMode = CertsMode.AUTO
    # What the hosts.toml files say, as for `mirror configure containerd`.
    registries: tuple[str, ...] | None = None
    upstream: tuple[tuple[str, str], ...] = ()
    resolve_tags: bool = True
    prepend_existing: bool = False


def reads_hosts_toml(store: DaemonStore) -> bool:
    """Whether this daemon takes its registry hosts from `<certs-dir>/<registry>/hosts.toml`.

    A version that does not parse (a development build) on the containerd store counts as new.
    """
    if not store.containerd_image_store:
        return False
    major = _MAJOR.match(store.version)
    return major is None or int(major[1]) >= FIRST_HOSTS_TOML_RELEASE


def configure(config: DockerConfig, ask: Callable[[], EngineAnswer]) -> list[str]:
    """daemon.json's `registry-mirrors`, and the `hosts.toml` files when the daemon reads them.

    `ask` asks the daemon which store it uses; it is called with `--certs-d auto` only. Every
    file is checked before the first write, so a malformed one stops the run with nothing
    changed. With the answer "no" the files mirror wrote before are restored; with no answer
    they are left as they are.
    """
    if not config.mirrors:
        raise ConfigError("no --mirror given: nothing to point dockerd at")
    settings = docker_daemon.parse_daemon_json(
        config.daemon_json, files.original(config.daemon_json).content
    )
    write, note = _decide(config, ask)
    certs: list[str] = [note] if note else []
    if write:
        names, ranges = insecure_registries(config.daemon_json, settings)
        certs += containerd_hosts.write_hosts(_hosts_config(config, names))
        certs.append(HOT_RELOAD_HINT)
        if config.registries is None:
            # containerd itself treats loopback registries as insecure when no file names them.
            wide = [cidr for cidr in ranges if not ipaddress.ip_network(cidr).is_loopback]
            certs += [_range_warning(cidr, config.certs_dir) for cidr in wide]
    elif write is not None and containerd_hosts.managed_files(config.certs_dir):
        certs += containerd_hosts.cleanup(config.certs_dir)
    return [*docker_daemon.configure(config.daemon_json, config.mirrors), *certs]


def cleanup(daemon_json: Path, certs_dir: Path) -> list[str]:
    """Restore daemon.json and every `hosts.toml` mirror wrote under `certs_dir`."""
    certs = containerd_hosts.cleanup(certs_dir) if containerd_hosts.managed_files(certs_dir) else []
    return [*certs, *docker_daemon.cleanup(daemon_json)]


def insecure_registries(
    path: Path, settings: dict[str, Any]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`insecure-registries` of daemon.json at `path`: (registry names, CIDR ranges).

    dockerd drops an `http://` or `https://` prefix from an entry; one that is neither a
    registry nor a range is left to dockerd to refuse.
    """
    entries = settings.get(INSECURE_KEY, [])
    if not isinstance(entries, list):
        raise ConfigError(f'{path}: "{INSECURE_KEY}" must be a list; nothing was changed')
    names: list[str] = []
    ranges: list[str] = []
    for entry in entries:
        if not isinstance(entry, str):
            continue
        text = re.sub(r"^https?://", "", entry.strip(), flags=re.IGNORECASE).rstrip("/")
        if "/" in text:
            with contextlib.suppress(ValueError):
                ranges.append(str(ipaddress.ip_network(text, strict=False)))
            continue
        try:
            names.append(validate_registry(text).lower())
        except NameInvalid:
            continue
    return tuple(dict.fromkeys(names)), tuple(dict.fromkeys(ranges))


def _decide(config: DockerConfig, ask: Callable[[], EngineAnswer]) -> tuple[bool | None, str]:
    """Write the files (True), restore ours (False) or leave them (None), and why."""
    if config.certs is CertsMode.YES:
        return True, ""
    if config.certs is CertsMode.NO:
        return False, ""
    answer = ask()
    where = config.certs_dir.absolute()
    if isinstance(answer, NoAnswer):
        return None, (
            f"{answer.reason}: left {where} as it is (--certs-d yes writes hosts.toml there for "
            f"Docker {FIRST_HOSTS_TOML_RELEASE}+ on the containerd image store, --certs-d no "
            "for any other)"
        )
    daemon = f"dockerd {answer.version or '(version unknown)'}"
    if reads_hosts_toml(answer):
        return True, (
            f"{daemon} uses the containerd image store: hosts.toml under {where} sends every "
            "registry to the mirror"
        )
    example = _path_prefix_example(config.mirrors[0])
    if answer.containerd_image_store:
        return False, (
            f"{daemon} uses the containerd image store but reads hosts.toml only from Docker "
            f"{FIRST_HOSTS_TOML_RELEASE}: registry-mirrors covers docker.io; pull other "
            f"registries as {example}"
        )
    return False, (
        f"{daemon} uses the classic image store, which reads no hosts.toml: registry-mirrors "
        f"covers docker.io; pull other registries as {example}"
    )


def _hosts_config(
    config: DockerConfig, insecure: tuple[str, ...]
) -> containerd_hosts.ContainerdHostsConfig:
    return containerd_hosts.ContainerdHostsConfig(
        config_path=config.certs_dir,
        mirrors=config.mirrors,
        registries=config.registries,
        upstream=config.upstream,
        resolve_tags=config.resolve_tags,
        prepend_existing=config.prepend_existing,
        insecure=insecure,
        header=HEADER,
    )


def _path_prefix_example(mirror: str) -> str:
    """The path-prefix form, by which dockerd pulls any registry through the mirror."""
    node = urlsplit(mirror).netloc
    return f"{node}/ghcr.io/org/app:1.0 ({node}/registry.internal_5000/app:1.0 for a port)"


def _range_warning(cidr: str, certs_dir: Path) -> str:
    return (
        f"insecure-registries range {cidr}: a registry in it with no directory under "
        f"{certs_dir.absolute()} goes through _default, where dockerd treats it as secure; "
        f"name it in {INSECURE_KEY} and configure again to give it a file of its own"
    )
