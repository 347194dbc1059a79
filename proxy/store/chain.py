"""The tier chain: where the route looks a key up. Memory, then disk, then Redis, backfilling.

The contract the route relies on (every tier):

* ``await lookup(key)`` returns a :class:`Hit` or ``None`` (a miss is never an exception). An
  entry whose bytes do not match its metadata is a miss: the tier evicts it and counts it.
* A :class:`Hit` carries the entry's metadata, the name of the tier that answered (for
  ``X-Cache``/``Cache-Status``, the ``tier`` metric label and the access log), and either its
  whole body, already verified (small entries), or a way to stream it: :meth:`Hit.chunks` yields
  the bytes of a span, hashing a whole-body read as it goes and raising :class:`Corrupt` instead
  of yielding the last chunk if the digest does not match. No file descriptor leaves the tier:
  the caller only calls :meth:`Hit.close` (idempotent) when done.
* ``await evict(key)`` removes the key from every tier.
* :attr:`Hit.source` says whose bytes they are for the ``served_bytes`` metric: ``cache``
  (this replica's) or ``shared`` (the shared tier's).

:class:`Chain` asks its tiers in order; a disk hit small enough for the memory tier is copied
there on the way, and a hit from the shared tier (:mod:`proxy.store.shared`) is written to disk
(backfill, by :meth:`Chain.keep` once the client is authorized): a whole body in the background,
a streamed one as it streams (committed only once its digest matched). Backfills are bounded
(:data:`BACKFILLS` at once; more are skipped: the next hit tries again) and never slow or fail
the hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from proxy.integrity import Verifier, intact
from proxy.store import (
    VERIFIED_WHOLE,
    Entry,
    EntryMeta,
    FillFile,
    Store,
    commit,
    has_room,
    write_fill,
)
from proxy.store.memory import MemoryTier
from proxy.threads import run_sync

if TYPE_CHECKING:
    from proxy.store.shared import SharedTier

log = logging.getLogger(__name__)
#: Backfills from the shared tier to disk running at once.
BACKFILLS = 4

#: Disk entries up to this size that the store has in its memory index are read on the event
#: loop (an open and a page-cache read are cheaper than a thread hop).
INLINE_READ_LIMIT = 64 * 1024


class Corrupt(Exception):
    """A stored entry's bytes do not match its metadata (it has been evicted)."""


class Interrupted(Corrupt):
    """A tier stopped answering in the middle of a whole body (not a digest mismatch).

    ``offset`` bytes were sent; ``digest`` (sha256) covers exactly them. The bytes are
    immutable, so the caller may fetch the rest elsewhere, go on hashing, and send the last
    piece only if the whole body matches the entry's sha256 (:mod:`proxy.resume`)."""

    def __init__(self, offset: int, digest: Any) -> None:
        super().__init__(f"interrupted after {offset} bytes")
        self.offset = offset
        self.digest = digest


class Hit:
    """A found entry; see the module docstring. Close it when done."""

    def __init__(
        self,
        meta: EntryMeta,
        tier: str,
        body: bytes | None = None,
        stream: Callable[[int, int, bool], AsyncIterator[bytes]] | None = None,
        close: Callable[[], None] = lambda: None,
        source: str = "cache",
    ) -> None:
        self.meta = meta
        self.tier = tier
        self.source = source
        #: The whole body, verified; None for entries streamed by :meth:`chunks`.
        self.body = body
        self._stream = stream
        self._close = close

    def chunks(self, start: int, end: int, verify: bool) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)``; with ``verify`` (a whole body) the last waits for the digest."""
        if self._stream is None:
            assert self.body is not None
            return _one(self.body[start:end])
        return self._stream(start, end, verify)

    def close(self) -> None:
        self._close()


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


class DiskTier:
    """The disk store (:mod:`proxy.store.disk`) behind the async tier interface."""

    name = "disk"

    def __init__(
        self,
        store: Store,
        chunk_size: int,
        on_corrupt: Callable[[], None],
        min_free_space: int = 0,
    ) -> None:
        self.store = store
        self.chunk_size = chunk_size
        self._on_corrupt = on_corrupt
        self.min_free_space = min_free_space
        self._backfills = asyncio.Semaphore(BACKFILLS)
        self._tasks: set[asyncio.Task[None]] = set()

    async def lookup(
        self, key: str, on_miss: Callable[[], None] | None = None
    ) -> tuple[Hit, str, int] | None:
        """A hit, with the path and inode of its file (the entry's identity for backfills).
        ``on_miss`` (it may block, and must not raise) is called in the lookup's worker-thread
        hop when the index has no entry for ``key``: the route takes the key's lease for its
        fill there, one hop less per miss."""
        if self.store.remembers(key, INLINE_READ_LIMIT):
            try:
                found = self._open(key, memory_only=True)
            except Corrupt:
                await run_sync(self._corrupt, key)
                return None
            if found is not None:
                return found
        return await run_sync(self._open_or, key, on_miss)

    def _open_or(self, key: str, on_miss: Callable[[], None] | None) -> tuple[Hit, str, int] | None:
        found = self._open(key)
        if found is None and on_miss is not None:
            on_miss()
        return found

    def _open(self, key: str, memory_only: bool = False) -> tuple[Hit, str, int] | None:
        """Blocks: one worker-thread hop does all the disk work of a small hit. With
        ``memory_only`` (on the event loop) no index is queried, and a damaged entry raises
        :class:`Corrupt` instead of being evicted here."""
        entry = self.store.get(key, memory_only=memory_only)
        if entry is None:
            return None
        try:
            info = os.fstat(entry.file.fileno())
            if info.st_size != entry.meta.length:
                raise Corrupt
            identity = (entry.file.name, info.st_ino)
            if entry.meta.length > max(self.chunk_size, VERIFIED_WHOLE):
                return self._streamed(key, entry), *identity
            with entry.file:
                body = os.pread(entry.file.fileno(), entry.meta.length, 0)
            if not intact(entry.meta, body):
                raise Corrupt
            return Hit(entry.meta, self.name, body=body), *identity
        except Corrupt:
            entry.close()
            if memory_only:
                raise
            self._corrupt(key)
            return None

    def _streamed(self, key: str, entry: Entry) -> Hit:
        fd = entry.file.fileno()
        chunk_size = self.chunk_size

        async def stream(start: int, end: int, verify: bool) -> AsyncIterator[bytes]:
            verifier = Verifier(entry.meta) if verify else None

            def read(size: int, offset: int) -> bytes:
                data = os.pread(fd, size, offset)
                if verifier is not None:
                    verifier.update(data)
                return data

            try:
                position = start
                while position < end:
                    size = min(chunk_size, end - position)
                    data = await run_sync(read, size, position)
                    position += len(data)
                    if len(data) != size or (
                        position == end and verifier is not None and not verifier.matches()
                    ):
                        await run_sync(self._corrupt, key)
                        raise Corrupt(key)
                    yield data
            finally:
                entry.close()

        return Hit(entry.meta, self.name, stream=stream, close=entry.close)

    def _corrupt(self, key: str) -> None:
        """Blocks."""
        self._on_corrupt()
        self.store.evict(key)

    async def evict(self, key: str) -> None:
        await run_sync(self.store.evict, key)

    async def read(self, key: str, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of the stored entry ``key`` (fewer if it is gone), for
        copying it to the shared tier."""

        def pread() -> bytes:
            entry = self.store.get(key)
            if entry is None:
                return b""
            with entry.file:
                return os.pread(entry.file.fileno(), size, offset)

        return await run_sync(pread)

    # -- backfill from a slower tier ----------------------------------------------------------

    def backfilled(self, key: str, hit: Hit) -> Hit:
        """``hit`` (from a slower tier), arranged to be written to this disk on the way (unless
        the disk would not keep an entry that large)."""
        too_large = hit.meta.length > getattr(self.store, "max_object_bytes", hit.meta.length)
        if self._backfills.locked() or len(self._tasks) >= BACKFILLS or too_large:
            return hit
        meta = dataclasses.replace(hit.meta, prefetched=False)  # a client is reading it
        if hit.body is not None:
            body = hit.body
            task = asyncio.create_task(self._write_whole(key, meta, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return hit

        async def stream(start: int, end: int, verify: bool) -> AsyncIterator[bytes]:
            whole = start == 0 and end == hit.meta.length
            if not whole or self._backfills.locked():
                async for data in hit.chunks(start, end, verify):
                    yield data
                return
            async with self._backfills:
                fill = await run_sync(self._begin, hit.meta.length)
                try:
                    async for data in hit.chunks(start, end, verify):
                        if fill is not None:
                            fill = await self._append(fill, data)
                        yield data
                    if fill is not None:  # every byte arrived and the digest matched
                        pending, fill = fill, None
                        await self._commit(key, pending, meta)
                finally:
                    if fill is not None:
                        with anyio.CancelScope(shield=True):
                            await run_sync(self.store.discard, fill)

        return Hit(hit.meta, hit.tier, stream=stream, close=hit.close, source=hit.source)

    async def _write_whole(self, key: str, meta: EntryMeta, body: bytes) -> None:
        async with self._backfills:
            temp = await run_sync(write_fill, self.store, body, self.min_free_space)
            if not isinstance(temp, str):
                await self._commit(key, temp, meta)

    def _begin(self, length: int) -> FillFile | None:
        """Blocks. A temporary file, unless the disk lacks room (then no backfill)."""
        try:
            if not has_room(self.store, length, self.min_free_space):
                return None
            return self.store.begin_fill()
        except OSError:
            return None

    async def _append(self, fill: FillFile, data: bytes) -> FillFile | None:
        try:
            await run_sync(fill.file.write, data)
        except OSError:
            await run_sync(self.store.discard, fill)
            return None
        return fill

    async def _commit(self, key: str, fill: FillFile, meta: EntryMeta) -> None:
        """The store takes the file over, whatever the outcome."""
        try:
            await commit(self.store, key, fill, meta)
        except OSError as exc:
            log.info("could not keep a shared-tier hit on disk: %s", exc)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)


class Chain:
    """Memory, then disk, then the shared tier; faster tiers are backfilled on the way."""

    def __init__(
        self, memory: MemoryTier, disk: DiskTier, shared: SharedTier | None = None
    ) -> None:
        self.memory = memory
        self.disk = disk
        self.shared = shared

    async def lookup(self, key: str, on_disk_miss: Callable[[], None] | None = None) -> Hit | None:
        """The first tier's hit; ``on_disk_miss`` as :meth:`DiskTier.lookup` takes it."""
        copy = self.memory.get(key)
        if copy is not None:
            self.touch(key)
            return Hit(copy.meta, self.memory.name, body=copy.body)
        found = await self.disk.lookup(key, on_disk_miss)
        if found is None:
            if self.shared is None:
                return None
            return await self.shared.lookup(key)  # backfilled by :meth:`keep`, once authorized
        hit, path, inode = found
        if hit.body is not None:
            self.memory.put(key, hit.meta, hit.body, path, inode)
        return hit

    def touch(self, key: str) -> None:
        """Record a read of ``key`` served from memory: the disk entry is what recency evicts
        and purges."""
        self.disk.store.touch(key)

    def keep(self, key: str, hit: Hit) -> Hit:
        """``hit``, arranged to be written to disk on the way if it came from the shared tier.
        The route calls this only once the client may read the entry: a refused request must
        not copy entries from Redis to this replica's disk (nor churn its LRU)."""
        if self.shared is None or hit.tier != self.shared.name:
            return hit
        return self.disk.backfilled(key, hit)

    async def evict(self, key: str) -> None:
        self.memory.drop(key)
        await self.disk.evict(key)
        if self.shared is not None:
            await self.shared.evict(key)

    def publish(self, key: str, meta: EntryMeta) -> None:
        """A fill committed ``key`` to disk: copy it to the shared tier in the background."""
        if self.shared is not None:
            self.shared.publish(key, meta, lambda offset, size: self.disk.read(key, offset, size))

    async def aclose(self) -> None:
        await self.disk.aclose()
        if self.shared is not None:
            await self.shared.aclose()
