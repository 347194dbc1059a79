"""send_timeout (proxy/guards.py) against clients that stop reading once their response is
complete: the connection is closed with bytes still in the server's buffer, and a close waits
for those bytes to go. A client that never takes them must not hold the connection (its place
under ``max_client_connections``, the buffer) for ever: send_timeout applies to them too."""

from __future__ import annotations

import errno
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from proxy.app import create_app
from proxy.cli import uvicorn_options
from proxy.config import load
from tests.conftest import SESSION, TOKEN
from tests.helpers import fetch, wait_until
from tests.servers import ServerThread
from tests.standin import StandIn

PROTOCOLS = ["h11", "httptools"]
#: uvicorn's event loops: uvloop (its "auto" where installed, as ``serve`` runs) and asyncio's,
#: whose transports differ (the socket the guard sets SO_LINGER on, the close, the abort).
LOOPS = ["uvloop", "asyncio"]
SEND_TIMEOUT = 1.0
KEEP_ALIVE = 0.5  # uvicorn's timeout_keep_alive here: it closes idle connections first

Start = Callable[..., ServerThread]


@pytest.fixture
def start(upstream: ServerThread, cache_dir: Path) -> Iterator[Start]:
    """Start a proxy (https with cert.pem and key.pem of directory ``tls``) with send_timeout
    1 s, a memory tier that keeps entries of up to 16 MiB and
    pieces of 16 MiB, and uvicorn's keep-alive timeout at 0.5 s (settings as keyword overrides)."""
    started: list[ServerThread] = []

    def run(loop: str = "uvloop", tls: str | None = None, **overrides: object) -> ServerThread:
        settings: dict[str, object] = {
            "upstream": upstream.url,
            "cache_dir": str(cache_dir),
            "send_timeout": f"{SEND_TIMEOUT}s",
            "memory_cache_size": "1GiB",
            "chunk_size": "16MiB",  # an 8 MB hit is read whole, and kept in memory
            **overrides,
        }
        config = load(env={}, flags=settings)
        options = {**uvicorn_options(config), "timeout_keep_alive": KEEP_ALIVE, "loop": loop}
        if tls is not None:  # as ``serve`` passes tls_certfile and tls_keyfile
            options.update(ssl_certfile=f"{tls}/cert.pem", ssl_keyfile=f"{tls}/key.pem")
        server = ServerThread(create_app(config), **options).start()
        started.append(server)
        return server

    yield run
    for server in started:
        server.stop()


def _request(object_id: str, connection: str) -> bytes:
    return (
        f"GET /v1/artifacts?object_id={object_id}&session_id={SESSION} HTTP/1.1\r\n"
        f"Host: p\r\nAuthorization: Bearer {TOKEN}\r\nConnection: {connection}\r\n\r\n"
    ).encode()


def _non_reader(proxy: ServerThread) -> socket.socket:
    conn = socket.socket()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.settimeout(10)
    conn.connect(("127.0.0.1", proxy.port))
    return conn


def _reset_within(conn: socket.socket, seconds: float) -> bool:
    """Whether ``conn`` (never read) is reset within ``seconds``: looking, not reading."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET:
            return True
        time.sleep(0.02)
    return False


def _unsent(proxy: ServerThread) -> int:
    """Bytes in the transport buffer of the proxy's one client connection (0 if none)."""
    connections = list(proxy.server.server_state.connections)
    return sum(c.transport.get_write_buffer_size() for c in connections)  # type: ignore[attr-defined]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("http", PROTOCOLS)
@pytest.mark.parametrize("connection", ["close", "keep-alive"])
def test_a_whole_response_left_unread_is_reset(
    standin: StandIn, start: Start, http: str, connection: str, loop: str
) -> None:
    """A memory hit of 8 MB is written whole (one message) and is complete at once, most of it
    still in the server's buffer; the connection closes (at once, or idle after keep-alive's
    0.5 s). The client never reads: send_timeout resets it, and its place is free again. On
    main the watch gave up on a closing connection, which then stayed open for ever."""
    proxy = start(loop, http=http)
    standin.add("session", SESSION, "vid_c105e0", size=8_000_000)
    for _ in range(2):  # a fill, then a disk hit that puts it in the memory tier
        assert fetch(proxy, "vid_c105e0").status_code == 200
    with _non_reader(proxy) as conn:
        conn.sendall(_request("vid_c105e0", connection))
        assert _reset_within(conn, KEEP_ALIVE + SEND_TIMEOUT + 3)
    assert wait_until(lambda: not proxy.server.server_state.connections, timeout=5)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("http", PROTOCOLS)
def test_small_responses_left_unread_are_reset(
    standin: StandIn, start: Start, http: str, loop: str
) -> None:
    """A client asks for 8 KB hits on one keep-alive connection, one after another without
    reading, until the kernel's buffers are full and a response's end waits in the server's
    (below the mark that pauses writing, so no watch starts there). Then it goes silent: the
    connection is idle, is closed after keep-alive's 0.5 s, and the close waits for bytes the
    client never takes. send_timeout resets it."""
    proxy = start(loop, http=http)
    standin.add("session", SESSION, "doc_5a11e0", size=8192)
    for _ in range(2):
        assert fetch(proxy, "doc_5a11e0").status_code == 200
    with _non_reader(proxy) as conn:
        state = proxy.server.server_state
        for _ in range(2000):
            answered = state.total_requests + 1
            conn.sendall(_request("doc_5a11e0", "keep-alive"))
            assert wait_until(lambda: state.total_requests >= answered, timeout=5)  # noqa: B023
            if _unsent(proxy) > 0:
                break
        assert 0 < _unsent(proxy) < 65536
        assert _reset_within(conn, KEEP_ALIVE + SEND_TIMEOUT + 3)
    assert wait_until(lambda: not proxy.server.server_state.connections, timeout=5)


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str]:
    """A server certificate for 127.0.0.1 (chain, then key) and the CA's certificate, as files."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    certfile, cafile = tmp_path / "cert.pem", tmp_path / "ca.pem"
    certfile.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(cafile))
    return str(tmp_path), str(cafile)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_slow_reader_over_tls_is_not_cut(
    standin: StandIn, start: Start, tls_files: tuple[str, str], loop: str
) -> None:
    """Over TLS the guard sees the TLS layer's buffer and the socket's queue, not the TCP
    transport's buffer between them: a client taking 4 KiB every 100 ms still keeps its
    connection for 3 s (send_timeout 1 s) and gets it all. (TLS clients take whole records
    from the socket, 16 KiB at a time: a slower pace here is bursts more than 1 s apart.)"""
    directory, cafile = tls_files
    tls = start(loop, directory)
    body = standin.add("session", SESSION, "vid_715a10", size=6_000_000)
    url = f"https://127.0.0.1:{tls.port}/v1/artifacts?object_id=vid_715a10&session_id={SESSION}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    context = ssl.create_default_context(cafile=cafile)
    assert httpx.get(url, headers=headers, verify=context, timeout=20).content == body
    with socket.socket() as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(10)
        raw.connect(("127.0.0.1", tls.port))
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            conn.sendall(_request("vid_715a10", "close"))
            received = b""
            started = time.monotonic()
            while time.monotonic() - started < 3:  # the client's own pace: 40 KiB/s
                received += conn.recv(4096)
                time.sleep(0.1)
            while chunk := conn.recv(65536):
                received += chunk
    assert received.endswith(body)
