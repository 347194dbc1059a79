"""Domain errors that carry their HTTP meaning, and the one place they become responses.

Bodies follow the API's own shapes: validation errors are ``{"detail": [{"loc", "msg", "type"}]}``
(FastAPI's HTTPValidationError, as in the seed's OpenAPI), others ``{"detail": "..."}``.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.headers import CONTENT_TYPE


class ProxyError(Exception):
    """An error the proxy answers itself."""

    status_code = 500
    #: Extra response headers.
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def __init__(self, detail: Any) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidRequest(ProxyError):
    """The request can never succeed as sent (422)."""

    status_code = 422

    def __init__(self, loc: list[str | int], msg: str, kind: str, value: object = None) -> None:
        item: dict[str, Any] = {"loc": loc, "msg": msg, "type": kind}
        if value is not None:
            item["input"] = value
        super().__init__([item])


class BadRequest(ProxyError):
    """The request cannot be forwarded as sent, e.g. a header HTTP does not allow (400)."""

    status_code = 400


class RequestTimeout(ProxyError):
    """The client's request body stalled or crawled (408)."""

    status_code = 408


class LengthRequired(ProxyError):
    """A request body without a length where the upstream cannot frame one safely (411)."""

    status_code = 411


class NotImplementedByProxy(ProxyError):
    """A request form the proxy does not forward, such as ``OPTIONS *`` (501)."""

    status_code = 501


class UriTooLong(ProxyError):
    """The query string is longer than any artifact request needs (414)."""

    status_code = 414


class PayloadTooLarge(ProxyError):
    """A request body where none belongs (413)."""

    status_code = 413


class TooManyRequests(ProxyError):
    """One credential holds its whole share of something every user shares (429)."""

    status_code = 429
    headers = ((b"Retry-After", b"1"),)


class HeaderFieldsTooLarge(ProxyError):
    """A request head with too many, too long or too large header fields (431)."""

    status_code = 431


class TooManyWaiters(ProxyError):
    """Too many clients already follow this fetch (503)."""

    status_code = 503


class UpstreamUnavailable(ProxyError):
    """The upstream could not be reached or broke the connection (502)."""

    status_code = 502


class UpstreamUnreachable(UpstreamUnavailable):
    """No connection to the upstream could be made, or the breaker is open (502): offline."""


class RedirectTargetFailed(UpstreamUnavailable):
    """A redirect's target (not the API itself) could not be fetched (502)."""


class UpstreamBusy(ProxyError):
    """Every connection to the upstream is in use and none freed up in time (503)."""

    status_code = 503


class RedirectRefused(ProxyError):
    """The upstream redirected somewhere the proxy does not follow (502)."""

    status_code = 502


class UpstreamTimeout(ProxyError):
    """The upstream did not answer in time (504)."""

    status_code = 504


class ResponseAborted(Exception):
    """Raised mid-body to cut the connection, so the client sees a failed transfer.

    The outermost ASGI wrapper swallows it; the server then closes the connection without
    completing the response (a short body, or a chunked body without its terminator).
    """


def json_response(
    status_code: int, payload: Any, extra: list[tuple[bytes, bytes]] | None = None
) -> Response:
    """A JSON response whose header is spelled ``Content-Type`` (see docs/clients.md)."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    response = Response(body, status_code=status_code)
    response.raw_headers = [
        (CONTENT_TYPE, b"application/json"),
        (b"Content-Length", str(len(body)).encode()),
        *(extra or []),
    ]
    return response


def error_response(exc: ProxyError) -> Response:
    """The one way a :class:`ProxyError` becomes an answer: the API's ``{"detail": ...}``."""
    return json_response(exc.status_code, {"detail": exc.detail}, list(exc.headers))


async def handle_proxy_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return error_response(exc)
