"""A fleet fetches each artifact once: the holder streams its fetch into Redis, others follow.

:mod:`proxy.store.lease` decides who fetches. This module moves the bytes:

* :class:`Broadcast` runs beside the holder's fill. Each upstream chunk is handed to it
  (:meth:`Broadcast.feed`, never awaited: the holder's clients never wait for Redis) and a writer
  task ``APPEND``s batches to the temporary key named in the published record. A second task
  renews the lease. If Redis lags more than :data:`MAX_LAG` bytes behind upstream, fails, or the
  lease is lost, the holder gives up sharing (deletes its temporary key, releases the lease) and
  carries on serving its own clients. When the fill completes, :meth:`Broadcast.finish` appends
  the sealed trailer, publishes the entry by ``RENAME`` and releases the lease, in the background.
* :class:`RemoteBody` is a waiter's body: ``GETRANGE`` of the temporary key as it grows (then of
  the entry, once renamed), polling with bounded backoff while the holder still holds its lease.
  The fill hashes what it reads (:mod:`proxy.fills`) and completes only if the published
  entry's sealed metadata (HMAC under the shared secret) has that sha256 and length; readers
  hold the last byte until then, so a forged, torn or abandoned stream ends as a failed
  transfer, never as wrong bytes or a short 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import anyio
import httpx

from proxy.store import EntryMeta, lease
from proxy.store.lease import Held, Keys, Record, Stored, holder_is
from proxy.store.redisclient import Guarded, Unavailable
from proxy.store.shared import STREAM_READ, TAIL_READ, TEMP_TTL_MS, Names
from proxy.threads import run_sync
from proxy.validators import Validators

log = logging.getLogger(__name__)

#: Bytes the holder may have waiting for Redis before it stops sharing (Redis is too slow).
MAX_LAG = 8 * 1024**2
#: Most bytes one APPEND carries.
APPEND_BYTES = 1024**2
#: First and longest pause of a waiter that finds no new bytes.
POLL_FIRST = 0.002
POLL_MOST = 0.02
#: Tries of a follower's read before a Redis failure fails its transfer.
RETRIES = 3


class RemoteFailed(Exception):
    """The followed fetch ended without a published entry holding exactly the bytes read."""


class Broadcast:
    """The holder's side: see the module docstring. Create it with :meth:`start`."""

    def __init__(
        self,
        lease: Held,
        entry_ttl: float,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        on_result: Callable[[str], None],
    ) -> None:
        self.lease = lease
        self.entry_ttl_ms = int(entry_ttl * 1000)
        self.keys: Keys = lease.keys
        self.temp = f"{self.keys.entry}:tmp:{lease.token[:16]}"
        self._spawn = spawn
        self._on_result = on_result
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        #: Bytes in the temporary key so far.
        self._sent = 0
        self._wake = asyncio.Event()
        self._receiving = True
        self.stopped = False
        self._writer: asyncio.Task[None] | None = None
        self._otherwise: Callable[[], None] | None = None
        self._renewer: asyncio.Task[None] | None = None

    async def start(
        self, content_type: str, length: int, validators: Validators, filler: str
    ) -> bool:
        """Create the temporary key and publish the record; False if Redis would not."""
        call = self.lease.call
        record = Record(
            self.lease.token,
            True,
            self.temp,
            content_type,
            length,
            validators.to_dict(),
            filler,
        )
        try:
            await call(lambda c: c.set(self.temp, b"", px=TEMP_TTL_MS))
            await self.lease.publish(record)
        except Unavailable:
            self.stopped = True
            return False
        self._writer = asyncio.create_task(self._write())
        self._renewer = asyncio.create_task(self._renew())
        return True

    def feed(self, chunk: bytes) -> None:
        """The next chunk of the body (called on the event loop, never waits)."""
        if self.stopped:
            return
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if self._pending_bytes > MAX_LAG:
            self._give_up("Redis fell too far behind upstream")
            return
        self._wake.set()

    def _give_up(self, why: str) -> None:
        if self.stopped:
            return
        log.info("stopped sharing a fetch through Redis: %s", why)
        self.stopped = True
        self._pending.clear()
        self._pending_bytes = 0
        self._wake.set()
        self._on_result("unshared")
        self._spawn(self._abandon())
        otherwise, self._otherwise = self._otherwise, None
        if otherwise is not None:
            otherwise()

    async def _abandon(self) -> None:
        for task in (self._writer, self._renewer):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        with contextlib.suppress(Unavailable):
            await self.lease.call(lambda c: c.delete(self.temp))
        await self.lease.release()

    async def _write(self) -> None:
        while not self.stopped and (self._receiving or self._pending):
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, size = [], 0
            while self._pending and size < APPEND_BYTES:
                chunk = self._pending.pop(0)
                batch.append(chunk)
                size += len(chunk)
            data = b"".join(batch)
            try:
                length = await self._append(data)
            except Unavailable as exc:
                self._give_up(f"Redis failed ({exc})")
                return
            self._pending_bytes -= size
            self._sent += size
            if length != self._sent:  # evicted (then APPEND starts a new key) or written to
                self._give_up("the temporary key was evicted or changed")
                return

    async def _append(self, data: bytes) -> int:
        """APPEND ``data``; the key's length after it."""
        length = await self.lease.call(lambda c: c.append(self.temp, data), bulk=True)
        return int(length)

    async def _renew(self) -> None:
        every = self.lease.ttl_ms / 3000
        while not self.stopped:
            await anyio.sleep(every)
            if not self.stopped and not await self.lease.renew():
                self._give_up("the lease was lost")
                return

    def finish(self, meta: EntryMeta | None, otherwise: Callable[[], None] | None = None) -> None:
        """The fill ended: publish the entry (``meta``) once every byte is in, or give up
        (None). Runs in the background; the lease is released either way. If sharing failed
        or fails from now on, ``otherwise`` is called (the usual upload of the committed
        entry, which the caller skipped because this broadcast was running)."""
        self._receiving = False
        self._wake.set()
        if meta is None:
            self._give_up("the fetch failed")
            return
        if self.stopped:
            if otherwise is not None:
                otherwise()
            return
        self._otherwise = otherwise
        self._spawn(self._publish(meta))

    async def _publish(self, meta: EntryMeta) -> None:
        call = self.lease.call
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        if self.stopped:
            return
        entry = self.keys.entry
        try:
            await call(lambda c: c.append(self.temp, self.keys.names.seal(entry, meta)), bulk=True)
            await call(lambda c: c.rename(self.temp, entry))
            await call(lambda c: c.pexpire(entry, self.entry_ttl_ms))
        except Unavailable as exc:
            self._give_up(f"Redis failed at the end ({exc})")
            return
        self.stopped = True
        if self._renewer is not None:
            self._renewer.cancel()
        self._on_result("stored")
        await self.lease.release()


class RemoteBody:
    """A waiter's body: the bytes of another replica's fetch, from Redis, as they arrive.

    Iterate :meth:`chunks`; when it ends, :attr:`meta` is the published entry's metadata (the
    caller checks its sha256 against the bytes read before completing). Raises
    :class:`RemoteFailed` when the holder stops before publishing or Redis fails."""

    def __init__(self, call: Guarded, keys: Keys, record: Record, patience: float) -> None:
        self.call = call
        self.keys = keys
        self.record = record
        self.patience = patience
        self.meta: EntryMeta | None = None
        #: True once the rest of the body came from upstream (:func:`resumable`).
        self.resumed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._chunks():
                yield data
        except Unavailable as exc:
            raise RemoteFailed(f"Redis failed while following ({exc})") from None

    async def _chunks(self) -> AsyncIterator[bytes]:
        length = self.record.expected_length
        source = self.record.temp
        offset = 0
        waiting = _Backoff(self.patience)
        while offset < length:
            end = min(offset + STREAM_READ, length)
            data = await self._range(source, offset, end - 1)
            if data:
                offset += len(data)
                waiting.reset()
                yield data
                continue
            if source != self.keys.entry and await self._published():
                source = self.keys.entry  # renamed: the rest is in the entry
                continue
            await waiting.pause(lambda: self._alive(), "the holder stopped before the end")
        while self.meta is None:
            if await self._published():
                return
            await waiting.pause(lambda: self._alive(), "the holder published no entry")

    async def _range(self, name: str, first: int, last: int) -> bytes:
        for attempt in range(1, RETRIES + 1):  # a moment's slowness must not fail a transfer
            try:
                data: bytes = await self.call(lambda c: c.getrange(name, first, last), bulk=True)
            except Unavailable:
                if attempt == RETRIES:
                    raise
                await anyio.sleep(POLL_MOST * attempt)
            else:
                return data
        raise AssertionError("unreachable")

    async def _published(self) -> bool:
        """True once the entry is published; sets :attr:`meta` (None if forged or damaged)."""
        name = self.keys.entry
        tail = await self._range(name, -TAIL_READ, -1)
        if not tail:
            return False
        opened = self.keys.names.unseal(name, tail)
        if opened is None:
            raise RemoteFailed("the published entry failed its HMAC")
        self.meta = opened[0]
        return True

    async def _alive(self) -> bool:
        """True while the holder holds its lease, or once it has published. In that order: a
        holder renames its key before it releases the lease, so no finish is missed."""
        try:
            return await holder_is(self.call, self.keys, self.record.token) or (
                await self._published()
            )
        except Unavailable:  # not known: the reads decide, and silence bounds the wait
            return True


async def resumable(
    remote: RemoteBody, fetch: Callable[[], Awaitable[httpx.Response]]
) -> AsyncIterator[bytes]:
    """``remote``'s bytes; if the followed fetch stops before the end (its holder died or gave
    up, Redis failed), the rest from upstream through ``fetch()``: the same artifact, whose
    first bytes must hash like those already relayed (else :class:`RemoteFailed`). Then
    :attr:`RemoteBody.resumed` is True and upstream, not the holder, vouches for the body."""
    relayed = hashlib.sha256()
    offset = 0
    try:
        async for data in remote.chunks():
            await run_sync(relayed.update, data)
            offset += len(data)
            yield data
        return
    except RemoteFailed as exc:
        log.info(
            "following another replica stopped at byte %d (%s); resuming upstream", offset, exc
        )
    remote.resumed = True
    response = await fetch()
    try:
        validators = Validators.of(response)
        expected = (200, False, remote.record.expected_length)
        if (response.status_code, bool(validators.encoding), validators.length) != expected:
            raise RemoteFailed("upstream's answer differs from the followed fetch's")
        check = hashlib.sha256()
        seen = 0
        async for chunk in response.aiter_raw():
            if seen < offset:
                head = chunk[: offset - seen]
                check.update(head)
                seen += len(head)
                if seen == offset and check.digest() != relayed.digest():
                    raise RemoteFailed("upstream's bytes differ from those already relayed")
                chunk = chunk[len(head) :]
            if chunk:
                seen += len(chunk)
                yield chunk
    finally:
        await response.aclose()


class _Backoff:
    """Pauses of a waiter that found nothing new: doubling up to :data:`POLL_MOST`, while the
    holder still holds its lease, for at most ``patience`` seconds without progress."""

    def __init__(self, patience: float) -> None:
        self.patience = patience
        self.reset()

    def reset(self) -> None:
        self.pause_for = POLL_FIRST
        self.give_up = time.monotonic() + self.patience

    async def pause(self, alive: Callable[[], Coroutine[Any, Any, bool]], why: str) -> None:
        if time.monotonic() > self.give_up or not await alive():
            raise RemoteFailed(why)
        await anyio.sleep(self.pause_for)
        self.pause_for = min(self.pause_for * 2, POLL_MOST)


class Fleet:
    """Fleet single-flight for :class:`proxy.fills.Fills`: claims, broadcasts and follows."""

    def __init__(
        self,
        call: Guarded,
        names: Names,
        *,
        lease_ttl: float,
        entry_ttl: float,
        max_object_bytes: int,
        on_lease: Callable[[str], None] = lambda _outcome: None,
        on_write: Callable[[str], None] = lambda _result: None,
    ) -> None:
        self.call = call
        self.names = names
        self.lease_ttl = lease_ttl
        self.entry_ttl = entry_ttl
        self.max_object_bytes = max_object_bytes
        self._on_lease = on_lease
        self._on_write = on_write

    async def claim(
        self, cache_key: str, patience: float, silence: float
    ) -> Held | RemoteBody | Stored | None:
        """A lease to fetch and share ``cache_key`` (waiting at most ``patience`` seconds for
        a holder to publish); another replica's fetch to follow (giving up after ``silence``
        seconds without a new byte); :data:`~proxy.store.lease.STORED`; or None: fetch on your
        own, unshared."""
        got = await lease.claim(self.call, self.names, cache_key, self.lease_ttl, patience)
        if isinstance(got, Held):
            self._on_lease("taken_over" if got.taken_over else "acquired")
            return got
        if isinstance(got, Stored):
            self._on_lease("stored")
            return got
        if got is None:
            self._on_lease("fallback")
            return None
        if not got.shared:
            self._on_lease("unshared")
            return None
        self._on_lease("followed")
        return RemoteBody(self.call, Keys(self.names, cache_key), got, silence)

    def shares(self, length: int | None) -> bool:
        """Whether a body of ``length`` bytes (None: unknown) goes to Redis as it arrives."""
        return length is not None and length <= self.max_object_bytes

    def broadcast(
        self, held: Held, spawn: Callable[[Coroutine[Any, Any, None]], None]
    ) -> Broadcast:
        return Broadcast(held, self.entry_ttl, spawn, self._result)

    def _result(self, result: str) -> None:
        if result == "stored":
            self._on_write("stored")
        else:
            self._on_lease("unshared")
