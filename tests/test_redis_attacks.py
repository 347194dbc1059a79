"""Attacks on the shared tier by someone who can write Redis but lacks the replicas' secret, and
by Redis itself evicting or misbehaving: each one written as a test against a real redis-server.

What such a writer can still do is deny service (delete, overwrite): these tests check that it
cannot make a replica serve stale, purged or torn bytes, nor spend its memory, nor read the
Redis password from what the proxy shows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from proxy.store.chain import Hit
from proxy.store.shared import Names, SharedTier
from tests.conftest import SESSION, ProxyFactory
from tests.helpers import artifact_url, fetch, wait_until
from tests.redisserver import RedisServer
from tests.standin import Fault, StandIn, pattern
from tests.test_fleet import HALF, Client, _join, _keys
from tests.test_shared import KEY, SECRET, _meta, _run, _store

NAMES = Names("vlmrun-cache:v1:", SECRET)


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=30)


def _sent_bytes(server: RedisServer) -> int:
    """Bytes redis-server has written to its clients so far (``INFO stats``)."""
    stats = _client(server).info("stats")
    return int(stats["total_net_output_bytes"])


def test_a_huge_value_at_a_proof_name_is_not_read_whole(redis_server: RedisServer) -> None:
    """Proof names are visible to anyone who can SCAN Redis. A writer who puts 32 MiB there
    must not make every request that looks for that proof pull 32 MiB into the replica: a
    genuine record is a few dozen bytes, so no more than that is asked for."""
    scope = ("session", "sess_1")
    name = NAMES.proof("fp-a", scope)
    _client(redis_server).set(name, b"1" * (32 * 1024 * 1024))
    before = _sent_bytes(redis_server)

    found = _run(redis_server, lambda tier: tier.proven_at("fp-a", scope))

    assert found is None
    assert _sent_bytes(redis_server) - before < 64 * 1024


def test_a_temporary_key_lost_mid_upload_never_publishes_a_torn_entry(
    redis_server: RedisServer,
) -> None:
    """allkeys-lru may evict an upload's temporary key between two APPENDs (or a purge may
    delete it). The next APPEND would create a fresh key holding only the rest of the body, and
    the RENAME would publish that torn value: a waste of Redis memory that every replica then
    rejects as if someone without the secret had written it. The upload must notice and stop."""
    body = pattern("torn", 200 * 1024)  # four APPENDs of 64 KiB chunks
    lost = asyncio.Event()

    async def work(tier: SharedTier) -> tuple[list[bytes], Hit | None]:
        async def read(offset: int, size: int) -> bytes:
            if offset == 128 * 1024:  # two chunks are in the temporary key: it goes
                temps = [k async for k in tier.call.client.scan_iter(match="*:tmp:*")]
                await tier.call(lambda c: c.delete(*temps))
                lost.set()
            return body[offset : offset + size]

        written: list[str] = []
        tier._on_write = written.append
        tier.publish(KEY, _meta(body), read)
        await asyncio.gather(*tier._tasks)
        assert lost.is_set() and written == ["failed"]
        keys = [k async for k in tier.call.client.scan_iter(match="*")]
        return keys, await tier.lookup(KEY)

    keys, hit = _run(redis_server, work)
    assert keys == [] and hit is None


def test_an_entry_kept_past_shared_ttl_is_not_served(redis_server: RedisServer) -> None:
    """A writer without the secret can PERSIST a genuine entry (or keep a copy and SET it back
    later): Redis's TTL is not a promise. The sealed ``stored_at`` is: an entry sealed longer
    than ``shared_ttl`` ago is a miss, and is deleted."""
    body = pattern("stale", 5000)
    name = NAMES.entry(KEY)
    old = dataclasses.replace(_meta(body), stored_at=time.time() - 8 * 86400)
    _client(redis_server).set(name, body + NAMES.seal(name, old))  # no TTL, as PERSIST leaves it

    assert _run(redis_server, lambda tier: tier.lookup(KEY)) is None
    assert redis_server.cli("EXISTS", name).strip() == "0"


@pytest.mark.xfail(
    strict=True,
    reason="judgement call: a genuine sealed value saved before a purge (GET/DUMP) and written "
    "back after it is served again until shared_ttl runs out; refusing it needs a purge epoch "
    "that every replica knows without trusting Redis (e.g. in the sealed metadata and a local "
    "purge record), a design change",
)
def test_a_genuine_value_written_back_after_a_purge_is_not_served(
    redis_server: RedisServer,
) -> None:
    body = pattern("replayed", 5000)
    name = NAMES.entry(KEY)

    async def work(tier: SharedTier) -> Hit | None:
        await _store(tier, KEY, body)
        saved = await tier.call(lambda c: c.get(name))
        await tier.delete_matching(NAMES.scope_pattern("v2", "session", "sess_1"))
        await tier.call(lambda c: c.set(name, saved))  # the attacker's replay
        return await tier.lookup(KEY)

    assert _run(redis_server, work) is None


@pytest.mark.xfail(
    strict=True,
    reason="judgement call: the body read of a lookup (64 KiB to redis_buffer_size, before any "
    "header) goes through the bulk client (BULK_TIMEOUT 1 s, so a busy event loop does not trip "
    "the breaker); Redis stopping in the ~1 ms between the two reads costs that request ~1 s, "
    "where falling back to upstream after redis_timeout would be invisible to the client",
)
def test_redis_stopping_between_a_lookups_two_reads_costs_about_redis_timeout(
    redis_server: RedisServer,
) -> None:
    """An artifact between 64 KiB and redis_buffer_size takes two reads before the answer
    starts (the trailer, then the body). Redis stopped (SIGSTOP) right between them must cost
    that request about redis_timeout, like any lookup: not the bulk transfers' 1 s."""
    body = pattern("medium", 500 * 1024)

    async def work(tier: SharedTier) -> tuple[Hit | None, float]:
        await _store(tier, KEY, body)
        call = tier.call
        calls = [0]

        async def stopping(op: Any, bulk: bool = False) -> Any:
            result = await call(op, bulk)
            calls[0] += 1
            if calls[0] == 1:  # the trailer has been read
                redis_server.pause()
            return result

        tier.call = stopping  # type: ignore[assignment]
        began = time.monotonic()
        try:
            hit = await tier.lookup(KEY)
        finally:
            redis_server.resume()
            tier.call = call
        return hit, time.monotonic() - began

    hit, took = _run(redis_server, work, redis_timeout="50ms")
    assert hit is None
    assert took < 0.4  # 2 x redis_timeout plus scheduling; the bulk deadline would be 1-2 s


def test_a_proof_moved_to_another_credentials_name_proves_nothing(
    redis_server: RedisServer,
) -> None:
    """Proof names are unlinkable HMACs, but whoever can write Redis can copy values between
    them: a genuine proof of credential A written under B's name (or another scope's) fails the
    seal, which binds the name."""
    scope, other_scope = ("session", "sess_1"), ("session", "sess_2")

    async def work(tier: SharedTier) -> list[float | None]:
        tier.share_proofs("fp-a", (scope,), time.time(), 60)
        await asyncio.gather(*tier._tasks)
        genuine = await tier.call(lambda c: c.get(NAMES.proof("fp-a", scope)))
        for fingerprint, where in (("fp-b", scope), ("fp-a", other_scope)):
            target = NAMES.proof(fingerprint, where)
            await tier.call(lambda c, n=target: c.set(n, genuine))
        return [
            await tier.proven_at("fp-a", scope),
            await tier.proven_at("fp-b", scope),
            await tier.proven_at("fp-a", other_scope),
        ]

    genuine, moved, widened = _run(redis_server, work)
    assert genuine is not None and moved is None and widened is None


@pytest.mark.parametrize(
    "value",
    [
        b"VRC1",  # shorter than a trailer
        b"x" * 100 + b"\xff\xff\xff\xffVRC1",  # claims 4 GiB of metadata
        b"x" * 100 + b"\x00\x00\x00\x50VRC1",  # claims more metadata than the value holds
        b"y" * (200 * 1024) + b"\x00\x00\xff\x00VRC1",  # large: claims all but the trailer read
    ],
)
def test_a_trailer_that_lies_about_its_length_is_a_miss(
    redis_server: RedisServer, value: bytes
) -> None:
    """A trailer claiming a huge (or impossible) metadata length: no exception, no read beyond
    the one tail read, a miss, and the value is deleted."""
    name = NAMES.entry(KEY)
    _client(redis_server).set(name, value)
    before = _sent_bytes(redis_server)

    assert _run(redis_server, lambda tier: tier.lookup(KEY)) is None
    assert redis_server.cli("EXISTS", name).strip() == "0"
    assert _sent_bytes(redis_server) - before < 80 * 1024


def test_a_genuine_entry_above_this_replicas_limit_is_a_miss_not_a_forgery(
    redis_server: RedisServer,
) -> None:
    """Replicas mid-way through a change of shared_max_object_size: an entry another replica
    sealed (valid HMAC) but larger than this one takes is a miss here, left for the others,
    not deleted and reported as written without the secret."""
    body = pattern("big", 3 * 1024 * 1024)
    name = NAMES.entry(KEY)
    _run(redis_server, lambda tier: _store(tier, KEY, body))
    rejected: list[None] = []

    async def work(tier: SharedTier) -> Hit | None:
        tier._on_reject = lambda: rejected.append(None)
        return await tier.lookup(KEY)

    assert _run(redis_server, work, shared_max_object_size="1MiB") is None
    assert rejected == [] and redis_server.cli("EXISTS", name).strip() == "1"


@pytest.mark.xfail(
    strict=True,
    reason="judgement call: a range of a streamed Redis hit reads and hashes the whole body "
    "(Redis is not trusted with a range), so any authorized client can make a replica pull up "
    "to shared_max_object_size (64 MiB) from Redis per 1-byte Range request; verifying a range "
    "alone needs per-chunk digests in the sealed metadata (a layout change)",
)
def test_a_one_byte_range_of_a_large_redis_hit_reads_little_from_redis(
    redis_server: RedisServer,
) -> None:
    body = pattern("ranged", 8 * 1024 * 1024)

    async def work(tier: SharedTier) -> tuple[bytes, int]:
        await _store(tier, KEY, body)
        hit = await tier.lookup(KEY)
        assert hit is not None and hit.body is None
        before = await anyio.to_thread.run_sync(_sent_bytes, redis_server)
        got = b"".join([data async for data in hit.chunks(0, 1, False)])
        return got, await anyio.to_thread.run_sync(_sent_bytes, redis_server) - before

    got, read = _run(redis_server, work)
    assert got == body[:1]
    assert read < 2 * 1024 * 1024


def test_a_lease_overwritten_with_binary_bytes_is_no_5xx(
    standin: StandIn,
    start_replica: ProxyFactory,
    redis_server: RedisServer,
    shared_secret_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fleet single-flight: while replica A holds the lease of an artifact and has published
    its genuine record, someone who can write Redis puts bytes that are not UTF-8 in the lease.
    B, asking for the artifact, must still answer with the exact body (on its own), never fail
    on decoding the holder's token."""
    body = standin.add("session", SESSION, "vid_binlease", size=2 * HALF)
    keys = _keys(shared_secret_file, "vid_binlease")
    release = threading.Event()
    standin.faults["vid_binlease"] = Fault(hold_middle=release, hold_at=HALF, times=1)
    a, b = start_replica(), start_replica()
    leader = Client(artifact_url(a, "vid_binlease"))
    attacker = _client(redis_server)
    try:
        leader.start()
        assert leader.early.wait(30)
        assert wait_until(lambda: attacker.exists(keys.record) == 1)
        attacker.set(keys.lease, b"\xff\xfe", keepttl=True)
        got = fetch(b, "vid_binlease")
    finally:
        release.set()
    _join([leader])
    assert got.status_code == 200 and got.content == body
    assert leader.body == body
    assert "failed unexpectedly" not in caplog.text  # was: UnicodeDecodeError, fill lost


def test_a_huge_value_at_a_lease_or_record_name_is_not_polled_whole(
    standin: StandIn,
    start_replica: ProxyFactory,
    redis_server: RedisServer,
    shared_secret_file: Path,
) -> None:
    """Fleet single-flight: a waiting replica polls the lease and its record every few ms. A
    writer without the secret who puts 16 MiB at those names (visible to SCAN) must not make
    each poll pull 16 MiB: the replica waits out the lease, fetches the exact body itself, and
    Redis sends it little."""
    body = standin.add("session", SESSION, "arr_hugelease", 5000)
    keys = _keys(shared_secret_file, "arr_hugelease")
    attacker = _client(redis_server)
    junk = b"J" * (16 * 1024 * 1024)
    b = start_replica(redis_lease_ttl="1s")
    attacker.set(keys.lease, junk, px=700)
    attacker.set(keys.record, junk, px=700)
    before = _sent_bytes(redis_server)

    got = fetch(b, "arr_hugelease")

    assert got.status_code == 200 and got.content == body
    # Each poll (every 2-20 ms for 0.7 s) reads at most 2 x 64 KiB; whole, a single poll would
    # be 32 MiB (it was 224 MiB in all).
    assert _sent_bytes(redis_server) - before < 16 * 1024 * 1024
