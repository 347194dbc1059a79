"""The disk tier's index, read and changed through SQLite connections of our own.

diskcache keeps one row per entry in the ``Cache`` table of ``entries/cache.db``: the key, the
file's name relative to ``entries/`` (random, never reused), its size, the last access time and
our JSON metadata (the ``tag``). Triggers keep the entry count and the byte total in ``Settings``.

The server's batched access times and its choice of eviction victims go through :class:`Index`,
and so do the operator's commands (``vlmrun-cache stats``, ``ls``, ``purge``, ``verify``), which
must not open diskcache: its constructor creates the directory and the database and writes its
settings. An :class:`Index` creates nothing, and reading it changes nothing but SQLite's own
``-wal`` and ``-shm`` files. (The disk tier's hit lookups and orphan sweep keep connections of
their own, in :mod:`proxy.store.disk`.)

Removal (:meth:`Index.remove`) is diskcache's own, made conditional: the row is deleted (its
triggers update the totals) only if it still names the file that was listed, then the file is
unlinked. An entry replaced by a commit since it was listed has another file name, so it is kept:
a fill that commits while a purge runs leaves a fresh, whole entry. Every process sees a removal
at once: an index lookup misses, and a file opened by remembered path (the disk tier's memory
index, the memory tier's inode check) is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

#: Inside the cache directory: diskcache's directory, and its database in there.
ENTRIES_DIR = "entries"
INDEX_FILE = "cache.db"
#: How diskcache names a value's file: two levels of hex directories, then hex + ``.val``.
_FILENAME = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]+\.val")
#: Rows read per query when listing, so no read transaction stays open for long.
_PAGE = 2000
#: Seconds to wait for a writer holding the database (another process committing).
_BUSY_TIMEOUT = 10.0
#: Read-only connections the disk tier's lookups share (see :class:`Readers`).
READERS = 8


@dataclasses.dataclass(frozen=True)
class IndexedEntry:
    """One row of the index as it was read. ``filename`` is the entry's identity."""

    key: str
    rowid: int
    #: Relative to ``entries/``; None for a value diskcache keeps inside the database.
    filename: str | None
    #: Bytes of the file, as recorded when it was stored.
    size: int
    #: Seconds since the epoch; hits reach it within a second (see DiskStore.flush_touches).
    access_time: float
    #: Our metadata as JSON (see proxy.store.EntryMeta), or None.
    tag: str | None


class Readers:
    """At most ``size`` read-only connections to the index, shared by any number of threads.

    A connection per worker thread cost about 1.9 MiB each (SQLite's page cache and
    statements), times anyio's 40 threads; a lookup takes well under a millisecond, so a few
    connections serve them all. A thread takes an idle one, or opens one while fewer than
    ``size`` exist, or waits for one (a C-level queue: no Python lock on the way). After
    :meth:`reset` (the index was moved aside) each is reopened when next taken.
    """

    def __init__(self, db_path: Path, size: int = READERS) -> None:
        self.db_path = db_path
        self.size = size
        self._idle: queue.SimpleQueue[tuple[sqlite3.Connection, int]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._generation = 0
        #: Connections that exist (at most ``size``; for tests and the benchmark).
        self.opened = 0

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """A connection for this block; blocks while ``size`` others are in use."""
        try:
            db, generation = self._idle.get_nowait()
        except queue.Empty:
            with self._lock:
                new = self.opened < self.size
                self.opened += new
            db, generation = (self._connect(), self._generation) if new else self._idle.get()
        if generation != self._generation:
            db.close()
            db, generation = self._connect(), self._generation
        try:
            yield db
        finally:
            self._idle.put((db, generation))

    def _connect(self) -> sqlite3.Connection:
        uri = f"file:{self.db_path}?mode=ro"
        return sqlite3.connect(uri, uri=True, timeout=5, check_same_thread=False)

    def reset(self) -> None:
        """Close the idle connections; those in use are reopened when next taken."""
        with self._lock:
            self._generation += 1
        closed = 0
        while True:
            try:
                db, _ = self._idle.get_nowait()
            except queue.Empty:
                break
            db.close()
            closed += 1
        with self._lock:
            self.opened -= closed


class Index:
    """The index in ``entries_dir``. Methods block; open a connection per call."""

    def __init__(self, entries_dir: str | Path) -> None:
        self.entries_dir = Path(entries_dir)
        self.db_path = self.entries_dir / INDEX_FILE

    def exists(self) -> bool:
        """False before a server ever stored anything here (and then nothing was)."""
        return self.db_path.is_file()

    def path(self, entry: IndexedEntry) -> Path | None:
        """The entry's file, or None if its recorded name is not one diskcache makes (a
        damaged or tampered index must not point us outside ``entries/``)."""
        if entry.filename is None or not _FILENAME.fullmatch(entry.filename):
            return None
        return self.entries_dir / entry.filename

    # -- reads --------------------------------------------------------------------------------

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        """Rows of a read-only query. Raises sqlite3.DatabaseError if the index is damaged."""
        uri = f"file:{self.db_path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT)) as db:
            return db.execute(sql, params).fetchall()

    def entries(self) -> Iterator[IndexedEntry]:
        """Every entry, in pages by row id (entries stored meanwhile may or may not appear)."""
        after = -1
        while True:
            rows = self.query(
                "SELECT rowid, key, filename, size, access_time, tag FROM Cache"
                " WHERE raw = 1 AND rowid > ? ORDER BY rowid LIMIT ?",
                (after, _PAGE),
            )
            for rowid, key, filename, size, access_time, tag in rows:
                yield IndexedEntry(
                    key=str(key),
                    rowid=int(rowid),
                    filename=None if filename is None else str(filename),
                    size=int(size or 0),
                    access_time=float(access_time or 0.0),
                    tag=None if tag is None else str(tag),
                )
            if len(rows) < _PAGE:
                return
            after = int(rows[-1][0])

    # -- writes -------------------------------------------------------------------------------

    def record_access_times(self, touched: Mapping[str, float]) -> None:
        """Set the access time of each key (when it was last read)."""
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=5)) as db, db:
            db.executemany(
                "UPDATE Cache SET access_time = ? WHERE key = ? AND raw = 1",
                [(when, key) for key, when in touched.items()],
            )

    def remove_least_recent(
        self, db: sqlite3.Connection, excess: int, limit: int
    ) -> list[tuple[IndexedEntry, bool]]:
        """Remove least recently used entries until ``excess`` bytes are gone, at most
        ``limit`` of them, through ``db`` in the write transaction it is in; returns them,
        files not yet unlinked, each with whether it was prefetched and never read. (A JSON
        string value cannot contain the unescaped ``"prefetched":true``.)

        One ``DELETE`` for the lot (diskcache's ``delete`` costs a query and a statement per
        key). ``db`` is the store's own connection (see :meth:`DiskStore._room`): a connection
        of its own each time cost 2.4 ms per call (its page cache starts cold), where a full
        store evicts for every batch of commits. The caller unlinks the files with
        :meth:`unlink`, after its own lock is released: with the rows gone no process can find
        them, and an unlink is the slow part.
        """
        chosen: list[tuple[IndexedEntry, bool]] = []
        rows = db.execute(
            "SELECT rowid, key, filename, size, access_time,"
            " instr(tag, '\"prefetched\":true') > 0 FROM Cache WHERE raw = 1"
            " ORDER BY access_time LIMIT ?",
            (limit,),
        )
        for rowid, key, filename, size, access_time, unread in rows:
            entry = IndexedEntry(
                key=str(key),
                rowid=int(rowid),
                filename=None if filename is None else str(filename),
                size=int(size or 0),
                access_time=float(access_time or 0.0),
                tag=None,
            )
            chosen.append((entry, bool(unread)))
            excess -= int(size or 0)
            if excess <= 0:
                break
        if chosen:
            rowids = ",".join(str(entry.rowid) for entry, _ in chosen)
            db.execute(f"DELETE FROM Cache WHERE rowid IN ({rowids})")  # noqa: S608
        return chosen

    def unlink(self, entries: Iterable[IndexedEntry]) -> None:
        """Delete the files of entries whose rows are gone (directories are kept: a commit
        may be renaming into one)."""
        for entry in entries:
            path = self.path(entry)
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def replace_tag(self, key: str, old: str, new: str) -> bool:
        """Change the entry's metadata from ``old`` to ``new``; False if it was not ``old``
        (changed by another process, or gone). Atomic across processes."""
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=5)) as db, db:
            changed = db.execute(
                "UPDATE Cache SET tag = ? WHERE key = ? AND raw = 1 AND tag = ?", (new, key, old)
            )
            return changed.rowcount == 1

    def remove(self, entries: Iterable[IndexedEntry]) -> list[IndexedEntry]:
        """Remove the entries that are still as listed, in one transaction; returns those.

        An entry whose row is gone (evicted meanwhile) or names another file (replaced by a
        newer commit) is left alone. Files are unlinked after the transaction commits, as
        diskcache does; their directories are kept (a commit may be renaming into one).
        """
        removed: list[IndexedEntry] = []
        with contextlib.closing(
            sqlite3.connect(self.db_path, timeout=_BUSY_TIMEOUT, isolation_level=None)
        ) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                for entry in entries:
                    deleted = db.execute(
                        "DELETE FROM Cache WHERE rowid = ? AND key = ? AND raw = 1"
                        " AND filename IS ?",
                        (entry.rowid, entry.key, entry.filename),
                    )
                    if deleted.rowcount == 1:
                        removed.append(entry)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        self.unlink(removed)
        return removed
