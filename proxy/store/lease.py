"""Fleet single-flight in Redis: which replica fetches an artifact, and what it tells the others.

Three keys per artifact, in the entry's slot (the same hash tag, so Redis Cluster keeps them
together and one script may touch them all), named like temporary keys so that ``stats`` does
not count them as entries and ``purge`` deletes them with the rest:

* ``<entry>:tmp:lease`` — the **lease**: ``SET NX PX redis_lease_ttl`` with a random token. Its
  holder fetches from upstream; it renews the lease (and the record) every third of its life
  while the fetch runs, and deletes both when done, but only while the token is still its own
  (compare-and-delete in a script: a holder that stalled past its lease must not delete its
  successor's). A holder that dies stops renewing; the lease expires and the next replica to ask
  takes over.
* ``<entry>:tmp:fill`` — the **record**: what the holder learnt from upstream's 200 (type,
  length, validators, the filler's credential fingerprint) and the name of the temporary key it
  streams the body into (:mod:`proxy.store.shared`'s layout: body first, trailer last, then
  ``RENAME``), sealed with an HMAC under the replicas' secret. Or, for a body that will not go
  to Redis (too large, no ``Content-Length``, coded), a sealed "not shared" record, so that
  waiters fetch on their own at once instead of queueing for the lease one after another.
* the temporary key itself, which waiters read with ``GETRANGE`` as it grows
  (:mod:`proxy.fleet`).

Nothing here is trusted for the bytes: a waiter hashes what it reads and completes only if the
published entry's sealed metadata has that sha256 and length. Someone who can write to Redis but
lacks the secret can forge neither a record nor an entry; at worst they deny service. Every
call may fail (:class:`~proxy.store.redisclient.Unavailable`): callers then fall back to the
local single-flight and fetch on their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import secrets
import time
from typing import Any

import anyio

from proxy.store.redisclient import Guarded, Unavailable
from proxy.store.shared import TAIL_READ, Names

#: Renew the lease and its record if they are still ours; 1 if renewed.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0
"""
#: Delete the lease and its record if the lease is still ours; ARGV[2] (optional) replaces the
#: record instead, for ARGV[3] ms (the "not shared" record).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] ~= '' then
    redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  else
    redis.call('DEL', KEYS[2])
  end
  return 1
end
return 0
"""

#: Bytes of a lease or a record read at most: a genuine lease is a 32-character token and a
#: record a few KiB of JSON; anything longer was written by someone else, and a waiter polls
#: every few ms, so it must not pull such a value in whole each time.
VALUE_READ = 64 * 1024
#: The lease and the record, each cut at ARGV[1] bytes ("" for a key that is not there).
_READ_BOTH = """
return {redis.call('GETRANGE', KEYS[1], 0, ARGV[1]), redis.call('GETRANGE', KEYS[2], 0, ARGV[1])}
"""

#: First and longest pause between two looks at a lease whose holder has not published yet.
POLL_FIRST = 0.002
POLL_MOST = 0.02


@dataclasses.dataclass(frozen=True)
class Record:
    """What a lease holder published about its fetch."""

    token: str
    #: False: the body will not go to Redis; waiters fetch on their own.
    shared: bool
    #: The temporary key the body grows in.
    temp: str = ""
    content_type: str = "application/octet-stream"
    expected_length: int = 0
    validators: dict[str, Any] = dataclasses.field(default_factory=dict)
    filler: str = ""

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, text: bytes) -> Record | None:
        try:
            data = json.loads(text)
            record = cls(
                token=str(data["token"]),
                shared=bool(data["shared"]),
                temp=str(data["temp"]),
                content_type=str(data["content_type"]),
                expected_length=int(data["expected_length"]),
                validators=dict(data["validators"]),
                filler=str(data["filler"]),
            )
        except (ValueError, KeyError, TypeError):
            return None
        return record if record.expected_length >= 0 else None


class Keys:
    """The names of one artifact's fleet keys."""

    def __init__(self, names: Names, cache_key: str) -> None:
        self.names = names
        self.cache_key = cache_key
        self.entry = names.entry(cache_key)
        self.lease = f"{self.entry}:tmp:lease"
        self.record = f"{self.entry}:tmp:fill"

    def seal(self, record: Record) -> bytes:
        text = record.to_json()
        return text + self.names.sign(self.record, text)

    def unseal(self, value: bytes | None) -> Record | None:
        """The record in ``value``, or None if absent, damaged or written without the secret."""
        if not value or len(value) <= 32:
            return None
        text, sig = value[:-32], value[-32:]
        if not hmac.compare_digest(sig, self.names.sign(self.record, text)):
            return None
        return Record.from_json(text)


class Held:
    """A lease this replica holds (see the module docstring); renew it while fetching."""

    def __init__(self, call: Guarded, keys: Keys, token: str, ttl_ms: int, after: bool) -> None:
        self.call = call
        self.keys = keys
        self.token = token
        self.ttl_ms = ttl_ms
        #: True when another replica held the lease first and stopped without finishing.
        self.taken_over = after
        self.released = False

    async def renew(self) -> bool:
        """True while the lease is still ours (False: lost, or Redis unavailable)."""
        try:
            kept = await self.call(
                lambda c: c.eval(
                    _RENEW, 2, self.keys.lease, self.keys.record, self.token, self.ttl_ms
                )
            )
        except Unavailable:
            return False
        return bool(kept)

    async def publish(self, record: Record) -> None:
        """Tell waiters about the fetch (raises Unavailable)."""
        await self.call(lambda c: c.set(self.keys.record, self.keys.seal(record), px=self.ttl_ms))

    async def release(self, unshared: bool = False) -> None:
        """Give the lease back if it is still ours (idempotent, never raises). With
        ``unshared``, leave a record telling waiters to fetch on their own."""
        if self.released:
            return
        self.released = True
        note = b""
        if unshared:
            note = self.keys.seal(Record(self.token, False))
        with contextlib.suppress(Unavailable):  # else it expires by itself
            await self.call(
                lambda c: c.eval(
                    _RELEASE, 2, self.keys.lease, self.keys.record, self.token, note, self.ttl_ms
                )
            )


class Stored:
    """The artifact is in Redis already: look it up instead of fetching."""


STORED = Stored()


async def claim(
    call: Guarded, names: Names, cache_key: str, ttl: float, patience: float
) -> Held | Record | Stored | None:
    """Ask Redis who fetches ``cache_key`` for the fleet.

    Returns a :class:`Held` lease (fetch it, and share it); the holder's :class:`Record` (follow
    it if ``shared``, else fetch on your own); :data:`STORED` (another replica finished: look it
    up); or None: fetch on your own (Redis is unavailable, or no holder published within
    ``patience`` seconds). Raises nothing.
    """
    keys = Keys(names, cache_key)
    ttl_ms = max(1, int(ttl * 1000))
    give_up = time.monotonic() + patience
    pause = POLL_FIRST
    seen_holder = False
    try:
        while True:
            token = secrets.token_hex(16)
            if await _take(call, keys, token, ttl_ms):
                held = Held(call, keys, token, ttl_ms, seen_holder)
                if await _stored(call, keys):
                    await held.release()
                    return STORED
                note = keys.unseal(await _read(call, keys.record))
                if note is not None and not note.shared:  # the last holder could not share
                    await held.release(unshared=True)
                    return note
                return held
            holder, value = await call(
                lambda c: c.eval(_READ_BOTH, 2, keys.lease, keys.record, VALUE_READ - 1)
            )
            record = keys.unseal(value)
            # Compared as bytes: a lease anyone rewrote need not even be UTF-8.
            mine = record is not None and (not holder or holder == record.token.encode())
            if record is not None and mine and (not record.shared or bool(holder)):
                return record
            if holder:
                seen_holder = True
            elif await _stored(call, keys):
                return STORED
            if time.monotonic() > give_up:
                return None
            await anyio.sleep(pause)
            pause = min(pause * 2, POLL_MOST)
    except Unavailable:
        return None


async def _take(call: Guarded, keys: Keys, token: str, ttl_ms: int) -> bool:
    return bool(await call(lambda c: c.set(keys.lease, token, nx=True, px=ttl_ms)))


async def _stored(call: Guarded, keys: Keys) -> bool:
    found: bytes = await call(lambda c: c.getrange(keys.entry, -TAIL_READ, -1))
    return bool(found) and keys.names.unseal(keys.entry, found) is not None


async def holder_is(call: Guarded, keys: Keys, token: str) -> bool:
    """True while ``token`` holds the lease (raises Unavailable)."""
    return await _read(call, keys.lease) == token.encode()


async def _read(call: Guarded, name: str) -> bytes:
    """The value at ``name``, at most :data:`VALUE_READ` bytes of it (b"" if there is none)."""
    found: bytes = await call(lambda c: c.getrange(name, 0, VALUE_READ - 1))
    return found
