"""The hook passthrough calls: which answers are watched, and the scanner that watches one.

Watched (after collapsing ``//`` in the path, which SDK base URLs ending in ``/`` produce):
``POST /v1/openai/chat/completions`` (JSON or server-sent events), ``GET
/v1/agent/executions/{id}`` and ``POST /v1/agent/execute``; never the executions *list* (that would
prefetch a user's whole history). Only 2xx answers of a request with a credential, whose
``Content-Type`` is JSON or an event stream, are scanned.

The relay hands each chunk to :meth:`Watch.feed` *after* sending it on, so watching never delays
an event; the body is never changed.
"""

from __future__ import annotations

import re

import httpx

from proxy.prefetch.scan import Format, Kind, Scanner
from proxy.prefetch.scheduler import Prefetcher

_SLASHES = re.compile(rb"/{2,}")
_EXECUTION = re.compile(rb"/v1/agent/executions/[^/]+")


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

    def _found(self, kind: str, scope_id: str, object_id: str) -> None:
        self._prefetcher.submit(self._authorization, self._fingerprint, kind, scope_id, object_id)

    def feed(self, chunk: bytes) -> None:
        self.scanner.feed(chunk)

    def finish(self) -> None:
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
    return Watch(kind, form, encoding, limit, prefetcher, authorization, fingerprint)
