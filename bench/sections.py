"""The benchmark's other sections: misses, concurrent first requests, memory while streaming,
the disk tier's scale and worker processes. Hits are in bench/hits.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from bench.common import TOKEN, free_port, proxy, rss_kib, tree_rss_kib
from bench.loadgen import wrk
from bench.servers import AUTH, Target, url

KiB, MiB, GiB = 1024, 1024**2, 1024**3
Row = list[str]
NewId = Callable[[int], str]


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


MISS_SIZES = {"8 KiB": 8 * KiB, "50 MiB": 50 * MiB}


def section_miss(
    targets: Sequence[Target], new_id: NewId, repeats: int
) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """For each size, each target's (TTFB, total) of ``repeats`` first requests for new keys,
    in seconds, taken in turn: direct, proxy, nginx, direct, ..."""

    async def measure(size: int) -> dict[str, tuple[list[float], list[float]]]:
        times: dict[str, tuple[list[float], list[float]]] = {t.name: ([], []) for t in targets}
        async with contextlib.AsyncExitStack() as stack:
            clients = [  # one each, so that each keeps its own connection alive
                await stack.enter_async_context(httpx.AsyncClient(headers=AUTH, timeout=120))
                for _ in targets
            ]
            for _ in range(repeats):
                for target, client in zip(targets, clients, strict=True):
                    first, whole, received = await timed_get(client, url(target.base, new_id(size)))
                    if received != size:
                        raise RuntimeError(f"{target.name}: {received} bytes of {size}")
                    times[target.name][0].append(first)
                    times[target.name][1].append(whole)
        return times

    return {label: asyncio.run(measure(size)) for label, size in MISS_SIZES.items()}


def miss_rows(
    times: dict[str, dict[str, tuple[list[float], list[float]]]], direct: str
) -> list[Row]:
    rows: list[Row] = []
    for label, by_target in times.items():
        base_ttfb = statistics.median(by_target[direct][0])
        base_total = statistics.median(by_target[direct][1])
        for name, (ttfb, total) in by_target.items():
            first, whole = statistics.median(ttfb), statistics.median(total)
            rows.append(
                [
                    label,
                    name,
                    f"{first * 1000:.1f} ({min(ttfb) * 1000:.1f}-{max(ttfb) * 1000:.1f})",
                    f"{whole * 1000:.1f}",
                    "-" if name == direct else f"{(first - base_ttfb) * 1000:+.1f}",
                    "-" if name == direct else f"{(whole - base_total) * 1000:+.1f}",
                ]
            )
    return rows


def section_coalesce(
    targets: Sequence[Target], upstream: str, sizes: dict[str, int], new_id: NewId
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

    for (label, size), target in itertools.product(sizes.items(), targets):
        single = asyncio.run(burst(target.base, 1, size))[0]
        for clients in (16, 100):
            before = upstream_fetches(upstream)
            times = asyncio.run(burst(target.base, clients, size))
            fetches = upstream_fetches(upstream) - before
            rows.append(
                [
                    label,
                    target.name,
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


def section_memory(targets: Sequence[Target], clients: int, size: int, new_id: NewId) -> list[Row]:
    """Peak RSS while ``clients`` curl processes stream one ``size`` artifact, first as a
    coalesced miss, then as hits."""
    rows: list[Row] = []
    curl = shutil.which("curl")
    if curl is None:
        return rows
    for target in targets:
        object_id = new_id(size)
        for phase in ("miss", "hit"):
            peak = 0
            reset_peak(target.pid)  # this phase's peak, not the process's since it started
            args = [curl, "-sf", "-o", "/dev/null", "-H", f"Authorization: Bearer {TOKEN}"]
            args.append(url(target.base, object_id))
            started = time.monotonic()
            processes = [subprocess.Popen(args) for _ in range(clients)]
            while any(p.poll() is None for p in processes):
                peak = max(peak, tree_rss_kib(target.pid))
                time.sleep(0.05)
            elapsed = time.monotonic() - started
            if any(p.returncode for p in processes):
                raise RuntimeError(f"curl failed against {target.name}")
            peak = max(peak, rss_kib(target.pid, "VmHWM"))
            rows.append(
                [
                    target.name,
                    phase,
                    str(clients),
                    f"{size / GiB:g} GiB",
                    f"{elapsed:.1f}",
                    f"{clients * size / elapsed / 1e6:,.0f}",
                    f"{peak / 1024:.0f}",
                ]
            )
    return rows


def reset_peak(pid: int) -> None:
    """Reset the kernel's peak RSS (VmHWM) of ``pid`` (``clear_refs``; Linux, own processes)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def section_scale(counts: list[int]) -> list[Row]:
    """Hit latency of the disk tier and the proxy's start-up time, by number of entries."""
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
                store._cache.set(f"key-{index}", _Adopt(fill.path, len(body)), read=True, tag=meta)
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


def section_workers(
    upstream: str, seconds: float, proxy_args: list[str], logs: Path, new_id: NewId
) -> list[Row]:
    """Hit throughput with 1 and 2 worker processes, nothing pinned (both cores in play)."""
    rows: list[Row] = []
    results: dict[tuple[str, int], float] = {}
    for workers in (1, 2):
        port = free_port()
        with (
            tempfile.TemporaryDirectory(prefix="bench-workers-") as cache_dir,
            proxy(
                port,
                upstream,
                cache_dir,
                "--workers",
                str(workers),
                *proxy_args,
                log=logs / f"proxy-{workers}-workers.log",
            ),
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
