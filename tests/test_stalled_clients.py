"""What a client that stops reading holds in the proxy (proxy/artifacts.py): one ``chunk_size``
piece at most, not that piece and the next read beside it. With 1 MiB pieces and up to 1000
connections per worker (``max_client_connections``), each piece held per stalled client is up
to 1 GiB of a worker's memory that one API key can pin."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.app import create_app
from proxy.cli import uvicorn_options
from proxy.config import load
from tests.conftest import SESSION, TOKEN
from tests.helpers import fetch, metric, wait_until
from tests.servers import ServerThread
from tests.standin import StandIn

SIZE = 24 * 1024**2  # far more than the kernel buffers of a loopback connection take
STALLED = 0.5  # seconds a send must wait before the client counts as stalled


class BodySends:
    """ASGI wrapper: the artifact route's response body messages, as the server takes them."""

    def __init__(self, app: Any) -> None:
        self.app = app
        #: Body bytes of messages whose ``send`` returned (handed to the server's transport).
        self.returned = 0
        #: The body of the message whose ``send`` is waiting, and since when (monotonic).
        self.waiting: tuple[bytes, float] | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/artifacts":
            await self.app(scope, receive, send)
            return

        async def recorded(message: Any) -> None:
            if message["type"] != "http.response.body":
                await send(message)
                return
            body = message.get("body", b"")
            self.waiting = (body, time.monotonic())
            await send(message)
            self.waiting = None
            self.returned += len(body)

        await self.app(scope, receive, recorded)

    def stalled(self) -> bool:
        return self.waiting is not None and time.monotonic() - self.waiting[1] > STALLED


@pytest.fixture
def recorded_proxy(
    upstream: ServerThread, cache_dir: Path
) -> Iterator[tuple[ServerThread, BodySends]]:
    config = load(env={}, flags={"upstream": upstream.url, "cache_dir": str(cache_dir)})
    sends = BodySends(create_app(config))
    server = ServerThread(sends, **uvicorn_options(config)).start()
    yield server, sends
    server.stop()


@pytest.mark.parametrize("outcome", ["HIT", "MISS"])
def test_a_stalled_client_holds_one_piece(
    standin: StandIn, recorded_proxy: tuple[ServerThread, BodySends], outcome: str
) -> None:
    """A client that stops reading a large hit (or miss): the proxy reads the next piece (from
    disk, or the fill) only once the server has sent most of the last one, so while it waits,
    every byte read has been handed to the connection and no further piece sits beside it."""
    proxy, sends = recorded_proxy
    body = standin.add("session", SESSION, "arr_57a11e", size=SIZE)
    source = "cache" if outcome == "HIT" else "upstream"
    if outcome == "HIT":
        assert fetch(proxy, "arr_57a11e").content == body
    read_before = metric(proxy, "vlmrun_cache_served_bytes_total", source=source)
    sends.returned = 0
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never reads
        client.connect(("127.0.0.1", proxy.port))
        client.sendall(
            f"GET /v1/artifacts?object_id=arr_57a11e&session_id={SESSION} HTTP/1.1\r\n"
            f"Host: p\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        assert client.recv(4096).split(b"\r\n", 1)[0] == b"HTTP/1.1 200 OK"
        assert wait_until(sends.stalled)
        read = metric(proxy, "vlmrun_cache_served_bytes_total", source=source) - read_before
        assert sends.waiting is not None
        waiting, _since = sends.waiting
        assert (len(waiting), read - sends.returned) == (0, 0)
        assert 0 < read < SIZE
