"""The one HTTP client to the upstream API: timeouts, pooling and error mapping."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx

from proxy import __version__
from proxy.config import Config
from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.headers import RawHeaders, end_to_end
from proxy.keys import ArtifactKey

ARTIFACT_PATH = "/v1/artifacts"
USER_AGENT = f"vlmrun-artifact-cache/{__version__}"
#: Largest non-200 body we hold in memory to replay to several clients.
ERROR_BODY_LIMIT = 1024 * 1024


def create_client(config: Config) -> httpx.AsyncClient:
    """The shared client. Its default timeouts suit passed-through traffic (long SSE streams)."""
    return httpx.AsyncClient(
        base_url=config.upstream_origin,
        timeout=httpx.Timeout(
            connect=config.connect_timeout,
            read=config.passthrough_timeout,
            write=config.passthrough_timeout,
            pool=config.connect_timeout,
        ),
        limits=httpx.Limits(
            max_connections=config.max_connections,
            max_keepalive_connections=min(32, config.max_connections),
        ),
        follow_redirects=False,
        trust_env=False,
    )


def artifact_request(
    client: httpx.AsyncClient, config: Config, key: ArtifactKey, authorization: str | None
) -> httpx.Request:
    """``GET /v1/artifacts`` for ``key`` as the credential ``authorization``, identity-encoded."""
    headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}
    if authorization is not None:
        headers["Authorization"] = authorization
    return client.build_request(
        "GET",
        ARTIFACT_PATH,
        params=key.upstream_params(),
        headers=headers,
        timeout=httpx.Timeout(
            connect=config.connect_timeout,
            read=config.read_timeout,
            write=config.read_timeout,
            pool=config.connect_timeout,
        ),
    )


def translate(exc: httpx.HTTPError) -> UpstreamTimeout | UpstreamUnavailable:
    """The domain error for a failed exchange with the upstream."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"upstream did not answer in time ({type(exc).__name__})")
    return UpstreamUnavailable(f"upstream unavailable ({type(exc).__name__})")


@contextlib.asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, request: httpx.Request
) -> AsyncIterator[httpx.Response]:
    """Send ``request`` and yield the response with its body unread; closes it on exit.

    Failures to get a response raise :class:`UpstreamTimeout` or :class:`UpstreamUnavailable`.
    """
    try:
        response = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise translate(exc) from exc
    try:
        yield response
    finally:
        await response.aclose()


class Answer:
    """A complete, small upstream answer kept in memory so it can be replayed verbatim."""

    def __init__(self, status: int, headers: RawHeaders, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


async def read_answer(response: httpx.Response) -> Answer | None:
    """Read a whole (error) answer; ``None`` if its body exceeds :data:`ERROR_BODY_LIMIT`."""
    body = bytearray()
    try:
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > ERROR_BODY_LIMIT:
                return None
    except httpx.HTTPError as exc:
        raise translate(exc) from exc
    headers = end_to_end(response.headers.raw, drop=(b"content-length",))
    headers.append((b"Content-Length", str(len(body)).encode()))
    return Answer(response.status_code, headers, bytes(body))
