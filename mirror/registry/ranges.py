"""HTTP Range for blobs: one `bytes=` range, as runtimes resume interrupted downloads.

Following RFC 9110, a header we do not understand (several ranges, bad syntax) is ignored and the
whole blob is served; a well-formed range that starts past the end is unsatisfiable (416).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mirror.errors import RangeNotSatisfiable

_SINGLE_RANGE = re.compile(r"bytes=(?P<first>\d*)-(?P<last>\d*)")


@dataclass(frozen=True, slots=True)
class ByteRange:
    offset: int
    length: int

    def content_range(self, size: int) -> str:
        return f"bytes {self.offset}-{self.offset + self.length - 1}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The slice to serve, or None for the whole blob. Raises `RangeNotSatisfiable`."""
    if header is None:
        return None
    match = _SINGLE_RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match["first"], match["last"]
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {header!r} selects no bytes", size=size)
        suffix = min(suffix, size)
        return ByteRange(size - suffix, suffix)
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(f"range {header!r} starts past the end ({size} bytes)", size=size)
    end = min(int(last), size - 1) if last else size - 1
    return ByteRange(start, end - start + 1)
