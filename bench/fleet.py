"""A team over three replicas: what the shared tier and the fleet single-flight buy.

    python bench/fleet.py                     # 12 users x 40 requests, 80 artifacts
    python bench/fleet.py --users 20 --requests 60

Starts the stand-in API (``--latency`` per artifact request, 100 ms by default), a real
redis-server (maxmemory 1 GiB, allkeys-lru) and ``vlmrun-cache serve`` processes, then runs the
same team workload three times, each on fresh cache directories:

* ``single``: one replica (the reference);
* ``fleet``: three replicas sharing Redis (shared tier + fleet single-flight);
* ``isolated``: three replicas without Redis (each fetches for itself).

The team: ``--users`` clients start together and each asks ``--requests`` times for an artifact
drawn (fixed seed) from a Zipf-like popularity over ``--artifacts`` ids of 8 KiB to 2 MiB. Every
request goes to the next replica in turn (round-robin per request, as an L7 balancer without
stickiness does). Reported per run: hit rate (hits and coalesced / requests, from each
replica's ``/metrics``), upstream fetches per distinct artifact (fills from upstream plus
pass-throughs), and the fleet's lease outcomes.

Coalescing: for fresh 1 MiB and 8 MiB artifacts, one request alone (a plain miss), then
``--waiters`` (10) concurrent first requests on one ``fleet`` replica (local single-flight), then
spread over all three; the ratio of their latencies to the lone miss's is what a waiter pays for
not fetching (the client is one process on the same 2 cores: more waiters measure it instead).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import TOKEN, child, free_port, standin
from bench.servers import url
from tests.redisserver import RedisServer

AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "bench-fleet-secret-" + "0" * 32
SIZES = (8 * 1024, 64 * 1024, 256 * 1024, 2 * 1024 * 1024)
COALESCE_SIZES = (1024 * 1024, 8 * 1024 * 1024)


@contextlib.contextmanager
def replicas(
    count: int, upstream: str, tmp: Path, name: str, redis_url: str | None
) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        bases = []
        for index in range(count):
            port = free_port()
            args = [sys.executable, "-m", "proxy", "serve", "--port", str(port)]
            args += ["--upstream", upstream, "--cache-dir", str(tmp / f"{name}-{index}")]
            args += ["--access-log", "false"]
            if redis_url:
                args += ["--redis-url", redis_url, "--redis-timeout", "250ms"]
            log = tmp / f"{name}-{index}.log"
            stack.enter_context(child(args, port, None, log, {"VLMRUN_CACHE_SECRET": SECRET}))
            bases.append(f"http://127.0.0.1:{port}")
        yield bases


def samples(base: str, name: str) -> dict[str, float]:
    """Every sample of metric ``name`` on ``base``'s /metrics, by its label text."""
    found: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            found[key[len(name) :]] = float(value)
    return found


def total(bases: list[str], name: str, labels: str = "") -> float:
    return sum(samples(base, name).get(labels, 0.0) for base in bases)


def workload(args: argparse.Namespace, run: str) -> list[list[str]]:
    """Each user's sequence of artifact ids (the same for every run but for a run prefix)."""
    rng = random.Random(args.seed)
    ids = [f"arr_{SIZES[i % len(SIZES)]}_{run}{i}" for i in range(args.artifacts)]
    weights = [1 / (rank + 1) ** 1.1 for rank in range(args.artifacts)]
    return [rng.choices(ids, weights, k=args.requests) for _ in range(args.users)]


async def team(bases: list[str], users: list[list[str]]) -> float:
    """Run every user's requests (round-robin over ``bases``); the wall time."""
    turn = [0]
    failures = []

    async def user(client: httpx.AsyncClient, ids: list[str]) -> None:
        for object_id in ids:
            base = bases[turn[0] % len(bases)]
            turn[0] += 1
            response = await client.get(url(base, object_id), headers=AUTH)
            if response.status_code != 200:
                failures.append(response.status_code)

    began = time.monotonic()
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(user(client, ids) for ids in users))
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed: {sorted(set(failures))}")
    return time.monotonic() - began


def measure(args: argparse.Namespace, bases: list[str], run: str) -> dict[str, float]:
    users = workload(args, run)
    wall = asyncio.run(team(bases, users))
    requests = "vlmrun_cache_requests_total"
    served = sum(total(bases, requests, f'{{outcome="{o}"}}') for o in ("hit", "coalesced"))
    asked = sum(len(ids) for ids in users)
    fetched = total(bases, "vlmrun_cache_upstream_fetch_seconds_count")
    fetched += total(bases, requests, '{outcome="bypass"}')
    distinct = len({object_id for ids in users for object_id in ids})
    leases = {
        outcome: total(bases, "vlmrun_cache_fleet_leases_total", f'{{outcome="{outcome}"}}')
        for outcome in ("acquired", "taken_over", "followed", "stored", "fallback", "unshared")
    }
    return {
        "requests": asked,
        "hit_rate": served / asked,
        "fetches_per_artifact": fetched / distinct,
        "distinct": distinct,
        "wall": wall,
        **{f"lease_{k}": v for k, v in leases.items()},
    }


async def timed(client: httpx.AsyncClient, target: str, size: int) -> float:
    began = time.monotonic()
    response = await client.get(target, headers=AUTH)
    if response.status_code != 200 or len(response.content) != size:
        raise RuntimeError(f"{target}: {response.status_code}, {len(response.content)} bytes")
    return time.monotonic() - began


async def coalescing(
    bases: list[str], rounds: int, waiters: int, size: int
) -> tuple[float, list[float], list[float]]:
    """(median lone-miss latency, latencies of a crowd of first requests on one replica, the
    same over all three)."""
    alone: list[float] = []
    local: list[float] = []
    spread: list[float] = []
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as c:
        for index in range(rounds):
            lone = url(bases[index % 3], f"arr_{size}_lone{index}")
            alone.append(await timed(c, lone, size))
            for name, crowd, count in (("local", local, 1), ("spread", spread, 3)):
                object_id = f"arr_{size}_{name}{index}"
                ids = [url(bases[i % count], object_id) for i in range(waiters)]
                crowd += await asyncio.gather(*(timed(c, target, size) for target in ids))
    return statistics.median(alone), local, spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=12)
    parser.add_argument("--requests", type=int, default=40, help="per user")
    parser.add_argument("--artifacts", type=int, default=80)
    parser.add_argument("--latency", type=float, default=0.1, help="stand-in, per request")
    parser.add_argument("--rounds", type=int, default=3, help="coalescing rounds")
    parser.add_argument("--waiters", type=int, default=10, help="per coalescing round")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--logs", help="keep the servers' logs and caches in this directory")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as scratch:
        tmp = Path(args.logs or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        api_port = free_port()
        upstream = f"http://127.0.0.1:{api_port}"
        redis = RedisServer(
            tmp / "redis", "--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru"
        )
        with standin(api_port, args.latency, None, tmp / "standin.log"):
            redis.start()
            try:
                with replicas(1, upstream, tmp, "single", None) as bases:
                    results["single"] = measure(args, bases, "s")
                with replicas(3, upstream, tmp, "fleet", redis.url) as bases:
                    results["fleet"] = measure(args, bases, "f")
                    crowds = {
                        size: asyncio.run(coalescing(bases, args.rounds, args.waiters, size))
                        for size in COALESCE_SIZES
                    }
                    fleet_fetches = total(bases, "vlmrun_cache_upstream_fetch_seconds_count")
                with replicas(3, upstream, tmp, "isolated", None) as bases:
                    results["isolated"] = measure(args, bases, "i")
            finally:
                redis.stop()
    report(args, results, crowds, fleet_fetches)


def report(
    args: argparse.Namespace,
    results: dict[str, dict[str, float]],
    crowds: dict[int, tuple[float, list[float], list[float]]],
    fleet_fetches: float,
) -> None:
    single = results["single"]["hit_rate"]
    print(
        f"team: {args.users} users x {args.requests} requests over {args.artifacts} artifacts "
        f"(8 KiB-2 MiB, Zipf 1.1, seed {args.seed}); stand-in latency {args.latency * 1000:.0f} "
        "ms; round-robin per request\n"
    )
    print("| run | replicas | hit rate | vs single | upstream fetches / artifact | wall s |")
    print("|---|---|---|---|---|---|")
    for name, count in (("single", 1), ("fleet", 3), ("isolated", 3)):
        r = results[name]
        print(
            f"| {name} | {count} | {r['hit_rate']:.1%} | {(r['hit_rate'] - single) * 100:+.1f} "
            f"pts | {r['fetches_per_artifact']:.2f} ({r['distinct']:.0f} artifacts) | "
            f"{r['wall']:.1f} |"
        )
    fleet = results["fleet"]
    outcomes = ", ".join(
        f"{k.removeprefix('lease_')} {v:.0f}" for k, v in fleet.items() if k.startswith("lease_")
    )
    print(f"\nfleet lease outcomes: {outcomes}")
    print(
        f"\ncoalescing: {args.rounds} rounds x {args.waiters} concurrent first requests; "
        "latency as a multiple of one lone miss of the same size\n"
    )
    print("| size | lone miss | crowd on | median | p90 | max |")
    print("|---|---|---|---|---|---|")
    for size, (lone, local, crowd) in crowds.items():
        for name, times in (("1 replica (local single-flight)", local), ("3 replicas", crowd)):
            ratios = sorted(t / lone for t in times)
            p90 = ratios[int(0.9 * (len(ratios) - 1))]
            print(
                f"| {size // 2**20} MiB | {lone * 1000:.0f} ms | {name} | "
                f"{statistics.median(ratios):.2f}x | {p90:.2f}x | {ratios[-1]:.2f}x |"
            )
    print(f"\nfleet upstream fetches after the workload and coalescing: {fleet_fetches:.0f}")


if __name__ == "__main__":
    main()
