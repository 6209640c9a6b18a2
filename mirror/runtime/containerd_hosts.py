"""containerd's registry hosts: one `hosts.toml` per registry, with the node's mirrors first.

containerd (and `ctr --hosts-dir`) looks up `<config_path>/<registry>/hosts.toml` at every
pull, trying `<host>_<port>_`, then `<host>:<port>`, then `_default`; the first directory that
exists wins, even without a `hosts.toml` (its certificate files are then used instead). Each
`[host."URL"]` is tried in file order and `server` last, so a mirror that is down or answers 404
costs one attempt and the pull goes on upstream.

`dial_timeout` is written for every mirror: containerd's docs/hosts.md lists it (default 30s) so
an unreachable mirror costs a second, not half a minute, before the next host is tried.
containerd 1.6 does not know the key and ignores it (the file still loads and the mirrors are
used, checked with `ctr --hosts-dir`); releases that know it honour it.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mirror.errors import ConfigError, NameInvalid
from mirror.oci.reference import validate_registry
from mirror.runtime import files, tomlwrite
from mirror.runtime.endpoints import same_endpoint
from mirror.upstream.registries import UpstreamMap

DEFAULT_CONFIG_PATH = Path("/etc/containerd/certs.d")
DEFAULT_NAMESPACE = "_default"
HOSTS_FILE = "hosts.toml"
DIAL_TIMEOUT = "1s"
HEADER = (
    "Written by `mirror configure containerd`; `mirror cleanup containerd` restores the original."
)
_PORT_DIR = re.compile(r"(?P<host>.+)_(?P<port>\d+)_")


@dataclass(frozen=True, slots=True)
class ContainerdHostsConfig:
    config_path: Path
    # The node's mirror URLs, tried in this order before anything else.
    mirrors: tuple[str, ...]
    # None: every registry (the `_default` namespace, and every registry configured already).
    registries: tuple[str, ...] | None
    # Registry -> URL from --upstream REGISTRY=URL: the `server` containerd falls back to.
    upstream: tuple[tuple[str, str], ...] = ()
    # False: mirrors may only pull by digest; containerd resolves tags at `server` itself.
    resolve_tags: bool = True
    # Keep an existing file's [host] entries (after ours) and its server settings.
    prepend_existing: bool = False
    # Registries whose server is tried over HTTPS without verification, then plain HTTP (what
    # dockerd's insecure-registries means): each gets a file of its own saying so.
    insecure: tuple[str, ...] = ()
    # The comment at the top of every file: which command wrote it and which undoes it.
    header: str = HEADER


def configure(config: ContainerdHostsConfig) -> list[str]:
    """Write every registry's `hosts.toml` for containerd; returns what was done, one line each."""
    return [
        *write_hosts(config),
        "containerd reads hosts.toml at every pull: no restart needed (its CRI plugin needs "
        f'config_path = "{config.config_path.absolute()}" in its registry section)',
    ]


def write_hosts(config: ContainerdHostsConfig) -> list[str]:
    """Write every registry's `hosts.toml`; returns what was done, one line each.

    Every original is read and checked before the first write, so a malformed file stops the
    run with nothing changed. Files mirror wrote earlier for registries no longer asked for are
    restored first, so the result depends only on the flags and the originals.
    """
    if not config.mirrors:
        raise ConfigError("no --mirror given: nothing to point containerd at")
    # Records name directories by absolute path: cleanup may run from another directory.
    config = replace(config, config_path=config.config_path.absolute())
    plan = _plan(config)
    messages: list[str] = []
    stale = [path for path in managed_files(config.config_path) if path not in plan]
    leftover = _restore_all(stale, messages)
    for path, content in plan.items():
        files.write(path, content)
        kept = files.backup_path(path)
        note = f" (original kept as {kept.name})" if kept.exists() else ""
        messages.append(f"wrote {path}{note}")
    _keep_records(leftover, list(plan))
    return messages


def cleanup(config_path: Path) -> list[str]:
    """Restore every `hosts.toml` mirror wrote under `config_path`; returns what was done."""
    config_path = config_path.absolute()
    managed = managed_files(config_path)
    if not managed:
        return [f"nothing to restore: mirror wrote no hosts.toml under {config_path}"]
    messages: list[str] = []
    _restore_all(managed, messages)
    return messages


def managed_files(config_path: Path) -> list[Path]:
    """The `hosts.toml` files under `config_path` that mirror wrote (and can restore)."""
    try:
        directories = sorted(d for d in config_path.iterdir() if d.is_dir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read {config_path}: {exc.strerror}") from None
    return [d / HOSTS_FILE for d in directories if files.is_managed(d / HOSTS_FILE)]


def render(
    *,
    mirrors: tuple[str, ...],
    server: str | None,
    resolve_tags: bool,
    existing: Mapping[str, Any] | None = None,
    skip_verify: bool = False,
    header: str = HEADER,
) -> bytes:
    """One `hosts.toml`: our mirrors, then `existing`'s hosts and server settings if given.

    `server` (and `skip_verify`, for an insecure registry) is only used when `existing` names
    none: prepending keeps the operator's upstream.
    """
    capabilities = ["pull", "resolve"] if resolve_tags else ["pull"]
    hosts: dict[str, Any] = {}
    for url in mirrors:
        if not any(same_endpoint(url, known) for known in hosts):
            hosts[url] = {"capabilities": capabilities, "dial_timeout": DIAL_TIMEOUT}
    root = {k: v for k, v in (existing or {}).items() if k != "host"}
    for url, settings in (existing or {}).get("host", {}).items():
        if not any(same_endpoint(url, known) for known in hosts):
            hosts[url] = settings
    if skip_verify and "skip_verify" not in root and "server" not in root:
        root = {"skip_verify": True, **root}
    if server is not None and "server" not in root:
        root = {"server": server, **root}
    return tomlwrite.dumps({**root, "host": hosts}, header=header).encode()


def parse_hosts_toml(path: Path, content: bytes) -> dict[str, Any]:
    """An existing file, checked the way containerd would need it; ConfigError otherwise."""
    try:
        document = tomllib.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}); nothing was changed") from None
    hosts = document.get("host", {})
    if not isinstance(hosts, dict) or not all(isinstance(v, dict) for v in hosts.values()):
        raise ConfigError(f'{path}: "host" must hold [host."URL"] tables; nothing was changed')
    return document


def _plan(config: ContainerdHostsConfig) -> dict[Path, bytes]:
    """Target file -> the bytes it must hold, derived from each file's original."""
    upstreams = UpstreamMap(dict(config.upstream))
    overridden = {registry.lower() for registry, _ in config.upstream}
    insecure = {registry.lower() for registry in config.insecure}
    plan: dict[Path, bytes] = {}
    for directory, registry in _targets(config):
        path = config.config_path / directory / HOSTS_FILE
        original = files.original(path)
        server = upstreams.base_url(registry) if registry is not None else None
        if registry in insecure and registry not in overridden:
            # http:// with TLS settings: containerd tries HTTPS first, then falls back to HTTP.
            server = f"http://{registry}"
        if original.content is not None:
            existing = parse_hosts_toml(path, original.content)
            kept = existing if config.prepend_existing else None
        else:
            kept = _certificate_settings(path.parent) or None
        plan[path] = render(
            mirrors=config.mirrors,
            server=server,
            resolve_tags=config.resolve_tags,
            existing=kept,
            skip_verify=registry in insecure,
            header=config.header,
        )
    return plan


def _targets(config: ContainerdHostsConfig) -> list[tuple[str, str | None]]:
    """(directory, registry) pairs to write; registry None is the `_default` namespace.

    With every registry mirrored, `_default` catches the registries with no directory of their
    own, but containerd never reaches it for one that has a directory: those are written too,
    as are the registries named in --upstream (their `server` must be the override) and the
    insecure ones (their `server` must say so).
    """
    found: dict[str, str | None] = {}
    if config.registries is not None:
        for registry in config.registries:
            found.setdefault(_directory_for(config.config_path, registry.lower()), registry.lower())
        return list(found.items())
    found[DEFAULT_NAMESPACE] = None
    named = [*(registry for registry, _ in config.upstream), *config.insecure]
    for registry in (name.lower() for name in named):
        found.setdefault(_directory_for(config.config_path, registry), registry)
    for directory, registry in _existing_registries(config.config_path):
        found.setdefault(directory, registry)
    return list(found.items())


def _directory_for(config_path: Path, registry: str) -> str:
    """containerd tries `host_port_` before `host:port`: use the first form if it exists."""
    host, colon, port = registry.rpartition(":")
    if colon and port.isdigit() and (config_path / f"{host}_{port}_").is_dir():
        return f"{host}_{port}_"
    return registry


def _existing_registries(config_path: Path) -> list[tuple[str, str]]:
    """Directories under `config_path` named after a registry, with that registry."""
    try:
        names = sorted(d.name for d in config_path.iterdir() if d.is_dir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read {config_path}: {exc.strerror}") from None
    found = []
    for name in names:
        if config_path / name in files.created_dirs(config_path / name / HOSTS_FILE):
            continue  # mirror made it: not a registry the operator configured
        match = _PORT_DIR.fullmatch(name)
        registry = f"{match['host']}:{match['port']}" if match else name
        try:
            found.append((name, validate_registry(registry).lower()))
        except NameInvalid:
            continue  # `_default` and anything else that names no registry
    return found


def _certificate_settings(directory: Path) -> dict[str, Any]:
    """Docker-style certificate files as `hosts.toml` settings for `server`.

    Without a `hosts.toml` containerd uses `*.crt` as CAs and `*.cert`/`*.key` as client
    pairs; once one exists it reads only the file, so writing one must carry them over.
    """
    try:
        names = sorted(p.name for p in directory.iterdir() if p.is_file())
    except OSError:
        return {}
    settings: dict[str, Any] = {}
    cas = [name for name in names if name.endswith(".crt")]
    pairs = [
        [name, name[: -len(".cert")] + ".key" if name[: -len(".cert")] + ".key" in names else ""]
        for name in names
        if name.endswith(".cert")
    ]
    if cas:
        settings["ca"] = cas
    if pairs:
        settings["client"] = pairs
    return settings


def _restore_all(paths: list[Path], messages: list[str]) -> list[Path]:
    """Restore `paths`, then remove the directories mirror made for them if empty.

    Returns the directories mirror made that are not empty yet (other files of its own).
    """
    created: list[Path] = []
    for path in paths:
        outcome = files.restore(path)
        if outcome is None:
            continue
        action, dirs = outcome
        messages.append(f"{action} {path}")
        created += dirs
    removed = files.remove_empty_dirs(created)
    messages += [f"removed {directory}" for directory in removed]
    return [d for d in created if d not in removed]


def _keep_records(dirs: list[Path], written: list[Path]) -> None:
    """Hand directories mirror made, still holding files it wrote, to one of those files."""
    for directory in dirs:
        for path in written:
            if directory in path.parents and files.absent_path(path).exists():
                files.add_created_dirs(path, [directory])
                break
