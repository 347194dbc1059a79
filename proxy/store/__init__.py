"""The storage tier: where committed artifacts live.

Contract (every implementation):

* Methods are synchronous and may block on disk or network: call them from a worker thread,
  never on the event loop. They are safe to call from many threads at once.
* ``get(key)`` returns an :class:`Entry` whose ``file`` is an open binary handle, or ``None``
  for a miss. A miss is never an exception. The caller closes the handle. An entry stays
  readable through its handle even if it is evicted meanwhile.
* ``begin_fill()`` returns a fresh temporary file inside the store's directory; the caller writes
  the body to it and then either ``commit``\\ s it (the store takes the file over, whatever the
  outcome) or ``discard``\\ s it.
* ``commit(key, fill, meta)`` publishes the bytes under ``key`` atomically: readers see either the
  old state or the whole new entry, never a partial one. It returns ``False`` (and drops the
  file) when the object cannot be cached, e.g. larger than the per-object limit. The file is
  fsynced first, unless ``sync=False``: for entries of :data:`VERIFIED_WHOLE` bytes at most,
  which every read verifies whole (their bytes lost in a power failure are then found on the
  first read, evicted and fetched again, as an index row of the last commits may be lost:
  SQLite's WAL is synced only at checkpoints), and for a file already fsynced (:func:`commit`
  does that in another thread, so that the commit thread only renames and indexes).
* ``commit_many(items)`` commits each ``(key, fill, meta)`` as ``commit`` does with
  ``sync=False``, together (one transaction, say), and says for each: True, False, or the
  ``OSError`` that kept its file from the store (the others are committed regardless).
* ``make_room(length)`` evicts least recently used entries until ``length`` more bytes fit, as
  ``commit`` would first; best effort (errors are not raised), it stores nothing.
* ``evict(key)`` removes an entry; evicting a missing key is not an error.
* ``stats()`` is cheap (no scan).
* A ``prefetched`` entry is committed as the least recently used one (first to be evicted);
  ``first_read(key, meta)`` marks it read, returning True for exactly one caller across
  processes (the first client read of a prefetched artifact).
* ``remembers(key, max_length)`` never blocks: True means ``get(key, memory_only=True)`` is cheap
  enough to call on the event loop (an ``open`` of a file of at most ``max_length`` bytes, no
  index query). ``memory_only`` lookups return None rather than query the index.
* ``touch(key)`` never blocks: it records a read of ``key`` served without ``get`` (by a faster
  tier), so that recency (eviction, ``purge --older-than``) counts every hit.
* ``flush_touches()`` persists recency information collected in memory; call it periodically.
* ``sweep_temporary()`` deletes temporary files of fills that crashed; live fills of any
  process are spared, so it is safe at any time. Opening a store has no side effects on other
  processes using it.
* ``sweep_orphans()`` deletes stored files a crash left without an index entry; it walks every
  entry (in bounded memory, at low priority), so run it in the background, in the one process
  whose ``claim_sweep()`` returned True.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from typing import BinaryIO, Protocol

import anyio

from proxy.threads import run_commit, run_flush
from proxy.validators import Validators

#: How long a process trusts one look at a file another process may change: a memory copy's
#: disk file (:mod:`proxy.store.memory`) and the revocation list (:mod:`proxy.access`). A hot
#: path looks some 20 times a second instead of on every request; the commands that remove
#: entries (``purge``) or void proofs (``revoke``) wait this long before they return, so that
#: what they report done is done in every process.
RECHECK_SECONDS = 0.05
#: Entries up to this size are read whole and checked against their digest on every read from
#: disk (:class:`proxy.store.chain.DiskTier`, whatever ``chunk_size`` is), so their commits
#: skip the fsync (``commit(sync=False)``): bytes a power failure lost are a miss, never served.
VERIFIED_WHOLE = 64 * 1024


@dataclasses.dataclass(frozen=True)
class EntryMeta:
    """What we know about a committed artifact; stored as JSON, never pickled."""

    content_type: str
    length: int
    sha256: str
    stored_at: float
    #: xxh3-128 of the body, the fast check on hits ("" for entries stored without one).
    xxh3: str = ""
    #: What the upstream's 200 said about these bytes (see :mod:`proxy.validators`).
    validators: Validators | None = None
    #: Fingerprint of the credential whose request filled the entry ("" for none).
    filler: str = ""
    #: Stored by a prefetch and not read by any client yet (it waits at the cold end of the LRU).
    prefetched: bool = False

    def to_json(self) -> str:
        # Field by field: dataclasses.asdict deep-copies every value, a fifth of a commit's CPU.
        data = {field.name: getattr(self, field.name) for field in _META_FIELDS}
        data["validators"] = None if self.validators is None else self.validators.to_dict()
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> EntryMeta:
        data = json.loads(text)
        return cls(
            content_type=str(data["content_type"]),
            length=int(data["length"]),
            sha256=str(data["sha256"]),
            stored_at=float(data["stored_at"]),
            xxh3=str(data.get("xxh3", "")),
            validators=(
                None if data.get("validators") is None else Validators.from_dict(data["validators"])
            ),
            filler=str(data.get("filler", "")),
            prefetched=data.get("prefetched") is True,
        )

    @property
    def etag(self) -> str:
        return f'"{self.sha256}"'


_META_FIELDS = dataclasses.fields(EntryMeta)


@dataclasses.dataclass
class Entry:
    """A cache hit: the metadata and an open handle positioned at byte 0."""

    meta: EntryMeta
    file: BinaryIO

    @property
    def size_on_disk(self) -> int:
        return os.fstat(self.file.fileno()).st_size

    def close(self) -> None:
        self.file.close()


@dataclasses.dataclass
class FillFile:
    """A temporary file being written by one fill."""

    path: str
    file: BinaryIO


@dataclasses.dataclass(frozen=True)
class StoreStats:
    bytes: int
    entries: int
    max_bytes: int


def has_room(store: Store, length: int, min_free_space: int) -> bool:
    """Blocks. True unless writing ``length`` more bytes would leave less than
    ``min_free_space`` free where ``store`` keeps its files (a store without a directory
    always has room). Raises ``OSError`` if the file system cannot say."""
    directory = getattr(store, "directory", None)
    return directory is None or shutil.disk_usage(directory).free - length >= min_free_space


def write_entries(
    store: Store,
    items: Sequence[tuple[str, bytes, EntryMeta]],
    min_free_space: int,
) -> list[str | OSError | None]:
    """Blocks. Store whole bodies of :data:`VERIFIED_WHOLE` bytes at most, each under its key:
    a temporary file each, written at once (:func:`write_fill`), then committed together
    without an fsync (``store.commit_many``). For each item, None once stored, else why not:
    ``no_space`` (:func:`has_room`), ``write`` (no file, or a failed write), ``refused`` (the
    store would not keep it), or the ``OSError`` that kept it from the store (``commit_many``
    reports those per entry; none is raised). A larger body goes through :func:`write_fill`
    and :func:`commit`."""
    failures: list[str | OSError | None] = [None] * len(items)
    pending: list[tuple[str, FillFile, EntryMeta]] = []
    written: list[int] = []
    for i, (key, body, meta) in enumerate(items):
        assert len(body) <= VERIFIED_WHOLE
        temp = write_fill(store, body, min_free_space)
        if isinstance(temp, str):
            failures[i] = temp
            continue
        pending.append((key, temp, meta))
        written.append(i)
    # The store takes the files over, whatever the outcome.
    for i, outcome in zip(written, store.commit_many(pending), strict=True):
        failures[i] = None if outcome is True else "refused" if outcome is False else outcome
    return failures


def write_fill(store: Store, body: bytes, min_free_space: int) -> FillFile | str:
    """Blocks. A temporary file of ``store`` holding ``body``, flushed; or why there is none:
    ``no_space`` (:func:`has_room`) or ``write`` (no file, or a failed write)."""
    try:
        if not has_room(store, len(body), min_free_space):
            return "no_space"
        temp = store.begin_fill()
    except OSError:
        return "write"
    try:
        temp.file.write(body)
        temp.file.flush()
    except OSError:
        store.discard(temp)
        return "write"
    return temp


async def commit(store: Store, key: str, fill: FillFile, meta: EntryMeta) -> bool:
    """``store.commit(key, fill, meta)`` from the event loop, its fsync apart: the fsync of an
    entry over :data:`VERIFIED_WHOLE` bytes runs in the flush pool, where fsyncs overlap, and
    only then the commit itself on a commit thread (:func:`proxy.threads.run_commit`),
    which so never waits on a disk flush. Shielded as one call: a cancelled caller still
    commits (or discards) the file, which the store takes over whatever the outcome. An
    ``OSError`` propagates."""
    stored = False
    with anyio.CancelScope(shield=True):
        if meta.length > VERIFIED_WHOLE:
            await run_flush(_prepare, store, fill, meta.length)
        stored = await run_commit(store.commit, key, fill, meta, False)
    return stored


def _prepare(store: Store, fill: FillFile, length: int) -> None:
    """Blocks. Flush and fsync ``fill``'s file (on failure it is discarded and the error
    raised), then make room for its ``length`` bytes: deleting the files of many evicted
    entries, or of large ones, may take a while, which a commit thread then does not
    spend while every other commit (and a small miss's last byte) waits for it."""
    try:
        fill.file.flush()
        os.fsync(fill.file.fileno())
    except OSError:
        store.discard(fill)
        raise
    store.make_room(length)


class Store(Protocol):
    def get(self, key: str, memory_only: bool = False) -> Entry | None: ...

    def begin_fill(self) -> FillFile: ...

    def open_fill(self, name: str) -> int | None: ...

    def commit(self, key: str, fill: FillFile, meta: EntryMeta, sync: bool = True) -> bool: ...

    def commit_many(
        self, items: Sequence[tuple[str, FillFile, EntryMeta]]
    ) -> list[bool | OSError]: ...

    def discard(self, fill: FillFile) -> None: ...

    def make_room(self, length: int) -> None: ...

    def evict(self, key: str) -> None: ...

    def first_read(self, key: str, meta: EntryMeta) -> bool: ...

    def remembers(self, key: str, max_length: int) -> bool: ...

    def touch(self, key: str) -> None: ...

    def flush_touches(self) -> None: ...

    def sweep_temporary(self) -> int: ...

    def sweep_orphans(self) -> int: ...

    def claim_sweep(self) -> bool: ...

    def stats(self) -> StoreStats: ...

    def ready(self) -> bool: ...

    def close(self) -> None: ...
