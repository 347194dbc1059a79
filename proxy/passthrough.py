"""Every request that is not a cacheable artifact fetch: passed to the upstream unchanged.

Method, raw path (``//`` kept), query, headers (hop-by-hop ones excepted) and body go up; status,
headers and body come back verbatim. Bodies stream both ways in the chunks they arrive in:
server-sent events are forwarded event by event, uploads are never held in memory, and compressed
bodies are not decoded.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Callable

import anyio
import httpx
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from proxy import offline
from proxy.access import AccessProofs, credential
from proxy.capacity import PerKey, RateFloor
from proxy.config import Config
from proxy.errors import (
    BadRequest,
    LengthRequired,
    NotImplementedByProxy,
    RequestTimeout,
    ResponseAborted,
    UpstreamUnreachable,
)
from proxy.headers import end_to_end
from proxy.metrics import Metrics
from proxy.prefetch import Prefetcher, Watch, observe
from proxy.upstream import Upstream, response_headers, translate

log = logging.getLogger(__name__)

#: Headers httpx must compute itself for the upstream connection.
_REQUEST_DROP = (b"host", b"content-length")
#: Methods whose requests carry no body: one sent anyway is refused, never forwarded. An upstream
#: that ignores such a body would read it as the next request on a shared connection.
_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})


class _HeldResponse(StreamingResponse):
    """A streamed answer that gives back its credential's passthrough allowance once: when the
    body has been relayed (before the client sees its end, so a client that read a whole answer
    may send the next request at once), or when sending stops for any other reason."""

    def __init__(
        self, upstream: httpx.Response, release: Callable[[], None], watch: Watch | None = None
    ) -> None:
        self._release = release
        self._watch = watch
        self._held = True
        super().__init__(
            self._relay(upstream),
            status_code=upstream.status_code,
            background=BackgroundTask(upstream.aclose),
        )
        self.raw_headers = response_headers(upstream.headers.raw)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._release()

    async def _relay(self, upstream: httpx.Response) -> AsyncIterator[bytes]:
        body = relay(upstream)
        if self._watch is not None:
            body = self._watch.around(body)
        async for chunk in body:
            yield chunk
        self.release()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


class Passthrough:
    """An ASGI app forwarding each request to the upstream through the shared client.

    Each credential may have ``max_passthrough_per_key`` of these in flight (then 429): one
    client's long streams or slow uploads cannot take every connection of the pool.
    """

    def __init__(
        self,
        upstream: Upstream,
        metrics: Metrics,
        access: AccessProofs,
        config: Config,
        prefetcher: Prefetcher | None = None,
    ) -> None:
        self._upstream = upstream
        #: Watches the answers that name artifacts (None: prefetch is off).
        self._prefetcher = prefetcher
        self._metrics = metrics
        self._access = access
        self._config = config
        self._held = PerKey(config.max_passthrough_per_key, "requests in flight")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._metrics.passthrough.inc()
        request = Request(scope, receive)
        response: Response
        try:
            response = await self.forward(request)
        except UpstreamUnreachable:
            if not offline.is_health(request.method, scope["path"]):
                raise
            response = await offline.health(self._access, request.headers.get("authorization"))
        await response(scope, receive, send)

    async def forward(self, request: Request, retry: bool = False) -> StreamingResponse:
        """Send ``request`` upstream; the returned response streams the answer back. With
        ``retry`` (a GET of an artifact), upstream faults before the first byte are retried."""
        raw_path: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
        if not raw_path.startswith(b"/"):  # e.g. OPTIONS * (asterisk form)
            raise NotImplementedByProxy(
                f"{request.method} {raw_path.decode('latin-1')} is not forwarded"
            )
        query: bytes = request.scope.get("query_string", b"")
        headers = end_to_end(request.headers.raw, drop=_REQUEST_DROP)
        length = request.headers.get("content-length")
        chunked = "transfer-encoding" in request.headers
        has_body = length not in (None, "0") or chunked
        if has_body and request.method in _NO_BODY:
            raise BadRequest(f"a {request.method} request takes no body")
        if chunked and request.method == "DELETE":
            raise LengthRequired("a DELETE with a body needs a Content-Length")
        if length is not None:
            headers.append((b"Content-Length", length.encode()))
        authorization = credential(request.scope["headers"])
        fingerprint = self._access.fingerprint(authorization)
        upstream_request = self._upstream.request(
            request.method,
            raw_path + (b"?" + query if query else b""),
            headers,
            self._body(request) if has_body else None,
        )
        self._held.acquire(fingerprint)
        try:
            upstream = await self._upstream.send(upstream_request, retry=retry)
        except BaseException:
            self._held.release(fingerprint)
            raise
        watch = observe(
            self._prefetcher,
            request.method,
            raw_path,
            upstream,
            authorization,
            fingerprint,
            self._config.prefetch_scan_limit,
        )
        return _HeldResponse(upstream, functools.partial(self._held.release, fingerprint), watch)

    async def _body(self, request: Request) -> AsyncIterator[bytes]:
        """The client's request body as it arrives. A client that leaves mid-upload ends it
        quietly (the upstream request then fails, and nobody is left to answer); one that goes
        silent for ``body_timeout``, or sends slower than ``upload_min_rate``, gets a 408: a
        slow client holds its upstream connection only so long."""
        config = self._config
        floor = RateFloor(config.upload_min_rate, config.fill_rate_window, time.monotonic())
        chunks = request.stream().__aiter__()
        received = 0
        try:
            while True:
                chunk = b""
                with anyio.move_on_after(config.body_timeout) as waited:
                    try:
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        return
                if waited.cancelled_caught:
                    raise RequestTimeout(f"no request body for {config.body_timeout:g} s")
                received += len(chunk)
                if floor.too_slow(time.monotonic(), received):
                    raise RequestTimeout("request body arrived slower than upload_min_rate")
                yield chunk
        except ClientDisconnect:
            log.debug("client left during its upload to %s", request.url.path)
            raise


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
