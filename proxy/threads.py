"""Blocking calls off the event loop: the store's, the index's, the file system's.

:func:`run_sync` does what ``anyio.to_thread.run_sync`` does for us, at a fraction of its cost:
on this machine a hop through anyio costs about 29 us of CPU (a capacity limiter, a cancel scope
and run-variable lookups per call), one through a plain executor about 9 us alone and 18 us
with eight in flight, one through :class:`Pool` 5 us with eight in flight. A miss makes two
hops (its lookup, its commit), so this is part of what a miss costs beside a bare forwarder
(bench/misses.py).

The semantics the callers rely on are kept: a caller whose cancel scope is cancelled while its
call runs still waits for the call and gets its result before the cancellation reaches it (a
cancelled fill never discards a temporary file that a commit is still renaming, nor loses the
open file that ``begin_fill`` returned). Calls run in a pool of :data:`THREADS` threads of their
own, apart from the anyio limiter that Starlette uses.

Commits go through :func:`run_commit`, on two threads of their own. They run one at a time
under the commit lock anyway, which another process (a worker making room) may hold for a
while: in the shared pool, ``max_fills`` commits (64) waiting so would take all 40 threads,
and every lookup, disk read of a hit and start of a fill would queue behind them. Two threads
rather than eight: fewer threads woken only to wait for the lock, and fewer SQLite connections
rereading the pages another one changed. In ``bench/misses.py``-style runs (1 KiB misses, 32
connections, alternating rounds), one commit thread made 630 misses/s where eight made 534,
ahead in all 10 rounds; one, two and four made 646, 621 and 645/s (8 rounds), within the
noise. Small fills commit in batches, one batch at a time (:mod:`proxy.store.batches`), each
writing its files before it takes the lock: the second thread serves a large fill's commit
(or a backfill's) meanwhile, which on a file system with slow metadata may take a while.

A large entry's fsync runs before, in a pool of :data:`FLUSH_THREADS` of its own
(:func:`run_flush`, called by :func:`proxy.store.commit`), so fsyncs still overlap and the
commit threads never wait on a disk flush; so does the eviction that makes room for it, whose
file deletions (many small files, or large ones) would otherwise hold up every other commit.
Not in the shared pool: on a slow disk, ``max_fills`` fsyncs would take all of its threads,
and every hit would wait for the disk to catch up (``tests/test_threads.py`` has both).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

#: Threads at most (anyio's default limiter has 40 tokens, which this replaces for the store).
THREADS = 40
#: Threads for commits, besides those (see above).
COMMIT_THREADS = 2
#: Threads for the fsyncs of large entries before their commit (and the room made for them).
FLUSH_THREADS = 8

_Call = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class Pool:
    """Up to ``size`` threads, started as needed, taking calls from one queue; each call's
    result goes back to its caller's event loop in one ``call_soon_threadsafe``.

    What ``concurrent.futures.ThreadPoolExecutor`` and ``asyncio.wrap_future`` do together,
    for a fraction of the event loop's time: no executor future (and its ``Condition``), no
    shutdown locks per call, no callbacks chained both ways. With eight calls in flight a
    hop cost the event loop about 5 us against 18 us (a scratch measure, uvloop, one core);
    a miss makes two. A call whose caller was cancelled before it started is skipped, as an
    executor skips a cancelled future. Threads are daemons; at exit the interpreter waits
    for the calls under way and queued (see :meth:`join`), as it waits for an executor's."""

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        func: Callable[..., Any],
        args: tuple[Any, ...],
    ) -> None:
        self._calls.put((loop, future, func, args))
        if self._idle.acquire(timeout=0):  # an idle thread will take it
            return
        with self._lock:
            if len(self._threads) < self._size:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def _work(self) -> None:
        calls = self._calls
        while (call := calls.get()) is not None:
            loop, future, func, args = call
            del call
            if not future.cancelled():  # read across threads: at worst the call runs anyway
                try:
                    result = func(*args)
                except BaseException as exc:
                    _reply(loop, _fail, future, exc)
                else:
                    _reply(loop, _succeed, future, result)
                    del result  # the caller's alone: not kept alive while this thread idles
            del loop, future, func, args
            self._idle.release()

    def join(self) -> None:
        """Stop the threads once the calls queued so far are done."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._calls.put(None)
        for thread in threads:
            thread.join()


def _reply(
    loop: asyncio.AbstractEventLoop,
    deliver: Callable[[asyncio.Future[Any], Any], None],
    future: asyncio.Future[Any],
    outcome: object,
) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed (at exit): no one waits
        loop.call_soon_threadsafe(deliver, future, outcome)


def _succeed(future: asyncio.Future[Any], result: object) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


_pool = Pool(THREADS, "proxy-io")
_commits = Pool(COMMIT_THREADS, "proxy-commit")
_flushes = Pool(FLUSH_THREADS, "proxy-flush")


def _join_all() -> None:
    for pool in (_pool, _flushes, _commits):
        pool.join()


# Before the interpreter joins its non-daemon threads, as concurrent.futures registers its own.
threading._register_atexit(_join_all)  # type: ignore[attr-defined]


async def run_sync(func: Callable[..., T], *args: object) -> T:
    """``func(*args)`` in a worker thread; its result, or its exception."""
    return await _run(_pool, func, args)


async def run_commit(func: Callable[..., T], *args: object) -> T:
    """:func:`run_sync` for a call that commits to the store (it may wait on other processes)."""
    return await _run(_commits, func, args)


async def run_flush(func: Callable[..., T], *args: object) -> T:
    """:func:`run_sync` for a call that waits on the disk (an fsync)."""
    return await _run(_flushes, func, args)


async def _run(pool: Pool, func: Callable[..., T], args: tuple[object, ...]) -> T:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    pool.submit(loop, future, func, args)
    # Shielded as anyio shields its own: the caller gets the result (an open file, say) even
    # if its scope was cancelled meanwhile, and hears of the cancellation at its next await.
    with anyio.CancelScope(shield=True):
        result = await future
    return result
