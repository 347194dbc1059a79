"""The disk tier: a diskcache LRU of artifact files with our own byte-aware eviction.

diskcache keeps the index (SQLite) and the files; we add what it lacks (see docs/lessons.md):

* keys are ``str`` and values are files (``read=True``), metadata is JSON in the ``tag``
  column: nothing is ever pickled, so a writable cache directory cannot run code;
* a finished fill is *renamed* into place (:class:`_AdoptingDisk`), not copied, after an fsync;
* diskcache's own culling is off (it overshoots); :meth:`DiskStore.commit` evicts least recently
  used entries until the new object fits, so the artifact bytes never exceed ``max_bytes``;
* a damaged index ("database disk image is malformed", a garbage ``cache.db``), found at start-up
  or later, is moved aside and deleted, and the store starts cold instead of failing requests;
* hits skip SQLite: a bounded in-memory index maps keys to (file, metadata). diskcache's LRU
  ``get`` is a write transaction that serialises every hit; instead, access times are collected in
  memory and written in one batch by :meth:`DiskStore.flush_touches` (the app calls it every
  :data:`TOUCH_FLUSH_SECONDS`; eviction calls it first).
  The memory index can only be stale in one way, a file that was evicted (perhaps by another
  process): opening it then fails and the lookup falls back to SQLite. Cached files never change
  once written, and their names are never reused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diskcache
from diskcache.core import MODE_BINARY

from proxy.store import Entry, EntryMeta, FillFile, StoreStats

log = logging.getLogger(__name__)

_TMP_SUFFIX = ".fill"
_EVICT_BATCH = 64
#: Longest time access times stay only in memory before they are written to the index.
TOUCH_FLUSH_SECONDS = 1.0
#: Unindexed entry files younger than this (by ctime, which a rename sets) are left alone.
ORPHAN_MIN_AGE = 600.0
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
    """A value that tells :class:`_AdoptingDisk` to move this file into the cache."""

    def __init__(self, path: str) -> None:
        self.path = path


class _AdoptingDisk(diskcache.Disk):  # type: ignore[misc]
    """A diskcache Disk that takes over a finished file by rename instead of copying it."""

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if not isinstance(value, _Adopt):
            return super().store(value, read, key=key)
        filename, full_path = self.filename(key, value)
        os.makedirs(os.path.dirname(full_path), exist_ok=True)
        os.rename(value.path, full_path)
        return os.path.getsize(full_path), MODE_BINARY, filename, None


class DiskStore:
    """The disk tier. See :mod:`proxy.store` for the contract."""

    def __init__(
        self,
        directory: str | Path,
        max_bytes: int,
        max_object_bytes: int,
        on_evict: Callable[[int], None] = lambda _size: None,
        on_reset: Callable[[], None] = lambda: None,
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.max_object_bytes = max_object_bytes
        self._on_evict = on_evict
        self._on_reset = on_reset
        self._tmp = self.directory / "tmp"
        self._entries_dir = self.directory / "entries"
        self._commit_lock = threading.RLock()
        self._memo: OrderedDict[str, tuple[str, EntryMeta]] = OrderedDict()
        self._touched: dict[str, float] = {}
        self._memo_lock = threading.Lock()
        self._tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._sweep_tmp()
        self._db_path = self._entries_dir / "cache.db"
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
                self._touch(key)
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

    def _touch(self, key: str) -> None:
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
            with contextlib.closing(sqlite3.connect(self._db_path, timeout=5)) as db, db:
                db.executemany(
                    "UPDATE Cache SET access_time = ? WHERE key = ? AND raw = 1",
                    [(when, key) for key, when in touched.items()],
                )
        except sqlite3.Error as exc:  # recency is advice; losing one batch is harmless
            log.warning("could not record access times: %s", exc)

    def _get_indexed(self, key: str) -> Entry | None:
        cache = self._cache
        try:
            found = cache.get(key, read=True, tag=True)
        except sqlite3.DatabaseError as exc:
            self._damaged(cache, exc)
            return None
        except (OSError, diskcache.Timeout) as exc:
            log.warning("cache index read failed (%s); treating as a miss", type(exc).__name__)
            return None
        handle, tag = found
        if handle is None:
            return None
        try:
            meta = EntryMeta.from_json(tag)
        except (TypeError, ValueError, KeyError):
            handle.close()
            self.evict(key)
            return None
        return Entry(meta=meta, file=handle)

    # -- fills -------------------------------------------------------------------------------

    def begin_fill(self) -> FillFile:
        fd_path = self._tmp / f"{os.urandom(12).hex()}{_TMP_SUFFIX}"
        fd = os.open(fd_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        return FillFile(path=str(fd_path), file=os.fdopen(fd, "wb"))

    def commit(self, key: str, fill: FillFile, meta: EntryMeta) -> bool:
        try:
            fill.file.flush()
            os.fsync(fill.file.fileno())
            fill.file.close()
            if meta.length > self.max_object_bytes:
                return False
            cache = self._cache
            try:
                with self._commit_lock:
                    self.evict(key)
                    self._make_room(meta.length)
                    cache.set(key, _Adopt(fill.path), read=True, tag=meta.to_json())
            except sqlite3.DatabaseError as exc:
                self._damaged(cache, exc)
                return False
            return True
        finally:
            self.discard(fill)

    def discard(self, fill: FillFile) -> None:
        with contextlib.suppress(OSError):
            fill.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fill.path)

    # -- eviction ----------------------------------------------------------------------------

    def evict(self, key: str) -> None:
        self._forget(key)
        cache = self._cache
        try:
            cache.delete(key)
        except sqlite3.DatabaseError as exc:
            self._damaged(cache, exc)

    def _make_room(self, incoming: int) -> None:
        """Evict least recently used entries until ``incoming`` more bytes fit. Holds the lock."""
        if self._bytes() + incoming > self.max_bytes:
            self.flush_touches()
        while self._bytes() + incoming > self.max_bytes:
            victims = self._least_recently_used(_EVICT_BATCH)
            if not victims:
                return
            for key, size in victims:
                self._forget(key)
                if self._cache.delete(key):
                    self._on_evict(size)
                if self._bytes() + incoming <= self.max_bytes:
                    return

    def _query_index(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        """Rows of a read-only query on diskcache's index, through a connection of our own."""
        with contextlib.closing(sqlite3.connect(f"file:{self._db_path}?mode=ro", uri=True)) as db:
            return db.execute(sql, params).fetchall()

    def _least_recently_used(self, limit: int) -> list[tuple[str, int]]:
        rows = self._query_index(
            "SELECT key, size FROM Cache WHERE raw = 1 ORDER BY access_time LIMIT ?", (limit,)
        )
        return [(str(key), int(size)) for key, size in rows]

    def _bytes(self) -> int:
        return int(self._cache.reset("size"))

    # -- housekeeping ------------------------------------------------------------------------

    def _sweep_tmp(self) -> None:
        """Remove temporary files left by fills that a crash interrupted.

        Names are unlinked relative to a descriptor of ``tmp/`` opened without following a
        symbolic link, so the sweep cannot delete anything outside it (a symlinked ``tmp/``
        raises ``OSError`` instead)."""
        swept = 0
        tmp = os.open(self._tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for name in os.listdir(tmp):
                if name.endswith(_TMP_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=tmp)
                        swept += 1
        finally:
            os.close(tmp)
        if swept:
            log.info("removed %d unfinished fill(s) from a previous run", swept)

    def sweep_orphans(self, min_age: float = ORPHAN_MIN_AGE) -> int:
        """Delete entry files the index does not know (a crash between a fill's rename and its
        index insert leaves one). Files renamed less than ``min_age`` seconds ago are spared: a
        commit in another process may be between its two steps. Returns the number removed."""
        cache = self._cache
        try:
            rows = self._query_index("SELECT filename FROM Cache WHERE filename IS NOT NULL")
            known = {os.path.join(self._entries_dir, name) for (name,) in rows}
        except sqlite3.DatabaseError as exc:
            self._damaged(cache, exc)
            return 0
        now = time.time()
        removed = 0
        # fwalk with dir_fd: never descends through a symbolic link, and each unlink is relative
        # to the directory walked, so nothing outside entries/ can be reached.
        for folder, _dirs, files, folder_fd in os.fwalk(self._entries_dir, follow_symlinks=False):
            for name in files:
                if not name.endswith(".val") or os.path.join(folder, name) in known:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode) and now - info.st_ctime >= min_age:
                        os.unlink(name, dir_fd=folder_fd)
                        removed += 1
        if removed:
            log.warning("removed %d cache file(s) missing from the index", removed)
        return removed

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
        self.flush_touches()
        self._cache.close()
