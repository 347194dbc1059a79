"""The memory tier: hot small entries of this worker process, bounded in bytes, LRU.

An entry is loaded from the disk tier once its bytes were read and verified there, so a memory
hit needs no read and no hash. The copy is valid only while the disk file it came from still
exists: any process that evicts, purges or replaces the entry removes or renames that file, and
a memory hit more than :data:`~proxy.store.RECHECK_SECONDS` after the copy's last check looks
again (one ``stat``), sees it and drops the copy. So an entry removed by any process is not
served from here once that time has passed: ``vlmrun-cache purge`` waits it out before it
reports the removal. (A hot key is checked some 20 times a second instead of on every hit: a
``stat`` is a sixth of a memory hit's cost. Within the window the copy's bytes are still the
key's verified bytes.)

Methods never block beyond a ``stat``; they run on the event loop.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import OrderedDict

from proxy.store import RECHECK_SECONDS, EntryMeta


@dataclasses.dataclass
class Copy:
    meta: EntryMeta
    body: bytes
    #: The disk file the body was read from, and its inode: the entry's identity.
    path: str
    inode: int
    #: When (time.monotonic()) the file was last seen to be the same; never, at first (it may
    #: have gone while it was being read), so the first hit looks.
    checked: float = 0.0


class MemoryTier:
    """At most ``max_bytes`` of bodies, each at most ``max_object_bytes``."""

    name = "memory"

    def __init__(self, max_bytes: int, max_object_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_object_bytes = max_object_bytes
        self.bytes = 0
        self._copies: OrderedDict[str, Copy] = OrderedDict()

    def __len__(self) -> int:
        return len(self._copies)

    def get(self, key: str) -> Copy | None:
        copy = self._copies.get(key)
        if copy is None:
            return None
        now = time.monotonic()
        if now - copy.checked >= RECHECK_SECONDS:
            try:
                current = os.stat(copy.path).st_ino
            except OSError:
                current = -1
            if current != copy.inode:  # removed or replaced by some process
                self.drop(key)
                return None
            copy.checked = now
        self._copies.move_to_end(key)
        return copy

    def admits(self, length: int) -> bool:
        return length <= self.max_object_bytes

    def put(self, key: str, meta: EntryMeta, body: bytes, path: str, inode: int) -> None:
        if not self.admits(len(body)):
            return
        self.drop(key)
        self._copies[key] = Copy(meta, body, path, inode)
        self.bytes += len(body)
        while self.bytes > self.max_bytes and self._copies:
            _, oldest = self._copies.popitem(last=False)
            self.bytes -= len(oldest.body)

    def drop(self, key: str) -> None:
        copy = self._copies.pop(key, None)
        if copy is not None:
            self.bytes -= len(copy.body)
