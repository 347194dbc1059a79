"""Prefetch: an agent loop's wait for its artifacts, with and without prefetch.

    python bench/prefetch.py                 # 5 rounds per setting and stream tail
    python bench/prefetch.py --rounds 3 --latency 0.15 --bandwidth 12.5e6

The stand-in API answers each artifact request after ``--latency`` seconds and streams it at
``--bandwidth`` bytes/s per response (default 150 ms and 100 Mbit/s). Each round is one agent
step: a streamed chat completion (SSE) naming three artifacts of 8 KiB, 1 MiB and 20 MiB in a new
session, then ``GET /v1/artifacts`` for each, one after the other, reading every body to the end.
Two proxies run side by side, one with ``--prefetch false``; rounds alternate between them so
drift on a shared machine hits both alike. The figure is the time from the end of the completion
(its last byte read) to having all three artifacts. "tail" is how long the completion goes on
after naming them (events of generated text): 0 s is the worst case for prefetch (the client asks
at once and joins the running prefetches), longer tails give the prefetch a head start.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import TOKEN, child, free_port, machine, proxy

AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: The artifacts each completion names, by id (hex, as the API's ids are) and size.
ARTIFACTS = {"arr_00008a": 8 * 1024, "arr_00001b": 1024**2, "arr_00020c": 20 * 1024**2}
SCOPE = "sess_agent"


@contextlib.contextmanager
def upstream(latency: float, bandwidth: float, tail: int, delay: float) -> Iterator[str]:
    port = free_port()
    refs = ",".join(f"{name}={size}" for name, size in ARTIFACTS.items())
    args = [sys.executable, "-m", "tests.standin", "--port", str(port), "--token", TOKEN]
    args += ["--scope", SCOPE, "--latency", str(latency), "--bandwidth", str(bandwidth)]
    args += ["--chat-refs", refs, "--chat-tail", str(tail), "--chat-event-delay", str(delay)]
    with child(args, port):
        yield f"http://127.0.0.1:{port}"


def agent_step(client: httpx.Client, base: str) -> tuple[float, float, list[str]]:
    """One completion then its artifacts: (completion seconds, seconds from its end to all
    artifacts, X-Cache of each)."""
    started = time.perf_counter()
    session = ""
    request = {"model": "vlmrun-orion-1", "messages": [], "stream": True}
    with client.stream("POST", f"{base}/v1/openai/chat/completions", json=request) as answer:
        for line in answer.iter_lines():
            if not session and '"session_id": "' in line:
                session = line.split('"session_id": "', 1)[1].split('"', 1)[0]
    ended = time.perf_counter()
    outcomes = []
    for name, size in ARTIFACTS.items():
        params = {"object_id": name, "session_id": session}
        with client.stream("GET", f"{base}/v1/artifacts", params=params) as got:
            received = sum(len(chunk) for chunk in got.iter_raw())
            assert got.status_code == 200 and received == size, (got.status_code, received)
            outcomes.append(got.headers.get("x-cache", "-"))
    return ended - started, time.perf_counter() - ended, outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.15, help="seconds per artifact request")
    parser.add_argument("--bandwidth", type=float, default=12.5e6, help="bytes/s per response")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds between SSE events")
    parser.add_argument("--tails", default="0,10", help="events after the refs, per scenario")
    args = parser.parse_args()
    print("# Prefetch: time from the end of a completion to having its 3 artifacts\n")
    print(
        f"{machine()}; upstream latency {args.latency * 1000:.0f} ms, "
        f"{args.bandwidth * 8 / 1e6:.0f} Mbit/s per response, SSE events every "
        f"{args.delay * 1000:.0f} ms; artifacts of 8 KiB, 1 MiB and 20 MiB fetched one after "
        f"the other; median (min-max) of {args.rounds} rounds\n"
    )
    print(
        "| tail after the refs | prefetch | completion | end of completion -> all artifacts | X-Cache |"
    )
    print("|---|---|---|---|---|")
    for tail in (int(t) for t in args.tails.split(",")):
        rows = run(args, tail)
        for mode, (completions, waits, outcomes) in rows.items():
            print(
                f"| {tail * args.delay:.2f} s | {mode} | {statistics.median(completions):.2f} s "
                f"| **{statistics.median(waits):.2f} s** ({min(waits):.2f}-{max(waits):.2f}) "
                f"| {' '.join(sorted(set(outcomes)))} |"
            )


def run(
    args: argparse.Namespace, tail: int
) -> dict[str, tuple[list[float], list[float], list[str]]]:
    results: dict[str, tuple[list[float], list[float], list[str]]] = {
        "off": ([], [], []),
        "on": ([], [], []),
    }
    with (
        upstream(args.latency, args.bandwidth, tail, args.delay) as api,
        tempfile.TemporaryDirectory(prefix="bench-prefetch-") as work,
        contextlib.ExitStack() as stack,
    ):
        bases = {}
        for mode in results:
            port = free_port()
            cache = str(Path(work) / mode)
            flags = ("--prefetch", "false" if mode == "off" else "true")
            stack.enter_context(proxy(port, api, cache, *flags, log=Path(work) / f"{mode}.log"))
            bases[mode] = f"http://127.0.0.1:{port}"
        with httpx.Client(headers=AUTH, timeout=60) as client:
            for _ in range(args.rounds):
                for mode, base in bases.items():
                    completion, wait, outcomes = agent_step(client, base)
                    results[mode][0].append(completion)
                    results[mode][1].append(wait)
                    results[mode][2].extend(outcomes)
    return results


if __name__ == "__main__":
    main()
