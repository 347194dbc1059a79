"""Small entries committed in batches: the commits of many small misses share one hold of the
commit lock and one transaction.

A small fill (:data:`proxy.store.VERIFIED_WHOLE` bytes at most) is written and committed in
one commit-thread call. Alone, a 1 KiB entry's call cost about 240 us of CPU on this machine:
its file (created, locked, written, renamed) and its index row, but also, once per call, the
room check, the commit lock's ``flock`` and the transaction's locks and WAL frames. In batches
of 32 it cost about 117 us (a scratch measure of the store alone). Under a stream of misses
those commits are a fifth of the process's CPU (``bench/misses.py``).

One batch runs at a time, on a commit thread (:func:`proxy.threads.run_commit`); the commits
asked for meanwhile wait and go together in the next one. A commit alone (no other waiting)
goes at once, as before: a batch never waits to fill up. Each caller gets its own entry's
outcome, whatever happened to the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import anyio

from proxy.store import EntryMeta, Store, write_entries
from proxy.threads import run_commit

#: Entries at most in one batch: how long one batch holds the commit lock grows with it.
BATCH = 32

#: An entry's metadata, and None once stored, else why not (see :func:`write_entries`).
_Outcome = tuple[EntryMeta, "str | OSError | None"]
_Item = tuple[str, bytes, Callable[[], EntryMeta], "asyncio.Future[_Outcome]"]


class Batches:
    """Whole small bodies written to ``store`` and committed in batches (see above)."""

    def __init__(self, store: Store, min_free_space: int) -> None:
        self._store = store
        self._min_free_space = min_free_space
        self._queue: list[_Item] = []
        self._draining: asyncio.Task[None] | None = None

    async def write(self, key: str, body: bytes, meta_of: Callable[[], EntryMeta]) -> _Outcome:
        """Store ``body`` under ``key``, with the metadata ``meta_of()`` makes (on the commit
        thread: it may hash the body). Returns that metadata, and None once stored, else why
        not, as :func:`proxy.store.write_entries` says. Shielded as one call: a cancelled
        caller's entry is still committed (or dropped), and the caller waits for it."""
        future: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        self._queue.append((key, body, meta_of, future))
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain())
        with anyio.CancelScope(shield=True):
            outcome = await future
        return outcome

    async def aclose(self) -> None:
        """Wait until every commit asked for so far is done (or failed)."""
        while self._draining is not None:
            await asyncio.gather(self._draining, return_exceptions=True)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:BATCH], self._queue[BATCH:]
                try:
                    outcomes = await run_commit(self._commit, batch)
                except Exception as exc:  # not one entry's failure: the whole batch's
                    for *_, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                except BaseException:
                    for *_, future in batch + self._queue:
                        future.cancel()
                    self._queue = []
                    raise
                for (*_, future), outcome in zip(batch, outcomes, strict=True):
                    if not future.done():
                        future.set_result(outcome)
        finally:
            self._draining = None

    def _commit(self, batch: list[_Item]) -> list[_Outcome]:
        """Blocks."""
        metas = [meta_of() for _, _, meta_of, _ in batch]
        items = [(key, body, meta) for (key, body, _, _), meta in zip(batch, metas, strict=True)]
        failures = write_entries(self._store, items, self._min_free_space)
        return list(zip(metas, failures, strict=True))
