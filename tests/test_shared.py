"""The shared tier (proxy/store/shared.py) against a real redis-server: layout, seals, faults."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from proxy.config import load
from proxy.store import EntryMeta
from proxy.store.chain import Corrupt, Hit
from proxy.store.redisclient import Unavailable, guarded
from proxy.store.shared import Names, SharedTier
from tests.redisserver import RedisServer
from tests.standin import pattern

SECRET = b"s" * 40
KEY = '["v2", "session", "sess_1", "img_000001"]'


def _meta(body: bytes) -> EntryMeta:
    return EntryMeta("image/png", len(body), hashlib.sha256(body).hexdigest(), time.time())


def _tier(server: RedisServer, secret: bytes = SECRET, **options: Any) -> SharedTier:
    """The tier on ``server``; 1 s per call unless given (tests of faults give 50 ms)."""
    settings = {"redis_url": server.url, "secret_file": "x", "redis_timeout": "1s"}
    config = load(env={}, flags={**settings, **options})
    call = guarded(config)
    return SharedTier(
        call,
        Names(config.redis_prefix, secret),
        chunk_size=64 * 1024,
        buffer_size=config.redis_buffer_size,
        max_object_bytes=config.shared_max_object_size,
        ttl=config.shared_ttl,
    )


def _run(server: RedisServer, work: Callable[[SharedTier], Awaitable[Any]], **opts: Any) -> Any:
    async def main() -> Any:
        tier = _tier(server, **opts)
        try:
            return await work(tier)
        finally:
            await tier.aclose()

    return anyio.run(main)


async def _store(tier: SharedTier, key: str, body: bytes) -> None:
    """Publish ``body`` and wait until the upload is done."""

    async def read(offset: int, size: int) -> bytes:
        return body[offset : offset + size]

    tier.publish(key, _meta(body), read)
    await asyncio.gather(*tier._tasks)


async def _read_all(hit: Hit, start: int = 0, end: int | None = None) -> bytes:
    chunks: list[bytes] = []
    stop = hit.meta.length if end is None else end
    async for data in hit.chunks(start, stop, start == 0 and end is None):
        chunks.append(data)
    return b"".join(chunks)


def test_small_artifact_round_trips_as_one_key_with_a_ttl(redis_server: RedisServer) -> None:
    """A small artifact is one string (no temporary key left), read whole in one call, exact."""
    body = pattern("small", 5000)

    async def work(tier: SharedTier) -> Hit | None:
        await _store(tier, KEY, body)
        return await tier.lookup(KEY)

    hit = _run(redis_server, work)
    assert hit is not None and hit.body == body and hit.source == "shared"
    keys = redis_server.cli("--scan").split()
    assert keys == [Names("vlmrun-cache:v1:", SECRET).entry(KEY)]
    assert "sess_1" not in keys[0] and "img_000001" not in keys[0]  # ids never in Redis
    assert 0 < int(redis_server.cli("PTTL", keys[0])) <= 7 * 86400 * 1000


def test_large_artifact_streams_exact_bytes_and_ranges(redis_server: RedisServer) -> None:
    """Above redis_buffer_size a hit streams by GETRANGE; whole bodies and ranges are exact."""
    body = pattern("large", 3 * 1024 * 1024 + 17)

    async def work(tier: SharedTier) -> tuple[bytes, bytes, bool]:
        await _store(tier, KEY, body)
        hit = await tier.lookup(KEY)
        assert hit is not None and hit.body is None
        return await _read_all(hit), await _read_all(hit, 1000, 70_000), hit.body is None

    whole, span, streamed = _run(redis_server, work)
    assert streamed and whole == body and span == body[1000:70_000]


def _forge(server: RedisServer, name: str, value: bytes) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=server.port)
    client.set(name, value)
    client.close()


@pytest.mark.parametrize("size", [5000, 3 * 1024 * 1024])
def test_a_value_sealed_without_the_secret_is_rejected_and_deleted(
    redis_server: RedisServer, size: int
) -> None:
    """Someone who can write Redis but lacks the secret cannot plant bytes: metadata sealed with
    another secret fails its HMAC, is deleted, and the lookup is a miss."""
    body = pattern("forged", size)
    name = Names("vlmrun-cache:v1:", SECRET).entry(KEY)
    _forge(redis_server, name, body + Names("vlmrun-cache:v1:", b"x" * 40).seal(name, _meta(body)))

    assert _run(redis_server, lambda tier: tier.lookup(KEY)) is None
    assert redis_server.cli("EXISTS", name).strip() == "0"


def test_a_value_moved_to_another_key_is_rejected(redis_server: RedisServer) -> None:
    """The seal binds the key's name: a genuine entry copied under another artifact's name (a
    replay by whoever can write Redis) is not served there."""
    body = pattern("moved", 5000)
    other = '["v2", "session", "sess_1", "img_000002"]'
    names = Names("vlmrun-cache:v1:", SECRET)

    async def work(tier: SharedTier) -> Hit | None:
        await _store(tier, KEY, body)
        await tier.call(lambda c: c.copy(names.entry(KEY), names.entry(other)))
        return await tier.lookup(other)

    assert _run(redis_server, work) is None


def test_a_tampered_small_body_is_never_served(redis_server: RedisServer) -> None:
    """One byte changed in the body (metadata intact): sha256 fails, the key is deleted."""
    body = pattern("tamper", 5000)
    name = Names("vlmrun-cache:v1:", SECRET).entry(KEY)

    async def work(tier: SharedTier) -> Hit | None:
        await _store(tier, KEY, body)
        await tier.call(lambda c: c.setrange(name, 100, b"\x00"))
        return await tier.lookup(KEY)

    assert _run(redis_server, work) is None
    assert redis_server.cli("EXISTS", name).strip() == "0"


@pytest.mark.parametrize("span", [None, (0, 1000)])
def test_a_tampered_streamed_body_fails_before_its_last_byte(
    redis_server: RedisServer, span: tuple[int, int] | None
) -> None:
    """A large body altered after the lookup (or a range of it): the stream raises Corrupt
    before the last byte of what was asked for goes out."""
    body = pattern("tamper-large", 2 * 1024 * 1024)
    name = Names("vlmrun-cache:v1:", SECRET).entry(KEY)
    start, end = span if span is not None else (0, len(body))

    async def work(tier: SharedTier) -> int:
        await _store(tier, KEY, body)
        hit = await tier.lookup(KEY)
        assert hit is not None
        await tier.call(lambda c: c.setrange(name, len(body) - 10, b"\x00"))
        received = 0
        with pytest.raises(Corrupt):
            async for data in hit.chunks(start, end, span is None):
                received += len(data)
        return received

    assert _run(redis_server, work) < end - start


def test_proofs_are_shared_sealed_and_expire(redis_server: RedisServer) -> None:
    """A proof written by one replica is read by another with its time; a forged one is not."""
    scope = ("session", "sess_1")

    async def work(tier: SharedTier) -> tuple[float | None, float | None]:
        tier.share_proofs("fp-a", (scope,), 1_700_000_000.5, 60)
        await asyncio.gather(*tier._tasks)
        genuine = await tier.proven_at("fp-a", scope)
        forged_name = tier.names.proof("fp-b", scope)
        await tier.call(lambda c: c.set(forged_name, b"1700000000000" + b"0" * 32))
        return genuine, await tier.proven_at("fp-b", scope)

    genuine, forged = _run(redis_server, work)
    assert genuine == 1_700_000_000.5 and forged is None
    name = Names("vlmrun-cache:v1:", SECRET).proof("fp-a", scope)
    assert 0 < int(redis_server.cli("PTTL", name)) <= 60_000


@pytest.mark.parametrize("fault", ["kill", "pause"])
def test_an_unavailable_redis_is_a_quick_miss_and_opens_the_breaker(
    redis_server: RedisServer, fault: str
) -> None:
    """Redis killed or stopped (SIGSTOP): each lookup is a miss within about redis_timeout,
    and after redis_breaker_threshold of them no call is made at all."""
    getattr(redis_server, fault)()

    async def work(tier: SharedTier) -> tuple[list[float], str]:
        took: list[float] = []
        for _ in range(6):
            began = time.monotonic()
            assert await tier.lookup(KEY) is None
            took.append(time.monotonic() - began)
        return took, tier.call.breaker.state

    try:
        took, state = _run(redis_server, work, redis_timeout="50ms")
    finally:
        if fault == "pause":
            redis_server.resume()
    assert state == "open"
    assert max(took) < 0.5  # bounded by 2 x redis_timeout plus scheduling on a busy machine
    assert max(took[3:]) < 0.04  # breaker open: no call (a stopped Redis would take 50 ms)


def test_breaker_closes_once_redis_is_back(redis_server: RedisServer) -> None:
    """After a restart, the first lookup past the cool-down probes and sharing resumes."""
    body = pattern("back", 3000)
    redis_server.kill()

    async def work(tier: SharedTier) -> Hit | None:
        for _ in range(3):
            await tier.lookup(KEY)
        assert tier.call.breaker.state == "open"
        await anyio.to_thread.run_sync(redis_server.start)
        await anyio.sleep(0.2)  # the cool-down (redis_breaker_cooldown=0.2s) is the behaviour
        await _store(tier, KEY, body)
        return await tier.lookup(KEY)

    hit = _run(redis_server, work, redis_breaker_cooldown="0.2s")
    assert hit is not None and hit.body == body


def test_names_keep_an_artifact_in_one_slot_and_a_scope_findable(tmp_path: Path) -> None:
    """Entry and temporary names share one hash tag; a scope's pattern matches its entries."""
    import fnmatch

    names = Names("p:", SECRET)
    entry = names.entry(KEY)
    temp = names.temporary(KEY)
    tag = entry[entry.index("{") : entry.index("}") + 1]
    assert temp.startswith(entry) and tag in temp and temp.index("{") == entry.index("{")
    other_scope = names.entry('["v2", "session", "sess_2", "img_000001"]')
    other_object = names.entry('["v2", "session", "sess_1", "img_000002"]')
    own_copy = names.entry('["v2", "session", "sess_1", "img_000001", "fp"]')
    scope = names.scope_pattern("v2", "session", "sess_1").replace("\\", "")
    assert fnmatch.fnmatchcase(entry, scope) and fnmatch.fnmatchcase(own_copy, scope)
    assert not fnmatch.fnmatchcase(other_scope, scope)
    obj = names.object_pattern("img_000001").replace("\\", "")
    assert fnmatch.fnmatchcase(entry, obj) and fnmatch.fnmatchcase(other_scope, obj)
    assert fnmatch.fnmatchcase(own_copy, obj) and fnmatch.fnmatchcase(temp, obj)
    assert not fnmatch.fnmatchcase(other_object, obj)


def test_metadata_travels_sealed_with_its_validators_filler_and_prefetch_flag(
    redis_server: RedisServer,
) -> None:
    """What the security and prefetch work record about an entry reaches the other replicas."""
    import dataclasses

    from proxy.validators import Validators

    body = pattern("meta", 4000)
    validators = Validators("image/png", 4000, "", (("etag", '"abc"'),))
    meta = dataclasses.replace(_meta(body), validators=validators, filler="fp", prefetched=True)

    async def work(tier: SharedTier) -> Hit | None:
        async def read(offset: int, size: int) -> bytes:
            return body[offset : offset + size]

        tier.publish(KEY, meta, read)
        await asyncio.gather(*tier._tasks)
        return await tier.lookup(KEY)

    hit = _run(redis_server, work)
    assert hit is not None and hit.meta == meta


def test_a_transport_lost_under_a_call_is_redis_unavailable(redis_server: RedisServer) -> None:
    """uvloop's RuntimeError for a write on a transport whose connection was just lost (Redis
    killed between redis-py's connect and its first command; seen in test_fleet's mid-body
    test) is a fault like a reset: Unavailable, counted by the breaker, so a follower resumes
    from upstream; any other RuntimeError is a bug and is raised as it is."""
    settings = {"redis_url": redis_server.url, "secret_file": "x", "redis_timeout": "1s"}
    errors: list[str] = []
    call = guarded(load(env={}, flags=settings), on_error=errors.append)

    async def lost(_client: Any) -> Any:
        raise RuntimeError(
            "unable to perform operation on <TCPTransport closed=True reading=False>; "
            "the handler is closed"
        )

    async def bug(_client: Any) -> Any:
        raise RuntimeError("something else")

    async def main() -> None:
        try:
            with pytest.raises(Unavailable):
                await call(lost, bulk=True)
            with pytest.raises(RuntimeError, match="something else"):
                await call(bug)
        finally:
            await call.aclose()

    anyio.run(main)
    assert errors == ["unavailable"]
