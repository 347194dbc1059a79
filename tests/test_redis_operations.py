"""Running with the shared tier: settings, start-up with Redis down, the password kept out of
every display, doctor, and the operator's stats and purge covering Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from proxy.config import ConfigError, load, redact_url
from tests.conftest import EXECUTION, SESSION, TOKEN, ProxyFactory
from tests.helpers import fetch, metric, wait_until
from tests.operators import admin
from tests.redisserver import RedisServer
from tests.servers import Daemon, ServerThread, _free_port
from tests.standin import StandIn

PASSWORD = "redis-pass-9f8e7d6c5b"


def test_redis_url_needs_a_shared_secret() -> None:
    """Replicas could not read each other's entries or proofs with per-directory secrets."""
    with pytest.raises(ConfigError, match=r"^redis_url: .*secret_file"):
        load(env={}, flags={"redis_url": "redis://127.0.0.1:6379/0"})
    assert load(
        env={"VLMRUN_CACHE_SECRET": "x" * 32}, flags={"redis_url": "redis://127.0.0.1:6379/0"}
    ).redis_url


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("redis_url", "http://127.0.0.1:6379"),
        ("redis_prefix", "a{b}:"),
        ("shared_max_object_size", "600MB"),
        ("redis_timeout", "0"),
    ],
)
def test_bad_redis_settings_are_refused_by_name(key: str, value: str) -> None:
    flags = {"redis_url": "redis://127.0.0.1:6379/0", "secret_file": "/s", key: value}
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load(env={}, flags=flags)


def test_a_password_in_the_url_is_never_shown() -> None:
    assert redact_url(f"redis://:{PASSWORD}@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("rediss://u:p@[::1]:6380/1") == "rediss://u:***@[::1]:6380/1"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_a_replica_starts_and_serves_while_redis_is_down(
    standin: StandIn, start_replica: ProxyFactory, redis_server: RedisServer
) -> None:
    """Redis down at start-up: the replica starts, /readyz is 200, artifacts are served."""
    redis_server.kill()
    body = standin.add("session", SESSION, "arr_down", 4000)
    replica = start_replica()
    assert httpx.get(f"{replica.url}/readyz", timeout=10).status_code == 200
    for _ in range(3):
        answer = fetch(replica, "arr_down")
        assert answer.status_code == 200 and answer.content == body


def test_the_password_stays_out_of_logs_banner_metrics_and_doctor(
    standin: StandIn, upstream: ServerThread, tmp_path: Path, shared_secret_file: Path
) -> None:
    """With the password in redis_url (or in redis_password_file) sharing works, and no line
    of the banner, the logs, /metrics or doctor shows it."""
    server = RedisServer(tmp_path / "redis", password=PASSWORD).start()
    try:
        standin.add("session", SESSION, "arr_pw", 3000)
        password_file = tmp_path / "redis-password"
        password_file.write_text(PASSWORD + "\n")
        bare = f"redis://127.0.0.1:{server.port}/0"
        common = ["--upstream", upstream.url, "--secret-file", str(shared_secret_file)]
        a = Daemon(*common, "--cache-dir", str(tmp_path / "a"), "--redis-url", server.url)
        b = Daemon(
            *common,
            "--cache-dir",
            str(tmp_path / "b"),
            "--redis-url",
            bare,
            "--redis-password-file",
            str(password_file),
            "--log-level",
            "debug",
        )
        try:
            assert a.started() and b.started(), a.output + b.output
            assert fetch(a, "arr_pw").status_code == 200
            assert wait_until(
                lambda: metric(a, "vlmrun_cache_redis_writes_total", result="stored") >= 1
            )
            hit = fetch(b, "arr_pw")
            assert hit.headers["cache-status"].endswith("detail=redis")
            metrics = httpx.get(f"{a.url}/metrics", timeout=10).text
        finally:
            a.stop()
            b.stop()
        assert "shared tier: Redis redis://127.0.0.1" in a.output
        for shown in (a.output, b.output, metrics):
            assert PASSWORD not in shown
        where = ["--cache-dir", str(tmp_path / "a"), "--port", str(_free_port())]
        doctor = subprocess.run(
            [sys.executable, "-m", "proxy", "doctor", *common, *where, "--redis-url", server.url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "redis" in doctor.stdout and PASSWORD not in doctor.stdout + doctor.stderr
    finally:
        server.stop()


def _doctor(upstream: ServerThread, tmp_path: Path, secret: Path, url: str) -> str:
    settings = ["--upstream", upstream.url, "--cache-dir", str(tmp_path / "d")]
    settings += ["--port", str(_free_port()), "--redis-url", url, "--secret-file", str(secret)]
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "doctor", *settings],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    (line,) = [line for line in done.stdout.splitlines() if line.split()[1:2] == ["redis"]]
    return line


def test_doctor_checks_redis_and_its_eviction_policy(
    upstream: ServerThread, tmp_path: Path, shared_secret_file: Path, redis_server: RedisServer
) -> None:
    """ok with maxmemory and allkeys-lru; a problem without them, or when Redis is down."""
    line = _doctor(upstream, tmp_path, shared_secret_file, redis_server.url)
    assert line.startswith("problem") and "allkeys-lru" in line
    redis_server.cli("CONFIG", "SET", "maxmemory", "64mb")
    redis_server.cli("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    line = _doctor(upstream, tmp_path, shared_secret_file, redis_server.url)
    assert line.startswith("ok") and "64 MiB, allkeys-lru" in line
    redis_server.kill()
    line = _doctor(upstream, tmp_path, shared_secret_file, redis_server.url)
    assert line.startswith("problem") and "serve still starts" in line


def _operated_replica(
    start_replica: ProxyFactory,
    redis_server: RedisServer,
    secret_file: Path,
    directory: Path,
    monkeypatch: pytest.MonkeyPatch,
    *artifacts: tuple[str, str, str],
) -> ServerThread:
    """A replica on ``directory`` that fetched ``artifacts`` (kind, scope id, object id) and
    copied them to Redis; the operator's commands of this test then use that Redis."""
    replica = start_replica(cache_dir=str(directory))
    for kind, scope_id, object_id in artifacts:
        assert fetch(replica, object_id, scope=kind, scope_id=scope_id).status_code == 200
    stored = "vlmrun_cache_redis_writes_total"
    assert wait_until(lambda: metric(replica, stored, result="stored") >= len(artifacts))
    monkeypatch.setenv("VLMRUN_CACHE_REDIS_URL", redis_server.url)
    monkeypatch.setenv("VLMRUN_CACHE_SECRET_FILE", str(secret_file))
    return replica


def test_stats_and_purge_cover_redis(
    standin: StandIn,
    start_replica: ProxyFactory,
    redis_server: RedisServer,
    shared_secret_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``stats`` counts Redis's entries; ``purge --session`` deletes that session's entries in
    Redis too (else another replica's next miss would serve the purged bytes from Redis)."""
    standin.add("session", SESSION, "arr_p1", 3000)
    standin.add("execution", EXECUTION, "arr_p2", 3000)
    artifacts = [("session", SESSION, "arr_p1"), ("execution", EXECUTION, "arr_p2")]
    _operated_replica(
        start_replica, redis_server, shared_secret_file, tmp_path / "a", monkeypatch, *artifacts
    )
    b = start_replica()

    stats = admin("stats", "--json", cache_dir=tmp_path / "a")
    assert stats.code == 0, stats.err
    assert stats.json()["redis"]["entries"] == 2  # type: ignore[index]

    purged = admin("purge", "--session", SESSION, "--yes", cache_dir=tmp_path / "a")
    assert purged.code == 0, purged.err
    assert "removed 1 entry from Redis" in purged.out
    left = admin("stats", cache_dir=tmp_path / "a")
    assert left.code == 0, left.err
    assert "\nredis            1 entry, " in left.out
    assert fetch(b, "arr_p1").headers["x-cache"] == "MISS"  # not from Redis any more
    hit = fetch(b, "arr_p2", scope="execution", scope_id=EXECUTION)
    assert hit.headers["cache-status"].endswith("detail=redis")

    purged = admin("purge", "--object", "arr_p2", "--yes", cache_dir=tmp_path / "a")
    assert "removed 1 entry from Redis" in purged.out
    purged = admin("purge", "--all", "--yes", cache_dir=tmp_path / "a")
    assert purged.code == 0 and "from Redis" in purged.out
    assert redis_server.cli("--scan", "--pattern", "vlmrun-cache:v1:{*").split() == []


def test_revoke_names_the_key_with_the_shared_secret(
    standin: StandIn,
    start_replica: ProxyFactory,
    redis_server: RedisServer,
    shared_secret_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``revoke --key-file`` on a replica voids that key's proofs there, including the copy it
    would otherwise adopt again from Redis: its next request is checked with the API."""
    standin.add("session", SESSION, "arr_rv", 3000)
    a = _operated_replica(
        start_replica,
        redis_server,
        shared_secret_file,
        tmp_path / "a",
        monkeypatch,
        ("session", SESSION, "arr_rv"),
    )
    key_file = tmp_path / "key"
    key_file.write_text(TOKEN)
    revoked = admin("revoke", "--key-file", str(key_file), cache_dir=tmp_path / "a")
    assert revoked.code == 0, revoked.err
    assert fetch(a, "arr_rv").status_code == 200
    assert standin.hits("session", SESSION, "arr_rv") == 2  # the fill, and a new check

    everyone = admin("revoke", "--all", cache_dir=tmp_path / "a")
    assert everyone.code == 0 and "proof records from Redis" in everyone.out
    assert redis_server.cli("--scan", "--pattern", "*proof:*").split() == []


def test_doctor_on_a_redis_without_config(
    upstream: ServerThread, tmp_path: Path, shared_secret_file: Path
) -> None:
    """A managed Redis that disables CONFIG: doctor says it answers, and what to make sure of."""
    server = RedisServer(tmp_path / "managed", "--rename-command", "CONFIG", "").start()
    try:
        line = _doctor(upstream, tmp_path, shared_secret_file, server.url)
    finally:
        server.stop()
    assert line.startswith("ok") and "make sure it runs with maxmemory and allkeys-lru" in line
