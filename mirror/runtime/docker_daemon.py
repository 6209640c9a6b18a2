"""dockerd's `daemon.json`: the node's mirrors first in `registry-mirrors`, nothing else touched.

dockerd reads the file at start and on SIGHUP, and `registry-mirrors` is one of the settings a
SIGHUP reloads live, so no container has to stop. It applies mirrors to docker.io images only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mirror.errors import ConfigError
from mirror.runtime import files
from mirror.runtime.endpoints import same_endpoint

DEFAULT_DAEMON_JSON = Path("/etc/docker/daemon.json")
MIRRORS_KEY = "registry-mirrors"
RELOAD_HINT = (
    "dockerd reads it at start: restart dockerd, or reload it live with SIGHUP "
    "(kill -HUP $(pidof dockerd)); registry-mirrors applies to docker.io images only"
)
# dockerd's reload only replaces registry-mirrors when the file sets the key: a file without it
# leaves the running daemon on the mirrors it had (checked with dockerd 20.10).
RESTART_HINT = (
    "restart dockerd: the restored file sets no registry-mirrors, and a SIGHUP would keep the "
    "mirror in use"
)


def configure(path: Path, mirrors: tuple[str, ...]) -> list[str]:
    """Merge `mirrors` into `registry-mirrors` of `path`'s original; returns what was done.

    Ours come first, in order, then the mirrors that were there already; none twice. Every
    other key keeps its value and its place.
    """
    if not mirrors:
        raise ConfigError("no --mirror given: nothing to point dockerd at")
    original = files.original(path)
    settings = parse_daemon_json(path, original.content)
    merged: list[str] = []
    for url in [*mirrors, *settings.get(MIRRORS_KEY, [])]:
        if not any(same_endpoint(url, known) for known in merged):
            merged.append(url)
    settings[MIRRORS_KEY] = merged
    files.write(path, render(settings))
    kept = files.backup_path(path)
    note = f" (original kept as {kept.name})" if kept.exists() else ""
    return [f"wrote {path}{note}: registry-mirrors = {json.dumps(merged)}", RELOAD_HINT]


def cleanup(path: Path) -> list[str]:
    """Put back `path` as it was before mirror first wrote it; returns what was done."""
    outcome = files.restore(path)
    if outcome is None:
        return [f"nothing to restore: mirror never wrote {path}"]
    action, created = outcome
    removed = files.remove_empty_dirs(created)
    restored = files.original(path).content if action == "restored" else None
    sets_mirrors = restored is not None and MIRRORS_KEY in _loads_or_empty(restored)
    hint = RELOAD_HINT if sets_mirrors else RESTART_HINT
    return [f"{action} {path}", *(f"removed {d}" for d in removed), hint]


def render(settings: dict[str, Any]) -> bytes:
    """The file as mirror writes it: two-space indented JSON, UTF-8, a final newline."""
    return (json.dumps(settings, indent=2, ensure_ascii=False) + "\n").encode()


def _loads_or_empty(content: bytes) -> dict[str, Any]:
    try:
        settings = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


def parse_daemon_json(path: Path, content: bytes | None) -> dict[str, Any]:
    """The settings in an existing file ({} for none or an empty one); ConfigError if unusable.

    A file dockerd would refuse is refused here too: rewriting it would lose what the operator
    meant, and dockerd would not start with it anyway.
    """
    if content is None or not content.strip():
        return {}
    try:
        settings = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); nothing was changed") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{path} must hold a JSON object; nothing was changed")
    existing = settings.get(MIRRORS_KEY, [])
    if not isinstance(existing, list) or not all(isinstance(url, str) for url in existing):
        raise ConfigError(f'{path}: "{MIRRORS_KEY}" must be a list of URLs; nothing was changed')
    return settings
