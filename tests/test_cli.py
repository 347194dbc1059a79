"""The command line: ``python -m proxy serve`` as a real process, and start-up validation."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.cli import METRICS_DIR_PREFIX, remove_stale_metrics_dirs
from tests.conftest import SESSION, TOKEN
from tests.helpers import auth
from tests.servers import Daemon, ServerThread
from tests.standin import StandIn


@pytest.fixture
def daemon(upstream: ServerThread, cache_dir: Path) -> Iterator[Daemon]:
    process = Daemon(
        "--upstream", upstream.url, "--cache-dir", str(cache_dir), "--log-level", "debug"
    )
    assert process.started(), process.output
    yield process
    if process.process.poll() is None:
        process.stop()


def test_serve_runs_answers_health_and_caches(
    standin: StandIn, daemon: Daemon, cache_dir: Path
) -> None:
    """The daemon starts, reports healthy and ready, caches, and stops cleanly on SIGTERM."""
    assert httpx.get(f"{daemon.url}/healthz").status_code == 200
    assert httpx.get(f"{daemon.url}/readyz").json() == {"status": "ready"}
    body = standin.add("session", SESSION, "arr_c11c11", size=100_000)
    url = f"{daemon.url}/v1/artifacts?object_id=arr_c11c11&session_id={SESSION}"
    assert httpx.get(url, headers=auth()).content == body
    assert httpx.get(url, headers=auth()).headers["x-cache"] == "HIT"
    assert daemon.stop()


def test_secrets_stay_out_of_logs_metrics_and_disk(
    standin: StandIn, daemon: Daemon, cache_dir: Path
) -> None:
    """After hits, misses, refusals and passthrough at debug level, the token is nowhere."""
    standin.add("session", SESSION, "img_5ec4e7")
    url = f"{daemon.url}/v1/artifacts?object_id=img_5ec4e7&session_id={SESSION}"
    for token in (TOKEN, TOKEN, "key-wrong-999"):
        httpx.get(url, headers=auth(token))
    httpx.get(f"{daemon.url}/v1/health", headers=auth())
    metrics = httpx.get(f"{daemon.url}/metrics").text
    assert daemon.stop()
    for secret in (TOKEN, "key-wrong-999"):
        assert secret not in daemon.output
        assert secret not in metrics
        for path in cache_dir.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    assert SESSION not in metrics and "img_5ec4e7" not in metrics
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((cache_dir / "secret").stat().st_mode) == 0o600


def test_listens_on_loopback_by_default(daemon: Daemon) -> None:
    """Without --host, the listening socket is bound to 127.0.0.1 only."""
    port_hex = f"{daemon.port:04X}"
    listening = [
        line.split()[1]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if line.split()[1].endswith(":" + port_hex) and line.split()[3] == "0A"
    ]
    assert listening == [f"0100007F:{port_hex}"]


@pytest.mark.parametrize(
    ("args", "env", "key"),
    [
        (["--max-size", "lots"], {}, "max_size"),
        ([], {"VLMRUN_CACHE_PORT": "http"}, "port"),
        (["--upstream", "api.vlm.run"], {}, "upstream"),
    ],
)
def test_invalid_setting_stops_start_up_naming_the_key(
    args: list[str], env: dict[str, str], key: str
) -> None:
    """Start-up fails with exit code 2 and a message that names the offending key."""
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"invalid setting {key}:" in result.stderr


def test_a_bad_environment_value_names_the_variable() -> None:
    """VLMRUN_CACHE_PORT=abc stops start-up with exit 2, one line naming the variable, no
    traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve"],
        capture_output=True,
        text=True,
        env={**os.environ, "VLMRUN_CACHE_PORT": "abc"},
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "vlmrun-cache: invalid setting port: 'abc' is not a whole number "
        "(from environment variable VLMRUN_CACHE_PORT)"
    )


def test_stale_metrics_directories_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Metrics directories left by a dead parent are removed; a live one's are kept."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead_pid = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    stale = tmp_path / f"{METRICS_DIR_PREFIX}{dead_pid}-x1"
    live = tmp_path / f"{METRICS_DIR_PREFIX}{os.getpid()}-x2"
    stale.mkdir()
    live.mkdir()
    remove_stale_metrics_dirs()
    assert not stale.exists() and live.exists()
