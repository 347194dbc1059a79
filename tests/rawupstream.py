"""A raw-socket upstream that frames its answers wrongly on purpose (what uvicorn never would).

Each connection is served in its own thread: requests are read one after another (keep-alive),
and each gets the answer :attr:`RawUpstream.answer` builds for its path. The default answer names
the path and the connection's number, so a test can tell whose answer a client received.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable


def framed(body: bytes, extra: bytes = b"") -> bytes:
    """A 200 with ``Content-Length: len(body)``, followed by ``extra`` bytes it did not frame."""
    head = f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body + extra


class RawUpstream:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        #: With a server context, every connection speaks TLS (``https://``).
        self.tls = tls
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        #: Builds the bytes answered to a request for a path on connection number n: one
        #: string, or a list of strings sent ``gap`` seconds apart (an upstream that sends more
        #: later), or None to hang up without an answer.
        self.answer: Callable[[str, int], bytes | list[bytes] | None] = lambda path, n: framed(
            f"answer to {path} on connection {n}".encode()
        )
        self.gap = 0.05
        #: (connection number, request head) of every request received.
        self.requests: list[tuple[int, bytes]] = []
        #: Set each time every part of an answer has been written.
        self.answered = threading.Event()
        self._lock = threading.Lock()
        self._connections = 0
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> RawUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.sock.close()
        with self._lock:
            for conn in self._open:
                conn.close()
        self._thread.join(timeout=10)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self._connections += 1
                number = self._connections
                self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        buffer = b""
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:
                conn.close()
                return
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                with self._lock:
                    self.requests.append((number, head))
                path = head.split(b" ", 2)[1].decode("latin-1")
                answer = self.answer(path, number)
                if answer is None:  # hang up without answering
                    return
                try:
                    for index, part in enumerate([answer] if isinstance(answer, bytes) else answer):
                        if index:
                            time.sleep(self.gap)  # the hostile upstream's own timing
                        conn.sendall(part)
                except OSError:
                    return
                self.answered.set()
