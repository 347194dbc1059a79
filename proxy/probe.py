"""One quick ``GET {upstream}/v1/health`` without credentials: does the API answer, how fast.

Used by ``serve``'s start-up lines (in a background thread) and by ``doctor``. The request
carries no ``Authorization`` (a user name and password in the ``upstream`` URL are dropped too),
so an answer of 401 or 403 still means the API is there. Nothing printed from here contains a
credential: URLs are shown without their user information.
"""

from __future__ import annotations

import dataclasses
import time

import httpx

from proxy import __version__
from proxy.config import redact_url

HEALTH_PATH = "/v1/health"
#: Statuses that show the API is there: fine, or refusing a request that has no key.
_ANSWERS_WITHOUT_A_KEY = frozenset({401, 403})


def display_url(url: str) -> str:
    """``url`` without a user name or password (user info, or ``password=`` in the query, which
    redis-py reads too), for messages. Never raises, even for a URL that does not parse: a raw
    password holding ``/`` or ``#`` must not reach a message through an exception's text."""
    shown = redact_url(url)
    scheme, separator, rest = shown.partition("://")
    if separator and "@" in rest:
        return f"{scheme}://{rest.rpartition('@')[2]}"
    return shown


@dataclasses.dataclass(frozen=True)
class HealthAnswer:
    """What ``GET /v1/health`` got: a status and its time, or the reason there was none."""

    url: str
    status: int | None = None
    #: Milliseconds from sending the request to reading the whole answer.
    ms: float | None = None
    error: str | None = None

    @property
    def reachable(self) -> bool:
        """The API answered as an API does: 2xx, or a refusal for want of a key."""
        return self.status is not None and (
            200 <= self.status < 300 or self.status in _ANSWERS_WITHOUT_A_KEY
        )

    def describe(self) -> str:
        """``reachable in 87 ms``, ``answered 503 in 12 ms`` or ``unreachable (reason)``."""
        if self.status is None:
            return f"unreachable ({self.error})"
        if self.reachable:
            return f"reachable in {self.ms:.0f} ms"
        return f"answered {self.status} in {self.ms:.0f} ms"


def check_upstream(origin: str, timeout: float = 2.0) -> HealthAnswer:
    """GET ``{origin}/v1/health``, no credentials, at most ``timeout`` seconds per phase.

    Like the proxy's own client it ignores proxy environment variables and follows no
    redirect. Never raises for a network failure: the answer says what happened.
    """
    url = httpx.URL(origin.rstrip("/") + HEALTH_PATH).copy_with(userinfo=b"")
    shown = str(url)
    started = time.perf_counter()
    try:
        with httpx.Client(trust_env=False, timeout=timeout, follow_redirects=False) as client:
            response = client.get(url, headers={"User-Agent": f"vlmrun-cache/{__version__}"})
    except httpx.TimeoutException:
        return HealthAnswer(shown, error=f"no answer within {timeout:g} s")
    except httpx.HTTPError as exc:
        return HealthAnswer(shown, error=str(exc) or type(exc).__name__)
    ms = (time.perf_counter() - started) * 1000
    return HealthAnswer(shown, status=response.status_code, ms=ms)
