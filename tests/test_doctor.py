"""``vlmrun-cache doctor``: one line per check, exit 1 on any problem, nothing disturbed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.config import format_size
from tests.conftest import SESSION, ProxyFactory
from tests.helpers import fetch
from tests.servers import Daemon, ServerThread
from tests.standin import StandIn

Doctor = Callable[..., tuple[int, dict[str, str], str]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _closed_origin() -> str:
    """An http origin on loopback where nothing listens."""
    return f"http://127.0.0.1:{_free_port()}"


@pytest.fixture
def doctor(upstream: ServerThread, cache_dir: Path) -> Doctor:
    """Run ``python -m proxy doctor`` (the stand-in upstream, the test's cache directory and a
    free port unless overridden): (exit status, {check: its line}, whole output)."""

    def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        defaults = ["--upstream", upstream.url, "--cache-dir", str(cache_dir)]
        defaults += ["--port", str(_free_port())]
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "doctor", *defaults, *args],
            capture_output=True,
            text=True,
            env={**env} if env is not None else None,
            timeout=60,
            check=False,
        )
        assert result.stderr == "" and "Traceback" not in result.stdout, result
        lines = {}
        for line in result.stdout.splitlines()[:-1]:
            verdict, name, detail = line.split(maxsplit=2)
            lines[name] = f"{verdict} {detail}"
        return result.returncode, lines, result.stdout

    return run


def test_a_healthy_setup_passes_without_creating_anything(
    doctor: Doctor, upstream: ServerThread, cache_dir: Path
) -> None:
    """With a reachable API (its 401 without a key counts) and a cache directory that serve
    can create, every check is ok, the exit status is 0 and the directory is still missing."""
    code, lines, output = doctor()
    assert code == 0, output
    assert list(lines) == ["config", "listen", "cache_dir", "disk", "upstream"]
    assert all(line.startswith("ok ") for line in lines.values()), output
    assert "< flags (--port, --upstream, --cache-dir)" in lines["config"]
    # conftest sets the SDK's VLMRUN_CACHE_DIR, a known mix-up with ours:
    assert "VLMRUN_CACHE_DIR is the SDK's own cache" in lines["config"]
    assert "export VLMRUN_BASE_URL=http://127.0.0.1:" in lines["listen"]
    assert "does not exist yet; serve creates it" in lines["cache_dir"]
    assert lines["upstream"].startswith(f"ok {upstream.url} reachable in ")
    assert output.endswith("all checks passed: vlmrun-cache serve should start here\n")
    assert not cache_dir.exists()


def test_beside_a_running_proxy_it_reads_the_index_and_changes_nothing(
    doctor: Doctor, standin: StandIn, start_proxy: ProxyFactory, cache_dir: Path
) -> None:
    """On the cache of a running proxy, doctor counts the entries read-only; the secret, the
    entries and the proxy's hits are as they were."""
    proxy = start_proxy()
    body = standin.add("session", SESSION, "img_d0c70a")
    assert fetch(proxy, "img_d0c70a").content == body
    secret = (cache_dir / "secret").read_bytes()
    names = sorted(path.name for path in cache_dir.iterdir())
    code, lines, output = doctor()
    assert code == 0, output
    assert lines["cache_dir"] == f"ok {cache_dir}: private to this user, takes writes"
    assert lines["index"].startswith(f"ok 1 entry, {format_size(len(body))} of 10 GiB")
    assert (cache_dir / "secret").read_bytes() == secret
    assert sorted(path.name for path in cache_dir.iterdir()) == names
    hit = fetch(proxy, "img_d0c70a")
    assert (hit.headers["x-cache"], hit.content) == ("HIT", body)


def test_a_port_held_by_a_running_proxy_is_fine(
    doctor: Doctor, upstream: ServerThread, cache_dir: Path
) -> None:
    """A port in use by a proxy that answers /healthz is reported as that proxy, not a clash;
    a port held by something else is a problem naming the port setting."""
    daemon = Daemon("--upstream", upstream.url, "--cache-dir", str(cache_dir))
    try:
        assert daemon.started(), daemon.output
        code, lines, output = doctor("--port", str(daemon.port))
        assert code == 0, output
        assert lines["listen"].startswith(f"ok a proxy already answers at {daemon.url}")
    finally:
        assert daemon.stop()
    with socket.create_server(("127.0.0.1", 0)) as other:
        code, lines, output = doctor("--port", str(other.getsockname()[1]))
    assert code == 1, output
    assert "in use by another program" in lines["listen"]
    assert "VLMRUN_CACHE_PORT, --port" in lines["listen"]


def test_an_unreachable_api_is_a_problem(doctor: Doctor) -> None:
    """An upstream where nothing listens fails the upstream check (exit 1), with the reason and
    the setting to change."""
    origin = _closed_origin()
    code, lines, output = doctor("--upstream", origin)
    assert code == 1
    assert lines["upstream"].startswith(f"problem {origin} unreachable (")
    assert "VLMRUN_CACHE_UPSTREAM, --upstream" in lines["upstream"]
    assert output.endswith("1 problem found\n")


def test_a_file_in_the_way_is_a_problem(doctor: Doctor, tmp_path: Path) -> None:
    """A regular file where the cache directory's parent should be fails the cache_dir check,
    naming the file and the setting; nothing is created."""
    (tmp_path / "data").write_text("x\n")
    code, lines, output = doctor("--cache-dir", str(tmp_path / "data" / "cache"))
    assert code == 1, output
    assert lines["cache_dir"].startswith(f"problem {tmp_path / 'data'} is a file, not a directory")
    assert "VLMRUN_CACHE_CACHE_DIR" in lines["cache_dir"]
    assert "index" not in lines


@pytest.mark.parametrize("below", [False, True], ids=["existing", "to-create"])
def test_a_read_only_directory_is_a_problem(
    below: bool, doctor: Doctor, read_only_mount: Path
) -> None:
    """A cache directory on a read-only file system, existing or still to create, fails the
    cache_dir check and says so."""
    cache_dir = read_only_mount / "cache" if below else read_only_mount
    code, lines, output = doctor("--cache-dir", str(cache_dir))
    assert code == 1, output
    assert lines["cache_dir"].startswith("problem ")
    assert "read-only file system" in lines["cache_dir"]


def test_a_damaged_index_is_a_problem_and_is_left_alone(doctor: Doctor, cache_dir: Path) -> None:
    """An index that does not open is reported (serve would set it aside); doctor leaves it."""
    (cache_dir / "entries").mkdir(parents=True, mode=0o700)
    (cache_dir / "entries" / "cache.db").write_bytes(b"not a database" * 100)
    code, lines, output = doctor()
    assert code == 1, output
    assert lines["index"].startswith("problem cannot read ")
    assert (cache_dir / "entries" / "cache.db").read_bytes() == b"not a database" * 100


def test_an_invalid_setting_is_a_problem_naming_the_variable(doctor: Doctor) -> None:
    """VLMRUN_CACHE_PORT=abc fails the config check with the variable's name, exit 1."""
    code, lines, _output = doctor(env={**os.environ, "VLMRUN_CACHE_PORT": "abc"})
    assert code == 1
    assert list(lines) == ["config"]
    assert lines["config"].startswith("problem port: 'abc' is not a whole number")
    assert "(from environment variable VLMRUN_CACHE_PORT)" in lines["config"]


def test_the_api_is_asked_without_credentials(doctor: Doctor, standin: StandIn) -> None:
    """The upstream check sends no Authorization header, even with the SDK's key in the
    environment."""
    code, _lines, output = doctor(env={**os.environ, "VLMRUN_API_KEY": "key-alice-0001"})
    assert code == 0, output
    seen = standin.headers_seen("/v1/health")
    assert len(seen) == 1 and "authorization" not in seen[0]
