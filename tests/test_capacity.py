"""No client can take the proxy from the others: the breaker counts only upstream faults, the
capacity model keeps each credential to its share, and a dripping upstream cannot hold a fill."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from proxy.capacity import PerKey, RateFloor
from proxy.errors import TooManyRequests
from tests.conftest import OTHER_TOKEN, SESSION, TOKEN
from tests.helpers import artifact_url, auth, fetch, metric, wait_until
from tests.standin import Fault, StandIn

THIRD_TOKEN = "key-carol-0003"


@pytest.fixture
def three_keys(standin: StandIn) -> StandIn:
    for token in (OTHER_TOKEN, THIRD_TOKEN):
        standin.grant(token, "session", SESSION)
    return standin


def _raw_status(port: int, request: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_malformed_client_headers_never_open_the_breaker(standin: StandIn, start_proxy) -> None:
    """30 requests with a header HTTP forbids upstream each get a 400, are neither retried nor
    counted, and another user's new artifact is fetched right after."""
    proxy = start_proxy(breaker_threshold=2)
    body = standin.add("session", SESSION, "img_b4ea00")
    for index in range(30):
        target = (
            b"/v1/echo"
            if index % 2
            else f"/v1/artifacts?filename=x.png&session_id={SESSION}".encode()
        )
        status = _raw_status(
            proxy.port,
            b"GET " + target + b" HTTP/1.1\r\nHost: p\r\nConnection: close\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\nX-Trailing: value \r\n\r\n",
        )
        assert status == 400
    assert standin.path_hits["/v1/echo"] == 0  # nothing was sent, so nothing to retry
    assert metric(proxy, "vlmrun_cache_upstream_circuit_open") == 0
    response = fetch(proxy, "img_b4ea00", OTHER_TOKEN)
    assert response.status_code == 404  # Bob does not own the session: but the API answered
    assert (fetch(proxy, "img_b4ea00").status_code, fetch(proxy, "img_b4ea00").content) == (
        200,
        body,
    )


class _SlowUpload:
    """A client uploading a 1 MB body of which it sends only the first bytes."""

    def __init__(self, port: int, token: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(
            f"POST /v1/files?purpose=assistants HTTP/1.1\r\nHost: p\r\n"
            f"Authorization: Bearer {token}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 1000000\r\n\r\n"
            "--x\r\n".encode()
        )

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def uploads() -> Iterator[list[_SlowUpload]]:
    held: list[_SlowUpload] = []
    yield held
    for upload in held:
        upload.close()


def test_slow_uploads_cannot_starve_artifact_misses(
    standin: StandIn, start_proxy, uploads: list[_SlowUpload]
) -> None:
    """Slow uploads that hold every passthrough connection (and more wait for one) do not stop
    a new artifact from being fetched: fills and checks have a pool of their own."""
    proxy = start_proxy(max_connections=8, max_passthrough_per_key=100)
    body = standin.add("session", SESSION, "vid_510e00", size=200_000)
    for _ in range(11):
        uploads.append(_SlowUpload(proxy.port, TOKEN))
    assert standin.wait_for_requests("/v1/files", 8)  # the pool is taken
    started = time.monotonic()
    response = fetch(proxy, "vid_510e00")
    assert (response.status_code, response.content) == (200, body)
    assert time.monotonic() - started < 5  # generous: a starved miss waits first_byte_timeout


def test_one_key_cannot_take_every_fill_slot(three_keys: StandIn, start_proxy) -> None:
    """A credential holding its share of fill slots streams further misses uncached, while
    another credential's miss still starts a fill of its own."""
    standin = three_keys
    proxy = start_proxy(max_fills=4, max_fills_per_key=2)
    release = threading.Event()
    for index in range(4):
        standin.add("session", SESSION, f"arr_f111{index:02x}")
        standin.faults[f"arr_f111{index:02x}"] = Fault(hold_start=release, times=1)
    with ThreadPoolExecutor(4) as pool:
        held = [pool.submit(fetch, proxy, f"arr_f111{index:02x}") for index in range(2)]
        assert standin.wait_for_requests("/v1/artifacts", 2)
        third = pool.submit(fetch, proxy, "arr_f11102")  # over Alice's share: uncached
        other = pool.submit(fetch, proxy, "arr_f11103", OTHER_TOKEN)  # Bob: a fill of his own
        assert standin.wait_for_requests("/v1/artifacts", 4)
        release.set()
        assert [f.result(timeout=20).headers.get("x-cache") for f in held] == ["MISS", "MISS"]
        assert third.result(timeout=20).headers.get("x-cache") is None
        assert other.result(timeout=20).headers.get("x-cache") == "MISS"


def test_one_key_cannot_take_every_waiter_place(three_keys: StandIn, start_proxy) -> None:
    """A credential following fills with its share of waiters gets a 429 for one more, while
    another credential still joins."""
    standin = three_keys
    proxy = start_proxy(max_waiters_per_key=2)
    body = standin.add("session", SESSION, "vid_3a1700", size=100_000)
    release = threading.Event()
    standin.faults["vid_3a1700"] = Fault(hold_middle=release, times=1)
    url = artifact_url(proxy, "vid_3a1700")
    with httpx.Client(timeout=20) as client, contextlib.ExitStack() as streams:
        # Each stream is open once its headers arrived: its client holds a waiter place.
        first = streams.enter_context(client.stream("GET", url, headers=auth()))
        joined = [
            streams.enter_context(client.stream("GET", url, headers=auth(OTHER_TOKEN)))
            for _ in range(2)
        ]
        refused = client.get(url, headers=auth(OTHER_TOKEN))
        assert (refused.status_code, refused.headers["retry-after"]) == (429, "1")
        assert refused.json()["detail"]
        carol = streams.enter_context(client.stream("GET", url, headers=auth(THIRD_TOKEN)))
        assert [r.headers["x-cache"] for r in (first, *joined, carol)] == [
            "MISS",
            "COALESCED",
            "COALESCED",
            "COALESCED",
        ]
        release.set()
        for response in (first, *joined, carol):
            assert response.read() == body


def test_a_waiter_that_hangs_up_gives_its_place_back_at_once(standin: StandIn, start_proxy) -> None:
    """A client following a fill that waits for more bytes, and hangs up, leaves its waiter
    place as the connection closes (the protocol wakes its stream): not when the next bytes
    come, which here is never before the place is needed again."""
    proxy = start_proxy(max_waiters_per_key=1)
    body = standin.add("session", SESSION, "vid_4a1700", size=100_000)
    release = threading.Event()
    standin.faults["vid_4a1700"] = Fault(hold_middle=release, times=1)
    url = artifact_url(proxy, "vid_4a1700")
    with httpx.Client(timeout=20) as client, client.stream("GET", url, headers=auth()) as first:
        with httpx.Client(timeout=20) as gone, gone.stream("GET", url, headers=auth()) as joined:
            assert joined.headers["x-cache"] == "COALESCED"  # the key's one place
            assert client.get(url, headers=auth()).status_code == 429
        # `gone` closed its connection. The place comes back as the proxy sees it close: ask
        # until then (a bounded wait for another process's state, no sleep before the first).
        deadline = time.monotonic() + 10
        while True:
            with (
                httpx.Client(timeout=20) as again,
                again.stream("GET", url, headers=auth()) as after,
            ):
                if after.status_code == 200:
                    assert after.headers["x-cache"] == "COALESCED"
                    release.set()
                    assert after.read() == body
                    break
                assert after.status_code == 429
            assert time.monotonic() < deadline, "the place never came back"
            time.sleep(0.01)
        assert first.read() == body


def test_one_key_cannot_take_every_passthrough_connection(standin: StandIn, start_proxy) -> None:
    """A credential holding its share of passthrough requests (open event streams) gets a 429
    for one more; another credential is served, and the share comes back when streams end."""
    proxy = start_proxy(max_passthrough_per_key=2)
    gate = threading.Event()
    standin.sse_gate = gate
    payload = {"model": "m", "stream": True, "messages": []}
    url = f"{proxy.url}/v1/openai/chat/completions"
    with httpx.Client(timeout=20) as client, ThreadPoolExecutor(2) as pool:

        def stream() -> bytes:
            with client.stream("POST", url, json=payload, headers=auth()) as response:
                return b"".join(response.iter_bytes())

        streams = [pool.submit(stream) for _ in range(2)]
        assert standin.wait_for_requests("/v1/openai/chat/completions", 2)
        refused = client.post(url, json={**payload, "stream": False}, headers=auth())
        assert refused.status_code == 429
        standin.sse_gate = None
        other = client.post(url, json={**payload, "stream": False}, headers=auth(OTHER_TOKEN))
        assert other.status_code == 200
        gate.set()
        assert all(b"[DONE]" in f.result(timeout=20) for f in streams)
        again = client.post(url, json={**payload, "stream": False}, headers=auth())
        assert again.status_code == 200


@pytest.mark.parametrize(
    "limits",
    [{"fill_timeout": "2s"}, {"fill_min_rate": "16KiB", "fill_rate_window": "1s"}],
    ids=["fill_timeout", "fill_min_rate"],
)
@pytest.mark.parametrize("size", [100_000, 40_000], ids=["on-disk", "in-memory"])
def test_a_dripping_upstream_is_abandoned(
    standin: StandIn, start_proxy, limits: dict[str, str], size: int
) -> None:
    """An upstream that drips one byte every 50 ms is cut off by the fill deadlines, whether
    the fill writes a temporary file or keeps a small body in memory: the client sees a failed
    transfer in bounded time, and nothing is cached."""
    proxy = start_proxy(**limits)
    body = standin.add("session", SESSION, "vid_d41900", size=size)
    standin.faults["vid_d41900"] = Fault(drip=0.05, times=1)
    started = time.monotonic()
    with pytest.raises(httpx.HTTPError):
        fetch(proxy, "vid_d41900")
    assert time.monotonic() - started < 8
    again = fetch(proxy, "vid_d41900")
    assert (again.headers["x-cache"], again.content) == ("MISS", body)


def test_rate_floor_judges_only_whole_windows() -> None:
    """The floor looks at the bytes of the last window, and only once a window has passed."""
    floor = RateFloor(min_rate=100, window=10, started=0)
    assert not floor.too_slow(5, 0)  # no whole window yet
    assert not floor.too_slow(10, 1000)  # 1000 B in 10 s: exactly the floor
    assert not floor.too_slow(15, 1600)
    assert floor.too_slow(21, 1700)  # 700 B since t=10: under 100 B/s
    fast = RateFloor(min_rate=100, window=10, started=0)
    assert not fast.too_slow(30, 10_000)  # one sample after a long silence: judged on the whole


def test_per_key_counts_and_releases() -> None:
    """A share is per credential, anonymous requests share one, and releases give it back."""
    shares = PerKey(2, "things")
    shares.acquire("a")
    shares.acquire("a")
    with pytest.raises(TooManyRequests):
        shares.acquire("a")
    shares.acquire(None)
    shares.acquire("b")
    shares.release("a")
    shares.acquire("a")
    assert shares.held("a") == 2 and shares.held(None) == 1


def test_a_stalled_upload_gets_a_408_and_frees_its_connection(
    standin: StandIn, start_proxy, uploads: list[_SlowUpload]
) -> None:
    """An upload that goes silent for body_timeout is answered 408; its connection is back in
    the pool for others."""
    proxy = start_proxy(body_timeout="500ms", max_connections=1, connect_timeout="10s")
    upload = _SlowUpload(proxy.port, TOKEN)
    uploads.append(upload)
    started = time.monotonic()
    head = upload.sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 408"), head
    assert time.monotonic() - started < 5
    assert httpx.get(f"{proxy.url}/v1/health", headers=auth()).status_code == 200


def test_uploads_dropped_by_the_upstream_never_open_the_breaker(start_proxy) -> None:
    """An upstream that hangs up on a client's upload (as a server's body timeout would) is not
    counted against it, however often: other users' requests still go through."""
    from tests.rawupstream import RawUpstream, framed

    raw = RawUpstream().start()
    try:
        raw.answer = lambda path, n: None if path.startswith("/v1/files") else framed(b"ok")
        proxy = start_proxy(upstream=raw.url, breaker_threshold=1)
        for _ in range(5):
            response = httpx.post(
                f"{proxy.url}/v1/files", headers=auth(), content=b"x" * 100_000, timeout=20
            )
            assert response.status_code in (502, 504)
        assert metric(proxy, "vlmrun_cache_upstream_circuit_open") == 0
        assert httpx.get(f"{proxy.url}/v1/models", headers=auth()).content == b"ok"
    finally:
        raw.stop()


def test_a_miss_streamed_uncached_is_retried_like_a_fill(standin: StandIn, start_proxy) -> None:
    """Over its share of fills, a credential's miss is streamed through uncached; a 503 from
    the API before the first byte is retried, as a fill's fetch is, not handed to the client."""
    proxy = start_proxy(max_fills_per_key=1, retry_backoff=0.01)
    release = threading.Event()
    standin.add("session", SESSION, "arr_f11200")
    standin.faults["arr_f11200"] = Fault(hold_start=release, times=1)
    body = standin.add("session", SESSION, "arr_f11201")
    standin.faults["arr_f11201"] = Fault(status=503, times=1)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(fetch, proxy, "arr_f11200")
        assert standin.wait_for_requests("/v1/artifacts", 1)
        try:
            response = fetch(proxy, "arr_f11201")
        finally:
            release.set()
        assert held.result(timeout=20).status_code == 200
    assert (response.status_code, response.content) == (200, body)
    assert response.headers.get("x-cache") is None  # streamed through, uncached


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_a_waiter_that_hangs_up_before_the_fill_starts_gives_its_place_back(
    standin: StandIn, start_proxy, http: str
) -> None:
    """The attack: join a fill while the upstream has not answered yet, and hang up. The
    connection's hang-up callbacks run before the response exists; the streamed response,
    made when the fill starts, must still see that its client is gone. Otherwise it streams
    the whole fill into a closed connection, holding its credential's waiter place and the
    fill's file until the upstream finishes (here: not until the test lets it)."""
    proxy = start_proxy(max_waiters_per_key=1, http=http)
    body = standin.add("session", SESSION, "vid_4a1701", size=100_000)
    answer, finish = threading.Event(), threading.Event()
    standin.faults["vid_4a1701"] = Fault(hold_start=answer, hold_middle=finish, times=1)
    url = artifact_url(proxy, "vid_4a1701")
    services = proxy.app.state.services
    connections = proxy.server.server_state.connections

    def readers() -> int:  # the fill's open readers (and its own reference)
        return sum(fill._refs for fill in services.fills._running.values())

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(fetch, proxy, "vid_4a1701")
        assert standin.arrived.wait(10)  # the fill is held before the upstream's status line
        alone = readers()
        gone = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        target = url[len(proxy.url) :]
        gone.sendall(
            f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        assert wait_until(lambda: readers() == alone + 1)  # it follows the fill
        gone.close()
        assert wait_until(lambda: len(connections) == 1)  # the proxy saw it go (`first` stays)
        answer.set()  # the fill starts, then holds in the middle
        try:
            assert wait_until(lambda: readers() == alone, timeout=5), "the gone client still reads"
            with (
                httpx.Client(timeout=20) as again,
                again.stream("GET", url, headers=auth()) as after,
            ):
                assert after.status_code == 200  # TOKEN's one waiter place came back
                assert after.headers["x-cache"] == "COALESCED"
                finish.set()
                assert after.read() == body
        finally:
            finish.set()
        assert first.result(timeout=20).content == body


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_followers_that_hang_up_mid_fill_release_their_descriptors(
    standin: StandIn, start_proxy, http: str
) -> None:
    """20 clients follow a fill held in the middle and hang up: 10 after reading the head, 10
    that never read (the proxy's writes to them pause). Every descriptor (their sockets, their
    hold on the fill's file) and every reader place is given back before the fill ends, and
    the fill still completes for the client that stayed."""
    proxy = start_proxy(http=http)
    body = standin.add("session", SESSION, "vid_4a1702", size=4_000_000)
    finish = threading.Event()
    standin.faults["vid_4a1702"] = Fault(hold_middle=finish, times=1)
    url = artifact_url(proxy, "vid_4a1702")
    services = proxy.app.state.services

    def readers() -> int:
        return sum(fill._refs for fill in services.fills._running.values())

    def descriptors() -> int:
        """Open descriptors, but for SQLite's: each worker thread opens its own index and proof
        store connections the first time it serves one, which need not be in the first round."""
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                count += ".db" not in os.readlink(f"/proc/self/fd/{fd}")
        return count

    request = (
        f"GET {url[len(proxy.url) :]} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    ).encode()
    with httpx.Client(timeout=20) as client, client.stream("GET", url, headers=auth()) as first:
        alone = readers()

        def round_of_hangups() -> None:
            gone = []
            for n in range(20):
                sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
                sock.sendall(request)
                if n % 2 == 0:
                    assert b"COALESCED" in sock.recv(4096)  # the head (and maybe some body)
                gone.append(sock)
            assert wait_until(lambda: readers() == alone + 20)
            for sock in gone:
                sock.close()
            assert wait_until(lambda: readers() == alone, timeout=10), "a gone follower reads"

        try:
            round_of_hangups()  # the first also opens the worker threads' own descriptors
            before = descriptors()
            round_of_hangups()
            assert wait_until(lambda: descriptors() <= before, timeout=10), "descriptors leaked"
        finally:
            finish.set()
        assert first.read() == body
