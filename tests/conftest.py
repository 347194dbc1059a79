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
from tests.redisserver import RedisServer
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


def _tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A tmpfs of ours mounted at ``mount`` (created) for the test; skips where mounting is not
    allowed. Unmounted lazily: the test process may still hold files open in worker threads."""
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"{options},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: {mounted.stderr!r}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """An empty directory of ours (0700) on a read-only tmpfs (root ignores permission bits;
    a read-only mount stops it too). Skips where mounting is not allowed."""
    yield from _tmpfs(tmp_path / "read-only", "ro,size=1m")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of ours (0700), to fill up. Skips where mounting is not allowed."""
    yield from _tmpfs(tmp_path / "small-disk", "size=16m")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real, empty ``redis-server`` on a loopback port (see tests/redisserver.py)."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def shared_secret_file(tmp_path: Path) -> Path:
    """The one secret every replica of a test reads (``secret_file``)."""
    path = tmp_path / "shared-secret"
    path.write_text("0123456789abcdef" * 4 + "\n")
    return path


@pytest.fixture
def start_replica(
    start_proxy: ProxyFactory, redis_server: RedisServer, shared_secret_file: Path, tmp_path: Path
) -> ProxyFactory:
    """Start a proxy with a cache directory of its own, sharing ``redis_server`` and the secret
    with every other replica of the test (settings as keyword overrides). ``redis_timeout`` is
    1 s unless a test sets it: on a loaded machine 50 ms can pass without any fault, and tests
    of faults give the real default themselves."""
    started = [0]

    def start(**overrides: object) -> ServerThread:
        started[0] += 1
        settings: dict[str, object] = {
            "cache_dir": str(tmp_path / f"replica-{started[0]}"),
            "redis_url": redis_server.url,
            "secret_file": str(shared_secret_file),
            "redis_timeout": "1s",
        }
        return start_proxy(**{**settings, **overrides})

    return start
