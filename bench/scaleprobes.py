"""Store-level probes of bench/scale.py: one figure of one code revision per process.

    python bench/scaleprobes.py PROBE DIRECTORY      # prints one JSON object

bench/scale.py runs each probe in a process of its own whose ``proxy`` package is the revision's
(``PYTHONPATH``), so the same probe measures the code before and after a change, back to back.
The probes use only what every revision has (``DiskStore``'s constructor, ``commit``, ``get``,
``sweep_orphans``; ``AccessProofs``), and prepared directories made by the current code.

* ``sweep``: the orphan sweep alone over DIRECTORY (a full cache): seconds, peak RSS growth.
* ``lookups``: 40 threads (anyio's default) reading random keys of DIRECTORY through a store
  that has none in its memory index, for 5 s: lookups/s, RSS growth, index connections.
* ``room``: one 12 MiB commit into DIRECTORY, full of 1 KiB entries: its seconds.
* ``room-contended``: the same while another store (another worker) commits 1 KiB entries
  in a loop: the longest any of those waited, and by how much the bytes ever exceeded the bound.
* ``proofs``: opening proofs over DIRECTORY, which holds a backlog of expired ones, then one
  housekeeping expiry: seconds each, and the proofs left on disk.
* ``live-proofs``: 400,000 live proofs recorded into DIRECTORY: how many are still on disk.
"""

from __future__ import annotations

import json
import random
import resource
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

from proxy.access import AccessProofs
from proxy.store import EntryMeta
from proxy.store.disk import DiskStore

MiB = 1024**2
SCOPE = "sess_bench"
LIVE_PROOFS = 400_000


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def count_rows(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT count(*) FROM Cache").fetchone()[0])


def commit(store: DiskStore, key: str, body: bytes) -> None:
    fill = store.begin_fill()
    fill.file.write(body)
    store.commit(key, fill, EntryMeta("application/octet-stream", len(body), "0" * 64, 0.0))


def sweep(directory: Path) -> dict[str, Any]:
    store = DiskStore(directory, max_bytes=2**50, max_object_bytes=2**40)
    before = rss_mib()
    started = time.monotonic()
    removed = store.sweep_orphans()
    return {
        "seconds": time.monotonic() - started,
        "peak_growth_mib": rss_mib("VmHWM") - before,
        "kept_mib": rss_mib() - before,
        "removed": removed,
    }


def lookups(directory: Path) -> dict[str, Any]:
    count = json.loads((directory / "populated.json").read_text())["count"]
    store = DiskStore(directory, max_bytes=2**50, max_object_bytes=2**40)
    before = rss_mib()
    deadline = time.monotonic() + 5
    done = [0] * 40

    def work(slot: int) -> None:
        rng = random.Random(slot)
        while time.monotonic() < deadline:
            index = rng.randrange(count)
            entry = store.get(json.dumps(["v2", "session", SCOPE, f"obj_{index}"]))
            assert entry is not None
            entry.close()
            done[slot] += 1

    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.flush_touches()
    readers = getattr(store, "_readers", None)
    return {
        "per_second": sum(done) / 5,
        "rss_growth_mib": rss_mib() - before,
        "connections": readers.opened if readers is not None else None,
    }


def room(directory: Path) -> dict[str, Any]:
    full = json.loads((directory / "populated.json").read_text())["bytes"]
    store = DiskStore(directory, max_bytes=full, max_object_bytes=64 * MiB)
    started = time.monotonic()
    commit(store, "large", b"L" * (12 * MiB))
    return {"seconds": time.monotonic() - started, "entries_after": store.stats().entries}


def room_contended(directory: Path) -> dict[str, Any]:
    full = json.loads((directory / "populated.json").read_text())["bytes"]
    store = DiskStore(directory, max_bytes=full, max_object_bytes=64 * MiB)
    other = DiskStore(directory, max_bytes=full, max_object_bytes=64 * MiB)
    waits: list[float] = []
    largest = [0]
    running = threading.Event()
    finished = threading.Event()

    def concurrent() -> None:
        running.set()
        index = 0
        while not finished.is_set():
            started = time.monotonic()
            commit(other, f"other{index}", b"o" * 1024)
            waits.append(time.monotonic() - started)
            largest[0] = max(largest[0], other.stats().bytes)
            index += 1

    thread = threading.Thread(target=concurrent)
    thread.start()
    running.wait()
    started = time.monotonic()
    commit(store, "large", b"L" * (12 * MiB))
    seconds = time.monotonic() - started
    finished.set()
    thread.join()
    return {
        "seconds": seconds,
        "longest_wait_s": max(waits),
        "concurrent_commits": len(waits),
        "over_bound": max(0, largest[0] - full),
    }


def proofs(directory: Path) -> dict[str, Any]:
    started = time.monotonic()
    opened = AccessProofs(directory, ttl=3600)
    figures: dict[str, Any] = {"open_s": time.monotonic() - started}
    expire = getattr(opened, "expire", None)
    if expire is not None:
        started = time.monotonic()
        expire()
        figures["one_expiry_s"] = time.monotonic() - started
    figures["left_on_disk"] = count_rows(directory / "access" / "cache.db")
    return figures


def live_proofs(directory: Path) -> dict[str, Any]:
    opened = AccessProofs(directory, ttl=3600, offline_ttl=7 * 86400)
    cache = opened._proofs  # the revision's own diskcache settings decide what is culled
    now = int(time.time() * 1000)
    with cache.transact():
        for index in range(LIVE_PROOFS):
            fingerprint = f"{index:064x}"
            key = json.dumps([fingerprint, "session", f"sess_{index:032x}"], separators=(",", ":"))
            cache.set(key, now, expire=7 * 86400)
    return {"recorded": LIVE_PROOFS, "on_disk": count_rows(directory / "access" / "cache.db")}


PROBES = {
    "sweep": sweep,
    "lookups": lookups,
    "room": room,
    "room-contended": room_contended,
    "proofs": proofs,
    "live-proofs": live_proofs,
}

if __name__ == "__main__":
    result = PROBES[sys.argv[1]](Path(sys.argv[2]))
    result["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))
