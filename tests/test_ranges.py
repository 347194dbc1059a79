"""Range and conditional request rules."""

from __future__ import annotations

import pytest

from proxy.ranges import RangeNotSatisfiable, byte_range, none_match

ETAG = '"abc"'


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", (0, 10)),
        ("bytes=90-", (90, 100)),
        ("bytes=-10", (90, 100)),
        ("bytes=-500", (0, 100)),
        ("bytes=95-200", (95, 100)),
        ("bytes=0-1,4-5", None),
        ("items=0-1", None),
        ("bytes=5-1", None),
        ("bytes=x-y", None),
        (None, None),
    ],
)
def test_single_ranges(header: str | None, expected: tuple[int, int] | None) -> None:
    """Satisfiable single ranges become slices; anything else means the whole body."""
    assert byte_range(header, None, ETAG, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=-0", "bytes=500-600"])
def test_unsatisfiable(header: str) -> None:
    """A range starting past the end is a 416."""
    with pytest.raises(RangeNotSatisfiable):
        byte_range(header, None, ETAG, 100)


def test_stale_if_range_sends_everything() -> None:
    """If-Range with another validator ignores the Range."""
    assert byte_range("bytes=0-9", '"old"', ETAG, 100) is None
    assert byte_range("bytes=0-9", ETAG, ETAG, 100) == (0, 10)


def test_if_none_match() -> None:
    """Matching tags (weak or strong) and * answer 304; others do not."""
    assert none_match(ETAG, ETAG) and none_match(f'"x", W/{ETAG}', ETAG) and none_match("*", ETAG)
    assert not none_match('"x"', ETAG) and not none_match(None, ETAG)
