"""Workers following each other's fills: a fetch running in one process streams to the clients
of another as it grows (proxy/follower.py, proxy/store/claims.py).

Two proxies in this process over one cache directory stand for two worker processes: each has
its own fills, store and claims (``flock`` locks of separate opens exclude each other like those
of separate processes), and the test picks which one each client talks to.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.keys import ArtifactKey
from proxy.store.claims import ALREADY_STORED, AlreadyStored, Announcement, Claims, Holding
from proxy.store.disk import DiskStore
from tests.conftest import OTHER_TOKEN, SESSION, ProxyFactory
from tests.helpers import artifact_url, auth, fetch, metric
from tests.servers import ServerThread
from tests.standin import Fault, StandIn

HALF = 1_000_000


@pytest.fixture
def pair(start_proxy: ProxyFactory) -> tuple[ServerThread, ServerThread]:
    return start_proxy(), start_proxy()


def _first_bytes(response: httpx.Response, at_least: int) -> tuple[bytes, Iterator[bytes]]:
    chunks = response.iter_raw()
    got = b""
    while len(got) < at_least:
        got += next(chunks)
    return got, chunks


def test_a_fill_in_one_worker_streams_to_another_before_it_ends(
    standin: StandIn, pair: tuple[ServerThread, ServerThread]
) -> None:
    """Worker B's client gets bytes of worker A's fetch while the upstream still holds the rest;
    both get the exact body, upstream is asked once, and B says COALESCED."""
    a, b = pair
    body = standin.add("session", SESSION, "vid_f011a0", size=2 * HALF)
    release = threading.Event()
    standin.faults["vid_f011a0"] = Fault(hold_middle=release, hold_at=HALF, times=1)
    url = artifact_url(a, "vid_f011a0")
    try:
        with httpx.stream("GET", url, headers=auth(), timeout=20) as leader:
            head, rest = _first_bytes(leader, 1)  # A's fill has begun and announced its file
            with httpx.stream(
                "GET", artifact_url(b, "vid_f011a0"), headers=auth(), timeout=20
            ) as follower:
                assert follower.headers["x-cache"] == "COALESCED"
                early, tail = _first_bytes(follower, HALF // 2)
                assert not release.is_set()  # B streamed before the upstream body ended
                release.set()
                followed = early + b"".join(tail)
            led = head + b"".join(rest)
    finally:
        release.set()
    assert led == body and followed == body
    assert standin.hits("session", SESSION, "vid_f011a0") == 1
    assert (fetch(b, "vid_f011a0").headers["x-cache"], fetch(a, "vid_f011a0").content) == (
        "HIT",
        body,
    )
    assert metric(b, "vlmrun_cache_requests_total", outcome="coalesced") == 1


def test_another_credential_following_a_fill_is_checked(
    standin: StandIn, pair: tuple[ServerThread, ServerThread]
) -> None:
    """A client of worker B with a key that may not read the scope gets the API's refusal and
    not one byte of what worker A is fetching; a key that may gets the bytes after its check."""
    a, b = pair
    body = standin.add("session", SESSION, "vid_f011a1", size=2 * HALF)
    third = "key-carol-0003"
    standin.grant(third, "session", SESSION)
    release = threading.Event()
    standin.faults["vid_f011a1"] = Fault(hold_middle=release, hold_at=HALF, times=1)
    try:
        with httpx.stream(
            "GET", artifact_url(a, "vid_f011a1"), headers=auth(), timeout=20
        ) as leader:
            head, rest = _first_bytes(leader, 1)
            refused = fetch(b, "vid_f011a1", token=OTHER_TOKEN)
            with httpx.stream(
                "GET", artifact_url(b, "vid_f011a1"), headers=auth(third), timeout=20
            ) as allowed:
                assert allowed.headers["x-cache"] == "COALESCED"
                release.set()
                followed = allowed.read()
            led = head + b"".join(rest)
    finally:
        release.set()
    assert refused.status_code == 404 and refused.content != body[: len(refused.content)]
    assert led == body and followed == body
    assert metric(b, "vlmrun_cache_access_checks_total", result="denied") == 1
    assert metric(b, "vlmrun_cache_access_checks_total", result="granted") == 1


def test_a_fill_that_breaks_fails_the_followers_transfer(
    standin: StandIn, pair: tuple[ServerThread, ServerThread]
) -> None:
    """Upstream cuts A's body: B's client gets a failed transfer, never a short 200, and
    nothing is stored."""
    a, b = pair
    standin.add("session", SESSION, "vid_f011a2", size=2 * HALF)
    release = threading.Event()
    standin.faults["vid_f011a2"] = Fault(
        hold_middle=release, hold_at=HALF, cut_at=HALF + 1000, times=1
    )
    with httpx.stream("GET", artifact_url(a, "vid_f011a2"), headers=auth(), timeout=20) as leader:
        _, led = _first_bytes(leader, 1)
        with httpx.stream(
            "GET", artifact_url(b, "vid_f011a2"), headers=auth(), timeout=20
        ) as follower:
            assert follower.headers["x-cache"] == "COALESCED"
            _, followed = _first_bytes(follower, 1)
            release.set()
            with pytest.raises(httpx.HTTPError):
                b"".join(followed)
        with pytest.raises(httpx.HTTPError):
            b"".join(led)
    release.set()
    again = fetch(b, "vid_f011a2")
    assert (again.status_code, again.headers["x-cache"]) == (200, "MISS")


def test_an_announcement_is_followed_only_while_its_writer_lives(cache_dir: Path) -> None:
    """A record naming a fill file nobody writes (its worker crashed) is not followed, and a
    record that is not ours (a path outside tmp/, garbage) is not believed."""
    store = DiskStore(cache_dir, max_bytes=10**8, max_object_bytes=10**8)
    try:
        live = store.begin_fill()
        name = os.path.basename(live.path)
        fd = store.open_fill(name)
        assert fd is not None  # its writer holds the lock
        os.close(fd)
        store.discard(live)
        dead = store.begin_fill()
        dead_name = os.path.basename(dead.path)
        dead.file.close()  # the lock goes with the (crashed) writer; the file stays
        assert store.open_fill(dead_name) is None
        assert store.open_fill("../entries/x.fill") is None
        assert store.open_fill(".hidden.fill") is None
    finally:
        store.close()
    claims = Claims(cache_dir)
    claims._record("k").write_text('{"key": "k", "name": "../../etc/passwd.fill"}')
    assert claims.announced("k") is None
    record = Announcement("k", "../x.fill", "text/plain", None, {}, "")
    claims._record("k").write_text(record.to_json())
    assert claims.announced("k") is None
    claims._record("k").write_text(Announcement("j", "a.fill", "text/plain", 1, {}, "").to_json())
    assert claims.announced("k") is None  # another key sharing the slot


def test_an_announcement_lives_in_the_lock_file_and_the_next_holder_clears_it(
    tmp_path: Path,
) -> None:
    """The holder writes its announcement into the slot's lock file (no file is created per
    fill); whoever takes the lock next, after a finished or a crashed holder, replaces it first
    with the key it fetches."""
    claims = Claims(tmp_path)
    record = Announcement("k", "a.fill", "text/plain", 3, {}, "")
    lease = claims._attempt("k")
    assert lease is not None and not isinstance(lease, Announcement)
    lease.announce(record)
    assert claims.announced("k") == record
    assert sorted(p.name for p in claims.directory.iterdir()) == [claims._path("k").name]
    lease.release()
    fd = claims.try_claim("k")
    assert fd is not None
    assert claims.announced("k") is None
    Claims.release(fd)
    claims._record("k").write_text(record.to_json())  # left by a holder that crashed
    fd = claims.try_claim("k")
    assert fd is not None
    assert claims.announced("k") is None
    assert claims._holder("k") == Holding("k")  # which key it fetches, nothing to follow
    Claims.release(fd)


def test_a_holder_record_that_cannot_be_written_still_gives_the_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a full disk the holder's key cannot be written into the lock file: the lease is
    still taken, and what the last holder announced is emptied all the same."""
    claims = Claims(tmp_path)
    claims._record("k").write_text(Announcement("k", "a.fill", "text/plain", 3, {}, "").to_json())

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    fd = claims.try_claim("k")
    assert fd is not None
    assert claims._holder("k") is None and claims._record("k").read_bytes() == b""
    Claims.release(fd)


def test_a_key_stored_before_its_lease_is_not_fetched_again(tmp_path: Path) -> None:
    """With the lease taken, ``stored`` is asked in the same hop: a key another process
    stored meanwhile gives the lease back at once (ALREADY_STORED), and so does a check that
    fails; one not stored keeps it."""
    claims = Claims(tmp_path)
    assert claims._attempt("k", lambda: True) is ALREADY_STORED
    fd = claims.try_claim("k")  # given back
    assert fd is not None
    Claims.release(fd)

    def broken() -> bool:
        raise OSError("index unreadable")

    with pytest.raises(OSError):
        claims._attempt("k", broken)
    lease = claims._attempt("k", lambda: False)
    assert lease is not None and not isinstance(lease, (Announcement, AlreadyStored))
    assert claims.try_claim("k") is None  # held now
    lease.release()


def _same_slot(claims: Claims, object_id: str) -> str:
    """Another object id of the session whose key shares ``object_id``'s claim slot."""
    slot = claims._path(ArtifactKey("session", SESSION, object_id).cache_key)
    for n in range(1_000_000):
        other = f"arr_{n:06x}"
        if claims._path(ArtifactKey("session", SESSION, other).cache_key) == slot:
            return other
    raise AssertionError("no key shares the slot")


@pytest.mark.parametrize("size", [2 * HALF, 40_000], ids=["announced-file", "in-memory"])
def test_a_miss_never_waits_for_another_keys_fill_that_shares_its_slot(
    standin: StandIn, start_proxy: ProxyFactory, cache_dir: Path, size: int
) -> None:
    """Keys share the 4096 claim slots. While a long fill of one key holds a slot (one that
    announced its file, or a small one kept in memory, which announces none), a miss of
    another key of that slot starts at once instead of waiting for that fill to end or for
    ``first_byte_timeout``."""
    proxy = start_proxy(first_byte_timeout="60s")
    standin.add("session", SESSION, "vid_5107a0", size=size)
    release = threading.Event()
    standin.faults["vid_5107a0"] = Fault(hold_middle=release, hold_at=size // 2, times=1)
    other = _same_slot(Claims(cache_dir), "vid_5107a0")
    body = standin.add("session", SESSION, other, size=5000)
    try:
        with httpx.stream(
            "GET", artifact_url(proxy, "vid_5107a0"), headers=auth(), timeout=20
        ) as long:
            _, rest = _first_bytes(long, 1)  # its fill holds the slot, half-way
            beside = httpx.get(artifact_url(proxy, other), headers=auth(), timeout=10)
            assert (beside.status_code, beside.content) == (200, body)
            release.set()
            b"".join(rest)
    finally:
        release.set()
