"""Attacks on the fills of small bodies, kept whole in memory until their commit
(:meth:`proxy.fills.Fills._fill_in_memory`): upstreams that lie about the length or drip, and
another worker wanting the key while such a fill runs."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from proxy.store.claims import Holding
from tests.conftest import OTHER_TOKEN, SESSION, TOKEN, ProxyFactory
from tests.helpers import artifact_url, auth, fetch, metric
from tests.rawupstream import RawUpstream, framed
from tests.servers import ServerThread
from tests.standin import Fault, StandIn


@contextlib.contextmanager
def _half_way(proxy: ServerThread, object_id: str) -> Iterator[tuple[bytes, Iterator[bytes]]]:
    """A client of ``proxy`` streaming ``object_id``, whose upstream holds it half-way: the
    bytes it has, and the rest to come."""
    with httpx.stream("GET", artifact_url(proxy, object_id), headers=auth(), timeout=20) as r:
        chunks = r.iter_raw()
        yield next(chunks), chunks


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    server = RawUpstream().start()
    yield server
    server.stop()


def test_a_body_past_its_announced_length_ends_the_fill_at_once(
    start_proxy: ProxyFactory, raw_upstream: RawUpstream
) -> None:
    """An upstream announcing ``Content-Length: 100`` but framing the body chunked (which h11
    follows) and sending 200 bytes, the rest much later: the fill fails as the 101st byte
    arrives, not once 2 MiB are buffered in memory (or the upstream ends), so the client's
    retry is a fetch of its own rather than a wait on the broken fill."""
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 100\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    good = bytes(range(100))
    raw_upstream.gap = 60.0  # the upstream's own pace: the end comes only after a minute
    raw_upstream.answer = lambda path, n: (
        [head + b"c8\r\n" + b"x" * 200 + b"\r\n", b"0\r\n\r\n"] if n == 1 else framed(good)
    )
    proxy = start_proxy(upstream=raw_upstream.url, read_timeout="120s", fill_timeout="120s")
    url = artifact_url(proxy, "arr_10a9e0")
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, headers=auth(), timeout=20).raise_for_status()
    again = httpx.get(url, headers=auth(), timeout=20)
    assert (again.status_code, again.headers["x-cache"], again.content) == (200, "MISS", good)
    assert len(raw_upstream.requests) == 2


@pytest.mark.parametrize(
    ("token", "status"), [(TOKEN, 200), (OTHER_TOKEN, 404)], ids=["same-key", "other-key"]
)
def test_another_worker_waits_out_a_stalled_small_fill_then_fetches_itself(
    standin: StandIn, start_proxy: ProxyFactory, token: str, status: int
) -> None:
    """Worker A's in-memory fill holds the key's lease and announces no file to follow: worker
    B's client waits at most ``first_byte_timeout`` for it, then fetches with its own
    credential. It gets the whole body (or, not allowed to read the scope, the API's refusal),
    never A's partial one; A's client, released afterwards, gets the whole body too."""
    a, b = start_proxy(), start_proxy(first_byte_timeout="1s")
    body = standin.add("session", SESSION, "arr_2a2a2a", size=40_000)
    release = threading.Event()
    standin.faults["arr_2a2a2a"] = Fault(hold_middle=release, times=1)
    try:
        with _half_way(a, "arr_2a2a2a") as (first, chunks):  # A's fill, held by the upstream
            asked = time.monotonic()
            other = fetch(b, "arr_2a2a2a", token)
            assert time.monotonic() - asked >= 1.0  # it waited for A's lease first
            assert other.status_code == status
            if status == 200:
                assert (other.headers["x-cache"], other.content) == ("MISS", body)
            else:
                assert body[:1000] not in other.content
            release.set()
            assert first + b"".join(chunks) == body
    finally:
        release.set()
    assert standin.hits("session", SESSION, "arr_2a2a2a") == 2
    for proxy in (a, b):
        again = fetch(proxy, "arr_2a2a2a")
        assert (again.headers["x-cache"], again.content) == ("HIT", body)


def test_a_small_fill_the_disk_cannot_take_still_serves_its_bytes(
    standin: StandIn, start_proxy: ProxyFactory, small_disk: Path
) -> None:
    """The disk is only touched at a small fill's commit: a read-only directory for fills,
    then a full disk, still give the client its whole body (uncached, counted as a
    store failure), and once the disk is back the next fetch is stored."""
    cache = small_disk / "cache"
    proxy = start_proxy(cache_dir=str(cache), min_free_space=0)
    read_only = standin.add("session", SESSION, "arr_4d0111", size=30_000)
    full = standin.add("session", SESSION, "arr_4d0222", size=30_000)

    assert metric(proxy, "vlmrun_cache_store_failures_total", reason="write") == 0  # it is up
    tmp = str(cache / "tmp")  # where fills begin: made read-only (root ignores modes)
    subprocess.run(["mount", "--bind", tmp, tmp], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", tmp], check=True)
        for _ in range(2):
            got = fetch(proxy, "arr_4d0111")
            assert (got.headers["x-cache"], got.content) == ("MISS", read_only)
    finally:
        subprocess.run(["umount", tmp], check=True)
    assert metric(proxy, "vlmrun_cache_store_failures_total", reason="write") == 2
    filler = small_disk / "filler"
    with contextlib.suppress(OSError), filler.open("wb", buffering=0) as out:
        while True:  # to the last block
            out.write(b"\0" * 65536)
    got = fetch(proxy, "arr_4d0222")
    assert (got.status_code, got.headers["x-cache"], got.content) == (200, "MISS", full)
    assert metric(proxy, "vlmrun_cache_store_failures_total", reason="no_space") == 1
    filler.unlink()
    assert fetch(proxy, "arr_4d0222").headers["x-cache"] == "MISS"
    again = fetch(proxy, "arr_4d0222")
    assert (again.headers["x-cache"], again.content) == ("HIT", full)
    assert list((cache / "tmp").iterdir()) == []


@pytest.mark.parametrize(
    ("token", "status"), [(TOKEN, 200), (OTHER_TOKEN, 404)], ids=["same-key", "other-key"]
)
def test_another_worker_waits_for_a_small_fill_then_reads_its_entry(
    standin: StandIn, start_proxy: ProxyFactory, token: str, status: int
) -> None:
    """Worker B's client arriving while worker A's in-memory fill runs waits for A's lease
    (there is no file to follow), then reads the entry A stored: no second upstream fetch of
    the bytes, and a credential that may not read the scope is refused, not served them."""
    a, b = start_proxy(), start_proxy(first_byte_timeout="20s")
    body = standin.add("session", SESSION, "arr_3b3b3b", size=40_000)
    release = threading.Event()
    standin.faults["arr_3b3b3b"] = Fault(hold_middle=release, times=1)
    assert metric(b, "vlmrun_cache_entries") == 0  # B is up: its services are open
    coordinator = b.app.state.services.fills._coordinator
    attempt, waiting = coordinator._attempt, threading.Event()

    def watched(key: str, stored: Callable[[], bool] | None = None) -> object:
        got = attempt(key, stored)
        if got is None or isinstance(got, Holding):  # held for the key, unannounced: B waits
            waiting.set()
        return got

    coordinator._attempt = watched
    try:
        with (
            _half_way(a, "arr_3b3b3b") as (first, chunks),  # A's fill, held upstream
            ThreadPoolExecutor(1) as pool,
        ):
            other = pool.submit(fetch, b, "arr_3b3b3b", token)
            assert waiting.wait(timeout=20)
            release.set()
            assert first + b"".join(chunks) == body
            got = other.result(timeout=20)
    finally:
        release.set()
    assert got.status_code == status
    if status == 200:
        assert (got.headers["x-cache"], got.content) == ("COALESCED", body)
        assert standin.hits("session", SESSION, "arr_3b3b3b") == 1
    else:
        assert body[:1000] not in got.content
