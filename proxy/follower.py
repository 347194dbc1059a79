"""Following another worker's fill: stream a body that another process is fetching, as it grows.

With ``--workers N`` a key's fetch is claimed by one process (:mod:`proxy.store.claims`). The
holder announces the temporary file it writes; a worker whose client asks for the same key
meanwhile opens that file read-only and relays it to its own readers as it grows, instead of
waiting for the commit. Its clients see ``X-Cache: COALESCED``, like waiters in the holder's
process.

Nothing here trusts the file blindly: every byte read is hashed, readers hold back the last
byte (as for any fill), and the fill completes only if the writer's committed entry has exactly
the bytes read (length and sha256). A writer that fails, crashes or stores nothing leaves the
follower's clients with a failed transfer, never a short or different 200. The same access rules
hold as for a waiter in the holder's process: the fill's filler is the holder's credential, so a
client with another credential needs its own proof (:mod:`proxy.artifacts`).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Protocol

import anyio
import anyio.to_thread

from proxy.store import Store
from proxy.store.claims import POLL_SECONDS, Announcement
from proxy.store.locks import unheld
from proxy.threads import run_sync
from proxy.validators import Validators

#: Most bytes read from the followed file per step (one worker-thread hop).
READ_BYTES = 1024**2


class FollowFailed(Exception):
    """The followed fill did not end in an entry with the bytes read."""


class _Progress:
    """The reading side, touched only in worker threads (one at a time)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.offset = 0
        self.digest = hashlib.sha256()

    def step(self) -> tuple[bytes, bool]:
        """New bytes (possibly none), and whether the writer has finished. Bytes written just
        before the writer closed are read after its lock is seen free, so none are missed."""
        data = os.pread(self.fd, READ_BYTES, self.offset)
        finished = False
        if not data:
            finished = unheld(self.fd)
            if finished:
                data = os.pread(self.fd, READ_BYTES, self.offset)
                finished = not data  # more to read first
        self.offset += len(data)
        self.digest.update(data)
        return data, finished


async def follow(
    fill: FollowedFill, fd: int, announcement: Announcement, store: Store, patience: float
) -> None:
    """Relay the announced fill file ``fd`` into ``fill`` until its writer finishes; raises
    :class:`FollowFailed` unless the committed entry matches every byte read. ``fd`` belongs to
    ``fill`` from now on (it closes it with its last reader)."""
    fill.attach(
        fd,
        announcement.filler,
        announcement.content_type,
        announcement.expected_length,
        Validators.from_dict(announcement.validators),
    )
    progress = _Progress(fd)
    give_up = time.monotonic() + patience
    while True:
        data, finished = await run_sync(progress.step)
        if data:
            fill.append_durable(data)
        elif finished:
            break
        elif time.monotonic() > give_up:
            raise FollowFailed("the followed fill did not finish in time")
        else:
            await anyio.sleep(POLL_SECONDS)
    entry = await run_sync(store.get, announcement.key)
    if entry is None:
        raise FollowFailed("the followed fill stored nothing")
    entry.close()
    if entry.meta.length != progress.offset or entry.meta.sha256 != progress.digest.hexdigest():
        raise FollowFailed("the followed fill stored other bytes than it wrote")


class FollowedFill(Protocol):
    """What :func:`follow` needs of a fill (:class:`proxy.fill.Fill` provides it)."""

    def attach(
        self,
        fd: int,
        filler: str,
        content_type: str,
        expected_length: int | None,
        validators: Validators,
    ) -> None:
        """Start streaming from ``fd``, a body fetched with ``filler``'s credential."""

    def append_durable(self, data: bytes) -> None:
        """``data`` follows the bytes so far, and is already in the file."""
