"""The Prometheus page: every series present from the start, counting what happened."""

from __future__ import annotations

import httpx

from tests.conftest import OTHER_TOKEN, SESSION
from tests.helpers import fetch, metric
from tests.standin import StandIn

SERIES = (
    [
        ("vlmrun_cache_requests_total", {"outcome": o})
        for o in ("hit", "miss", "coalesced", "bypass", "error")
    ]
    + [
        ("vlmrun_cache_served_bytes_total", {"source": "cache"}),
        ("vlmrun_cache_served_bytes_total", {"source": "upstream"}),
        ("vlmrun_cache_access_checks_total", {"result": "denied"}),
        ("vlmrun_cache_evictions_total", {}),
        ("vlmrun_cache_integrity_failures_total", {}),
        ("vlmrun_cache_entries", {}),
        ("vlmrun_cache_bytes", {}),
        ("vlmrun_cache_upstream_fetch_seconds_count", {}),
    ]
    + [
        ("vlmrun_cache_fleet_leases_total", {"outcome": o})
        for o in ("acquired", "taken_over", "followed", "stored", "fallback", "unshared", "resumed")
    ]
)


def test_every_series_starts_at_zero(proxy) -> None:
    """Label sets are created at start-up, so rates work from the first scrape."""
    response = httpx.get(f"{proxy.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    for name, labels in SERIES:
        assert metric(proxy, name, **labels) == 0
    assert metric(proxy, "vlmrun_cache_max_bytes") == 10 * 1024**3


def test_counts_follow_traffic(standin: StandIn, proxy) -> None:
    """Outcomes, bytes by source, size and timings reflect a miss, two hits and two errors."""
    body = standin.add("session", SESSION, "arr_3e7c1c", size=123_456)
    for _ in range(3):
        fetch(proxy, "arr_3e7c1c")
    fetch(proxy, "arr_3e7c1c", token=OTHER_TOKEN)
    httpx.get(f"{proxy.url}/v1/artifacts?session_id={SESSION}")
    assert metric(proxy, "vlmrun_cache_requests_total", outcome="miss") == 1
    assert metric(proxy, "vlmrun_cache_requests_total", outcome="hit") == 2
    assert metric(proxy, "vlmrun_cache_requests_total", outcome="error") == 2
    assert metric(proxy, "vlmrun_cache_served_bytes_total", source="upstream") == len(body)
    assert metric(proxy, "vlmrun_cache_served_bytes_total", source="cache") == 2 * len(body)
    assert metric(proxy, "vlmrun_cache_entries") == 1
    assert metric(proxy, "vlmrun_cache_bytes") == len(body)
    assert metric(proxy, "vlmrun_cache_upstream_fetch_seconds_count") == 1
    text = httpx.get(f"{proxy.url}/metrics").text
    assert SESSION not in text and "arr_3e7c1c" not in text
