"""Redis failing under two real replicas: killed, stopped, restarted, evicting mid-read, and
written by someone without the secret. Zero wrong bytes, zero 5xx; sharing resumes by itself."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import pytest
import redis

from proxy.store import EntryMeta
from proxy.store.shared import Names
from tests.conftest import SESSION, ProxyFactory
from tests.helpers import artifact_url, auth, fetch, metric, wait_until
from tests.redisserver import RedisServer
from tests.servers import ServerThread
from tests.standin import StandIn

FAST_BREAKER = {"redis_breaker_cooldown": "0.3s", "redis_timeout": "50ms"}
ALLKEYS_LRU = ("--maxmemory-policy", "allkeys-lru")


def stored(replica: ServerThread, count: int = 1) -> bool:
    return wait_until(
        lambda: metric(replica, "vlmrun_cache_redis_writes_total", result="stored") >= count
    )


def _entry_name(secret_file: Path, object_id: str) -> str:
    names = Names("vlmrun-cache:v1:", secret_file.read_text().strip().encode())
    return names.object_entry("v2", "session", SESSION, object_id)


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=10)


@pytest.mark.parametrize("fault", ["kill", "pause"])
def test_redis_lost_changes_nothing_but_the_hit_rate(
    standin: StandIn, start_replica: ProxyFactory, redis_server: RedisServer, fault: str
) -> None:
    """Redis killed (or SIGSTOPped) mid-run: every request still gets exact bytes (from disk or
    upstream), no 5xx, /readyz stays 200, the breaker opens; once Redis is back (restarted,
    empty; or resumed) sharing resumes by itself."""
    bodies = {f"arr_{i}": standin.add("session", SESSION, f"arr_{i}", 3000 + i) for i in range(6)}
    a, b = start_replica(**FAST_BREAKER), start_replica(**FAST_BREAKER)
    assert fetch(a, "arr_0").status_code == 200 and stored(a)

    getattr(redis_server, fault)()
    try:
        began = time.monotonic()
        for object_id, body in bodies.items():
            for replica in (a, b):
                answer = fetch(replica, object_id)
                assert answer.status_code == 200 and answer.content == body
        took = time.monotonic() - began
        assert metric(b, "vlmrun_cache_redis_errors_total", kind="unavailable") >= 3
        assert httpx.get(f"{b.url}/readyz", timeout=10).status_code == 200
    finally:
        if fault == "pause":
            redis_server.resume()
    assert took < 10  # 12 requests; a stalled Redis costs at most a few redis_timeouts
    if fault == "kill":
        redis_server.start()

    # The breakers let a probe through once their cool-down has passed (the metric reads 0).
    for replica in (a, b):
        assert wait_until(lambda r=replica: metric(r, "vlmrun_cache_redis_circuit_open") == 0)
    writes = metric(a, "vlmrun_cache_redis_writes_total", result="stored")
    tries = iter(range(1000))

    def shared_again() -> bool:  # a new artifact each try: its fill is copied to Redis
        object_id = f"arr_after{next(tries)}"
        standin.add("session", SESSION, object_id, 7000)
        fetch(a, object_id)
        return metric(a, "vlmrun_cache_redis_writes_total", result="stored") > writes

    assert wait_until(shared_again)
    last = f"arr_after{next(tries) - 1}"
    answer = fetch(b, last)
    assert answer.content == standin.artifacts[("session", SESSION, last)][0]
    assert answer.headers["cache-status"].endswith("detail=redis")


def test_a_stopped_redis_costs_a_request_little_and_once_per_breaker_period(
    standin: StandIn, start_replica: ProxyFactory, redis_server: RedisServer
) -> None:
    """With Redis stopped, a disk miss waits at most about redis_timeout for it, and only until
    the breaker opens: then no request tries Redis at all (the failure count stops)."""
    bodies = [standin.add("session", SESSION, f"arr_s{i}", 2000) for i in range(8)]
    b = start_replica(redis_breaker_cooldown="1h", redis_timeout="50ms")
    failures = "vlmrun_cache_redis_errors_total"
    redis_server.pause()
    try:
        times, seen = [], []
        for i, body in enumerate(bodies):
            began = time.monotonic()
            answer = fetch(b, f"arr_s{i}")
            times.append(time.monotonic() - began)
            assert answer.status_code == 200 and answer.content == body
            seen.append(metric(b, failures, kind="unavailable"))
    finally:
        redis_server.resume()
    assert metric(b, "vlmrun_cache_redis_circuit_open") == 1
    # redis_breaker_threshold failures (and calls already in flight then), then no attempts.
    assert 3 <= seen[3] == seen[-1] <= 6
    assert max(times) < 2.0  # each paid at most a couple of redis_timeouts


@pytest.mark.parametrize("fault", ["evicted", "killed"])
def test_a_large_redis_hit_cut_mid_read_is_finished_from_upstream(
    standin: StandIn,
    start_replica: ProxyFactory,
    tmp_path: Path,
    shared_secret_file: Path,
    fault: str,
) -> None:
    """Redis with a tiny maxmemory and allkeys-lru evicts an artifact while a replica streams
    it (or Redis is killed then): the replica fetches the rest from upstream, checks the whole
    sha256, and the client gets every byte exact (zero short or wrong 200s)."""
    server = RedisServer(tmp_path / "lru", "--maxmemory", "48mb", *ALLKEYS_LRU)
    server.start()
    try:
        # Larger than what socket buffers hold between the two (a few MiB): when the key goes,
        # the replica has not read it all yet.
        size = 32 * 1024 * 1024
        body = standin.add("session", SESSION, "vid_evicted", size)
        a = start_replica(redis_url=server.url)
        b = start_replica(redis_url=server.url, chunk_size="64KiB")
        assert fetch(a, "vid_evicted").status_code == 200 and stored(a)

        with httpx.stream("GET", artifact_url(b, "vid_evicted"), headers=auth(), timeout=20) as r:
            assert r.headers["cache-status"].endswith("detail=redis")
            pieces = r.iter_raw(64 * 1024)
            received = next(pieces)
            if fault == "killed":
                server.kill()
            else:
                filler = _client(server)
                name = _entry_name(shared_secret_file, "vid_evicted")
                for i in range(60):  # push it out: allkeys-lru evicts the artifact's one key
                    filler.set(f"junk:{i}", b"x" * 1024 * 1024)
                # Redis's LRU is sampled: now and then it spares the key just read. To the reader
                # an eviction is the key gone, so finish the job the same way.
                filler.delete(name)
                assert filler.exists(name) == 0
                filler.close()
            for piece in pieces:
                received += piece
        assert received == body
        assert standin.hits("session", SESSION, "vid_evicted") == 2  # the fill, then the rest
        assert metric(b, "vlmrun_cache_served_bytes_total", source="upstream") > 0
    finally:
        server.stop()


def test_many_requests_under_a_tiny_maxmemory(
    standin: StandIn, start_replica: ProxyFactory, tmp_path: Path
) -> None:
    """Artifacts larger in all than Redis's memory, read over and over by two replicas: every
    complete answer is exact, none is a 5xx."""
    server = RedisServer(tmp_path / "lru", "--maxmemory", "3mb", *ALLKEYS_LRU)
    server.start()
    try:
        bodies = {
            f"arr_m{i}": standin.add("session", SESSION, f"arr_m{i}", 400_000 + i)
            for i in range(12)
        }
        replicas = [start_replica(redis_url=server.url) for _ in range(2)]
        for _ in range(2):
            for object_id, body in bodies.items():
                for replica in replicas:
                    answer = fetch(replica, object_id)
                    assert answer.status_code == 200 and answer.content == body
    finally:
        server.stop()


def _forge(server: RedisServer, name: str, body: bytes, meta: EntryMeta) -> None:
    """Write ``body`` sealed with a secret that is not the replicas'."""
    client = _client(server)
    client.set(name, body + Names("vlmrun-cache:v1:", b"not-the-secret" * 4).seal(name, meta))
    client.close()


@pytest.mark.parametrize("size", [6000, 2 * 1024 * 1024])
def test_values_written_without_the_secret_are_never_served(
    standin: StandIn,
    start_replica: ProxyFactory,
    redis_server: RedisServer,
    shared_secret_file: Path,
    size: int,
) -> None:
    """Someone who can write Redis replaces an artifact's value with other bytes (and metadata
    to match, sealed without the secret): replicas serve the genuine bytes from upstream."""
    body = standin.add("session", SESSION, "arr_forged", size)
    a, b = start_replica(), start_replica()
    assert fetch(a, "arr_forged").status_code == 200 and stored(a)
    name = _entry_name(shared_secret_file, "arr_forged")
    evil = b"E" * size
    meta = EntryMeta("application/octet-stream", size, hashlib.sha256(evil).hexdigest(), 0.0)
    _forge(redis_server, name, evil, meta)

    answer = fetch(b, "arr_forged")
    assert answer.status_code == 200 and answer.content == body
    assert metric(b, "vlmrun_cache_redis_errors_total", kind="rejected") == 1
    assert standin.hits("session", SESSION, "arr_forged") == 2


def test_a_body_altered_in_redis_fails_the_transfer_never_completes_it(
    standin: StandIn,
    start_replica: ProxyFactory,
    redis_server: RedisServer,
    shared_secret_file: Path,
) -> None:
    """One byte of a large body changed in Redis, the genuine metadata left: the streamed
    answer is cut before its last byte; small bodies are checked before answering (a miss)."""
    big = standin.add("session", SESSION, "vid_altered", 2 * 1024 * 1024)
    small = standin.add("session", SESSION, "arr_altered", 5000)
    a, b = start_replica(), start_replica()
    for object_id in ("vid_altered", "arr_altered"):
        assert fetch(a, object_id).status_code == 200
    assert stored(a, 2)
    client = _client(redis_server)
    for object_id in ("vid_altered", "arr_altered"):
        client.setrange(_entry_name(shared_secret_file, object_id), 1234, b"\xff\x00")
    client.close()

    small_answer = fetch(b, "arr_altered")
    assert small_answer.status_code == 200 and small_answer.content == small
    received = b""
    with (
        pytest.raises(httpx.HTTPError),
        httpx.stream("GET", artifact_url(b, "vid_altered"), headers=auth(), timeout=20) as r,
    ):
        for piece in r.iter_raw():
            received += piece
    assert len(received) < len(big)
    again = fetch(b, "vid_altered")
    assert again.status_code == 200 and again.content == big


def test_a_rest_from_upstream_that_differs_fails_the_transfer(
    standin: StandIn, start_replica: ProxyFactory, redis_server: RedisServer
) -> None:
    """If the bytes upstream gives for the rest do not complete the sealed sha256 (the API
    changed an "immutable" artifact), the transfer fails before its last byte."""
    size = 32 * 1024 * 1024
    standin.add("session", SESSION, "vid_changed", size)
    a, b = start_replica(), start_replica(chunk_size="64KiB")
    assert fetch(a, "vid_changed").status_code == 200 and stored(a)
    _, content_type = standin.artifacts[("session", SESSION, "vid_changed")]
    standin.artifacts[("session", SESSION, "vid_changed")] = (b"Z" * size, content_type)
    received = b""
    with (
        pytest.raises(httpx.HTTPError),
        httpx.stream("GET", artifact_url(b, "vid_changed"), headers=auth(), timeout=20) as r,
    ):
        pieces = r.iter_raw(64 * 1024)
        received = next(pieces)
        redis_server.kill()
        for piece in pieces:
            received += piece
    assert len(received) < size
