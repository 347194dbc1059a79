"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from urllib.parse import urlencode

import httpx

from tests.conftest import SESSION, TOKEN
from tests.servers import ServerThread


def artifact_url(
    server: ServerThread, object_id: str, scope: str = "session", scope_id: str = SESSION
) -> str:
    return f"{server.url}/v1/artifacts?" + urlencode(
        {"object_id": object_id, f"{scope}_id": scope_id}
    )


def auth(token: str | None = TOKEN) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def fetch(
    server: ServerThread,
    object_id: str,
    token: str | None = TOKEN,
    scope: str = "session",
    scope_id: str = SESSION,
    **headers: str,
) -> httpx.Response:
    return httpx.get(
        artifact_url(server, object_id, scope, scope_id),
        headers={**auth(token), **headers},
        timeout=20,
    )


def raw_head_block(server: ServerThread, target: str, token: str = TOKEN) -> bytes:
    """The status line and headers exactly as they came off the wire (the body is read too)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as conn:
        conn.sendall(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[0]


def metric(server: ServerThread, name: str, **labels: str) -> float:
    """The value of one sample on the proxy's /metrics page."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    wanted = name + (
        "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    )
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {wanted} in /metrics")


def wait_until(condition: Callable[[], bool], timeout: float = 20) -> bool:
    """Poll ``condition`` (work another process or thread finishes in the background, with no
    event to wait on) until it holds; False if it never did within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
