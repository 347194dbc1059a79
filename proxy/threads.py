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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

import anyio

T = TypeVar("T")

#: Threads at most (anyio's default limiter has 40 tokens, which this replaces for the store):
#: a commit may wait for the commit lock for a while, and lookups must not queue behind it.
THREADS = 40

_pool = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="proxy-io")


async def run_sync(func: Callable[..., T], *args: object) -> T:
    """``func(*args)`` in a worker thread; its result, or its exception."""
    future = _pool.submit(func, *args)
    # Shielded as anyio shields its own: the caller gets the result (an open file, say) even
    # if its scope was cancelled meanwhile, and hears of the cancellation at its next await.
    with anyio.CancelScope(shield=True):
        result = await asyncio.wrap_future(future)
    return result
