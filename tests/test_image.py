"""The container image, read from its Dockerfile (no engine here), and the health check it runs."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from proxy.cli import ADDRESS_FILE, Unhealthy, check_health, dial_host, write_address_file
from proxy.config import BASE_CONFIG_ENV, ENV_PREFIX, KEYS, load
from tests.conftest import ProxyFactory
from tests.servers import Daemon, ServerThread

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")
WILDCARD = "0.0.0.0"  # noqa: S104 (compared and dialled here, never bound)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), " ".join(rest.split())))
    return result


STEPS = instructions(DOCKERFILE)


def steps(kind: str) -> list[str]:
    return [args for word, args in STEPS if word == kind]


def position(text: str, kind: str) -> int:
    """Index in STEPS of the first ``kind`` step whose arguments contain ``text``."""
    for index, (word, args) in enumerate(STEPS):
        if word == kind and text in args:
            return index
    raise AssertionError(f"no {kind} step containing {text!r}")


def image_env() -> dict[str, str]:
    """Every variable the image's ENV lines set (``ENV KEY=VALUE ...`` form only)."""
    env: dict[str, str] = {}
    for args in steps("ENV"):
        for word in shlex.split(args):
            name, equals, value = word.partition("=")
            assert equals, f"ENV {args!r}: use the KEY=VALUE form"
            env[name] = value
    return env


def copied_to(source: str) -> str:
    """Where a COPY step puts ``source``."""
    for args in steps("COPY"):
        words = [w for w in args.split() if not w.startswith("--")]
        if source in words[:-1]:
            return words[-1]
    raise AssertionError(f"{source} is not copied into the image")


def test_healthcheck_dials_the_address_serve_recorded() -> None:
    """HEALTHCHECK runs `vlmrun-cache healthcheck` (serve.json), not a fixed or env-derived port."""
    (healthcheck,) = steps("HEALTHCHECK")
    command = healthcheck.split(" CMD ", 1)[1]
    assert json.loads(command) == ["vlmrun-cache", "healthcheck"]
    assert "8080" not in healthcheck and "VLMRUN_CACHE" not in healthcheck
    # Enough for the interpreter's start and the check's own 2 s per connect and read.
    timeout = re.search(r"--timeout=(\d+)s", healthcheck)
    assert timeout is not None and int(timeout.group(1)) > 2


def test_image_env_sets_no_setting() -> None:
    """No VLMRUN_CACHE_<KEY> in ENV: a mounted --config file must outrank the image's settings."""
    env = image_env()
    settings = {name for name in env if name.removeprefix(ENV_PREFIX).lower() in KEYS}
    assert not settings, f"the image's settings belong in its base file, not ENV: {settings}"
    assert env[BASE_CONFIG_ENV] == copied_to("config.container.toml")


def test_image_base_file_holds_its_settings_below_the_users(tmp_path: Path) -> None:
    """The base file listens on 0.0.0.0:8080 with the cache in /cache; a user's file, the
    environment and flags each outrank it."""
    base = ROOT / "config.container.toml"
    config = load(env={}, base=base)
    assert (config.host, config.port, config.cache_dir) == (WILDCARD, 8080, "/cache")
    assert "/cache" in steps("VOLUME")[0] and steps("EXPOSE") == ["8080"]
    mounted = tmp_path / "mine.toml"
    mounted.write_text("port = 9000\n")
    assert load(mounted, {}, base=base).port == 9000
    assert load(None, {"VLMRUN_CACHE_PORT": "9001"}, base=base).port == 9001
    assert load(mounted, {}, {"port": "9002"}, base=base).port == 9002


def test_dependencies_come_from_the_lock_before_the_source() -> None:
    """The hashed lock is installed in its own layer before any source is copied; the project
    is installed after, with nothing left to resolve."""
    lock_copied = position("requirements.lock", "COPY")
    locked_install = position("--require-hashes", "RUN")
    assert "-r " + copied_to("requirements.lock") in STEPS[locked_install][1]
    source_copies = [
        index
        for index, (word, args) in enumerate(STEPS)
        if word == "COPY" and ({"proxy", "pyproject.toml"} & set(args.split()[:-1]))
    ]
    assert source_copies and lock_copied < locked_install < min(source_copies)
    project_install = position("--no-deps", "RUN")
    assert project_install > max(source_copies)
    assert copied_to("proxy").startswith(copied_to("pyproject.toml").rstrip("/"))


def test_base_image_is_pinned_by_exact_tag() -> None:
    """FROM takes BASE_IMAGE, whose default is an exact python:3.11.x-slim-bookworm tag (a
    release build passes the same tag with @sha256:...)."""
    (arg,) = [args for args in steps("ARG") if args.startswith("BASE_IMAGE=")]
    assert re.fullmatch(r"BASE_IMAGE=python:3\.11\.\d+-slim-bookworm", arg), arg
    assert DOCKERFILE.index("ARG BASE_IMAGE=") < DOCKERFILE.index("FROM ")
    assert steps("FROM") == ["${BASE_IMAGE}"]
    tag = arg.removeprefix("BASE_IMAGE=")
    assert f"BASE_IMAGE={tag}@sha256:" in DOCKERFILE  # the release recipe names the same tag


def test_docs_publish_the_port_on_loopback_only() -> None:
    """Every `docker run` in the README and the Dockerfile that publishes a port publishes it
    on 127.0.0.1 only (one that publishes none, named in prose, exposes nothing)."""
    runs = [
        line
        for line in (README + DOCKERFILE).splitlines()
        if "docker run" in line and re.search(r"\s(-p|--publish)[\s=]", line)
    ]
    assert len(runs) >= 2
    for line in runs:
        assert "-p 127.0.0.1:8080:8080" in line, line


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    """.ci/run's command is the README's first-screen test command, which installs the lock."""
    block = README.split("```sh", 1)[1].split("```", 1)[0].splitlines()
    heading = next(line for line in block if line.startswith("# Run the tests"))
    command = block[block.index(heading) + 1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == command
    assert "--require-hashes -r requirements-test.lock" in command
    assert "pip install -q --no-deps -e ." in command


def locked(name: str) -> dict[str, str]:
    """name -> version of a lock file, checking every entry is pinned exactly with hashes."""
    pins: dict[str, str] = {}
    for entry in re.split(r"\n(?=\S)", (ROOT / name).read_text(encoding="utf-8")):
        if entry.startswith("#") or not entry.strip():
            continue
        requirement = entry.split(";")[0].split("\\")[0].strip()
        package, equals, version = requirement.partition("==")
        assert equals and "--hash=sha256:" in entry, f"{name}: {requirement} is not pinned"
        pins[package.lower().replace("_", "-")] = version
    return pins


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0].lower() for r in requirements}


def test_lock_files_pin_the_declared_dependencies() -> None:
    """Both locks pin every declared dependency with hashes, agree where they overlap (the image
    ships what CI tested), and hold httpx and httpcore at the exact versions declared."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime, test = locked("requirements.lock"), locked("requirements-test.lock")
    assert names(project["dependencies"]) <= runtime.keys()
    assert names(project["dependencies"] + project["optional-dependencies"]["test"]) <= test.keys()
    assert {k: v for k, v in runtime.items() if k in test} == {
        k: v for k, v in test.items() if k in runtime
    }
    assert "httpx==0.28.1" in project["dependencies"] and runtime["httpx"] == "0.28.1"
    assert "httpcore==1.0.9" in project["dependencies"] and runtime["httpcore"] == "1.0.9"


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "healthcheck", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


@pytest.fixture
def daemon(upstream: ServerThread, cache_dir: Path) -> Iterator[Daemon]:
    process = Daemon("--upstream", upstream.url, "--cache-dir", str(cache_dir))
    assert process.started(), process.output
    yield process
    if process.process.poll() is None:
        process.stop()


def test_healthcheck_follows_a_port_set_by_flag(daemon: Daemon, cache_dir: Path) -> None:
    """serve records the flag's port in serve.json (0600); healthcheck dials it and exits 0,
    then 1 once the server has stopped."""
    assert daemon.port != 8080  # Daemon passes --port
    address = cache_dir / ADDRESS_FILE
    assert json.loads(address.read_text()) == {
        "scheme": "http",
        "host": "127.0.0.1",
        "port": daemon.port,
    }
    assert stat.S_IMODE(address.stat().st_mode) == 0o600
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]
    # As in the container: the cache directory comes from the environment, not a flag.
    healthy = healthcheck(env={"VLMRUN_CACHE_CACHE_DIR": str(cache_dir)})
    assert healthy.returncode == 0, healthy.stderr
    assert f"http://127.0.0.1:{daemon.port}/healthz" in healthy.stdout
    assert daemon.stop()
    stopped = healthcheck("--cache-dir", str(cache_dir))
    assert stopped.returncode == 1
    assert "unhealthy" in stopped.stderr and str(daemon.port) in stopped.stderr


def test_healthcheck_fails_without_an_address_or_a_valid_setting(tmp_path: Path) -> None:
    """No serve.json, an unreadable one, or an invalid setting: exit 1 (never Docker's 2)."""
    assert healthcheck("--cache-dir", str(tmp_path)).returncode == 1
    (tmp_path / ADDRESS_FILE).write_text("{not json")
    assert healthcheck("--cache-dir", str(tmp_path)).returncode == 1
    result = healthcheck("--cache-dir", str(tmp_path), env={"VLMRUN_CACHE_PORT": "http"})
    assert result.returncode == 1 and "invalid setting port:" in result.stderr


def test_healthcheck_creates_nothing(tmp_path: Path) -> None:
    """Asked about a cache directory that does not exist, the health check says so (exit 1)
    and leaves it missing; in one that exists it writes nothing (it reads serve.json and
    dials). A directory others may write is refused, as serve refuses it."""
    missing = tmp_path / "never-served"
    result = healthcheck("--cache-dir", str(missing))
    assert result.returncode == 1 and "No such file or directory" in result.stderr
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    assert healthcheck("--cache-dir", str(empty)).returncode == 1
    assert list(empty.iterdir()) == []
    empty.chmod(0o777)
    (empty / ADDRESS_FILE).write_text('{"scheme": "http", "host": "127.0.0.1", "port": 9}')
    loose = healthcheck("--cache-dir", str(empty))
    assert loose.returncode == 1 and "writable by group or others" in loose.stderr


def test_wildcard_address_is_dialled_on_loopback(start_proxy: ProxyFactory, tmp_path: Path) -> None:
    """A server listening on 0.0.0.0 is checked at 127.0.0.1 (and :: at ::1)."""
    proxy = start_proxy()
    (tmp_path / ADDRESS_FILE).write_text(
        json.dumps({"scheme": "http", "host": WILDCARD, "port": proxy.port})
    )
    assert check_health(tmp_path) == f"http://127.0.0.1:{proxy.port}/healthz"
    assert dial_host("::") == "::1" and dial_host("localhost") == "localhost"


async def _sick(_request: Request) -> Response:
    return PlainTextResponse("starting", status_code=503)


def test_healthcheck_fails_on_a_non_200_answer(tmp_path: Path) -> None:
    """Something answering at the address, but not 200, is unhealthy."""
    sick = ServerThread(Starlette(routes=[Route("/healthz", _sick)])).start()
    try:
        (tmp_path / ADDRESS_FILE).write_text(
            json.dumps({"scheme": "http", "host": "127.0.0.1", "port": sick.port})
        )
        with pytest.raises(Unhealthy, match="answered 503"):
            check_health(tmp_path, timeout=5)
    finally:
        sick.stop()


def test_address_file_creates_a_missing_cache_directory_owner_only(tmp_path: Path) -> None:
    """Before the app has run, serve creates the cache directory 0700 and writes serve.json 0600."""
    directory = tmp_path / "new" / "cache"
    config = load(env={}, flags={"cache_dir": str(directory), "port": "9"})
    written = write_address_file(config)
    assert written == directory / ADDRESS_FILE
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert json.loads(written.read_text())["port"] == 9
    assert [p.name for p in directory.iterdir()] == [ADDRESS_FILE]
