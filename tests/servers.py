"""Real uvicorn servers on loopback ports, each in its own thread, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import uvicorn


class ServerThread:
    """Serve an ASGI app on 127.0.0.1 with uvicorn's h11 protocol until :meth:`stop`.

    The socket is bound and listening before the thread starts, so clients may connect at
    once: the kernel queues them until uvicorn accepts, after its lifespan start-up.
    """

    def __init__(self, app: Any, http: str = "h11", port: int = 0, **options: Any) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(512)
        self.port: int = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            http=http,
            lifespan="on",
            log_level="warning",
            access_log=False,  # the proxy writes its own
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """``python -m proxy serve`` in a child process, its output collected."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--port", str(self.port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
            if "Uvicorn running on" in line:  # printed once the socket listens
                self.ready.set()
        self.ready.set()  # exited: let waiters look at the output
        with self._changed:
            self._changed.notify_all()

    def started(self, timeout: float = 60) -> bool:
        """Wait until the daemon accepts connections (False if it exited first).

        Start-up, not a race: with several workers uvicorn reports the address before the
        workers listen, so this also dials the port until it answers.
        """
        if not self.ready.wait(timeout) or self.process.poll() is not None:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.02)
        return False

    def wait_for(self, text: str, timeout: float = 30) -> bool:
        """Block until the process has printed ``text`` (False if it exits or time runs out)."""
        with self._changed:
            return (
                self._changed.wait_for(
                    lambda: text in self.output or self.process.poll() is not None, timeout
                )
                and text in self.output
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, signalled: bool = False) -> bool:
        """SIGTERM (unless ``signalled`` already), then True if the process shut down gracefully."""
        if not signalled:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        self._reader.join(timeout=10)
        assert self.process.stdout is not None
        self.process.stdout.close()
        # uvicorn re-raises the signal after its graceful shutdown, as process managers expect.
        return code in (0, -signal.SIGTERM) and "Application shutdown complete" in self.output

    def kill(self) -> None:
        """SIGKILL: no shutdown of any kind."""
        self.process.kill()
        self.process.wait(timeout=30)
        self._reader.join(timeout=10)
        assert self.process.stdout is not None
        self.process.stdout.close()
