"""Upstream, disk and index faults: clients get the exact bytes or a clear error, never wrong."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.upstream import CircuitBreaker
from tests.conftest import OTHER_TOKEN, SESSION, TOKEN
from tests.helpers import auth, fetch, metric
from tests.servers import ServerThread
from tests.standin import Fault, StandIn

# -- upstream faults -----------------------------------------------------------------------


def test_5xx_before_the_first_byte_is_retried(standin: StandIn, proxy) -> None:
    """A transient 500 costs a retry, not an error: the client gets the artifact."""
    body = standin.add("session", SESSION, "arr_5005ff")
    standin.faults["arr_5005ff"] = Fault(status=503, times=2)
    response = fetch(proxy, "arr_5005ff")
    assert (response.status_code, response.content) == (200, body)
    assert standin.hits("session", SESSION, "arr_5005ff") == 3


def test_slow_first_byte_gives_a_504(standin: StandIn, start_proxy) -> None:
    """An upstream that never starts answering yields a JSON 504 within the first-byte timeout."""
    proxy = start_proxy(first_byte_timeout="300ms", retries=0)
    standin.add("session", SESSION, "arr_510510")
    never = threading.Event()
    standin.faults["arr_510510"] = Fault(hold_start=never)
    try:
        response = fetch(proxy, "arr_510510")
    finally:
        never.set()
    assert response.status_code == 504
    assert "did not answer in time" in response.json()["detail"]


@pytest.fixture
def offline(
    standin: StandIn, upstream: ServerThread, start_proxy
) -> Iterator[tuple[ServerThread, bytes]]:
    """A proxy that cached arr_0ff11e for TOKEN, after which the upstream went away."""
    proxy = start_proxy(breaker_threshold=3, breaker_cooldown="1h", retries=0)
    body = standin.add("session", SESSION, "arr_0ff11e")
    assert fetch(proxy, "arr_0ff11e").content == body
    upstream.stop()
    yield proxy, body


def test_offline_hits_with_a_proof_are_served(offline: tuple[ServerThread, bytes]) -> None:
    """On a laptop without network, what was cached keeps working for its owner."""
    proxy, body = offline
    for _ in range(5):
        hit = fetch(proxy, "arr_0ff11e")
        assert (hit.status_code, hit.content) == (200, body)


def test_offline_without_a_proof_fails_closed(offline: tuple[ServerThread, bytes]) -> None:
    """No proof, no bytes: another key gets a 502 and none of the cached bytes; so does a miss."""
    proxy, body = offline
    stranger = fetch(proxy, "arr_0ff11e", token=OTHER_TOKEN)
    miss = fetch(proxy, "arr_0ff222")
    for response in (stranger, miss):
        assert response.status_code == 502
        assert response.json()["detail"].startswith("upstream unavailable")
        assert body[:32] not in response.content
    assert metric(proxy, "vlmrun_cache_access_checks_total", result="unavailable") == 1


def test_breaker_opens_and_fails_fast(offline: tuple[ServerThread, bytes]) -> None:
    """After repeated connect failures requests fail at once without dialling upstream."""
    proxy, _ = offline
    for _ in range(3):
        assert httpx.get(f"{proxy.url}/v1/models", headers=auth()).status_code == 502
    assert metric(proxy, "vlmrun_cache_upstream_circuit_open") == 1
    response = httpx.get(f"{proxy.url}/v1/models", headers=auth())
    assert response.status_code == 502 and "circuit open" in response.json()["detail"]


def test_breaker_closes_when_upstream_returns(
    standin: StandIn, upstream: ServerThread, start_proxy
) -> None:
    """Once the API is back, the probe after the cooldown succeeds and traffic flows again."""
    # A cooldown long enough that the metric below is read while the breaker is still open on
    # a busy machine (at 200 ms it sometimes was not).
    proxy = start_proxy(breaker_threshold=2, breaker_cooldown="2s", retries=0)
    port = upstream.port
    upstream.stop()
    for _ in range(2):
        assert httpx.get(f"{proxy.url}/v1/models", headers=auth()).status_code == 502
    assert metric(proxy, "vlmrun_cache_upstream_circuit_open") == 1
    back = ServerThread(standin, port=port).start()
    try:
        deadline = time.monotonic() + 10  # the cooldown is a timer of the product's own
        status = 0
        while status != 404 and time.monotonic() < deadline:  # the stand-in has no /v1/models
            status = httpx.get(f"{proxy.url}/v1/models", headers=auth()).status_code
        assert status == 404
        assert metric(proxy, "vlmrun_cache_upstream_circuit_open") == 0
    finally:
        back.stop()


def test_breaker_state_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Closed, open after the threshold, one probe after the cooldown, closed on success."""
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    breaker = CircuitBreaker(threshold=2, cooldown=5)
    breaker.record(httpx.ConnectError("refused"))
    assert breaker.admit() and breaker.state == "closed"
    breaker.record(503)
    assert breaker.state == "open" and not breaker.admit()
    now[0] += 5
    assert breaker.admit() and not breaker.admit()  # one probe at a time
    breaker.record(httpx.ReadTimeout("slow"))
    assert breaker.state == "open"
    now[0] += 5
    assert breaker.admit()
    breaker.record(404)
    assert breaker.state == "closed" and breaker.admit() and breaker.admit()


def test_breaker_counts_only_upstream_faults() -> None:
    """Client mistakes, pool waits and 500s never count; connect errors, timeouts and 502-504
    do (the one rule, in proxy.upstream.upstream_fault)."""
    breaker = CircuitBreaker(threshold=1, cooldown=60)
    for outcome in (
        httpx.LocalProtocolError("bad header"),
        httpx.PoolTimeout("busy"),
        httpx.WriteError("upload refused"),
        500,
        429,
        200,
    ):
        breaker.record(outcome)
        assert breaker.state == "closed", outcome
    breaker.record(504)
    assert breaker.state == "open"


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_cut_bodies_are_never_committed(standin: StandIn, proxy, data: st.DataObject) -> None:
    """For any size and any cut offset, a cut body is not cached and the retry is whole."""
    size = data.draw(st.integers(min_value=1, max_value=3_000_000), label="size")
    cut = data.draw(st.integers(min_value=0, max_value=size - 1), label="cut")
    chunked = data.draw(st.booleans(), label="chunked")
    object_id = f"arr_{len(standin.artifacts):06x}"
    body = standin.add("session", SESSION, object_id, size=size)
    standin.faults[object_id] = Fault(cut_at=cut, chunked=chunked, times=1)
    with pytest.raises(httpx.HTTPError):
        fetch(proxy, object_id)
    again = fetch(proxy, object_id)
    assert (again.status_code, again.headers["x-cache"], again.content) == (200, "MISS", body)
    assert fetch(proxy, object_id).content == body


# -- disk faults ---------------------------------------------------------------------------


def test_deleted_entry_is_refetched(standin: StandIn, proxy, cache_dir: Path) -> None:
    """A cached file removed behind the proxy's back is fetched again, not a 500."""
    body = standin.add("session", SESSION, "arr_de1e7e", size=50_000)
    fetch(proxy, "arr_de1e7e")
    for path in (cache_dir / "entries").rglob("*.val"):
        path.unlink()
    again = fetch(proxy, "arr_de1e7e")
    assert (again.status_code, again.content) == (200, body)
    assert fetch(proxy, "arr_de1e7e").headers["x-cache"] == "HIT"


def test_garbage_index_at_start_is_survived(standin: StandIn, start_proxy, cache_dir: Path) -> None:
    """A cache.db overwritten with garbage: the proxy starts cold and serves."""
    body = standin.add("session", SESSION, "arr_9a9ba9")
    first = start_proxy()
    fetch(first, "arr_9a9ba9")
    first.stop()
    (cache_dir / "entries" / "cache.db").write_bytes(b"\x00garbage" * 4096)
    second = start_proxy()
    assert fetch(second, "arr_9a9ba9").content == body
    assert fetch(second, "arr_9a9ba9").headers["x-cache"] == "HIT"
    assert metric(second, "vlmrun_cache_store_failures_total", reason="index") == 1


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs for the cache (needs root, as CI and the dev machines have)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_streams_through_and_recovers(
    standin: StandIn, start_proxy, small_disk: Path
) -> None:
    """With no room, artifacts still arrive whole (uncached); when space returns, caching does."""
    proxy = start_proxy(cache_dir=str(small_disk / "cache"), min_free_space=0)
    announced = standin.add("session", SESSION, "vid_b19b19", size=12 * 1024 * 1024)
    unannounced = standin.add("session", SESSION, "vid_c4c4c4", size=12 * 1024 * 1024)
    standin.faults["vid_c4c4c4"] = Fault(chunked=True)
    filler = small_disk / "filler"
    for _ in range(2):
        assert fetch(proxy, "vid_b19b19").content == announced  # known too big: handed through
        assert (
            fetch(proxy, "vid_c4c4c4").content == unannounced
        )  # ENOSPC half-way: rest from memory
    assert metric(proxy, "vlmrun_cache_store_failures_total", reason="no_space") == 2
    assert metric(proxy, "vlmrun_cache_store_failures_total", reason="write") == 2
    small = standin.add("session", SESSION, "arr_5a11ed", size=200_000)
    with contextlib.suppress(OSError), filler.open("wb", buffering=0) as out:
        while True:  # fill the disk to the last block: not even a small entry fits
            out.write(b"\0" * 65536)
    assert fetch(proxy, "arr_5a11ed").content == small
    filler.unlink()  # space comes back
    assert fetch(proxy, "arr_5a11ed").content == small
    assert fetch(proxy, "arr_5a11ed").headers["x-cache"] == "HIT"
    assert not list((small_disk / "cache" / "tmp").iterdir())


def test_no_room_at_all_still_serves_and_still_checks_keys(standin: StandIn, start_proxy) -> None:
    """Below min_free_space every artifact streams through, each with the asker's own key."""
    proxy = start_proxy(min_free_space="1PiB")
    body = standin.add("session", SESSION, "arr_d1d1d1")
    assert fetch(proxy, "arr_d1d1d1", token=OTHER_TOKEN).status_code == 404
    for _ in range(2):
        response = fetch(proxy, "arr_d1d1d1", token=TOKEN)
        assert (response.status_code, response.content) == (200, body)
    assert standin.hits("session", SESSION, "arr_d1d1d1") == 3
    assert metric(proxy, "vlmrun_cache_entries") == 0


def test_an_fsync_that_fails_stores_nothing_and_leaves_no_file(
    standin: StandIn, proxy, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fails the flush of a large entry (EIO) before its commit: the client still
    gets every byte, nothing is indexed nor left in tmp/, the failure is counted, and the next
    request fetches again; once the disk is well, the entry is stored."""
    import errno
    import os

    real_fsync = os.fsync
    failing = [True]

    def fsync(fd: int) -> None:
        if failing[0] and os.readlink(f"/proc/self/fd/{fd}").endswith(".fill"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    body = standin.add("session", SESSION, "arr_e10e10", size=300_000)
    first = fetch(proxy, "arr_e10e10")
    assert (first.status_code, first.headers["x-cache"], first.content) == (200, "MISS", body)
    assert metric(proxy, "vlmrun_cache_store_failures_total", reason="commit") == 1
    assert metric(proxy, "vlmrun_cache_entries") == 0
    assert list((cache_dir / "tmp").iterdir()) == []
    assert list((cache_dir / "entries").rglob("*.val")) == []
    failing[0] = False
    assert fetch(proxy, "arr_e10e10").headers["x-cache"] == "MISS"
    again = fetch(proxy, "arr_e10e10")
    assert (again.headers["x-cache"], again.content) == ("HIT", body)
    assert standin.hits("session", SESSION, "arr_e10e10") == 2
