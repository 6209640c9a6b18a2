"""The prefetch file (`mirror run --prefetch-file FILE`) and the node labels its pins match.

    [[image]]
    ref = "registry.internal:5000/infra/traefik:v2.10"   # tag or digest
    source = "docker.io/library/traefik:v2.10"           # optional: expected <- source
    nodes = { role = "edge" }                            # optional: match on node labels

    [[follow]]
    match = "registry.internal:5000/team/*:prod-*"       # glob over registry/repository:tag
    nodes = { tier = "web" }                             # optional: match on node labels

    [[follow]]
    match = "ghcr.io/org/app:v*"                         # a registry that sends no webhooks
    poll = "30s"                                         # optional: poll upstream this often
    keep = 5                                             # optional: tags kept pinned per repo

A `[[follow]]` takes every tag matching `match` when it is pushed (a registry's webhook) or, with
`poll`, when a poll of the repository's tags upstream sees it move. The pattern's grammar is
`follow.py`'s: the registry always comes first (no Docker Hub shorthand but `docker.io/nginx`
for `docker.io/library/nginx`). Polling lists one repository's tags, so with `poll` the registry
and repository must be literal; `poll` is at least `MIN_POLL` seconds, as each poll is a tag
list and a HEAD per matching tag against someone else's registry. The latest `keep` tags taken
of each repository stay pinned (default `DEFAULT_FOLLOW_KEEP`, 3); older ones are let go.

A file is taken whole or refused whole (`PrefetchFileError`, with the line of the entry at fault
and the reason): taking the good half of a file would drop pins without anyone noticing. The
watcher keeps the pins of the last good file while a broken one is in place, so a typo, an edit
in progress or a ConfigMap mid-update never empties a node's pins; the node keeps serving.

tomllib gives no positions, so the line of the N-th entry is found by scanning the text for
`[[image]]` (or `[[follow]]`) headers; when the scan cannot be trusted (an entry written as an
inline array, a header-looking line inside a multi-line string) errors name the file without a
line rather than a wrong one.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import os
import re
import tomllib
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mirror.config import parse_duration
from mirror.errors import ConfigError, DigestInvalid, NameInvalid, PrefetchFileError
from mirror.prefetch.follow import has_wildcards, parse_follow_match
from mirror.prefetch.model import (
    DEFAULT_FOLLOW_KEEP,
    Follow,
    ImageRef,
    Pin,
    PrefetchFile,
    parse_image_ref,
)

log = logging.getLogger(__name__)

# A pin list is a few kilobytes; a file past this is a mistake (a wrong path, a log file), and
# reading it whole on every change would cost memory for nothing.
MAX_FILE_BYTES = 1 << 20

_IMAGE_KEYS = ("ref", "source", "nodes")
_FOLLOW_KEYS = ("match", "nodes", "poll", "keep")
_TABLES = ("image", "follow")
# The shortest `poll`: each poll lists a repository's tags and HEADs every matching tag at a
# registry mirror does not own; more often than this is a load nobody should need.
MIN_POLL = 5.0
_POSITION = re.compile(r"\s*\(at line (?P<line>\d+), column (?P<column>\d+)\)$")
_END_OF_DOCUMENT = " (at end of document)"


def _key_pattern(key: str) -> str:
    """A TOML key as it may be spelled: bare, "basic" or 'literal'."""
    bare = re.escape(key)
    return rf"(?:{bare}|\"{bare}\"|'{bare}')"


def _entry_header(table: str) -> re.Pattern[str]:
    return re.compile(rf"[ \t]*\[\[[ \t]*{_key_pattern(table)}[ \t]*\]\][ \t]*(?:#.*)?\r?")


_ENTRY_HEADERS = {table: _entry_header(table) for table in _TABLES}
_TABLE_HEADER = re.compile(r"[ \t]*\[")


class _Invalid(Exception):
    """An entry's problem, before the file and line are known (becomes `PrefetchFileError`)."""


def load_prefetch_file(path: Path) -> PrefetchFile:
    """What the prefetch file at `path` says; `PrefetchFileError` if any part is unusable."""
    return _file_of(_read(path, name=str(path)), name=str(path))


def load_pins(path: Path) -> tuple[Pin, ...]:
    """The pins of the prefetch file at `path` (its follows are checked, then left out)."""
    return load_prefetch_file(path).pins


def parse_pins(text: str, *, path: str) -> tuple[Pin, ...]:
    """The pins of a prefetch file's text; `path` only names the file in errors."""
    return parse_prefetch_file(text, path=path).pins


def parse_prefetch_file(text: str, *, path: str) -> PrefetchFile:
    """A prefetch file's text, pins and follows; `path` only names the file in errors."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(exc, text, path) from None
    for key in document:
        if key not in _TABLES:
            raise PrefetchFileError(
                path,
                f"unknown key {key!r} (the file holds [[image]] and [[follow]] entries only)",
                line=_top_level_line(text, key),
            )
    return PrefetchFile(pins=_pins(document, text, path), follows=_follows(document, text, path))


def _entries(
    document: Mapping[str, object], table: str, text: str, path: str
) -> list[tuple[Mapping[str, object], int | None]]:
    """The `[[table]]` entries of the document, each with its header's line if known."""
    entries = document.get(table, [])
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise PrefetchFileError(
            path,
            f"{table} must be [[{table}]] tables, not {_kind(entries)}",
            line=_top_level_line(text, table),
        )
    return list(zip(entries, _entry_lines(text, table, len(entries)), strict=True))


def _twice(lines: list[int | None], earlier: int, index: int) -> str:
    """Where an entry and the earlier one it repeats are: by line, else by position."""
    line = lines[index]
    if line is not None and lines[earlier] is not None:
        return f"lines {lines[earlier]} and {line}"
    return f"entries {earlier + 1} and {index + 1}"


def _pins(document: Mapping[str, object], text: str, path: str) -> tuple[Pin, ...]:
    entries = _entries(document, "image", text, path)
    lines = [line for _, line in entries]
    pins: list[Pin] = []
    first_seen: dict[ImageRef, int] = {}
    for index, (entry, line) in enumerate(entries):
        try:
            pin = _pin(entry)
        except _Invalid as exc:
            raise PrefetchFileError(path, str(exc), line=line) from None
        if pin.ref in first_seen:
            where = _twice(lines, first_seen[pin.ref], index)
            raise PrefetchFileError(
                path, f"ref {str(pin.ref)!r} is pinned twice: {where}", line=line
            )
        first_seen[pin.ref] = index
        pins.append(pin)
    return tuple(pins)


def _follows(document: Mapping[str, object], text: str, path: str) -> tuple[Follow, ...]:
    """The `[[follow]]` entries; the same match for the same nodes twice is a mistake (the same
    match for other nodes is not: one pattern, a tier each)."""
    entries = _entries(document, "follow", text, path)
    lines = [line for _, line in entries]
    follows: list[Follow] = []
    first_seen: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
    for index, (entry, line) in enumerate(entries):
        try:
            follow = _follow(entry)
        except _Invalid as exc:
            raise PrefetchFileError(path, str(exc), line=line) from None
        key = (follow.match, tuple(sorted(follow.nodes.items())))
        if key in first_seen:
            where = _twice(lines, first_seen[key], index)
            raise PrefetchFileError(
                path, f"match {follow.match!r} is followed twice: {where}", line=line
            )
        first_seen[key] = index
        follows.append(follow)
    return tuple(follows)


def _check_keys(
    entry: Mapping[str, object], table: str, known: tuple[str, ...], *, required: str
) -> None:
    unknown = [key for key in entry if key not in known]
    if unknown:
        raise _Invalid(f"unknown key {unknown[0]!r} in [[{table}]] (expected {', '.join(known)})")
    if required not in entry:
        raise _Invalid(f"[[{table}]] has no {required}")


def _pin(entry: Mapping[str, object]) -> Pin:
    _check_keys(entry, "image", _IMAGE_KEYS, required="ref")
    ref = _image_ref("ref", entry["ref"])
    source = _image_ref("source", entry["source"]) if "source" in entry else None
    nodes = _nodes(entry.get("nodes", {}))
    return Pin(ref, source, nodes, origin="file")


def _follow(entry: Mapping[str, object]) -> Follow:
    _check_keys(entry, "follow", _FOLLOW_KEYS, required="match")
    value = entry["match"]
    if not isinstance(value, str):
        raise _Invalid(f"match must be a string, not {_kind(value)}")
    if not value.strip():
        raise _Invalid("match is empty")
    try:
        pattern = parse_follow_match(value)
    except NameInvalid as exc:
        raise _Invalid(f"match {exc}") from None
    nodes = _nodes(entry.get("nodes", {}))
    poll = _poll(entry["poll"]) if "poll" in entry else None
    if poll is not None and not pattern.pollable:
        glob = pattern.registry if has_wildcards(pattern.registry) else pattern.repository
        raise _Invalid(
            f"poll lists one repository's tags, so the registry and repository must be literal "
            f"({glob!r} has a wildcard); without poll the follow takes push events only"
        )
    keep = _keep(entry["keep"]) if "keep" in entry else DEFAULT_FOLLOW_KEEP
    return Follow(str(pattern), nodes, poll, keep)


def _keep(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"keep must be a whole number of tags, not {_kind(value)}")
    if value < 1:
        raise _Invalid(f"keep must be at least 1 (the tag just pushed), not {value}")
    return value


def _poll(value: object) -> float:
    if not isinstance(value, str):
        raise _Invalid(f'poll must be a duration such as "30s" or "5m", not {_kind(value)}')
    try:
        seconds = parse_duration(value)
    except ConfigError as exc:
        raise _Invalid(f"poll: {exc}") from None
    if seconds < MIN_POLL:
        raise _Invalid(
            f"poll {value!r} is below the minimum of {MIN_POLL:g}s: each poll asks the "
            "registry for the tag list and every matching tag"
        )
    return seconds


def _image_ref(key: str, value: object) -> ImageRef:
    if not isinstance(value, str):
        raise _Invalid(f"{key} must be a string, not {_kind(value)}")
    if not value.strip():
        raise _Invalid(f"{key} is empty")
    try:
        return parse_image_ref(value)
    except (NameInvalid, DigestInvalid) as exc:
        raise _Invalid(f"{key} {exc}") from None


def _nodes(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _Invalid(f"nodes must be a table of label = value, not {_kind(value)}")
    nodes: dict[str, str] = {}
    for key, label in value.items():
        if not isinstance(label, str):
            raise _Invalid(f"nodes: label {key!r} must be a string, not {_kind(label)}")
        problem = _label_problem(key, label)
        if problem is not None:
            raise _Invalid(f"nodes: {problem}")
        nodes[key] = label
    return nodes


def _label_problem(key: str, value: str) -> str | None:
    """Why `key=value` cannot be a node label, or None: Kubernetes' rules, loosely.

    Loosely, because labels also come from Nomad meta and operators' flags: what matters is that
    a pin's selector can equal a label as given, and that `KEY=VALUE` parses back to the same
    pair. An empty value is a label (Kubernetes' `node-role.kubernetes.io/edge: ""`).
    """
    if not key:
        return "a label key is empty"
    for part, text in (("key", key), ("value", value)):
        if "=" in text:
            return f"label {part} {text!r} contains '='"
        if not all(char.isprintable() and not char.isspace() for char in text):
            return f"label {part} {text!r} contains whitespace or unprintable characters"
    return None


def _kind(value: object) -> str:
    """A TOML value's type as the file's author would name it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    kinds: tuple[tuple[type, str], ...] = (
        (str, "a string"),
        (float, "a float"),
        (list, "an array"),
        (dict, "a table"),
        (datetime.date, "a date"),
        (datetime.time, "a time"),
    )
    return next((name for kind, name in kinds if isinstance(value, kind)), type(value).__name__)


def _syntax_error(exc: tomllib.TOMLDecodeError, text: str, path: str) -> PrefetchFileError:
    """tomllib's message without its position, the position as the error's line.

    Python 3.11's tomllib puts the position only in the message: `... (at line 3, column 7)`.
    """
    message = str(exc)
    match = _POSITION.search(message)
    if match is not None:
        reason = f"invalid TOML: {message[: match.start()]} at column {match['column']}"
        return PrefetchFileError(path, reason, line=int(match["line"]))
    if message.endswith(_END_OF_DOCUMENT):
        reason = f"invalid TOML: {message[: -len(_END_OF_DOCUMENT)]} at the end of the file"
        return PrefetchFileError(path, reason, line=max(1, len(text.rstrip("\n").split("\n"))))
    return PrefetchFileError(path, f"invalid TOML: {message}")


def _entry_lines(text: str, table: str, count: int) -> list[int | None]:
    """The 1-based line of each `[[table]]` header, or None for all when they cannot be told.

    TOML has no other line breaks than LF and CRLF, so `split("\\n")` numbers lines as tomllib
    does (`splitlines` would also break at form feeds and U+2028, which TOML strings may hold).
    """
    found = [
        number
        for number, line in enumerate(text.split("\n"), start=1)
        if _ENTRY_HEADERS[table].fullmatch(line)
    ]
    return [*found] if len(found) == count else [None] * count


def _top_level_line(text: str, key: str) -> int | None:
    """Where a top-level key is defined: `key = ...` before any table, or a `[key...]` header."""
    spelled = _key_pattern(key)
    assignment = re.compile(rf"[ \t]*{spelled}[ \t]*[=.]")
    header = re.compile(rf"[ \t]*\[\[?[ \t]*{spelled}[ \t]*[\].]")
    in_tables = False
    for number, line in enumerate(text.split("\n"), start=1):
        if header.match(line) or (not in_tables and assignment.match(line)):
            return number
        in_tables = in_tables or _TABLE_HEADER.match(line) is not None
    return None


def _read(path: Path, *, name: str) -> bytes:
    """The file's bytes, at most `MAX_FILE_BYTES`; `name` is how errors call it."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise PrefetchFileError(name, f"cannot read the file: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise PrefetchFileError(name, f"the file is larger than {MAX_FILE_BYTES} bytes")
    return data


def _file_of(data: bytes, *, name: str) -> PrefetchFile:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PrefetchFileError(
            name,
            f"not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}",
            line=data.count(b"\n", 0, exc.start) + 1,
        ) from None
    # Editors on Windows may start the file with a byte-order mark, which TOML does not allow.
    return parse_prefetch_file(text.removeprefix("\ufeff"), path=name)


def parse_node_label(text: str) -> tuple[str, str]:
    """`KEY=VALUE` from `--node-label`; `ConfigError` with the reason if it is not a label."""
    key, equals, value = text.partition("=")
    if not equals:
        raise ConfigError(f"node label {text!r} is not KEY=VALUE")
    problem = _label_problem(key, value)
    if problem is not None:
        raise ConfigError(f"node label {text!r}: {problem}")
    return key, value


def node_labels(items: Iterable[str | tuple[str, str]]) -> dict[str, str]:
    """The node's labels from repeated `--node-label` values (text or parsed pairs).

    A key given twice is refused even with the same value: one of the two flags is a mistake,
    and silently keeping either would match pins the operator did not mean.
    """
    labels: dict[str, str] = {}
    for item in items:
        key, value = parse_node_label(item) if isinstance(item, str) else item
        if key in labels:
            raise ConfigError(
                f"node label {key!r} is given twice: {key}={labels[key]} and {key}={value}"
            )
        labels[key] = value
    return labels


@dataclass(frozen=True, slots=True)
class _Signature:
    """What a stat says about the file: when it is unchanged, the content is taken as unchanged.

    `resolved` is the path after every symlink: a ConfigMap update swaps the `..data` symlink
    to a new directory, so the file seen through the mounted name is another file, whose inode
    may even be a recycled one. Comparing the resolved path as well catches that.
    """

    resolved: str
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


def _stat(path: Path) -> _Signature:
    resolved = os.path.realpath(path)
    try:
        info = os.stat(resolved)
    except OSError as exc:
        raise PrefetchFileError(str(path), f"cannot read the file: {exc.strerror or exc}") from None
    return _Signature(
        resolved, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns
    )


class PinFileWatcher:
    """The pins and follows of a prefetch file, again whenever its content changes.

    Each poll stats the file (through its symlinks); only when that changed is the file read,
    and only when its hash changed is it parsed, so a touch or a rewrite with the same bytes
    costs nothing downstream. A file that cannot be used is logged once (ERROR, one line, the
    reason) and shown in `last_error`; the pins and follows of the last good file stay in
    force, and nothing is yielded until the file is good again. A good file that says what the
    one last yielded said (a comment edited, a broken file put back as it was) yields nothing
    either.
    """

    def __init__(self, path: Path, interval: float = 2.0) -> None:
        self._path = path
        self._interval = interval
        self._lock = asyncio.Lock()
        # What the last poll saw: a stat, or the reason the stat failed.
        self._signature: _Signature | str | None = None
        self._digest: bytes | None = None
        self._file: PrefetchFile | None = None
        self._last_error: str | None = None

    @property
    def path(self) -> Path:
        return self._path

    @property
    def file(self) -> PrefetchFile | None:
        """What is in force: the last good file; None if there has not been one yet."""
        return self._file

    @property
    def pins(self) -> tuple[Pin, ...] | None:
        """The pins in force: from the last good file; None if there has not been one yet."""
        return None if self._file is None else self._file.pins

    @property
    def last_error(self) -> str | None:
        """Why the file as it is now cannot be used (`path:line: reason`); None when it can."""
        return self._last_error

    async def changes(self) -> AsyncIterator[PrefetchFile]:
        """The file's pins and follows once it is first good, then after each change of them."""
        while True:
            found = await self.check()
            if found is not None:
                yield found
            await asyncio.sleep(self._interval)

    async def check(self) -> PrefetchFile | None:
        """One poll: what the file says if it changed and what it says did, else None."""
        async with self._lock:
            try:
                signature = await asyncio.to_thread(_stat, self._path)
            except PrefetchFileError as exc:
                if exc.reason != self._signature:
                    self._signature, self._digest = exc.reason, None
                    self._refuse(exc)
                return None
            if signature == self._signature:
                return None
            self._signature = signature
            try:
                data = await asyncio.to_thread(
                    _read, Path(signature.resolved), name=str(self._path)
                )
            except PrefetchFileError as exc:
                self._digest = None
                self._refuse(exc)
                return None
            digest = hashlib.sha256(data).digest()
            if digest == self._digest:
                return None
            self._digest = digest
            try:
                found = _file_of(data, name=str(self._path))
            except PrefetchFileError as exc:
                self._refuse(exc)
                return None
            self._last_error = None
            if found == self._file:
                return None
            self._file = found
            log.info(
                "prefetch file %s: %d pins, %d follows",
                self._path,
                len(found.pins),
                len(found.follows),
            )
            return found

    def _refuse(self, error: PrefetchFileError) -> None:
        self._last_error = str(error)
        if self._file is None:
            log.error("%s; no pins from this file until it is fixed", error)
        elif self._file.follows:
            log.error(
                "%s; keeping the previous %d pins and %d follows",
                error,
                len(self._file.pins),
                len(self._file.follows),
            )
        else:
            log.error("%s; keeping the previous %d pins", error, len(self._file.pins))
