"""The load generator: wrk (a Python fallback when it is not installed), pinned to the core the
servers do not use.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import httpx

from bench.common import TOKEN, pinned
from bench.servers import AUTH, LOAD_CPU

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}
_SIZES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}  # wrk's are binary


class Load(TypedDict):
    """What one run of keep-alive GETs measured (a dict, as bench/run.py's ``wrk`` always gave)."""

    rps: float
    #: Latency percentiles, ms.
    p50: float
    p99: float
    requests: int
    #: Socket errors (connect, read, write, timeout).
    errors: int
    #: Bytes received per request, headers included (0 if the generator does not say).
    bytes_per_request: float


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _field(pattern: str, text: str) -> str:
    match = re.search(pattern, text, re.M)
    if match is None:
        raise RuntimeError(f"no {pattern!r} in wrk's output:\n{text}")
    return match.group(1)


def wrk(
    target: str,
    connections: int,
    seconds: float,
    pin: bool = True,
    script: Path | None = None,
    script_args: Sequence[str] = (),
    timeout: str = "60s",
    headers: Sequence[str] = (),
) -> Load:
    """Keep-alive GETs of ``target`` from ``connections`` connections for ``seconds`` (whole),
    with ``headers`` (``Name: value``) besides Authorization; with ``script``, the requests that
    Lua script makes (given ``script_args``)."""
    if shutil.which("wrk") is None:
        return asyncio.run(python_load(target, connections, seconds, headers))
    args = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", timeout]
    args += ["--latency", "-H", f"Authorization: Bearer {TOKEN}"]
    for header in headers:
        args += ["-H", header]
    args += ["-s", str(script), target, "--", *script_args] if script is not None else [target]
    if pin and (os.cpu_count() or 1) > 1:
        args = pinned(args, LOAD_CPU)
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    requests = int(_field(r"(\d+) requests in", out))
    amount, unit = re.findall(r"requests in [\d.]+\w+, ([\d.]+)(\w+) read", out)[0]
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    if "Non-2xx" in out or errors > max(1, requests // 100):
        raise RuntimeError(f"wrk saw errors against {target}:\n{out}")
    return Load(
        rps=float(_field(r"Requests/sec:\s+([\d.]+)", out)),
        p50=_ms(_field(r"^\s+50%\s+(\S+)", out)),
        p99=_ms(_field(r"^\s+99%\s+(\S+)", out)),
        requests=requests,
        errors=errors,
        bytes_per_request=float(amount) * _SIZES[unit] / max(requests, 1),
    )


async def python_load(
    target: str, connections: int, seconds: float, headers: Sequence[str] = ()
) -> Load:
    """A fallback load generator when wrk is not installed (slower: it is Python)."""
    extra = dict(header.split(": ", 1) for header in headers)
    latencies: list[float] = []
    received = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(headers={**AUTH, **extra}, limits=limits, timeout=60) as client:

        async def loop() -> None:
            nonlocal received
            while time.monotonic() < deadline:
                started = time.monotonic()
                async with client.stream("GET", target) as response:
                    response.raise_for_status()
                    async for chunk in response.aiter_raw():
                        received += len(chunk)
                latencies.append(time.monotonic() - started)

        await asyncio.gather(*(loop() for _ in range(connections)))
    latencies.sort()
    return Load(
        rps=len(latencies) / seconds,
        p50=latencies[len(latencies) // 2] * 1000,
        p99=latencies[int(len(latencies) * 0.99) - 1] * 1000,
        requests=len(latencies),
        errors=0,
        bytes_per_request=received / max(len(latencies), 1),
    )


def wrk_version() -> str:
    if shutil.which("wrk") is None:
        return "not installed (Python load generator)"
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    match = re.search(r"wrk (\S+)", out.stdout + out.stderr)
    return match.group(1) if match else "?"
