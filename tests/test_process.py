"""The proxy as a real process: killed mid-fill, or stopped with SIGTERM mid-response."""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import SESSION
from tests.helpers import artifact_url, auth
from tests.servers import Daemon, ServerThread
from tests.standin import Fault, StandIn


@pytest.fixture
def daemons(upstream: ServerThread, cache_dir: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.kill()


def _start(daemons: list[Daemon], upstream: ServerThread, cache_dir: Path) -> Daemon:
    daemon = Daemon("--upstream", upstream.url, "--cache-dir", str(cache_dir))
    daemons.append(daemon)
    assert daemon.started(), daemon.output
    return daemon


def test_kill_9_during_fills_never_serves_wrong_bytes(
    standin: StandIn, upstream: ServerThread, cache_dir: Path, daemons: list[Daemon]
) -> None:
    """Three rounds: some entries complete, 16 fills stopped at random offsets, then SIGKILL.

    After each restart leftovers are gone, and every artifact comes back whole and correct.
    """
    rng = random.Random(1234)
    bodies: dict[str, bytes] = {}
    for round_ in range(3):
        proxy = _start(daemons, upstream, cache_dir)
        assert not list((cache_dir / "tmp").iterdir()), "leftover fills were not swept"
        for object_id, body in bodies.items():  # everything from earlier rounds is whole
            assert (
                httpx.get(artifact_url(proxy, object_id), headers=auth(), timeout=30).content
                == body
            )
        for index in range(4):  # some complete entries in this round
            object_id = f"arr_{round_:02x}c{index:03x}"
            bodies[object_id] = standin.add(
                "session", SESSION, object_id, size=rng.randint(1, 3_000_000)
            )
            assert (
                httpx.get(artifact_url(proxy, object_id), headers=auth(), timeout=30).content
                == bodies[object_id]
            )
        held = threading.Event()
        in_flight = []
        for index in range(16):
            object_id = f"vid_{round_:02x}f{index:03x}"
            size = rng.randint(2, 4_000_000)
            bodies[object_id] = standin.add("session", SESSION, object_id, size=size)
            standin.faults[object_id] = Fault(
                hold_middle=held, hold_at=rng.randint(1, size - 1), times=1
            )
            in_flight.append(object_id)
        everyone_started = threading.Barrier(len(in_flight) + 1)

        def follow(
            object_id: str, proxy: Daemon = proxy, barrier: threading.Barrier = everyone_started
        ) -> None:
            with httpx.stream(
                "GET", artifact_url(proxy, object_id), headers=auth(), timeout=30
            ) as r:
                chunks = r.iter_raw()
                next(chunks)
                barrier.wait(timeout=30)
                with pytest.raises(httpx.HTTPError):
                    for _ in chunks:
                        pass

        with ThreadPoolExecutor(len(in_flight)) as pool:
            futures = [pool.submit(follow, object_id) for object_id in in_flight]
            everyone_started.wait(timeout=30)
            proxy.kill()
            for future in futures:
                future.result()
        held.set()
    proxy = _start(daemons, upstream, cache_dir)
    assert not list((cache_dir / "tmp").iterdir())
    for object_id, body in bodies.items():
        assert httpx.get(artifact_url(proxy, object_id), headers=auth(), timeout=30).content == body


def test_sigterm_lets_in_flight_responses_finish(
    standin: StandIn, upstream: ServerThread, cache_dir: Path, daemons: list[Daemon]
) -> None:
    """SIGTERM stops new work but the response being streamed completes, and is committed."""
    proxy = _start(daemons, upstream, cache_dir)
    body = standin.add("session", SESSION, "vid_7e7e7e", size=2_000_000)
    release = threading.Event()
    standin.faults["vid_7e7e7e"] = Fault(hold_middle=release, times=1)
    with httpx.stream("GET", artifact_url(proxy, "vid_7e7e7e"), headers=auth(), timeout=30) as r:
        chunks = r.iter_raw()
        first = next(chunks)
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.wait_for("Shutting down")  # shutdown has begun with our response in flight
        release.set()
        rest = b"".join(chunks)
    assert proxy.stop(signalled=True)
    assert first + rest == body
    assert "Application shutdown complete" in proxy.output
    again = _start(daemons, upstream, cache_dir)
    hit = httpx.get(artifact_url(again, "vid_7e7e7e"), headers=auth(), timeout=30)
    assert (hit.headers["x-cache"], hit.content) == ("HIT", body)


def _total_requests(metrics_text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics_text.splitlines()
        if line.startswith("vlmrun_cache_requests_total{")
    )


def test_workers_share_the_cache_fetch_once_and_sum_metrics(
    standin: StandIn, upstream: ServerThread, cache_dir: Path, daemons: list[Daemon]
) -> None:
    """With two worker processes, 40 concurrent first requests cost one upstream fetch in all,
    every client gets the right bytes, and /metrics (from either worker) counts all 40."""
    proxy = Daemon("--upstream", upstream.url, "--cache-dir", str(cache_dir), "--workers", "2")
    daemons.append(proxy)
    assert proxy.started(), proxy.output
    body = standin.add("session", SESSION, "vid_2a2a2a", size=3_000_000)
    release = threading.Event()
    standin.faults["vid_2a2a2a"] = Fault(hold_start=release, times=1)

    def client() -> bytes:
        return httpx.get(artifact_url(proxy, "vid_2a2a2a"), headers=auth(), timeout=60).content

    with ThreadPoolExecutor(40) as pool:
        futures = [pool.submit(client) for _ in range(40)]
        try:
            assert standin.arrived.wait(timeout=30)
        finally:
            release.set()
        assert all(f.result() == body for f in futures)
    assert standin.hits("session", SESSION, "vid_2a2a2a") == 1
    for _ in range(4):  # whichever worker answers, it reports the sum
        assert _total_requests(httpx.get(f"{proxy.url}/metrics", timeout=10).text) == 40
    assert proxy.stop()
