"""Two real proxies with separate cache directories sharing one real redis-server."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from vlmrun.client import VLMRun

from tests.conftest import OTHER_TOKEN, SESSION, TOKEN, ProxyFactory
from tests.helpers import artifact_url, auth, fetch, metric, wait_until
from tests.redisserver import RedisServer
from tests.servers import ServerThread
from tests.standin import StandIn


def stored_in_redis(replica: ServerThread, count: int = 1) -> bool:
    """Wait until ``replica`` has copied ``count`` fills to Redis (a background upload)."""
    return wait_until(
        lambda: metric(replica, "vlmrun_cache_redis_writes_total", result="stored") >= count
    )


@pytest.mark.parametrize("size", [8 * 1024, 3 * 1024 * 1024 + 5])
def test_a_replica_serves_what_another_fetched(
    standin: StandIn, start_replica: ProxyFactory, size: int
) -> None:
    """Replica B serves, byte-exact, what replica A fetched: one upstream fetch in all. The Redis
    hit says so (Cache-Status detail=redis), and B keeps a copy on its own disk."""
    body = standin.add("session", SESSION, "arr_shared", size)
    a, b = start_replica(), start_replica()
    first = fetch(a, "arr_shared")
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
    assert stored_in_redis(a)

    shared = fetch(b, "arr_shared")
    assert shared.status_code == 200 and shared.content == body
    assert shared.headers["cache-status"] == "vlmrun-cache; hit; detail=redis"
    assert shared.headers["etag"] == f'"{hashlib.sha256(body).hexdigest()}"'
    assert standin.hits("session", SESSION, "arr_shared") == 1
    assert metric(b, "vlmrun_cache_hits_total", tier="redis") == 1
    assert metric(b, "vlmrun_cache_served_bytes_total", source="shared") == size

    # Backfilled: B's next hit comes from its own disk (or memory), still one upstream fetch.
    assert wait_until(lambda: "detail=redis" not in fetch(b, "arr_shared").headers["cache-status"])
    assert fetch(b, "arr_shared").content == body
    assert standin.hits("session", SESSION, "arr_shared") == 1


def test_the_sdk_reads_a_redis_hit(standin: StandIn, start_replica: ProxyFactory) -> None:
    """The real vlmrun SDK on replica B gets A's image from Redis (Content-Type spelled so)."""
    standin.add("session", SESSION, "img_a1b2c3")
    a, b = start_replica(), start_replica(http="httptools")
    assert fetch(a, "img_a1b2c3").status_code == 200
    assert stored_in_redis(a)
    client = VLMRun(api_key=TOKEN, base_url=f"{b.url}/v1", max_retries=1)
    image = client.artifacts.get(session_id=SESSION, object_id="img_a1b2c3")
    assert image.size == (16, 16)
    assert standin.hits("session", SESSION, "img_a1b2c3") == 1


def test_a_key_proven_on_one_replica_is_proven_on_all(
    standin: StandIn, start_replica: ProxyFactory, redis_server: RedisServer
) -> None:
    """B serves A's fill to the key A proved without asking the API: the proof came from Redis,
    keyed by the credential's HMAC (no token in Redis, in the clear or otherwise)."""
    standin.add("session", SESSION, "arr_proof", 5000)
    a, b = start_replica(), start_replica()
    assert fetch(a, "arr_proof").status_code == 200
    assert stored_in_redis(a)
    assert wait_until(lambda: len(redis_server.cli("--scan", "--pattern", "*proof:*").split()) > 0)

    assert fetch(b, "arr_proof").status_code == 200
    assert standin.hits("session", SESSION, "arr_proof") == 1
    assert metric(b, "vlmrun_cache_access_checks_total", result="proof") == 1
    dump = "".join(redis_server.cli("GET", n) for n in redis_server.cli("--scan").split())
    assert TOKEN not in dump and SESSION not in redis_server.cli("--scan")


def test_refusals_are_not_shared(standin: StandIn, start_replica: ProxyFactory) -> None:
    """A key refused on A is asked about again on B (no shared negative cache), so a key just
    granted access is served at once."""
    standin.add("session", SESSION, "arr_refused", 5000)
    a, b = start_replica(), start_replica()
    assert fetch(a, "arr_refused").status_code == 200  # TOKEN fills; now in Redis
    assert stored_in_redis(a)

    assert fetch(a, "arr_refused", token=OTHER_TOKEN).status_code == 404
    assert fetch(b, "arr_refused", token=OTHER_TOKEN).status_code == 404
    assert standin.hits("session", SESSION, "arr_refused") == 3  # the fill, then both refusals

    standin.grant(OTHER_TOKEN, "session", SESSION)
    granted = fetch(b, "arr_refused", token=OTHER_TOKEN)
    assert granted.status_code == 200 and granted.headers["x-cache"] == "HIT"


def test_metadata_carries_the_filler_so_other_keys_still_check(
    standin: StandIn, start_replica: ProxyFactory
) -> None:
    """Bytes TOKEN's request stored are served on B to another key only after that key's own
    check: the filler travels with the entry in Redis."""
    standin.add("session", SESSION, "arr_filler", 4000)
    standin.grant(OTHER_TOKEN, "session", SESSION)
    a, b = start_replica(), start_replica()
    assert fetch(a, "arr_filler").status_code == 200
    assert stored_in_redis(a)
    other = fetch(b, "arr_filler", token=OTHER_TOKEN)
    assert other.status_code == 200 and other.headers["cache-status"].endswith("detail=redis")
    assert standin.hits("session", SESSION, "arr_filler") == 2  # the fill, and OTHER's check


def test_range_of_a_redis_hit(standin: StandIn, start_replica: ProxyFactory) -> None:
    """A Range request answered from Redis: 206 with exactly the bytes asked for."""
    body = standin.add("session", SESSION, "vid_range", 2 * 1024 * 1024)
    a, b = start_replica(), start_replica()
    assert fetch(a, "vid_range").status_code == 200
    assert stored_in_redis(a)
    part = httpx.get(
        artifact_url(b, "vid_range"), headers={**auth(), "Range": "bytes=100-199999"}, timeout=20
    )
    assert part.status_code == 206 and part.content == body[100:200000]


def test_a_refused_key_does_not_copy_redis_entries_to_the_replicas_disk(
    standin: StandIn, start_replica: ProxyFactory
) -> None:
    """A key without access to a session, asking B for its artifacts, is refused; it must not
    make B copy them from Redis to its disk on the way (the backfill comes after the access
    check, like every byte): else refused requests fill and churn a replica's disk LRU."""
    standin.add("session", SESSION, "arr_refused_copy", 4000)
    a, b = start_replica(), start_replica()
    assert fetch(a, "arr_refused_copy").status_code == 200
    assert stored_in_redis(a)

    assert fetch(b, "arr_refused_copy", token=OTHER_TOKEN).status_code == 404
    granted = fetch(b, "arr_refused_copy")
    assert granted.status_code == 200
    assert granted.headers["cache-status"].endswith("detail=redis")  # B's disk had nothing


def test_two_accounts_with_one_scope_id_never_get_each_others_bytes_through_redis(
    standin: StandIn, start_replica: ProxyFactory
) -> None:
    """Two accounts hold the same session id with other bytes; splits are kept per replica, so
    a replica that has not split the scope finds the other account's fill in Redis. Whatever
    replica each asks, in whatever order, as a hit or a range: each gets its own bytes."""
    alice, bob = "key-alice-r", "key-bob-r"
    scope = "sess_shared_id"
    bodies = {alice: b"\x01A" * 20_000, bob: b"\x02B" * 21_000}
    for token, body in bodies.items():
        standin.add_for(token, "session", scope, "arr_000001", body)
    a, b, c = start_replica(), start_replica(), start_replica()

    def own(replica: ServerThread, token: str, **headers: str) -> None:
        answer = fetch(replica, "arr_000001", token, "session", scope, **headers)
        if answer.status_code == 206:  # a miss may answer a range with the whole body
            assert answer.content == bodies[token][10:21]
        else:
            assert answer.status_code == 200 and answer.content == bodies[token]

    own(a, alice)  # Alice's bytes go to Redis under the scope's shared key
    assert stored_in_redis(a)
    own(b, bob)  # a Redis hit of Alice's bytes for B: Bob's check splits the scope on B only
    own(b, bob, Range="bytes=10-20")
    own(c, bob, Range="bytes=10-20")  # C has not split: Redis again
    own(c, alice)
    for replica in (a, b, c):
        for token in (bob, alice):
            own(replica, token)
            own(replica, token, Range="bytes=10-20")


@pytest.mark.parametrize("size", [8 * 1024, 200_000, 3 * 1024 * 1024 + 5])
def test_a_redis_hit_kept_on_disk_is_fsynced_before_it_is_indexed_unless_small(
    standin: StandIn,
    start_replica: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    size: int,
) -> None:
    """B's copy of a Redis hit (a whole body read at once, or a streamed one) is durable as a
    fill is: over 64 KiB, its file is fsynced whole before its index row is written (so a
    power failure cannot leave a row over a short file that a range would read unverified);
    at 64 KiB or less (verified whole on every read) it is not."""
    import os

    from proxy.store.disk import DiskStore

    synced: list[tuple[str, int]] = []  # (replica directory, bytes) of each fill fsynced
    committed: list[tuple[str, int, bool]] = []  # (directory, bytes, fsynced before)
    real_fsync, real_commit = os.fsync, DiskStore.commit

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(".fill"):
            synced.append((path.rsplit("/tmp/", 1)[0], os.fstat(fd).st_size))
        real_fsync(fd)

    def commit(store: DiskStore, key: str, fill: Any, meta: Any, sync: bool = True) -> bool:
        before = (str(store.directory), meta.length) in synced
        committed.append((str(store.directory), meta.length, sync or before))
        return real_commit(store, key, fill, meta, sync)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(DiskStore, "commit", commit)
    body = standin.add("session", SESSION, "arr_durable", size)
    a, b = start_replica(), start_replica()
    assert fetch(a, "arr_durable").content == body
    assert stored_in_redis(a)
    shared = fetch(b, "arr_durable")
    assert shared.headers["cache-status"].endswith("detail=redis") and shared.content == body
    assert wait_until(lambda: "detail=redis" not in fetch(b, "arr_durable").headers["cache-status"])
    b_dir = str(tmp_path / "replica-2")
    (b_commit,) = [c for c in committed if c[0] == b_dir]
    assert b_commit == (b_dir, size, size > 64 * 1024)
