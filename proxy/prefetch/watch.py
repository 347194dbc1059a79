"""The hook passthrough calls: which answers are watched, and the scanner that watches one.

Watched (after collapsing ``//`` in the path, which SDK base URLs ending in ``/`` produce):
``POST /v1/openai/chat/completions`` (JSON or server-sent events), ``GET
/v1/agent/executions/{id}`` and ``POST /v1/agent/execute``; never the executions *list* (that would
prefetch a user's whole history). Only 2xx answers of a request with a credential, whose
``Content-Type`` is JSON or an event stream, are scanned.

The relay's chunks pass through :meth:`Watch.around`, which scans each one *after* it went on to
the client, so watching never delays an event; the body is never changed. One exception makes the
first get after an answer reliably local: a body with a ``Content-Length`` has its last chunk
scanned (and its references queued) just before that chunk goes out, so a client that has the
whole answer cannot ask for an artifact before its prefetch is registered. (A stream without a
length ends with its terminating chunk, after the scan is finished.)
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from urllib.parse import unquote

import anyio.to_thread
import httpx

from proxy.prefetch.scan import Format, Kind, Scanner, parse_json
from proxy.prefetch.scheduler import Prefetcher

_SLASHES = re.compile(rb"/{2,}")
_EXECUTION = re.compile(rb"/v1/agent/executions/([^/]+)")
#: A JSON answer up to this size is parsed on the event loop (well under a millisecond).
INLINE_JSON = 64 * 1024


def watched(method: str, raw_path: bytes) -> Kind | None:
    """What kind of answer a request gets, if it is one we scan."""
    path = _SLASHES.sub(b"/", raw_path.split(b"?", 1)[0])
    if method == "POST" and path == b"/v1/openai/chat/completions":
        return "completion"
    if (method == "POST" and path == b"/v1/agent/execute") or (
        method == "GET" and _EXECUTION.fullmatch(path)
    ):
        return "execution"
    return None


def requested_execution(method: str, raw_path: bytes) -> str | None:
    """The execution id a ``GET /v1/agent/executions/{id}`` names (as the API decodes it): its
    answer is scanned only if it is about that execution. An upstream answering another one
    (a misrouted or stale answer) prefetches nothing."""
    path = _SLASHES.sub(b"/", raw_path.split(b"?", 1)[0])
    match = _EXECUTION.fullmatch(path) if method == "GET" else None
    if match is None:
        return None
    return unquote(match.group(1).decode("latin-1"), errors="replace")


def _format(content_type: str) -> Format | None:
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "text/event-stream":
        return "sse"
    if media == "application/json" or media.endswith("+json"):
        return "json"
    return None


class Watch:
    """One answer's scanner, submitting what it finds for the requester."""

    def __init__(
        self,
        kind: Kind,
        form: Format,
        encoding: str,
        limit: int,
        prefetcher: Prefetcher,
        authorization: str,
        fingerprint: str,
    ) -> None:
        self._prefetcher = prefetcher
        self._authorization = authorization
        self._fingerprint = fingerprint
        self.scanner = Scanner(kind, form, encoding, limit, self._found)
        #: The body's length on the wire (``Content-Length``), when known.
        self.length: int | None = None

    def _found(self, kind: str, scope_id: str, object_id: str) -> None:
        self._prefetcher.submit(self._authorization, self._fingerprint, kind, scope_id, object_id)

    async def around(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``body`` unchanged, scanned on the way (see the module docstring)."""
        received = 0
        async for chunk in body:
            received += len(chunk)
            if self.length is not None and received >= self.length:  # the last one
                self.scanner.feed(chunk)
                await self._finish()
                yield chunk
                continue
            yield chunk
            self.scanner.feed(chunk)  # after the chunk went out: never delays it
        await self._finish()

    async def _finish(self) -> None:
        """Scan what waited for the end. A JSON body larger than :data:`INLINE_JSON` is parsed
        in a worker thread, one at a time: parsing a megabyte of small values takes tens of
        milliseconds, which on the event loop would stall every other client, at the will of
        whoever polls a large answer. While another answer is being parsed, this one is not
        scanned at all: its last chunk must not wait behind someone else's answers."""
        body = self.scanner.take_json()
        if body is not None:
            kind = self.scanner.kind
            limiter = self._prefetcher.scan_limiter
            if len(body) <= INLINE_JSON:
                self.scanner.parsed(parse_json(kind, body, self.scanner.execution))
            elif limiter.available_tokens >= 1:
                parsed = await anyio.to_thread.run_sync(
                    parse_json, kind, body, self.scanner.execution, limiter=limiter
                )
                self.scanner.parsed(parsed)
        self.scanner.finish()


def observe(
    prefetcher: Prefetcher | None,
    method: str,
    raw_path: bytes,
    response: httpx.Response,
    authorization: str | None,
    fingerprint: str | None,
    limit: int,
) -> Watch | None:
    """A watch for this answer, or None when it is not one to scan."""
    if prefetcher is None or authorization is None or fingerprint is None:
        return None
    if not 200 <= response.status_code < 300:
        return None
    kind = watched(method, raw_path)
    if kind is None:
        return None
    form = _format(response.headers.get("content-type", ""))
    if form is None:
        return None
    encoding = response.headers.get("content-encoding", "")
    watch = Watch(kind, form, encoding, limit, prefetcher, authorization, fingerprint)
    watch.scanner.execution = requested_execution(method, raw_path)
    length = response.headers.get("content-length", "")
    watch.length = int(length) if length.isdigit() else None
    return watch
