"""Header handling shared by the routes: hop-by-hop filtering and exact name spelling.

The Python SDK reads ``dict(response.headers)["Content-Type"]``, so that name must leave the
proxy spelled exactly so. uvicorn's h11 protocol writes names as given, but its httptools
protocol (several times faster) writes ``name.lower()``. :data:`CONTENT_TYPE` is a ``bytes``
whose ``lower()`` keeps its spelling, so the exact name survives either protocol at no cost.
uvicorn compares lowered names only to spot ``content-length``, ``transfer-encoding`` and
``connection``; h11 copies names into plain ``bytes`` first. Both are covered by tests that read
the raw response bytes.
"""

from __future__ import annotations

from collections.abc import Iterable


class ExactName(bytes):
    """A header name that servers which lowercase names write as spelled."""

    __slots__ = ()

    def lower(self) -> bytes:
        return self


CONTENT_TYPE: bytes = ExactName(b"Content-Type")
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


_NEVER_NAMED = frozenset({b"authorization", b"content-length", b"content-type"})


def end_to_end(headers: Iterable[tuple[bytes, bytes]], drop: Iterable[bytes] = ()) -> RawHeaders:
    """Headers without hop-by-hop ones (and those named in ``Connection``) or ``drop``.

    Names keep their spelling; for a response to a client, pass the result to :func:`for_client`.
    """
    items = list(headers)
    named = {
        token.strip().lower()
        for name, value in items
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    # ``Connection`` may name hop-by-hop extensions, never the credential or the framing.
    skip = HOP_BY_HOP | (named - _NEVER_NAMED) | {name.lower() for name in drop}
    out: RawHeaders = []
    for name, value in items:
        lower = name.lower()
        if lower in skip:
            continue
        out.append((name, value))
    return out


def for_client(headers: RawHeaders) -> RawHeaders:
    """Response headers with ``content-type``, however spelled upstream, as :data:`CONTENT_TYPE`.

    Only for headers sent to clients through the server: httpx, for one, looks names up by
    ``lower()`` and must get plain ``bytes``.
    """
    return [(CONTENT_TYPE if name.lower() == b"content-type" else name, v) for name, v in headers]
