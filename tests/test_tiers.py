"""The tier chain: hot small entries answer from memory, a removal by any process is seen by
every tier, and the memory tier keeps to its bound."""

from __future__ import annotations

import time
from pathlib import Path

from proxy.store import RECHECK_SECONDS, EntryMeta
from proxy.store.disk import DiskStore
from proxy.store.index import Index
from proxy.store.memory import MemoryTier
from tests.conftest import SESSION
from tests.helpers import fetch, metric
from tests.standin import StandIn


def test_second_hit_of_a_small_entry_comes_from_memory(standin: StandIn, proxy) -> None:
    """The first hit reads the disk and copies the entry into memory; the next ones say so in
    Cache-Status and the tier metric, with the same bytes and headers."""
    body = standin.add("session", SESSION, "img_7e7e01")
    assert fetch(proxy, "img_7e7e01").headers["cache-status"] == "vlmrun-cache; fwd=uri-miss"
    disk = fetch(proxy, "img_7e7e01")
    memory = fetch(proxy, "img_7e7e01")
    assert disk.headers["cache-status"] == "vlmrun-cache; hit; detail=disk"
    assert memory.headers["cache-status"] == "vlmrun-cache; hit; detail=memory"
    assert disk.content == memory.content == body
    assert memory.headers["etag"] == disk.headers["etag"]
    assert memory.headers["content-type"] == "image/png"
    assert metric(proxy, "vlmrun_cache_hits_total", tier="memory") == 1
    assert metric(proxy, "vlmrun_cache_hits_total", tier="disk") == 1


def test_an_entry_removed_by_another_process_is_not_served_from_memory(
    standin: StandIn, proxy, cache_dir: Path
) -> None:
    """Another process (an admin command, another worker) evicts an entry the memory tier holds:
    once the memory tier's trust window has passed (``purge`` waits it out), the next request
    goes to the API, and a replaced entry's new bytes are what is served."""
    first = standin.add("session", SESSION, "arr_7e7e02", size=5000)
    for _ in range(3):
        assert fetch(proxy, "arr_7e7e02").content == first
    cache_key = f'["v2", "session", "{SESSION}", "arr_7e7e02"]'
    assert proxy.app.state.services.chain.memory.get(cache_key) is not None  # held in memory
    other = DiskStore(cache_dir, max_bytes=2**30, max_object_bytes=2**30)
    other.evict(cache_key)
    other.close()
    time.sleep(RECHECK_SECONDS)  # a documented window, not a race: see proxy/store/memory.py
    replaced = standin.add("session", SESSION, "arr_7e7e02", size=6000)
    again = fetch(proxy, "arr_7e7e02")
    assert (again.headers["x-cache"], again.content) == ("MISS", replaced)
    assert fetch(proxy, "arr_7e7e02").content == replaced
    assert fetch(proxy, "arr_7e7e02").headers["cache-status"].endswith("detail=memory")


def test_memory_tier_keeps_to_its_bound(tmp_path: Path) -> None:
    """Least recently used copies go first; oversized bodies are never admitted."""
    tier = MemoryTier(max_bytes=3000, max_object_bytes=1500)
    for index in range(5):
        path = tmp_path / f"f{index}"
        path.write_bytes(b"x")
        meta = EntryMeta("application/octet-stream", 1000, "0" * 64, 0.0)
        tier.put(f"k{index}", meta, b"x" * 1000, str(path), path.stat().st_ino)
        assert tier.bytes <= 3000
    assert [tier.get(f"k{index}") is not None for index in range(5)] == [False, False] + [True] * 3
    big = tmp_path / "big"
    big.write_bytes(b"x")
    tier.put("big", EntryMeta("x", 2000, "0" * 64, 0.0), b"x" * 2000, str(big), big.stat().st_ino)
    assert tier.get("big") is None and tier.bytes == 3000


def test_memory_hits_count_for_recency(standin: StandIn, proxy, cache_dir: Path) -> None:
    """A hit answered from memory still records an access of the disk entry, which eviction
    and ``purge --older-than`` read."""
    standin.add("session", SESSION, "img_7e7e03")
    for _ in range(2):  # a miss, then a disk hit that copies it into memory
        fetch(proxy, "img_7e7e03")
    before = time.time()
    assert fetch(proxy, "img_7e7e03").headers["cache-status"].endswith("detail=memory")
    proxy.app.state.services.store.flush_touches()
    cache_key = f'["v2", "session", "{SESSION}", "img_7e7e03"]'
    (entry,) = [e for e in Index(cache_dir / "entries").entries() if e.key == cache_key]
    assert entry.access_time >= before
