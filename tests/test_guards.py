"""The guards in front of the app (proxy/guards.py): header limits, the header deadline and the
connection cap, under both of uvicorn's protocols, with hostile clients on raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import itertools
import json
import selectors
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from uvicorn.server import ServerState

from proxy.config import ConfigError, load
from proxy.errors import ProxyError
from proxy.guards import ConnectionGuard, HeadMeter, Limits
from tests.conftest import SESSION, TOKEN, ProxyFactory
from tests.helpers import fetch, metric
from tests.servers import Daemon, ServerThread
from tests.standin import StandIn

PROTOCOLS = ["h11", "httptools"]
OBJECT = "img_a1b2c3"
TARGET = f"/v1/artifacts?object_id={OBJECT}&session_id={SESSION}".encode()
#: The fields every request below sends: Host, Authorization and Connection.
BASE_FIELDS = 3


def _request(*extra: bytes, target: bytes = TARGET, end: bool = True) -> bytes:
    """A GET of the test artifact with ``BASE_FIELDS`` fields plus ``extra`` (complete lines)."""
    head = (
        b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\nConnection: close\r\n" + b"".join(extra)
    )
    return head + b"\r\n" if end else head


def _padding(count: int, length: int = 20) -> list[bytes]:
    """``count`` header lines of ``length`` bytes each (without CRLF)."""
    return [(f"X-Pad-{i:05d}: ".encode()).ljust(length, b"v") + b"\r\n" for i in range(count)]


class Exchange:
    """One raw request: sent from a thread (so a refused sender still reads), read to EOF."""

    def __init__(self, port: int, data: bytes) -> None:
        started = time.monotonic()
        self.data = b""
        self.reset = False
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            sender = threading.Thread(target=self._send, args=(conn, data), daemon=True)
            sender.start()
            try:
                while chunk := conn.recv(65536):
                    self.data += chunk
            except ConnectionResetError:
                self.reset = True
            self.seconds = time.monotonic() - started
            sender.join(timeout=10)
        head, _, self.body = self.data.partition(b"\r\n\r\n")
        self.head = head + b"\r\n"
        self.status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0

    @staticmethod
    def _send(conn: socket.socket, data: bytes) -> None:
        with contextlib.suppress(OSError):  # the server stopped reading: its answer counts
            conn.sendall(data)

    def detail(self) -> str:
        """The refusal's ``detail``, after checking the answer's shape."""
        assert b"\r\nContent-Type: application/json\r\n" in self.head, self.head
        assert b"\r\nConnection: close\r\n" in self.head, self.head
        detail = json.loads(self.body)["detail"]
        assert isinstance(detail, str)
        return detail


@pytest.fixture(params=PROTOCOLS)
def guarded(
    request: pytest.FixtureRequest, standin: StandIn, start_proxy: ProxyFactory
) -> ServerThread:
    """A proxy on one protocol (its production guards and limits), the artifact cached."""
    proxy = start_proxy(http=request.param)
    standin.add("session", SESSION, OBJECT)
    assert fetch(proxy, OBJECT).status_code == 200
    return proxy


SMALL = Limits(
    max_header_bytes=600,
    max_header_line=60,
    max_headers=8,
    max_client_connections=1,
    header_timeout=1,
)
LINES = st.lists(
    st.one_of(st.binary(max_size=70).map(lambda b: b.replace(b"\n", b"")), st.just(b"")),
    max_size=14,
)


def _metered(limits: Limits, chunks: list[bytes]) -> tuple[object, ...]:
    meter = HeadMeter(limits)
    try:
        for chunk in chunks:
            meter.feed(chunk)
    except ProxyError:
        return ("refused",)
    return (meter.complete, meter.lines, meter.size if meter.complete else None)


@given(lines=LINES, ending=st.sampled_from([b"\r\n", b"\n"]), cuts=st.lists(st.integers(0, 900)))
def test_meter_reads_a_head_the_same_however_it_is_split(
    lines: list[bytes], ending: bytes, cuts: list[int]
) -> None:
    """Fed whole or in arbitrary pieces (a CR and its LF apart, say), a head is measured alike."""
    data = b"".join(line + ending for line in lines) + b"GET / HTTP/1.1" + ending * 2 + b"body"
    points = sorted({min(cut, len(data)) for cut in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in itertools.pairwise(points) if b > a]
    assert _metered(SMALL, pieces) == _metered(SMALL, [data])


@pytest.mark.parametrize(
    ("head", "outcome"),
    [
        (b"GET / HTTP/1.1\r\nA: b\r\n\r\nX", (True, 2, 24)),
        (b"\r\n\nGET / HTTP/1.1\nA: b\n\n", (True, 2, 24)),  # leading empty lines skipped
        (b"\r\nGET / HTTP/1.1\r\n\r\n", (True, 1, 20)),  # ... by the one-read path too
        (b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 8 + b"\r\n", (True, 9, 66)),
        (b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 9, ("refused",)),  # 9 fields
        (b"GET / HTTP/1.1\r\nA: " + b"b" * 57 + b"\r\n\r\n", (True, 2, 80)),  # 60 bytes
        (b"GET / HTTP/1.1\r\nA: " + b"b" * 58, ("refused",)),  # 61 bytes, unfinished
        (b"\r\n" * 301, ("refused",)),  # 602 bytes of empty lines
    ],
)
def test_meter_limits(head: bytes, outcome: tuple[object, ...]) -> None:
    """The meter counts fields after the request line, lines without their ends, and all bytes."""
    assert _metered(SMALL, [head]) == outcome


def _timed_hit(proxy: ServerThread | Daemon) -> float:
    """Seconds a cached hit took; fails unless it is a 200 from the cache."""
    started = time.monotonic()
    response = httpx.get(
        f"{proxy.url}{TARGET.decode()}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert (response.status_code, response.headers["X-Cache"]) == (200, "HIT")
    return time.monotonic() - started


ATTACKS = {
    "10000-headers": _request(*_padding(10_000)),
    "1MB-header": _request(b"X-Big: " + b"a" * 1_000_000 + b"\r\n"),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_header_floods_get_431_while_hits_go_on(guarded: ServerThread, attack: str) -> None:
    """Eight clients sending 10,000 headers or a 1 MB header, three times each, get 431 within
    2 s, while another client's cached hits are served within 2 s each."""
    attackers, rounds = 8, 3
    go = threading.Barrier(attackers + 1)
    exchanges: list[Exchange] = []

    def attack_repeatedly() -> None:
        go.wait()
        for _ in range(rounds):
            exchanges.append(Exchange(guarded.port, ATTACKS[attack]))

    threads = [threading.Thread(target=attack_repeatedly) for _ in range(attackers)]
    for thread in threads:
        thread.start()
    go.wait()
    hits = [_timed_hit(guarded)]
    while any(thread.is_alive() for thread in threads):
        hits.append(_timed_hit(guarded))
    for thread in threads:
        thread.join()
    assert len(exchanges) == attackers * rounds
    for exchange in exchanges:
        assert exchange.status == 431, exchange.data[:200]
        assert exchange.detail().startswith(("More than 100", "Header line longer"))
        assert exchange.seconds < 2
        assert not exchange.reset  # the server read on until the client was done
    assert max(hits) < 2, hits


@pytest.mark.parametrize(
    ("fields", "status"),
    [(100, 200), (101, 431)],
)
def test_at_most_100_header_fields(guarded: ServerThread, fields: int, status: int) -> None:
    """A request with 100 header fields is served; one with 101 gets 431."""
    exchange = Exchange(guarded.port, _request(*_padding(fields - BASE_FIELDS)))
    assert exchange.status == status, exchange.data[:200]
    if status == 431:
        assert exchange.detail() == "More than 100 header fields"


@pytest.mark.parametrize(("length", "status"), [(8 * 1024, 200), (9 * 1024, 431)])
def test_header_line_of_at_most_8_kib(guarded: ServerThread, length: int, status: int) -> None:
    """A header line of 8 KiB (without CRLF) is served; one of 9 KiB gets 431."""
    exchange = Exchange(guarded.port, _request(*_padding(1, length)))
    assert exchange.status == status, exchange.data[:200]
    if status == 431:
        assert exchange.detail() == "Header line longer than 8192 bytes"


def test_head_over_64_kib_gets_431(guarded: ServerThread) -> None:
    """A head of 90 lines of 800 bytes (72 KB, each line and the count within limits) gets 431."""
    exchange = Exchange(guarded.port, _request(*_padding(90, 800)))
    assert exchange.status == 431
    assert exchange.detail() == "Request head larger than 65536 bytes"


def test_request_line_over_the_line_limit_gets_414(guarded: ServerThread) -> None:
    """A request line over 8 KiB gets 414 from the guard, before the app's own query check."""
    exchange = Exchange(guarded.port, _request(target=TARGET + b"&x=" + b"a" * 9000))
    assert exchange.status == 414
    assert exchange.detail() == "Request line longer than 8192 bytes"


def test_pipelined_flood_is_caught_by_the_parser_check(guarded: ServerThread) -> None:
    """10,000 headers pipelined behind a good request in one write: the first is served, the
    second gets 431 (checked on what the parser reports, as the byte meter cannot see it)."""
    good = _request().replace(b"Connection: close", b"Connection: keep-alive")
    exchange = Exchange(guarded.port, good + _request(*_padding(10_000)))
    first, _, rest = exchange.data.partition(b"HTTP/1.1 431 ")
    assert first.startswith(b"HTTP/1.1 200 "), exchange.data[:200]
    assert rest, exchange.data[-300:]


@pytest.mark.parametrize("http", PROTOCOLS)
def test_slow_head_is_cut_at_header_timeout(
    standin: StandIn, start_proxy: ProxyFactory, http: str
) -> None:
    """A client dribbling a header byte every 50 ms gets 408 and is closed header_timeout (1 s)
    after its first byte, though it is never idle."""
    proxy = start_proxy(http=http, header_timeout="1s")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
        started = time.monotonic()
        conn.sendall(_request(end=False))
        answer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(conn, selectors.EVENT_READ)
            while time.monotonic() - started < 5:
                if selector.select(timeout=0.05):  # the dribbling pace
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
                else:
                    conn.sendall(b"x")
        seconds = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert 0.9 <= seconds < 3


@pytest.mark.parametrize("http", PROTOCOLS)
def test_a_client_that_stops_reading_is_cut_at_send_timeout(
    standin: StandIn, start_proxy: ProxyFactory, http: str
) -> None:
    """A client that asks for 8 MB and reads nothing holds a response, a buffer and its place
    only for send_timeout (1 s): then the connection is reset. Without that it would hold
    them as long as it liked."""
    proxy = start_proxy(http=http, send_timeout="1s")
    standin.add("session", SESSION, "vid_5e1d70", size=8_000_000)
    fetch(proxy, "vid_5e1d70")  # now a hit, streamed from disk
    with socket.socket() as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        conn.settimeout(10)
        conn.connect(("127.0.0.1", proxy.port))
        started = time.monotonic()
        conn.sendall(_request(target=TARGET.replace(OBJECT.encode(), b"vid_5e1d70")))
        error = 0
        while not error and time.monotonic() - started < 5:  # never reading, only looking
            error = conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            time.sleep(0.02)
        seconds = time.monotonic() - started
    assert error == errno.ECONNRESET
    assert 0.9 <= seconds < 3
    assert metric(proxy, "vlmrun_cache_client_resets_total") == 1


def test_a_slow_reader_that_keeps_reading_is_not_cut(
    standin: StandIn, start_proxy: ProxyFactory
) -> None:
    """send_timeout (1 s) counts time without progress: a client taking 1 KiB every 100 ms
    (its buffers full all along) keeps its connection for 2.5 s, then gets the whole body."""
    proxy = start_proxy(send_timeout="1s")
    body = standin.add("session", SESSION, "vid_5e1d71", size=4_000_000)
    fetch(proxy, "vid_5e1d71")
    with socket.socket() as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        conn.settimeout(10)
        conn.connect(("127.0.0.1", proxy.port))
        conn.sendall(_request(target=TARGET.replace(OBJECT.encode(), b"vid_5e1d71")))
        received = b""
        started = time.monotonic()
        while time.monotonic() - started < 2.5:  # the client's own pace
            received += conn.recv(1024)
            time.sleep(0.1)
        while chunk := conn.recv(65536):
            received += chunk
    assert received.endswith(body)


@pytest.mark.parametrize("http", PROTOCOLS)
def test_connections_over_the_cap_get_503(
    standin: StandIn, start_proxy: ProxyFactory, http: str
) -> None:
    """With max_client_connections=4 a fifth connection gets 503 and is closed, the four keep
    working, and once one closes a new connection is served within 2 s."""
    proxy = start_proxy(http=http, max_client_connections=4)
    standin.add("session", SESSION, OBJECT)
    keep_alive = _request().replace(b"Connection: close", b"Connection: keep-alive")
    conns = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10) for _ in range(4)]
    readers = [conn.makefile("rb") for conn in conns]
    try:
        for conn, reader in zip(conns, readers, strict=True):
            conn.sendall(keep_alive)
            assert _read_response(reader) == 200
        extra = Exchange(proxy.port, b"")
        assert extra.status == 503
        assert extra.detail() == "Too many client connections; retry later"
        for conn, reader in zip(conns, readers, strict=True):
            conn.sendall(keep_alive)
            assert _read_response(reader) == 200
        conns[0].sendall(_request())  # Connection: close; the server closes its side
        assert _read_response(readers[0]) == 200
        deadline = time.monotonic() + 2
        while (status := Exchange(proxy.port, _request()).status) == 503:
            assert time.monotonic() < deadline, "the closed connection never freed its place"
        assert status == 200
    finally:
        for reader, conn in zip(readers, conns, strict=True):
            reader.close()
            conn.close()


def _read_response(reader: Any) -> int:
    """Read one response with a Content-Length body from a keep-alive connection; its status."""
    status = int(reader.readline().split(b" ", 2)[1])
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    assert len(reader.read(length)) == length
    return status


def _proc_kib(pid: int, field: str) -> int:
    """A ``kB`` figure (VmRSS, VmHWM) from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class Dribblers:
    """``count`` slowloris clients: each sends a request line, then one header line every
    ``pace`` seconds, never ending its head; when the server cuts one, it records the answer and
    how long after its first byte, and connects again, until :meth:`stop`."""

    def __init__(self, port: int, count: int, pace: float = 0.1) -> None:
        self.port, self.pace = port, pace
        self.cuts: list[tuple[bytes, float]] = []
        self._selector = selectors.DefaultSelector()
        for _ in range(count):
            self._connect()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _connect(self) -> None:
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        conn.sendall(_request(end=False))
        state = {"first": time.monotonic(), "last": time.monotonic(), "answer": b""}
        self._selector.register(conn, selectors.EVENT_READ, state)

    def _run(self) -> None:
        while not self._stopping.is_set():
            for key, _ in self._selector.select(timeout=self.pace / 2):
                conn, state = key.fileobj, key.data
                assert isinstance(conn, socket.socket)
                try:
                    chunk = conn.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                state["answer"] += chunk
                if not chunk:
                    self.cuts.append((state["answer"], time.monotonic() - state["first"]))
                    self._selector.unregister(conn)
                    conn.close()
                    self._connect()
            now = time.monotonic()
            for key in list(self._selector.get_map().values()):
                if now - key.data["last"] >= self.pace:
                    key.data["last"] = now
                    with contextlib.suppress(OSError):  # cut meanwhile: seen on the next select
                        key.fileobj.send(b"X-Drip: 0123456789\r\n")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()


def test_silent_and_dribbling_crowd(
    standin: StandIn, upstream: ServerThread, cache_dir: Path
) -> None:
    """400 silent and 100 dribbling connections for 5 s against the daemon (header_timeout 2s):
    every hit meanwhile takes under 2 s, RSS grows by under 64 MiB, dribblers are cut with 408
    within 2 s of the deadline and silent ones closed by the 5 s keep-alive timeout (+3 s)."""
    daemon = Daemon(
        "--upstream", upstream.url, "--cache-dir", str(cache_dir), "--header-timeout", "2s"
    )
    silent: list[socket.socket] = []
    try:
        assert daemon.started(), daemon.output
        standin.add("session", SESSION, OBJECT)
        assert fetch(daemon, OBJECT).status_code == 200
        _timed_hit(daemon)
        rss_before = _proc_kib(daemon.process.pid, "VmRSS")
        opened = time.monotonic()
        silent = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(400)]
        crowd = Dribblers(daemon.port, 100)
        crowd.start()
        hits = []
        while time.monotonic() - opened < 5:
            hits.append(_timed_hit(daemon))
        crowd.stop()
        peak = _proc_kib(daemon.process.pid, "VmHWM")
        with selectors.DefaultSelector() as selector:
            for conn in silent:
                selector.register(conn, selectors.EVENT_READ)
            while selector.get_map() and time.monotonic() - opened < 5 + 3:
                for key, _ in selector.select(timeout=0.5):
                    assert key.fileobj.recv(1) == b""
                    selector.unregister(key.fileobj)
            still_open = len(selector.get_map())
    finally:
        for conn in silent:
            conn.close()
        daemon.stop()
    print(
        f"hits: {len(hits)}, slowest {max(hits) * 1000:.0f} ms; RSS {rss_before // 1024} MiB "
        f"before, peak {peak // 1024} MiB; dribblers cut: {len(crowd.cuts)}"
    )
    assert max(hits) < 2, sorted(hits)[-5:]
    assert peak - rss_before < 64 * 1024
    assert len(crowd.cuts) >= 100
    for answer, seconds in crowd.cuts:
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
        assert 1.5 <= seconds < 4
    assert still_open == 0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_header_bytes", "4KiB"),
        ("max_header_line", "100"),
        ("max_headers", "10"),
        ("max_client_connections", "0"),
        ("header_timeout", "0s"),
        ("header_timeout", "soon"),
    ],
)
def test_guard_settings_are_validated(key: str, value: str) -> None:
    """An unusable guard setting stops start-up with a message naming its key."""
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load(env={}, flags={key: value})


def test_a_closing_tail_stays_watched_after_writing_resumes() -> None:
    """A transport resumes writing once its buffer is below the low mark, also while it
    closes: the guard must go on watching the tail left, or a client that stops reading just
    then holds its connection for ever. The guard is driven as the protocol drives it, on a
    real transport whose peer never reads."""
    limits = dataclasses.replace(SMALL, send_timeout=0.2)  # the head limits play no part

    async def main() -> int:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            port = server.getsockname()[1]
            transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
            peer, _ = server.accept()
        with peer:
            guard = ConnectionGuard(limits, loop, ServerState(), lambda: False)
            assert guard.connection_made(transport)  # type: ignore[arg-type]
            transport.write(b"x" * 8_000_000)  # far more than the socket buffers take
            guard.writing_paused()
            transport.close()  # the response is complete; the close waits for the tail
            guard.closed()
            guard.writing_resumed()  # as the transport calls it, below its low mark
            deadline = loop.time() + 5
            while loop.time() < deadline:
                if peer.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    return errno.ECONNRESET
                await asyncio.sleep(0.02)
            transport.abort()
            return 0

    assert asyncio.run(main()) == errno.ECONNRESET
