"""The store's worker threads (proxy/threads.py): calls that wait on other processes must not
take the threads that lookups and hits need."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import os
import subprocess
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.threads import THREADS, Pool, _run
from tests.conftest import SESSION, ProxyFactory
from tests.helpers import artifact_url, auth, fetch, wait_until
from tests.servers import ServerThread
from tests.standin import Fault, StandIn

#: More misses committing at once than the store has worker threads.
MISSES = THREADS + 16
SMALL = 4096


def _blocked_on(lock: Path) -> bool:
    """True once some thread waits for ``lock``'s ``flock`` (a ``->`` line in /proc/locks)."""
    info = os.stat(lock)
    inode = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino} "
    with open("/proc/locks") as locks:
        return any("->" in line and inode in line for line in locks)


def test_commits_waiting_for_the_commit_lock_leave_threads_for_hits(
    standin: StandIn, start_proxy: ProxyFactory, cache_dir: Path
) -> None:
    """Another process holding the commit lock (another worker making room, say) stalls the
    commits of every miss here, more of them than there are worker threads; a hit of a large
    entry (read in worker threads) is still served meanwhile, and the misses complete with
    their exact bytes once the lock is free."""
    proxy = start_proxy(max_fills=MISSES + 8, max_fills_per_key=MISSES + 8)
    big = standin.add("session", SESSION, "arr_b16b16", size=3 * 1024 * 1024)
    assert fetch(proxy, "arr_b16b16").content == big  # stored; streamed from disk when hit
    bodies = {
        f"arr_{i:06x}": standin.add("session", SESSION, f"arr_{i:06x}", size=SMALL)
        for i in range(MISSES)
    }
    lock = cache_dir / "locks" / "commit.lock"
    holder = os.open(lock, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # as another process's commit would
    held_back = threading.Condition()
    waiting: list[str] = []  # misses that have all but their last byte
    got: dict[str, bytes] = {}

    def miss(object_id: str) -> None:
        url = artifact_url(proxy, object_id)
        with httpx.stream("GET", url, headers=auth(), timeout=60) as response:
            data = b""
            for chunk in response.iter_raw():
                data += chunk
                if len(data) == SMALL - 1:  # the last byte waits for the commit
                    with held_back:
                        waiting.append(object_id)
                        held_back.notify_all()
            got[object_id] = data

    pool = ThreadPoolExecutor(MISSES)
    try:
        futures = [pool.submit(miss, object_id) for object_id in bodies]
        with held_back:  # every body arrived and every commit is under way, or starved
            held_back.wait_for(lambda: len(waiting) == MISSES, timeout=20)
        assert len(waiting) == MISSES, f"{len(waiting)} of {MISSES} misses got their bodies"
        assert wait_until(lambda: _blocked_on(lock), timeout=20)
        hit = httpx.get(artifact_url(proxy, "arr_b16b16"), headers=auth(), timeout=10)
        assert (hit.status_code, hit.headers["x-cache"]) == (200, "HIT")
        assert hit.content == big
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
        pool.shutdown(wait=True)
    for future in futures:
        future.result()
    assert got == bodies


def test_a_small_miss_makes_two_worker_thread_hops_and_a_memory_hit_none(
    standin: StandIn, proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a miss costs beside a bare forwarder is mostly its worker-thread hops: a 1 KiB miss
    makes two (its disk lookup, which also takes the key's lease, and its commit, which writes
    the file), and a repeated hit from the memory tier none."""
    from proxy import threads

    hops: list[str] = []
    real = threads._run

    async def counted(pool: Any, func: Any, args: tuple[object, ...]) -> Any:
        hops.append(getattr(func, "__qualname__", repr(func)))
        return await real(pool, func, args)

    standin.add("session", SESSION, "arr_0f0f0e", size=1024)
    body = standin.add("session", SESSION, "arr_0f0f0f", size=1024)
    assert fetch(proxy, "arr_0f0f0e").status_code == 200  # the credential's proof, recorded
    monkeypatch.setattr(threads, "_run", counted)
    first = fetch(proxy, "arr_0f0f0f")
    assert (first.headers["x-cache"], first.content) == ("MISS", body)
    assert len(hops) == 2, hops
    hops.clear()
    assert fetch(proxy, "arr_0f0f0f").headers["x-cache"] == "HIT"  # from disk, into memory
    hops.clear()
    assert fetch(proxy, "arr_0f0f0f").headers["x-cache"] == "HIT"
    assert hops == []


def test_a_lease_taken_by_the_lookup_is_given_back_when_no_fill_takes_it(
    standin: StandIn, start_proxy: ProxyFactory, cache_dir: Path
) -> None:
    """The lookup of a miss takes the key's lease for the fill to come; when the request is
    passed through instead (here: its credential already runs its one fill), the lease is given
    back at once, so no later fill of the key, in any process, waits for it."""
    from proxy.keys import ArtifactKey
    from proxy.store.claims import Claims

    proxy = start_proxy(max_fills_per_key=1)
    release = threading.Event()
    standin.add("session", SESSION, "arr_a0a0a0", size=1024)
    standin.faults["arr_a0a0a0"] = Fault(hold_start=release, times=1)
    other = standin.add("session", SESSION, "arr_b0b0b0", size=1024)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(fetch, proxy, "arr_a0a0a0")
        assert standin.wait_for_requests("/v1/artifacts", 1)
        passed = fetch(proxy, "arr_b0b0b0")  # the credential's one fill is taken
        assert (passed.headers.get("x-cache"), passed.content) == (None, other)
        claims = Claims(cache_dir)
        fd = claims.try_claim(ArtifactKey("session", SESSION, "arr_b0b0b0").cache_key)
        assert fd is not None  # nobody holds it
        Claims.release(fd)
        release.set()
        assert held.result(timeout=20).status_code == 200
    assert fetch(proxy, "arr_b0b0b0").headers["x-cache"] == "MISS"


def test_a_client_joining_a_fill_gives_back_the_lease_its_lookup_took(
    standin: StandIn, start_proxy: ProxyFactory
) -> None:
    """Two first requests for a key: the first one's lookup takes the key's lease, but the
    second one's lookup returns first and starts the fill, which must wait for that lease.
    The first joins that fill: it gives the lease back as it joins, not after the answer it
    waits for (which would hold the fill until first_byte_timeout)."""
    proxy = start_proxy(first_byte_timeout="60s")
    body = standin.add("session", SESSION, "arr_c1c1c1", size=200_000)
    assert fetch(proxy, "arr_000000").status_code == 404  # up: its services are open
    fills = proxy.app.state.services.fills
    preclaim, start = fills.preclaim, fills.start
    second_started = threading.Event()
    calls: list[object] = []

    def first_waits(key: Any) -> Any:
        lease = preclaim(key)
        calls.append(lease)
        if len(calls) == 1:  # the first lookup holds the lease until the second's fill starts
            assert lease is not None
            assert second_started.wait(timeout=20)
        return lease

    def started(*args: Any, **kwargs: Any) -> Any:
        fill = start(*args, **kwargs)
        second_started.set()
        return fill

    fills.preclaim, fills.start = first_waits, started
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(fetch, proxy, "arr_c1c1c1")
        assert wait_until(lambda: len(calls) == 1)
        second = pool.submit(fetch, proxy, "arr_c1c1c1")
        results = [first.result(timeout=20), second.result(timeout=20)]
    assert all(r.status_code == 200 and r.content == body for r in results)
    assert sorted(r.headers["x-cache"] for r in results) == ["COALESCED", "MISS"]
    assert standin.hits("session", SESSION, "arr_c1c1c1") == 1


def test_a_small_commit_never_waits_for_the_fsync_of_a_large_one(
    standin: StandIn, start_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits run on one thread, one at a time. A large entry's fsync (a slow disk flush)
    runs before its commit, in a pool of its own: while it is held, a small miss of another key
    completes and is stored; the large one then completes too, fsynced before it was indexed."""
    real_fsync = os.fsync
    flushing = threading.Event()
    release = threading.Event()

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".fill"):
            flushing.set()
            assert release.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    proxy = start_proxy()
    _small_miss_while_a_large_commit_is_held(proxy, standin, 300_000, flushing, release)


def _small_miss_while_a_large_commit_is_held(
    proxy: ServerThread,
    standin: StandIn,
    size: int,
    held: threading.Event,
    release: threading.Event,
) -> None:
    """A large miss of ``size`` bytes runs until its commit is held (``held`` is set); then a
    small miss of another key completes and is stored. Once ``release`` is set, the large miss
    completes with its bytes and is stored too."""
    large = standin.add("session", SESSION, "arr_1a7e00", size=size)
    small = standin.add("session", SESSION, "arr_5e1100", size=SMALL)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(fetch, proxy, "arr_1a7e00")
        try:
            assert held.wait(30)
            first = httpx.get(artifact_url(proxy, "arr_5e1100"), headers=auth(), timeout=10)
            assert (first.headers["x-cache"], first.content) == ("MISS", small)
            again = fetch(proxy, "arr_5e1100")
            assert (again.headers["x-cache"], again.content) == ("HIT", small)
            assert not pending.done()  # its last byte waits for its commit
        finally:
            release.set()
        assert pending.result().content == large
    assert fetch(proxy, "arr_1a7e00").headers["x-cache"] == "HIT"


def test_fsyncs_of_large_commits_on_a_slow_disk_leave_threads_for_hits(
    standin: StandIn, start_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow disk: every large entry's fsync hangs. More large misses reach their commit at
    once than the store has worker threads (a few users fetching big artifacts); a hit of a
    stored entry (looked up and read in worker threads) is still served meanwhile, and the
    misses complete with their exact bytes once the disk catches up."""
    from proxy import fills as fills_module

    proxy = start_proxy(max_fills=MISSES + 8, max_fills_per_key=MISSES + 8)
    stored = standin.add("session", SESSION, "arr_b16b17", size=300_000)
    assert fetch(proxy, "arr_b16b17").content == stored
    real_fsync, real_commit = os.fsync, fills_module.commit
    committing = threading.Semaphore(0)
    release = threading.Event()

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".fill"):
            assert release.wait(60)
        real_fsync(fd)

    async def counted(*args: Any) -> bool:
        committing.release()  # on the event loop, before the commit hands its fsync on
        return await real_commit(*args)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(fills_module, "commit", counted)
    bodies = {
        f"arr_{i:06x}": standin.add("session", SESSION, f"arr_{i:06x}", size=100_000)
        for i in range(MISSES)
    }
    pool = ThreadPoolExecutor(MISSES)
    try:
        futures = {o: pool.submit(fetch, proxy, o) for o in bodies}
        for _ in range(THREADS):  # as many misses wait for their fsync as there are threads
            assert committing.acquire(timeout=20)
        hit = httpx.get(artifact_url(proxy, "arr_b16b17"), headers=auth(), timeout=10)
        assert (hit.status_code, hit.headers["x-cache"]) == (200, "HIT")
        assert hit.content == stored
        assert not any(f.done() for f in futures.values())
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert {o: f.result().content for o, f in futures.items()} == bodies


def test_a_commit_making_room_never_holds_up_other_misses_while_it_deletes_files(
    standin: StandIn, start_proxy: ProxyFactory, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full cache: a large miss's commit evicts entries, then deletes their files (many, or
    large ones on a slow disk: here the deletion hangs). Meanwhile a small miss of another key,
    whose last byte waits for its own commit, completes and is stored; the large one completes
    too once the deletion does."""
    proxy = start_proxy(max_size="1MiB", max_object_size="1MiB")
    for i in range(6):  # 600 kB stored, the oldest to go first
        standin.add("session", SESSION, f"arr_01d{i:03d}", size=100_000)
        assert fetch(proxy, f"arr_01d{i:03d}").headers["x-cache"] == "MISS"
    entries = str(cache_dir / "entries")
    real_unlink = os.unlink
    deleting = threading.Event()
    release = threading.Event()

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).startswith(entries) and str(path).endswith(".val"):
            deleting.set()
            assert release.wait(60)
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    _small_miss_while_a_large_commit_is_held(proxy, standin, 600_000, deleting, release)


def test_the_pool_runs_calls_on_up_to_its_size_of_threads_and_returns_their_outcomes() -> None:
    """A pool of three threads runs three blocking calls at once and no more (the fourth waits
    for a free thread, then runs); each caller gets its own result, or its own exception."""
    pool = Pool(3, "test-pool")
    started = threading.Barrier(4, timeout=20)  # three calls and this test
    release = threading.Event()
    running: list[int] = []

    def blocking(n: int) -> int:
        running.append(n)
        if n < 3:
            started.wait()
            assert release.wait(20)
        return n * 10

    def failing() -> None:
        raise ValueError("its own")

    async def main() -> tuple[list[int], str]:
        calls = [asyncio.create_task(_run(pool, blocking, (n,))) for n in range(4)]
        await asyncio.to_thread(started.wait)
        assert sorted(running) == [0, 1, 2]  # the fourth waits for a thread
        release.set()
        results = list(await asyncio.gather(*calls))
        with pytest.raises(ValueError) as raised:
            await _run(pool, failing, ())
        return results, str(raised.value)

    try:
        assert asyncio.run(main()) == ([0, 10, 20, 30], "its own")
        assert len(pool._threads) == 3
    finally:
        pool.join()


def test_a_call_whose_caller_was_cancelled_before_it_started_never_runs() -> None:
    """With the pool's one thread busy, a caller is cancelled while its call waits in the
    queue: the call is skipped (as an executor skips a cancelled future), and the pool goes
    on with the next."""
    pool = Pool(1, "test-pool")
    busy = threading.Event()
    release = threading.Event()
    ran: list[str] = []

    def hold() -> None:
        busy.set()
        assert release.wait(20)

    async def main() -> None:
        first = asyncio.create_task(_run(pool, hold, ()))
        await asyncio.to_thread(busy.wait)
        queued = asyncio.create_task(_run(pool, ran.append, ("cancelled",)))
        await asyncio.sleep(0)  # it is submitted
        queued.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await queued
        release.set()
        await first
        await _run(pool, ran.append, ("next",))

    try:
        asyncio.run(main())
        assert ran == ["next"]
    finally:
        pool.join()


def test_an_idle_thread_keeps_no_result_of_its_last_call_alive() -> None:
    """A call's result (a chunk of a read, 1 MiB by default) is the caller's alone: once the
    caller drops it, nothing holds it. A thread of the pool keeping its last result until its
    next call kept up to 40 chunks alive in idle threads (an executor's thread keeps none)."""
    pool = Pool(1, "test-pool")

    class Chunk:
        pass

    async def main() -> bool:
        chunk = await _run(pool, Chunk, ())
        ref = weakref.ref(chunk)
        del chunk

        def collected() -> bool:  # on the pool's one thread, where the last call ran
            gc.collect()
            return ref() is None

        return await _run(pool, collected, ())

    try:
        assert asyncio.run(main())
    finally:
        pool.join()


def test_calls_under_way_at_exit_are_finished_before_the_process_ends(tmp_path: Path) -> None:
    """A process whose event loop ended while two commits ran (on the two commit threads) and
    a third waited: the interpreter waits for the two under way before it exits, as it waits
    for an executor's. The third's caller was cancelled as the loop ended, so it never runs
    (its fill's file is left for the next start's sweep), as with an executor."""
    done = tmp_path / "done"
    script = f"""
import asyncio, threading, time
from proxy.threads import run_commit

def slow(name):
    time.sleep(0.3)  # a slow commit, not a wait for another thread
    with open({str(done)!r}, "a") as out:
        out.write(name + "\\n")

async def main():
    for name in ("one", "two", "three"):
        asyncio.get_running_loop().create_task(run_commit(slow, name))
    await asyncio.sleep(0)

asyncio.run(main())
"""
    subprocess.run(
        [sys.executable, "-c", script], check=True, timeout=30, cwd=Path(__file__).parents[1]
    )
    assert sorted(done.read_text().split()) == ["one", "two"]
