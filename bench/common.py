"""Shared pieces of the benchmarks: child processes on loopback ports, memory readings."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

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
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


@contextlib.contextmanager
def child(
    args: Sequence[str], port: int, cpu: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` (listening on ``port``) for the duration of the block; stop it by its PID."""
    if cpu is not None and hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        args = ["taskset", "-c", str(cpu), *args]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def standin(
    port: int, latency: float = 0.0, cpu: int | None = None
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
    )


def proxy(
    port: int, upstream: str, cache_dir: str, *extra: str, cpu: int | None = None
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    return child(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--port",
            str(port),
            "--upstream",
            upstream,
            "--cache-dir",
            cache_dir,
            "--log-level",
            "warning",
            *extra,
        ],
        port,
        cpu,
    )


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
