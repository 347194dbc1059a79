"""The shared tier on a real 3-master Redis Cluster started by the test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SESSION, ProxyFactory
from tests.helpers import fetch, metric, wait_until
from tests.operators import admin
from tests.redisserver import RedisCluster
from tests.standin import StandIn


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    nodes = RedisCluster(tmp_path / "cluster").start()
    yield nodes
    nodes.stop()


def test_fills_and_hits_across_slots(
    standin: StandIn,
    start_replica: ProxyFactory,
    cluster: RedisCluster,
    shared_secret_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Artifacts of several sessions land on different masters, each whole in one slot (one key,
    no temporary key left); the other replica serves them all from Redis, byte-exact, and a
    purge finds them on every master."""
    settings = {"redis_url": cluster.url, "redis_cluster": "true"}
    a = start_replica(cache_dir=str(tmp_path / "a"), **settings)
    b = start_replica(**settings)
    sizes = [5000, 2 * 1024 * 1024, 9000, 7000, 3 * 1024 * 1024, 4000]
    wanted = {}
    for i, size in enumerate(sizes):
        scope_id = f"{SESSION}-{i}"
        standin.grant("key-alice-0001", "session", scope_id)
        wanted[scope_id] = standin.add("session", scope_id, f"arr_c{i}", size)
        assert fetch(a, f"arr_c{i}", scope_id=scope_id).status_code == 200
    assert wait_until(
        lambda: metric(a, "vlmrun_cache_redis_writes_total", result="stored") == len(sizes)
    )

    entries = [key for key in cluster.all_keys() if "proof:" not in key]
    assert len(entries) == len(sizes) and not any(":tmp:" in key for key in entries)
    holding = [node for node in cluster.nodes if any("{" in k for k in node.cli("--scan").split())]
    assert len(holding) >= 2  # spread over the cluster's slots

    for i, (scope_id, body) in enumerate(wanted.items()):
        answer = fetch(b, f"arr_c{i}", scope_id=scope_id)
        assert answer.status_code == 200 and answer.content == body
        assert answer.headers["cache-status"].endswith("detail=redis")
        assert standin.hits("session", scope_id, f"arr_c{i}") == 1

    monkeypatch.setenv("VLMRUN_CACHE_REDIS_URL", cluster.url)
    monkeypatch.setenv("VLMRUN_CACHE_REDIS_CLUSTER", "true")
    monkeypatch.setenv("VLMRUN_CACHE_SECRET_FILE", str(shared_secret_file))
    stats = admin("stats", "--json", cache_dir=tmp_path / "a")
    assert stats.json()["redis"]["entries"] == len(sizes)  # type: ignore[index]
    purged = admin("purge", "--all", "--yes", cache_dir=tmp_path / "a")
    assert purged.code == 0 and f"removed {len(sizes)} entries from Redis" in purged.out
    assert [key for key in cluster.all_keys() if "proof:" not in key] == []
