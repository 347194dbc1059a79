"""The disk tier: a diskcache LRU of artifact files with our own byte-aware eviction.

diskcache keeps the index (SQLite) and the files; we add what it lacks (see docs/lessons.md):

* keys are ``str`` and values are files (``read=True``), metadata is JSON in the ``tag``
  column: nothing is ever pickled, so a writable cache directory cannot run code;
* a finished fill is *renamed* into place (:class:`_AdoptingDisk`), not copied, after an fsync;
* diskcache's own culling is off (it overshoots); :meth:`DiskStore.commit` evicts least recently
  used entries until the new object fits, so the artifact bytes never exceed ``max_bytes``, under
  a lock every process shares, a batch at a time (see :meth:`DiskStore._room`);
* a damaged index ("database disk image is malformed", a garbage ``cache.db``), found at start-up
  or later, is moved aside and deleted, and the store starts cold instead of failing requests;
* hits skip SQLite: a bounded in-memory index maps keys to (file, metadata). diskcache's LRU
  ``get`` is a write transaction that serialises every hit; instead, access times are collected in
  memory and written in one batch by :meth:`DiskStore.flush_touches` (the app calls it every
  :data:`TOUCH_FLUSH_SECONDS`; eviction calls it first).
  The memory index can only be stale in one way, a file that was evicted (perhaps by another
  process): opening it then fails and the lookup falls back to SQLite. Cached files never change
  once written, and their names are never reused.

Access times and eviction victims are written and read through :mod:`proxy.store.index`, which
the operator's commands use too; what a crash leaves behind is swept by :mod:`proxy.store.sweeps`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import diskcache
from diskcache.core import MODE_BINARY

from proxy.store import Entry, EntryMeta, FillFile, StoreStats, sweeps
from proxy.store.index import ENTRIES_DIR, INDEX_FILE, Index, Readers
from proxy.store.locks import unheld

log = logging.getLogger(__name__)

_TMP_SUFFIX = ".fill"
_EVICT_BATCH = 1024
#: Renames of a committed file into its directory, making the directory between them.
_RENAME_ATTEMPTS = 3
#: Longest time access times stay only in memory before they are written to the index.
TOUCH_FLUSH_SECONDS = 1.0
#: Entries remembered by the in-memory index.
MEMO_ENTRIES = 100_000


def peek_stats(directory: str | Path, max_bytes: int) -> StoreStats:
    """Entries and bytes of the disk tier in ``directory``, read from its index read-only.

    For start-up messages and ``doctor``, beside a server that may be running: no sweep, no
    reset, no directory created (SQLite may add its ``-wal``/``-shm`` files next to the index).
    A directory without an index yet holds nothing. Raises ``sqlite3.Error`` if the index does
    not open or answer (for instance when it is damaged).
    """
    db_path = Path(directory) / "entries" / "cache.db"
    if not db_path.exists():
        return StoreStats(bytes=0, entries=0, max_bytes=max_bytes)
    uri = f"file:{db_path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=2)) as db:
        rows = db.execute("SELECT key, value FROM Settings WHERE key IN ('count', 'size')")
        settings = {str(key): int(value) for key, value in rows.fetchall()}
    return StoreStats(
        bytes=settings.get("size", 0), entries=settings.get("count", 0), max_bytes=max_bytes
    )


class _Adopt:
    """A value that tells :class:`_AdoptingDisk` to move this file (of ``size`` bytes) into
    the cache."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        #: Where it was moved to, once it was.
        self.placed: str | None = None


def _adopt(fill: FillFile) -> _Adopt:
    """The :class:`_Adopt` of a written fill, sized by its open descriptor."""
    return _Adopt(fill.path, os.fstat(fill.file.fileno()).st_size)


class _AdoptingDisk(diskcache.Disk):  # type: ignore[misc]
    """A diskcache Disk that takes over a finished file by rename instead of copying it, into
    one of 256 directories.

    diskcache names a file ``ab/cd/<hex>.val`` from 16 random bytes: 65,536 directories, so
    nearly every commit to a cache of fewer than some 100,000 entries made a directory, and on
    ext4 a directory costs what a file does (an inode, a block). Here the second level is
    always ``00``: 256 directories (made as first needed), some 4,000 files each at a million
    entries, which ext4's hashed directories look up as fast. The names keep diskcache's shape,
    so entries stored under either scheme live side by side (the orphan sweep and the index
    check both)."""

    def filename(self, key: Any = diskcache.core.UNKNOWN, value: Any = None) -> tuple[str, str]:
        name = os.urandom(16).hex()
        filename = f"{name[:2]}/00/{name[2:]}.val"
        return filename, os.path.join(self._directory, filename)

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if not isinstance(value, _Adopt):
            return super().store(value, read, key=key)
        filename, full_path = self.filename(key, value)
        for attempt in range(_RENAME_ATTEMPTS):
            try:
                os.rename(value.path, full_path)
                value.placed = full_path
                break
            except FileNotFoundError:
                # Its directory is not there yet, or the eviction of its last file removed it
                # (diskcache's ``remove`` does) between our makedirs and rename.
                if attempt == _RENAME_ATTEMPTS - 1:
                    raise
                os.makedirs(os.path.dirname(full_path), exist_ok=True)
        return value.size, MODE_BINARY, filename, None


class DiskStore:
    """The disk tier. See :mod:`proxy.store` for the contract."""

    def __init__(
        self,
        directory: str | Path,
        max_bytes: int,
        max_object_bytes: int,
        on_evict: Callable[[int], None] = lambda _size: None,
        on_reset: Callable[[], None] = lambda: None,
        on_evict_unread: Callable[[int], None] = lambda _size: None,
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.max_object_bytes = max_object_bytes
        self._on_evict = on_evict
        self._on_reset = on_reset
        self._on_evict_unread = on_evict_unread
        self._tmp = self.directory / "tmp"
        self._commit_lock_path = self.directory / "locks" / "commit.lock"
        self._entries_dir = self.directory / ENTRIES_DIR
        self._index = Index(self._entries_dir)
        self._commit_lock = threading.RLock()
        self._memo: OrderedDict[str, tuple[str, EntryMeta]] = OrderedDict()
        self._touched: dict[str, float] = {}
        self._memo_lock = threading.Lock()
        #: Set by :meth:`close`: a running orphan sweep stops at its next pause.
        self._closing = threading.Event()
        self._tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._commit_lock_path.parent.mkdir(exist_ok=True, mode=0o700)
        self._db_path = self._entries_dir / INDEX_FILE
        #: The read-only index connections lookups share.
        self._readers = Readers(self._db_path)
        try:
            self._cache = self._open()
        except sqlite3.DatabaseError as exc:
            self._quarantine(exc)
            self._cache = self._open()

    def _open(self) -> diskcache.Cache:
        self._entries_dir.mkdir(exist_ok=True, mode=0o700)  # before diskcache makes it 0755
        cache = diskcache.Cache(
            str(self._entries_dir),
            disk=_AdoptingDisk,
            eviction_policy="least-recently-used",
            size_limit=2**62,  # culling is ours; see module docstring
            cull_limit=0,
            statistics=False,
        )
        try:
            cache.reset("count")  # reads the index: a damaged one fails here
        except BaseException:
            cache.close()
            raise
        return cache

    def _quarantine(self, exc: Exception) -> None:
        """Move the damaged entries aside (then delete them in the background) and start cold."""
        aside = self.directory / f"entries.damaged-{time.time_ns()}"
        log.error("cache index is damaged (%s); moved to %s, starting cold", exc, aside.name)
        with contextlib.suppress(FileNotFoundError):
            os.rename(self._entries_dir, aside)
        threading.Thread(
            target=shutil.rmtree, args=(aside,), kwargs={"ignore_errors": True}, daemon=True
        ).start()
        self._on_reset()

    def _damaged(self, cache: diskcache.Cache, exc: sqlite3.DatabaseError) -> None:
        """Called when ``cache`` raised: reset the store if the index itself is damaged."""
        if type(exc) is not sqlite3.DatabaseError:  # locked, I/O error...: not damage
            log.warning("cache index error: %s", exc)
            return
        with self._commit_lock:
            if self._cache is not cache:  # another thread already reset it
                return
            cache.close()
            self._quarantine(exc)
            self._readers.reset()
            with self._memo_lock:
                self._memo.clear()
                self._touched.clear()
            self._cache = self._open()

    # -- reads -------------------------------------------------------------------------------

    def get(self, key: str, memory_only: bool = False) -> Entry | None:
        with self._memo_lock:
            known = self._memo.get(key)
        if known is not None:
            path, meta = known
            try:
                handle = open(path, "rb")  # noqa: SIM115 (the caller closes it)
            except FileNotFoundError:
                self._forget(key)
            else:
                self.touch(key)
                return Entry(meta=meta, file=handle)
        if memory_only:
            return None
        entry = self._get_indexed(key)
        if entry is not None:
            self._remember(key, entry.file.name, entry.meta)
        return entry

    def _remember(self, key: str, path: str, meta: EntryMeta) -> None:
        with self._memo_lock:
            self._memo[key] = (path, meta)
            if len(self._memo) > MEMO_ENTRIES:
                self._memo.popitem(last=False)

    def _forget(self, key: str) -> None:
        with self._memo_lock:
            self._memo.pop(key, None)
            self._touched.pop(key, None)

    def touch(self, key: str) -> None:
        """Record a read of ``key`` (also one served by a faster tier), for recency."""
        with self._memo_lock:
            self._touched[key] = time.time()

    def remembers(self, key: str, max_length: int) -> bool:
        """True if ``key`` is in the memory index with at most ``max_length`` bytes: its
        :meth:`get` then costs an ``open`` and no SQLite. Never blocks."""
        known = self._memo.get(key)
        return known is not None and known[1].length <= max_length

    def flush_touches(self) -> None:
        """Write collected access times to the index, where eviction reads them."""
        with self._memo_lock:
            touched, self._touched = self._touched, {}
        if not touched:
            return
        try:
            self._index.record_access_times(touched)
        except sqlite3.Error as exc:  # recency is advice; losing one batch is harmless
            log.warning("could not record access times: %s", exc)

    def _get_indexed(self, key: str) -> Entry | None:
        """Look ``key`` up with a read-only query: diskcache's LRU ``get`` would be a write
        transaction per hit (recency goes through :meth:`_touch` and the batched flush)."""
        cache = self._cache
        try:
            with self._readers.connection() as db:
                row = db.execute(
                    "SELECT filename, tag FROM Cache WHERE key = ? AND raw = 1", (key,)
                ).fetchone()
        except sqlite3.DatabaseError as exc:
            self._damaged(cache, exc)
            return None
        except sqlite3.Error as exc:  # locked, I/O error: not damage
            log.warning("cache index read failed (%s); treating as a miss", type(exc).__name__)
            return None
        if row is None or row[0] is None:
            return None
        filename, tag = row
        try:
            handle = open(self._entries_dir / filename, "rb")  # noqa: SIM115 (the caller closes it)
        except FileNotFoundError:  # evicted meanwhile
            return None
        try:
            meta = EntryMeta.from_json(tag)
        except (TypeError, ValueError, KeyError):
            handle.close()
            self.evict(key)
            return None
        self.touch(key)
        return Entry(meta=meta, file=handle)

    # -- fills -------------------------------------------------------------------------------

    def begin_fill(self) -> FillFile:
        """A new temporary file, locked (``flock``) for as long as it is open: that lock is how
        :meth:`sweep_temporary`, in any process, tells a live fill from a crashed one's."""
        fd_path = self._tmp / f"{os.urandom(12).hex()}{_TMP_SUFFIX}"
        fd = os.open(fd_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return FillFile(path=str(fd_path), file=os.fdopen(fd, "wb"))

    def open_fill(self, name: str) -> int | None:
        """A read-only descriptor of the running fill file ``name`` (another process's, see
        :mod:`proxy.store.claims`), or None if it is gone or its writer has finished. The caller
        closes it. ``name`` is resolved inside ``tmp/`` only, without following links."""
        if not name.endswith(_TMP_SUFFIX) or "/" in name or name.startswith("."):
            return None
        try:
            tmp = os.open(self._tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=tmp)
        except OSError:
            return None
        finally:
            os.close(tmp)
        if unheld(fd):  # its writer has finished
            os.close(fd)
            return None
        return fd

    def commit(self, key: str, fill: FillFile, meta: EntryMeta, sync: bool = True) -> bool:
        if sync:
            try:
                fill.file.flush()
                os.fsync(fill.file.fileno())
            except OSError:
                self.discard(fill)
                raise
        (outcome,) = self.commit_many([(key, fill, meta)])
        if isinstance(outcome, OSError):
            raise outcome
        return outcome

    def commit_many(self, items: Sequence[tuple[str, FillFile, EntryMeta]]) -> list[bool | OSError]:
        """:meth:`commit` (without an fsync) of each of ``items``, under one hold of the commit
        lock and in one transaction: True once stored, False if refused, or the ``OSError``
        that kept its file from its place (the others are stored regardless). The store takes
        every file over, whatever the outcome.

        A small miss's commit costs half as much in a batch of 32 as alone (the lock's
        ``flock``, the room check, the transaction's WAL frames and locks are paid once):
        :mod:`proxy.store.batches` gathers the commits of small fills so.

        Items that together exceed ``max_bytes`` (32 small entries of a small store) go in
        parts that each fit, one after another, as separate commits would: the room made for
        one part evicts the parts before it, and the store stays within ``max_bytes``."""
        outcomes: list[bool | OSError] = []
        start = 0
        try:
            for end in self._parts(items):
                part = items[start:end]
                try:
                    outcomes += self._commit_part(part)
                except OSError as exc:  # the whole part's (the lock's, say), not the parts before
                    outcomes += [exc] * len(part)
                start = end
        finally:
            for _key, fill, _meta in items[len(outcomes) :]:  # a part raised: the rest dropped
                self.discard(fill)
        return outcomes

    def _parts(self, items: Sequence[tuple[str, FillFile, EntryMeta]]) -> Iterator[int]:
        """Where each part of ``items`` ends, each part's entries fitting in ``max_bytes``
        together (those over ``max_object_bytes``, refused, take no room)."""
        total = 0
        for i, (_key, _fill, meta) in enumerate(items):
            length = meta.length if meta.length <= self.max_object_bytes else 0
            if i and total + length > self.max_bytes:
                yield i
                total = 0
            total += length
        yield len(items)

    def _commit_part(
        self, items: Sequence[tuple[str, FillFile, EntryMeta]]
    ) -> list[bool | OSError]:
        """:meth:`commit_many` of ``items`` that fit in ``max_bytes`` together."""
        outcomes: list[bool | OSError] = [False] * len(items)
        placed: list[_Adopt] = []
        try:
            for _key, fill, _meta in items:
                fill.file.flush()
            kept = [
                i for i, (_, _, meta) in enumerate(items) if meta.length <= self.max_object_bytes
            ]
            if not kept:
                return outcomes
            cache = self._cache
            unread: dict[str, float] = {}  # prefetched: the first to go, until a client reads it
            try:
                incoming = sum(items[i][2].length for i in kept)
                with self._room(incoming, replacing=[items[i][0] for i in kept]):
                    with cache.transact():
                        for i in kept:
                            key, fill, meta = items[i]
                            value = _adopt(fill)
                            placed.append(value)
                            try:
                                cache.set(key, value, read=True, tag=meta.to_json())
                            except OSError as exc:  # not moved, and before any SQL: go on
                                outcomes[i] = exc
                                continue
                            outcomes[i] = True
                            if meta.prefetched:
                                unread[key] = 0.0
                    placed = []  # indexed: theirs now
                    if unread:
                        self._index.record_access_times(unread)
            except sqlite3.DatabaseError as exc:
                self._damaged(cache, exc)
                outcomes = [False] * len(items)
            except diskcache.Timeout:  # another connection held the index past SQLite's timeout
                locked = OSError(errno.EBUSY, "the cache index stayed locked")
                outcomes = [locked] * len(items)
            return outcomes
        finally:
            # Moved into place, but the transaction was rolled back (diskcache leaves the file
            # of a set that failed after its move, too).
            for value in placed:
                if value.placed is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(value.placed)
            for (_key, fill, _meta), outcome in zip(items, outcomes, strict=True):
                if outcome is True:  # renamed into place: only its descriptor (and lock) is left
                    with contextlib.suppress(OSError):
                        fill.file.close()
                else:
                    self.discard(fill)

    def load(self, items: Iterable[tuple[str, bytes, EntryMeta]], batch: int = 500) -> int:
        """Store many entries at once (benchmarks, imports); returns how many were stored.

        Each batch's files are written as fills are (:meth:`begin_fill`: locked, so no sweep
        takes them) but without an fsync each, and committed together (:meth:`commit_many`);
        one ``sync`` at the end makes them durable. About 50x faster than a :meth:`commit` per
        entry, which pays an fsync and a transaction each: not for the serving path, where each
        fill must be durable on its own. A batch holds one descriptor per entry. Entries over
        ``max_object_bytes`` are skipped.
        """
        stored = 0
        pending: list[tuple[str, FillFile, EntryMeta]] = []
        try:
            for key, body, meta in items:
                if meta.length > self.max_object_bytes:
                    continue
                fill = self.begin_fill()
                pending.append((key, fill, meta))
                fill.file.write(body)
                if len(pending) >= batch:
                    stored += self._stored(self.commit_many(pending))
                    pending = []
            stored += self._stored(self.commit_many(pending))
            pending = []
        finally:
            for _, fill, _ in pending:
                self.discard(fill)
        os.sync()
        return stored

    @staticmethod
    def _stored(outcomes: list[bool | OSError]) -> int:
        errors = [outcome for outcome in outcomes if isinstance(outcome, OSError)]
        if errors:
            raise errors[0]
        return sum(outcome is True for outcome in outcomes)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The commit lock: of this process's threads, and (``flock``) of every process using
        the directory, so that two workers making room at once cannot both overshoot."""
        with self._commit_lock:
            fd = os.open(self._commit_lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def discard(self, fill: FillFile) -> None:
        with contextlib.suppress(OSError):
            fill.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fill.path)

    def first_read(self, key: str, meta: EntryMeta) -> bool:
        """Mark a prefetched entry read (see :mod:`proxy.store`): True for the one caller, in
        any process, whose call changed its recorded metadata."""
        if not meta.prefetched:
            return False
        read = dataclasses.replace(meta, prefetched=False)
        try:
            changed = self._index.replace_tag(key, meta.to_json(), read.to_json())
        except sqlite3.Error as exc:  # a counter and the LRU position are at stake, no bytes
            log.warning("could not mark a prefetched entry read: %s", exc)
            return False
        with self._memo_lock:
            known = self._memo.get(key)
            if known is not None and known[1] == meta:
                self._memo[key] = (known[0], read)
        return changed

    # -- eviction ----------------------------------------------------------------------------

    def evict(self, key: str) -> None:
        self._forget(key)
        cache = self._cache
        try:
            cache.delete(key)
        except sqlite3.DatabaseError as exc:
            self._damaged(cache, exc)

    def make_room(self, length: int) -> None:
        """Evict as :meth:`commit` does before storing ``length`` bytes, storing nothing (see
        :func:`proxy.store.commit`, which calls it from another thread than the commit's).
        Best effort: the commit makes room again, under its lock, for what this could not."""
        if length > self.max_object_bytes:
            return
        cache = self._cache
        try:
            if self._bytes() + length <= self.max_bytes:
                return  # room enough: no lock to take
            with self._room(length):
                pass
        except sqlite3.DatabaseError as exc:
            self._damaged(cache, exc)
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            log.warning("could not make room for an entry: %s", exc or type(exc).__name__)

    @contextlib.contextmanager
    def _room(self, incoming: int, replacing: Collection[str] = ()) -> Iterator[None]:
        """Hold the commit lock (:meth:`_exclusive`) with ``incoming`` more bytes fitting under
        ``max_bytes``, after evicting the keys of ``replacing`` (about to be stored again).

        Least recently used entries are evicted in batches of at most :data:`_EVICT_BATCH`:
        a batch's rows go in one short transaction under the lock, and its files are unlinked
        after the lock is released. So making room for one large object among many small ones
        never holds the lock for more than one batch; the room is checked again under the lock
        each time, which is what keeps the bound when another process commits in between.
        """
        if self._bytes() + incoming > self.max_bytes:
            self.flush_touches()  # recency, as of now, decides the victims
        while True:
            with self._exclusive():
                size = self._bytes()
                for key in replacing:
                    self._forget(key)
                # The set that follows replaces their rows and files anyway; deleting them first
                # (a write transaction each, for keys that are seldom there) only matters when
                # their bytes are needed to make room.
                if replacing and size + incoming > self.max_bytes:
                    # A read for each (diskcache's ``delete`` is a write transaction even for a
                    # key it does not hold): a full store evicts on every batch.
                    stored = [key for key in replacing if key in self._cache]
                    for key in stored:
                        self.evict(key)
                    if stored:
                        size = self._bytes()
                replacing = ()
                excess = size + incoming - self.max_bytes
                victims = []
                if excess > 0:
                    with self._cache.transact():  # on this thread's own connection
                        victims = self._index.remove_least_recent(
                            self._cache._con, excess, _EVICT_BATCH
                        )
                    for victim, unread in victims:
                        self._forget(victim.key)
                        self._on_evict(victim.size)
                        if unread:
                            self._on_evict_unread(victim.size)
                if excess <= 0 or not victims:
                    yield
                    return
            self._index.unlink(victim for victim, _ in victims)

    def _bytes(self) -> int:
        return int(self._cache.reset("size"))

    # -- housekeeping (proxy.store.sweeps) ---------------------------------------------------

    def sweep_temporary(self) -> int:
        """Remove temporary files of fills that a crash interrupted; live fills of any process
        are spared. Returns how many were removed."""
        return sweeps.sweep_temporary(self._tmp, _TMP_SUFFIX)

    def sweep_orphans(self, min_age: float = sweeps.ORPHAN_MIN_AGE) -> int:
        """Delete entry files the index does not know (see :func:`sweeps.sweep_orphans`);
        stops when the store closes. Returns how many were removed."""
        cache = self._cache
        try:
            return sweeps.sweep_orphans(self._entries_dir, self._db_path, min_age, self._closing)
        except sqlite3.DatabaseError as exc:
            self._damaged(cache, exc)
            return 0

    def claim_sweep(self) -> bool:
        """True for the first process of a server start to ask (see :func:`sweeps.claim`)."""
        fd = sweeps.claim(self._commit_lock_path.with_name("sweep.lock"))
        if fd is None:
            return False
        self._sweep_lock = fd  # kept open (and locked) for the life of the process
        return True

    def stats(self) -> StoreStats:
        cache = self._cache
        try:
            return StoreStats(bytes=self._bytes(), entries=len(cache), max_bytes=self.max_bytes)
        except sqlite3.DatabaseError as exc:
            self._damaged(cache, exc)
            return StoreStats(bytes=0, entries=0, max_bytes=self.max_bytes)

    def ready(self) -> bool:
        """True when the directory takes writes and the index answers."""
        try:
            fill = self.begin_fill()
            self.discard(fill)
            self._cache.reset("count")
        except (OSError, sqlite3.Error):
            return False
        return shutil.disk_usage(self.directory).free > 0

    def close(self) -> None:
        self._closing.set()
        self.flush_touches()
        self._readers.reset()
        self._cache.close()
