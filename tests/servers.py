"""Real uvicorn servers on loopback ports, each in its own thread, for end-to-end tests."""

from __future__ import annotations

import socket
import threading
from typing import Any

import uvicorn


class ServerThread:
    """Serve an ASGI app on 127.0.0.1 with uvicorn's h11 protocol until :meth:`stop`.

    The socket is bound and listening before the thread starts, so clients may connect at
    once: the kernel queues them until uvicorn accepts, after its lifespan start-up.
    """

    def __init__(self, app: Any, **options: Any) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port: int = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            http="h11",
            lifespan="on",
            log_level="warning",
            server_header=False,
            timeout_graceful_shutdown=5,
            **options,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name=f"uvicorn:{self.port}", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        assert not self.thread.is_alive(), "server did not stop"
        if self.error is not None:
            raise self.error
