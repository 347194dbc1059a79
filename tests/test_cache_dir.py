"""The cache directory is ours alone: never chmod'ed when it exists, no symlink inside followed."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from proxy.access import AccessProofs
from proxy.config import load
from proxy.metrics import Metrics
from proxy.services import CacheDirError, Services, inspect_directory, prepare_directory
from proxy.store.disk import DiskStore
from tests.conftest import SESSION
from tests.helpers import auth
from tests.servers import Daemon, ServerThread
from tests.standin import StandIn

StartDaemon = Callable[[Path], Daemon]


@pytest.fixture
def start_daemon(upstream: ServerThread) -> Iterator[StartDaemon]:
    """Start ``python -m proxy serve`` on a cache directory; all are killed at the end."""
    started: list[Daemon] = []

    def start(cache_dir: Path) -> Daemon:
        daemon = Daemon("--upstream", upstream.url, "--cache-dir", str(cache_dir))
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.kill()


def _refused(daemon: Daemon) -> str:
    """The daemon's output, once it has exited without serving; asserts a clean refusal."""
    assert not daemon.started(), daemon.output
    daemon.stop(signalled=True)
    assert daemon.process.returncode == 2, daemon.output
    assert "Traceback" not in daemon.output
    lines = daemon.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlmrun-cache: invalid setting cache_dir: ")
    return lines[0]


def _snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under ``root`` (itself included), with its mode and a file's content."""
    found = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(info.st_mode) else None
        found[str(path.relative_to(root))] = (info.st_mode, content)
    return found


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the cache, holding files an attacker would like touched."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "x.fill").write_bytes(b"someone else's file\n")
    (directory / "x.fill").chmod(0o644)
    (directory / "secret").write_text("ab" * 32)
    (directory / "secret").chmod(0o644)
    (directory / "00").mkdir()
    (directory / "00" / "old.val").write_bytes(b"not a cache entry\n")
    old = time.time() - 7 * 86400
    os.utime(directory / "00" / "old.val", (old, old))
    return directory


def _umask() -> int:
    """This process's umask, read without changing it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask line in /proc/self/status")


# -- the directory itself ------------------------------------------------------------------------


def test_world_writable_directory_is_refused_and_left_as_it_was(
    tmp_path: Path, start_daemon: StartDaemon
) -> None:
    """A 1777 directory (like /tmp) as cache_dir stops start-up with exit 2; its mode is kept."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "someone.txt").write_text("hello\n")
    before = _snapshot(shared)
    message = _refused(start_daemon(shared))
    assert "writable by group or others" in message and str(shared) in message
    assert _snapshot(shared) == before


def test_group_writable_directory_is_refused_in_process_too(tmp_path: Path) -> None:
    """Services.open refuses the same directory before opening anything in it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o770)
    config = load(env={}, flags={"cache_dir": str(shared)})
    with pytest.raises(CacheDirError, match=r"^cache_dir: .*writable by group or others"):
        asyncio.run(Services(config, Metrics()).open())
    assert stat.S_IMODE(shared.stat().st_mode) == 0o770
    assert list(shared.iterdir()) == []


def test_a_file_as_cache_dir_is_refused(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """cache_dir naming a regular file stops start-up with exit 2."""
    file = tmp_path / "file"
    file.write_text("data\n")
    assert "not a directory" in _refused(start_daemon(file))
    assert file.read_text() == "data\n"


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory away needs root")
def test_someone_elses_directory_is_refused(tmp_path: Path) -> None:
    """A directory owned by another user is refused, even when only its owner can write it."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 12345, 12345)
    with pytest.raises(CacheDirError, match=r"^cache_dir: .* belongs to uid 12345"):
        prepare_directory(str(theirs))
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o755 and list(theirs.iterdir()) == []


def test_missing_directory_is_created_owner_only(
    tmp_path: Path, standin: StandIn, start_daemon: StartDaemon
) -> None:
    """A missing cache_dir is created 0700 (parents with the default mode), its parts 0700/0600."""
    cache_dir = tmp_path / "a" / "b" / "cache"
    daemon = start_daemon(cache_dir)
    assert daemon.started(), daemon.output
    body = standin.add("session", SESSION, "img_0c0ffe")
    url = f"{daemon.url}/v1/artifacts?object_id=img_0c0ffe&session_id={SESSION}"
    assert httpx.get(url, headers=auth(), timeout=20).content == body
    assert daemon.stop()
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o777 & ~_umask()
    for name in ("tmp", "entries", "access", "locks"):
        assert stat.S_IMODE((cache_dir / name).lstat().st_mode) == 0o700, name
    assert stat.S_IMODE((cache_dir / "secret").lstat().st_mode) == 0o600


def test_existing_private_0755_directory_is_used_as_is(
    tmp_path: Path, standin: StandIn, start_daemon: StartDaemon
) -> None:
    """An existing 0755 directory of ours is accepted unchanged; nothing in it is readable by
    others."""
    cache_dir = tmp_path / "mine"
    cache_dir.mkdir()
    cache_dir.chmod(0o755)
    daemon = start_daemon(cache_dir)
    assert daemon.started(), daemon.output
    body = standin.add("session", SESSION, "img_755755")
    url = f"{daemon.url}/v1/artifacts?object_id=img_755755&session_id={SESSION}"
    assert httpx.get(url, headers=auth(), timeout=20).content == body
    assert daemon.stop()
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o755
    # Others may list the directory; every name in it keeps them out of what lies below.
    for path in cache_dir.iterdir():
        assert stat.S_IMODE(path.lstat().st_mode) & 0o077 == 0, path


def test_loose_subdirectories_of_ours_are_tightened(tmp_path: Path) -> None:
    """Subdirectories the proxy keeps, found 0755 (older versions), are made 0700."""
    cache_dir = tmp_path / "mine"
    (cache_dir / "entries").mkdir(parents=True, mode=0o755)
    (cache_dir / "entries").chmod(0o755)
    prepare_directory(str(cache_dir))
    assert stat.S_IMODE((cache_dir / "entries").stat().st_mode) == 0o700


def test_cache_dir_itself_may_be_a_symlink(tmp_path: Path) -> None:
    """A symlink as cache_dir is the user's choice: its private target is used."""
    target = tmp_path / "real"
    target.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(target)
    assert prepare_directory(str(tmp_path / "link")) == tmp_path / "link"
    AccessProofs(tmp_path / "link", ttl=60).close()
    assert (target / "secret").is_file()


def test_a_file_in_the_way_is_named(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """A regular file where cache_dir needs a parent directory stops start-up with exit 2 and a
    message naming that file and the setting to change."""
    (tmp_path / "data").write_text("not a directory\n")
    message = _refused(start_daemon(tmp_path / "data" / "cache"))
    assert f"{tmp_path / 'data'} is a file, not a directory" in message
    assert "VLMRUN_CACHE_CACHE_DIR" in message and "--cache-dir" in message


@pytest.mark.parametrize("below", [False, True], ids=["existing", "to-create"])
def test_a_read_only_directory_is_refused(
    below: bool, read_only_mount: Path, start_daemon: StartDaemon
) -> None:
    """An existing directory on a read-only file system, or a new one to create there, stops
    start-up with exit 2 and says so (root ignores permission bits: a read-only mount does not)."""
    cache_dir = read_only_mount / "cache" if below else read_only_mount
    message = _refused(start_daemon(cache_dir))
    assert f"{cache_dir}" in message and "read-only file system" in message
    assert "VLMRUN_CACHE_CACHE_DIR" in message


def _prepare_as(uid: int, path: Path) -> str:
    """``prepare_directory(path)`` in a forked child running as ``uid``: its refusal, or ""."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            os.close(read)
            os.setgid(uid)
            os.setuid(uid)
            try:
                prepare_directory(str(path))
                message = ""
            except CacheDirError as exc:
                message = str(exc)
            os.write(write, message.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    return message


@pytest.fixture
def nobody() -> int:
    if os.getuid() != 0:
        pytest.skip("switching to another user needs root")
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        pytest.skip("no user nobody")


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A root-owned 0755 directory every user can enter (pytest's tmp_path is root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="cache-dir-test-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


def test_a_directory_without_write_permission_is_refused(nobody: int, reachable: Path) -> None:
    """A cache directory of the user's own that they cannot write (0500) is refused, naming it."""
    theirs = reachable / "theirs"
    theirs.mkdir(mode=0o500)
    os.chown(theirs, nobody, nobody)
    message = _prepare_as(nobody, theirs)
    assert message.startswith(f"cache_dir: {theirs} does not take writes: no permission")
    assert "VLMRUN_CACHE_CACHE_DIR" in message
    assert list(theirs.iterdir()) == []


def test_a_directory_that_cannot_be_created_is_refused(nobody: int, reachable: Path) -> None:
    """A missing cache directory in a parent the user may not write is refused, naming it."""
    message = _prepare_as(nobody, reachable / "cache")
    assert message.startswith(f"cache_dir: cannot create {reachable / 'cache'}: no permission")
    assert not (reachable / "cache").exists()


def test_the_write_check_leaves_nothing_behind(tmp_path: Path) -> None:
    """Checking that the directory takes writes leaves no file in it."""
    prepare_directory(str(tmp_path / "cache"))
    assert list((tmp_path / "cache").iterdir()) == []


# -- names inside it -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tmp", "entries", "access", "locks"])
def test_symlinked_subdirectory_is_refused_and_outside_untouched(
    name: str, tmp_path: Path, outside: Path, start_daemon: StartDaemon
) -> None:
    """A symlink named like one of our directories stops start-up; its target is untouched."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    (cache_dir / name).symlink_to(outside)
    before = _snapshot(outside)
    message = _refused(start_daemon(cache_dir))
    assert f"{cache_dir / name} is a symbolic link" in message
    assert _snapshot(outside) == before


def test_symlinked_secret_is_refused_and_its_target_untouched(
    tmp_path: Path, outside: Path, start_daemon: StartDaemon
) -> None:
    """A symlinked secret stops start-up: its 0644 target is neither chmod'ed nor read."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    (cache_dir / "secret").symlink_to(outside / "secret")
    before = _snapshot(outside)
    message = _refused(start_daemon(cache_dir))
    assert f"{cache_dir / 'secret'} is a symbolic link" in message
    assert _snapshot(outside) == before


@pytest.mark.parametrize(("name", "make"), [("tmp", "file"), ("secret", "dir")])
def test_wrong_type_is_refused(name: str, make: str, tmp_path: Path) -> None:
    """A file where we keep a directory, or a directory where we keep the secret, is refused."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    if make == "file":
        (cache_dir / name).write_text("x")
    else:
        (cache_dir / name).mkdir()
    with pytest.raises(CacheDirError, match=rf"^cache_dir: {cache_dir / name} is not a "):
        prepare_directory(str(cache_dir))


def test_access_proofs_never_follow_a_symlinked_secret(tmp_path: Path, outside: Path) -> None:
    """Even unguarded, the secret is opened without following links: the target stays 0644."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    (cache_dir / "secret").symlink_to(outside / "secret")
    before = _snapshot(outside)
    with pytest.raises(OSError):
        AccessProofs(cache_dir, ttl=60)
    assert _snapshot(outside) == before


def test_loose_secret_of_ours_is_made_owner_only(tmp_path: Path) -> None:
    """An existing secret file readable by others is set to 0600 and still used."""
    first = AccessProofs(tmp_path, ttl=60)
    fingerprint = first.fingerprint("Bearer t")
    first.close()
    (tmp_path / "secret").chmod(0o644)
    again = AccessProofs(tmp_path, ttl=60)
    assert again.fingerprint("Bearer t") == fingerprint
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600


def test_store_never_sweeps_through_a_symlinked_tmp(tmp_path: Path, outside: Path) -> None:
    """Even unguarded, the disk tier refuses a symlinked tmp/ rather than sweep its target."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    (cache_dir / "tmp").symlink_to(outside)
    before = _snapshot(outside)
    store = DiskStore(cache_dir, max_bytes=1_000_000, max_object_bytes=1_000_000)
    with pytest.raises(OSError):
        store.sweep_temporary()
    assert _snapshot(outside) == before


def test_orphan_sweep_never_descends_through_a_symlink(tmp_path: Path, outside: Path) -> None:
    """A symlinked directory inside entries/ is not walked: an old outside .val file survives."""
    cache_dir = tmp_path / "cache"
    store = DiskStore(cache_dir, max_bytes=1_000_000, max_object_bytes=1_000_000)
    (cache_dir / "entries" / "zz").symlink_to(outside / "00")
    (cache_dir / "entries" / "evil.val").symlink_to(outside / "00" / "old.val")
    before = _snapshot(outside)
    store.sweep_orphans(min_age=0)
    store.close()
    assert _snapshot(outside) == before


def test_symlinked_revocation_list_is_refused(tmp_path: Path, outside: Path) -> None:
    """A symlinked revocations.jsonl stops start-up and the operator's commands alike; what it
    points to is never read or written."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    (cache_dir / "revocations.jsonl").symlink_to(outside / "x.fill")
    before = _snapshot(outside)
    for check in (prepare_directory, inspect_directory):
        with pytest.raises(CacheDirError, match=r"revocations\.jsonl is a symbolic link"):
            check(str(cache_dir))
    assert _snapshot(outside) == before
