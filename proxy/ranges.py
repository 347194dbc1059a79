"""Conditional and range requests against a stored entry (RFC 9110 13.1.2 and 14)."""

from __future__ import annotations


class RangeNotSatisfiable(Exception):
    """The single range asked for lies outside the entry (416)."""


def none_match(if_none_match: str | None, etag: str) -> bool:
    """True when ``If-None-Match`` names ``etag`` (weak comparison) or ``*``: answer 304."""
    if not if_none_match:
        return False
    tags = [tag.strip() for tag in if_none_match.split(",")]
    return "*" in tags or any(tag.removeprefix("W/") == etag for tag in tags)


def byte_range(
    range_header: str | None, if_range: str | None, etag: str, length: int
) -> tuple[int, int] | None:
    """The ``[start, end)`` slice a single-range request asks for; ``None`` to send it all.

    Multiple ranges, malformed headers and a stale ``If-Range`` are answered with the whole
    entry, which RFC 9110 allows. Raises :class:`RangeNotSatisfiable` for a range past the end.
    """
    if not range_header or (if_range is not None and if_range.strip() != etag):
        return None
    unit, _, spec = range_header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or length == 0:
            raise RangeNotSatisfiable
        return max(0, length - suffix), length
    start = int(first)
    end = length if last == "" else min(int(last) + 1, length)
    if last != "" and int(last) < start:
        return None
    if start >= length:
        raise RangeNotSatisfiable
    return start, end
