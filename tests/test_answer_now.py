"""Hits answered in the protocol, without an ASGI task (proxy/front.py, proxy/protocols.py).

The simplest hit (memory tier, a live proof in memory, no condition) is answered as soon as its
head is parsed. These tests check that such an answer is the route's answer to the byte, that it
keeps a connection's answers in order, that it leaves no idle timer armed over a request behind
it, and that nothing else takes that way: another credential, a condition, a request the route
would refuse. What a client pipelines behind such a hit in the same read gets what it gets
behind the route's answer, refusals included (which found the parser's 400 overtaking a
response under way on the route's way).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import pytest

from proxy.app import create_app
from proxy.cli import uvicorn_options
from proxy.config import load
from proxy.front import Front
from tests.conftest import OTHER_TOKEN, SESSION, TOKEN
from tests.helpers import fetch, metric
from tests.servers import ServerThread
from tests.standin import Fault, StandIn

TARGET = f"/v1/artifacts?object_id={{}}&session_id={SESSION}"


class Counted:
    """The app's ``answer_now``, counting the answers it gave (it still does the work)."""

    def __init__(self, front: Front) -> None:
        self.inner = front._now
        self.answered = 0
        front._now = self

    def __call__(self, query: bytes, headers: list[tuple[bytes, bytes]]) -> object:
        found = self.inner(query, headers) if self.inner is not None else None
        self.answered += found is not None
        return found


@pytest.fixture
def server(upstream: ServerThread, cache_dir: object) -> Iterator[tuple[ServerThread, Counted]]:
    config = load(env={}, flags={"upstream": upstream.url, "cache_dir": str(cache_dir)})
    front = create_app(config)
    counted = Counted(front)
    proxy = ServerThread(front, **uvicorn_options(config)).start()
    yield proxy, counted
    proxy.stop()


def request(object_id: str, token: str = TOKEN, extra: str = "") -> bytes:
    return (
        f"GET {TARGET.format(object_id)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\n{extra}\r\n"
    ).encode()


class Reader:
    """Whole responses, one after another, off one connection."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.data = b""

    def _more(self) -> None:
        chunk = self.conn.recv(65536)
        assert chunk, "the connection closed"
        self.data += chunk

    def response(self) -> tuple[bytes, bytes]:
        """The head (without its Date line) and the body of the next response."""
        while b"\r\n\r\n" not in self.data:
            self._more()
        head, self.data = self.data.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in lines
            if line.lower().startswith(b"content-length:")
        )
        while len(self.data) < length:
            self._more()
        body, self.data = self.data[:length], self.data[length:]
        return b"\r\n".join(line for line in lines if not line.startswith(b"date:")), body


def warm(proxy: ServerThread, object_id: str, standin: StandIn) -> bytes:
    """Fill ``object_id`` and read it once from disk, which loads the memory tier."""
    body = standin.add("session", SESSION, object_id)
    assert fetch(proxy, object_id).headers["X-Cache"] == "MISS"
    assert fetch(proxy, object_id).headers["X-Cache"] == "HIT"
    return body


def test_an_immediate_hit_is_the_routes_hit_to_the_byte(
    server: tuple[ServerThread, Counted], standin: StandIn
) -> None:
    proxy, counted = server
    body = warm(proxy, "img_0a0a01", standin)
    hits = metric(proxy, "vlmrun_cache_hits_total", tier="memory")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as conn:
        reader = Reader(conn)
        conn.sendall(request("img_0a0a01"))
        immediate = reader.response()
        assert counted.answered == 1
        # A zero Content-Length changes nothing in the answer but keeps it on the ASGI way.
        conn.sendall(request("img_0a0a01", extra="Content-Length: 0\r\n"))
        routed = reader.response()
        assert counted.answered == 1
    assert immediate == routed
    head, got = immediate
    assert got == body
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Type: image/png\r\n" in head  # the SDK's spelling
    assert b"\r\nx-cache: HIT\r\n" in head
    assert b"\r\ncache-status: vlmrun-cache; hit; detail=memory" in head
    assert metric(proxy, "vlmrun_cache_hits_total", tier="memory") == hits + 2
    assert metric(proxy, "vlmrun_cache_requests_total", outcome="hit") == 3


def test_answers_keep_their_order_around_a_request_that_waits(
    server: tuple[ServerThread, Counted], standin: StandIn
) -> None:
    """Pipelined: a hit, a miss held upstream, a hit. The second hit is not answered at once
    (that would put it before the miss's answer): it waits its turn."""
    proxy, counted = server
    hit = warm(proxy, "img_0a0a02", standin)
    held = threading.Event()
    standin.faults["arr_0a0a03"] = Fault(hold_start=held)
    missed = standin.add("session", SESSION, "arr_0a0a03", 3000)
    standin.arrived.clear()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as conn:
        reader = Reader(conn)
        conn.sendall(request("img_0a0a02") + request("arr_0a0a03") + request("img_0a0a02"))
        assert reader.response()[1] == hit
        assert standin.arrived.wait(20)
        held.set()
        second_head, second = reader.response()
        assert second == missed and b"x-cache: MISS" in second_head
        assert reader.response()[1] == hit
    assert counted.answered == 1


def test_an_immediate_hit_leaves_no_idle_timer_over_the_request_behind_it(
    server: tuple[ServerThread, Counted], standin: StandIn
) -> None:
    """The answer is complete before the next pipelined head is parsed, so the server arms
    its keep-alive timer; a slow request behind it must disarm it, or the connection would be
    closed under it ``timeout_keep_alive`` seconds later."""
    proxy, counted = server
    warm(proxy, "img_0a0a04", standin)
    held = threading.Event()
    standin.faults["arr_0a0a05"] = Fault(hold_start=held)
    standin.add("session", SESSION, "arr_0a0a05", 2000)
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as conn:
            reader = Reader(conn)
            standin.arrived.clear()
            conn.sendall(request("img_0a0a04") + request("arr_0a0a05"))
            reader.response()
            assert standin.arrived.wait(20)
            assert counted.answered == 1
            (protocol,) = proxy.server.server_state.connections
            assert protocol.timeout_keep_alive_task is None  # type: ignore[attr-defined]
            held.set()
            assert len(reader.response()[1]) == 2000
    finally:
        held.set()


@pytest.mark.parametrize(
    "extra",
    [
        "Range: bytes=0-9\r\n",
        'If-None-Match: "x"\r\n',
        "Connection: close\r\n",
        "Expect: 100-continue\r\n",
        "Content-Length: 5\r\n",
    ],
)
def test_conditions_and_bodies_take_the_routes_way(
    server: tuple[ServerThread, Counted], standin: StandIn, extra: str
) -> None:
    proxy, counted = server
    warm(proxy, "img_0a0a06", standin)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as conn:
        conn.sendall(request("img_0a0a06", extra=extra) + (b"abcde" if "Length" in extra else b""))
        assert conn.recv(65536).startswith(b"HTTP/1.1 ")
    assert counted.answered == 0


def test_another_credential_is_not_answered_from_memory(
    server: tuple[ServerThread, Counted], standin: StandIn
) -> None:
    """Bob has no proof for Alice's session: his request goes the route's way, which asks the
    API, which refuses him."""
    proxy, counted = server
    warm(proxy, "img_0a0a07", standin)
    assert fetch(proxy, "img_0a0a07", token=OTHER_TOKEN).status_code in (401, 403, 404)
    assert fetch(proxy, "img_0a0a07", token=None).status_code in (401, 403)
    assert counted.answered == 0
    assert fetch(proxy, "img_0a0a07").status_code == 200
    assert counted.answered == 1


def test_a_client_that_pipelines_without_reading_gets_answers_at_once_only_until_it_lags(
    server: tuple[ServerThread, Counted], standin: StandIn
) -> None:
    """40 pipelined requests for a 900 kB entry, none read: answers written at once stop when
    the connection's buffers are full (the rest wait their turn on the route's way, which waits
    for the client), and all 40 arrive whole and in order once it reads."""
    proxy, counted = server
    body = standin.add("session", SESSION, "arr_0e0e01", 900_000)
    assert fetch(proxy, "arr_0e0e01").headers["X-Cache"] == "MISS"
    assert fetch(proxy, "arr_0e0e01").headers["X-Cache"] == "HIT"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as conn:
        conn.sendall(request("arr_0e0e01") * 40)
        reader = Reader(conn)
        for _ in range(40):
            head, got = reader.response()
            assert got == body and head.startswith(b"HTTP/1.1 200 OK")
    assert 1 <= counted.answered < 40


def _until_closed(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return b"\r\n".join(
        line for line in data.split(b"\r\n") if not line.lower().startswith(b"date:")
    )


#: What a client may put right behind a hit in the same read. Each must get what it gets behind
#: that hit answered the ASGI way: its own refusal (the guards' 4xx, the parser's 400, the
#: API's answer for another key), nothing served on the strength of the request before it.
FOLLOWERS = {
    "another-key": request("img_0a0a08", OTHER_TOKEN),
    "no-key": b"GET " + TARGET.format("img_0a0a08").encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "too-many-fields": request("img_0a0a08", extra="X-A: a\r\n" * 120),
    "long-field": request("img_0a0a08", extra="X-Long: " + "a" * 9000 + "\r\n"),
    "long-target": b"GET /v1/artifacts?object_id=" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
    "length-and-chunked": request(
        "img_0a0a08", extra="Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"
    )
    + b"0\r\n\r\n",
    "obs-fold": request("img_0a0a08", extra="X-A: a\r\n b\r\n"),
    "bare-lf": request("img_0a0a08", extra="X-A: a\nX-B: b\r\n"),
}
_LAST = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("follower", FOLLOWERS.values(), ids=FOLLOWERS.keys())
def test_what_follows_an_immediate_hit_in_the_same_read_is_answered_as_on_the_routes_way(
    server: tuple[ServerThread, Counted], standin: StandIn, follower: bytes
) -> None:
    proxy, counted = server
    body = warm(proxy, "img_0a0a08", standin)
    answers = []
    for first in (request("img_0a0a08"), request("img_0a0a08", extra="Content-Length: 0\r\n")):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as conn:
            conn.sendall(first + follower + _LAST)
            answers.append(_until_closed(conn))
    assert counted.answered == 1
    immediate, routed = answers
    assert immediate == routed
    assert immediate.startswith(b"HTTP/1.1 200 OK\r\n") and immediate.count(body) == 1
    assert immediate.count(b"HTTP/1.1 ") >= 2  # the follower got an answer of its own


def test_a_request_the_parser_refuses_is_answered_after_the_responses_before_it(
    server: tuple[ServerThread, Counted], standin: StandIn
) -> None:
    """Pipelined: a miss held upstream, then bytes the HTTP parser refuses. The refusal (a 400
    that closes the connection) comes after the miss's answer, which arrives whole: not first,
    where the client would read it as the answer to its first request, and the miss's answer
    would be lost with the connection."""
    proxy, _ = server
    held = threading.Event()
    standin.faults["arr_0a0a0a"] = Fault(hold_start=held)
    body = standin.add("session", SESSION, "arr_0a0a0a", 3000)
    standin.arrived.clear()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as conn:
            conn.sendall(request("arr_0a0a0a") + FOLLOWERS["length-and-chunked"])
            assert standin.arrived.wait(20)
            held.set()
            answers = _until_closed(conn)
    finally:
        held.set()
    head, rest = answers.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and rest.startswith(body)
    refusal = rest[len(body) :]
    assert refusal.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert refusal.endswith(b'{"detail":"Invalid HTTP request received."}')


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_a_request_whose_own_body_the_parser_refuses_is_answered_at_once(
    upstream: ServerThread, cache_dir: object, http: str
) -> None:
    """A broken chunked upload: nothing is owed before it, so its 400 comes at once and the
    connection closes under the upload (not after ``body_timeout``, waiting for a body that
    the refusal dropped)."""
    flags = {"upstream": upstream.url, "cache_dir": str(cache_dir), "http": http}
    config = load(env={}, flags=flags)
    proxy = ServerThread(create_app(config), **uvicorn_options(config)).start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
            conn.sendall(
                b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + TOKEN.encode()
                + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
            )
            conn.sendall(b"zz\r\nnot a chunk\r\n")
            answer = _until_closed(conn)  # within the socket's 10 s (body_timeout is 30 s)
    finally:
        proxy.stop()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")


def test_an_immediate_hit_is_logged_as_the_routes_hit(
    upstream: ServerThread, cache_dir: object, standin: StandIn
) -> None:
    """One access log line per immediate hit, the same as the route's but for the time."""
    config = load(
        env={},
        flags={"upstream": upstream.url, "cache_dir": str(cache_dir), "log_format": "json"},
    )
    front = create_app(config)
    counted = Counted(front)
    writer = getattr(front._log, "__self__")  # noqa: B009 (the app's AccessLogWriter)
    written: list[bytes] = []
    writer._sink = written.append  # before the lifespan starts it: instead of stdout
    proxy = ServerThread(front, **uvicorn_options(config)).start()
    try:
        warm(proxy, "img_0a0a09", standin)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as conn:
            reader = Reader(conn)
            conn.sendall(request("img_0a0a09"))
            reader.response()
            conn.sendall(request("img_0a0a09", extra="Content-Length: 0\r\n"))
            reader.response()
    finally:
        proxy.stop()  # the lifespan's end writes every line
    assert counted.answered == 1
    lines = [json.loads(line) for line in b"".join(written).decode().splitlines()]
    assert [(line["outcome"], line["status"]) for line in lines] == [
        ("miss", 200),
        ("hit", 200),
        ("hit", 200),
        ("hit", 200),
    ]
    immediate, routed = (
        {k: v for k, v in line.items() if k not in ("ts", "ms")} for line in lines[2:]
    )
    assert immediate == routed
    assert TOKEN not in b"".join(written).decode()
