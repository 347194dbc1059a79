"""The store's worker threads (proxy/threads.py): calls that wait on other processes must not
take the threads that lookups and hits need."""

from __future__ import annotations

import fcntl
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from proxy.threads import THREADS
from tests.conftest import SESSION, ProxyFactory
from tests.helpers import artifact_url, auth, fetch, wait_until
from tests.standin import StandIn

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
