"""The connection to Redis for the shared tier: one guarded call at a time.

Redis is optional at run time, so every call goes through :class:`Guarded`: it is bounded by
``redis_timeout`` (redis-py retries a call only once, at once, when its pooled connection turned
out closed; never after a timeout: a cache must not wait for Redis), counted by a
circuit breaker (:class:`proxy.upstream.CircuitBreaker` with :func:`redis_fault`: only Redis's own
faults count, never a reply to a command we got wrong), and any failure is :class:`Unavailable`,
which callers treat as "carry on without the shared tier". While the breaker is open no call is
made at all (one probe per cool-down), so a dead or stopped Redis costs a request at most one
``redis_timeout`` per breaker period.

redis-py 5 or later is required: before 4.5.4 a cancelled command could leave a connection one
reply behind, handing one caller another's reply (CVE-2023-28858/28859), and Starlette cancels
request tasks when clients disconnect.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.config import Config
from proxy.upstream import ANSWERED, CircuitBreaker

#: Either client; both take the same commands for single-slot work.
Client = Redis | RedisCluster

_FAULTS = (
    redis.exceptions.ConnectionError,  # refused, reset, lost; also BusyLoadingError
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    OSError,
    TimeoutError,  # our own deadline around the call
)


def _lost_transport(exc: RuntimeError) -> bool:
    """uvloop's error for a write to a transport whose connection was just lost (Redis gone
    between redis-py's connect and its first command): a lost connection like any other."""
    return "handler is closed" in str(exc)


class Unavailable(Exception):
    """A Redis call failed or was not made (breaker open): go on without the shared tier."""


def redis_fault(failure: BaseException | int) -> bool:
    """What counts against Redis for its breaker: it could not be reached or did not answer in
    time. Error replies (a wrong type at a key someone overwrote, say) are not its fault."""
    return not isinstance(failure, int) and isinstance(failure, _FAULTS)


def read_password(config: Config) -> str | None:
    """The password in ``redis_password_file``, if set (kept out of URLs, so out of logs)."""
    if not config.redis_password_file:
        return None
    with open(config.redis_password_file, encoding="utf-8") as source:
        return source.read().strip() or None


def connect(config: Config, timeout: float | None = None) -> Client:
    """A client for ``redis_url``; it connects on first use, so a Redis that is down at
    start-up delays nothing."""
    seconds = config.redis_timeout if timeout is None else timeout
    options: dict[str, Any] = {
        "socket_timeout": seconds,
        "socket_connect_timeout": seconds,
        # One immediate retry on a lost connection only (a pooled connection that a Redis
        # restart closed fails once, then reconnects); never on a timeout.
        "retry": Retry(NoBackoff(), 1, (redis.exceptions.ConnectionError,)),
        "retry_on_error": [redis.exceptions.ConnectionError],
        "health_check_interval": 0,
    }
    password = read_password(config)
    if password is not None:
        options["password"] = password
    if config.redis_cluster:
        return RedisCluster.from_url(config.redis_url, **options)
    return Redis.from_url(config.redis_url, retry_on_timeout=False, **options)


#: Longest a bulk call (a piece of a body being streamed or uploaded) may take at least: a
#: transfer already under way is cut only when Redis is really stuck, not when this process's
#: event loop was busy for a moment.
BULK_TIMEOUT = 1.0


def guarded(
    config: Config,
    on_error: Callable[[str], None] = lambda _kind: None,
    timeout: float | None = None,
) -> Guarded:
    """The guarded connection the shared tier uses: lookups within ``redis_timeout`` (or
    ``timeout``), bulk transfers within :data:`BULK_TIMEOUT`, one breaker for both."""
    quick = config.redis_timeout if timeout is None else timeout
    slow = max(quick, BULK_TIMEOUT)
    return Guarded(
        connect(config, quick),
        quick,
        config.redis_breaker_threshold,
        config.redis_breaker_cooldown,
        on_error,
        bulk=(connect(config, slow), slow),
    )


class Guarded:
    """Calls on ``client`` within a deadline, counted by a breaker; see the module docstring.

    ``bulk`` is a second client and its timeout, for calls that move a piece of a body.
    ``on_error`` is told ``"unavailable"`` (a fault) or ``"other"`` (an error reply)."""

    def __init__(
        self,
        client: Client,
        timeout: float,
        threshold: int,
        cooldown: float,
        on_error: Callable[[str], None] = lambda _kind: None,
        bulk: tuple[Client, float] | None = None,
    ) -> None:
        self.client = client
        #: Connect plus reply, each bounded by the socket timeouts; this is the backstop.
        self.deadline = 2 * timeout
        self.bulk_client, bulk_timeout = bulk if bulk is not None else (client, timeout)
        self.bulk_deadline = 2 * bulk_timeout
        self.breaker = CircuitBreaker(threshold, cooldown, redis_fault, "redis")
        self._on_error = on_error

    async def __call__(self, op: Callable[[Client], Awaitable[Any]], bulk: bool = False) -> Any:
        """``op(client)``'s result (replies are bytes: the clients do not decode); with
        ``bulk``, on the bulk client and within its longer deadline."""
        if not self.breaker.admit():
            raise Unavailable("the Redis circuit breaker is open")
        client = self.bulk_client if bulk else self.client
        try:
            with anyio.fail_after(self.bulk_deadline if bulk else self.deadline):
                try:
                    result = await op(client)
                except RuntimeError as exc:
                    if not _lost_transport(exc):
                        raise
                    raise redis.exceptions.ConnectionError(str(exc)) from exc
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            self.breaker.record(exc)
            self._on_error("unavailable" if redis_fault(exc) else "other")
            raise Unavailable(f"{type(exc).__name__}: {exc}") from exc
        self.breaker.record(ANSWERED)
        return result

    async def aclose(self) -> None:
        await self.client.aclose()
        if self.bulk_client is not self.client:
            await self.bulk_client.aclose()
