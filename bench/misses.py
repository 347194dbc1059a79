"""Miss throughput: the proxy filling many distinct small artifacts, beside a minimal forwarder.

    python bench/misses.py                       # 5 alternating rounds of 5 s, 32 connections
    python bench/misses.py --rounds 3 --seconds 3 --size 65536

Every request names an artifact nobody asked for before (wrk with a Lua script: a new object id
per request, a new prefix per run), so every one is a miss: the proxy checks the key, fetches
upstream, streams the bytes to its client, stores the entry (off the event loop) and logs the
line. A body of 64 KiB at most, as here by default, is kept in memory as it arrives, then
hashed, written and committed in one worker-thread hop, without an fsync (every disk read
verifies such an entry whole); a larger one goes to a temporary file as it arrives and is
fsynced before its commit. The baseline is
bench/forwarder.py: the same server, protocol, loop and client library (httpx, one pool with
the proxy's limits), relaying the same answers and doing nothing else; once with httpx's own
connection pool, once with the proxy's (proxy/transport.py, which keeps its idle connections
and costs a linear pass per request where httpcore's costs a quadratic one). Also measured, a
diagnostic: the proxy with its cache on tmpfs (/dev/shm), where a commit costs no disk work.

Both are pinned to core 0; the upstream and wrk to core 1. The upstream is nginx answering every
``GET /v1/artifacts`` with the same bytes (when installed; else the stand-in API with no added
latency): a fast upstream, so the servers' own CPU is what limits. The proxy runs as ``serve`` runs with no flags
(access log on, to a file); its cache starts empty and stays below its size limit.

On ext4 without a journal (as on some VMs), creating a file costs more for some 35 s after
many files were deleted: the kernel's inode allocator skips over each recently deleted inode
(``recently_deleted`` in ext4's ialloc.c). A benchmark that just removed its caches (an earlier
section of bench/run.py, an earlier run) would charge that to the proxy, whose cache deletes
nothing while it fills; so on such a file system the measurement waits that long first, and
says so. Checks: every
wrk answer was a 2xx with the whole body; after each proxy run, an id of that run is a HIT (its
fill was committed) and the number of entries grew by the number of requests. The ratio is
taken within each round; the table gives medians (min-max). The first line printed names the
date, the commit measured and how much of a core other processes used meanwhile (on a busy
machine, read that first).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, SCOPE, TOKEN, child, free_port, standin
from bench.loadgen import wrk
from bench.servers import LOAD_CPU, NGINX_MAIN, SERVER_CPU, ForeignShare, cpu_seconds

AUTH = {"Authorization": f"Bearer {TOKEN}"}

#: A new object id per request: ``arr_<size>_<run prefix>_<counter>`` (the stand-in generates
#: any ``arr_<size>_...`` in its session).
LUA = """
local counter = 0
local prefix = "x"
local size = "1024"
init = function(args)
  prefix = args[1]
  size = args[2]
end
request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/artifacts?object_id=arr_" .. size .. "_" .. prefix .. "_"
    .. counter .. "&session_id=%s")
end
"""


def wrk_misses(
    base: str, script: Path, prefix: str, size: int, connections: int, seconds: float
) -> dict[str, float]:
    """One wrk run of new keys (bench/loadgen.py's wrk with :data:`LUA`): no socket error, and
    the whole body of every answer."""
    load = wrk(
        base, connections, seconds, script=script, script_args=(prefix, str(size)), timeout="30s"
    )
    if load["errors"]:
        raise RuntimeError(f"wrk saw {load['errors']} socket errors against {base}")
    if load["bytes_per_request"] < size:
        raise RuntimeError(f"short bodies from {base}: {load['bytes_per_request']:.0f} B each")
    return {
        "rps": load["rps"],
        "p50": load["p50"],
        "p99": load["p99"],
        "requests": load["requests"],
    }


#: The baselines: bench/forwarder.py with httpx's own pool, and with the proxy's.
FORWARDER = "forwarder"
FORWARDER_POOL = "forwarder, the proxy's pool"
#: The proxy with its cache on tmpfs: what the disk costs (a diagnostic; commits are not
#: durable there).
ON_TMPFS = "proxy, cache on tmpfs"
TMPFS = Path("/dev/shm")


@contextlib.contextmanager
def servers(
    upstream: str, cache_dir: str, logs: Path, before: Sequence[str] = ()
) -> Iterator[dict[str, tuple[str, int, str]]]:
    """name -> (base URL, PID, cache directory): the proxy, the proxy of each revision in
    ``before`` (from a git worktree of its own), the proxy with its cache on tmpfs (when
    /dev/shm is one) and the two forwarders."""
    with contextlib.ExitStack() as stack:
        found = {}
        trees = {"proxy": ROOT, **{f"proxy at {rev}": worktree(stack, rev) for rev in before}}
        caches = {name: Path(cache_dir) for name in trees}
        if TMPFS.is_dir() and os.access(TMPFS, os.W_OK):
            trees[ON_TMPFS] = ROOT
            caches[ON_TMPFS] = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=TMPFS)))
        for name, tree in trees.items():
            port, cache = free_port(), str(caches[name] / name.replace(" ", "-"))
            args = [sys.executable, "-m", "proxy", "serve", "--port", str(port)]
            args += ["--upstream", upstream, "--cache-dir", cache]
            log = logs / f"misses-{name.replace(' ', '-')}.log"
            process = stack.enter_context(child(args, port, SERVER_CPU, log, cwd=tree))
            found[name] = (f"http://127.0.0.1:{port}", process.pid, cache)
        for name, flags in ((FORWARDER, []), (FORWARDER_POOL, ["--proxy-pool"])):
            port = free_port()
            args = [sys.executable, "bench/forwarder.py", "--port", str(port)]
            args += ["--upstream", upstream, *flags]
            log = logs / f"misses-{name.replace(' ', '-')}.log"
            process = stack.enter_context(child(args, port, SERVER_CPU, log))
            found[name] = (f"http://127.0.0.1:{port}", process.pid, "")
        yield found


def worktree(stack: contextlib.ExitStack, rev: str) -> Path:
    """A detached git worktree of ``rev``, removed when ``stack`` closes."""
    path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-rev-"))) / "tree"
    git = ["git", "-C", str(ROOT)]
    subprocess.run(
        [*git, "worktree", "add", "--detach", str(path), rev], check=True, capture_output=True
    )
    stack.callback(subprocess.run, [*git, "worktree", "remove", "--force", str(path)], check=False)
    return path


def entries(cache_dir: str) -> int:
    """Committed entries in the proxy's store, counted by their files."""
    return sum(1 for _ in Path(cache_dir, "entries").rglob("*") if _.is_file())


Runs = dict[str, list[dict[str, float]]]

#: How long ext4 without a journal makes file creation skip a deleted inode (30 s, 35 while
#: the inode table block is dirty: ``recently_deleted`` in fs/ext4/ialloc.c).
RECENTLY_DELETED_SECONDS = 35.0


def unjournaled_ext4(path: str) -> bool:
    """True if ``path`` is on an ext4 file system mounted without a journal."""
    device = os.stat(path).st_dev
    try:
        name = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}").resolve().name
    except OSError:
        return False
    ext4 = Path("/proc/fs/ext4", name).is_dir()
    journal = Path("/proc/fs/jbd2")
    journaled = journal.is_dir() and any(j.name.startswith(f"{name}-") for j in journal.iterdir())
    return ext4 and not journaled


def measure(
    rounds: int,
    seconds: float,
    connections: int,
    size: int,
    logs: Path,
    before: Sequence[str] = (),
) -> Runs:
    """Each server's wrk runs (misses/s, p50, p99 ms, requests, CPU µs per miss, cores), in
    alternating rounds; the servers' logs go to ``logs``."""
    if shutil.which("wrk") is None:
        raise MissingTool("bench/misses.py needs wrk (apt-get install wrk)")
    script = logs / "misses.lua"
    script.write_text(LUA.replace("%s", SCOPE))
    with (
        tempfile.TemporaryDirectory(prefix="bench-misses-") as cache_dir,
        fast_upstream(size, logs) as upstream,
        servers(upstream, cache_dir, logs, before) as targets,
    ):
        for base, _pid, _cache in targets.values():  # warm both: connections, imports, the store
            for n in range(20):
                httpx.get(address(base, size, f"warm{n}"), headers=AUTH, timeout=30)
        if unjournaled_ext4(cache_dir):
            print(
                f"(ext4 without a journal: waiting {RECENTLY_DELETED_SECONDS:g} s for the files "
                "deleted before this run to stop slowing file creation)",
                file=sys.stderr,
            )
            time.sleep(RECENTLY_DELETED_SECONDS)
        results: Runs = {name: [] for name in targets}
        for _round in range(rounds):
            for name, (base, pid, cache) in targets.items():
                os.sync()  # the last run's writeback must not land in this one
                prefix = uuid.uuid4().hex[:12]
                started, stored = cpu_seconds(pid), entries(cache) if cache else 0
                run = wrk_misses(base, script, prefix, size, connections, seconds)
                used = cpu_seconds(pid) - started
                run["cpu_us"], run["cores"] = used / run["requests"] * 1e6, used / seconds
                if cache:
                    check_committed(base, size, prefix, entries(cache) - stored, run)
                results[name].append(run)
    return results


class MissingTool(RuntimeError):
    """A program the measurement needs is not installed."""


def upstream_kind() -> str:
    """What :func:`fast_upstream` runs on this machine."""
    return (
        "nginx serving the same bytes for every key"
        if shutil.which("nginx")
        else ("the stand-in API with no added latency (nginx is not installed)")
    )


@contextlib.contextmanager
def fast_upstream(size: int, logs: Path) -> Iterator[str]:
    """The upstream the servers fill from, on the load generator's core: nginx answering every
    ``GET /v1/artifacts`` with the same ``size`` bytes when nginx is installed (a few µs per
    answer, always the same: the servers' own CPU is what limits), else the stand-in API."""
    port = free_port()
    if shutil.which("nginx") is None:
        with standin(port, cpu=LOAD_CPU, log=logs / "misses-api.log"):
            yield f"http://127.0.0.1:{port}"
        return
    with tempfile.TemporaryDirectory(prefix="bench-misses-nginx-") as directory:
        Path(directory, "body").write_bytes(os.urandom(size))
        conf = Path(directory, "nginx.conf")
        conf.write_text(STATIC_NGINX.format(dir=directory, port=port))
        args = ["nginx", "-p", directory, "-c", str(conf), "-g", "daemon off;"]
        with child(args, port, LOAD_CPU, logs / "misses-nginx.log"):
            yield f"http://127.0.0.1:{port}"


STATIC_NGINX = (
    NGINX_MAIN
    + """http {{
    access_log off;
    keepalive_requests 1000000;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        location = /v1/artifacts {{ alias {dir}/body; }}
    }}
}}
"""
)


def address(base: str, size: int, name: str) -> str:
    return f"{base}/v1/artifacts?object_id=arr_{size}_{name}&session_id={SCOPE}"


def check_committed(base: str, size: int, prefix: str, stored: int, run: dict[str, float]) -> None:
    """Every miss of the run was filled and committed: a HIT now, and an entry each."""
    answer = httpx.get(address(base, size, f"{prefix}_10"), headers=AUTH, timeout=30)
    if answer.headers.get("X-Cache") != "HIT":
        raise RuntimeError(f"a miss of this run was not committed: {answer.headers}")
    if stored < run["requests"]:
        raise RuntimeError(f"{stored} entries for {run['requests']} misses: some not stored")


def rows(results: Runs) -> list[list[str]]:
    """Table rows: server, misses/s median (min-max), p50, p99, CPU µs per miss, cores."""
    out = []
    for name, runs in results.items():
        rps = [r["rps"] for r in runs]
        p50, p99, cpu, cores = (
            statistics.median(r[field] for r in runs) for field in ("p50", "p99", "cpu_us", "cores")
        )
        out.append(
            [
                name,
                f"{statistics.median(rps):,.0f} ({min(rps):,.0f}-{max(rps):,.0f})",
                f"{p50:.1f}",
                f"{p99:.1f}",
                f"{cpu:,.0f}",
                f"{cores:.2f}",
            ]
        )
    return out


HEADER = ["server", "misses/s", "p50 ms", "p99 ms", "server CPU µs/miss", "server CPU, cores"]


def ratios(results: Runs, name: str = "proxy", baseline: str = FORWARDER) -> list[float]:
    """``name`` ÷ ``baseline`` misses/s, within each round."""
    pairs = zip(results[name], results[baseline], strict=True)
    return [proxy["rps"] / forwarder["rps"] for proxy, forwarder in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument(
        "--connections", type=int, default=32, help="at most max_fills_per_key (32): one key"
    )
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument(
        "--before", action="append", default=[], help="also the proxy of this git revision"
    )
    args = parser.parse_args()
    from bench.run import commit  # here: bench/run.py imports this module

    busy = ForeignShare()
    with tempfile.TemporaryDirectory(prefix="bench-misses-logs-") as logs:
        try:
            results = measure(
                args.rounds, args.seconds, args.connections, args.size, Path(logs), args.before
            )
        except MissingTool as exc:
            raise SystemExit(str(exc)) from None
    print(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit()}; "
        f"processes outside the benchmark used {busy.cores():.0%} of a core meanwhile"
    )
    print(f"{args.size} B artifacts, {args.connections} connections, ", end="")
    print(f"{args.rounds} rounds of {args.seconds:g} s; upstream: {upstream_kind()}")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for row in rows(results):
        print("| " + " | ".join(row) + " |")
    for name in results:
        for baseline in (FORWARDER, FORWARDER_POOL):
            if name not in (FORWARDER, FORWARDER_POOL):
                found = ratios(results, name, baseline)
                low, mid, high = min(found), statistics.median(found), max(found)
                print(f"{name} / {baseline}: {mid:.2f} ({low:.2f}-{high:.2f})")


if __name__ == "__main__":
    main()
