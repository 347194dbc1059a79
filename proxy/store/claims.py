"""Single-flight across processes: which process fetches a key, when several serve one cache.

:class:`Coordinator` is the interface the fills use (in-process single-flight is
:class:`proxy.fills.Fills` itself); :class:`Claims` implements it across the worker processes of
one host with ``flock``, and a shared tier may implement it with a lease.

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
import time
from pathlib import Path
from typing import Protocol

import anyio
import anyio.to_thread

#: How often a waiting process looks again whether a holder finished (a cross-process wait:
#: there is no event to wait on).
POLL_SECONDS = 0.005


class Lease(Protocol):
    def release(self) -> None:
        """Give the key back (idempotent); others waiting for it may go on."""


class Coordinator(Protocol):
    async def claim(self, key: str, patience: float) -> Lease | None:
        """A lease to fetch ``key`` once no other process holds one; ``None`` if that took
        longer than ``patience`` seconds (the caller then fetches regardless: a duplicate fetch
        beats a timeout). After a wait the caller should look whether the key is now stored."""


#: Lock files at most (created on first use, empty).
SLOTS = 4096


class _Held:
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
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

    async def claim(self, key: str, patience: float) -> Lease | None:
        give_up = time.monotonic() + patience
        while True:
            fd = await anyio.to_thread.run_sync(self.try_claim, key)
            if fd is not None:
                return _Held(fd)
            if time.monotonic() > give_up:
                return None
            await anyio.sleep(POLL_SECONDS)
