"""The disk tier's housekeeping: what a crash can leave behind, found and removed safely.

* :func:`sweep_temporary`: ``tmp/`` files of fills that did not finish. A live fill (of any
  process) holds an ``flock`` on its file, so any process may sweep at any time.
* :func:`sweep_orphans`: entry files without an index row (a crash between a fill's rename and
  its index insert). It walks every entry, so the server runs it once per start, in one worker
  (:func:`claim`), in the background at low priority.

Nothing here follows a symbolic link or deletes a name outside the directory it walks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from proxy.store.locks import try_lock, unheld

log = logging.getLogger(__name__)

#: Unindexed entry files younger than this (by ctime, which a rename sets) are left alone.
ORPHAN_MIN_AGE = 600.0
#: The orphan sweep pauses for SWEEP_PAUSE seconds every SWEEP_STEP files.
SWEEP_STEP = 512
SWEEP_PAUSE = 0.002


def sweep_temporary(tmp_dir: Path, suffix: str) -> int:
    """Remove the files named ``*suffix`` in ``tmp_dir`` whose ``flock`` nobody holds (their
    fill crashed or ended); returns how many. Names are unlinked relative to a descriptor of
    ``tmp_dir`` opened without following a symbolic link, so nothing outside it can be deleted
    (a symlinked ``tmp_dir`` raises ``OSError`` instead)."""
    swept = 0
    tmp = os.open(tmp_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for name in os.listdir(tmp):
            if name.endswith(suffix) and _abandoned(name, tmp):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=tmp)
                    swept += 1
    finally:
        os.close(tmp)
    if swept:
        log.info("removed %d unfinished fill(s) from a previous run", swept)
    return swept


def _abandoned(name: str, directory: int) -> bool:
    """True if no process holds the fill file's lock (its fill crashed or ended)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=directory)
    except OSError:
        return False
    try:
        return unheld(fd)
    finally:
        os.close(fd)


def sweep_orphans(entries_dir: Path, db_path: Path, min_age: float, stop: threading.Event) -> int:
    """Delete files in ``entries_dir`` that the index at ``db_path`` does not know; returns
    how many. Files renamed less than ``min_age`` seconds ago are spared: a commit in another
    process may be between its two steps. Raises ``sqlite3.DatabaseError`` for a damaged index.

    Bounded in memory: the index's file names, sorted by SQLite, are merged with a sorted walk
    of the directories, so nothing is held but a cursor. It pauses :data:`SWEEP_PAUSE` every
    :data:`SWEEP_STEP` files, and stops there once ``stop`` is set. Logs what it did, and how
    long it took, in one line.
    """
    started = time.monotonic()
    uri = f"file:{db_path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
        names = db.execute(
            "SELECT filename FROM Cache WHERE filename IS NOT NULL ORDER BY filename"
        )
        seen, removed = _merge(entries_dir, names, min_age, stop)
    if removed:
        log.warning("removed %d cache file(s) missing from the index", removed)
    log.info(
        "orphan sweep: %d files checked in %.1f s, %d removed%s",
        seen,
        time.monotonic() - started,
        removed,
        " (stopped: the store closed)" if stop.is_set() else "",
    )
    return removed


def _merge(
    entries_dir: Path, names: Iterator[tuple[str]], min_age: float, stop: threading.Event
) -> tuple[int, int]:
    """(files seen, files removed)."""
    now = time.time()
    removed = seen = 0
    indexed = next(names, None)
    # fwalk with dir_fd: never descends through a symbolic link, and each unlink is relative to
    # the directory walked, so nothing outside entries/ can be reached. Directories and files
    # are visited sorted: diskcache's names (aa/bb/<hex>.val) then come in the index's order.
    for folder, dirs, files, folder_fd in os.fwalk(entries_dir, follow_symlinks=False):
        dirs.sort()
        relative = os.path.relpath(folder, entries_dir)
        for name in sorted(files):
            if not name.endswith(".val"):
                continue
            path = name if relative == "." else f"{relative}/{name}"
            while indexed is not None and indexed[0] < path:
                indexed = next(names, None)
            if indexed is None or indexed[0] != path:
                with contextlib.suppress(FileNotFoundError):
                    info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode) and now - info.st_ctime >= min_age:
                        os.unlink(name, dir_fd=folder_fd)
                        removed += 1
            seen += 1
            # The pause yields the GIL and the disk to the server. Every file counts: almost
            # all are indexed, and counting only orphans never paused at all.
            if seen % SWEEP_STEP == 0 and stop.wait(SWEEP_PAUSE):
                return seen, removed
    return seen, removed


def claim(lock_path: Path) -> int | None:
    """A descriptor holding ``lock_path``'s ``flock`` for the first process to ask; None for
    the others while it lives. The holder keeps it open for its life: the other workers of the
    same server then skip the orphan sweep."""
    return try_lock(lock_path)
