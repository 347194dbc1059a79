"""The operator's commands against a cache a running server (one and two workers) is using:
stats, ls, purge, verify and revoke, and what opening a cache from a command may not do."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest

from proxy.cli import main
from proxy.store import EntryMeta
from proxy.store.disk import DiskStore
from tests.conftest import EXECUTION, OTHER_TOKEN, SESSION, TOKEN
from tests.helpers import artifact_url, auth, fetch
from tests.operators import admin, cache_key, misses_then_hits, refetched, stored_file
from tests.servers import Daemon, ServerThread
from tests.standin import Fault, StandIn

# -- stats and ls --------------------------------------------------------------------------------


def test_stats_and_ls_describe_a_live_cache(
    standin: StandIn, live_server: Daemon, cache_dir: Path
) -> None:
    """stats counts entries and bytes and reads the server's hit rate; ls lists each artifact
    with its scope, type, length and RFC 3339 times, filtered by scope; both parse as JSON."""
    standin.add("session", SESSION, "img_57a701")
    standin.add("session", SESSION, "arr_57a702", size=30_000)
    standin.add("execution", EXECUTION, "doc_57a703", size=5_000)
    sizes = {}
    for object_id, scope, scope_id in (
        ("img_57a701", "session", SESSION),
        ("arr_57a702", "session", SESSION),
        ("doc_57a703", "execution", EXECUTION),
    ):
        sizes[object_id] = len(
            fetch(live_server, object_id, scope=scope, scope_id=scope_id).content
        )
    assert fetch(live_server, "arr_57a702").headers["x-cache"] == "HIT"
    bad = httpx.get(f"{live_server.url}/v1/artifacts?object_id=x", headers=auth(), timeout=10)
    assert bad.status_code == 422  # an error answer: not a request the cache could have hit

    stats = admin("stats", "--json", cache_dir=cache_dir)
    assert stats.code == 0, stats.err
    figures = stats.json()
    assert isinstance(figures, dict)
    assert figures["entries"] == 3 and figures["bytes"] == sum(sizes.values())
    assert figures["max_bytes"] == 10 * 1024**3
    assert figures["oldest_stored_at"] <= figures["newest_stored_at"]
    assert figures["server"]["url"] == live_server.url
    assert figures["server"]["requests"] == 4 and figures["server"]["hits"] == 1
    assert figures["server"]["errors"] == 1
    assert figures["server"]["hit_rate"] == 0.25
    assert figures["server"]["bytes_saved"] == sizes["arr_57a702"]
    assert figures["server"]["hits_by_tier"] == {"memory": 0, "disk": 1}
    human = admin("stats", cache_dir=cache_dir)
    assert "entries          3" in human.out
    assert "25.0% (1 of 4 requests; 1 answered with an error, not counted)" in human.out

    listed = admin("ls", "--json", cache_dir=cache_dir).json()
    assert isinstance(listed, list)
    assert {(e["scope_kind"], e["scope_id"], e["object_id"]) for e in listed} == {
        ("session", SESSION, "img_57a701"),
        ("session", SESSION, "arr_57a702"),
        ("execution", EXECUTION, "doc_57a703"),
    }
    for entry in listed:
        assert entry["length"] == sizes[entry["object_id"]]
        assert entry["stored_at"].endswith("Z") and time.time() - _epoch(entry["stored_at"]) < 600
    assert {e["content_type"] for e in listed} == {
        "image/png",
        "application/octet-stream",
        "application/pdf",
    }
    only = admin("ls", "--execution", EXECUTION, "--json", cache_dir=cache_dir).json()
    assert [e["object_id"] for e in only] == ["doc_57a703"]
    table = admin("ls", "--session", SESSION, cache_dir=cache_dir).out.splitlines()
    assert table[0].split() == ["SCOPE", "OBJECT", "TYPE", "SIZE", "STORED", "LAST", "READ"]
    assert len(table) == 4 and table[-1].startswith("2 entries")


def _epoch(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


# -- purge ---------------------------------------------------------------------------------------


def test_purge_by_each_selector_is_seen_by_the_running_server(
    standin: StandIn, live_server: Daemon, cache_dir: Path
) -> None:
    """--object, --older-than (from the last access), --execution, --session and --all each
    remove exactly their entries, and the running server's next request for one is a MISS that
    goes to the API, from every tier; the rest stay hits."""
    bodies = {}
    for object_id in ("arr_9e0001", "arr_9e0002", "img_9e0004"):
        standin.add("session", SESSION, object_id, size=3_000)
        bodies[object_id] = misses_then_hits(live_server, standin, object_id)
    standin.add("execution", EXECUTION, "arr_9e0003", size=3_000)
    assert (
        fetch(live_server, "arr_9e0003", scope="execution", scope_id=EXECUTION).status_code == 200
    )
    # Stored by another process and never read by the server: no access time of the server's
    # (its touches are flushed every second) can race the one set here.
    bodies["arr_9e0005"] = standin.add("session", SESSION, "arr_9e0005", size=3_000)
    other = DiskStore(cache_dir, 2**30, 2**30)
    fill = other.begin_fill()
    fill.file.write(bodies["arr_9e0005"])
    digest = hashlib.sha256(bodies["arr_9e0005"]).hexdigest()
    meta = EntryMeta("application/octet-stream", 3_000, digest, time.time())
    assert other.commit(cache_key("arr_9e0005"), fill, meta)
    other.close()
    with contextlib.closing(sqlite3.connect(cache_dir / "entries" / "cache.db")) as db, db:
        db.execute(
            "UPDATE Cache SET access_time = ? WHERE key = ?",
            (time.time() - 7200, cache_key("arr_9e0005")),
        )

    removed = admin("purge", "--object", "arr_9e0001", "--yes", cache_dir=cache_dir)
    assert removed.code == 0 and removed.out.startswith("removed 1 entry, 3000 bytes")
    assert refetched(live_server, standin, "arr_9e0001", bodies["arr_9e0001"])
    assert fetch(live_server, "arr_9e0002").headers["x-cache"] == "HIT"

    assert admin("purge", "--older-than", "1h", "--yes", cache_dir=cache_dir).out.startswith(
        "removed 1 entry"
    )
    assert refetched(live_server, standin, "arr_9e0005", bodies["arr_9e0005"])

    assert admin("purge", "--execution", EXECUTION, "--yes", cache_dir=cache_dir).code == 0
    again = fetch(live_server, "arr_9e0003", scope="execution", scope_id=EXECUTION)
    assert again.headers["x-cache"] == "MISS"
    assert fetch(live_server, "img_9e0004").headers["x-cache"] == "HIT"

    assert admin("purge", "--session", SESSION, "--yes", cache_dir=cache_dir).out.startswith(
        "removed 4 entries"
    )
    for object_id in ("arr_9e0001", "arr_9e0002", "img_9e0004", "arr_9e0005"):
        assert refetched(live_server, standin, object_id, bodies[object_id]), object_id

    assert admin("purge", "--all", "--yes", cache_dir=cache_dir).out.startswith("removed 5 entries")
    stats = admin("stats", "--json", cache_dir=cache_dir).json()
    assert isinstance(stats, dict) and (stats["entries"], stats["bytes"]) == (0, 0)
    assert refetched(live_server, standin, "img_9e0004", bodies["img_9e0004"])


def test_purge_racing_a_fill_leaves_the_fill_a_fresh_whole_entry(
    standin: StandIn, proxy: ServerThread, cache_dir: Path
) -> None:
    """A purge while a fill is half-way removes what was committed before it; the fill then
    commits after it as a fresh entry with every byte, which the next request hits."""
    committed = standin.add("session", SESSION, "arr_4ace01", size=4_000)
    misses_then_hits(proxy, standin, "arr_4ace01")
    body = standin.add("session", SESSION, "arr_4ace02", size=600_000)
    release = threading.Event()
    standin.faults["arr_4ace02"] = Fault(hold_middle=release, times=1)
    streaming = threading.Event()
    received: list[bytes] = []
    headers: list[httpx.Headers] = []

    def download() -> None:
        with httpx.stream(
            "GET", artifact_url(proxy, "arr_4ace02"), headers=auth(), timeout=30
        ) as r:
            headers.append(r.headers)
            for data in r.iter_bytes():
                received.append(data)
                streaming.set()

    client = threading.Thread(target=download)
    client.start()
    try:
        assert streaming.wait(20)  # the fill is half-way: its first bytes reached the client
        purged = admin("purge", "--all", "--yes", cache_dir=cache_dir)
        assert purged.out.startswith("removed 1 entry, 4000 bytes"), purged
    finally:
        release.set()
        client.join(30)
    assert b"".join(received) == body and headers[0]["x-cache"] == "MISS"
    hit = fetch(proxy, "arr_4ace02")
    assert (hit.headers["x-cache"], hit.content) == ("HIT", body)
    assert standin.hits("session", SESSION, "arr_4ace02") == 1
    assert refetched(proxy, standin, "arr_4ace01", committed)


def test_purge_asks_only_on_a_terminal(
    standin: StandIn, proxy: ServerThread, cache_dir: Path
) -> None:
    """Without --yes and without a terminal, purge refuses (exit 1) and says why; nothing goes."""
    standin.add("session", SESSION, "arr_a5c001", size=100)
    misses_then_hits(proxy, standin, "arr_a5c001")
    refused = admin("purge", "--all", cache_dir=cache_dir)
    assert refused.code == 1
    assert "without a terminal to ask on, give --yes" in refused.err
    assert fetch(proxy, "arr_a5c001").headers["x-cache"] == "HIT"
    assert admin("purge", "--session", "sess_nothing", cache_dir=cache_dir).out == (
        "nothing to remove\n"
    )


# -- verify --------------------------------------------------------------------------------------


def test_verify_removes_truncated_garbage_and_missing_entries(
    standin: StandIn, live_server: Daemon, cache_dir: Path
) -> None:
    """verify re-hashes every entry: a truncated file, same-size garbage and a missing file are
    reported, removed and never served again (the next request refetches); intact ones stay."""
    bodies = {}
    for object_id, size in (
        ("arr_5e0001", 300_000),  # streamed hits
        ("arr_5e0002", 2_000),  # small: held in the memory tier too
        ("arr_5e0003", 2_000),
        ("arr_5e0004", 2_000),
    ):
        standin.add("session", SESSION, object_id, size=size)
        bodies[object_id] = misses_then_hits(live_server, standin, object_id)
    with open(stored_file(cache_dir, "arr_5e0001"), "r+b") as file:
        file.truncate(100_000)
    with open(stored_file(cache_dir, "arr_5e0002"), "r+b") as file:  # in place: same inode
        file.write(b"\0" * 2_000)
    stored_file(cache_dir, "arr_5e0003").unlink()

    report = admin("verify", "--json", cache_dir=cache_dir)
    assert report.code == 1, report
    found = report.json()
    assert isinstance(found, dict) and found["checked"] == 4 and found["removed"] == 3
    assert {d["object_id"]: d["problem"] for d in found["damaged"]} == {
        "arr_5e0001": "length",
        "arr_5e0002": "digest",
        "arr_5e0003": "missing",
    }
    for object_id in ("arr_5e0001", "arr_5e0002", "arr_5e0003"):
        assert refetched(live_server, standin, object_id, bodies[object_id]), object_id
    assert fetch(live_server, "arr_5e0004").headers["x-cache"] == "HIT"
    clean = admin("verify", cache_dir=cache_dir)
    assert (
        clean.code == 0 and clean.out.startswith("verified 4 entries") and "all intact" in clean.out
    )


# -- revoke --------------------------------------------------------------------------------------


def test_revoke_sends_the_next_hit_back_to_the_api(
    standin: StandIn, live_server: Daemon, cache_dir: Path, tmp_path: Path
) -> None:
    """After revoke --key-file, that key's next hit is checked with the API again (other keys
    keep their proofs); after revoke --all, every key's is; new proofs then count as before."""
    standin.grant(OTHER_TOKEN, "session", SESSION)
    body = standin.add("session", SESSION, "arr_4e0001", size=2_000)
    misses_then_hits(live_server, standin, "arr_4e0001")
    assert fetch(live_server, "arr_4e0001", OTHER_TOKEN).content == body
    checks = standin.hits("session", SESSION, "arr_4e0001")

    def checked_again(token: str) -> bool:
        nonlocal checks
        response = fetch(live_server, "arr_4e0001", token)
        assert (response.headers["x-cache"], response.content) == ("HIT", body)
        before, checks = checks, standin.hits("session", SESSION, "arr_4e0001")
        return checks == before + 1

    key_file = tmp_path / "key"
    key_file.write_text(TOKEN + "\n")
    revoked = admin("revoke", "--key-file", str(key_file), cache_dir=cache_dir)
    assert revoked.code == 0 and "revoked the access proofs" in revoked.out
    assert TOKEN not in revoked.out + revoked.err
    assert checked_again(TOKEN)
    assert not checked_again(TOKEN)  # proven again
    assert not checked_again(OTHER_TOKEN)
    assert admin("revoke", "--all", cache_dir=cache_dir).code == 0
    assert checked_again(OTHER_TOKEN) and checked_again(TOKEN)
    assert not checked_again(TOKEN)


def test_revoke_without_any_proof_changes_nothing(tmp_path: Path) -> None:
    """A cache that never recorded a proof has no secret: revoke --key-file says there is
    nothing to revoke, and creates neither a secret nor a revocation."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    key_file = tmp_path / "key"
    key_file.write_text(TOKEN)
    ran = admin("revoke", "--key-file", str(key_file), cache_dir=cache_dir)
    assert ran.code == 0 and "nothing to do" in ran.out
    assert list(cache_dir.iterdir()) == []


# -- opening the cache ---------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under ``root`` with its mode and a file's content (SQLite's shared-memory and
    journal files aside: readers may create and use them)."""
    found = {}
    for path in [root, *sorted(root.rglob("*"))]:
        if path.name.endswith(("-wal", "-shm")):
            continue
        info = path.lstat()
        content = path.read_bytes() if path.is_file() else None
        found[str(path.relative_to(root))] = (info.st_mode, content)
    return found


def test_commands_open_a_cache_without_side_effects(
    standin: StandIn, upstream: ServerThread, cache_dir: Path
) -> None:
    """stats, ls, verify and an empty purge change nothing in the cache directory: no sweep (a
    crashed fill's file stays for the server's), no chmod, no new secret or database."""
    daemon = Daemon("--upstream", upstream.url, "--cache-dir", str(cache_dir))
    assert daemon.started(), daemon.output
    misses_then_hits(daemon, standin, "img_0e0001")
    assert daemon.stop()  # its databases closed: nothing changes them any more
    crashed = cache_dir / "tmp" / "crashed.fill"
    crashed.write_bytes(b"half")
    (cache_dir / "secret").chmod(0o400)
    before = _snapshot(cache_dir)
    for command in (["stats"], ["ls"], ["verify"], ["purge", "--object", "none", "--yes"]):
        assert admin(*command, cache_dir=cache_dir).code == 0, command
    assert _snapshot(cache_dir) == before


def test_a_missing_cache_directory_is_an_error_and_not_created(tmp_path: Path) -> None:
    """Every command on a cache directory that does not exist exits 2 and creates nothing."""
    missing = tmp_path / "nowhere" / "cache"
    for command in (
        ["stats"],
        ["ls"],
        ["verify"],
        ["purge", "--all", "--yes"],
        ["revoke", "--all"],
    ):
        ran = admin(*command, cache_dir=missing)
        assert ran.code == 2, command
        assert f"{missing} does not exist" in ran.err
    assert not (tmp_path / "nowhere").exists()


def test_a_damaged_index_is_reported_and_left_for_the_server(tmp_path: Path) -> None:
    """A garbage cache database is reported (exit 1), not moved aside or reset."""
    cache_dir = tmp_path / "cache"
    (cache_dir / "entries").mkdir(parents=True, mode=0o700)
    cache_dir.chmod(0o700)
    (cache_dir / "entries" / "cache.db").write_bytes(b"garbage " * 512)
    before = _snapshot(cache_dir)
    for command in (["stats"], ["verify"], ["purge", "--all", "--yes"]):
        ran = admin(*command, cache_dir=cache_dir)
        assert ran.code == 1 and "cannot be used" in ran.err and "nothing was changed" in ran.err
    assert _snapshot(cache_dir) == before


def test_exit_codes_are_documented_in_help() -> None:
    """Each command's --help states the exit codes; a usage error exits 2."""
    for command in ("stats", "ls", "purge", "verify", "warm", "revoke"):
        shown = admin(command, "--help")
        assert shown.code == 0
        assert "exit status:\n  0  done\n  1  found a problem or refused" in shown.out
        assert "\n  2  usage or configuration" in shown.out
    assert admin("purge").code == 2  # a selector is required
    assert admin("purge", "--older-than", "soon", "--yes").code == 2


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory away needs root")
def test_a_command_on_another_users_cache_refuses(tmp_path: Path) -> None:
    """Run as root against a directory another user owns (``sudo`` on the container's cache),
    a command refuses, says whose it is and how to run it, and writes nothing."""
    cache_dir = tmp_path / "theirs"
    cache_dir.mkdir(mode=0o700)
    os.chown(cache_dir, 65534, 65534)
    for command in (["stats"], ["revoke", "--all"]):
        ran = admin(*command, cache_dir=cache_dir)
        assert ran.code == 1
        assert (
            "belongs to" in ran.err and "uid 65534" in ran.err and "Run it as the owner" in ran.err
        )
    assert list(cache_dir.iterdir()) == []


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another user needs root")
def test_a_command_run_by_another_user_refuses(standin: StandIn, upstream: ServerThread) -> None:
    """A command run by another user (nobody) against the cache a running server uses refuses,
    says whose the directory is and how to run it, and leaves nothing behind."""
    base = Path(tempfile.mkdtemp(prefix="vlmrun-cache-admin-"))  # pytest's own is 0700
    base.chmod(0o711)  # nobody may reach the cache directory, not read it
    cache_dir = base / "cache"
    daemon = Daemon("--upstream", upstream.url, "--cache-dir", str(cache_dir))
    try:
        assert daemon.started(), daemon.output
        misses_then_hits(daemon, standin, "arr_00b0d1")
        before = sorted(str(p) for p in cache_dir.rglob("*"))
        code, output = _as_nobody(["revoke", "--all", "--cache-dir", str(cache_dir)])
        assert code == 1, output
        assert f"{cache_dir} belongs to root (uid 0), and this command runs as nobody" in output
        assert "Run it as the owner" in output
        assert sorted(str(p) for p in cache_dir.rglob("*")) == before
        assert fetch(daemon, "arr_00b0d1").headers["x-cache"] == "HIT"
    finally:
        assert daemon.stop()
        shutil.rmtree(base)


def _as_nobody(argv: list[str]) -> tuple[int, str]:
    """Run ``vlmrun-cache <argv>`` in a forked child switched to the user nobody (an exec would
    need an interpreter that user can reach); its exit status and output."""
    nobody = 65534
    readable, writable = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: we only run main
        pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(readable)
            os.setgroups([])
            os.setgid(nobody)
            os.setuid(nobody)
            output = io.StringIO()
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                code = main(argv)
            os.write(writable, output.getvalue().encode())
        finally:
            os._exit(code)
    os.close(writable)
    with os.fdopen(readable, "rb") as source:
        output_bytes = source.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output_bytes.decode()
