"""The shared tier: artifacts and access proofs in Redis, for every replica of the proxy.

Layout: **one Redis string per artifact**, ``<redis_prefix>{<scope>.<object>}``, holding
``body || metadata JSON || HMAC-SHA256 (32 bytes) || metadata length (u32) || b"VRC1"``.

* Why one key: operators run Redis with ``maxmemory`` and ``allkeys-lru``, so Redis may evict
  any key at any moment. With chunk keys (or a body key beside a metadata key) an eviction tears
  an object. One string is evicted whole: the artifact is there, complete, or it is not.
* Written under a temporary name in the same slot (``...}:tmp:<random>``) with ``SET`` and
  ``APPEND``, then published by ``RENAME``: readers see no entry or the whole entry. An upload
  that dies leaves only its temporary key, which expires by itself.
* Read with ``GETRANGE``: one call for the last 64 KiB gives a small artifact whole (with its
  trailer), or a large one's trailer; larger bodies stream by ranges. The body comes first so
  that the next issue's waiters can ``GETRANGE`` a temporary key as it grows (the trailer goes
  on last, before the rename).
* The hash tag (``{...}``) is one per artifact, so Redis Cluster keeps it in one slot; the scope
  part lets ``purge`` find a session's entries with ``SCAN MATCH``. Tags are HMACs of the ids
  (no session or object id appears in Redis).

Trust: Redis is a different trust boundary than a 0700 disk. The metadata is authenticated by an
HMAC over the key's name and the JSON, under a key derived from the replicas' shared secret
(never stored in Redis); a value moved to another key, or rewritten by anyone without the secret,
fails it. Bodies are checked with sha256 (the sealed ETag) before the last byte reaches a client:
small ones before the answer starts, streamed ones by holding the last piece back. A range
request is verified the same way (the whole body is read). A Redis administrator can still delete
entries and deny service; never make a replica serve wrong bytes.

Proofs: ``<redis_prefix>proof:<HMAC of fingerprint and scope>``, valued with the time proven and
its HMAC; written with their remaining life as TTL. Refusals are never written. Redis's TTLs
are not trusted either: an entry sealed more than ``shared_ttl`` ago is a miss (and deleted), a
proof older than its life is not adopted, and a proof lookup reads a few dozen bytes at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import struct
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from proxy.config import Config
from proxy.store import EntryMeta
from proxy.store.chain import Corrupt, Hit, Interrupted
from proxy.store.redisclient import Guarded, Unavailable
from proxy.threads import run_sync

log = logging.getLogger(__name__)

MAGIC = b"VRC1"
_TRAILER = struct.Struct(">I4s")
_SIG = 32
#: Bytes after the body: at least the signature and the trailer.
_OVERHEAD = _SIG + _TRAILER.size
#: The first read of a lookup: a small artifact whole, or a large one's trailer.
TAIL_READ = 64 * 1024
#: Uploads running at once, and waiting at most (more are dropped: the disk still has them).
WRITERS = 2
MAX_PENDING_WRITES = 32
#: Bytes one GETRANGE of a streamed hit asks for at least: fewer round trips than chunk_size.
STREAM_READ = 1024 * 1024
#: Bodies up to this size are hashed on the event loop (about 60 us at most).
INLINE_HASH_LIMIT = 128 * 1024
#: Seconds the replicas' clocks may disagree by: an entry sealed longer than ``shared_ttl`` plus
#: this ago is stale whatever Redis's own TTL says.
CLOCK_SKEW = 300.0
#: Bytes a proof lookup reads at most: a genuine record (milliseconds and an HMAC) is under 64;
#: a longer value at a proof's name is a forgery and must not be pulled in whole.
PROOF_READ = 128
#: A temporary key lives this long unless renamed (an upload that died leaves nothing for long).
TEMP_TTL_MS = 300_000


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class Names:
    """Key names and the HMACs that seal values, from the prefix and the shared secret."""

    def __init__(self, prefix: str, secret: bytes) -> None:
        self.prefix = prefix
        self._names = hmac.new(secret, b"vlmrun-cache redis names", hashlib.sha256).digest()
        self._seal = hmac.new(secret, b"vlmrun-cache redis seal", hashlib.sha256).digest()

    def _h(self, *parts: object) -> str:
        text = json.dumps(parts, separators=(",", ":")).encode()
        return hmac.new(self._names, text, hashlib.sha256).hexdigest()[:32]

    def _tag(self, cache_key: str) -> str:
        """``<scope>.<object>`` (``.<owner>`` for a credential's own copy in a split scope)."""
        try:
            parts = json.loads(cache_key)
        except ValueError:
            parts = None
        if not isinstance(parts, list) or len(parts) < 4:
            return self._h(cache_key)
        tag = f"{self._h(*parts[:3])}.{self._h(parts[3])}"
        return tag + "".join(f".{self._h(owner)}" for owner in parts[4:])

    def entry(self, cache_key: str) -> str:
        return f"{self.prefix}{{{self._tag(cache_key)}}}"

    def temporary(self, cache_key: str) -> str:
        return f"{self.entry(cache_key)}:tmp:{secrets.token_hex(8)}"

    def scope_pattern(self, version: str, kind: str, scope_id: str) -> str:
        """``SCAN MATCH`` for every entry (and upload) of one session or execution."""
        return f"{_glob_escape(self.prefix)}{{{self._h(version, kind, scope_id)}.*"

    def object_pattern(self, object_id: str) -> str:
        """``SCAN MATCH`` for every entry (and upload) of ``object_id``, in any scope."""
        return f"{_glob_escape(self.prefix)}{{*.{self._h(object_id)}[.}}]*"

    def object_entry(self, version: str, kind: str, scope_id: str, object_id: str) -> str:
        return self.entry(json.dumps([version, kind, scope_id, object_id]))

    def entries_pattern(self) -> str:
        return f"{_glob_escape(self.prefix)}{{*"

    def proofs_pattern(self) -> str:
        return f"{_glob_escape(self.prefix)}proof:*"

    def proof(self, fingerprint: str, scope: tuple[str, ...]) -> str:
        return f"{self.prefix}proof:{self._h(fingerprint, *scope)}"

    def sign(self, name: str, data: bytes) -> bytes:
        return hmac.new(self._seal, name.encode() + b"\0" + data, hashlib.sha256).digest()

    def seal(self, name: str, meta: EntryMeta) -> bytes:
        """The trailer that follows the body in the value stored under ``name``."""
        text = meta.to_json().encode()
        return text + self.sign(name, text) + _TRAILER.pack(len(text), MAGIC)

    def unseal(self, name: str, tail: bytes) -> tuple[EntryMeta, int] | None:
        """The metadata sealed at the end of ``tail`` (the end of the value at ``name``) and the
        value's whole length; None if it is not ours, damaged, or forged."""
        if len(tail) < _OVERHEAD:
            return None
        size, magic = _TRAILER.unpack(tail[-_TRAILER.size :])
        if magic != MAGIC or size > len(tail) - _OVERHEAD:
            return None
        text = tail[-_OVERHEAD - size : -_OVERHEAD]
        if not hmac.compare_digest(tail[-_OVERHEAD : -_TRAILER.size], self.sign(name, text)):
            return None
        try:
            meta = EntryMeta.from_json(text.decode())
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if meta.length < 0:
            return None
        return meta, meta.length + size + _OVERHEAD


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SharedTier:
    """Artifacts and proofs in Redis; every method is async and never raises for Redis's
    failures (a lookup is then a miss, a write is skipped). See the module docstring."""

    name = "redis"

    def __init__(
        self,
        call: Guarded,
        names: Names,
        *,
        chunk_size: int,
        buffer_size: int,
        max_object_bytes: int,
        ttl: float,
        on_reject: Callable[[], None] = lambda: None,
        on_write: Callable[[str], None] = lambda _result: None,
    ) -> None:
        self.call = call
        self.names = names
        self.chunk_size = chunk_size
        self.buffer_size = buffer_size
        self.max_object_bytes = max_object_bytes
        self.ttl_ms = int(ttl * 1000)
        self._on_reject = on_reject
        self._on_write = on_write
        self._writers = asyncio.Semaphore(WRITERS)
        self._pending = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def configured(
        cls,
        config: Config,
        secret: bytes,
        call: Guarded,
        on_reject: Callable[[], None] = lambda: None,
        on_write: Callable[[str], None] = lambda _result: None,
    ) -> SharedTier:
        """The tier as ``config`` sets it up, over ``call``, sealing with ``secret``."""
        return cls(
            call,
            Names(config.redis_prefix, secret),
            chunk_size=config.chunk_size,
            buffer_size=config.redis_buffer_size,
            max_object_bytes=config.shared_max_object_size,
            ttl=config.shared_ttl,
            on_reject=on_reject,
            on_write=on_write,
        )

    # -- reads --------------------------------------------------------------------------------

    async def lookup(self, key: str) -> Hit | None:
        """A verified hit, or None (a miss, a rejected value, or Redis unavailable)."""
        name = self.names.entry(key)
        try:
            tail: bytes = await self.call(lambda c: c.getrange(name, -TAIL_READ, -1))
        except Unavailable:
            return None
        if not tail:
            return None
        opened = self.names.unseal(name, tail)
        if opened is None:
            await self._reject(name)
            return None
        meta, total = opened
        if meta.length > self.max_object_bytes:
            return None  # genuine, from a replica with a larger limit: a miss here, kept
        if time.time() - meta.stored_at > self.ttl_ms / 1000 + CLOCK_SKEW:
            # Redis's TTL is no promise (anyone who can write Redis can PERSIST a key, or keep
            # a copy and write it back): the sealed time is.
            await self.evict(key)
            return None
        if total <= len(tail):
            body = tail[: meta.length] if total == len(tail) else None
        elif meta.length <= self.buffer_size:
            try:
                body = await self._range(name, 0, meta.length)
            except Unavailable:
                return None
        else:
            return Hit(meta, self.name, stream=self._stream(name, meta), source="shared")
        if body is None or len(body) != meta.length:
            if body is not None and len(body) == 0:
                return None  # evicted between the two reads
            await self._reject(name)
            return None
        digest = (
            _sha256(body)  # a thread hop costs more than hashing a small body here
            if len(body) <= INLINE_HASH_LIMIT
            else await run_sync(_sha256, body)
        )
        if digest != meta.sha256:
            await self._reject(name)
            return None
        return Hit(meta, self.name, body=body, source="shared")

    def _stream(
        self, name: str, meta: EntryMeta
    ) -> Callable[[int, int, bool], AsyncIterator[bytes]]:
        async def stream(start: int, end: int, verify: bool) -> AsyncIterator[bytes]:
            # Always the whole body, hashed: Redis is not trusted with a range either. The
            # last piece of the span is held back until the digest matched.
            digest = hashlib.sha256()
            sent = digest.copy()  # of the bytes yielded so far (a whole body's are all read)
            held = b""
            position = 0
            step = max(self.chunk_size, STREAM_READ)
            whole = start == 0 and end == meta.length
            while position < meta.length:
                size = min(step, meta.length - position)
                first = position
                try:
                    data = await self._range(name, first, size)
                except Unavailable:
                    data = b""
                if len(data) != size:  # Redis failed, or the key was evicted or replaced
                    if whole:  # what was sent is known exactly: the rest may come elsewhere
                        raise Interrupted(first - len(held), sent)
                    raise Corrupt(name)
                before = digest.copy()
                await run_sync(digest.update, data)  # off the event loop
                position += size
                piece = data[max(start - first, 0) : max(end - first, 0)]
                if piece:
                    if held:
                        yield held
                    held, sent = piece, before  # for a whole body, piece is all of data
            if digest.hexdigest() != meta.sha256:
                await self._reject(name)
                raise Corrupt(name)
            if held:
                yield held

        return stream

    async def _range(self, name: str, start: int, size: int) -> bytes:
        data: bytes = await self.call(
            lambda c: c.getrange(name, start, start + size - 1), bulk=True
        )
        return data

    async def _append(self, name: str, data: bytes, position: int) -> None:
        """Append ``data`` at ``position`` of the temporary key ``name``. APPEND to a key that
        is gone (evicted by allkeys-lru, or deleted by a purge) creates a fresh one: its new
        length tells, and the upload stops before a torn value is published."""
        length = await self.call(lambda c: c.append(name, data), bulk=True)
        if length != position + len(data):
            raise OSError("the temporary key was evicted or deleted during the upload")

    async def _set(self, name: str, value: bytes, ttl_ms: int) -> None:
        await self.call(lambda c: c.set(name, value, px=ttl_ms))

    async def _reject(self, name: str) -> None:
        """A value that is not what it claims (damaged, or written without the secret)."""
        log.warning(
            "rejected a Redis entry that failed its HMAC or digest (damaged, written without "
            "the secret, or by a replica with another secret); deleting it"
        )
        self._on_reject()
        with contextlib.suppress(Unavailable):
            await self.call(lambda c: c.delete(name))

    async def evict(self, key: str) -> None:
        with contextlib.suppress(Unavailable):
            await self.call(lambda c: c.delete(self.names.entry(key)))

    # -- writes -------------------------------------------------------------------------------

    def publish(
        self, key: str, meta: EntryMeta, read: Callable[[int, int], Coroutine[Any, Any, bytes]]
    ) -> None:
        """Store the artifact ``key`` in Redis in the background (bounded: when too many
        uploads wait, this one is dropped). ``read(offset, size)`` returns its bytes."""
        if meta.length > self.max_object_bytes:
            self._on_write("too_large")
            return
        if self._pending >= MAX_PENDING_WRITES:
            self._on_write("dropped")
            return
        self._pending += 1
        self._spawn(self._upload(key, meta, read))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _upload(
        self, key: str, meta: EntryMeta, read: Callable[[int, int], Coroutine[Any, Any, bytes]]
    ) -> None:
        name = self.names.entry(key)
        temp = self.names.temporary(key)
        try:
            async with self._writers:
                if await self.call(lambda c: c.exists(name)):
                    self._on_write("present")
                    return
                position = 0
                await self.call(lambda c: c.set(temp, b"", px=TEMP_TTL_MS))
                while position < meta.length:
                    data = await read(position, min(self.chunk_size, meta.length - position))
                    if not data:
                        raise OSError("the stored entry is shorter than its record")
                    await self._append(temp, data, position)
                    position += len(data)
                trailer = self.names.seal(name, meta)
                await self._append(temp, trailer, position)
                await self.call(lambda c: c.rename(temp, name))
                await self.call(lambda c: c.pexpire(name, self.ttl_ms))
            self._on_write("stored")
        except (Unavailable, OSError) as exc:
            self._on_write("failed")
            log.info("could not store an artifact in Redis (%s)", exc)
            with contextlib.suppress(Unavailable):
                await self.call(lambda c: c.delete(temp))
        finally:
            self._pending -= 1

    # -- proofs -------------------------------------------------------------------------------

    def share_proofs(
        self, fingerprint: str, scopes: tuple[tuple[str, ...], ...], proven: float, life: float
    ) -> None:
        """Write proofs recorded at ``proven`` for ``life`` seconds, in the background."""
        if self._pending >= MAX_PENDING_WRITES:
            return
        self._pending += 1
        self._spawn(self._write_proofs(fingerprint, scopes, proven, life))

    async def _write_proofs(
        self, fingerprint: str, scopes: tuple[tuple[str, ...], ...], proven: float, life: float
    ) -> None:
        value = str(int(proven * 1000)).encode()
        try:
            for scope in scopes:
                name = self.names.proof(fingerprint, scope)
                sealed = value + self.names.sign(name, value)
                await self._set(name, sealed, int(life * 1000))
        except Unavailable:
            pass
        finally:
            self._pending -= 1

    async def proven_at(self, fingerprint: str, scope: tuple[str, ...]) -> float | None:
        """When another replica proved ``fingerprint`` for ``scope``; None if none did (or its
        record fails the HMAC, or Redis is unavailable)."""
        name = self.names.proof(fingerprint, scope)
        try:
            found: bytes = await self.call(lambda c: c.getrange(name, 0, PROOF_READ - 1))
        except Unavailable:
            return None
        if not found or len(found) <= _SIG:
            return None
        value, sig = found[:-_SIG], found[-_SIG:]
        if not hmac.compare_digest(sig, self.names.sign(name, value)) or not value.isdigit():
            return None
        return int(value) / 1000

    # -- operators ----------------------------------------------------------------------------

    async def delete_matching(self, pattern: str) -> int:
        """Delete every key matching ``pattern`` (on every master of a cluster)."""
        deleted = 0
        batch: list[bytes] = []
        async for found in self.call.client.scan_iter(match=pattern, count=500):
            batch.append(found)
            if len(batch) >= 500:
                deleted += await self._unlink(batch)
                batch = []
        if batch:
            deleted += await self._unlink(batch)
        return deleted

    async def _unlink(self, names: list[bytes]) -> int:
        count = 0
        for name in names:  # one by one: keys of a cluster live in different slots
            count += int(await self.call.client.unlink(name))
        return count

    async def census(self) -> tuple[int, int]:
        """(entries, bytes) of artifacts under this prefix: a scan, for the operator's stats."""
        entries = size = 0
        async for found in self.call.client.scan_iter(match=self.names.entries_pattern()):
            if b":tmp:" in found:
                continue
            entries += 1
            size += int(await self.call.client.strlen(found))
        return entries, size

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.call.aclose()
