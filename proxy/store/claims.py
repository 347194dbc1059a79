"""Single-flight across processes: which process fetches a key, when several serve one cache.

:class:`Coordinator` is the interface the fills use (in-process single-flight is
:class:`proxy.fills.Fills` itself); :class:`Claims` implements it across the worker processes of
one host with ``flock``, and a shared tier may implement it with a lease.

With ``--workers N`` every worker shares the disk cache. Before fetching a key from upstream, a
worker takes an exclusive ``flock`` on one of :data:`SLOTS` lock files chosen by the key's hash.
Locks die with their process, so a crashed worker never leaves a key stuck. Two keys sharing a
slot never share bytes, nor wait for each other: as it takes the lock, the holder writes which
key it fetches into the lock file (:class:`Holding`), and a key that finds its slot held for
another key is fetched at once, unclaimed (at worst another worker fetches it too), rather than
after that fill or ``first_byte_timeout``. A small fill kept in memory announces nothing, and a
fill announces only once upstream answered: the key is all such a waiter has to go on.

The holder, once it knows the body will be stored, *announces* its fill (:meth:`Lease.announce`):
a small JSON record, written into the lock file it holds, naming the key, the temporary file it
is writing and what upstream said about the body. A worker that finds the lock taken and an
announcement for its key gets that :class:`Announcement` back instead of waiting, and follows
the file as it grows (:mod:`proxy.fills`); without one (the holder has not begun writing yet, or
will not store the body) it waits as before and then reads the committed entry from disk. An
announcement is only believed while the lock is held, and whoever takes the lock clears what the
last holder (finished or crashed) left, so a finished or crashed fill is never followed (the
follower also checks the temporary file's own lock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.to_thread

from proxy.store.locks import try_lock
from proxy.threads import run_sync

#: How often a waiting process looks again whether a holder finished (a cross-process wait:
#: there is no event to wait on).
POLL_SECONDS = 0.005


@dataclasses.dataclass(frozen=True)
class Announcement:
    """A running fill another process announced: enough for a follower to stream it."""

    key: str
    #: The temporary file's name in the store's ``tmp/`` (a name, never a path).
    name: str
    content_type: str
    #: The body's length as stored, when known in advance.
    expected_length: int | None
    #: :meth:`proxy.validators.Validators.to_dict` of the upstream's 200.
    validators: dict[str, Any]
    #: Fingerprint of the credential the holder fetches with.
    filler: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Announcement | None:
        """The record, or None if it is not one (torn, foreign, hand-edited)."""
        try:
            data = json.loads(text)
            record = cls(
                key=str(data["key"]),
                name=str(data["name"]),
                content_type=str(data["content_type"]),
                expected_length=(
                    None if data["expected_length"] is None else int(data["expected_length"])
                ),
                validators=dict(data["validators"]),
                filler=str(data["filler"]),
            )
        except (ValueError, KeyError, TypeError):
            return None
        if "/" in record.name or record.name.startswith("."):
            return None
        return record


@dataclasses.dataclass(frozen=True)
class Holding:
    """What a holder records as it takes a slot's lock: only the key it fetches (nothing to
    follow yet), so that a process wanting another key of the slot need not wait for it."""

    key: str

    def to_json(self) -> str:
        return json.dumps({"key": self.key}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Holding | None:
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.keys() != {"key"} or not isinstance(data["key"], str):
            return None
        return cls(data["key"])


class Lease(Protocol):
    def release(self) -> None:
        """Give the key back (idempotent); others waiting for it may go on."""

    def announce(self, announcement: Announcement) -> None:
        """Tell other processes which temporary file this fill writes (best effort)."""


class Coordinator(Protocol):
    async def claim(
        self, key: str, patience: float, stored: Callable[[], bool] | None = None
    ) -> Lease | Announcement | AlreadyStored | None:
        """A lease to fetch ``key`` once no other process holds one, or the holder's
        :class:`Announcement` as soon as it has made one (then follow its fill); ``None`` if
        neither came within ``patience`` seconds (the caller then fetches regardless: a
        duplicate fetch beats a timeout), or at once when the slot's holder announced another
        key. Another process may have stored the key before the lease was taken: ``stored``
        (blocking) is asked with the lease held, in the same worker-thread hop, and if it
        says so the lease is given back and :data:`ALREADY_STORED` returned."""

    def try_now(self, key: str, stored: Callable[[], bool]) -> Lease | None:
        """Blocks. The lease of ``key`` at once if no other process holds one and ``stored``
        (asked with it held) says the key is not stored; otherwise None, having waited for
        nothing (the caller then goes through :meth:`claim`)."""


class AlreadyStored:
    """The type of :data:`ALREADY_STORED`."""


#: What :meth:`Coordinator.claim` returns when the key turned out to be stored already.
ALREADY_STORED = AlreadyStored()


#: Lock files at most (created on first use; a holder writes its announcement into its own).
SLOTS = 4096
#: Bytes a :class:`Holding` record is padded to: more than most announcements take.
_HOLDING_BYTES = 1024


class _Held:
    """A held slot lock; its announcement is written into the lock file itself.

    Writing it there, not into a file of its own, keeps a miss from creating and deleting an
    inode: on ext4 without a journal every such create scans past recently deleted inodes,
    which made that churn the largest cost of a miss (bench/misses.py)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def announce(self, announcement: Announcement) -> None:
        if self._fd is None:
            return
        data = announcement.to_json().encode()
        # A reader may see it empty or torn: that parses as no announcement, and it looks again.
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError:  # followers then wait for the commit instead
            pass

    def release(self) -> None:
        """Drop the lock. What was announced stays in the file (clearing it here was a syscall
        on the event loop per miss) and is never followed: a reader believes it only while
        someone holds the lock, and whoever takes the lock next clears it first."""
        if self._fd is not None:
            Claims.release(self._fd)
            self._fd = None


class Claims:
    """:class:`Coordinator` for the worker processes of one host: ``flock`` on lock files."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory) / "locks"
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, key: str) -> Path:
        slot = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % SLOTS
        return self.directory / f"{slot:04x}.lock"

    def _record(self, key: str) -> Path:
        """Where the holder of ``key``'s slot announces its fill: the lock file itself."""
        return self._path(key)

    def announced(self, key: str) -> Announcement | None:
        """The announcement of the running fill of ``key`` in another process, if any.

        Only meaningful while that process holds the key's lock (the caller just failed to
        take it); the follower still checks that the file's writer is alive."""
        announcement = self._announcement(key)
        if announcement is None or announcement.key != key:  # another key of the slot
            return None
        return announcement

    def _announcement(self, key: str) -> Announcement | None:
        """What the holder of ``key``'s slot announced, whichever key it fetches."""
        found = self._holder(key)
        return found if isinstance(found, Announcement) else None

    def _holder(self, key: str) -> Announcement | Holding | None:
        """What the holder of ``key``'s slot recorded, whichever key it fetches: its
        announcement, or only the key (:class:`Holding`), or None (nothing readable)."""
        try:
            fd = os.open(self._record(key), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(fd) as record:
            try:
                text = record.read(64 * 1024)
            except (OSError, UnicodeDecodeError):
                return None
        return Announcement.from_json(text) or Holding.from_json(text)

    def try_claim(self, key: str) -> int | None:
        """A held lock (its descriptor) if no other process is fetching ``key``, else None.

        What the last holder left (finished or crashed) is replaced first by which key this
        one fetches (:class:`Holding`): nobody may follow it. Best effort: if that record
        cannot be written (a full disk), the file is only emptied, and waiters of other keys
        of the slot wait as they would for an unannounced fill."""
        fd = try_lock(self._path(key))
        if fd is None:
            return None
        # Padded (JSON allows trailing spaces) to cover what an announcement usually leaves, so
        # that the file rarely needs truncating: a pwrite and an fstat cost ~2 us here, where an
        # ftruncate alone costs ~4 us. A torn read parses as no record.
        record = Holding(key).to_json().encode().ljust(_HOLDING_BYTES)
        try:
            try:
                os.pwrite(fd, record, 0)
                if os.fstat(fd).st_size > len(record):
                    os.ftruncate(fd, len(record))
            except OSError:
                os.ftruncate(fd, 0)
        except OSError:
            self.release(fd)
            raise
        return fd

    @staticmethod
    def release(fd: int) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _attempt(
        self, key: str, stored: Callable[[], bool] | None = None
    ) -> Lease | Announcement | Holding | AlreadyStored | None:
        """A lease (or :data:`ALREADY_STORED`); or what the holder recorded, of any key (None
        if nothing readable)."""
        fd = self.try_claim(key)
        if fd is None:
            return self._holder(key)
        try:
            if stored is not None and stored():
                self.release(fd)
                return ALREADY_STORED
        except BaseException:
            self.release(fd)
            raise
        return _Held(fd)

    def try_now(self, key: str, stored: Callable[[], bool]) -> Lease | None:
        got = self._attempt(key, stored)
        return got if isinstance(got, _Held) else None

    async def claim(
        self, key: str, patience: float, stored: Callable[[], bool] | None = None
    ) -> Lease | Announcement | AlreadyStored | None:
        give_up = time.monotonic() + patience
        while True:
            got = await run_sync(self._attempt, key, stored)
            if isinstance(got, (Announcement, Holding)) and got.key != key:
                # The slot's holder fetches another key (they share one of the SLOTS): waiting
                # would wait for that fill, as long as it lasts; fetch now, unclaimed.
                return None
            if got is not None and not isinstance(got, Holding):  # ours, unannounced: wait
                return got
            if time.monotonic() > give_up:
                return None
            await anyio.sleep(POLL_SECONDS)
