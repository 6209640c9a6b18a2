import pytest

from mirror.errors import RangeNotSatisfiable
from mirror.ranges import (
    ByteRange,
    RangeRequest,
    parse_content_range,
    parse_range_header,
    resolve_range,
    unsatisfied_size,
)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-99", ByteRange(0, 100)),
        ("bytes=10-", ByteRange(10, 990)),
        ("bytes=990-5000", ByteRange(990, 10)),
        ("bytes=-100", ByteRange(900, 100)),
        ("bytes=-5000", ByteRange(0, 1000)),
        ("bytes=999-999", ByteRange(999, 1)),
        # Not understood: serve the whole blob (RFC 9110).
        ("bytes=0-1,5-6", None),
        ("items=0-1", None),
        ("bytes=5-1", None),
        ("bytes=-", None),
        ("bytes=a-b", None),
        ("bytes=\u00b2-", None),
        ("bytes=" + "9" * 5000 + "-", None),
    ],
)
def test_parse_range(header: str | None, expected: ByteRange | None) -> None:
    assert resolve_range(header, 1000) == expected


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_unsatisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable) as raised:
        resolve_range(header, 1000)
    assert raised.value.size == 1000


def test_empty_blob_has_no_satisfiable_range() -> None:
    with pytest.raises(RangeNotSatisfiable):
        resolve_range("bytes=0-", 0)


def test_content_range() -> None:
    assert ByteRange(10, 5).content_range(100) == "bytes 10-14/100"


@pytest.mark.parametrize("header", ["bytes=0-99", "bytes=10-", "bytes=-7"])
def test_a_parsed_range_is_passed_on_as_it_was_asked(header: str) -> None:
    requested = parse_range_header(header)
    assert requested is not None and requested.header() == header


def test_a_slice_asks_for_itself() -> None:
    assert parse_range_header(ByteRange(5, 10).header()) == RangeRequest(5, 14)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bytes 10-19/100", (ByteRange(10, 10), 100)),
        (" bytes 0-0/1 ", (ByteRange(0, 0 + 1), 1)),
        ("bytes 10-9/100", None),
        ("bytes 0-100/100", None),
        ("bytes */100", None),
        ("bytes 1-2/" + "9" * 5000, None),
        (None, None),
    ],
)
def test_content_range_of_a_partial_answer(
    text: str | None, expected: tuple[ByteRange, int] | None
) -> None:
    assert parse_content_range(text) == expected


def test_size_of_an_unsatisfiable_answer() -> None:
    assert unsatisfied_size("bytes */1234") == 1234
    assert unsatisfied_size("bytes 0-1/2") == 0
    assert unsatisfied_size(None) == 0
