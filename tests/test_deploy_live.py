"""The deployment's load balancer and Prometheus run for real: HAProxy with deploy/haproxy.cfg in
front of two real proxies, and Prometheus with deploy/prometheus.yml evaluating every query of
the dashboard on what it scraped from them.

Only addresses are changed (compose names become loopback ports) and the pace of health checks
and scrapes (so that the tests take seconds). Skipped where the binaries are not installed
(Debian packages haproxy and prometheus)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from vlmrun.client import VLMRun

from tests.conftest import SESSION, TOKEN, ProxyFactory
from tests.deployfiles import REPLICAS, dashboard_targets, parse
from tests.deployservers import (
    HAPROXY,
    PROMETHEUS,
    Balancer,
    Prometheus,
    wait_until,
)
from tests.helpers import auth, metric
from tests.servers import ServerThread
from tests.standin import StandIn

needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")


@pytest.fixture
def replicas(start_proxy: ProxyFactory, tmp_path: Path) -> dict[str, ServerThread]:
    return {name: start_proxy(cache_dir=str(tmp_path / name)) for name in REPLICAS}


@pytest.fixture
def balancer(replicas: dict[str, ServerThread], tmp_path: Path) -> Iterator[Balancer]:
    if HAPROXY is None:
        pytest.skip("haproxy is not installed")
    lb = Balancer(replicas, tmp_path)
    all_up = {name: "UP" for name in replicas}
    assert wait_until(lambda: lb.states() == all_up), lb.log.read_text(errors="replace")
    yield lb
    lb.stop()


def passthrough_counts(replicas: dict[str, ServerThread]) -> dict[str, float]:
    return {n: metric(s, "vlmrun_cache_passthrough_requests_total") for n, s in replicas.items()}


def health_through(lb: Balancer, count: int) -> list[int]:
    answers = [httpx.get(f"{lb.url}/v1/health", headers=auth(), timeout=20) for _ in range(count)]
    return [a.status_code for a in answers]


@needs_haproxy
def test_balancer_alternates_between_the_replicas(
    balancer: Balancer, replicas: dict[str, ServerThread]
) -> None:
    """Round robin: ten requests through the balancer, five to each replica."""
    assert health_through(balancer, 10) == [200] * 10
    assert passthrough_counts(replicas) == {name: 5.0 for name in REPLICAS}


@needs_haproxy
def test_sdk_through_the_balancer_gets_content_type_spelled_exactly(
    balancer: Balancer, standin: StandIn
) -> None:
    """HAProxy writes header names in lower case; the config gives `Content-Type` its spelling
    back, without which the Python SDK fails on every image (KeyError)."""
    standin.add("session", SESSION, "img_0ba1a7")
    with socket.create_connection(("127.0.0.1", balancer.port), timeout=20) as conn:
        conn.sendall(
            f"GET /v1/artifacts?object_id=img_0ba1a7&session_id={SESSION} HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head and (chunk := conn.recv(65536)):
            head += chunk
    assert b"\r\nContent-Type: image/png\r\n" in head, head
    client = VLMRun(api_key=TOKEN, base_url=f"{balancer.url}/v1", max_retries=1)
    for _ in REPLICAS:
        image = client.artifacts.get(object_id="img_0ba1a7", session_id=SESSION)
        assert isinstance(image, Image.Image) and image.size == (16, 16)


@needs_haproxy
def test_server_sent_events_stream_through_the_balancer(
    balancer: Balancer, standin: StandIn
) -> None:
    """A chat completion's first event reaches the client while the API holds the rest: neither
    the balancer nor the proxy buffers the stream."""
    gate = threading.Event()
    standin.sse_gate = gate
    try:
        with httpx.stream(
            "POST",
            f"{balancer.url}/v1/openai/chat/completions",
            headers=auth(),
            json={"model": "vlm-1", "stream": True, "messages": []},
            timeout=20,
        ) as response:
            assert response.headers["content-type"] == "text/event-stream"
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            assert json.loads(first.removeprefix("data: "))["choices"][0]["delta"] == {
                "content": "one"
            }
            gate.set()
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and len(rest) == 3
    finally:
        gate.set()
        standin.sse_gate = None


def fill(disk: Path) -> Path:
    """Write zeros to ``disk`` until it has no space left; returns the file to delete."""
    filler = disk / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(bytes(1 << 20))
                out.flush()
        except OSError:
            pass
    return filler


@needs_haproxy
def test_a_replica_whose_disk_fills_leaves_service_and_comes_back(
    start_proxy: ProxyFactory, tmp_path: Path, small_disk: Path
) -> None:
    """cache-b's disk fills up: its /readyz answers 503 (its /healthz still 200), the balancer
    takes it out and every request goes to cache-a, none failing; once space is freed it is
    back in service."""
    proxies = {
        "cache-a": start_proxy(cache_dir=str(tmp_path / "cache-a")),
        "cache-b": start_proxy(cache_dir=str(small_disk / "cache")),
    }
    lb = Balancer(proxies, tmp_path)
    try:
        assert wait_until(lambda: lb.states() == {"cache-a": "UP", "cache-b": "UP"})
        filler = fill(small_disk)
        assert httpx.get(f"{proxies['cache-b'].url}/readyz", timeout=10).status_code == 503
        assert httpx.get(f"{proxies['cache-b'].url}/healthz", timeout=10).status_code == 200
        assert wait_until(lambda: lb.states() == {"cache-a": "UP", "cache-b": "DOWN"})
        before = passthrough_counts(proxies)
        assert health_through(lb, 6) == [200] * 6
        after = passthrough_counts(proxies)
        assert after["cache-a"] - before["cache-a"] == 6 and after["cache-b"] == before["cache-b"]
        filler.unlink()
        assert wait_until(lambda: lb.states() == {"cache-a": "UP", "cache-b": "UP"})
    finally:
        lb.stop()
        proxies["cache-b"].stop()  # before the fixture unmounts its disk


@needs_haproxy
def test_a_stopped_replica_fails_no_request(
    replicas: dict[str, ServerThread], tmp_path: Path
) -> None:
    """cache-b stops before any health check could notice (checks once an hour here): the
    requests round robin gives it find its port closed and are redispatched to cache-a (the
    connection was refused, so nothing was sent twice); no client sees an error."""
    lb = Balancer(replicas, tmp_path, check_every="1h")
    try:
        assert wait_until(lambda: lb.states() == {"cache-a": "UP", "cache-b": "UP"})
        replicas["cache-b"].stop()
        assert health_through(lb, 6) == [200] * 6
        assert lb.states() == {"cache-a": "UP", "cache-b": "UP"}  # the checks did not run
        (redispatched,) = [
            v for n, _, v in lb.metrics() if n == "haproxy_backend_redispatch_warnings_total"
        ]
        assert redispatched >= 1
        assert passthrough_counts({"cache-a": replicas["cache-a"]}) == {"cache-a": 6}
    finally:
        lb.stop()


@needs_haproxy
def test_balancer_health_follows_its_replicas(
    balancer: Balancer, replicas: dict[str, ServerThread]
) -> None:
    """The checks take a stopped replica out of service; the balancer's own /healthz (compose's
    healthcheck) answers 503 only when no replica is left."""
    health = f"http://127.0.0.1:{balancer.metrics_port}/healthz"
    replicas["cache-b"].stop()
    assert wait_until(lambda: balancer.states() == {"cache-a": "UP", "cache-b": "DOWN"})
    assert httpx.get(health, timeout=10).status_code == 200
    replicas["cache-a"].stop()
    assert wait_until(lambda: balancer.states() == {"cache-a": "DOWN", "cache-b": "DOWN"})
    assert httpx.get(health, timeout=10).status_code == 503


@needs_haproxy
def test_balancer_exports_what_the_dashboard_queries(balancer: Balancer) -> None:
    """Every haproxy_ metric in the dashboard is on HAProxy's own /metrics, with the labels and
    values the queries filter by (proxy="replicas", state="UP", code="5xx") and group by."""
    exposed: dict[str, dict[str, set[str]]] = {}
    for name, labels, _ in balancer.metrics():
        for label, value in labels.items():
            exposed.setdefault(name, {}).setdefault(label, set()).add(value)
    checked = 0
    for title, expr in dashboard_targets():
        query = parse(expr)
        balancer_metrics = [s for s in query.selectors if s.metric.startswith("haproxy_")]
        for selector in balancer_metrics:
            assert selector.metric in exposed, f"{title}: {selector.metric}"
            for label, (_, value) in selector.matchers.items():
                assert value in exposed[selector.metric][label], f"{title}: {label}={value}"
            checked += 1
        if balancer_metrics:
            labels = {label for s in balancer_metrics for label in exposed[s.metric]}
            assert query.grouping <= labels, f"{title}: {query.grouping - labels}"
    assert checked >= 5


# --- Prometheus ------------------------------------------------------------------------------


def grafana_variables(expr: str) -> str:
    """Grafana's substitutions, as it makes them before sending a query."""
    return (
        expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace("$replica", ".*")
    )


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed")
@needs_haproxy
def _has_data(prometheus: Prometheus, expr: str) -> bool:
    """True for a query that returns data, or that is the shared tier's (none without Redis)."""
    if 'tier="redis"' in expr:
        return True
    answer = prometheus.query(grafana_variables(expr))
    return answer["status"] == "success" and bool(answer["data"]["result"])


def test_prometheus_evaluates_every_dashboard_query(
    balancer: Balancer, replicas: dict[str, ServerThread], standin: StandIn, tmp_path: Path
) -> None:
    """Prometheus scrapes both replicas and the balancer as deploy/prometheus.yml says; after
    traffic through the balancer, every dashboard query evaluates without error and returns
    data (but the shared tier's, which #14 adds), and the headline figures are right: four
    fetches of one artifact alternating over two replicas are two misses and two hits."""
    targets = {f"{n}:8080": s.port for n, s in replicas.items()}
    targets["lb:8404"] = balancer.metrics_port
    prometheus = Prometheus(targets, tmp_path)
    try:
        assert wait_until(prometheus.ready, timeout=60), prometheus.log.read_text(errors="replace")
        assert wait_until(lambda: prometheus.value("sum(up)") == 3, timeout=60), (
            prometheus.log.read_text(errors="replace")
        )
        body = standin.add("session", SESSION, "arr_da5b0a", size=20_000)
        url = f"{balancer.url}/v1/artifacts?object_id=arr_da5b0a&session_id={SESSION}"
        for _ in range(4):
            assert httpx.get(url, headers=auth(), timeout=20).content == body
        scraped = "sum(max_over_time(vlmrun_cache_requests_total[1m]))"
        assert wait_until(lambda: prometheus.value(scraped) == 4, timeout=60)
        # A rate needs two scrapes after the traffic, and each target is scraped on its own
        # clock: wait until every panel that should have data has it, then check them all.
        assert wait_until(lambda: all(_has_data(prometheus, e) for _, e in dashboard_targets()), 60)
        for title, expr in dashboard_targets():
            answer = prometheus.query(grafana_variables(expr))
            assert answer["status"] == "success", (title, answer)
            if 'tier="redis"' not in expr:
                assert answer["data"]["result"], f"{title}: no data for {expr}"
        hit_rate = next(e for t, e in dashboard_targets() if t == "Hit rate")
        assert prometheus.value(grafana_variables(hit_rate)) == pytest.approx(0.5)
        replicas_in_service = next(e for t, e in dashboard_targets() if t == "Replicas in service")
        assert prometheus.value(replicas_in_service) == 2
        labels = httpx.get(
            f"http://127.0.0.1:{prometheus.port}/api/v1/label/replica/values",
            params={"match[]": "vlmrun_cache_requests_total"},
            timeout=10,
        ).json()["data"]
        assert sorted(labels) == sorted(REPLICAS)
    finally:
        prometheus.stop()
