"""Cross-process single-flight: which process fetches a key, when several serve one cache.

With ``--workers N`` every worker shares the disk cache. Before fetching a key from upstream, a
worker takes an exclusive ``flock`` on one of :data:`SLOTS` lock files chosen by the key's hash;
a worker that finds it taken waits for the holder to finish, then serves the committed entry from
disk instead of fetching it again. Locks die with their process, so a crashed worker never
leaves a key stuck. Two keys sharing a slot only wait for each other; they never share bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path

#: Lock files at most (created on first use, empty).
SLOTS = 4096


class Claims:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory) / "locks"
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, key: str) -> Path:
        slot = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % SLOTS
        return self.directory / f"{slot:04x}.lock"

    def try_claim(self, key: str) -> int | None:
        """A held lock (its descriptor) if no other process is fetching ``key``, else None."""
        fd = os.open(self._path(key), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def release(fd: int) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
