"""The one HTTP client to the upstream API: timeouts, retries, a circuit breaker, error mapping.

Artifact fetches are idempotent, so before their first byte they are retried (connect failures,
first-byte timeouts, 5xx) with jittered exponential backoff, within the Python SDK's 30 s budget.
Passed-through requests are sent once: their bodies stream and cannot be replayed.

The circuit breaker counts consecutive failures to get any answer (connect errors and timeouts).
After ``breaker_threshold`` of them it opens: requests fail at once with a 502 instead of piling
up connections to a dead upstream. After ``breaker_cooldown`` one request is let through as a
probe; its success closes the breaker again.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator

import anyio
import httpx

from proxy import __version__
from proxy.config import Config
from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.headers import RawHeaders, end_to_end, for_client
from proxy.keys import ArtifactKey

log = logging.getLogger(__name__)

ARTIFACT_PATH = "/v1/artifacts"
USER_AGENT = f"vlmrun-artifact-cache/{__version__}"
#: Largest non-200 body we hold in memory to replay to several clients.
ERROR_BODY_LIMIT = 1024 * 1024


def translate(exc: httpx.HTTPError | TimeoutError) -> UpstreamTimeout | UpstreamUnavailable:
    """The domain error for a failed exchange with the upstream."""
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return UpstreamTimeout(f"upstream did not answer in time ({type(exc).__name__})")
    return UpstreamUnavailable(f"upstream unavailable ({type(exc).__name__})")


class CircuitBreaker:
    """Closed -> open after ``threshold`` consecutive failures -> one probe after ``cooldown``."""

    def __init__(self, threshold: int, cooldown: float) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self.opened_at >= self.cooldown else "open"

    def admit(self) -> bool:
        """Whether a request may go upstream now; at most one probe while half-open."""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._probing:
            self._probing = True
            return True
        return False

    def succeeded(self) -> None:
        if self.opened_at is not None:
            log.info("upstream answers again; circuit closed")
        self.failures = 0
        self.opened_at = None
        self._probing = False

    def failed(self) -> None:
        self.failures += 1
        self._probing = False
        if self.failures >= self.threshold:
            if self.opened_at is None:
                log.warning("upstream failed %d times in a row; circuit open", self.failures)
            self.opened_at = time.monotonic()


class Upstream:
    """The shared client, with the retry policy and the circuit breaker around it."""

    def __init__(self, config: Config, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.breaker = CircuitBreaker(config.breaker_threshold, config.breaker_cooldown)
        self.client = httpx.AsyncClient(
            base_url=config.upstream_origin,
            # Defaults suit passed-through traffic (long SSE streams, big uploads).
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
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def artifact_request(self, key: ArtifactKey, authorization: str | None) -> httpx.Request:
        """``GET /v1/artifacts`` for ``key`` as the credential ``authorization``, uncompressed."""
        config = self.config
        headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}
        if authorization is not None:
            headers["Authorization"] = authorization
        return self.client.build_request(
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

    async def _send_once(self, request: httpx.Request, *, artifact: bool) -> httpx.Response:
        if not self.breaker.admit():
            raise UpstreamUnavailable("upstream unavailable (circuit open after repeated failures)")
        try:
            if artifact:
                # Redirects are followed here; httpx drops Authorization on a cross-origin hop.
                with anyio.fail_after(self.config.first_byte_timeout):
                    response = await self.client.send(request, stream=True, follow_redirects=True)
            else:
                response = await self.client.send(request, stream=True)
        except (httpx.HTTPError, TimeoutError) as exc:
            self.breaker.failed()
            raise translate(exc) from exc
        self.breaker.succeeded()
        return response

    async def send(self, request: httpx.Request, *, artifact: bool = False) -> httpx.Response:
        """The response to ``request`` with its body unread; the caller closes it.

        Artifact requests are retried before their first byte; failures raise
        :class:`UpstreamTimeout` or :class:`UpstreamUnavailable`.
        """
        attempts = 1 + (self.config.retries if artifact else 0)
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            try:
                response = await self._send_once(request, artifact=artifact)
            except (UpstreamTimeout, UpstreamUnavailable):
                if last or self.breaker.state != "closed":
                    raise
            else:
                if response.status_code < 500 or last:
                    return response
                await response.aclose()
            await anyio.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, base * 2^(attempt-1)]."""
        return random.uniform(0, self.config.retry_backoff * 2 ** (attempt - 1))

    @contextlib.asynccontextmanager
    async def stream(
        self, request: httpx.Request, *, artifact: bool = False
    ) -> AsyncIterator[httpx.Response]:
        """:meth:`send` as a context manager that closes the response on exit."""
        response = await self.send(request, artifact=artifact)
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
    headers = for_client(end_to_end(response.headers.raw, drop=(b"content-length",)))
    headers.append((b"Content-Length", str(len(body)).encode()))
    return Answer(response.status_code, headers, bytes(body))
