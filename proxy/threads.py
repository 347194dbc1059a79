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

Commits go through :func:`run_commit`, a pool of :data:`COMMIT_THREADS` of their own: a commit
waits for an fsync and for the commit lock, which another process (a worker making room) may
hold for a while. In the shared pool, ``max_fills`` commits (64) waiting so would take all 40
threads, and every lookup, disk read of a hit and start of a fill would queue behind them.
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
#: Threads for commits, besides those: they run one at a time under the commit lock anyway,
#: and this many still overlap their fsyncs.
COMMIT_THREADS = 8

_pool = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="proxy-io")
_commits = concurrent.futures.ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="proxy-commit")


async def run_sync(func: Callable[..., T], *args: object) -> T:
    """``func(*args)`` in a worker thread; its result, or its exception."""
    return await _run(_pool, func, args)


async def run_commit(func: Callable[..., T], *args: object) -> T:
    """:func:`run_sync` for a call that commits to the store (it may wait on other processes)."""
    return await _run(_commits, func, args)


async def _run(
    pool: concurrent.futures.ThreadPoolExecutor, func: Callable[..., T], args: tuple[object, ...]
) -> T:
    future = pool.submit(func, *args)
    # Shielded as anyio shields its own: the caller gets the result (an open file, say) even
    # if its scope was cancelled meanwhile, and hears of the cancellation at its next await.
    with anyio.CancelScope(shield=True):
        result = await asyncio.wrap_future(future)
    return result
