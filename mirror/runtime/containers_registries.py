"""containers/image's `registries.conf`: one drop-in sending each registry to the node's mirror.

CRI-O, Podman, Buildah and skopeo pull through containers/image, which reads
`/etc/containers/registries.conf`, then every `*.conf` file of `registries.conf.d` in lexical
order. A `[[registry]]` in a later file replaces the earlier one with the same `prefix` whole:
no field of the earlier one survives. So the drop-in carries over what the files read before it
say about each registry it names (its location, `insecure`, `blocked`, its mirrors after ours):
configuring the mirror never unblocks a registry nor drops a mirror. A file read after the
drop-in that names the same prefix wins over it, and configure says so.

A mirror is a location the image reference is rewritten to: with the mirror
`NODE:PORT/docker.io`, `docker.io/library/app:1` is pulled as `NODE:PORT/docker.io/library/app:1`,
which is mirror's path-prefix form (no `ns` parameter). containers/image parses the rewritten
reference with Docker's grammar, which allows no `:` in a path component, so a registry with a
port is written `host_PORT` (`registry_as_path_component`): `registry.internal:5000` becomes
`NODE:PORT/registry.internal_5000`. A registry that cannot be spelled so (IPv6, a single-word
host) is skipped with a message naming the `--upstream NAME=URL` alias that reaches it.

registries.conf has no entry for every registry (containerd's `_default`): without
--mirrored-registries the drop-in names the common public registries, those of --upstream, and
every registry the files read before it configure already.

Docker Hub is `prefix = "docker.io"`, `location = "docker.io"`: containers/image itself reaches
its API at registry-1.docker.io, and keeps the credentials stored for docker.io; the mirror's
path component is `docker.io` too, the name under which nodes share Docker Hub's content.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mirror.errors import ConfigError
from mirror.oci.reference import is_registry, registry_as_path_component
from mirror.runtime import files, tomlwrite
from mirror.runtime.endpoints import same_endpoint

DEFAULT_REGISTRIES_DIR = Path("/etc/containers/registries.conf.d")
MAIN_FILE = "registries.conf"
# Read after the usual numbered drop-ins (`000-shortnames.conf`, `50-...`), so its entries win.
DROP_IN = "99-mirror.conf"
HEADER = (
    "Written by `mirror configure containers`; `mirror cleanup containers` restores the original."
)
# Without --mirrored-registries: registries.conf cannot say "every registry".
COMMON_REGISTRIES = (
    "docker.io",
    "ghcr.io",
    "quay.io",
    "registry.k8s.io",
    "gcr.io",
    "mcr.microsoft.com",
    "public.ecr.aws",
)
RELOAD_HINT = (
    "podman, buildah and skopeo read registries.conf at every run; CRI-O reloads it on SIGHUP "
    "(systemctl reload crio, or kill -HUP $(pidof crio))"
)
DIGEST_ONLY = {"pull-from-mirror": "digest-only"}


@dataclass(frozen=True, slots=True)
class ContainersRegistriesConfig:
    registries_dir: Path
    # The node's mirror URLs, tried in this order before anything else.
    mirrors: tuple[str, ...]
    # None: the common registries, those of `upstream`, and every registry configured already.
    registries: tuple[str, ...] | None
    # Registry -> URL from --upstream REGISTRY=URL: the entry's location, tried after the mirrors.
    upstream: tuple[tuple[str, str], ...] = ()
    # False: the mirrors serve pulls by digest only; tags are resolved at the location.
    resolve_tags: bool = True
    # containers/image's main file; None: `registries.conf` beside `registries_dir`.
    main_file: Path | None = None


class _Malformed(Exception):
    """A registries.conf file containers/image could not use either."""


def configure(config: ContainersRegistriesConfig) -> list[str]:
    """Write the drop-in; returns what was done, one line each.

    The result depends only on the flags, the drop-in's original (if a file was there before
    mirror wrote it) and the other files: configuring twice gives the same bytes.
    """
    if not config.mirrors:
        raise ConfigError("no --mirror given: nothing to point containers/image at")
    directory = config.registries_dir.absolute()
    config = replace(config, registries_dir=directory)
    path = directory / DROP_IN
    original = files.original(path)
    own: dict[str, Any] = {}
    if original.content is not None:
        try:
            own = _parse(original.content)
        except _Malformed as exc:
            raise ConfigError(f"{path} {exc}; nothing was changed") from None
    messages: list[str] = []
    before, after = _other_files(config, messages)
    existing: dict[str, tuple[Path, dict[str, Any]]] = {}
    for source, document in [*before, (path, own)]:
        for table in document.get("registry", []):
            existing[_prefix(table)] = (source, table)
    later = {_prefix(t): source for source, document in after for t in document.get("registry", [])}

    upstreams = {registry.lower(): url for registry, url in config.upstream}
    written: list[dict[str, Any]] = []
    skipped: list[str] = []
    for registry in _wanted(config, existing):
        component = registry_as_path_component(registry)
        if component is None:
            skipped.append(_skip_reason(registry, upstreams.get(registry)))
            continue
        carried = existing.get(registry)
        written.append(_entry(config, registry, component, upstreams.get(registry), carried))
        if carried is not None and carried[0] != path:
            messages.append(
                f"{registry}: kept what {carried[0]} says (location, insecure, blocked, its "
                "mirrors after ours), as the drop-in replaces that entry"
            )
        if registry in later:
            messages.append(
                f"warning: {later[registry]} is read after {path} and configures {registry} "
                f"too: its entry wins, so {registry} does not go to the mirror"
            )
    if not written:
        reasons = "; ".join(skipped) or "no registry given"
        raise ConfigError(f"nothing to mirror: {reasons}; nothing was changed")
    names = {table["prefix"] for table in written}
    tables = [t for t in own.get("registry", []) if _prefix(t) not in names] + written
    _check_conflicts(path, tables)
    rest = {key: value for key, value in own.items() if key != "registry"}
    files.write(path, render(rest, tables))
    kept = files.backup_path(path)
    note = f" (original kept as {kept.name})" if kept.exists() else ""
    return [
        *(f"skipped {reason}" for reason in skipped),
        f"wrote {path}{note}",
        *(f"  {_describe(table)}" for table in written),
        *messages,
        RELOAD_HINT,
    ]


def cleanup(registries_dir: Path) -> list[str]:
    """Put back the drop-in's original (or remove it); returns what was done."""
    path = registries_dir.absolute() / DROP_IN
    outcome = files.restore(path)
    if outcome is None:
        return [f"nothing to restore: mirror never wrote {path}"]
    action, created = outcome
    removed = files.remove_empty_dirs(created)
    return [f"{action} {path}", *(f"removed {d}" for d in removed), RELOAD_HINT]


def render(rest: dict[str, Any], tables: list[dict[str, Any]]) -> bytes:
    """The drop-in: the header, `rest` (an original's other settings), one `[[registry]]` each.

    Deterministic, so configure is idempotent; mirrors are `[[registry.mirror]]` sections,
    any other table value is written inline.
    """
    parts = [tomlwrite.dumps({}, header=HEADER).rstrip("\n")]
    if rest:
        parts.append(tomlwrite.dumps(rest).rstrip("\n"))
    for table in tables:
        lines = ["[[registry]]"]
        lines += [_line(key, value, "") for key, value in table.items() if key != "mirror"]
        for mirror in table.get("mirror", []):
            lines += ["", f"{tomlwrite.INDENT}[[registry.mirror]]"]
            lines += [_line(key, value, tomlwrite.INDENT) for key, value in mirror.items()]
        parts.append("\n".join(lines))
    return ("\n\n".join(parts) + "\n").encode()


def _line(key: str, value: Any, indent: str) -> str:
    return f"{indent}{tomlwrite.key(key)} = {tomlwrite.value(value)}"


def _parse(content: bytes) -> dict[str, Any]:
    """A registries.conf document, checked as far as the drop-in relies on it."""
    try:
        document = tomllib.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _Malformed(f"is not valid TOML ({exc})") from None
    tables = document.get("registry", [])
    if not isinstance(tables, list) or not all(_valid_registry(t) for t in tables):
        raise _Malformed(
            "has [[registry]] entries containers/image cannot use (each needs a prefix or "
            "location string, and [[registry.mirror]] tables with a location)"
        )
    return document


def _valid_registry(table: Any) -> bool:
    if not isinstance(table, dict) or not (table.get("prefix") or table.get("location")):
        return False
    if any(not isinstance(table.get(key, ""), str) for key in ("prefix", "location")):
        return False
    mirrors = table.get("mirror", [])
    return isinstance(mirrors, list) and all(
        isinstance(m, dict) and isinstance(m.get("location"), str) for m in mirrors
    )


def _prefix(table: dict[str, Any]) -> str:
    """The prefix an entry matches, as containers/image normalises it (location if unset)."""
    return str(table.get("prefix") or table.get("location")).rstrip("/").lower()


def _other_files(
    config: ContainersRegistriesConfig, messages: list[str]
) -> tuple[list[tuple[Path, dict[str, Any]]], list[tuple[Path, dict[str, Any]]]]:
    """The files containers/image reads before the drop-in (main file first), and after it."""
    directory = config.registries_dir
    main = config.main_file or directory.parent / MAIN_FILE
    try:
        names = sorted(p.name for p in directory.iterdir() if p.name.endswith(".conf"))
    except FileNotFoundError:
        names = []
    except OSError as exc:
        raise ConfigError(f"cannot read {directory}: {exc.strerror}") from None
    before = [main, *(directory / n for n in names if n < DROP_IN)]
    after = [directory / n for n in names if n > DROP_IN]
    return _read_all(before, messages), _read_all(after, messages)


def _read_all(paths: list[Path], messages: list[str]) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in paths:
        try:
            found.append((path, _parse(path.read_bytes())))
        except (FileNotFoundError, IsADirectoryError):
            continue
        except OSError as exc:
            messages.append(f"note: cannot read {path} ({exc.strerror}): not taken into account")
        except _Malformed as exc:
            messages.append(f"note: {path} {exc}: not taken into account")
    return found


def _wanted(
    config: ContainersRegistriesConfig, existing: dict[str, tuple[Path, dict[str, Any]]]
) -> list[str]:
    """The registries to write, lower case (host names are), each once, in order."""
    if config.registries is not None:
        wanted = list(config.registries)
    else:
        configured = [prefix for prefix in existing if is_registry(prefix)]
        wanted = [*COMMON_REGISTRIES, *(r for r, _ in config.upstream), *configured]
    return list(dict.fromkeys(registry.lower() for registry in wanted))


def _entry(
    config: ContainersRegistriesConfig,
    registry: str,
    component: str,
    upstream: str | None,
    carried: tuple[Path, dict[str, Any]] | None,
) -> dict[str, Any]:
    """The `[[registry]]` of one registry: the mirrors first, then what was there."""
    if carried is None:
        location, insecure = _location(registry, upstream)
        table: dict[str, Any] = {"prefix": registry, "location": location}
        table.update({"insecure": True} if insecure else {})
    else:
        old = carried[1]
        location = str(old.get("location") or registry)
        table = {"prefix": registry, "location": location}
        table.update({k: v for k, v in old.items() if k not in ("prefix", "location", "mirror")})
    # containers/image refuses pull-from-mirror beside the older registry-wide setting.
    digest_only = not config.resolve_tags and not table.get("mirror-by-digest-only")
    urls: list[str] = []
    for url in config.mirrors:
        if not any(same_endpoint(url, known) for known in urls):
            urls.append(url)
    ours = [_mirror(url, component, digest_only) for url in urls]
    theirs = [] if carried is None else carried[1].get("mirror", [])
    table["mirror"] = ours + [
        m for m in theirs if not any(_same_location(m["location"], o["location"]) for o in ours)
    ]
    return table


def _mirror(url: str, component: str, digest_only: bool) -> dict[str, Any]:
    parts = urlsplit(url)
    mirror: dict[str, Any] = {"location": f"{parts.netloc}/{component}"}
    if parts.scheme == "http":
        mirror["insecure"] = True  # plain HTTP: containers/image otherwise insists on TLS
    return mirror | (DIGEST_ONLY if digest_only else {})


def _location(registry: str, upstream: str | None) -> tuple[str, bool]:
    """Where the runtime pulls when no mirror can serve: --upstream's host, else the registry."""
    if upstream is None:
        return registry, False
    parts = urlsplit(upstream)
    return parts.netloc, parts.scheme == "http"


def _same_location(a: str, b: str) -> bool:
    return a.rstrip("/").lower() == b.rstrip("/").lower()


def _skip_reason(registry: str, upstream: str | None) -> str:
    url = upstream or f"https://{registry}"
    return (
        f"{registry}: containers/image reaches a mirror as MIRROR/<registry>/<repository>, and "
        f"{registry} cannot be a path component there; name it by a host name instead (NAME, "
        f"e.g. registry.internal): run the node with --upstream NAME={url}, configure "
        "--mirrored-registries NAME, and pull NAME/<repository>"
    )


def _check_conflicts(path: Path, tables: list[dict[str, Any]]) -> None:
    """containers/image rejects a file naming one location twice with different `insecure` or
    `blocked`: the whole file, and every pull with it. Refuse to write such a file."""
    seen: dict[str, tuple[str, bool, bool]] = {}
    for table in tables:
        location = str(table.get("location") or table.get("prefix")).rstrip("/")
        settings = (bool(table.get("insecure")), bool(table.get("blocked")))
        first = seen.setdefault(location, (_prefix(table), *settings))
        if first[1:] != settings:
            raise ConfigError(
                f"{path}: {first[0]} and {_prefix(table)} would both have location {location} "
                "with different insecure or blocked settings, which containers/image refuses; "
                "nothing was changed"
            )


def _describe(table: dict[str, Any]) -> str:
    mirrors = ", ".join(m["location"] for m in table["mirror"])
    return f"{table['prefix']}: {mirrors}, then {table['location']}"
