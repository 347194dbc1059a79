"""Shared pieces of the benchmarks: child processes on loopback ports, memory readings."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"  # noqa: S105 (the stand-in's test key)
SCOPE = "sess_bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Block until something accepts connections on ``port`` (start-up, not a race)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def pinned(args: Sequence[str], cpu: int | None) -> list[str]:
    """``args`` run on core ``cpu`` only (taskset), when this machine has that core."""
    if cpu is not None and hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        return ["taskset", "-c", str(cpu), *args]
    return list(args)


def stop(process: subprocess.Popen[Any]) -> None:
    """Stop ``process`` by its PID: SIGTERM, then SIGKILL after 15 s."""
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def child(
    args: Sequence[str],
    port: int,
    cpu: int | None = None,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` (listening on ``port``, in ``cwd``) for the duration of the block; stop it
    by its PID.

    Its stdout and stderr are appended to ``log`` (a file, which never blocks a writer the way
    an undrained pipe does), or discarded without one.
    """
    with contextlib.ExitStack() as stack:
        out: IO[bytes] | int = subprocess.DEVNULL
        if log is not None:
            out = stack.enter_context(log.open("ab"))
        process = subprocess.Popen(
            pinned(args, cpu),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
            env=None if env is None else {**os.environ, **env},
        )
        try:
            wait_listening(port, process)
            yield process
        finally:
            stop(process)


def standin(
    port: int, latency: float = 0.0, cpu: int | None = None, log: Path | None = None
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    return child(
        [
            sys.executable,
            "-m",
            "tests.standin",
            "--port",
            str(port),
            "--token",
            TOKEN,
            "--scope",
            SCOPE,
            "--latency",
            str(latency),
        ],
        port,
        cpu,
        log,
    )


ACCESS_LOG_FLAG = "--access-log"


@functools.cache
def has_access_log_setting() -> bool:
    """Whether ``serve`` has an ``access_log`` setting of its own (its --help lists the flag)."""
    help_text = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return ACCESS_LOG_FLAG in help_text


def access_log_off_means() -> str:
    """How :func:`proxy` turns the access log off here, for the tables."""
    if has_access_log_setting():
        return "`VLMRUN_CACHE_ACCESS_LOG=false` (the proxy's access_log setting)"
    return (
        "uvicorn's `access_log=False`, added to serve's one `uvicorn.run` call by "
        "bench/no_access_log.py (serve has no access_log setting yet; its access log is uvicorn's)"
    )


def proxy(
    port: int,
    upstream: str,
    cache_dir: str,
    *extra: str,
    log: Path,
    cpu: int | None = None,
    access_log: bool = True,
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """``vlmrun-cache serve`` as a user runs it: no flags but the upstream, the cache directory,
    the port and ``extra``, at its default log level, its log going to the file ``log``.

    ``access_log=False`` turns off the per-request log line and nothing else.
    """
    command = [sys.executable, "-m", "proxy", "serve"]
    env: dict[str, str] = {}
    if not access_log:
        if has_access_log_setting():
            env["VLMRUN_CACHE_ACCESS_LOG"] = "false"
        else:
            command = [sys.executable, "bench/no_access_log.py", "serve"]
    flags = ["--port", str(port), "--upstream", upstream, "--cache-dir", cache_dir, *extra]
    return child([*command, *flags], port, cpu, log, env)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of ``pid`` (and with VmHWM its peak), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def tree_rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and its children (workers), in KiB."""
    total = rss_kib(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        for child_pid in children.read_text().split():
            with contextlib.suppress(FileNotFoundError):
                total += rss_kib(int(child_pid))
    return total


def machine() -> str:
    python = platform.python_version()
    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {python}"
