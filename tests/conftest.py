"""Fixtures: a stand-in upstream and the proxy, both real HTTP servers on loopback ports."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The SDK creates its own file cache at import time; keep it out of the user's home.
os.environ.setdefault("VLMRUN_CACHE_DIR", tempfile.mkdtemp(prefix="vlmrun-sdk-cache-"))

from proxy.app import create_app
from proxy.cli import uvicorn_options
from proxy.config import load
from tests.servers import Daemon, ServerThread
from tests.standin import StandIn

TOKEN = "key-alice-0001"
OTHER_TOKEN = "key-bob-0002"
SESSION = "sess_4f1c2a"
EXECUTION = "exec_9d8e7f"


@pytest.fixture
def standin() -> StandIn:
    api = StandIn()
    api.grant(TOKEN, "session", SESSION)
    api.grant(TOKEN, "execution", EXECUTION)
    api.add_token(OTHER_TOKEN)
    return api


@pytest.fixture
def upstream(standin: StandIn) -> Iterator[ServerThread]:
    server = ServerThread(standin).start()
    yield server
    server.stop()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


ProxyFactory = Callable[..., ServerThread]


@pytest.fixture
def start_proxy(upstream: ServerThread, cache_dir: Path) -> Iterator[ProxyFactory]:
    """Start a proxy (settings as keyword overrides); all are stopped at the end of the test."""
    started: list[ServerThread] = []

    def start(**overrides: object) -> ServerThread:
        settings: dict[str, object] = {"upstream": upstream.url, "cache_dir": str(cache_dir)}
        settings.update(overrides)
        config = load(env={}, flags=settings)
        server = ServerThread(create_app(config), **uvicorn_options(config))
        started.append(server.start())
        return server

    yield start
    for server in started:
        if server.thread.is_alive():
            server.stop()


@pytest.fixture
def proxy(start_proxy: ProxyFactory) -> ServerThread:
    return start_proxy()


@pytest.fixture(params=[1, 2], ids=["1-worker", "2-workers"])
def live_server(
    request: pytest.FixtureRequest, upstream: ServerThread, cache_dir: Path
) -> Iterator[Daemon]:
    """``vlmrun-cache serve`` with one or two workers on ``cache_dir``."""
    daemon = Daemon(
        "--upstream", upstream.url, "--cache-dir", str(cache_dir), "--workers", str(request.param)
    )
    assert daemon.started(), daemon.output
    yield daemon
    # Shown by pytest only when the test fails: what the server said meanwhile.
    print(f"--- vlmrun-cache serve --workers {request.param} ---\n{daemon.output}")
    if daemon.process.poll() is None:
        assert daemon.stop(), daemon.output


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """An empty directory of ours (0700) on a read-only tmpfs (root ignores permission bits;
    a read-only mount stops it too). Skips where mounting is not allowed."""
    mount = tmp_path / "read-only"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,mode=0700,size=1m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr!r}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)
