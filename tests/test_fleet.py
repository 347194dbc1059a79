"""A fleet fetches each artifact once: three real replicas, one real redis-server.

The replica whose fill takes the Redis lease fetches from upstream and streams the body into
Redis as it arrives; the others stream it from there, before the fetch ends, and complete only
on the published entry's sha256 (proxy/fleet.py, proxy/store/lease.py). The stand-in holds its
body in the middle with an Event, so "before the fetch ends" is a fact, not a timing.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
import redis

from proxy.store.lease import Keys, Record
from proxy.store.shared import Names
from tests.conftest import OTHER_TOKEN, SESSION, ProxyFactory
from tests.helpers import artifact_url, auth, fetch, metric, wait_until
from tests.redisserver import RedisCluster, RedisServer
from tests.servers import Daemon, ServerThread
from tests.standin import Fault, StandIn

HALF = 1_000_000
EARLY = 64 * 1024
ARTIFACT_PATH = "/v1/artifacts"


class Client(threading.Thread):
    """One streaming GET in a thread: :attr:`early` is set once it has ``EARLY`` bytes (or
    failed); it then reads the rest. ``body`` is None for a failed transfer."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.early = threading.Event()
        self.status = 0
        self.x_cache = ""
        self.got_early = 0
        self.body: bytes | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, headers=auth(), timeout=30) as response:
                self.status, self.x_cache = response.status_code, response.headers["x-cache"]
                chunks = response.iter_raw()
                data = b""
                for chunk in chunks:
                    data += chunk
                    if len(data) >= EARLY:
                        break
                self.got_early = len(data)
                self.early.set()
                self.body = data + b"".join(chunks)
        except (httpx.HTTPError, KeyError) as exc:
            self.error = exc
        finally:
            self.early.set()


def _start(clients: list[Client]) -> None:
    for client in clients:
        client.start()


def _join(clients: list[Client]) -> None:
    for client in clients:
        client.join(timeout=60)
        assert not client.is_alive()


def _leases(replicas: list[ServerThread], outcome: str) -> float:
    return sum(metric(r, "vlmrun_cache_fleet_leases_total", outcome=outcome) for r in replicas)


def _keys(secret_file: Path, object_id: str) -> Keys:
    """The fleet keys of an artifact, as anyone who can list Redis's keys finds them."""
    names = Names("vlmrun-cache:v1:", secret_file.read_text().strip().encode())
    return Keys(names, json.dumps(["v2", "session", SESSION, object_id]))


def _polling(server: RedisServer) -> int:
    """Connections whose last command was the script that reads the lease and its record, of a
    replica waiting for a lease holder to publish (one per waiting replica: its poll loop reuses
    its pooled connection; a holder's renewal is a script too, but not before a third of its
    lease's life)."""
    return sum(" cmd=eval " in line for line in server.cli("CLIENT", "LIST").splitlines())


def _fill_bytes(cache_dir: Path) -> int:
    """Bytes in the fill files of a replica's cache directory (its fills in progress)."""
    return sum(path.stat().st_size for path in (cache_dir / "tmp").glob("*.fill"))


def _redis(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=10)


def test_forty_first_requests_over_three_replicas_fetch_once(
    standin: StandIn, start_replica: ProxyFactory
) -> None:
    """40 concurrent first requests, round-robin over 3 replicas: one upstream fetch; every
    client, on every replica, has bytes while the upstream still holds the second half; all get
    the exact body; one replica held the lease and the other two followed it through Redis."""
    body = standin.add("session", SESSION, "vid_fleet40", size=2 * HALF)
    release = threading.Event()
    standin.faults["vid_fleet40"] = Fault(hold_middle=release, hold_at=HALF, times=1)
    replicas = [start_replica(), start_replica(), start_replica()]
    clients = [Client(artifact_url(replicas[i % 3], "vid_fleet40")) for i in range(40)]
    try:
        _start(clients)
        for client in clients:
            assert client.early.wait(30), "a client got no bytes while the fetch was held"
        assert not release.is_set()
        assert all(c.got_early >= EARLY for c in clients), [c.error for c in clients]
    finally:
        release.set()
    _join(clients)
    assert [c.error for c in clients] == [None] * 40
    assert all(c.status == 200 and c.body == body for c in clients)
    assert standin.hits("session", SESSION, "vid_fleet40") == 1
    assert _leases(replicas, "acquired") == 1
    assert _leases(replicas, "followed") == 2
    assert sum(c.x_cache == "MISS" for c in clients) == 1
    # The followers' clients got their bytes from Redis (bytes saved), the holder's from the API.
    holder = [metric(r, "vlmrun_cache_fleet_leases_total", outcome="acquired") for r in replicas]
    followers = [i for i in range(3) if not holder[i]]
    shared = sum(metric(r, "vlmrun_cache_served_bytes_total", source="shared") for r in replicas)
    assert shared == sum(len(clients[i::3]) for i in followers) * len(body)
    # Published once, by the holder; the followers kept what they streamed: every replica
    # now hits, still one upstream fetch.
    stored = "vlmrun_cache_redis_writes_total"
    assert wait_until(lambda: sum(metric(r, stored, result="stored") for r in replicas) == 1)
    for replica in replicas:
        again = fetch(replica, "vid_fleet40")
        assert again.status_code == 200 and again.content == body
        assert again.headers["x-cache"] == "HIT"
    assert standin.hits("session", SESSION, "vid_fleet40") == 1


def _daemon(upstream: ServerThread, redis_server: RedisServer, secret: Path, cache: Path) -> Daemon:
    daemon = Daemon(
        "--upstream",
        upstream.url,
        "--cache-dir",
        str(cache),
        "--redis-url",
        redis_server.url,
        "--secret-file",
        str(secret),
        "--redis-timeout",
        "1s",
        "--redis-lease-ttl",
        "1s",
    )
    assert daemon.started(), daemon.output
    return daemon


@pytest.mark.parametrize("moment", ["before_headers", "mid_body"])
def test_holder_killed_another_replica_takes_over(
    standin: StandIn,
    upstream: ServerThread,
    start_replica: ProxyFactory,
    redis_server: RedisServer,
    shared_secret_file: Path,
    tmp_path: Path,
    moment: str,
) -> None:
    """The lease holder is a real ``vlmrun-cache serve`` killed with SIGKILL while it fetches.
    Clients of the other replicas all get the exact body: before the holder's first byte, a
    replica takes the expired lease over and fetches for both; mid-body, a follower resumes from
    upstream after the bytes it relayed (checking that they are upstream's first bytes), and the
    other does too or finishes from the entry the first one published.
    Never a short or wrong 200; requests after the kill are served, exactly."""
    body = standin.add("session", SESSION, "vid_killed", size=2 * HALF)
    held = threading.Event()
    if moment == "before_headers":
        standin.faults["vid_killed"] = Fault(hold_start=held, times=1)
    else:
        standin.faults["vid_killed"] = Fault(hold_middle=held, hold_at=HALF, times=1)
    b, c = start_replica(redis_lease_ttl="1s"), start_replica(redis_lease_ttl="1s")
    holder = _daemon(upstream, redis_server, shared_secret_file, tmp_path / "daemon")
    first = Client(f"{holder.url}/v1/artifacts?object_id=vid_killed&session_id={SESSION}")
    waiters = [Client(artifact_url(replica, "vid_killed")) for replica in (b, c, b, c)]
    try:
        first.start()
        assert standin.wait_for_requests(ARTIFACT_PATH, 1)  # the daemon fetches: it holds
        if moment == "mid_body":
            assert first.early.wait(30)
        _start(waiters)
        if moment == "mid_body":
            for client in waiters:
                assert client.early.wait(30) and client.got_early >= EARLY
        holder.kill()
    finally:
        held.set()
        if holder.process.poll() is None:
            holder.kill()
    _join([first, *waiters])
    for client in waiters:
        assert (client.status, client.error, client.body == body) == (200, None, True)
    if moment == "before_headers":  # a replica took the expired lease over, the other followed
        assert _leases([b, c], "taken_over") == 1
        assert standin.hits("session", SESSION, "vid_killed") == 2
    else:  # a follower resumed upstream; the other did too, or finished from the entry the
        # first published once it had resumed (both are exact; which one is a matter of timing)
        resumed = _leases([b, c], "resumed")
        assert resumed in (1, 2)
        assert standin.hits("session", SESSION, "vid_killed") == 1 + resumed
    for replica in (b, c):
        again = fetch(replica, "vid_killed")
        assert again.status_code == 200 and again.content == body


def test_redis_lost_mid_lease_each_replica_falls_back(
    standin: StandIn, start_replica: ProxyFactory, redis_server: RedisServer
) -> None:
    """Redis killed while replica A holds the lease and B and C wait for A to publish: A's
    client still gets its bytes from upstream, B and C fetch on their own; no 5xx anywhere,
    every body exact; later requests with Redis gone are served too."""
    body = standin.add("session", SESSION, "vid_nolease", size=2 * HALF)
    held = threading.Event()
    standin.faults["vid_nolease"] = Fault(hold_start=held, times=1)
    fast = {"redis_timeout": "50ms", "redis_breaker_cooldown": "0.3s"}
    a, b, c = (start_replica(**fast) for _ in range(3))
    first = Client(artifact_url(a, "vid_nolease"))
    try:
        first.start()
        assert standin.wait_for_requests(ARTIFACT_PATH, 1)  # A holds the lease
        waiters = [Client(artifact_url(replica, "vid_nolease")) for replica in (b, c, b, c)]
        _start(waiters)
        assert wait_until(lambda: _polling(redis_server) >= 2)  # B and C wait for A to publish
        redis_server.kill()
        _join(waiters)
    finally:
        held.set()
    _join([first])
    for client in [first, *waiters]:
        assert client.error is None and client.status == 200 and client.body == body
    assert _leases([b, c], "fallback") == 2
    for replica in (a, b, c):
        again = fetch(replica, "vid_nolease")
        assert again.status_code == 200 and again.content == body


def test_redis_lost_while_replicas_follow_mid_body(
    standin: StandIn, start_replica: ProxyFactory, redis_server: RedisServer
) -> None:
    """Redis killed while B and C stream A's fetch from it, half-way through: A stops sharing
    and serves its client from upstream; B and C resume from upstream after the bytes they
    relayed. Every client gets the exact body with a 200, none a failed transfer."""
    body = standin.add("session", SESSION, "vid_midlost", size=2 * HALF)
    release = threading.Event()
    standin.faults["vid_midlost"] = Fault(hold_middle=release, hold_at=HALF, times=1)
    fast = {"redis_timeout": "50ms", "redis_breaker_cooldown": "0.3s"}
    a, b, c = (start_replica(**fast) for _ in range(3))
    first = Client(artifact_url(a, "vid_midlost"))
    waiters = [Client(artifact_url(replica, "vid_midlost")) for replica in (b, c, b, c)]
    try:
        first.start()
        assert first.early.wait(30)
        _start(waiters)
        for client in waiters:
            assert client.early.wait(30) and client.x_cache == "COALESCED"
        redis_server.kill()
    finally:
        release.set()
    _join([first, *waiters])
    for client in [first, *waiters]:
        assert (client.status, client.error, client.body == body) == (200, None, True)
    assert _leases([b, c], "resumed") == 2
    assert standin.hits("session", SESSION, "vid_midlost") == 3


def test_forged_record_or_temporary_bytes_never_reach_a_client(
    standin: StandIn,
    start_replica: ProxyFactory,
    redis_server: RedisServer,
    shared_secret_file: Path,
    tmp_path: Path,
) -> None:
    """Someone who can write to Redis but lacks the secret: a record they wrote (pointing at a
    key full of their bytes) is not believed, so B waits out their lease and fetches itself; and
    bytes they overwrite in the holder's growing temporary key fail B's transfer at the sha256
    check instead of completing it."""
    body = standin.add("session", SESSION, "vid_forged", size=2 * HALF)
    keys = _keys(shared_secret_file, "vid_forged")
    attacker = _redis(redis_server)
    evil = b"X" * len(body)
    attacker.set(f"{keys.entry}:tmp:evil", evil)
    forged = Record("f" * 32, True, f"{keys.entry}:tmp:evil", "video/mp4", len(body), {}, "")
    attacker.set(keys.lease, "f" * 32, px=1000)
    attacker.set(keys.record, forged.to_json() + b"\0" * 32, px=1000)
    a, b = start_replica(redis_lease_ttl="1s"), start_replica(redis_lease_ttl="1s")
    got = fetch(b, "vid_forged")
    assert got.status_code == 200 and got.content == body  # after the forged lease expired
    assert standin.hits("session", SESSION, "vid_forged") == 1

    # Now a real holder (A), and the attacker rewrites its temporary key while B follows.
    body2 = standin.add("session", SESSION, "vid_forged2", size=2 * HALF)
    keys2 = _keys(shared_secret_file, "vid_forged2")
    release = threading.Event()
    standin.faults["vid_forged2"] = Fault(hold_middle=release, hold_at=HALF, times=1)
    leader, follower = (
        Client(artifact_url(a, "vid_forged2")),
        Client(artifact_url(b, "vid_forged2")),
    )
    try:
        leader.start()
        assert leader.early.wait(30)
        follower.start()
        assert follower.early.wait(30) and follower.x_cache == "COALESCED"
        temps = [
            k
            for k in attacker.scan_iter(match=f"{keys2.entry}:tmp:*")
            if not k.endswith((b":lease", b":fill"))
        ]
        assert len(temps) == 1
        attacker.append(temps[0], b"X" * EARLY)  # forged progress: bytes B has not read yet
        # B relays them (unverified, like every byte before the last) into its fill file...
        assert wait_until(lambda: _fill_bytes(tmp_path / "replica-2") >= HALF + EARLY)
    finally:
        release.set()
    _join([leader, follower])
    assert leader.body == body2
    # ...but A saw APPEND's length go wrong and stopped sharing; B resumed upstream, whose
    # first bytes are not those B relayed: a failed transfer, not a complete wrong body.
    assert follower.body is None and follower.error is not None
    assert fetch(a, "vid_forged2").content == body2  # A's own copy
    answer = fetch(b, "vid_forged2")  # A uploaded its committed copy instead
    assert answer.status_code == 200 and answer.content == body2


@pytest.mark.parametrize("why", ["too_large", "no_length"])
def test_a_body_that_will_not_go_to_redis_frees_the_waiters_at_once(
    standin: StandIn, start_replica: ProxyFactory, why: str
) -> None:
    """Larger than shared_max_object_size, or without Content-Length: the holder says so as
    soon as upstream's headers tell it, and B's clients fetch on their own while A's fetch is
    still held: two upstream fetches, both exact."""
    body = standin.add("session", SESSION, "vid_unshared", size=2 * HALF)
    release = threading.Event()
    standin.faults["vid_unshared"] = Fault(
        hold_middle=release, hold_at=HALF, chunked=why == "no_length", times=1
    )
    limit = {"shared_max_object_size": "1MiB"} if why == "too_large" else {}
    a, b = start_replica(**limit), start_replica(**limit)
    leader = Client(artifact_url(a, "vid_unshared"))
    try:
        leader.start()
        assert leader.early.wait(30)
        own = fetch(b, "vid_unshared")  # whole, while A's upstream body is still held
        assert not release.is_set()
    finally:
        release.set()
    _join([leader])
    assert own.status_code == 200 and own.content == body and leader.body == body
    assert standin.hits("session", SESSION, "vid_unshared") == 2
    assert metric(b, "vlmrun_cache_fleet_leases_total", outcome="unshared") == 1


def test_another_credential_following_through_redis_is_checked(
    standin: StandIn, start_replica: ProxyFactory
) -> None:
    """A client of B whose key may not read the scope gets the API's refusal and none of the
    bytes A is fetching for the fleet; a key that may read it streams them after its check."""
    body = standin.add("session", SESSION, "vid_checked", size=2 * HALF)
    carol = "key-carol-0003"
    standin.grant(carol, "session", SESSION)
    release = threading.Event()
    standin.faults["vid_checked"] = Fault(hold_middle=release, hold_at=HALF, times=1)
    a, b = start_replica(), start_replica()
    leader = Client(artifact_url(a, "vid_checked"))
    try:
        leader.start()
        assert leader.early.wait(30)
        refused = fetch(b, "vid_checked", token=OTHER_TOKEN)
        with httpx.stream(
            "GET", artifact_url(b, "vid_checked"), headers=auth(carol), timeout=30
        ) as allowed:
            assert allowed.headers["x-cache"] == "COALESCED"
            release.set()
            followed = allowed.read()
    finally:
        release.set()
    _join([leader])
    assert refused.status_code == 404 and body[:100] not in refused.content
    assert followed == body and leader.body == body
    assert metric(b, "vlmrun_cache_fleet_leases_total", outcome="followed") == 1
    assert metric(b, "vlmrun_cache_access_checks_total", result="denied") == 1
    assert metric(b, "vlmrun_cache_access_checks_total", result="granted") == 1


def test_a_fleet_on_a_redis_cluster(
    standin: StandIn, start_replica: ProxyFactory, tmp_path: Path
) -> None:
    """On a real 3-master Redis Cluster the lease, its record and the growing key share the
    artifact's slot: B follows A's fetch there, before it ends, and one fetch serves both."""
    cluster = RedisCluster(tmp_path / "cluster").start()
    try:
        settings = {"redis_url": cluster.url, "redis_cluster": "true"}
        body = standin.add("session", SESSION, "vid_cluster", size=2 * HALF)
        release = threading.Event()
        standin.faults["vid_cluster"] = Fault(hold_middle=release, hold_at=HALF, times=1)
        a, b = start_replica(**settings), start_replica(**settings)
        leader, follower = (
            Client(artifact_url(a, "vid_cluster")),
            Client(artifact_url(b, "vid_cluster")),
        )
        try:
            leader.start()
            assert leader.early.wait(30)
            follower.start()
            assert follower.early.wait(30) and follower.got_early >= EARLY
            assert not release.is_set()
        finally:
            release.set()
        _join([leader, follower])
        assert leader.body == body and follower.body == body
        assert follower.x_cache == "COALESCED"
        assert standin.hits("session", SESSION, "vid_cluster") == 1
        assert metric(b, "vlmrun_cache_fleet_leases_total", outcome="followed") == 1
    finally:
        cluster.stop()
