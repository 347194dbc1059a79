"""Access proofs: HMAC fingerprints, TTL, persistence, owner-only secret."""

from __future__ import annotations

import contextlib
import sqlite3
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.access import (
    REVOCATIONS_FILE,
    AccessProofs,
    Revocations,
    existing_secret,
    fingerprint_with,
)
from proxy.store import RECHECK_SECONDS
from tests.conftest import SESSION
from tests.helpers import fetch
from tests.servers import ServerThread
from tests.standin import StandIn


def test_fingerprints_are_stable_keyed_and_not_the_token(tmp_path: Path) -> None:
    """The same credential maps to the same fingerprint; it never contains the credential."""
    proofs = AccessProofs(tmp_path, ttl=60)
    fp = proofs.fingerprint("Bearer secret-token")
    assert fp == proofs.fingerprint("Bearer secret-token") != proofs.fingerprint("Bearer other")
    assert fp is not None and "secret-token" not in fp
    assert proofs.fingerprint(None) is None and proofs.fingerprint("") is None
    other_dir = AccessProofs(tmp_path / "elsewhere", ttl=60)
    assert other_dir.fingerprint("Bearer secret-token") != fp  # per-directory secret


def test_proofs_are_per_scope_and_survive_reopening(tmp_path: Path) -> None:
    """A proof covers exactly one (kind, id) and is still there after a restart."""
    proofs = AccessProofs(tmp_path, ttl=60)
    fp = proofs.fingerprint("Bearer t")
    proofs.record(fp, ("session", "s1"))
    assert proofs.has_proof(fp, ("session", "s1"))
    assert not proofs.has_proof(fp, ("execution", "s1"))
    assert not proofs.has_proof(fp, ("session", "s2"))
    assert not proofs.has_proof(None, ("session", "s1"))
    proofs.close()
    again = AccessProofs(tmp_path, ttl=60)
    assert again.has_proof(again.fingerprint("Bearer t"), ("session", "s1"))


def test_proofs_expire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the TTL a proof no longer counts."""
    now = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])  # diskcache's clock and ours
    proofs = AccessProofs(tmp_path, ttl=60)
    fp = proofs.fingerprint("Bearer t")
    proofs.record(fp, ("session", "s"))
    now[0] += 59
    assert proofs.has_proof(fp, ("session", "s"))
    now[0] += 2
    assert not proofs.has_proof(fp, ("session", "s"))
    proofs.close()
    reopened = AccessProofs(tmp_path, ttl=60)  # the disk copy has expired too
    assert not reopened.has_proof(fp, ("session", "s"))


def test_a_repeated_proof_is_rewritten_on_disk_only_after_a_tenth_of_its_ttl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every miss of one key in one session proves the same thing: memory takes each, the
    disk (other workers, the next start) one per ttl/10, so its copy is at most that older."""
    now = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    proofs = AccessProofs(tmp_path, ttl=60)
    fp = proofs.fingerprint("Bearer t")
    proofs.record(fp, ("session", "s"))
    now[0] += 5
    proofs.record(fp, ("session", "s"))  # within 6 s: memory only
    now[0] += 56  # 61 s after the write, 56 s after the last acceptance
    assert proofs.has_proof(fp, ("session", "s"))  # memory: proven 56 s ago
    other = AccessProofs(tmp_path, ttl=60)  # another worker reads the disk: 61 s old
    assert not other.has_proof(fp, ("session", "s"))
    proofs.record(fp, ("session", "s"))  # over 6 s since the write: to disk again
    assert AccessProofs(tmp_path, ttl=60).has_proof(fp, ("session", "s"))
    now[0] += 1
    assert fp is not None
    Revocations.append(tmp_path, None, now[0])  # `revoke --all`, from another process
    time.sleep(RECHECK_SECONDS)  # the documented window, as `revoke` waits it
    now[0] += 1
    proofs.record(fp, ("session", "s"))  # 2 s after the last write, but that one is void
    assert AccessProofs(tmp_path, ttl=60).has_proof(fp, ("session", "s"))


def test_a_proof_recorded_on_the_event_loop_never_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``on_loop``: the disk write a proof is due for is left to a worker thread (False, kept
    in memory only, so that this process's next hit does not ask the API again); one not due
    is kept in memory at once (True)."""
    now = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    proofs = AccessProofs(tmp_path, ttl=60)
    fp = proofs.fingerprint("Bearer t")
    assert proofs.record(fp, ("session", "s"), on_loop=True) is False  # never written: due
    assert proofs.remembered(fp, ("session", "s"))  # but kept in memory at once
    assert not AccessProofs(tmp_path, ttl=60).has_proof(fp, ("session", "s"))
    assert proofs.record(fp, ("session", "s")) is True  # from a worker thread: written
    now[0] += 5
    assert proofs.record(fp, ("session", "s2"), on_loop=True) is False  # another scope: due
    assert proofs.record(fp, ("session", "s"), on_loop=True) is True
    now[0] += 56  # 61 s after the write, 56 s after the last acceptance
    assert proofs.remembered(fp, ("session", "s"))  # kept in memory, on the loop
    assert not AccessProofs(tmp_path, ttl=60).has_proof(fp, ("session", "s"))  # not written


def test_secret_file_is_owner_only(tmp_path: Path) -> None:
    """The HMAC secret is created with mode 0600."""
    AccessProofs(tmp_path, ttl=60)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600


def test_expired_proofs_are_dropped_from_disk_and_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proofs too old to count even offline are removed; younger ones are kept."""
    now = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    proofs = AccessProofs(tmp_path, ttl=60, offline_ttl=120)
    fp = proofs.fingerprint("Bearer t")
    proofs.record(fp, ("session", "old"))
    now[0] += 100
    proofs.record(fp, ("session", "new"))
    now[0] += 30
    assert proofs.expire() == 1  # ("session", "old") is 130 s old; "*" was proven again
    assert proofs.forget_stale() == 1
    assert _proofs_on_disk(tmp_path) == 2  # ("session", "new") and ("*",)
    assert not proofs.has_proof(fp, ("session", "old"), offline=True)
    assert proofs.has_proof(fp, ("session", "new"), offline=True)


def _proofs_on_disk(directory: Path) -> int:
    with contextlib.closing(sqlite3.connect(directory / "access" / "cache.db")) as db:
        return int(db.execute("SELECT count(*) FROM Cache").fetchone()[0])


def test_a_backlog_of_expired_proofs_drains_in_bounded_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening the store deletes nothing (start-up never waits for a backlog); each expire()
    deletes at most its batch, oldest first, and never a live proof."""
    now = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    proofs = AccessProofs(tmp_path, ttl=60, offline_ttl=120)
    for index in range(25):
        proofs.record(proofs.fingerprint(f"Bearer old{index}"), ("session", "s"))
    now[0] += 100
    live = proofs.fingerprint("Bearer live")
    proofs.record(live, ("session", "s"))
    now[0] += 30  # the 25 old keys' 50 proofs are expired, the live key's 2 are not
    proofs.close()
    proofs = AccessProofs(tmp_path, ttl=60, offline_ttl=120)
    assert _proofs_on_disk(tmp_path) == 52
    assert [proofs.expire(limit=20) for _ in range(4)] == [20, 20, 10, 0]
    assert _proofs_on_disk(tmp_path) == 2
    assert proofs.has_proof(live, ("session", "s"), offline=True)


def test_revocations_void_earlier_proofs_in_memory_and_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revocation voids one credential's (or, with ``*``, every) proof recorded before it, held
    in memory or read from disk, from the first lookup once RECHECK_SECONDS have passed (what
    ``revoke`` waits before it returns); proofs recorded later count again."""
    now = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    proofs = AccessProofs(tmp_path, ttl=600)
    alice, bob = proofs.fingerprint("Bearer a"), proofs.fingerprint("Bearer b")
    assert alice is not None and bob is not None
    proofs.record(alice, ("session", "s"))
    proofs.record(bob, ("session", "s"))
    now[0] += 1
    Revocations.append(tmp_path, alice, now[0])
    time.sleep(RECHECK_SECONDS)  # the documented window, as `revoke` waits it
    assert not proofs.remembered(alice, ("session", "s"))
    assert not proofs.has_proof(alice, ("session", "s"))
    assert not proofs.has_any_proof(alice, offline=True)
    assert proofs.has_proof(bob, ("session", "s"))
    now[0] += 1
    proofs.record(alice, ("session", "s"))
    assert proofs.remembered(alice, ("session", "s"))
    Revocations.append(tmp_path, None, now[0] + 0.5)
    time.sleep(RECHECK_SECONDS)
    assert not proofs.has_proof(alice, ("session", "s"))
    assert not proofs.has_proof(bob, ("session", "s"))
    proofs.close()
    reopened = AccessProofs(tmp_path, ttl=600)  # what is on disk is void as well
    assert not reopened.has_proof(bob, ("session", "s"))


def test_an_unreadable_revocation_file_voids_every_proof(tmp_path: Path) -> None:
    """If the revocation list cannot be read (here: a directory in its place), no proof is
    trusted: every credential is checked with the API instead."""
    proofs = AccessProofs(tmp_path, ttl=600)
    fingerprint = proofs.fingerprint("Bearer a")
    proofs.record(fingerprint, ("session", "s"))
    (tmp_path / REVOCATIONS_FILE).mkdir()
    assert not proofs.has_proof(fingerprint, ("session", "s"))
    (tmp_path / REVOCATIONS_FILE).rmdir()
    assert proofs.has_proof(fingerprint, ("session", "s"))


def test_revoking_a_key_revokes_every_spelling_of_its_scheme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API reads ``bearer K`` and ``BEARER K`` as ``Bearer K`` (HTTPBearer). A holder of a
    leaked key who used another spelling before ``revoke --key-file`` (which names ``Bearer
    K``) must not keep its proofs: every spelling is one credential. The token itself is not
    folded: ``Bearer k`` is another key."""
    now = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    proofs = AccessProofs(tmp_path, ttl=600)
    spelt = proofs.fingerprint("bEaReR Key-1")
    assert spelt is not None
    proofs.record(spelt, ("session", "s"))
    now[0] += 1
    Revocations.append(
        tmp_path, fingerprint_with(existing_secret(tmp_path) or b"", "Bearer Key-1"), now[0]
    )
    time.sleep(RECHECK_SECONDS)
    for spelling in ("bEaReR Key-1", "bearer Key-1", "BEARER Key-1", "Bearer Key-1"):
        assert proofs.fingerprint(spelling) == spelt
        assert not proofs.has_proof(proofs.fingerprint(spelling), ("session", "s"))
    assert proofs.fingerprint("Bearer key-1") != spelt
    assert proofs.fingerprint("Bearer  Key-1") != spelt  # a token with a space: not the key
    proofs.close()


def _open_at_once(directory: Path, workers: int) -> tuple[list[str | None], list[BaseException]]:
    """Construct AccessProofs on ``directory`` from ``workers`` threads released together."""
    start = threading.Barrier(workers)
    found: list[str | None] = []
    failed: list[BaseException] = []

    def open_proofs() -> None:
        start.wait(timeout=30)
        try:
            found.append(AccessProofs(directory, ttl=60).fingerprint("Bearer t"))
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=open_proofs) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return found, failed


def test_workers_creating_the_secret_at_once_all_read_the_same_whole_secret(
    tmp_path: Path,
) -> None:
    """Eight workers starting at once on a new cache directory: none reads a secret half
    written (it is linked into place whole), all fingerprint alike, no draft is left."""
    for attempt in range(20):
        directory = tmp_path / str(attempt)
        directory.mkdir()
        found, failed = _open_at_once(directory, 8)
        assert failed == [] and len(found) == 8 and len(set(found)) == 1
        assert [p.name for p in directory.iterdir() if p.name.startswith(".secret")] == []


def test_a_hit_right_after_a_miss_never_waits_for_the_proofs_disk_write(
    standin: StandIn, proxy: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The miss's proof is due for a disk write, which a worker thread makes; held there, the
    same key's hit of the same artifact is still served from the proof kept in memory, with
    no second request to the API (under load the write came late and the hit asked again)."""
    release = threading.Event()
    real = AccessProofs.record

    def record(self: AccessProofs, *args: Any, on_loop: bool = False) -> bool:
        if not on_loop:  # the worker thread's disk write
            assert release.wait(20)
        return real(self, *args, on_loop=on_loop)

    monkeypatch.setattr(AccessProofs, "record", record)
    body = standin.add("session", SESSION, "arr_9a0f00", size=20_000)
    try:
        assert fetch(proxy, "arr_9a0f00").headers["x-cache"] == "MISS"
        again = fetch(proxy, "arr_9a0f00")
        assert (again.headers["x-cache"], again.content) == ("HIT", body)
        assert standin.hits("session", SESSION, "arr_9a0f00") == 1
    finally:
        release.set()
