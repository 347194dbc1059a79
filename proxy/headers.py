"""Header handling shared by the routes: hop-by-hop filtering and exact name spelling.

The Python SDK reads ``dict(response.headers)["Content-Type"]``, so header names must leave the
proxy spelled exactly; all names here are bytes ready for an ASGI ``http.response.start``.
"""

from __future__ import annotations

from collections.abc import Iterable

CONTENT_TYPE = b"Content-Type"
CONTENT_LENGTH = b"Content-Length"

RawHeaders = list[tuple[bytes, bytes]]

#: RFC 9110 7.6.1 connection-specific headers, plus ones a proxy must set itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def end_to_end(headers: Iterable[tuple[bytes, bytes]], drop: Iterable[bytes] = ()) -> RawHeaders:
    """Headers without hop-by-hop ones (and those named in ``Connection``) or ``drop``.

    Names keep their spelling, except ``content-type``, which is always sent as ``Content-Type``.
    """
    items = list(headers)
    named = {
        token.strip().lower()
        for name, value in items
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    skip = HOP_BY_HOP | named | {name.lower() for name in drop}
    out: RawHeaders = []
    for name, value in items:
        lower = name.lower()
        if lower in skip:
            continue
        out.append((CONTENT_TYPE if lower == b"content-type" else name, value))
    return out


def first(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lowercase), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None
