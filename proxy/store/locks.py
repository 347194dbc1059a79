"""The two ``flock`` idioms the store's processes coordinate with.

* :func:`try_lock`: take a lock file's exclusive lock if no other process holds it (the key
  claims of :mod:`proxy.store.claims`, the once-per-start sweep claim of
  :mod:`proxy.store.sweeps`). Locks die with their process, so a crash never leaves one held.
* :func:`unheld`: whether anyone holds the exclusive lock of an open file. A fill's writer holds
  its temporary file's lock from creation until it closes it, so this tells a live fill from a
  finished or crashed one (the sweep of temporary files, a worker following another's fill).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def try_lock(path: Path) -> int | None:
    """A descriptor of ``path`` (created if need be, never through a link) holding its exclusive
    lock; None if another process holds it. Closing the descriptor releases the lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def unheld(fd: int) -> bool:
    """True if no process holds an exclusive lock on the file open as ``fd`` (taking and at
    once dropping a shared one: a probe that never blocks a writer's lock for long)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True
