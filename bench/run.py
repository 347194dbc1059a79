"""The benchmark: our proxy beside nginx's proxy_cache and a bare Starlette app, same machine, same run.

    python bench/run.py                 # everything (about 5 minutes)
    python bench/run.py --quick         # shorter runs, no 1 GiB or 100k-entry sections
    python bench/run.py --only hits     # one section: hits, miss, coalesce, memory, scale, workers

Starts on loopback: the stand-in API (150 ms latency by default), the proxy, nginx (when installed)
configured as an equivalent cache (proxy_cache keyed on the three query parameters, with
proxy_cache_lock), and bench/ceiling.py (the same bytes from memory: the Python ceiling). Hits are
driven by wrk (or a Python generator when wrk is absent) pinned to the other core. Absolute numbers
on a shared 2-core machine are noise: the ratios in the same run are the result.

Writes the tables to bench/results/latest.md (with the date and the machine) and prints them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    ROOT,
    SCOPE,
    TOKEN,
    child,
    free_port,
    machine,
    proxy,
    rss_kib,
    standin,
    tree_rss_kib,
)

KiB, MiB, GiB = 1024, 1024**2, 1024**3
SIZES = {"8 KiB": 8 * KiB, "256 KiB": 256 * KiB, "50 MiB": 50 * MiB}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SERVER_CPU = 0  # servers on core 0, load generators on core 1
LOAD_CPU = 1
_ids = iter(range(10**9))


def new_id(size: int) -> str:
    return f"arr_{size}_k{next(_ids)}_{os.getpid()}"


def url(base: str, object_id: str) -> str:
    return f"{base}/v1/artifacts?object_id={object_id}&session_id={SCOPE}"


# -- servers -------------------------------------------------------------------------------------

NGINX_CONF = """
user root;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy_temp;
    proxy_cache_path {dir}/cache levels=1:2 keys_zone=artifacts:64m max_size=20g inactive=7d use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        location /v1/artifacts {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache artifacts;
            proxy_cache_key "$arg_session_id|$arg_execution_id|$arg_object_id";
            proxy_cache_valid 200 7d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 60s;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(port: int, upstream_port: int) -> Iterator[subprocess.Popen[bytes] | None]:
    if shutil.which("nginx") is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as directory:
        conf = Path(directory) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=directory, port=port, upstream=upstream_port))
        with child(
            ["nginx", "-p", directory, "-c", str(conf), "-g", "daemon off;"], port, SERVER_CPU
        ) as process:
            yield process


def ceiling(
    port: int, http: str = "h11"
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    return child(
        [sys.executable, "bench/ceiling.py", "--port", str(port), "--http", http], port, SERVER_CPU
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its children so far."""
    total = 0.0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for each in pids:
        with contextlib.suppress(FileNotFoundError):
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


# -- load generation -----------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(target: str, connections: int, seconds: float, pin: bool = True) -> dict[str, float]:
    """Requests/s, p50/p99 latency (ms) and MB/s of keep-alive GETs of ``target``."""
    if shutil.which("wrk") is None:
        return asyncio.run(python_load(target, connections, seconds))
    args = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "60s",
        "--latency",
        "-H",
        f"Authorization: Bearer {TOKEN}",
        target,
    ]
    if pin and (os.cpu_count() or 1) > 1:
        args = ["taskset", "-c", str(LOAD_CPU), *args]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    if "Non-2xx" in out or errors > max(1, requests // 100):
        raise RuntimeError(f"wrk saw errors against {target}:\n{out}")
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50": _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "p99": _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "requests": requests,
        "errors": errors,
    }


async def python_load(target: str, connections: int, seconds: float) -> dict[str, float]:
    """A fallback load generator when wrk is not installed (slower: it is Python)."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(headers=AUTH, limits=limits, timeout=60) as client:

        async def loop() -> None:
            while time.monotonic() < deadline:
                started = time.monotonic()
                async with client.stream("GET", target) as response:
                    async for _ in response.aiter_raw():
                        pass
                latencies.append(time.monotonic() - started)

        await asyncio.gather(*(loop() for _ in range(connections)))
    latencies.sort()
    return {
        "rps": len(latencies) / seconds,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "requests": len(latencies),
        "errors": 0,
    }


async def timed_get(client: httpx.AsyncClient, target: str) -> tuple[float, float, int]:
    """(time to first body byte, total time, bytes) of one GET, in seconds."""
    started = time.monotonic()
    first = 0.0
    size = 0
    async with client.stream("GET", target) as response:
        response.raise_for_status()
        async for chunk in response.aiter_raw():
            if not first:
                first = time.monotonic() - started
            size += len(chunk)
    return first, time.monotonic() - started, size


def upstream_fetches(upstream: str) -> int:
    return int(httpx.get(f"{upstream}/_standin/hits").json()["artifact_requests"])


# -- sections ------------------------------------------------------------------------------------

Row = list[str]


def section_hits(targets: dict[str, tuple[str, int]], seconds: float) -> list[Row]:
    rows: list[Row] = []
    for label, size in SIZES.items():
        object_id = new_id(size)
        for connections in (1, 32):
            results: dict[str, dict[str, float]] = {}
            for name, (base, pid) in targets.items():
                httpx.get(
                    url(base, object_id), headers=AUTH, timeout=120
                ).raise_for_status()  # warm
                before = cpu_seconds(pid)
                result = wrk(url(base, object_id), connections, seconds)
                result["cpu_us"] = (cpu_seconds(pid) - before) / max(result["requests"], 1) * 1e6
                result["MBps"] = result["rps"] * size / 1e6
                results[name] = result
            for name, result in results.items():
                rows.append(
                    [
                        label,
                        str(connections),
                        name,
                        f"{result['rps']:,.0f}",
                        f"{result['MBps']:,.0f}",
                        f"{result['p50']:.2f}",
                        f"{result['p99']:.2f}",
                        f"{result['cpu_us']:,.0f}",
                        f"{result['errors']:.0f}",
                        _ratio(result["rps"], results.get("nginx", {}).get("rps")),
                        _ratio(result["rps"], results.get("ceiling", {}).get("rps")),
                    ]
                )
    return rows


def _ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if reference else "-"


def section_miss(targets: dict[str, tuple[str, int]], direct: str, repeats: int) -> list[Row]:
    rows: list[Row] = []

    async def measure(base: str, size: int) -> tuple[list[float], list[float]]:
        ttfb, total = [], []
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            for _ in range(repeats):
                first, whole, _ = await timed_get(client, url(base, new_id(size)))
                ttfb.append(first)
                total.append(whole)
        return ttfb, total

    for label, size in (("8 KiB", 8 * KiB), ("50 MiB", 50 * MiB)):
        direct_ttfb, direct_total = asyncio.run(measure(direct, size))
        base_ttfb, base_total = statistics.median(direct_ttfb), statistics.median(direct_total)
        rows.append(
            [
                label,
                "direct to upstream",
                f"{base_ttfb * 1000:.1f}",
                f"{base_total * 1000:.1f}",
                "-",
                "-",
            ]
        )
        for name, (base, _) in targets.items():
            if name == "ceiling":
                continue
            ttfb, total = asyncio.run(measure(base, size))
            rows.append(
                [
                    label,
                    name,
                    f"{statistics.median(ttfb) * 1000:.1f}",
                    f"{statistics.median(total) * 1000:.1f}",
                    f"{(statistics.median(ttfb) - base_ttfb) * 1000:+.1f}",
                    f"{(statistics.median(total) - base_total) * 1000:+.1f}",
                ]
            )
    return rows


def section_coalesce(
    targets: dict[str, tuple[str, int]], upstream: str, sizes: dict[str, int]
) -> list[Row]:
    rows: list[Row] = []

    async def burst(base: str, clients: int, size: int) -> list[float]:
        object_id = new_id(size)
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(headers=AUTH, timeout=300, limits=limits) as client:
            results = await asyncio.gather(
                *(timed_get(client, url(base, object_id)) for _ in range(clients))
            )
        return sorted(total for _, total, _ in results)

    for (label, size), (name, (base, _)) in itertools.product(sizes.items(), targets.items()):
        if name == "ceiling":
            continue
        single = asyncio.run(burst(base, 1, size))[0]
        for clients in (16, 100):
            before = upstream_fetches(upstream)
            times = asyncio.run(burst(base, clients, size))
            fetches = upstream_fetches(upstream) - before
            rows.append(
                [
                    label,
                    name,
                    str(clients),
                    str(fetches),
                    f"{single * 1000:.0f}",
                    f"{times[0] * 1000:.0f}",
                    f"{statistics.median(times) * 1000:.0f}",
                    f"{times[-1] * 1000:.0f}",
                    f"{times[-1] / single:.2f}x",
                ]
            )
    return rows


def section_memory(targets: dict[str, tuple[str, int]], clients: int, size: int) -> list[Row]:
    """Peak RSS while ``clients`` curl processes stream one ``size`` artifact, first as a
    coalesced miss, then as hits."""
    rows: list[Row] = []
    curl = shutil.which("curl")
    for name, (base, pid) in targets.items():
        if name == "ceiling" or curl is None:
            continue
        object_id = new_id(size)
        peak = 0
        for phase in ("miss", "hit"):
            args = [
                curl,
                "-sf",
                "-o",
                "/dev/null",
                "-H",
                f"Authorization: Bearer {TOKEN}",
                url(base, object_id),
            ]
            started = time.monotonic()
            processes = [subprocess.Popen(args) for _ in range(clients)]
            while any(p.poll() is None for p in processes):
                peak = max(peak, tree_rss_kib(pid))
                time.sleep(0.05)
            elapsed = time.monotonic() - started
            if any(p.returncode for p in processes):
                raise RuntimeError(f"curl failed against {name}")
            peak = max(peak, rss_kib(pid, "VmHWM"))
            rows.append(
                [
                    name,
                    phase,
                    str(clients),
                    f"{size / GiB:.0f} GiB",
                    f"{elapsed:.1f}",
                    f"{clients * size / elapsed / 1e6:,.0f}",
                    f"{peak / 1024:.0f}",
                ]
            )
    return rows


def section_scale(counts: list[int]) -> list[Row]:
    """Hit latency of the disk tier and the proxy's start-up time, by number of entries."""
    import hashlib

    from proxy.store import EntryMeta
    from proxy.store.disk import DiskStore, _Adopt

    rows: list[Row] = []
    for count in counts:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as directory:
            store = DiskStore(directory, max_bytes=100 * GiB, max_object_bytes=GiB)
            body = b"x" * 8192
            meta = EntryMeta(
                "application/octet-stream", len(body), hashlib.sha256(body).hexdigest(), time.time()
            ).to_json()
            started = time.monotonic()
            for index in range(count):  # populate without fsync: this measures reads, not fills
                fill = store.begin_fill()
                fill.file.write(body)
                fill.file.close()
                store._cache.set(f"key-{index}", _Adopt(fill.path), read=True, tag=meta)
            populate = time.monotonic() - started
            store.close()
            started = time.monotonic()
            store = DiskStore(directory, max_bytes=100 * GiB, max_object_bytes=GiB)
            opened = time.monotonic() - started
            samples = []
            for index in range(0, count, max(1, count // 2000)):
                started = time.perf_counter()
                entry = store.get(f"key-{index}")
                assert entry is not None
                entry.file.read()
                entry.close()
                samples.append(time.perf_counter() - started)
            store.close()
            samples.sort()
            rows.append(
                [
                    f"{count:,}",
                    f"{populate:.1f}",
                    f"{opened * 1000:.1f}",
                    f"{statistics.median(samples) * 1e6:.0f}",
                    f"{samples[int(len(samples) * 0.99) - 1] * 1e6:.0f}",
                ]
            )
    return rows


def section_workers(upstream: str, seconds: float, proxy_args: list[str]) -> list[Row]:
    """Hit throughput with 1 and 2 worker processes, nothing pinned (both cores in play)."""
    rows: list[Row] = []
    results: dict[tuple[str, int], float] = {}
    for workers in (1, 2):
        port = free_port()
        with (
            tempfile.TemporaryDirectory(prefix="bench-workers-") as cache_dir,
            proxy(port, upstream, cache_dir, "--workers", str(workers), *proxy_args),
        ):
            base = f"http://127.0.0.1:{port}"
            for label, size in (("8 KiB", 8 * KiB), ("256 KiB", 256 * KiB), ("50 MiB", 50 * MiB)):
                object_id = new_id(size)
                for _ in range(4):  # warm every worker's memory index
                    httpx.get(url(base, object_id), headers=AUTH, timeout=120).raise_for_status()
                result = wrk(url(base, object_id), 32, seconds, pin=False)
                results[(label, workers)] = result["rps"]
                rows.append(
                    [
                        label,
                        str(workers),
                        f"{result['rps']:,.0f}",
                        f"{result['rps'] * size / 1e6:,.0f}",
                        f"{result['p50']:.2f}",
                        f"{result['p99']:.2f}",
                        f"{result['rps'] / results[(label, 1)]:.2f}x",
                    ]
                )
    return rows


# -- main ----------------------------------------------------------------------------------------


def table(title: str, header: list[str], rows: list[Row], note: str = "") -> str:
    lines = [f"### {title}", ""]
    if note:
        lines += [note, ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="short runs, skip the 1 GiB and 100k sections"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=["hits", "miss", "coalesce", "memory", "scale", "workers"],
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="per wrk run (default 8, quick 3)"
    )
    parser.add_argument("--latency", type=float, default=0.150, help="stand-in upstream latency, s")
    parser.add_argument("--proxy-args", default="", help="extra flags for vlmrun-cache serve")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.md")
    args = parser.parse_args()
    sections = set(args.only or ["hits", "miss", "coalesce", "memory", "scale", "workers"])
    seconds = args.seconds or (3 if args.quick else 8)
    ports = {name: free_port() for name in ("upstream", "proxy", "nginx", "ceiling")}
    upstream = f"http://127.0.0.1:{ports['upstream']}"
    out: list[str] = [
        f"# Benchmark, {datetime.date.today().isoformat()}",
        "",
        f"Machine: {machine()}. Upstream latency {args.latency * 1000:.0f} ms. "
        f"Servers on core {SERVER_CPU}, load generator on core {LOAD_CPU}. "
        f"wrk runs of {seconds:g} s. Command: `python bench/run.py {' '.join(sys.argv[1:])}`.",
        "",
    ]
    with (
        tempfile.TemporaryDirectory(prefix="bench-proxy-") as cache_dir,
        standin(ports["upstream"], args.latency, LOAD_CPU),
        proxy(
            ports["proxy"], upstream, cache_dir, *args.proxy_args.split(), cpu=SERVER_CPU
        ) as ours,
        nginx(ports["nginx"], ports["upstream"]) as ngx,
        ceiling(ports["ceiling"]) as ceil,
    ):
        targets: dict[str, tuple[str, int]] = {
            "proxy": (f"http://127.0.0.1:{ports['proxy']}", ours.pid)
        }
        if ngx is not None:
            targets["nginx"] = (f"http://127.0.0.1:{ports['nginx']}", ngx.pid)
        targets["ceiling"] = (f"http://127.0.0.1:{ports['ceiling']}", ceil.pid)
        runs: list[tuple[str, Callable[[], str]]] = [
            (
                "hits",
                lambda: table(
                    "Hits",
                    [
                        "size",
                        "conns",
                        "server",
                        "req/s",
                        "MB/s",
                        "p50 ms",
                        "p99 ms",
                        "server CPU µs/req",
                        "socket errors",
                        "vs nginx",
                        "vs ceiling",
                    ],
                    section_hits(targets, seconds),
                    "Repeated GETs of one cached artifact. `ceiling` serves the bytes from memory with no lookup, "
                    "access check or hashing.",
                ),
            ),
            (
                "miss",
                lambda: table(
                    "Misses",
                    ["size", "path", "TTFB ms", "total ms", "TTFB vs direct", "total vs direct"],
                    section_miss(targets, upstream, 3 if args.quick else 10),
                    "Medians of sequential first requests for new keys, against going straight to the upstream.",
                ),
            ),
            (
                "coalesce",
                lambda: table(
                    "Concurrent first requests for one new key",
                    [
                        "size",
                        "server",
                        "clients",
                        "upstream fetches",
                        "single miss ms",
                        "fastest ms",
                        "median ms",
                        "slowest ms",
                        "slowest / single",
                    ],
                    section_coalesce(targets, upstream, {"1 MiB": MiB, "16 MiB": 16 * MiB}),
                    "Each client's total time. With 16 MiB the clients together pull 256 MiB (1.6 GB "
                    "with 100) through one Python load-generator process: part of the spread is the client.",
                ),
            ),
            (
                "memory",
                lambda: table(
                    "Memory while 16 clients stream one large artifact",
                    ["server", "phase", "clients", "size", "seconds", "MB/s", "peak RSS MiB"],
                    section_memory(targets, 16, (256 * MiB) if args.quick else GiB),
                ),
            ),
            (
                "scale",
                lambda: table(
                    "Disk tier by number of entries (8 KiB each)",
                    ["entries", "populate s", "open ms", "hit p50 µs", "hit p99 µs"],
                    section_scale([1_000, 10_000] if args.quick else [1_000, 100_000]),
                    "Store-level: `DiskStore.get` + read of a random entry, and the time to open the store.",
                ),
            ),
            (
                "workers",
                lambda: table(
                    "Worker processes (hits, 32 connections, nothing pinned)",
                    ["size", "workers", "req/s", "MB/s", "p50 ms", "p99 ms", "vs 1 worker"],
                    section_workers(upstream, seconds, args.proxy_args.split()),
                    "wrk shares the two cores with the workers here, so this is a floor on the gain.",
                ),
            ),
        ]
        for name, run in runs:
            if name in sections:
                print(f"running {name}...", file=sys.stderr, flush=True)
                text = run()
                print(text, flush=True)
                out.append(text)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text("\n".join(out))  # after each section: a crash keeps the rest
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(out))
    print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
