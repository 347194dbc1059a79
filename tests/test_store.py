"""The disk tier on its own: commit, read, evict, bounds, leftovers, no pickles."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.services import sweep_at_low_priority
from proxy.store import EntryMeta
from proxy.store.disk import DiskStore
from proxy.store.index import READERS, Index
from proxy.store.sweeps import SWEEP_PAUSE, SWEEP_STEP


def _meta(body: bytes) -> EntryMeta:
    return EntryMeta(
        "application/octet-stream", len(body), hashlib.sha256(body).hexdigest(), time.time()
    )


def _put(store: DiskStore, key: str, body: bytes) -> bool:
    fill = store.begin_fill()
    fill.file.write(body)
    return store.commit(key, fill, _meta(body))


@pytest.fixture
def store(tmp_path: Path) -> DiskStore:
    return DiskStore(tmp_path, max_bytes=1_000_000, max_object_bytes=400_000)


def test_commit_then_get(store: DiskStore) -> None:
    """A committed entry reads back with its metadata; an unknown key is None."""
    assert _put(store, "k", b"hello")
    entry = store.get("k")
    assert entry is not None
    with entry.file:
        assert entry.file.read() == b"hello"
    assert entry.meta.length == 5 and entry.meta.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert store.get("other") is None


def test_commit_moves_the_file_and_leaves_no_temporary(store: DiskStore, tmp_path: Path) -> None:
    """A fill's file is adopted by rename: nothing is left in tmp/."""
    _put(store, "k", b"x" * 300_000)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert store.stats().bytes == 300_000


def test_objects_over_the_limit_are_refused(store: DiskStore, tmp_path: Path) -> None:
    """commit returns False for an object over max_object_bytes and drops the file."""
    assert not _put(store, "big", b"x" * 400_001)
    assert store.get("big") is None
    assert list((tmp_path / "tmp").iterdir()) == []


def test_eviction_is_byte_aware_and_least_recently_used_first(store: DiskStore) -> None:
    """The total never exceeds max_bytes, and a recently read entry outlives older ones."""
    rng = random.Random(7)
    _put(store, "keep", b"k" * 100_000)
    for index in range(60):
        size = rng.choice([1, 10_000, 150_000, 399_999])
        assert _put(store, f"k{index}", bytes([index]) * size)
        assert store.stats().bytes <= 1_000_000
        entry = store.get("keep")  # touch it: most recently used
        assert entry is not None
        entry.close()
    survivor = store.get("keep")
    assert survivor is not None
    survivor.close()


def test_a_key_stored_again_replaces_its_bytes_and_its_file(
    store: DiskStore, tmp_path: Path
) -> None:
    """Storing a key again leaves one entry, the new bytes, one file and the right size, both
    when the old copy's bytes are needed to make room and when they are not; a reader of the
    old copy keeps it."""
    assert _put(store, "k", b"a" * 300_000)
    old = store.get("k")
    assert old is not None
    assert _put(store, "k", b"b" * 200_000)  # room enough: replaced by the set itself
    assert _put(store, "other", b"o" * 400_000)
    assert _put(store, "k", b"c" * 399_000)  # 600k + 399k - 200k: fits once k's bytes go
    assert store.stats().bytes == 799_000 and store.stats().entries == 2
    new = store.get("k")
    assert new is not None
    with new.file, old.file:
        assert new.file.read() == b"c" * 399_000
        assert old.file.read() == b"a" * 300_000
    assert _put(store, "k", b"d" * 399_000)  # 799k + 399k: no room without k's own bytes
    assert store.stats().bytes == 799_000
    other = store.get("other")
    assert other is not None  # not evicted: k's old copy made the room
    other.close()
    files = list((tmp_path / "entries").rglob("*.val"))
    assert len(files) == 2


def test_evicted_entry_stays_readable_through_an_open_handle(store: DiskStore) -> None:
    """A reader mid-stream keeps its bytes even if the entry is evicted under it."""
    _put(store, "k", b"abc" * 1000)
    entry = store.get("k")
    assert entry is not None
    store.evict("k")
    assert store.get("k") is None
    with entry.file:
        assert entry.file.read() == b"abc" * 1000


def test_leftover_fills_are_swept_but_live_ones_are_spared(tmp_path: Path) -> None:
    """The sweep removes temporary files whose fill is gone, and leaves alone those another
    store (another worker, an admin command) is still writing: opening a store and sweeping
    never breaks a running fill."""
    first = DiskStore(tmp_path, 1_000_000, 400_000)
    crashed = first.begin_fill()
    crashed.file.write(b"partial")
    crashed.file.close()  # its process is gone: no lock
    live = first.begin_fill()
    live.file.write(b"still coming")
    other = DiskStore(tmp_path, 1_000_000, 400_000)
    assert other.sweep_temporary() == 1
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == [Path(live.path).name]
    live.file.write(b" and done")
    meta = EntryMeta("text/plain", 21, "0" * 64, 0.0)
    assert first.commit("k", live, meta)
    entry = other.get("k")
    assert entry is not None and entry.file.read() == b"still coming and done"
    entry.close()


def test_nothing_is_pickled(store: DiskStore, tmp_path: Path) -> None:
    """Keys are stored raw and metadata as JSON text: no row uses diskcache's pickle mode."""
    _put(store, "k", b"data")
    with sqlite3.connect(tmp_path / "entries" / "cache.db") as db:
        rows = db.execute("SELECT key, raw, mode, tag FROM Cache").fetchall()
    ((key, raw, mode, tag),) = rows
    assert (key, raw) == ("k", 1)
    assert mode == 2  # diskcache MODE_BINARY: a plain file (MODE_PICKLE would be 4)
    assert EntryMeta.from_json(tag).length == 4


def test_damaged_metadata_is_a_miss(store: DiskStore, tmp_path: Path) -> None:
    """A row whose tag is not our JSON is evicted and reported as a miss."""
    _put(store, "k", b"data")
    with sqlite3.connect(tmp_path / "entries" / "cache.db") as db:
        db.execute("UPDATE Cache SET tag = 'not json'")
    assert store.get("k") is None
    assert store.stats().entries == 0


@pytest.mark.parametrize("damage", ["garbage", "malformed"])
def test_damaged_index_at_start_is_moved_aside(tmp_path: Path, damage: str) -> None:
    """A garbage or malformed cache.db does not stop the store: it starts cold and works."""
    first = DiskStore(tmp_path, 1_000_000, 400_000)
    for index in range(50):
        _put(first, f"k{index}", b"x" * 1000)
    first.close()
    db = tmp_path / "entries" / "cache.db"
    if damage == "garbage":
        db.write_bytes(b"this is not a database" * 100)
    else:
        data = bytearray(db.read_bytes())
        assert len(data) > 4096
        data[4096:] = b"\xa5" * (len(data) - 4096)  # keep the header page, scribble the rest
        db.write_bytes(bytes(data))
    resets: list[bool] = []
    store = DiskStore(tmp_path, 1_000_000, 400_000, on_reset=lambda: resets.append(True))
    for index in range(50):  # a malformed page may only show up on use
        store.get(f"k{index}")
    assert _put(store, "fresh", b"new")
    entry = store.get("fresh")
    assert entry is not None
    entry.close()
    assert resets == [True]
    store.close()


def test_index_damaged_while_running_is_reset(tmp_path: Path) -> None:
    """Damage found by a later read resets the store once; it keeps working."""
    resets: list[bool] = []
    store = DiskStore(tmp_path, 1_000_000, 400_000, on_reset=lambda: resets.append(True))
    _put(store, "k", b"data")
    store._damaged(store._cache, sqlite3.DatabaseError("database disk image is malformed"))
    assert store.get("k") is None
    assert _put(store, "k", b"data")
    assert resets == [True]
    store.close()


def test_memory_index_follows_changes_made_by_another_process(tmp_path: Path) -> None:
    """If another process evicts and re-stores a key, this one serves the new file, not the old."""
    mine = DiskStore(tmp_path, 1_000_000, 400_000)
    theirs = DiskStore(tmp_path, 1_000_000, 400_000)
    _put(mine, "k", b"first")
    entry = mine.get("k")  # now in mine's memory index
    assert entry is not None
    entry.close()
    theirs.evict("k")
    assert mine.get("k") is None
    _put(theirs, "k", b"second")
    entry = mine.get("k")
    assert entry is not None
    with entry.file:
        assert entry.file.read() == b"second"
    mine.close()
    theirs.close()


def test_orphaned_files_are_swept(store: DiskStore, tmp_path: Path) -> None:
    """A file left in entries/ without an index row (crash between rename and insert) is
    removed by the sweep; indexed entries are untouched."""
    _put(store, "kept", b"indexed")
    orphan = tmp_path / "entries" / "ab" / "cd" / "0123456789abcdef0123456789ab.val"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"nobody knows me")
    assert store.sweep_orphans(min_age=3600) == 0  # too recent: could be a commit in progress
    assert store.sweep_orphans(min_age=0) == 1
    assert not orphan.exists()
    entry = store.get("kept")
    assert entry is not None
    with entry.file:
        assert entry.file.read() == b"indexed"


def _access_times(directory: Path) -> dict[str, float]:
    with sqlite3.connect(directory / "entries" / "cache.db") as db:
        return dict(db.execute("SELECT key, access_time FROM Cache"))


def test_a_lookup_through_the_index_writes_nothing(tmp_path: Path) -> None:
    """A key the memory index does not know is read with a read-only query; its recency is
    written later, in the batched flush, not as a write transaction per hit."""
    writer = DiskStore(tmp_path, 1_000_000, 400_000)
    assert _put(writer, "k", b"x" * 100)
    reader = DiskStore(tmp_path, 1_000_000, 400_000)  # knows nothing in memory
    before = _access_times(tmp_path)
    entry = reader.get("k")
    assert entry is not None and entry.file.read() == b"x" * 100
    entry.close()
    assert _access_times(tmp_path) == before
    reader.flush_touches()
    assert _access_times(tmp_path)["k"] > before["k"]


def test_room_for_one_large_object_among_many_small_ones(tmp_path: Path) -> None:
    """Thousands of small entries make room for one large one: the bound holds, the oldest
    go first, and the newest small ones stay."""
    store = DiskStore(tmp_path, max_bytes=1_000_000, max_object_bytes=1_000_000)
    for index in range(2000):
        assert _put(store, f"small{index}", bytes([index % 256]) * 400)
    assert _put(store, "large", b"L" * 600_000)
    stats = store.stats()
    assert stats.bytes <= 1_000_000
    assert store.get("small0") is None
    newest = store.get("small1999")
    assert newest is not None
    newest.close()


def _commit_many(directory: str, name: str, start: Any, results: Any) -> None:
    """In a process of its own: commit 60 entries of 9,000 bytes into a 100,000-byte store,
    reporting every total seen above the bound."""
    store = DiskStore(directory, 100_000, 100_000)
    start.wait(timeout=60)
    overshoot = []
    for index in range(60):
        _put(store, f"{name}{index}", b"z" * 9_000)
        if (size := store.stats().bytes) > 100_000:
            overshoot.append(size)
    results.put(overshoot)


def test_two_processes_committing_at_once_keep_the_bound(tmp_path: Path) -> None:
    """Two processes (two workers) making room in one directory at once never overshoot it:
    the room-making lock is an flock, not a lock of one process."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    workers = [
        context.Process(target=_commit_many, args=(str(tmp_path), name, start, results))
        for name in "ab"
    ]
    for worker in workers:
        worker.start()
    seen = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert seen == [[], []]
    assert DiskStore(tmp_path, 100_000, 100_000).stats().bytes <= 100_000


def test_making_room_releases_the_lock_between_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room for one large object among many small ones is made a batch at a time: while one
    batch's files are unlinked, another store (another worker) commits."""
    monkeypatch.setattr("proxy.store.disk._EVICT_BATCH", 100)
    store = DiskStore(tmp_path, max_bytes=1_000_000, max_object_bytes=1_000_000)
    store.load((f"small{i}", b"s" * 400, _meta(b"s" * 400)) for i in range(2000))
    other = DiskStore(tmp_path, max_bytes=1_000_000, max_object_bytes=1_000_000)
    committed: list[bool] = []
    unlink = Index.unlink

    def unlink_while_another_commits(index: Index, entries: Any) -> None:
        if not committed:  # the first batch: the other store must get the lock meanwhile
            worker = threading.Thread(target=lambda: committed.append(_put(other, "o", b"o")))
            worker.start()
            worker.join(timeout=30)
            assert committed == [True], "the commit lock was held while unlinking"
        unlink(index, entries)

    monkeypatch.setattr(Index, "unlink", unlink_while_another_commits)
    assert _put(store, "large", b"L" * 600_000)
    assert store.stats().bytes <= 1_000_000
    entry = other.get("o")
    assert entry is not None
    entry.close()


def test_recency_of_lookups_outside_the_memory_index_drives_eviction(tmp_path: Path) -> None:
    """A key read through the index (not the memory index) counts as recently used once the
    batched access times are flushed: eviction takes an older, unread one instead."""
    writer = DiskStore(tmp_path, max_bytes=3_000, max_object_bytes=3_000)
    for key in ("a", "b", "c"):
        assert _put(writer, key, b"x" * 1_000)
    Index(tmp_path / "entries").record_access_times({"a": 1.0, "b": 2.0, "c": 3.0})
    reader = DiskStore(tmp_path, max_bytes=3_000, max_object_bytes=3_000)
    entry = reader.get("a")  # a lookup through the index, by a process that never saw "a"
    assert entry is not None
    entry.close()
    reader.flush_touches()
    assert _put(writer, "d", b"y" * 1_000)
    assert _keys(tmp_path) == {"a", "c", "d"}


def _keys(directory: Path) -> set[str]:
    return {entry.key for entry in Index(directory / "entries").entries()}


def test_sweep_merges_index_and_directories_exactly(tmp_path: Path) -> None:
    """With many entries and orphans spread over the directories, the sweep removes exactly the
    orphans; and only the first store of a start claims the sweep."""
    store = DiskStore(tmp_path, 10_000_000, 400_000)
    bodies = {f"k{index}": f"body {index}".encode() for index in range(300)}
    for key, body in bodies.items():
        assert _put(store, key, body)
    rng = random.Random(7)
    orphans = []
    for _ in range(40):
        name = f"{rng.getrandbits(128):032x}.val"
        path = tmp_path / "entries" / name[:2] / name[2:4] / name[4:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"orphan")
        orphans.append(path)
    assert store.sweep_orphans(min_age=0) == 40
    assert not any(path.exists() for path in orphans)
    for key, body in bodies.items():
        entry = store.get(key)
        assert entry is not None and entry.file.read() == body
        entry.close()
    other = DiskStore(tmp_path, 10_000_000, 400_000)
    assert store.claim_sweep() and not other.claim_sweep()


def test_removal_spares_an_entry_replaced_since_it_was_listed(
    store: DiskStore, tmp_path: Path
) -> None:
    """Index.remove deletes an entry only if it still names the listed file: one a later commit
    replaced stays whole, while the others listed go, file and all."""
    _put(store, "replaced", b"old" * 100)
    _put(store, "other", b"x" * 100)
    index = Index(tmp_path / "entries")
    listed = list(index.entries())
    old_file = index.path(next(e for e in listed if e.key == "replaced"))
    _put(store, "replaced", b"new" * 100)
    removed = index.remove(listed)
    assert [e.key for e in removed] == ["other"]
    assert old_file is not None and not old_file.exists()  # the replaced file went with its commit
    entry = store.get("replaced")
    assert entry is not None
    with entry.file:
        assert entry.file.read() == b"new" * 100
    assert store.get("other") is None and store.stats().entries == 1
    assert store.stats().bytes == 300


def test_lookups_from_many_threads_share_a_few_index_connections(tmp_path: Path) -> None:
    """Lookups through the index from 24 threads at once open at most READERS connections
    (one per thread cost ~1.9 MiB each), and every lookup finds its entry."""
    writer = DiskStore(tmp_path, 10_000_000, 400_000)
    writer.load((f"k{i}", b"%d" % i, _meta(b"%d" % i)) for i in range(24))
    reader = DiskStore(tmp_path, 10_000_000, 400_000)  # no memory index: every get queries
    start = threading.Barrier(24)
    found: list[bytes] = []

    def look(index: int) -> None:
        start.wait(timeout=30)
        entry = reader.get(f"k{index}")
        assert entry is not None
        with entry.file:
            found.append(entry.file.read())

    threads = [threading.Thread(target=look, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(found) == sorted(b"%d" % i for i in range(24))
    assert 1 <= reader._readers.opened <= READERS


def test_the_orphan_sweep_stops_when_the_store_closes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sweep still walking when the store closes stops at its next pause, and says so."""
    store = DiskStore(tmp_path, 10_000_000, 400_000)
    for index in range(3 * SWEEP_STEP):
        name = f"{index:032x}.val"
        path = tmp_path / "entries" / name[:2] / name[2:4] / name[4:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"orphan")
    store.close()
    with caplog.at_level("INFO", logger="proxy.store.sweeps"):
        assert store.sweep_orphans(min_age=0) == SWEEP_STEP
    assert f"orphan sweep: {SWEEP_STEP} files checked" in caplog.text
    assert "stopped: the store closed" in caplog.text


def test_the_orphan_sweep_paces_itself_over_indexed_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep pauses every SWEEP_STEP files it walks, indexed ones included (a full cache
    is nearly all indexed files), and reports how many it checked."""
    pauses: list[float] = []
    store = DiskStore(tmp_path, 10_000_000, 400_000)
    store.load((f"k{i}", b"x", _meta(b"x")) for i in range(2 * SWEEP_STEP + 5))
    monkeypatch.setattr(store._closing, "wait", lambda seconds: bool(pauses.append(seconds)))
    with caplog.at_level("INFO", logger="proxy.store.sweeps"):
        assert store.sweep_orphans(min_age=0) == 0
    assert pauses == [SWEEP_PAUSE, SWEEP_PAUSE]
    assert f"orphan sweep: {2 * SWEEP_STEP + 5} files checked" in caplog.text


def test_the_orphan_sweep_runs_at_the_lowest_priority_in_a_thread_of_its_own() -> None:
    """The server's sweep thread lowers its own priority to nice 19; the caller's is unchanged
    (a pooled worker thread must not keep a lowered priority)."""
    seen: list[int] = []

    class Probe:
        def sweep_orphans(self) -> int:
            seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            return 0

    ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    sweeper = threading.Thread(target=sweep_at_low_priority, args=(Probe(),))
    sweeper.start()
    sweeper.join(timeout=30)
    assert seen == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == ours


def test_load_stores_many_entries_in_batches(tmp_path: Path) -> None:
    """DiskStore.load indexes entries a batch per transaction: each reads back, one over
    max_object_bytes is skipped, the bound holds, and no temporary file is left."""
    store = DiskStore(tmp_path, max_bytes=10_000, max_object_bytes=1_000)
    items = [(f"k{i}", b"%04d" % i * 25, _meta(b"%04d" % i * 25)) for i in range(120)]
    items.insert(7, ("big", b"b" * 1_001, _meta(b"b" * 1_001)))
    assert store.load(items, batch=16) == 120
    assert store.stats().bytes <= 10_000 and store.get("big") is None
    newest = store.get("k119")
    assert newest is not None and newest.file.read() == b"0119" * 25
    newest.close()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_entries_share_256_directories_beside_entries_named_the_old_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New entries go to ``ab/00/`` (256 directories, not one per entry); entries a cache
    already holds under diskcache's own ``ab/cd/`` names keep being served, and the orphan
    sweep tells orphans from entries under both schemes. A directory removed meanwhile is made
    again."""
    import diskcache

    from proxy.store import disk

    store = DiskStore(tmp_path, 10_000_000, 400_000)
    bodies = {f"k{index}": f"body {index}".encode() for index in range(600)}
    items = list(bodies.items())
    with monkeypatch.context() as old_names:  # as a cache written before this scheme
        old_names.setattr(disk._AdoptingDisk, "filename", diskcache.Disk.filename)
        for key, body in items[:300]:
            assert _put(store, key, body)
    entries = tmp_path / "entries"
    old = set(entries.rglob("*.val"))
    assert len({path.parent for path in old}) > 250  # 300 names over 65,536 directories
    for key, body in items[300:]:
        assert _put(store, key, body)
    new = set(entries.rglob("*.val")) - old
    assert len(new) == 300 and {path.parent.name for path in new} == {"00"}
    assert len({path.parent for path in new}) <= 256
    leaf = next(iter(new)).parent
    for path in list(leaf.iterdir()):  # evicting the last entry of a directory removes it
        key = next(e.key for e in Index(entries).entries() if entries / (e.filename or "") == path)
        store.evict(key)
        del bodies[key]
    assert not leaf.exists()
    fresh = DiskStore(tmp_path, 10_000_000, 400_000)  # a new name lands anywhere: keep trying
    with monkeypatch.context() as fixed:
        fixed.setattr(disk.os, "urandom", lambda n: bytes.fromhex(leaf.parent.name) * n)
        assert _put(fresh, "again", b"again")
    assert (leaf / f"{leaf.parent.name * 15}.val").read_bytes() == b"again"
    bodies["again"] = b"again"
    orphans = [entries / "aa" / "bb" / "orphan.val", entries / "aa" / "00" / "orphan.val"]
    for path in orphans:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"orphan")
    assert fresh.sweep_orphans(min_age=0) == 2
    for key, body in bodies.items():
        entry = fresh.get(key)
        assert entry is not None and entry.file.read() == body, key
        entry.close()
