"""The benchmark: our proxy beside its Python ceilings and nginx's proxy_cache, same machine,
same run.

    python bench/run.py                 # everything (about 10 minutes)
    python bench/run.py --quick         # fewer, shorter runs (to bench/results/quick.md)
    python bench/run.py --only hits --out /tmp/hits.md
                                        # one section: hits, attack, miss, misses, coalesce,
                                        # memory, scale, workers (without --out, it overwrites
                                        # bench/results/latest.md with that section alone)

Starts on loopback: the stand-in API (150 ms latency by default), the proxy as ``serve`` runs
(no flags but the upstream, the cache directory and the port; default log level, its log to a
file), a second proxy with its access log off, the two ceilings of bench/ceiling.py (Starlette
and raw ASGI, on the proxy's server, protocol and loop), and nginx (when installed) on two ports,
sendfile on and off (bench/servers.py). Servers are pinned to core 0; wrk and the attackers to
core 1. Hits are measured in alternating rounds and compared within each round (bench/hits.py).

Writes bench/results/latest.md (the date, the machine, the method and the tables) and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import misses
from bench.common import ROOT, access_log_off_means, free_port, proxy, standin
from bench.hits import (
    Arm,
    AttackTally,
    Comparison,
    Result,
    alternate,
    attack_rows,
    attackers,
    foreign_note,
    hit_rows,
    median,
    p99,
    per_round,
    rps,
    run_comparisons,
    spread,
)
from bench.loadgen import wrk, wrk_version
from bench.sections import (
    miss_rows,
    section_coalesce,
    section_memory,
    section_miss,
    section_scale,
    section_workers,
)
from bench.servers import (
    LOAD_CPU,
    SERVER_CPU,
    ForeignShare,
    Target,
    ceiling,
    check_hit,
    cpu_seconds,
    descendants,
    foreign_cpu_seconds,
    header_names,
    loaded,
    nginx,
    nginx_version,
    url,
)

# What bench/accesslog.py imported from here before bench/servers.py and bench/loadgen.py
# existed (copies of it on other branches still do).
__all__ = ["SERVER_CPU", "cpu_seconds", "url", "wrk"]

KiB, MiB, GiB = 1024, 1024**2, 1024**3
SECTIONS = ["hits", "attack", "miss", "misses", "coalesce", "memory", "scale", "workers"]
ATTACK = {"silent": 400, "dribble": 100}
_serial = iter(range(10**9))


def new_id(size: int) -> str:
    return f"arr_{size}_k{next(_serial)}_{os.getpid()}"


@dataclass(frozen=True)
class Plan:
    """How long and how often: the whole run, or ``--quick``."""

    seconds: float  # per wrk run of a hit comparison
    rounds: int
    attack_seconds: float  # per wrk run, idle and under attack
    settle: float  # attackers connected this long before wrk starts
    miss_repeats: int
    memory_size: int
    scale_counts: tuple[int, ...]
    workers_seconds: float  # per wrk run of the workers section (32 clients of 50 MiB: long)

    @classmethod
    def of(cls, args: argparse.Namespace) -> Plan:
        quick = cls(1, 3, 2, 0.5, 3, 256 * MiB, (1_000, 10_000), 2)
        # Attack runs: wrk from 1.5 s to 5.5 s after the attackers connect, so that the proxy's
        # closing of the silent ones (5 s, its keep-alive timeout) falls inside.
        full = cls(2, 5, 4, 1.5, 10, 512 * MiB, (1_000, 100_000), 3)
        plan = quick if args.quick else full
        return cls(
            args.seconds or plan.seconds,
            args.rounds or plan.rounds,
            args.seconds or plan.attack_seconds,
            plan.settle,
            plan.miss_repeats,
            plan.memory_size,
            plan.scale_counts,
            args.seconds or plan.workers_seconds,
        )


def table(title: str, header: list[str], rows: list[list[str]], note: str = "") -> str:
    lines = [f"### {title}", ""]
    if note:
        lines += [note, ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def commit() -> str:
    """The commit measured, ``+changes`` if anything but bench/results differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    changed = git("status", "--porcelain", "--", ".", ":!bench/results").strip()
    return f"{head}{' +changes' if changed else ''}"


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import uvicorn

    return (
        f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, uvicorn {uvicorn.__version__}, "
        f"nginx {nginx_version()}, wrk {wrk_version()}"
    )


class Report:
    """The results file: a header, the key figures, then each section's table as it finishes
    (rewritten after each, so that a crash keeps what was measured)."""

    def __init__(self, path: Path, header: str) -> None:
        self.path = path
        self.header = header
        self.key: list[list[str]] = []
        self.sections: list[str] = []

    def add(self, text: str) -> None:
        print(text, flush=True)
        self.sections.append(text)
        self.write()

    def write(self) -> None:
        key = table(
            "Key figures",
            ["figure", "result", "how"],
            self.key,
            "Ratios are proxy ÷ baseline within each round: median of the rounds (min-max).",
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join([self.header, key, *self.sections]))


#: A condition that does not hold: the answer is the same 200, but a hit with a condition is
#: answered by the ASGI route, not at once in the protocol (proxy/front.py).
STALE_ETAG = 'If-None-Match: "stale"'
ROUTED = "proxy, through the ASGI route (If-None-Match, stale)"


def _baselines(targets: dict[str, Target]) -> list[Arm]:
    return [Arm("Starlette ceiling", targets["starlette"]), Arm("raw ASGI", targets["raw"])]


def hit_comparisons(targets: dict[str, Target]) -> list[Comparison]:
    """Hits at 32 connections (and 1 for 50 MiB), against both of nginx's configurations."""
    proxy_arm = Arm("proxy", targets["proxy"])
    others = _baselines(targets)
    others += [Arm(name, targets[name]) for name in targets if name.startswith("nginx")]
    quiet = Arm("proxy, access log off", targets["quiet"])
    routed = Arm(ROUTED, targets["proxy"], headers=(STALE_ETAG,))
    return [
        Comparison("8 KiB", 8 * KiB, 32, (proxy_arm, quiet, routed, *others)),
        Comparison("256 KiB", 256 * KiB, 32, (proxy_arm, *others)),
        # Each request takes 10-25 ms: half as long still makes 40 or more a run.
        Comparison("50 MiB", 50 * MiB, 1, (proxy_arm, *others), length=0.5),
    ]


#: The 500-connection runs, as a share of the usual length.
CROWD_LENGTH = 3.0


def crowd_comparison(targets: dict[str, Target], nginx: str | None) -> Comparison:
    """8 KiB hits at 500 connections, against the nginx configuration ``nginx`` only; and the
    raw app behind the proxy's guards, which tells the guards' share of the proxy's tail."""
    guarded = Arm("raw ASGI behind the proxy's guards", targets["guarded"])
    others = [*_baselines(targets), guarded]
    others += [Arm(nginx, targets[nginx])] if nginx else []
    # 3x as long: wrk opens its 500 connections at the start of each run, and the first
    # second's tail (p99 up to 1.4 s in 2 s runs, in every server here) is not the steady state.
    proxy = Arm("proxy", targets["proxy"])
    return Comparison("8 KiB", 8 * KiB, 500, (proxy, *others), length=CROWD_LENGTH)


def hit_key_figures(results: list[Result], seconds: float, rounds: int) -> list[list[str]]:
    rows = []
    for result in results:
        c = result.comparison
        length = max(1, round(seconds * c.length))
        how = f"wrk, {rounds} alternating rounds of {length} s"
        where = f"{c.label} hits, {c.connections} conn{'s' if c.connections > 1 else ''}"
        if (c.label, c.connections) in (("8 KiB", 32), ("256 KiB", 32)):
            for other in ("Starlette ceiling", "raw ASGI"):
                rows.append([f"{where}: proxy ÷ {other}", spread(result.ratio(other), ".2f"), how])
        if (c.label, c.connections) == ("50 MiB", 1) and result.nginx:
            ratio = spread(result.ratio(result.nginx), ".2f")
            rows.append([f"{where}: proxy ÷ {result.nginx} (the faster)", ratio, how])
        if c.label == "8 KiB":
            samples = result.samples["proxy"]
            latency = (
                f"p50 {median([s.load['p50'] for s in samples]):.2f} ms, "
                f"p99 {spread([p99(s) for s in samples], '.2f')} ms"
            )
            rows.append([f"{where}: proxy latency", latency, how])
        if "raw ASGI behind the proxy's guards" in result.samples:
            plain = median([p99(s) for s in result.samples["raw ASGI"]])
            guarded = median([p99(s) for s in result.samples["raw ASGI behind the proxy's guards"]])
            rows.append(
                [
                    f"{where}: raw ASGI p99, plain → behind the proxy's guards",
                    f"{plain:.2f} → {guarded:.2f} ms",
                    how,
                ]
            )
        if "proxy, access log off" in result.samples:
            on_off = spread(result.ratio("proxy, access log off"), ".2f")
            rows.append([f"{where}: req/s, access log on ÷ off", on_off, how])
        if ROUTED in result.samples:
            routed = per_round(result.samples[ROUTED], result.samples["Starlette ceiling"], rps)
            rows.append([f"{where}: {ROUTED} ÷ Starlette ceiling", spread(routed, ".2f"), how])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short and few runs")
    parser.add_argument("--only", action="append", choices=SECTIONS)
    parser.add_argument("--seconds", type=float, help="per wrk run (default 2, quick 1)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 5, quick 3)")
    parser.add_argument("--latency", type=float, default=0.150, help="stand-in upstream latency, s")
    parser.add_argument(
        "--proxy-args", default="", help="extra flags for serve (default none: as a user runs it)"
    )
    parser.add_argument(
        "--out", type=Path, help="default bench/results/latest.md (quick: quick.md, not committed)"
    )
    args = parser.parse_args()
    args.out = args.out or ROOT / "bench" / "results" / ("quick.md" if args.quick else "latest.md")
    sections = set(args.only or SECTIONS)
    plan = Plan.of(args)
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    try:
        run(args, sections, plan, logs)
    except BaseException:
        print(f"the servers' logs are in {logs}", file=sys.stderr)
        raise
    shutil.rmtree(logs, ignore_errors=True)
    print(f"written to {args.out}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace, sections: set[str], plan: Plan, logs: Path) -> None:
    extra = args.proxy_args.split()
    names = ("upstream", "proxy", "quiet", "starlette", "raw", "guarded")
    ports = {name: free_port() for name in names}
    ports |= {"nginx, sendfile on": free_port(), "nginx, sendfile off": free_port()}
    upstream = f"http://127.0.0.1:{ports['upstream']}"
    busy_before = busy_elsewhere(2.0)
    if busy_before > 0.1:
        print(
            f"warning: other processes are using {busy_before:.0%} of a core: the figures will "
            "show it (see the notes under each table)",
            file=sys.stderr,
        )
    busy = ForeignShare()
    with contextlib.ExitStack() as stack:
        cache = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-proxy-")))
        stack.enter_context(standin(ports["upstream"], args.latency, LOAD_CPU, logs / "api.log"))
        started = {
            "proxy": proxy(
                ports["proxy"],
                upstream,
                str(cache / "a"),
                *extra,
                log=logs / "proxy.log",
                cpu=SERVER_CPU,
            ),
            "quiet": proxy(
                ports["quiet"],
                upstream,
                str(cache / "b"),
                *extra,
                log=logs / "quiet.log",
                cpu=SERVER_CPU,
                access_log=False,
            ),
            "starlette": ceiling(ports["starlette"], "starlette", logs),
            "raw": ceiling(ports["raw"], "raw", logs),
            "guarded": ceiling(ports["guarded"], "raw", logs, guards=True),
        }
        targets = {
            name: Target(name, f"http://127.0.0.1:{ports[name]}", stack.enter_context(cm).pid)
            for name, cm in started.items()
        }
        ngx = stack.enter_context(
            nginx(
                ports["nginx, sendfile on"], ports["nginx, sendfile off"], ports["upstream"], logs
            )
        )
        if ngx is not None:
            for name in ("nginx, sendfile on", "nginx, sendfile off"):
                targets[name] = Target(name, f"http://127.0.0.1:{ports[name]}", ngx.pid)
        report = Report(args.out, header(args, plan, targets, busy_before))
        bench = Bench(targets, upstream, plan, args, logs, report)
        for name, section in SECTION_RUNNERS.items():
            if name in sections:
                minutes = (time.monotonic() - busy.started) / 60
                print(f"running {name} (at {minutes:.1f} min)...", file=sys.stderr, flush=True)
                section(bench)
        report.add(
            f"Whole run: {(time.monotonic() - busy.started) / 60:.1f} minutes; processes "
            f"outside the benchmark used {busy.cores():.0%} of a core over it on average.\n"
        )


def busy_elsewhere(seconds: float) -> float:
    """CPU used by processes outside the benchmark over the next ``seconds``, in cores."""
    ours = descendants(os.getpid())
    before = foreign_cpu_seconds(ours)
    time.sleep(seconds)
    return max(0.0, foreign_cpu_seconds(ours) - before) / seconds


def header(
    args: argparse.Namespace, plan: Plan, targets: dict[str, Target], busy_before: float
) -> str:
    """Date, machine, the method, and the checks that the servers are what the tables say."""
    python = ("proxy", "quiet", "starlette", "raw", "guarded")
    libraries = {
        lib: all(loaded(targets[n].pid, lib) for n in python) for lib in ("uvloop", "httptools")
    }
    probe = new_id(8 * KiB)
    names = {n: header_names(check_hit(t, probe, 8 * KiB)) for n, t in targets.items()}
    differ = [n for n in ("starlette", "raw", "guarded") if names[n] != names["proxy"]]
    if differ:
        print(
            f"warning: a hit's header fields differ between the proxy and {', '.join(differ)}: "
            "bring bench/ceiling.py's up to date",
            file=sys.stderr,
        )
    fields = ", ".join(sorted(names["proxy"]))
    return "\n".join(
        [
            f"# Benchmark, {datetime.date.today().isoformat()}",
            "",
            f"Machine: {machine()}. Code: {commit()}. "
            f"Command: `{' '.join(['python', 'bench/run.py', *sys.argv[1:]])}`.",
            "",
            f"Upstream: the stand-in API (tests/standin.py) with {args.latency * 1000:.0f} ms of "
            f"latency per artifact. Servers pinned to core {SERVER_CPU}; wrk (`-t1`, keep-alive, "
            f"`--latency`) and the attackers to core {LOAD_CPU}; everything on 127.0.0.1.",
            "",
            "Servers:",
            "",
            "* **proxy**: `python -m proxy serve --port P --upstream U --cache-dir D` and nothing "
            "else: default settings (log level info, access log on), its stdout and stderr "
            f"appended to a file.{' Extra flags: `' + args.proxy_args + '`.' if args.proxy_args else ''}",
            f"* **proxy, access log off**: the same, with {access_log_off_means()}.",
            f"* **{ROUTED}** (8 KiB at 32 only): the proxy above, each request with "
            f"`{STALE_ETAG}`. The answer is the same 200 with the whole body, but a hit with a "
            "condition is answered by the ASGI route (as any hit from disk, Redis or a range is), "
            "not at once in the protocol like the plain memory hits of the row **proxy** "
            "(proxy/front.py).",
            "* **Starlette ceiling** / **raw ASGI**: bench/ceiling.py, the bytes from memory with "
            "a hit's header fields, no lookup, access check, hashing, guards or log: the most an "
            "ASGI app can do on this server, with a framework and without one. Same server "
            "(uvicorn), protocol, loop, keep-alive setting and process count (1) as the proxy: "
            "`http_protocol` and `uvicorn_options` of proxy/cli.py, uvicorn's `auto` loop.",
            "* **raw ASGI behind the proxy's guards** (500 connections only, a diagnostic): the "
            "raw app on the proxy's own protocol, `uvicorn_options` unchanged.",
            "* **nginx**: `proxy_cache` keyed on the three query parameters, `proxy_cache_lock`, "
            "upstream keep-alive, access log off, `tcp_nopush` off (on was slower here), 1 worker "
            "process; one instance and one cache on two ports, `sendfile on` and `sendfile off`. "
            "Comparisons name the faster.",
            "",
            "Checks before measuring: every server answered a repeat GET with 200 and the whole "
            "body (and the proxy with `X-Cache: HIT`); every wrk run below received at least the "
            "artifact's size per answer; "
            f"uvloop {'and httptools are' if all(libraries.values()) else 'or httptools is NOT'} "
            "mapped in every Python server's process; header fields of a hit other than Date and "
            f"Server: proxy {fields}; the ceilings "
            + ("the same." if not differ else f"DIFFER ({', '.join(differ)}).")
            + " A figure that looks too good is a bug in the benchmark until shown otherwise.",
            "",
            f"Absolute numbers on a shared {os.cpu_count()}-core machine are noisy; the ratios, "
            "taken within each round of alternating runs, are the result. Before the run, "
            f"processes outside the benchmark used {busy_before:.0%} of a core (over 2 s); the hit "
            "tables say how much they used while measured, the last line over the whole run.",
            "",
        ]
    )


# -- sections ------------------------------------------------------------------------------------


@dataclass
class Bench:
    """What every section gets: the servers, the plan, where to write."""

    targets: dict[str, Target]
    upstream: str
    plan: Plan
    args: argparse.Namespace
    logs: Path
    report: Report


def run_hits(bench: Bench) -> None:
    plan = bench.plan
    results = run_comparisons(hit_comparisons(bench.targets), new_id, plan.seconds, plan.rounds)
    # At 500 connections, only the nginx that was faster at 8 KiB and 32: the whole benchmark
    # is meant to take about 5 minutes.
    more = [crowd_comparison(bench.targets, results[0].nginx)]
    results += run_comparisons(more, new_id, plan.seconds, plan.rounds)
    bench.report.key += hit_key_figures(results, plan.seconds, plan.rounds)
    bench.report.add(
        table(
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
                "server CPU, cores",
                "proxy ÷ this, req/s",
            ],
            hit_rows(results),
            f"Repeated GETs of one cached artifact: wrk, `-t1`, the connections shown, "
            f"{max(1, round(plan.seconds))} s per run (50 MiB: {max(1, round(plan.seconds / 2))} s; "
            f"500 connections: {max(1, round(plan.seconds * CROWD_LENGTH))} s, as wrk opens every "
            "connection at the start of a run and the first second is not the steady state), "
            f"{plan.rounds} rounds alternating proxy, proxy with its "
            "access log off and the proxy through its ASGI route (8 KiB at 32 only), Starlette "
            "ceiling, raw ASGI, nginx sendfile on, "
            "nginx sendfile off (at 500 connections only the nginx faster at 8 KiB and 32, and "
            "also the raw ASGI app behind the proxy's guards, proxy/protocols.py: a diagnostic). "
            "req/s, p99 and the ratio: median of the rounds (min-max); the "
            "ratio is computed within each round. p50, MB/s and CPU: medians. Server CPU is "
            "user + system time of the server's processes during the run, per request and per "
            "second (cores: 1.00 is all of core 0; a Python server well below it at 32 "
            "connections was probably kept off its core). "
            + foreign_note(
                [s for r in results for each in r.samples.values() for s in each],
                sum(r.repeated for r in results),
            ),
        )
    )


def run_attack(bench: Bench) -> None:
    plan, target = bench.plan, bench.targets["proxy"]
    port = int(target.base.rsplit(":", 1)[1])
    tally = AttackTally()
    limit = plan.attack_seconds + plan.settle + 60

    def attack() -> contextlib.AbstractContextManager[object]:
        return attackers(port, ATTACK["silent"], ATTACK["dribble"], plan.settle, tally, limit)

    arms = [Arm("idle", target), Arm("under attack", target, attack)]
    object_id = new_id(8 * KiB)
    check_hit(target, object_id, 8 * KiB)
    taken = alternate(arms, object_id, 8 * KiB, 32, plan.attack_seconds, plan.rounds)
    idle, attacked = taken.samples["idle"], taken.samples["under attack"]
    ratio = per_round(attacked, idle, p99)
    verdict = "met" if median(ratio) <= 2 else "NOT met"
    held = [r["open"] for r in tally.rounds]
    closed = sum(r["closed_by_server"] for r in tally.rounds)
    attackers_note = (
        f"{ATTACK['silent']} silent connections and {ATTACK['dribble']} that send an endless "
        "request head one byte every 100 ms (raw sockets, bench/attackers.py, one process "
        f"pinned to core {LOAD_CPU}), all open {plan.settle:g} s before wrk starts and reopened "
        "whenever the proxy closes them; stopped by PID after the run. Open when stopped: "
        f"{min(held, default=0)}-{max(held, default=0)} of {sum(ATTACK.values())}; closed by the "
        f"proxy during the runs and reopened: {closed} in all."
    )
    how = f"wrk 32 conns, {plan.rounds} alternating rounds of {plan.attack_seconds:g} s"
    bench.report.key.append(
        [
            "8 KiB hits, 32 conns: proxy p99 idle → under attack",
            f"{median([p99(s) for s in idle]):.2f} → {median([p99(s) for s in attacked]):.2f} ms; "
            f"ratio {spread(ratio, '.2f')}; goal ≤ 2x {verdict}",
            how,
        ]
    )
    bench.report.add(
        table(
            "Hits under attack",
            ["proxy", "req/s", "p50 ms", "p99 ms", "proxy CPU, cores", "p99 ÷ idle"],
            attack_rows(idle, attacked),
            f"8 KiB hits on the proxy: wrk, 32 connections, {plan.attack_seconds:g} s per run, "
            f"{plan.rounds} rounds alternating idle and under attack; median (min-max), the "
            f"ratio within each round. Attackers: {attackers_note} Goal: p99 under attack ≤ 2x "
            f"idle: {verdict}. " + foreign_note(idle + attacked, taken.repeated),
        )
    )


def run_miss(bench: Bench) -> None:
    repeats = bench.plan.miss_repeats
    direct = Target("direct to upstream", bench.upstream, 0)
    paths = [direct, bench.targets["proxy"], *nginx_for_streams(bench)]
    times = section_miss(paths, new_id, repeats)
    for label, by_path in times.items():
        ttfb = statistics.median(by_path["proxy"][0]) * 1000
        base = statistics.median(by_path[direct.name][0]) * 1000
        bench.report.key.append(
            [
                f"{label} miss: TTFB, proxy vs direct",
                f"{ttfb:.1f} vs {base:.1f} ms ({ttfb - base:+.1f})",
                f"medians of {repeats} new keys each, one at a time, paths in turn",
            ]
        )
    bench.report.add(
        table(
            "Misses",
            ["size", "path", "TTFB ms", "total ms", "TTFB vs direct", "total vs direct"],
            miss_rows(times, direct.name),
            f"First requests for new keys, one at a time from one httpx client per path, "
            f"{repeats} per path taken in turn (direct, proxy, nginx, direct, ...). "
            "TTFB: median (min-max); differences are median minus median.",
        )
    )


def run_misses(bench: Bench) -> None:
    plan = bench.plan
    seconds, rounds, connections, size = 2 * plan.seconds, plan.rounds, 32, KiB
    try:
        results = misses.measure(rounds, seconds, connections, size, bench.logs)
    except misses.MissingTool as exc:
        bench.report.add(f"### Miss throughput\n\nNot measured: {exc}.\n")
        return
    how = f"wrk, a new key per request, {rounds} alternating rounds of {seconds:g} s"
    on_pool = "minimal forwarder on the proxy's pool"
    for name, baseline, label in (
        ("proxy", misses.FORWARDER, "proxy ÷ minimal forwarder (httpx's pool)"),
        ("proxy", misses.FORWARDER_POOL, f"proxy ÷ {on_pool}"),
        (misses.ON_TMPFS, misses.FORWARDER_POOL, f"proxy, cache on tmpfs ÷ {on_pool}"),
    ):
        if name in results:
            found = misses.ratios(results, name, baseline)
            figure = f"{statistics.median(found):.2f} ({min(found):.2f}-{max(found):.2f})"
            bench.report.key.append([f"1 KiB misses/s, 32 conns: {label}", figure, how])
    bench.report.add(
        table(
            "Miss throughput",
            misses.HEADER,
            misses.rows(results),
            f"Every request a new {size} B artifact (wrk with a Lua script), {connections} "
            "connections (all with one API key: at most its max_fills_per_key, so that none "
            f"streams uncached), {rounds} rounds of {seconds:g} s "
            "alternating the proxy (a fresh cache; every miss fetched, hashed, written, "
            "committed and logged, checked after each run; a body of 64 KiB or less without an "
            "fsync, as every disk read verifies it whole) and bench/forwarder.py (the same "
            "server, protocol, loop and httpx client, relaying only), with httpx's connection "
            "pool and with the proxy's (proxy/transport.py). The proxy with its cache on tmpfs "
            "is a diagnostic: the disk's share. On ext4 without a journal the section first "
            "waits 35 s (bench/misses.py says why). The upstream here is "
            f"{misses.upstream_kind()} (bench/misses.py), so the servers' CPU is what limits. "
            "misses/s: median (min-max); the rest medians. bench/misses.py runs this section "
            "alone.",
        )
    )


def nginx_for_streams(bench: Bench) -> list[Target]:
    """nginx for the single-run sections (misses, coalescing, memory): sendfile on."""
    return [t for name, t in bench.targets.items() if name == "nginx, sendfile on"]


def run_coalesce(bench: Bench) -> None:
    targets = [bench.targets["proxy"], *nginx_for_streams(bench)]
    sizes = {"1 MiB": MiB, "16 MiB": 16 * MiB}
    bench.report.add(
        table(
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
            section_coalesce(targets, bench.upstream, sizes, new_id),
            "Each client's total time, one run. With 16 MiB the clients together pull 256 MiB "
            "(1.6 GB with 100) through one Python load-generator process: part of the spread is "
            "the client.",
        )
    )


def run_memory(bench: Bench) -> None:
    targets = [bench.targets["proxy"], *nginx_for_streams(bench)]
    bench.report.add(
        table(
            "Memory while 16 clients stream one large artifact",
            ["server", "phase", "clients", "size", "seconds", "MB/s", "peak RSS MiB"],
            section_memory(targets, 16, bench.plan.memory_size, new_id),
            "16 curl processes at once, one run per phase; RSS of the server's processes sampled "
            "every 50 ms, and the main process's high-water mark.",
        )
    )


def run_scale(bench: Bench) -> None:
    bench.report.add(
        table(
            "Disk tier by number of entries (8 KiB each)",
            ["entries", "populate s", "open ms", "hit p50 µs", "hit p99 µs"],
            section_scale(list(bench.plan.scale_counts)),
            "Store-level, in this process: `DiskStore.get` + read of up to 2,000 entries, and "
            "the time to open the store.",
        )
    )


def run_workers(bench: Bench) -> None:
    extra = bench.args.proxy_args.split()
    bench.report.add(
        table(
            "Worker processes (hits, 32 connections, nothing pinned)",
            ["size", "workers", "req/s", "MB/s", "p50 ms", "p99 ms", "vs 1 worker"],
            section_workers(bench.upstream, bench.plan.workers_seconds, extra, bench.logs, new_id),
            f"`serve --workers N`, wrk 32 connections, one run of {bench.plan.workers_seconds:g} s "
            "each. wrk shares the two cores with the workers here, so this is a floor on the "
            "gain.",
        )
    )


SECTION_RUNNERS: dict[str, Callable[[Bench], None]] = {
    "hits": run_hits,
    "attack": run_attack,
    "miss": run_miss,
    "misses": run_misses,
    "coalesce": run_coalesce,
    "memory": run_memory,
    "scale": run_scale,
    "workers": run_workers,
}


if __name__ == "__main__":
    raise SystemExit(main())
