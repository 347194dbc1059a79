"""Undo a ``Content-Encoding`` an upstream applied although the fill asked for ``identity``.

The cache stores and serves the artifact's own bytes, so a gzip- or deflate-coded answer is
decoded while it streams, in pieces of at most :data:`PIECE` bytes (a small compressed chunk can
expand a thousandfold: output is bounded, never one call's whole expansion). Other codings
(``br``, ``zstd``, stacked codings) are not decoded: such an answer is relayed as sent, with its
``Content-Encoding``, and not cached.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator

#: Largest piece of decoded output produced at once.
PIECE = 256 * 1024
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class DecodeError(Exception):
    """The coded body is malformed or ended before its coding did."""


def decodable(encoding: str) -> bool:
    """Whether :func:`decode` undoes ``encoding`` (as :func:`proxy.validators.encoding_of`
    spells it; "" is identity)."""
    return encoding in _WBITS


async def decode(encoding: str, raw: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The decoded bytes of the ``encoding``-coded stream ``raw``.

    ``deflate`` is the zlib format by the RFC, but some servers send raw deflate: a stream whose
    first bytes are not zlib is read as raw deflate. Concatenated gzip members are all decoded.
    """
    wbits = _WBITS[encoding]
    decoder = zlib.decompressobj(wbits)
    started = False
    try:
        async for data in raw:
            while data:
                if not started and encoding == "deflate":
                    try:
                        piece = decoder.decompress(data, PIECE)
                    except zlib.error:
                        decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                        piece = decoder.decompress(data, PIECE)
                else:
                    piece = decoder.decompress(data, PIECE)
                started = True
                data = decoder.unconsumed_tail
                if decoder.eof:
                    data = decoder.unused_data + data
                    if data:  # another gzip member follows
                        decoder = zlib.decompressobj(wbits)
                if piece:
                    yield piece
        tail = decoder.flush()
    except zlib.error as exc:
        raise DecodeError(f"malformed {encoding} body: {exc}") from None
    if tail:
        yield tail
    if not decoder.eof:
        raise DecodeError(f"{encoding} body ended before its end marker")
