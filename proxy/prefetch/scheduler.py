"""Which referenced artifacts get fetched, when, and with whose key.

A reference found in an answer (see :mod:`proxy.prefetch.scan`) becomes a :class:`Job`: the key
it names and the ``Authorization`` of the request that answer was for. Nobody else's credential
is ever used: the API decides, as for any fetch, whether that requester may read the artifact,
and its answer records proofs for that requester only. The credential stays in this process's
memory (in the job, then in the fill's task) and nowhere else.

A job starts as an ordinary single-flight fill (:meth:`proxy.fills.Fills.start` with
``prefetch=True``), so a client asking meanwhile joins it, and the cross-process claim and the
store check apply as for a client's miss. Limits, all enforced here on the event loop:

* at most ``prefetch_concurrency`` prefetches at once, ``prefetch_per_key`` per credential; they
  do not count against ``max_fills``, the room kept for clients;
* a queue of :data:`QUEUE_LIMIT` jobs, :data:`QUEUE_PER_KEY` per credential; when full, the
  oldest job goes (``dropped``);
* nothing while the upstream is unreachable or its breaker is not closed (``dropped``);
* a refusal (401/403/404) is remembered for that (credential, key) for :data:`REFUSAL_SECONDS`
  and not asked again; a 429 pauses every prefetch of that credential until its
  ``Retry-After``;
* one attempt: a 5xx is not retried (``error``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import functools
import logging
import time
from collections import deque
from collections.abc import Callable

import anyio
import anyio.to_thread

from proxy.access import AccessProofs
from proxy.accesslog import Record
from proxy.capacity import PerKey
from proxy.config import Config
from proxy.fill import Fill
from proxy.fills import Fills
from proxy.keys import ArtifactKey, ScopeKind
from proxy.metrics import Metrics
from proxy.store import EntryMeta, Store
from proxy.threads import run_sync
from proxy.upstream import Upstream

log = logging.getLogger(__name__)

#: Jobs waiting at most, and per credential; beyond that the oldest is dropped.
QUEUE_LIMIT = 256
QUEUE_PER_KEY = 32
#: How long a refused (credential, key) is not asked again.
REFUSAL_SECONDS = 600.0
#: Statuses that mean "this credential may not read this": remembered, never retried.
REFUSALS = frozenset({401, 403, 404})
#: Pause after a 429 without a usable ``Retry-After``, and the longest pause honoured.
DEFAULT_PAUSE = 60.0
MAX_PAUSE = 3600.0
#: Refusals and pauses remembered at most (expired ones go first, then the oldest).
MEMORY_LIMIT = 10_000
#: Prefetched keys whose first read this process already counted.
READS_REMEMBERED = 10_000

#: What the access log is given for each prefetch (see :mod:`proxy.accesslog`).
LogRecord = Callable[[Record], None]


@dataclasses.dataclass(frozen=True)
class Job:
    key: ArtifactKey
    #: The requester's own ``Authorization``; memory only.
    authorization: str = dataclasses.field(repr=False)
    fingerprint: str


class _Expiring:
    """A bounded map of names to deadlines (``time.monotonic()``)."""

    def __init__(self) -> None:
        self._until: dict[object, float] = {}

    def active(self, name: object) -> bool:
        until = self._until.get(name)
        if until is None:
            return False
        if until <= time.monotonic():
            del self._until[name]
            return False
        return True

    def set(self, name: object, seconds: float) -> None:
        if len(self._until) >= MEMORY_LIMIT:
            now = time.monotonic()
            self._until = {k: v for k, v in self._until.items() if v > now}
            while len(self._until) >= MEMORY_LIMIT:
                del self._until[next(iter(self._until))]
        self._until.pop(name, None)  # re-inserted last: the newest goes last
        self._until[name] = time.monotonic() + seconds


class Prefetcher:
    """The queue and the limits; :meth:`submit` is what a scanner calls."""

    def __init__(
        self,
        config: Config,
        fills: Fills,
        store: Store,
        access: AccessProofs,
        upstream: Upstream,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._fills = fills
        self._store = store
        self._access = access
        self._upstream = upstream
        self._metrics = metrics
        self._queue: deque[Job] = deque()
        self._queued = PerKey(QUEUE_PER_KEY, "queued prefetches")
        self._running = 0
        self._per_key = PerKey(config.prefetch_per_key, "prefetches")
        self._refused = _Expiring()
        self._paused = _Expiring()
        self._counted_reads: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Large JSON answers are parsed in a worker thread, one at a time: a flood of them
        #: takes neither the threads that disk reads need nor more than one core.
        self.scan_limiter = anyio.CapacityLimiter(1)
        #: Set by the app when the access log is on.
        self.access_log: LogRecord | None = None
        self._closed = False

    def close(self) -> None:
        """Shutting down: forget the queue and start nothing more (running prefetches are the
        fills' to finish or cancel)."""
        self._closed = True
        self._queue.clear()

    def _count(self, result: str) -> None:
        self._metrics.prefetches.labels(result).inc()

    # -- intake -------------------------------------------------------------------------------

    def submit(
        self, authorization: str, fingerprint: str, kind: str, scope_id: str, object_id: str
    ) -> None:
        """Queue a prefetch of ``object_id`` in that scope for this requester. Never raises."""
        if self._closed:
            return
        scope_kind: ScopeKind = "execution" if kind == "execution" else "session"
        key = ArtifactKey(scope_kind, scope_id, object_id)
        if self._skipped(key, fingerprint):
            return
        if any(job.key == key and job.fingerprint == fingerprint for job in self._queue):
            self._count("already_cached")
            return
        if self._queued.full(fingerprint):  # this credential's oldest makes room
            self._drop(next(job for job in self._queue if job.fingerprint == fingerprint))
        elif len(self._queue) >= QUEUE_LIMIT:
            self._drop(self._queue[0])
        self._queue.append(Job(key, authorization, fingerprint))
        self._queued.acquire(fingerprint)
        self._pump()

    def _drop(self, job: Job) -> None:
        self._queue.remove(job)
        self._queued.release(job.fingerprint)
        self._count("dropped")

    def _skipped(self, key: ArtifactKey, fingerprint: str) -> bool:
        """Count and say so if this prefetch is not to be made now (checked at submission and
        again at start)."""
        if self._paused.active(fingerprint):
            self._count("rate_limited")
        elif self._refused.active((fingerprint, key)):
            self._count("refused")
        elif self._upstream.offline or self._upstream.breaker.state != "closed":
            self._count("dropped")
        else:
            return False
        return True

    # -- running ------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Start queued jobs, oldest first, while there is room (theirs and their key's)."""
        index = 0
        while (
            not self._closed
            and index < len(self._queue)
            and self._running < self._config.prefetch_concurrency
        ):
            job = self._queue[index]
            if self._per_key.full(job.fingerprint):
                index += 1
                continue
            del self._queue[index]
            self._queued.release(job.fingerprint)
            self._launch(job)

    def _launch(self, job: Job) -> None:
        if self._skipped(job.key, job.fingerprint):
            return
        key = job.key
        if self._access.is_split(key.scope_kind, key.scope_id):
            key = key.owned_by(job.fingerprint)
        if self._fills.get(key) is not None or self._store.remembers(key.cache_key, 2**62):
            self._count("already_cached")
            return
        if self._fills.uncacheable(key):
            self._count("too_large")
            return
        self._running += 1
        self._per_key.acquire(job.fingerprint)
        done = functools.partial(self._finished, job, time.perf_counter())
        fill = self._fills.start(
            key, job.authorization, job.fingerprint, prefetch=True, on_done=done
        )
        fill.on_adopt = functools.partial(self._free, job)

    def _free(self, job: Job) -> None:
        """The job's fill ended, or a client took it over: its slot goes to the next job."""
        self._running -= 1
        self._per_key.release(job.fingerprint)
        self._pump()

    def _finished(self, job: Job, started: float, fill: Fill) -> None:
        """Called by the fill as it ends, before its readers hear of it. The job's slot is
        given back whatever happens here: a slot kept by mistake is never found again."""
        try:
            result = self._result(job, fill)  # before the next job starts: it may be refused
            self._count(result)
            if result != "already_cached" and self.access_log is not None:
                self._log(fill, started)
        finally:
            if not fill.adopted:
                fill.on_adopt = None
                self._free(job)

    def _result(self, job: Job, fill: Fill) -> str:
        status = fill.status
        if fill.from_store or fill.following:  # another process stored or fetched it
            return "already_cached"
        if fill.complete and not fill.disk_failed:
            return "fetched"
        if fill.abandoned == "too_large":
            return "too_large"
        if status in REFUSALS:
            self._refused.set((job.fingerprint, job.key), REFUSAL_SECONDS)
            return "refused"
        if status == 429:
            retry_after = fill.answer.header(b"retry-after") if fill.answer else None
            self._paused.set(job.fingerprint, _pause(retry_after))
            return "rate_limited"
        return "error"

    def _log(self, fill: Fill, started: float) -> None:
        assert self.access_log is not None
        key = fill.key
        self.access_log(
            (
                "PREFETCH",
                b"/v1/artifacts",
                True,
                key.scope_kind,
                key.scope_id,
                key.object_id,
                fill.status or 0,
                b"PREFETCH",
                fill.written,
                fill.complete,
                False,
                started,
                time.perf_counter(),
            )
        )

    # -- reads of prefetched entries ----------------------------------------------------------

    def first_read(self, cache_key: str, meta: EntryMeta) -> None:
        """A client was served a hit of an entry stored by a prefetch: mark it read (it leaves
        the cold end of the LRU) and count the first such read, in any process, once."""
        if not meta.prefetched or cache_key in self._counted_reads:
            return
        if len(self._counted_reads) >= READS_REMEMBERED:
            self._counted_reads.clear()
        self._counted_reads.add(cache_key)
        task = asyncio.create_task(self._mark_read(cache_key, meta))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mark_read(self, cache_key: str, meta: EntryMeta) -> None:
        if await run_sync(self._store.first_read, cache_key, meta):
            self._metrics.prefetch_hits.inc()


def _pause(retry_after: str | None) -> float:
    """Seconds to wait from a ``Retry-After`` (seconds or an HTTP date), within bounds."""
    if retry_after is None:
        return DEFAULT_PAUSE
    value = retry_after.strip()
    seconds: float | None = None
    if value.isascii() and value.isdigit():  # "²" is a digit to isdigit, not to float
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            when = None
        if when is not None and when.tzinfo is not None:
            seconds = when.timestamp() - time.time()
    if seconds is None:
        return DEFAULT_PAUSE
    return min(max(seconds, 1.0), MAX_PAUSE)
