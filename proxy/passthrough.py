"""Every request that is not a cacheable artifact fetch: passed to the upstream unchanged.

Method, raw path (``//`` kept), query, headers (hop-by-hop ones excepted) and body go up; status,
headers and body come back verbatim. Bodies stream both ways in the chunks they arrive in:
server-sent events are forwarded event by event, uploads are never held in memory, and compressed
bodies are not decoded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from proxy.errors import ResponseAborted
from proxy.headers import end_to_end, for_client
from proxy.metrics import Metrics
from proxy.upstream import Upstream, translate

#: Headers httpx must compute itself for the upstream connection.
_REQUEST_DROP = (b"host", b"content-length")


class Passthrough:
    """An ASGI app forwarding each request to the upstream through the shared client."""

    def __init__(self, upstream: Upstream, metrics: Metrics) -> None:
        self._upstream = upstream
        self._client = upstream.client
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._metrics.passthrough.inc()
        response = await self.forward(Request(scope, receive))
        await response(scope, receive, send)

    async def forward(self, request: Request) -> StreamingResponse:
        """Send ``request`` upstream; the returned response streams the answer back."""
        raw_path: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
        query: bytes = request.scope.get("query_string", b"")
        url = self._client.base_url.copy_with(raw_path=raw_path + (b"?" + query if query else b""))
        headers = end_to_end(request.headers.raw, drop=_REQUEST_DROP)
        length = request.headers.get("content-length")
        has_body = length not in (None, "0") or "transfer-encoding" in request.headers
        if length is not None:
            headers.append((b"Content-Length", length.encode()))
        upstream_request = self._client.build_request(
            request.method,
            url,
            headers=headers,
            content=request.stream() if has_body else None,
        )
        upstream = await self._upstream.send(upstream_request)
        response = StreamingResponse(
            relay(upstream),
            status_code=upstream.status_code,
            background=BackgroundTask(upstream.aclose),
        )
        response.raw_headers = for_client(end_to_end(upstream.headers.raw))
        return response


async def relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    """The upstream body as it arrives, undecoded; a broken upstream aborts the response.

    Closes ``upstream`` when done, also when the response is aborted (a response's background
    task does not run then).
    """
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        raise ResponseAborted(str(translate(exc).detail)) from exc
    finally:
        await upstream.aclose()
