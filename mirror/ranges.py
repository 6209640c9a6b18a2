"""Byte ranges of blobs: what a client asks for (`Range`) and what a server says it sent.

Shared by the HTTP front, the content service, and the peer and upstream clients, so each
range grammar is written once. Following RFC 9110, a `Range` header we do not understand
(several ranges, bad syntax) is ignored and the whole blob is served; a well-formed range that
starts past the end is unsatisfiable (416).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mirror.errors import RangeNotSatisfiable

# Byte positions beyond this many digits (an exabyte and more) are nonsense, and Python
# refuses to turn over 4300 digits into an int: such a header is refused, not parsed.
_MAX_DIGITS = 19
_SINGLE_RANGE = re.compile(r"bytes=(?P<first>[0-9]{0,19})-(?P<last>[0-9]{0,19})")
_CONTENT_RANGE = re.compile(
    r"bytes (?P<first>[0-9]{1,19})-(?P<last>[0-9]{1,19})/(?P<size>[0-9]{1,19})"
)
_UNSATISFIED = re.compile(r"bytes \*/(?P<size>[0-9]{1,19})")


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A slice of a blob of known size: where it starts and how long it is."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.offset + self.length

    def content_range(self, size: int) -> str:
        return f"bytes {self.offset}-{self.end - 1}/{size}"

    def header(self) -> str:
        """The `Range` header asking for exactly this slice."""
        return f"bytes={self.offset}-{self.end - 1}"


@dataclass(frozen=True, slots=True)
class RangeRequest:
    """One `bytes=` range as the client sent it, before the blob's size is known.

    `first`/`last` are inclusive positions; a suffix range (`bytes=-N`) has only `suffix`.
    """

    first: int | None = None
    last: int | None = None
    suffix: int | None = None

    def header(self) -> str:
        """The `Range` header to pass this request on to a peer or upstream."""
        if self.suffix is not None:
            return f"bytes=-{self.suffix}"
        return f"bytes={self.first}-{'' if self.last is None else self.last}"

    def resolve(self, size: int) -> ByteRange:
        """The slice of a `size`-byte blob to send; raises `RangeNotSatisfiable`."""
        if self.suffix is not None:
            if self.suffix == 0 or size == 0:
                raise RangeNotSatisfiable(f"range {self.header()!r} selects no bytes", size=size)
            length = min(self.suffix, size)
            return ByteRange(size - length, length)
        assert self.first is not None
        if self.first >= size:
            raise RangeNotSatisfiable(
                f"range {self.header()!r} starts past the end ({size} bytes)", size=size
            )
        end = size - 1 if self.last is None else min(self.last, size - 1)
        return ByteRange(self.first, end - self.first + 1)


def parse_range_header(header: str | None) -> RangeRequest | None:
    """The single range a `Range` header asks for, or None to serve the whole blob."""
    if header is None:
        return None
    match = _SINGLE_RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match["first"], match["last"]
    if not first and not last:
        return None
    if not first:
        return RangeRequest(suffix=int(last))
    if last and int(last) < int(first):
        return None
    return RangeRequest(first=int(first), last=int(last) if last else None)


def resolve_range(header: str | None, size: int) -> ByteRange | None:
    """`parse_range_header` then `resolve`: the slice to send, or None for the whole blob."""
    requested = parse_range_header(header)
    return None if requested is None else requested.resolve(size)


def parse_content_range(text: str | None) -> tuple[ByteRange, int] | None:
    """A 206's `Content-Range: bytes A-B/SIZE` as (slice, size); None when unusable."""
    match = _CONTENT_RANGE.fullmatch((text or "").strip())
    if match is None:
        return None
    first, last, size = int(match["first"]), int(match["last"]), int(match["size"])
    if last < first or last >= size:
        return None
    return ByteRange(first, last - first + 1), size


def unsatisfied_size(text: str | None) -> int:
    """The blob size a 416's `Content-Range: bytes */SIZE` names (0 when it names none)."""
    match = _UNSATISFIED.fullmatch((text or "").strip())
    return int(match["size"]) if match else 0
