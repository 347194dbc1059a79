"""What an upstream answer says about the bytes behind it, to tell two artifacts apart.

Session and execution ids are created by the API and meant to be unique across accounts; the
proxy's sharing of cached bytes between credentials rests on that. As a defence in depth, every
200 the proxy sees for a key (the fill that stored it, an access check, a check before joining
a running fill) is compared with what the entry or fill recorded: ``Content-Type``, the length
and encoding as sent, and any ``ETag`` or digest header. Two answers that disagree cannot be the
same artifact: the caller is then served from upstream and the scope is split (see
:mod:`proxy.access`). Answers that agree may still name different bytes of the same type and
length; only the id assumption (or ``access_check = "object"``) covers that.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import httpx

#: Headers that name a representation's bytes, when the API or a CDN sends them.
TAG_HEADERS = ("etag", "digest", "repr-digest", "content-digest", "content-md5")


@dataclasses.dataclass(frozen=True)
class Validators:
    content_type: str
    #: ``Content-Length`` as sent (bytes on the wire), None when the body was chunked.
    length: int | None
    #: ``Content-Encoding`` as sent, lowercased; "" for identity.
    encoding: str = ""
    #: (header, value) pairs from :data:`TAG_HEADERS`, sorted.
    tags: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, response: httpx.Response) -> Validators:
        headers = response.headers
        length = headers.get("content-length")
        return cls(
            content_type=headers.get("content-type", "application/octet-stream"),
            length=int(length) if length is not None and length.isdigit() else None,
            encoding=encoding_of(headers),
            tags=tuple(sorted((name, headers[name]) for name in TAG_HEADERS if name in headers)),
        )

    def with_length(self, length: int) -> Validators:
        """These validators, with the identity length known once the whole body was read."""
        if self.encoding or self.length is not None:
            return self
        return dataclasses.replace(self, length=length)

    def conflicts(self, other: Validators) -> bool:
        """True when the two answers cannot be the same artifact.

        A CDN may compress one answer and not another: across encodings only the type and the
        ETag (without the weak prefix and a coding suffix such as Apache's ``-gzip``) compare.
        """
        if _media_type(self.content_type) != _media_type(other.content_type):
            return True
        mine, theirs = dict(self.tags), dict(other.tags)
        if self.encoding != other.encoding:
            if "etag" in mine and "etag" in theirs:
                return _entity(mine["etag"]) != _entity(theirs["etag"])
            return False
        if self.length is not None and other.length is not None and self.length != other.length:
            return True
        return any(mine[name] != theirs[name] for name in mine.keys() & theirs.keys())

    def to_dict(self) -> dict[str, Any]:
        return {
            "content_type": self.content_type,
            "length": self.length,
            "encoding": self.encoding,
            "tags": [list(tag) for tag in self.tags],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Validators:
        length = data.get("length")
        return cls(
            content_type=str(data["content_type"]),
            length=None if length is None else int(length),
            encoding=str(data.get("encoding", "")),
            tags=tuple((str(name), str(value)) for name, value in data.get("tags", ())),
        )


def encoding_of(headers: httpx.Headers) -> str:
    """The ``Content-Encoding`` of a response, lowercased, "" for none or identity."""
    value = ",".join(headers.get_list("content-encoding")).lower()
    codings = [c.strip() for c in value.split(",") if c.strip() and c.strip() != "identity"]
    return ", ".join(codings)


_CODING_SUFFIX = re.compile(r"-(gzip|br|deflate|zstd)$")


def _entity(etag: str) -> str:
    """An ETag's opaque value, whatever a compressing server did to it."""
    value = etag.strip().removeprefix("W/").strip('"')
    return _CODING_SUFFIX.sub("", value)


def _media_type(content_type: str) -> str:
    return content_type.strip().lower()
