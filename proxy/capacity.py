"""The capacity model: what one credential may hold of what every user shares.

Shared resources, and who may use them (settings in brackets, defaults in the README):

* **Upstream connections** come from two pools. Fills and access checks use their own
  (``artifact_connections``); passed-through requests and uncached artifact streams use the other
  (``max_connections``). A hundred slow uploads can exhaust the second, never the first: misses
  keep being fetched.
* **Fill slots** (``max_fills``): fetches that are being cached. One credential may run at most
  ``max_fills_per_key`` of them; its further misses stream through uncached.
* **Passed-through requests** (and uncached artifact streams): at most ``max_passthrough_per_key``
  per credential at once; beyond that the credential gets a 429 with ``Retry-After``.
* **Waiters** (clients following another request's fill): at most ``max_waiters`` per fill, and at
  most ``max_waiters_per_key`` per credential across fills; beyond that, a 429.
* **Fill deadlines** (``fill_timeout``, ``fill_min_rate`` over ``fill_rate_window``): a fill that
  drips slower than that, or runs longer, is abandoned like a cut body, so a slow upstream answer
  cannot hold a slot for ever.

Requests without ``Authorization`` share one credential's allowance. Counting happens on the
event loop only, so plain dicts suffice.
"""

from __future__ import annotations

from collections import deque

from proxy.errors import TooManyRequests

#: The allowance shared by requests without a credential.
ANONYMOUS = "-"


class PerKey:
    """Concurrent holdings per credential fingerprint, at most ``limit`` each."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self._what = what
        self._held: dict[str, int] = {}

    def held(self, fingerprint: str | None) -> int:
        return self._held.get(fingerprint or ANONYMOUS, 0)

    def full(self, fingerprint: str | None) -> bool:
        return self.held(fingerprint) >= self.limit

    def acquire(self, fingerprint: str | None) -> None:
        """Take one, or raise :class:`TooManyRequests` (429) when the credential holds all."""
        if self.full(fingerprint):
            raise TooManyRequests(f"too many {self._what} at once for this API key; retry")
        key = fingerprint or ANONYMOUS
        self._held[key] = self._held.get(key, 0) + 1

    def release(self, fingerprint: str | None) -> None:
        key = fingerprint or ANONYMOUS
        left = self._held.get(key, 0) - 1
        if left > 0:
            self._held[key] = left
        else:
            self._held.pop(key, None)


class RateFloor:
    """Whether a transfer keeps up at least ``min_rate`` bytes/s over the last ``window`` s.

    Fed the running byte count with a timestamp; judged only once a whole window has passed.
    """

    def __init__(self, min_rate: float, window: float, started: float) -> None:
        self.min_rate = min_rate
        self.window = window
        self._samples: deque[tuple[float, int]] = deque([(started, 0)])

    def too_slow(self, now: float, total: int) -> bool:
        samples = self._samples
        samples.append((now, total))
        # Keep the newest sample at least a window old, and everything after it.
        while len(samples) > 1 and samples[1][0] <= now - self.window:
            samples.popleft()
        then, before = samples[0]
        if now - then < self.window:
            return False
        return (total - before) < self.min_rate * (now - then)
