"""Hits, measured in alternating rounds: the proxy beside its ceilings and nginx, and the proxy
idle beside the proxy under attack.

Each round runs wrk once against every server of a comparison, in the same order (proxy,
ceilings, nginx, then proxy again in the next round), so that drift on a shared machine hits
all alike. A ratio is computed within each round and the table gives the median of the rounds
with the smallest and largest, never a ratio of medians taken at different times.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from bench.common import pinned, stop
from bench.loadgen import Load, wrk
from bench.servers import (
    LOAD_CPU,
    Target,
    check_hit,
    cpu_seconds,
    descendants,
    foreign_cpu_seconds,
    url,
)

KiB, MiB = 1024, 1024**2


@dataclass(frozen=True)
class Arm:
    """One column of a comparison: a server, and what else happens while it is measured."""

    label: str
    target: Target
    during: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext
    #: Request header fields besides Authorization (``Name: value``).
    headers: tuple[str, ...] = ()


@dataclass
class Sample:
    load: Load
    #: Server CPU time per request, µs.
    cpu_us: float
    #: Server CPU time per second of the run, in cores: a Python server that is not at 1.00 at
    #: 32 connections was kept from its core by something else.
    cores: float
    #: CPU used meanwhile by processes outside the benchmark, in cores (0.25: a quarter of one).
    foreign: float


def spread(values: Sequence[float], fmt: str = ",.0f") -> str:
    """``median (min-max)``."""
    low, high = min(values), max(values)
    return f"{statistics.median(values):{fmt}} ({low:{fmt}}-{high:{fmt}})"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def per_round(a: list[Sample], b: list[Sample], what: Callable[[Sample], float]) -> list[float]:
    """``what(a) / what(b)`` in each round."""
    return [what(x) / what(y) for x, y in zip(a, b, strict=True)]


def rps(sample: Sample) -> float:
    return sample.load["rps"]


def p99(sample: Sample) -> float:
    return sample.load["p99"]


#: A round during which processes outside the benchmark used more than this (cores) is run
#: again: on a shared machine, a neighbour's burst is not a property of the server.
BUSY_NEIGHBOURS = 0.2


@dataclass
class Rounds:
    """Each arm's samples, one per kept round, and how many rounds were run again."""

    samples: dict[str, list[Sample]]
    repeated: int = 0


def alternate(
    arms: Sequence[Arm], object_id: str, size: int, connections: int, seconds: float, rounds: int
) -> Rounds:
    """``rounds`` rounds of one wrk run per arm, in order; each run checked to have carried the
    whole body in every answer (a fast error page would look like a fast server). A round that
    other processes disturbed (:data:`BUSY_NEIGHBOURS`) is run again, up to ``rounds`` times in
    all; after that, disturbed rounds are kept (and the tables say how busy the machine was)."""
    result = Rounds({arm.label: [] for arm in arms})
    pids = {arm.target.pid for arm in arms}
    while len(result.samples[arms[0].label]) < rounds:
        taken = {}
        for arm in arms:
            quiesce(pids)
            taken[arm.label] = measure(arm, object_id, size, connections, seconds)
        disturbed = max(sample.foreign for sample in taken.values()) > BUSY_NEIGHBOURS
        if disturbed and result.repeated < rounds:
            result.repeated += 1
            continue
        for label, sample in taken.items():
            result.samples[label].append(sample)
    return result


def quiesce(pids: set[int], limit: float = 3.0) -> None:
    """Wait (up to ``limit`` seconds) until the servers ``pids`` use no CPU for 100 ms.

    wrk closes hundreds of connections at the end of a run, some with a request in flight; the
    server tearing them down must not share the core with the next run's server (back to back
    at 500 connections, the next server's p99 had second-long tails that a pause removed)."""
    deadline = time.monotonic() + limit
    before = sum(cpu_seconds(pid) for pid in pids)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = sum(cpu_seconds(pid) for pid in pids)
        if now != before:  # CPU time counts in clock ticks (10 ms): any change is work
            before, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= 0.1:
            return


def measure(arm: Arm, object_id: str, size: int, connections: int, seconds: float) -> Sample:
    """One wrk run against ``arm``, with the CPU its server and everyone else used meanwhile."""
    with arm.during():
        ours = descendants(os.getpid())
        foreign = foreign_cpu_seconds(ours)
        before = cpu_seconds(arm.target.pid)
        started = time.monotonic()
        load = wrk(url(arm.target.base, object_id), connections, seconds, headers=arm.headers)
        cpu = cpu_seconds(arm.target.pid) - before
        foreign = max(0.0, foreign_cpu_seconds(ours) - foreign)
        elapsed = time.monotonic() - started
    # wrk prints the bytes it read with two decimals (e.g. 1.23GB): allow 1 %.
    if load["bytes_per_request"] and load["bytes_per_request"] < size * 0.99:
        raise RuntimeError(
            f"{arm.label}: {load['bytes_per_request']:,.0f} bytes per answer for a {size:,}"
            "-byte artifact: it did not send the artifact"
        )
    sample = Sample(load, cpu / max(load["requests"], 1) * 1e6, cpu / elapsed, foreign / elapsed)
    print(
        f"    {arm.label}: {load['rps']:,.0f} req/s, p99 {load['p99']:.2f} ms, server "
        f"{sample.cores:.2f} cores, others {sample.foreign:.2f}",
        file=sys.stderr,
        flush=True,
    )
    return sample


@dataclass(frozen=True)
class Comparison:
    label: str
    size: int
    connections: int
    #: The first arm is the proxy; every other is compared with it.
    arms: tuple[Arm, ...]
    #: Of each wrk run, as a share of the usual length (large bodies need fewer requests).
    length: float = 1.0


@dataclass
class Result:
    comparison: Comparison
    samples: dict[str, list[Sample]]
    #: Rounds run again because other processes were busy.
    repeated: int
    #: The faster of nginx's two arms (by median req/s), if nginx ran.
    nginx: str | None = None

    def ratio(self, other: str, what: Callable[[Sample], float] = rps) -> list[float]:
        proxy = self.comparison.arms[0].label
        return per_round(self.samples[proxy], self.samples[other], what)


def run_comparisons(
    comparisons: Sequence[Comparison], new_id: Callable[[int], str], seconds: float, rounds: int
) -> list[Result]:
    results = []
    for comparison in comparisons:
        object_id = new_id(comparison.size)
        for arm in comparison.arms:
            check_hit(arm.target, object_id, comparison.size)
        print(f"  {comparison.label} x {comparison.connections}", file=sys.stderr, flush=True)
        length = seconds * comparison.length
        taken = alternate(
            comparison.arms, object_id, comparison.size, comparison.connections, length, rounds
        )
        samples = taken.samples
        nginx = [label for label in samples if label.startswith("nginx")]
        fastest = max(
            nginx, key=lambda label: median([rps(s) for s in samples[label]]), default=None
        )
        results.append(Result(comparison, samples, taken.repeated, fastest))
    return results


def hit_rows(results: Sequence[Result]) -> list[list[str]]:
    rows = []
    for result in results:
        comparison = result.comparison
        for index, arm in enumerate(comparison.arms):
            samples = result.samples[arm.label]
            name = arm.label
            if arm.label == result.nginx and len([a for a in result.samples if "nginx" in a]) > 1:
                name += ", the faster"
            rows.append(
                [
                    comparison.label,
                    str(comparison.connections),
                    name,
                    spread([rps(s) for s in samples]),
                    f"{median([rps(s) for s in samples]) * comparison.size / 1e6:,.0f}",
                    f"{median([s.load['p50'] for s in samples]):.2f}",
                    spread([p99(s) for s in samples], ".2f"),
                    f"{median([s.cpu_us for s in samples]):,.0f}",
                    f"{median([s.cores for s in samples]):.2f}",
                    "-" if index == 0 else spread(result.ratio(arm.label), ".2f"),
                ]
            )
    return rows


# -- under attack --------------------------------------------------------------------------------


@dataclass
class AttackTally:
    """What the attackers reported, one entry per round."""

    rounds: list[dict[str, int]] = field(default_factory=list)


@contextlib.contextmanager
def attackers(
    port: int, silent: int, dribble: int, settle: float, tally: AttackTally, limit: float
) -> Iterator[None]:
    """bench/attackers.py against ``port`` on the load core, for the block: it is ready (every
    connection open) and has been for ``settle`` seconds when the block starts; it is stopped by
    its PID when it ends, and exits by itself after ``limit`` seconds whatever happens."""
    args = [sys.executable, "bench/attackers.py", "--port", str(port)]
    args += ["--silent", str(silent), "--dribble", str(dribble), "--seconds", str(limit)]
    process = subprocess.Popen(pinned(args, LOAD_CPU), stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    try:
        readable, _, _ = select.select([process.stdout], [], [], 30)
        if not readable or process.stdout.readline().strip() != "ready":
            raise RuntimeError("the attackers did not get their connections open in 30 s")
        time.sleep(settle)
        yield
    finally:
        stop(process)
    report = process.stdout.read().strip().splitlines()
    if report:
        tally.rounds.append(json.loads(report[-1]))


def attack_rows(idle: list[Sample], attacked: list[Sample]) -> list[list[str]]:
    rows = []
    for label, samples in (("idle", idle), ("under attack", attacked)):
        rows.append(
            [
                label,
                spread([rps(s) for s in samples]),
                spread([s.load["p50"] for s in samples], ".2f"),
                spread([p99(s) for s in samples], ".2f"),
                f"{median([s.cores for s in samples]):.2f}",
                "-" if samples is idle else spread(per_round(attacked, idle, p99), ".2f"),
            ]
        )
    return rows


def foreign_note(samples: Sequence[Sample], repeated: int) -> str:
    """How busy the rest of the machine was during ``samples``, for a table's note."""
    shares = sorted(s.foreign * 100 for s in samples)
    return (
        f"Processes outside the benchmark used {statistics.median(shares):.0f}% of a core "
        f"during the median run kept, {shares[-1]:.0f}% at most; {repeated} round"
        f"{'' if repeated == 1 else 's'} run again because they used over "
        f"{BUSY_NEIGHBOURS:.0%} of one."
    )
