"""Files mirror writes into a runtime's configuration: atomic, backed up once, restorable.

Runtimes read their configuration at any moment (containerd reads `hosts.toml` at every pull),
so a half-written file must never be visible: every write goes to a temporary file in the same
directory, is fsynced, and renamed over the target. The first time mirror writes a path it
records what was there, and never records it again, so configuring twice still restores the
real original:

- `<name>.mirror-backup`: the original bytes, with the original's mode and owner;
- `<name>.mirror-absent`: there was no file; lists the directories mirror had to create, which
  cleanup removes again when they are empty.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mirror.errors import ConfigError

BACKUP_SUFFIX = ".mirror-backup"
ABSENT_SUFFIX = ".mirror-absent"
NEW_FILE_MODE = 0o644


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + BACKUP_SUFFIX)


def absent_path(path: Path) -> Path:
    return path.with_name(path.name + ABSENT_SUFFIX)


def is_managed(path: Path) -> bool:
    """Whether mirror has written `path` and recorded its original."""
    return backup_path(path).exists() or absent_path(path).exists()


@dataclass(frozen=True, slots=True)
class Original:
    """What was at a path before mirror first wrote it."""

    path: Path
    # None: there was no file.
    content: bytes | None


def original(path: Path) -> Original:
    """The original of `path`: recorded if mirror wrote it already, else what is there now.

    Configuration is always derived from this, never from mirror's own output, which is what
    makes configure idempotent.
    """
    backup = backup_path(path)
    if backup.exists():
        return Original(path, _read(backup))
    if absent_path(path).exists():
        return Original(path, None)
    _refuse_odd_file(path)
    try:
        return Original(path, path.read_bytes())
    except FileNotFoundError:
        return Original(path, None)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def write(path: Path, content: bytes) -> None:
    """Replace `path` with `content`, recording its original first if this is the first time."""
    path = path.absolute()  # records name directories that cleanup may see from elsewhere
    _refuse_odd_file(path)
    created = _make_dirs(path.parent)
    if not is_managed(path):
        _record_original(path, created)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = NEW_FILE_MODE
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    atomic_write(path, content, mode=mode)


def restore(path: Path) -> tuple[str, list[Path]] | None:
    """Put back the original of `path`; None when mirror never wrote it.

    Returns what was done ("restored" or "removed") and the directories mirror created for the
    file, for the caller to remove once every file in them is gone. The original is in place
    before its record is deleted, so an interrupted cleanup can simply run again.
    """
    backup, absent = backup_path(path), absent_path(path)
    if backup.exists():
        info = backup.stat()
        atomic_write(
            path,
            _read(backup),
            mode=stat.S_IMODE(info.st_mode),
            owner=(info.st_uid, info.st_gid),
        )
        _unlink(backup)
        if absent.exists():
            _unlink(absent)
        return "restored", []
    if absent.exists():
        created = created_dirs(path)
        _unlink(path)
        _unlink(absent)
        _fsync_dir(path.parent)
        return "removed", created
    return None


def created_dirs(path: Path) -> list[Path]:
    """The directories mirror created to write `path` (none if the file existed before)."""
    absent = absent_path(path)
    if not absent.exists():
        return []
    try:
        return [Path(p) for p in json.loads(_read(absent))["created_dirs"]]
    except (ValueError, KeyError, TypeError):
        return []  # a damaged record: leave directories alone rather than guess


def add_created_dirs(path: Path, dirs: list[Path]) -> None:
    """Make `path`'s record also own `dirs`, when the file that owned them is gone."""
    known = created_dirs(path)
    wanted = known + [d for d in dirs if d not in known]
    if wanted != known:
        _write_absent_record(path, wanted)


def remove_empty_dirs(dirs: list[Path]) -> list[Path]:
    """rmdir each directory that is empty, deepest first; returns those removed."""
    removed = []
    for directory in sorted(set(dirs), key=lambda d: len(d.parts), reverse=True):
        try:
            directory.rmdir()
        except OSError:
            continue  # not empty (the operator put something there) or already gone
        removed.append(directory)
    return removed


def atomic_write(
    path: Path, content: bytes, *, mode: int, owner: tuple[int, int] | None = None
) -> None:
    """Write a temporary file beside `path`, fsync it, rename it over `path`, fsync the dir."""
    try:
        descriptor, temp_name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                # Only root can give a file away; the bytes are what matter.
                with contextlib.suppress(PermissionError):
                    os.fchown(handle.fileno(), *owner)
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except OSError as exc:
        Path(temp_name).unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _record_original(path: Path, created: list[Path]) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        _write_absent_record(path, created)
        return
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    atomic_write(
        backup_path(path),
        _read(path),
        mode=stat.S_IMODE(info.st_mode),
        owner=(info.st_uid, info.st_gid),
    )


def _write_absent_record(path: Path, created: list[Path]) -> None:
    record = json.dumps({"created_dirs": [str(d) for d in created]}, indent=2) + "\n"
    atomic_write(absent_path(path), record.encode(), mode=NEW_FILE_MODE)


def _refuse_odd_file(path: Path) -> None:
    """A symlink or a directory would not survive replace-and-restore as it was: refuse."""
    if path.is_symlink():
        raise ConfigError(f"{path} is a symbolic link; edit its target instead")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path} is not a regular file")


def _make_dirs(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; returns those created, outermost first."""
    missing = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    if not current.is_dir():
        raise ConfigError(f"{current} is not a directory")
    created = []
    for each in reversed(missing):
        try:
            each.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot create {each}: {exc.strerror}") from None
        created.append(each)
    return created


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot remove {path}: {exc.strerror}") from None


def _fsync_dir(directory: Path) -> None:
    """Make a rename or unlink durable: it lives in the directory, not in the file."""
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
