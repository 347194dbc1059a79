"""The tier chain: where the route looks a key up. Memory, then disk (later Redis), backfilling.

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

:class:`Chain` asks its tiers in order; a disk hit small enough for the memory tier is copied
there on the way (backfill).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable

import anyio.to_thread

from proxy.integrity import Verifier, intact
from proxy.store import Entry, EntryMeta, Store
from proxy.store.memory import MemoryTier

#: Disk entries up to this size that the store has in its memory index are read on the event
#: loop (an open and a page-cache read are cheaper than a thread hop).
INLINE_READ_LIMIT = 64 * 1024


class Corrupt(Exception):
    """A stored entry's bytes do not match its metadata (it has been evicted)."""


class Hit:
    """A found entry; see the module docstring. Close it when done."""

    def __init__(
        self,
        meta: EntryMeta,
        tier: str,
        body: bytes | None = None,
        stream: Callable[[int, int, bool], AsyncIterator[bytes]] | None = None,
        close: Callable[[], None] = lambda: None,
    ) -> None:
        self.meta = meta
        self.tier = tier
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

    def __init__(self, store: Store, chunk_size: int, on_corrupt: Callable[[], None]) -> None:
        self.store = store
        self.chunk_size = chunk_size
        self._on_corrupt = on_corrupt

    async def lookup(self, key: str) -> tuple[Hit, str, int] | None:
        """A hit, with the path and inode of its file (the entry's identity for backfills)."""
        if self.store.remembers(key, INLINE_READ_LIMIT):
            try:
                found = self._open(key, memory_only=True)
            except Corrupt:
                await anyio.to_thread.run_sync(self._corrupt, key)
                return None
            if found is not None:
                return found
        return await anyio.to_thread.run_sync(self._open, key)

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
            if entry.meta.length > self.chunk_size:
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
                    data = await anyio.to_thread.run_sync(read, size, position)
                    position += len(data)
                    if len(data) != size or (
                        position == end and verifier is not None and not verifier.matches()
                    ):
                        await anyio.to_thread.run_sync(self._corrupt, key)
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
        await anyio.to_thread.run_sync(self.store.evict, key)


class Chain:
    """Memory, then disk; a small disk hit is copied into memory on the way."""

    def __init__(self, memory: MemoryTier, disk: DiskTier) -> None:
        self.memory = memory
        self.disk = disk

    async def lookup(self, key: str) -> Hit | None:
        copy = self.memory.get(key)
        if copy is not None:
            self.disk.store.touch(key)  # the disk entry is what recency evicts and purges
            return Hit(copy.meta, self.memory.name, body=copy.body)
        found = await self.disk.lookup(key)
        if found is None:
            return None
        hit, path, inode = found
        if hit.body is not None:
            self.memory.put(key, hit.meta, hit.body, path, inode)
        return hit

    async def evict(self, key: str) -> None:
        self.memory.drop(key)
        await self.disk.evict(key)
