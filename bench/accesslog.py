"""What the access log costs: 8 KiB hits with ``access_log`` on and off, same machine, same run.

    python bench/accesslog.py                # 5 rounds of 10 s per setting
    python bench/accesslog.py --rounds 3 --seconds 5

Starts the stand-in API and two proxies (pinned to core 0, like bench/run.py), one writing its
access log to a file, one with ``--access-log false``, warms one 8 KiB artifact in each, then
alternates wrk runs (core 1) between them so that drift on a shared machine hits both alike.
Prints the median requests/s and latencies of each, and the slowdown with the log on.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, TOKEN, free_port, standin, wait_listening
from bench.loadgen import wrk
from bench.servers import SERVER_CPU, cpu_seconds, url

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.contextmanager
def proxy(upstream: str, cache_dir: str, log: Path, *extra: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    args = ["taskset", "-c", str(SERVER_CPU), sys.executable, "-m", "proxy", "serve"]
    args += ["--port", str(port), "--upstream", upstream, "--cache-dir", cache_dir, *extra]
    with log.open("wb") as out:
        process = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.DEVNULL)
        try:
            wait_listening(port, process)
            yield f"http://127.0.0.1:{port}", process.pid
        finally:
            process.terminate()
            process.wait(timeout=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    upstream_port = free_port()
    with (
        tempfile.TemporaryDirectory(prefix="bench-accesslog-") as tmp,
        standin(upstream_port, cpu=1),
    ):
        upstream = f"http://127.0.0.1:{upstream_port}"
        on_log, off_log = Path(tmp) / "on.log", Path(tmp) / "off.log"
        with (
            proxy(upstream, f"{tmp}/on", on_log, "--log-level", "warning") as on,
            proxy(
                upstream, f"{tmp}/off", off_log, "--log-level", "warning", "--access-log", "false"
            ) as off,
        ):
            servers = {
                name: (url(base, "arr_8192_accesslog"), pid)
                for name, (base, pid) in (("on", on), ("off", off))
            }
            for target, _pid in servers.values():
                response = httpx.get(target, headers=AUTH, timeout=60)
                assert response.status_code == 200 and len(response.content) == 8192
            results: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
            for round_ in range(args.rounds):
                order = ["on", "off"] if round_ % 2 == 0 else ["off", "on"]
                for name in order:
                    target, pid = servers[name]
                    before = cpu_seconds(pid)
                    result = wrk(target, args.connections, args.seconds)
                    # CPU per request: steadier than requests/s on a shared machine.
                    result["cpu_us"] = (cpu_seconds(pid) - before) / result["requests"] * 1e6
                    results[name].append(result)
        lines = sum(1 for _ in on_log.open("rb"))
    print(f"8 KiB hits, {args.connections} connections, {args.rounds} x {args.seconds:g} s each")
    print("| access_log | requests/s | CPU us/request | p50 ms | p99 ms | runs (requests/s) |")
    print("|---|---|---|---|---|---|")
    rps, cpu = {}, {}
    for name, runs in results.items():
        rps[name] = statistics.median(r["rps"] for r in runs)
        cpu[name] = statistics.median(r["cpu_us"] for r in runs)
        p50 = statistics.median(r["p50"] for r in runs)
        p99 = statistics.median(r["p99"] for r in runs)
        each = ", ".join(f"{r['rps']:,.0f}" for r in runs)
        print(f"| {name} | {rps[name]:,.0f} | {cpu[name]:.1f} | {p50:.2f} | {p99:.2f} | {each} |")
    print(
        f"with the log on (medians): {(1 - rps['on'] / rps['off']) * 100:.1f}% fewer requests/s, "
        f"{(cpu['on'] / cpu['off'] - 1) * 100:.1f}% more CPU per request"
    )
    print(f"access log lines written by the 'on' proxy: {lines:,}")


if __name__ == "__main__":
    main()
