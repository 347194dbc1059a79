"""The rest of a body from upstream, after a tier failed in the middle of serving it.

A hit from the shared tier streams as it is read; if Redis stops answering half-way, the client
already has the first bytes and its 200. Artifacts are immutable, so the rest is fetched from the
API with the client's own credential (``Range: bytes=<offset>-``, or the whole body with the
first bytes skipped when the API ignores ranges), hashed on top of what was sent, and the last
piece goes out only if the whole body matches the entry's sha256: exact bytes, or a failed
transfer, never a short or wrong 200.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx

from proxy.errors import ProxyError, ResponseAborted
from proxy.keys import ArtifactKey
from proxy.store import EntryMeta
from proxy.upstream import Upstream

_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


async def rest_from_upstream(
    upstream: Upstream,
    key: ArtifactKey,
    authorization: str | None,
    meta: EntryMeta,
    offset: int,
    digest: Any,
) -> AsyncIterator[bytes]:
    """Bytes ``[offset, meta.length)`` of ``key``, ``digest`` (sha256 of the first ``offset``)
    updated with them; raises :class:`ResponseAborted` before the last piece unless the whole
    body matches ``meta.sha256``."""
    request = upstream.artifact_request(key, authorization)
    request.headers["Range"] = f"bytes={offset}-"
    held = b""
    position = offset
    try:
        async with upstream.stream(request, artifact=True, retry=False) as answer:
            skip = _skip(answer, offset)
            async for chunk in answer.aiter_raw():
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                if not chunk:
                    continue
                digest.update(chunk)
                position += len(chunk)
                if held:
                    yield held
                held = chunk
    except (httpx.HTTPError, ProxyError) as exc:
        raise ResponseAborted(f"the rest of {key.object_id} could not be fetched: {exc}") from None
    if position != meta.length or digest.hexdigest() != meta.sha256:
        raise ResponseAborted(f"the rest of {key.object_id} from upstream did not match")
    if held:
        yield held


def _skip(answer: httpx.Response, offset: int) -> int:
    """How many leading bytes of ``answer`` were sent already; aborts on anything unusable."""
    if "content-encoding" in answer.headers:
        raise ResponseAborted("upstream coded the rest of the body")
    if answer.status_code == 206:
        match = _CONTENT_RANGE.fullmatch(answer.headers.get("content-range", ""))
        if match is None or int(match.group(1)) != offset:
            raise ResponseAborted("upstream answered another range")
        return 0
    if answer.status_code == 200:  # ranges ignored: the whole body again
        return offset
    raise ResponseAborted(f"upstream answered {answer.status_code} for the rest of the body")
