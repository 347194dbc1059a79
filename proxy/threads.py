"""Blocking calls off the event loop: the store's, the index's, the file system's.

:func:`run_sync` does what ``anyio.to_thread.run_sync`` does for us, at a third of its cost: on
this machine a hop through anyio costs about 29 us of CPU (a capacity limiter, a cancel scope
and run-variable lookups per call), one through a plain executor about 9 us. A miss makes
several hops (lookup, claim, temporary file, write, commit, access proof), so this is part of
what a miss costs beside a bare forwarder (bench/misses.py).

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
noise. Two rather than one: a small miss's commit writes its file there (created, written,
then renamed under the lock), and on a file system with slow metadata one commit can create
its file, or delete what an eviction made room from, while the other holds the lock.

A large entry's fsync runs before, in a pool of :data:`FLUSH_THREADS` of its own
(:func:`run_flush`, called by :func:`proxy.store.commit`), so fsyncs still overlap and the
commit threads never wait on a disk flush; so does the eviction that makes room for it, whose
file deletions (many small files, or large ones) would otherwise hold up every other commit.
Not in the shared pool: on a slow disk, ``max_fills`` fsyncs would take all of its threads,
and every hit would wait for the disk to catch up (``tests/test_threads.py`` has both).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

import anyio

T = TypeVar("T")

#: Threads at most (anyio's default limiter has 40 tokens, which this replaces for the store).
THREADS = 40
#: Threads for commits, besides those (see above).
COMMIT_THREADS = 2
#: Threads for the fsyncs of large entries before their commit (and the room made for them).
FLUSH_THREADS = 8

_pool = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="proxy-io")
_commits = concurrent.futures.ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="proxy-commit")
_flushes = concurrent.futures.ThreadPoolExecutor(FLUSH_THREADS, thread_name_prefix="proxy-flush")


async def run_sync(func: Callable[..., T], *args: object) -> T:
    """``func(*args)`` in a worker thread; its result, or its exception."""
    return await _run(_pool, func, args)


async def run_commit(func: Callable[..., T], *args: object) -> T:
    """:func:`run_sync` for a call that commits to the store (it may wait on other processes)."""
    return await _run(_commits, func, args)


async def run_flush(func: Callable[..., T], *args: object) -> T:
    """:func:`run_sync` for a call that waits on the disk (an fsync)."""
    return await _run(_flushes, func, args)


async def _run(
    pool: concurrent.futures.ThreadPoolExecutor, func: Callable[..., T], args: tuple[object, ...]
) -> T:
    future = pool.submit(func, *args)
    # Shielded as anyio shields its own: the caller gets the result (an open file, say) even
    # if its scope was cancelled meanwhile, and hears of the cancellation at its next await.
    with anyio.CancelScope(shield=True):
        result = await asyncio.wrap_future(future)
    return result
