"""The one HTTP client to the upstream API: timeouts, retries, a circuit breaker, error mapping.

Artifact fetches are idempotent, so before their first byte they are retried (connect failures,
first-byte timeouts, 5xx) with jittered exponential backoff, within the Python SDK's 30 s budget,
and their redirects are followed under the policy of :mod:`proxy.redirects`. Passed-through
requests are sent once: their bodies stream and cannot be replayed.

Requests are built here, from the headers the caller gives and nothing else: no default
``Accept``, ``Accept-Encoding`` or ``User-Agent`` of httpx's is added to a client's request, and
no cookie is ever kept (see :mod:`proxy.transport`).

The circuit breaker counts only the upstream's own faults (:func:`upstream_fault`): a connect
error, a timeout waiting for it, a broken answer, or (for artifact fetches, whose requests are
the proxy's own) a 502/503/504. A request the client got wrong (a header HTTP forbids), a wait
for a free pooled connection, a status a client's own request provoked, or anything that happens
while a client's request body is still streaming (a slow upload dropped by the upstream) never
count: no client can open the breaker for the others. After ``breaker_threshold`` consecutive
faults it opens: requests fail at once with a 502 instead of piling up connections to a dead
upstream. After ``breaker_cooldown`` one request without a body is let through as a probe (a new
one each cooldown, so a slow probe cannot hold the breaker open); any answer that is not a fault
closes the breaker again. Requests with a body never probe: they fail at once unless closed.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable

import anyio
import httpx

from proxy import __version__
from proxy.config import Config
from proxy.errors import (
    BadRequest,
    ProxyError,
    RedirectRefused,
    RedirectTargetFailed,
    UpstreamBusy,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from proxy.headers import RawHeaders, end_to_end, for_client
from proxy.keys import ArtifactKey
from proxy.redirects import (
    MAX_REDIRECTS,
    REDIRECT_STATUSES,
    Resolver,
    allowed,
    resolve,
    same_origin,
)
from proxy.transport import SharedClient, transport

log = logging.getLogger(__name__)

ARTIFACT_PATH = "/v1/artifacts"
USER_AGENT = f"vlmrun-artifact-cache/{__version__}"
#: Largest non-200 body we hold in memory to replay to several clients.
ERROR_BODY_LIMIT = 1024 * 1024
#: Upstream statuses that say the service itself is failing (they count for the breaker).
FAULT_STATUSES = frozenset({502, 503, 504})
#: What the breaker is told of an answer whose status does not count.
ANSWERED = 200

_UPSTREAM_FAULTS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadTimeout,
    httpx.ReadError,
    httpx.RemoteProtocolError,
    TimeoutError,
)


def upstream_fault(failure: BaseException | int) -> bool:
    """The one rule of what counts against the upstream: an exception raised while exchanging
    with it, or the status it answered. Clients' mistakes and local congestion never count."""
    if isinstance(failure, int):
        return failure in FAULT_STATUSES
    return isinstance(failure, _UPSTREAM_FAULTS)


def unreachable(exc: BaseException) -> bool:
    """No connection could be made at all (DNS, refused, connect timeout): we are offline."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


def translate(exc: httpx.HTTPError | TimeoutError) -> ProxyError:
    """The domain error for a failed exchange with the upstream."""
    if unreachable(exc):
        return UpstreamUnreachable(f"upstream unavailable ({type(exc).__name__})")
    if isinstance(exc, httpx.LocalProtocolError | httpx.InvalidURL | httpx.UnsupportedProtocol):
        return BadRequest(f"the request cannot be forwarded: {exc}")
    if isinstance(exc, httpx.PoolTimeout):
        return UpstreamBusy("every connection to the upstream is busy; retry")
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return UpstreamTimeout(f"upstream did not answer in time ({type(exc).__name__})")
    return UpstreamUnavailable(f"upstream unavailable ({type(exc).__name__})")


class CircuitBreaker:
    """Closed -> open after ``threshold`` consecutive faults -> one probe after ``cooldown``.

    ``fault`` says what counts (by default :func:`upstream_fault`; the shared tier passes its
    own rule, :func:`proxy.store.shared.redis_fault`); ``name`` is what the log lines call the
    service.
    """

    def __init__(
        self,
        threshold: int,
        cooldown: float,
        fault: Callable[[BaseException | int], bool] = upstream_fault,
        name: str = "upstream",
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._fault = fault
        self.name = name
        self.failures = 0
        self.opened_at: float | None = None
        #: When the running probe was let through (None: no probe running).
        self._probing: float | None = None

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self.opened_at >= self.cooldown else "open"

    def admit(self) -> bool:
        """Whether a request may go upstream now; at most one probe per cooldown while
        half-open."""
        state = self.state
        if state == "closed":
            return True
        now = time.monotonic()
        if state == "half-open" and (self._probing is None or now - self._probing >= self.cooldown):
            self._probing = now
            return True
        return False

    def record(self, outcome: BaseException | int) -> None:
        """Count ``outcome`` (an exception or a status) by :func:`upstream_fault`."""
        if self._fault(outcome):
            self._failed()
        elif isinstance(outcome, int):  # an answer that is not a fault
            self._succeeded()
        else:  # not the upstream's fault, and no answer either: a probe may go again
            self._probing = None

    def _succeeded(self) -> None:
        if self.opened_at is not None:
            log.info("%s answers again; circuit closed", self.name)
        self.failures = 0
        self.opened_at = None
        self._probing = None

    def _failed(self) -> None:
        self.failures += 1
        self._probing = None
        if self.failures >= self.threshold:
            if self.opened_at is None:
                log.warning("%s failed %d times in a row; circuit open", self.name, self.failures)
            self.opened_at = time.monotonic()


#: Query values that need no percent-encoding (ids like ``img_a1b2c3`` and UUIDs).
_PLAIN = re.compile(r"[A-Za-z0-9_.~-]+")


def _with_plain_query(url: httpx.URL, params: dict[str, str]) -> httpx.URL | None:
    """``url`` with the query ``params``, when every value is plain (:data:`_PLAIN`), without
    httpx's parse and percent-encoding of the whole URL (20 us per miss); None otherwise (then
    httpx encodes them). The same URL either way; relies on httpx 0.28's ``URL``, which is
    pinned (a test compares the two)."""
    if not all(_PLAIN.fullmatch(value) for value in params.values()):
        return None
    query = "&".join(f"{name}={value}" for name, value in params.items())
    result = httpx.URL.__new__(httpx.URL)
    result._uri_reference = url._uri_reference._replace(query=query)
    return result


class Upstream:
    """The shared client, with the retry policy and the circuit breaker around it."""

    def __init__(self, config: Config, resolver: Resolver = resolve) -> None:
        self.config = config
        self.origin = httpx.URL(config.upstream_origin)
        self._artifact_url = self.origin.join(ARTIFACT_PATH)  # joined once: 25 us per miss
        self.breaker = CircuitBreaker(config.breaker_threshold, config.breaker_cooldown)
        self._resolver = resolver
        #: False from a failure to connect until the upstream answers again.
        self.up = True
        #: Passed-through requests and uncached artifact streams.
        self.passthrough_client = _client(config.upstream_origin, config.max_connections)
        #: Fills and access checks: a pool of their own (see :mod:`proxy.capacity`).
        self.artifact_client = _client(config.upstream_origin, config.artifact_connections)
        # Defaults suit passed-through traffic (long SSE streams, big uploads).
        self._passthrough_timeout = httpx.Timeout(
            connect=config.connect_timeout,
            read=config.passthrough_timeout,
            write=config.passthrough_timeout,
            pool=config.connect_timeout,
        ).as_dict()
        self._artifact_timeout = httpx.Timeout(
            connect=config.connect_timeout,
            read=config.read_timeout,
            write=config.read_timeout,
            pool=config.connect_timeout,
        ).as_dict()

    async def aclose(self) -> None:
        await self.passthrough_client.aclose()
        await self.artifact_client.aclose()

    def request(
        self,
        method: str,
        raw_target: bytes,
        headers: RawHeaders,
        content: AsyncIterator[bytes] | None = None,
    ) -> httpx.Request:
        """A request for ``raw_target`` (path and query, as raw bytes) with exactly ``headers``
        (plus ``Host`` and the body's framing, which httpx computes)."""
        url = self.origin.copy_with(raw_path=raw_target)
        return httpx.Request(
            method,
            url,
            headers=headers,
            content=content,
            extensions={"timeout": self._passthrough_timeout},
        )

    def artifact_request(self, key: ArtifactKey, authorization: str | None) -> httpx.Request:
        """``GET /v1/artifacts`` for ``key`` as the credential ``authorization``, uncompressed."""
        headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}
        if authorization is not None:
            headers["Authorization"] = authorization
        params = key.upstream_params()
        url = _with_plain_query(self._artifact_url, params)
        return httpx.Request(
            "GET",
            url or self._artifact_url,
            params=None if url else params,
            headers=headers,
            extensions={"timeout": self._artifact_timeout},
        )

    @property
    def offline(self) -> bool:
        """True while the upstream cannot be reached (last connect failed, or breaker open)."""
        return not self.up or self.breaker.state == "open"

    def _reached(self, up: bool) -> None:
        """Note whether the upstream could be connected to; log the transitions once."""
        if up != self.up:
            self.up = up
            if up:
                log.warning("the VLM Run API at %s is reachable again", self.origin)
            else:
                log.warning(
                    "the VLM Run API at %s is unreachable; serving cached artifacts to keys with "
                    "a recent proof",
                    self.origin,
                )

    async def _send_once(self, request: httpx.Request, *, artifact: bool) -> httpx.Response:
        # A client's body can be slow or cut on purpose: what happens to it is not a fault.
        counts = artifact or not _has_body(request)
        if not (self.breaker.admit() if counts else self.breaker.state == "closed"):
            raise UpstreamUnreachable("upstream unavailable (circuit open after repeated failures)")
        try:
            if artifact:
                with anyio.fail_after(self.config.first_byte_timeout):
                    response = await self._follow(request)
            else:
                response = await self.passthrough_client.send(request, stream=True)
        except (httpx.HTTPError, TimeoutError) as exc:
            if counts:
                self.breaker.record(exc)
            if unreachable(exc):
                self._reached(False)
            raise translate(exc) from exc
        except BaseException as exc:
            if counts:
                self.breaker.record(exc)  # e.g. a refused redirect: frees the probe
            raise
        if counts:  # a passed-through request's status is its own business, not a fault
            self.breaker.record(response.status_code if artifact else ANSWERED)
        self._reached(True)
        return response

    async def _follow(self, request: httpx.Request) -> httpx.Response:
        """Send an artifact request, following redirects the policy allows."""
        response = await self.artifact_client.send(request, stream=True)
        for _hop in range(MAX_REDIRECTS + 1):
            location = response.headers.get("location")
            if response.status_code not in REDIRECT_STATUSES or location is None:
                return response
            await response.aclose()
            try:
                target = request.url.join(location)
            except httpx.InvalidURL:
                raise RedirectRefused("upstream redirected to a malformed location") from None
            if not await allowed(target, self.origin, self._resolver):
                raise RedirectRefused("upstream redirected to a location the proxy does not follow")
            headers = [
                (name, value)
                for name, value in request.headers.raw
                if name.lower() != b"host"
                and (name.lower() != b"authorization" or same_origin(target, self.origin))
            ]
            request = httpx.Request("GET", target, headers=headers, extensions=request.extensions)
            try:
                response = await self.artifact_client.send(request, stream=True)
            except httpx.HTTPError as exc:  # the target's trouble, not the API's: no fault
                raise RedirectTargetFailed(
                    f"upstream redirected to a location that failed ({type(exc).__name__})"
                ) from exc
        await response.aclose()
        raise RedirectRefused(f"upstream redirected more than {MAX_REDIRECTS} times")

    async def send(
        self, request: httpx.Request, *, artifact: bool = False, retry: bool | None = None
    ) -> httpx.Response:
        """The response to ``request`` with its body unread; the caller closes it.

        Artifact requests are retried (unless ``retry`` is false), others only with ``retry``
        (an artifact streamed through uncached): before their first byte, on upstream faults
        only. Failures raise a :class:`ProxyError` (400 for a request that cannot be sent,
        502/503/504; :class:`UpstreamUnreachable` when offline).
        """
        retrying = artifact if retry is None else retry
        attempts = 1 + (self.config.retries if retrying else 0)
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
        self, request: httpx.Request, *, artifact: bool = False, retry: bool | None = None
    ) -> AsyncIterator[httpx.Response]:
        """:meth:`send` as a context manager that closes the response on exit."""
        response = await self.send(request, artifact=artifact, retry=retry)
        try:
            yield response
        finally:
            await response.aclose()


def _has_body(request: httpx.Request) -> bool:
    headers = request.headers
    return "transfer-encoding" in headers or headers.get("content-length", "0") != "0"


def _client(origin: str, connections: int) -> SharedClient:
    limits = httpx.Limits(
        max_connections=connections, max_keepalive_connections=min(32, connections)
    )
    return SharedClient(
        base_url=origin, follow_redirects=False, trust_env=False, transport=transport(limits)
    )


def response_headers(
    headers: Iterable[tuple[bytes, bytes]], drop: Iterable[bytes] = ()
) -> RawHeaders:
    """An upstream answer's headers as a client gets them: end to end only, ``Content-Type``
    spelled exactly, and no ``Date`` (the server adds its own: one ``Date`` per answer)."""
    return for_client(end_to_end(headers, drop=(b"date", *drop)))


class Answer:
    """A complete, small upstream answer kept in memory so it can be replayed verbatim."""

    def __init__(self, status: int, headers: RawHeaders, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lowercase), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return None


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
    headers = response_headers(response.headers.raw, drop=(b"content-length",))
    headers.append((b"Content-Length", str(len(body)).encode()))
    return Answer(response.status_code, headers, bytes(body))
