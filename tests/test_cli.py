"""The command line: ``python -m proxy serve`` as a real process, and start-up validation."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from proxy.banner import client_base_url, listen_url
from proxy.cli import METRICS_DIR_PREFIX, remove_stale_metrics_dirs
from proxy.config import Config, format_size
from proxy.probe import check_upstream
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


# -- what a user sees first ----------------------------------------------------------------------


def test_bare_command_prints_help_that_leads_to_serve() -> None:
    """``vlmrun-cache`` alone prints the help (serve, the export line, doctor) on stdout and
    exits 2, without an argparse error."""
    result = subprocess.run(
        [sys.executable, "-m", "proxy"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2 and result.stderr == ""
    assert result.stdout.startswith("usage: vlmrun-cache")
    for text in ("vlmrun-cache serve", "export VLMRUN_BASE_URL=http://127.0.0.1:8080/v1", "doctor"):
        assert text in result.stdout


def test_start_up_says_where_it_listens_the_cache_the_api_and_what_to_export(
    standin: StandIn, daemon: Daemon, upstream: ServerThread, cache_dir: Path
) -> None:
    """The start-up lines name the address, the export line, the cache with its size and bound,
    and that the upstream answered (a 401 without a key counts); a restart counts the entries."""
    assert daemon.wait_for(f"upstream {upstream.url} reachable in "), daemon.output
    assert f"listening on http://127.0.0.1:{daemon.port}" in daemon.output
    assert f"export VLMRUN_BASE_URL=http://127.0.0.1:{daemon.port}/v1" in daemon.output
    assert f"cache {cache_dir}: 0 entries, 0 B of 10 GiB (max_size)" in daemon.output
    body = standin.add("session", SESSION, "arr_ba0e12", size=100_000)
    url = f"{daemon.url}/v1/artifacts?object_id=arr_ba0e12&session_id={SESSION}"
    assert httpx.get(url, headers=auth()).content == body
    assert daemon.stop()
    again = Daemon("--upstream", upstream.url, "--cache-dir", str(cache_dir), "--max-size", "1GiB")
    try:
        assert again.started(), again.output
        expected = f"cache {cache_dir}: 1 entry, {format_size(len(body))} of 1 GiB (max_size)"
        assert expected in again.output
    finally:
        assert again.stop()


def test_start_up_does_not_wait_for_an_upstream_that_never_answers(cache_dir: Path) -> None:
    """With an upstream that accepts connections but never answers, the proxy serves at once
    and reports the upstream unreachable when the 2 s check gives up."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # never accepts: connects, no answer
        origin = f"http://127.0.0.1:{silent.getsockname()[1]}"
        daemon = Daemon("--upstream", origin, "--cache-dir", str(cache_dir))
        try:
            assert daemon.started(), daemon.output
            assert "unreachable" not in daemon.output  # serving while the check still waits
            assert httpx.get(f"{daemon.url}/healthz").status_code == 200
            assert daemon.wait_for(f"upstream {origin} unreachable (no answer within 2 s)")
        finally:
            assert daemon.stop()


def test_an_unreachable_upstream_is_named_without_its_credentials(cache_dir: Path) -> None:
    """A refused connection is reported with its reason, and a password in the upstream URL is
    never printed."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    daemon = Daemon(
        "--upstream", f"http://user:s3cret-pw@127.0.0.1:{port}", "--cache-dir", str(cache_dir)
    )
    try:
        assert daemon.started(), daemon.output
        assert daemon.wait_for(f"upstream http://127.0.0.1:{port} unreachable ("), daemon.output
        assert "Connection refused" in daemon.output
    finally:
        assert daemon.stop()
    assert "s3cret-pw" not in daemon.output


ALL_INTERFACES = "0.0.0.0"  # noqa: S104 (a setting's value; nothing binds it)


@pytest.mark.parametrize(
    ("settings", "listening", "base"),
    [
        ({}, "http://127.0.0.1:8080", "http://127.0.0.1:8080/v1"),
        ({"host": ALL_INTERFACES, "port": 9000}, "http://0.0.0.0:9000", "http://127.0.0.1:9000/v1"),
        ({"host": "::"}, "http://[::]:8080", "http://127.0.0.1:8080/v1"),
        ({"host": "::1"}, "http://[::1]:8080", "http://[::1]:8080/v1"),
        (
            {"host": "cache.lan", "tls_certfile": "c.pem", "tls_keyfile": "k.pem"},
            "https://cache.lan:8080",
            "https://cache.lan:8080/v1",
        ),
    ],
)
def test_listening_address_and_export_line(
    settings: dict[str, object], listening: str, base: str
) -> None:
    """The address shown is where serve listens (https with TLS); the export line dials a
    wildcard address on 127.0.0.1 and keeps /v1."""
    config = Config(**settings)  # type: ignore[arg-type]
    assert (listen_url(config), client_base_url(config)) == (listening, base)


def test_an_upstream_error_status_is_reported_as_answered() -> None:
    """An upstream that answers /v1/health with a 503 is reported as answering 503, not as
    reachable."""

    async def down(_request: Request) -> Response:
        return PlainTextResponse("down", status_code=503)

    server = ServerThread(Starlette(routes=[Route("/v1/health", down)])).start()
    try:
        answer = check_upstream(server.url)
    finally:
        server.stop()
    assert answer.status == 503 and not answer.reachable
    assert answer.describe().startswith("answered 503 in ")


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--upstream", "http://127.0.0.1:9", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_taken_port_stops_start_up_saying_what_to_change(tmp_path: Path) -> None:
    """Another program on the port: exit 2 and one line saying what to change, before the
    banner announces an address it never gets and before the cache directory is created
    (uvicorn alone logs errno 98 and exits 3)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve("--port", str(port), "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 2
    assert result.stderr == (
        f"vlmrun-cache: cannot listen on http://127.0.0.1:{port}: in use by another program; "
        "change port (VLMRUN_CACHE_PORT, --port) or host (VLMRUN_CACHE_HOST, --host)\n"
    )
    assert not (tmp_path / "cache").exists()


def test_a_second_serve_leaves_the_running_one_alone(daemon: Daemon, cache_dir: Path) -> None:
    """serve run again where a proxy already listens says so, and the running server's record
    of its address (serve.json, which healthcheck and stats dial) stays as it was."""
    record = (cache_dir / "serve.json").read_bytes()
    result = _serve("--port", str(daemon.port), "--cache-dir", str(cache_dir))
    assert result.returncode == 2
    assert "a proxy already answers there (vlmrun-cache stats shows it)" in result.stderr
    assert "listening on" not in result.stderr
    assert (cache_dir / "serve.json").read_bytes() == record
    assert httpx.get(f"{daemon.url}/healthz").status_code == 200
