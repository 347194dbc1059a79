"""Small entries committed in batches (proxy/store/batches.py, ``DiskStore.commit_many``): the
commits waiting behind one go together, and one entry's failure is its own."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import diskcache
import httpx
import pytest

from proxy.store import EntryMeta, FillFile
from proxy.store.disk import DiskStore, _AdoptingDisk
from tests.conftest import SESSION, ProxyFactory
from tests.helpers import artifact_url, auth, fetch, metric
from tests.standin import StandIn

SMALL = 2048


def _meta(body: bytes, prefetched: bool = False) -> EntryMeta:
    digest = hashlib.sha256(body).hexdigest()
    return EntryMeta(
        "application/octet-stream", len(body), digest, time.time(), prefetched=prefetched
    )


def _fill(store: DiskStore, body: bytes) -> FillFile:
    fill = store.begin_fill()
    fill.file.write(body)
    return fill


def _files(directory: Path) -> list[Path]:
    return [
        path for path in directory.rglob("*") if path.is_file() and path.suffix in {".val", ".fill"}
    ]


class _Held:
    """``DiskStore.commit_many``, patched: the first call waits for :attr:`release`; every
    call's batch size is recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        real = DiskStore.commit_many

        def commit_many(store: DiskStore, items: Sequence[Any]) -> list[bool | OSError]:
            self.sizes.append(len(items))
            if len(self.sizes) == 1:
                self.entered.set()
                assert self.release.wait(30)
            return real(store, items)

        monkeypatch.setattr(DiskStore, "commit_many", commit_many)


@contextlib.contextmanager
def _misses_waiting_for_their_commit(
    proxy: Any, object_ids: list[str]
) -> Iterator[list[Future[tuple[int, str, bytes]]]]:
    """Start a miss of each of ``object_ids``; yields once each client has all but its last
    byte (which waits for the commit) the futures of their status, ``X-Cache`` and bytes."""
    got_all_but_one = threading.Barrier(len(object_ids) + 1, timeout=30)

    def miss(object_id: str) -> tuple[int, str, bytes]:
        url = artifact_url(proxy, object_id)
        with httpx.stream("GET", url, headers=auth(), timeout=60) as response:
            data = b""
            for chunk in response.iter_raw():
                data += chunk
                if len(data) == SMALL - 1:
                    got_all_but_one.wait()
            return response.status_code, response.headers["x-cache"], data

    pool = ThreadPoolExecutor(len(object_ids))
    futures = [pool.submit(miss, object_id) for object_id in object_ids]
    try:
        got_all_but_one.wait()
        yield futures
    finally:
        pool.shutdown(wait=True)


def _misses_behind_a_held_commit(
    proxy: Any, standin: StandIn, held: _Held, ids: list[str]
) -> dict[str, bytes]:
    """A miss of ``arr_ba0000`` whose commit ``held`` holds, then misses of ``ids`` that finish
    their bodies meanwhile; released, each client must get all of its own body, as a MISS.
    Returns the bodies of ``ids``."""
    first = standin.add("session", SESSION, "arr_ba0000", size=SMALL)
    bodies = {
        object_id: standin.add("session", SESSION, object_id, size=SMALL) for object_id in ids
    }
    with ThreadPoolExecutor(1) as lone:
        leading = lone.submit(fetch, proxy, "arr_ba0000")
        assert held.entered.wait(20)  # its commit runs, and waits
        with _misses_waiting_for_their_commit(proxy, ids) as futures:
            held.release.set()
            results = [future.result() for future in futures]
        assert leading.result().content == first
    assert results == [(200, "MISS", body) for body in bodies.values()]
    return bodies


def test_commits_waiting_behind_a_batch_go_together_in_the_next(
    standin: StandIn, start_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one small miss's commit runs, ten more misses finish their bodies: their ten
    commits are one batch, and every client gets its own bytes, stored (hits next)."""
    held = _Held(monkeypatch)
    proxy = start_proxy(max_fills_per_key=64)
    bodies = _misses_behind_a_held_commit(
        proxy, standin, held, [f"arr_ba{i:04x}" for i in range(1, 11)]
    )
    assert held.sizes == [1, 10]
    for object_id, body in bodies.items():
        again = fetch(proxy, object_id)
        assert (again.headers["x-cache"], again.content) == ("HIT", body)


def test_an_entry_that_cannot_be_placed_fails_alone_in_its_batch(
    standin: StandIn, start_proxy: ProxyFactory, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a batch of five, the file of one cannot be moved into place (an I/O error): its client
    still gets its whole body, uncached and counted as a commit failure; the other four are
    stored; no file is left behind, in tmp/ or among the entries."""
    held = _Held(monkeypatch)
    real_store = _AdoptingDisk.store

    def store(
        disk: _AdoptingDisk, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN
    ) -> Any:
        if "arr_bad000" in str(key):
            raise OSError(5, "Input/output error")
        return real_store(disk, value, read, key=key)

    monkeypatch.setattr(_AdoptingDisk, "store", store)
    proxy = start_proxy(max_fills_per_key=64)
    ids = ["arr_ba0001", "arr_ba0002", "arr_bad000", "arr_ba0003", "arr_ba0004"]
    bodies = _misses_behind_a_held_commit(proxy, standin, held, ids)
    assert held.sizes == [1, 5]
    assert metric(proxy, "vlmrun_cache_store_failures_total", reason="commit") == 1
    for object_id, body in bodies.items():
        again = fetch(proxy, object_id)
        cached = "MISS" if object_id == "arr_bad000" else "HIT"
        assert (again.headers["x-cache"], again.content) == (cached, body)
    assert list((cache_dir / "tmp").iterdir()) == []
    assert len(_files(cache_dir / "entries")) == 5  # arr_ba0000 to arr_ba0004


def test_a_batch_the_index_refuses_stores_nothing_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index fails on the third entry of a batch (locked, say): the whole transaction is
    rolled back, so none of the batch is stored, and the files already moved into place for
    the first two are removed, not left as orphans for the next start's sweep. The store
    commits normally afterwards."""
    store = DiskStore(tmp_path, max_bytes=1_000_000, max_object_bytes=400_000)
    real_insert = diskcache.Cache._row_insert
    calls = 0

    def failing_insert(cache: diskcache.Cache, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:  # its file is in place already, the rows of two before it too
            raise sqlite3.OperationalError("database is locked")
        return real_insert(cache, *args)

    monkeypatch.setattr(diskcache.Cache, "_row_insert", failing_insert)
    bodies = [bytes([n]) * 1000 for n in range(4)]
    items = [(f"k{n}", _fill(store, body), _meta(body)) for n, body in enumerate(bodies)]
    assert store.commit_many(items) == [False] * 4
    assert [store.get(f"k{n}") for n in range(4)] == [None] * 4
    assert _files(tmp_path) == []
    assert store.stats().entries == 0
    monkeypatch.setattr(diskcache.Cache, "_row_insert", real_insert)
    assert store.commit("k0", _fill(store, bodies[0]), _meta(bodies[0]))
    entry = store.get("k0")
    assert entry is not None
    with entry.file:
        assert entry.file.read() == bodies[0]


def test_commit_many_keeps_each_entry_as_commit_would(tmp_path: Path) -> None:
    """An entry over ``max_object_bytes`` is refused and its file dropped while the rest of its
    batch is stored; a prefetched entry of the batch goes to the cold end of the LRU (the first
    evicted); a key of the batch already stored is replaced, its old file gone."""
    store = DiskStore(tmp_path, max_bytes=10_000, max_object_bytes=3_000)
    assert store.commit("again", _fill(store, b"old" * 100), _meta(b"old" * 100))
    batch = {
        "hot": b"h" * 2000,
        "huge": b"x" * 3001,
        "cold": b"c" * 2000,
        "again": b"new" * 100,
    }
    items = [
        (key, _fill(store, body), _meta(body, prefetched=key == "cold"))
        for key, body in batch.items()
    ]
    assert store.commit_many(items) == [True, False, True, True]
    assert store.get("huge") is None
    assert len(_files(tmp_path)) == 3
    again = store.get("again")
    assert again is not None
    with again.file:
        assert again.file.read() == b"new" * 100
    # 4,300 bytes stored; 6,000 more make room by evicting the coldest first: the prefetched one.
    for n in range(3):
        body = bytes([n]) * 2000
        assert store.commit(f"later{n}", _fill(store, body), _meta(body))
    assert store.get("cold") is None
    hot = store.get("hot")
    assert hot is not None
    hot.close()


def test_a_batch_larger_than_max_bytes_keeps_the_store_within_it(tmp_path: Path) -> None:
    """A batch whose entries together exceed ``max_bytes`` (32 small entries of a small store)
    is stored as one commit after another would be: the store stays within ``max_bytes``,
    the newest entries kept, and no file is left over beside the index."""
    store = DiskStore(tmp_path, max_bytes=10_000, max_object_bytes=3_000)
    bodies = [bytes([n]) * 2_500 for n in range(8)]  # 20,000 bytes in all
    items = [(f"k{n}", _fill(store, body), _meta(body)) for n, body in enumerate(bodies)]
    assert store.commit_many(items) == [True] * 8
    stats = store.stats()
    assert stats.bytes <= 10_000
    assert len(_files(tmp_path)) == stats.entries
    newest = store.get("k7")
    assert newest is not None
    with newest.file:
        assert newest.file.read() == bodies[7]


def test_a_part_of_a_batch_that_fails_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch over ``max_bytes`` goes in two parts; the commit lock of the second cannot be
    taken (an I/O error): the first part's entries are stored and say so, the second's say
    why not, and none of their files is left behind."""
    store = DiskStore(tmp_path, max_bytes=10_000, max_object_bytes=3_000)
    real = DiskStore._exclusive
    calls = 0

    @contextlib.contextmanager
    def exclusive(self: DiskStore) -> Iterator[None]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(5, "Input/output error")
        with real(self):
            yield

    monkeypatch.setattr(DiskStore, "_exclusive", exclusive)
    bodies = [bytes([n]) * 2_500 for n in range(8)]
    items = [(f"k{n}", _fill(store, body), _meta(body)) for n, body in enumerate(bodies)]
    outcomes = store.commit_many(items)
    assert outcomes[:4] == [True] * 4
    assert [type(outcome) for outcome in outcomes[4:]] == [OSError] * 4
    assert store.stats().entries == 4
    assert len(_files(tmp_path)) == 4
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_batch_of_misses_larger_than_max_size_keeps_the_cache_within_it(
    standin: StandIn, start_proxy: ProxyFactory, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack: with ``max_size`` 8 KiB, ten concurrent 2 KiB misses committed in one batch
    (20 KiB) made the cache hold 20 KiB, two and a half times its bound, and evicted every
    other entry on the way. Each client still gets its bytes; the cache stays within bound."""
    held = _Held(monkeypatch)
    proxy = start_proxy(max_size=8192, max_fills_per_key=64)
    _misses_behind_a_held_commit(proxy, standin, held, [f"arr_ba{i:04x}" for i in range(1, 11)])
    assert held.sizes == [1, 10]
    assert metric(proxy, "vlmrun_cache_bytes") <= 8192
    assert len(_files(cache_dir / "entries")) == metric(proxy, "vlmrun_cache_entries")


def test_closing_waits_for_the_batch_under_way_and_the_commits_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At shutdown the fills still waiting are cancelled; their commits, one batch under way
    and three queued behind it, are still made, and ``Batches.aclose`` (which the fills'
    ``aclose`` awaits before the store closes) returns only once they are: none reaches the
    store after it closed."""
    from proxy.store.batches import Batches

    held = _Held(monkeypatch)
    store = DiskStore(tmp_path, max_bytes=1_000_000, max_object_bytes=400_000)
    batches = Batches(store, min_free_space=0)
    bodies = {f"k{n}": bytes([n]) * 1000 for n in range(4)}

    async def main() -> bool:
        def write(key: str) -> asyncio.Task[object]:
            body = bodies[key]
            return asyncio.create_task(batches.write(key, body, lambda: _meta(body)))

        writes = [write("k0")]
        await asyncio.to_thread(held.entered.wait)  # k0's batch runs
        writes += [write(key) for key in ("k1", "k2", "k3")]
        await asyncio.sleep(0)  # queued behind it
        for write in writes:
            write.cancel()  # as Fills.aclose cancels the fills left
        closing = asyncio.create_task(batches.aclose())
        for _ in range(5):
            await asyncio.sleep(0)
        waited = not closing.done()
        held.release.set()
        await closing
        return waited

    assert asyncio.run(main())
    assert held.sizes == [1, 3]
    for key, body in bodies.items():
        entry = store.get(key)
        assert entry is not None, key
        with entry.file:
            assert entry.file.read() == body


def test_an_index_locked_past_its_timeout_fails_the_batch_as_a_commit_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another connection holds the index's write lock longer than SQLite waits (diskcache
    then raises its ``Timeout``, which is no ``OSError``): each entry of the batch fails with an
    ``OSError`` (a commit failure, counted and logged as one, rather than an unexpected error in
    every fill of the batch), and no file is left behind."""
    store = DiskStore(tmp_path, max_bytes=1_000_000, max_object_bytes=400_000)

    def locked(cache: diskcache.Cache, retry: bool = False) -> Any:
        raise diskcache.Timeout

    monkeypatch.setattr(diskcache.Cache, "transact", locked)
    bodies = [bytes([n]) * 1000 for n in range(3)]
    items = [(f"k{n}", _fill(store, body), _meta(body)) for n, body in enumerate(bodies)]
    outcomes = store.commit_many(items)
    assert [type(outcome) for outcome in outcomes] == [OSError] * 3
    assert _files(tmp_path) == []
    with pytest.raises(OSError):
        store.commit("k0", _fill(store, bodies[0]), _meta(bodies[0]))
    assert _files(tmp_path) == []
