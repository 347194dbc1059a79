"""The shared tier: a Redis hit beside a disk hit (8 KiB and 50 MiB), and what a Redis outage
costs a request.

    python bench/shared_tier.py                      # 3 rounds of 5 s per server and size
    python bench/shared_tier.py --rounds 5 --seconds 10

Starts a real redis-server (maxmemory 1 GiB, allkeys-lru), the stand-in API and three proxies
pinned to core 0 (wrk runs on core 1): ``fill`` fetches each artifact once and copies it to
Redis; ``redis`` shares that Redis but keeps nothing on disk (``max_object_size`` 1 KiB), so
every hit it serves is a Redis hit; ``disk`` has no Redis and serves from its disk. Rounds
alternate between ``redis`` and ``disk`` so that drift on a shared machine hits both alike.

Outage: with Redis stopped (SIGSTOP), then killed, requests to ``redis`` are timed one after the
other; the first ones pay up to ``redis_timeout`` until the breaker opens, the rest nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import TOKEN, child, free_port, standin
from bench.loadgen import Load, wrk
from bench.servers import SERVER_CPU, url
from tests.redisserver import RedisServer

AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "bench-shared-secret-" + "0" * 32
SIZES = {"8 KiB": "arr_8192", "50 MiB": f"arr_{50 * 1024 * 1024}"}


@contextlib.contextmanager
def proxy(name: str, upstream: str, tmp: Path, *extra: str) -> Iterator[str]:
    port = free_port()
    args = [sys.executable, "-m", "proxy", "serve", "--port", str(port), "--upstream", upstream]
    args += ["--cache-dir", str(tmp / name), "--access-log", "false", *extra]
    env = {"VLMRUN_CACHE_SECRET": SECRET}
    with child(args, port, SERVER_CPU, tmp / f"{name}.log", env):
        yield f"http://127.0.0.1:{port}"


def metric(base: str, sample: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def warm(fill: str, reader: str, disk: str) -> None:
    """Every artifact fetched once by ``fill`` and stored in Redis; ``disk`` holds them too."""
    stored = 'vlmrun_cache_redis_writes_total{result="stored"}'
    for object_id in SIZES.values():
        assert httpx.get(url(fill, object_id), headers=AUTH, timeout=120).status_code == 200
        for _ in range(2):
            httpx.get(url(disk, object_id), headers=AUTH, timeout=120)
    deadline = time.monotonic() + 120
    while metric(fill, stored) < len(SIZES):  # the copy to Redis runs in the background
        if time.monotonic() > deadline:
            raise RuntimeError("the fills never reached Redis")
        time.sleep(0.05)
    for object_id in SIZES.values():
        status = httpx.get(url(reader, object_id), headers=AUTH, timeout=120).headers
        assert status["cache-status"].endswith("detail=redis"), status
        status = httpx.get(url(disk, object_id), headers=AUTH, timeout=120).headers
        assert not status["cache-status"].endswith("detail=redis"), status


def timed(base: str, object_id: str, count: int) -> list[float]:
    """Milliseconds of ``count`` requests one after the other."""
    took = []
    with httpx.Client(headers=AUTH, timeout=120) as client:
        for _ in range(count):
            began = time.perf_counter()
            answer = client.get(url(base, object_id))
            took.append((time.perf_counter() - began) * 1000)
            assert answer.status_code == 200, answer.status_code
    return took


def outage(redis: RedisServer, reader: str) -> list[str]:
    lines = []
    for fault, undo in (("stopped (SIGSTOP)", "resume"), ("killed", "start")):
        baseline = statistics.median(timed(reader, SIZES["8 KiB"], 20))
        if fault.startswith("stopped"):
            os.kill(redis.pid, signal.SIGSTOP)
        else:
            redis.kill()
        try:
            took = timed(reader, SIZES["8 KiB"], 12)
        finally:
            getattr(redis, undo)()
        first = ", ".join(f"{ms:.1f}" for ms in took[:5])
        rest = statistics.median(took[5:])
        lines.append(
            f"| Redis {fault} | {baseline:.2f} ms (Redis hit) | {first} | {rest:.2f} ms "
            f"(breaker open: straight upstream) |"
        )
        time.sleep(5.5)  # let the breaker's cool-down pass before the next fault
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    upstream_port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as name:
        tmp = Path(name)
        redis = RedisServer(
            tmp / "redis", "--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru"
        )
        redis.start()
        try:
            with (
                standin(upstream_port, cpu=1, log=tmp / "standin.log"),
                proxy(
                    "fill", f"http://127.0.0.1:{upstream_port}", tmp, "--redis-url", redis.url
                ) as fill,
                proxy(
                    "redis",
                    f"http://127.0.0.1:{upstream_port}",
                    tmp,
                    "--redis-url",
                    redis.url,
                    "--max-object-size",
                    "1KiB",
                ) as reader,
                proxy("disk", f"http://127.0.0.1:{upstream_port}", tmp) as disk,
            ):
                warm(fill, reader, disk)
                report(args, reader, disk)
                print()
                print("| fault | before | first 5 requests after it (ms) | later ones |")
                print("|---|---|---|---|")
                for line in outage(redis, reader):
                    print(line)
        finally:
            redis.stop()


def report(args: argparse.Namespace, reader: str, disk: str) -> None:
    results: dict[tuple[str, str], list[Load]] = {}
    for _ in range(args.rounds):
        for size, object_id in SIZES.items():
            for label, base in (("redis", reader), ("disk", disk)):
                load = wrk(url(base, object_id), args.connections, args.seconds)
                results.setdefault((size, label), []).append(load)
    print(f"{args.rounds} rounds of {args.seconds:g} s, {args.connections} connections (wrk)")
    print()
    print("| size | tier | requests/s | p50 ms | p99 ms | MiB/s | Redis / disk (req/s) |")
    print("|---|---|---|---|---|---|---|")
    for size in SIZES:
        disk_rps = statistics.median(load["rps"] for load in results[(size, "disk")])
        for label in ("redis", "disk"):
            loads = results[(size, label)]
            rps = statistics.median(load["rps"] for load in loads)
            p50 = statistics.median(load["p50"] for load in loads)
            p99 = statistics.median(load["p99"] for load in loads)
            mib = rps * loads[0]["bytes_per_request"] / 1024**2
            ratio = f"{rps / disk_rps:.2f}" if label == "redis" else ""
            print(
                f"| {size} | {label} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {mib:,.0f} | {ratio} |"
            )


if __name__ == "__main__":
    main()
