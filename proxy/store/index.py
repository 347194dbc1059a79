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
import re
import sqlite3
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

    def least_recently_used(self, limit: int) -> list[tuple[str, int, bool]]:
        """Up to ``limit`` (key, size, prefetched and unread) triples, least recently used
        first. (A JSON string value cannot contain the unescaped ``"prefetched":true``.)"""
        rows = self.query(
            "SELECT key, size, instr(tag, '\"prefetched\":true') > 0 FROM Cache WHERE raw = 1"
            " ORDER BY access_time LIMIT ?",
            (limit,),
        )
        return [(str(key), int(size), bool(unread)) for key, size, unread in rows]

    # -- writes -------------------------------------------------------------------------------

    def record_access_times(self, touched: Mapping[str, float]) -> None:
        """Set the access time of each key (when it was last read)."""
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=5)) as db, db:
            db.executemany(
                "UPDATE Cache SET access_time = ? WHERE key = ? AND raw = 1",
                [(when, key) for key, when in touched.items()],
            )

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
        for entry in removed:
            path = self.path(entry)
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        return removed
