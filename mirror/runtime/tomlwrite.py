"""Writing TOML: the standard library reads it (tomllib) but cannot write it.

Enough of TOML for `hosts.toml`, including whatever an operator's existing file holds that
`--prepend-existing` carries over: strings, booleans, numbers, dates, arrays, and tables
(nested tables as `[a."b".c]` sections, tables inside arrays inline). Output is deterministic:
the same document always gives the same bytes, which is what makes configure idempotent.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
INDENT = "  "


def dumps(document: Mapping[str, Any], *, header: str = "") -> str:
    """`document` as TOML text; `header` lines become leading comments."""
    comments = [f"# {line}".rstrip() for line in header.splitlines()]
    body = _table_lines(document, (), lines_before=False)
    return "\n".join([*comments, "", *body] if comments else body) + "\n"


def key(text: str) -> str:
    return text if _BARE_KEY.fullmatch(text) else string(text)


def string(text: str) -> str:
    """A basic string: quotes, backslashes and control characters (DEL too) escaped."""
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def value(item: Any) -> str:
    """An inline value (the right-hand side of `key = ...`)."""
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, int):
        return str(item)
    if isinstance(item, float):
        if math.isnan(item):
            return "nan"
        if math.isinf(item):
            return "inf" if item > 0 else "-inf"
        return repr(item)
    if isinstance(item, str):
        return string(item)
    if isinstance(item, datetime.date | datetime.time):
        return item.isoformat()
    if isinstance(item, Mapping):
        inner = ", ".join(f"{key(k)} = {value(v)}" for k, v in item.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(item, Sequence):
        return "[" + ", ".join(value(v) for v in item) + "]"
    raise TypeError(f"cannot write {type(item).__name__} as TOML")


def _table_lines(
    table: Mapping[str, Any], path: tuple[str, ...], *, lines_before: bool
) -> list[str]:
    """A table's own keys, then each sub-table as a section of its own."""
    lines: list[str] = []
    scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    indent = INDENT if path else ""
    # A section header is needed for keys of its own, or to make an empty table exist at all;
    # a table that only holds tables (like `host`) is implied by theirs.
    if path and (scalars or not tables):
        if lines_before:
            lines.append("")
        lines.append("[" + ".".join(key(part) for part in path) + "]")
    lines += [f"{indent}{key(k)} = {value(v)}" for k, v in scalars.items()]
    for name, sub in tables.items():
        lines += _table_lines(sub, (*path, name), lines_before=bool(lines) or lines_before)
    return lines
