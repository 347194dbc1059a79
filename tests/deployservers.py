"""HAProxy and Prometheus with the deployment's configs (deploy/), run for real on loopback
ports for tests/test_deploy_live.py: compose names become loopback addresses, and the pace of
health checks and scrapes is raised so that tests take seconds. Each is stopped by its PID."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.deployfiles import HAPROXY_FILE, PROMETHEUS_FILE
from tests.servers import ServerThread

HAPROXY = shutil.which("haproxy")
PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rewritten(text: str, replacements: dict[str, str]) -> str:
    """``text`` with each key replaced by its value; each key must occur exactly once."""
    for old, new in replacements.items():
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
        text = text.replace(old, new)
    return text


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> bool:
    """Poll a condition another process changes (HAProxy's checks, Prometheus's scrapes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process we started, SIGKILL if it is still there after 20 s."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class Balancer:
    """HAProxy running deploy/haproxy.cfg in front of ``replicas`` (name -> proxy)."""

    def __init__(
        self, replicas: dict[str, ServerThread], directory: Path, check_every: str = "100ms"
    ) -> None:
        assert HAPROXY is not None
        self.port, self.metrics_port = free_port(), free_port()
        config = rewritten(
            HAPROXY_FILE.read_text(encoding="utf-8"),
            {
                "bind :8080": f"bind 127.0.0.1:{self.port}",
                "bind :8404": f"bind 127.0.0.1:{self.metrics_port}",
                "check inter 2s": f"check inter {check_every}",
                **{f"{n} {n}:8080": f"{n} 127.0.0.1:{s.port}" for n, s in replicas.items()},
            },
        )
        (directory / "haproxy.cfg").write_text(config, encoding="utf-8")
        self.log = directory / "haproxy.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(directory / "haproxy.cfg")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        return [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def states(self) -> dict[str, str]:
        """Replica -> UP, DOWN, ... as HAProxy's health checks see it now."""
        try:
            samples = self.metrics()
        except httpx.HTTPError:
            return {}
        return {
            labels["server"]: labels["state"]
            for name, labels, value in samples
            if name == "haproxy_server_status" and labels.get("proxy") == "replicas" and value
        }

    def stop(self) -> None:
        stop(self.process)


class Prometheus:
    """prometheus with deploy/prometheus.yml, its targets on loopback, scraping every 1 s."""

    def __init__(self, targets: dict[str, int], directory: Path) -> None:
        assert PROMETHEUS is not None
        self.port = free_port()
        config = rewritten(
            PROMETHEUS_FILE.read_text(encoding="utf-8"),
            {
                "scrape_interval: 15s": "scrape_interval: 1s",
                **{f'"{t}"': f'"127.0.0.1:{port}"' for t, port in targets.items()},
            },
        )
        (directory / "prometheus.yml").write_text(config, encoding="utf-8")
        self.log = directory / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={directory / 'prometheus.yml'}",
                    f"--storage.tsdb.path={directory / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def ready(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/-/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> dict[str, Any]:
        answer = httpx.get(
            f"http://127.0.0.1:{self.port}/api/v1/query", params={"query": expr}, timeout=10
        )
        data: dict[str, Any] = answer.json()
        return data

    def value(self, expr: str) -> float | None:
        try:
            result = self.query(expr)["data"]["result"]
        except (httpx.HTTPError, KeyError, ValueError):
            return None
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        stop(self.process)
