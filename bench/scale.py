"""Scale: the proxy with many entries beside the same with few (issue 11, "Scale").

    python bench/scale.py                       # 1M and 1k entries of 1 KiB (make bench-scale)
    python bench/scale.py --entries 100000      # fewer
    python bench/scale.py --before fcd1aad      # also the code of another commit, back to back

Each cache directory (under ``--dir``, default /tmp/vlmrun-scale, kept for the next run: filling
1M entries takes minutes) is filled through the store API (:meth:`DiskStore.load`, many entries
per transaction) after checking that the file system has the space and the inodes. The entries
are filled by the bench key, which is given a proof, so every request is a hit without asking
the API. Then, in rounds, for each code revision and each directory, a real ``vlmrun-cache
serve`` (no flags but the upstream, the directory and the port; pinned to core 0, wrk on core 1)
is timed: start-up to the first 200 from ``/healthz``; resident memory when ready, and idle after
the orphan sweep with its peak (``VmHWM``); the sweep's duration from its log line; hits/s at 32
connections, with the server's CPU time per hit (steadier than hits/s on a busy machine), for
one key, for a hot set of 1,000 keys, and for random keys over the whole cache (at 1M almost all
outside the disk tier's in-memory index), the last also while the sweep runs. Each figure is
the median over rounds. Store-level probes follow (bench/scalestore.py runs bench/scaleprobes.py
for each revision).

Writes bench/results/scale-latest.md and prints it. Not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, SCOPE, TOKEN, free_port, machine, pinned, rss_kib, standin, stop
from bench.scalestore import run_probes
from bench.servers import LOAD_CPU, SERVER_CPU, cpu_seconds
from proxy.access import AccessProofs
from proxy.store import EntryMeta
from proxy.store.disk import DiskStore

KiB, MiB, GiB = 1024, 1024**2, 1024**3
#: The hot set: keys 0..HOT-1, read before they are measured.
HOT = 1000
CONNECTIONS = 32
#: Per entry, beyond its file's blocks: its index row and its share of directories.
INDEX_BYTES_PER_ENTRY = 400
SWEEP_LINE = re.compile(r"orphan sweep: (\d+) files checked in ([\d.]+) s")


def object_id(index: int) -> str:
    return f"obj_{index}"


def cache_key(index: int) -> str:
    return json.dumps(["v2", "session", SCOPE, object_id(index)])


def check_room(directory: Path, count: int, size: int) -> None:
    """Refuse to start filling a file system that cannot hold ``count`` entries of ``size``."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    fs = os.statvfs(probe)
    block = fs.f_frsize or 4096
    need_bytes = count * (-(-size // block) * block + INDEX_BYTES_PER_ENTRY) + GiB
    need_inodes = count + 70_000  # files, diskcache's 65,536 directories at most, slack
    free_bytes, free_inodes = fs.f_bavail * block, fs.f_favail
    if free_bytes < need_bytes or (fs.f_files and free_inodes < need_inodes):
        raise SystemExit(
            f"{probe}: {count:,} entries of {size} B need about {need_bytes / GiB:.1f} GiB and "
            f"{need_inodes:,} inodes; {free_bytes / GiB:.1f} GiB and {free_inodes:,} are free"
        )


def populate(directory: Path, count: int, size: int) -> float | None:
    """Fill ``directory`` with ``count`` entries (once); entries/s, or None if it was full."""
    marker = directory / "populated.json"
    if marker.exists() and json.loads(marker.read_text()) == {"count": count, "size": size}:
        return None
    if directory.exists():
        shutil.rmtree(directory)
    check_room(directory, count, size)
    directory.mkdir(parents=True, mode=0o700)
    filler = AccessProofs(directory, ttl=3600).fingerprint(f"Bearer {TOKEN}") or ""
    store = DiskStore(directory, max_bytes=count * size * 2, max_object_bytes=GiB)

    def entries() -> Iterator[tuple[str, bytes, EntryMeta]]:
        for index in range(count):
            body = (b"%016x" % index * (size // 16 + 1))[:size]
            meta = EntryMeta(
                "application/octet-stream",
                size,
                hashlib.sha256(body).hexdigest(),
                time.time(),
                xxhash.xxh3_128_hexdigest(body),
                filler=filler,
            )
            yield cache_key(index), body, meta

    started = time.monotonic()
    stored = store.load(entries(), batch=2000)
    rate = stored / (time.monotonic() - started)
    store.close()
    marker.write_text(json.dumps({"count": count, "size": size}))
    return rate


def prove(directory: Path) -> None:
    """A fresh proof that the bench key may read the scope (it filled every entry)."""
    proofs = AccessProofs(directory, ttl=3600)
    proofs.record(proofs.fingerprint(f"Bearer {TOKEN}"), ("session", SCOPE))
    proofs.close()


LUA = """
local first, count = {first}, {count}
math.randomseed({seed})
request = function()
  local index = first + math.random(0, count - 1)
  return wrk.format("GET", "/v1/artifacts?object_id=obj_" .. index .. "&session_id={scope}")
end
"""


def wrk(
    base: str, first: int, count: int, seconds: float, scripts: Path, pid: int
) -> dict[str, float]:
    """Hits/s, p99 latency and the server's CPU time per hit (µs; less sensitive than hits/s
    to what else the machine runs) for keys drawn at random from ``first .. first+count-1``."""
    used = cpu_seconds(pid)
    script = scripts / f"keys-{first}-{count}.lua"
    script.write_text(
        LUA.format(first=first, count=count, seed=time.time_ns() % 2**31, scope=SCOPE)
    )
    args = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--latency"]
    args += ["-s", str(script), "-H", f"Authorization: Bearer {TOKEN}", base]
    out = subprocess.run(pinned(args, LOAD_CPU), capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors against {base}:\n{out}")
    cpu = cpu_seconds(pid) - used
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)", out, re.M)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    return {
        "rps": rps,
        "p99": float(p99.group(1)) * scale[p99.group(2)] if p99 else 0.0,
        "cpu_us": cpu / max(requests, 1) * 1e6,
    }


@contextlib.contextmanager
def checkout(revision: str | None) -> Iterator[Path]:
    """The source tree of ``revision`` (a temporary copy), or this one for None."""
    if revision is None:
        yield ROOT
        return
    with tempfile.TemporaryDirectory(prefix="scale-src-") as tree:
        archive = subprocess.run(
            ["git", "archive", revision], cwd=ROOT, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        yield Path(tree)


def serve_once(
    tree: Path, directory: Path, upstream: str, seconds: float, logs: Path, name: str
) -> dict[str, float]:
    """One server on ``directory``: start-up, memory, the sweep, hits. Figures by name."""
    count = json.loads((directory / "populated.json").read_text())["count"]
    prove(directory)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = logs / f"{name}.log"
    args = [sys.executable, "-m", "proxy", "serve", "--port", str(port), "--upstream", upstream]
    args += ["--cache-dir", str(directory)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    figures: dict[str, float] = {}
    with log.open("wb") as out:
        started = time.monotonic()
        process = subprocess.Popen(
            pinned(args, SERVER_CPU), cwd=tree, stdout=out, stderr=subprocess.STDOUT, env=env
        )
        try:
            _wait_healthy(base, process)
            figures["startup_s"] = time.monotonic() - started
            figures["rss_ready_mib"] = rss_kib(process.pid) / KiB
            during = wrk(base, 0, count, seconds, logs, process.pid)
            _settle(process.pid)
            figures["settled_s"] = time.monotonic() - started
            swept = _sweep_seconds(log)
            if swept is not None:
                figures["sweep_s"] = swept
            if figures["settled_s"] > figures["startup_s"] + seconds + 1:  # wrk ran as it swept
                figures["random_during_sweep_rps"] = during["rps"]
            figures["rss_peak_mib"] = rss_kib(process.pid, "VmHWM") / KiB
            figures["rss_idle_mib"] = rss_kib(process.pid) / KiB
            one_key = wrk(base, 0, 1, seconds, logs, process.pid)
            figures["one_key_rps"], figures["one_key_cpu_us"] = one_key["rps"], one_key["cpu_us"]
            for index in range(min(HOT, count)):  # into the memory tier and the index
                httpx.get(
                    f"{base}/v1/artifacts?object_id={object_id(index)}&session_id={SCOPE}",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                ).raise_for_status()
            hot = wrk(base, 0, min(HOT, count), seconds, logs, process.pid)
            figures["hot_rps"], figures["hot_cpu_us"] = hot["rps"], hot["cpu_us"]
            random_keys = wrk(base, 0, count, seconds, logs, process.pid)
            figures["random_rps"], figures["random_p99_ms"] = random_keys["rps"], random_keys["p99"]
            figures["random_cpu_us"] = random_keys["cpu_us"]
            figures["rss_loaded_mib"] = rss_kib(process.pid) / KiB
        finally:
            stop(process)
    return figures


def _wait_healthy(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        time.sleep(0.01)
    raise TimeoutError("serve did not answer /healthz")


def _settle(pid: int, timeout: float = 300) -> None:
    """Wait until the server is idle for a second: under 5% of a core and under 200 read
    system calls (the sweep walks directories, which costs calls more than CPU). The only way
    to see the end of the sweep of a revision that does not log it."""
    deadline = time.monotonic() + timeout
    used, calls = cpu_seconds(pid), _read_calls(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now, now_calls = cpu_seconds(pid), _read_calls(pid)
        if now - used < 0.05 and now_calls - calls < 200:
            return
        used, calls = now, now_calls


def _read_calls(pid: int) -> int:
    """Read system calls of ``pid`` so far (``syscr`` in /proc/PID/io), its threads included."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    return 0


def _sweep_seconds(log: Path) -> float | None:
    """Seconds the orphan sweep took, from the server's log (None if it does not say)."""
    found = SWEEP_LINE.search(log.read_text(errors="replace"))
    return None if found is None else float(found.group(2))


#: (figure, how the table names it, format)
FIGURES = [
    ("startup_s", "start-up to /healthz 200, s", "{:.2f}"),
    ("rss_ready_mib", "RSS when ready, MiB", "{:.0f}"),
    ("sweep_s", "orphan sweep (its log line), s", "{:.1f}"),
    ("settled_s", "idle again after start (sweep over), s", "{:.1f}"),
    ("rss_peak_mib", "peak RSS (VmHWM) by then, MiB", "{:.0f}"),
    ("rss_idle_mib", "RSS idle after the sweep, MiB", "{:.0f}"),
    ("random_during_sweep_rps", "random keys while the sweep runs, hits/s", "{:,.0f}"),
    ("one_key_rps", "one key, hits/s", "{:,.0f}"),
    ("one_key_cpu_us", "one key, server CPU per hit, µs", "{:.0f}"),
    ("hot_rps", f"hot set of {HOT:,} keys, hits/s", "{:,.0f}"),
    ("hot_cpu_us", "hot set, server CPU per hit, µs", "{:.0f}"),
    ("random_rps", "random keys over the whole cache, hits/s", "{:,.0f}"),
    ("random_cpu_us", "random keys, server CPU per hit, µs", "{:.0f}"),
    ("random_p99_ms", "random keys, p99 ms", "{:.1f}"),
    ("rss_loaded_mib", "RSS after those runs, MiB", "{:.0f}"),
]


def table(
    results: dict[tuple[str, int], list[dict[str, float]]], counts: list[int], label: str
) -> str:
    """Medians over rounds, one column per cache size, and large/small."""
    small, large = min(counts), max(counts)
    lines = [
        f"| {label} | "
        + " | ".join(f"{count:,} entries" for count in counts)
        + " | large / small |",
        "|---|" + "---|" * (len(counts) + 1),
    ]
    for name, title, form in FIGURES:
        medians: dict[int, float] = {}
        for count in counts:
            values = [run[name] for run in results.get((label, count), []) if name in run]
            if values:
                medians[count] = statistics.median(values)
        cells = [form.format(medians[c]) if c in medians else "-" for c in counts]
        ratio = "-"
        if small in medians and large in medians and medians[small]:
            ratio = f"{medians[large] / medians[small]:.2f}x"
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="the large cache")
    parser.add_argument("--small", type=int, default=1000, help="the small cache")
    parser.add_argument("--size", type=int, default=KiB, help="bytes per entry")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "vlmrun-scale")
    parser.add_argument("--seconds", type=float, default=8.0, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", action="append", default=[], help="also this revision")
    parser.add_argument("--no-probes", action="store_true", help="skip the store-level probes")
    parser.add_argument(
        "--no-tree", action="store_true", help="only the --before revisions, not this tree"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/scale-latest.md")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench/scale.py needs wrk (apt-get install wrk)")
    counts = sorted({args.small, args.entries})
    directories = {count: args.dir / f"{count}x{args.size}" for count in counts}
    report = [f"# Scale: {' vs '.join(f'{c:,}' for c in counts)} entries of {args.size} B", ""]
    report.append(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}, "
        f"commit {_git('rev-parse', '--short', 'HEAD')}{_dirty()}."
    )
    for count, directory in directories.items():
        rate = populate(directory, count, args.size)
        made = "reused" if rate is None else f"filled at {rate:,.0f} entries/s (DiskStore.load)"
        print(f"{count:,} entries in {directory}: {made}", flush=True)
        report.append(f"- {count:,} entries in `{directory}`: {made}")
    labels = [*([] if args.no_tree else ["this tree"]), *args.before]
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    logs = Path(tempfile.mkdtemp(prefix="scale-logs-"))
    with contextlib.ExitStack() as stack:
        trees = {
            label: stack.enter_context(checkout(None if label == "this tree" else label))
            for label in labels
        }
        port = free_port()
        stack.enter_context(standin(port, log=logs / "standin.log"))
        for round_ in range(args.rounds):
            for label in labels:
                for count in counts:
                    name = f"{label.replace(' ', '-')}-{count}-r{round_}"
                    figures = serve_once(
                        trees[label],
                        directories[count],
                        f"http://127.0.0.1:{port}",
                        args.seconds,
                        logs,
                        name,
                    )
                    print(
                        name, json.dumps({k: round(v, 3) for k, v in figures.items()}), flush=True
                    )
                    results.setdefault((label, count), []).append(figures)
        report += [
            "",
            f"Medians of {args.rounds} rounds; wrk {CONNECTIONS} connections, "
            f"{args.seconds:g} s per figure; server logs in `{logs}`.",
            "",
        ]
        for label in labels:
            report += [table(results, counts, label), ""]
        if not args.no_probes:
            report += run_probes(trees, directories[max(counts)])
    text = "\n".join(report) + "\n"
    args.out.write_text(text)
    print(text)
    return 0


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def _dirty() -> str:
    return " (+uncommitted changes)" if _git("status", "--porcelain", "proxy") else ""


if __name__ == "__main__":
    sys.exit(main())
