"""Offline, for real: the official SDK, constructed while the API is down, still reads what the
cache holds for its key; any other key is refused at once; the API's return is noticed."""

from __future__ import annotations

import logging
import time

import httpx
import pytest
from vlmrun.client import VLMRun
from vlmrun.client.exceptions import APIError, VLMRunError

from tests.conftest import OTHER_TOKEN, SESSION, TOKEN
from tests.helpers import auth, fetch, metric
from tests.servers import ServerThread
from tests.standin import Fault, StandIn


def _client(proxy: ServerThread, token: str = TOKEN) -> VLMRun:
    return VLMRun(api_key=token, base_url=f"{proxy.url}/v1", max_retries=1)


def test_sdk_reads_cached_artifacts_with_the_api_down(
    standin: StandIn, upstream: ServerThread, start_proxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Past proof_ttl but within offline_proof_ttl, a client constructed while the API is down
    gets its health 200 (X-Cache: OFFLINE) and its cached artifacts; an unknown key gets a 403
    at once; when the API comes back the proxy says so (metric and log line)."""
    # A breaker that never opens: every request tries the API, so its return is seen at once.
    proxy = start_proxy(proof_ttl="1s", offline_proof_ttl="1h", breaker_threshold=10_000)
    body = standin.add("session", SESSION, "arr_0ff1e0", size=20_000)
    assert _client(proxy).artifacts.get(object_id="arr_0ff1e0", session_id=SESSION) == body
    port = upstream.port
    upstream.stop()
    time.sleep(1.1)  # let the proof outlive proof_ttl (not a wait for concurrency)

    started = time.monotonic()
    client = _client(proxy)
    assert client.artifacts.get(object_id="arr_0ff1e0", session_id=SESSION) == body
    with pytest.raises(APIError, match="no recent proof for this key"):
        _client(proxy, OTHER_TOKEN)
    assert time.monotonic() - started < 10  # no 5xx retry loop in the SDK
    health = fetch_health(proxy, OTHER_TOKEN)
    assert (health.status_code, health.headers["x-cache"]) == (403, "OFFLINE")
    assert health.json() == {"detail": "VLM Run API unreachable; no recent proof for this key"}
    assert fetch_health(proxy, TOKEN).headers["x-cache"] == "OFFLINE"
    assert fetch(proxy, "arr_0ff1e0", OTHER_TOKEN).status_code == 502  # no proof, no bytes
    assert metric(proxy, "vlmrun_cache_upstream_up") == 0
    assert metric(proxy, "vlmrun_cache_access_checks_total", result="offline") >= 1

    back = ServerThread(standin, port=port).start()
    try:
        with caplog.at_level(logging.WARNING):
            online = fetch_health(proxy, TOKEN)
            assert online.status_code == 200 and "x-cache" not in online.headers
        assert metric(proxy, "vlmrun_cache_upstream_up") == 1
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        back.stop()


def fetch_health(proxy: ServerThread, token: str) -> httpx.Response:
    return httpx.get(f"{proxy.url}/v1/health", headers=auth(token), timeout=20)


def test_proofs_older_than_offline_proof_ttl_do_not_serve(
    standin: StandIn, upstream: ServerThread, start_proxy
) -> None:
    """Past offline_proof_ttl a key is a stranger offline too: health 403, hits 502."""
    proxy = start_proxy(proof_ttl="1s", offline_proof_ttl="1s")
    body = standin.add("session", SESSION, "arr_0ff1e1", size=2_000)
    assert fetch(proxy, "arr_0ff1e1").content == body
    upstream.stop()
    time.sleep(1.1)
    assert fetch(proxy, "arr_0ff1e1").status_code == 502
    assert fetch_health(proxy, TOKEN).status_code == 403


def test_a_reachable_api_answering_5xx_is_relayed(standin: StandIn, proxy) -> None:
    """Offline answers are for an unreachable API only: a 503 from a reachable one is relayed."""
    standin.health_status = 503
    response = fetch_health(proxy, TOKEN)
    assert response.status_code == 503 and "x-cache" not in response.headers
    with pytest.raises(VLMRunError):
        _client(proxy)


def test_an_old_proof_serves_the_cache_when_the_api_answers_its_check_with_a_5xx(
    standin: StandIn, start_proxy
) -> None:
    """A key whose proof is past proof_ttl but within offline_proof_ttl is checked again with
    no retries (so that an unreachable API falls back to the cache at once). A 502/503/504 to
    that check is the API failing, like a refused connection: the cached bytes are served, not
    the 503 (found by the bounded load test: one client got a 503 for a cached artifact)."""
    proxy = start_proxy(proof_ttl="1s", offline_proof_ttl="1h")
    body = standin.add("session", SESSION, "arr_0ff1e2", size=2_000)
    assert fetch(proxy, "arr_0ff1e2").content == body
    time.sleep(1.1)  # let the proof outlive proof_ttl (not a wait for concurrency)
    standin.faults["arr_0ff1e2"] = Fault(status=503, times=1)
    answer = fetch(proxy, "arr_0ff1e2")
    assert (answer.status_code, answer.content) == (200, body)
    assert metric(proxy, "vlmrun_cache_access_checks_total", result="offline") == 1
    standin.faults["arr_0ff1e2"] = Fault(status=404, times=1)  # a refusal is still a refusal
    assert fetch(proxy, "arr_0ff1e2").status_code == 404
