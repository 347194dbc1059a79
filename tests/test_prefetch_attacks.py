"""Prefetch as an attacker of a shared proxy sees it: what one key's completions, joins and
timing can do to the limits that protect the other keys, and what a run leaves behind."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

from proxy.keys import ArtifactKey
from tests.conftest import SESSION
from tests.helpers import fetch, metric
from tests.standin import Fault, StandIn
from tests.test_prefetch import _complete, _eventually


def test_joining_its_own_prefetches_does_not_lift_a_keys_fill_limit(
    standin: StandIn, start_proxy: Any
) -> None:
    """A key joins each prefetch its completion started: the fills become its own and must count
    against its ``max_fills_per_key`` (here 1), or one key could run a fill for every reference
    it names besides its share. With its share taken, its next miss is streamed through."""
    proxy = start_proxy(max_fills_per_key=1, prefetch_per_key=2)
    gate = threading.Event()
    names = ["arr_ad0001", "arr_ad0002"]
    bodies = {name: standin.add("session", SESSION, name, size=3_000) for name in names}
    for name in names:
        standin.faults[name] = Fault(hold_start=gate)
    other = standin.add("session", SESSION, "arr_ad0003", size=3_000)
    standin.chat_session = SESSION
    standin.chat_content = " ".join(names)
    _complete(proxy)
    fills = proxy.app.state.services.fills
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            assert standin.wait_for_requests("/v1/artifacts", 2)  # both prefetches running
            joins = [pool.submit(fetch, proxy, name) for name in names]
            for name in names:
                key = ArtifactKey("session", SESSION, name)
                _eventually(lambda key=key: fills.get(key) is not None and fills.get(key).readers)
            third = fetch(proxy, "arr_ad0003")  # the key already runs its one fill
            assert third.status_code == 200 and third.content == other
            assert "x-cache" not in third.headers  # streamed through, not a fill of its own
            assert metric(proxy, "vlmrun_cache_requests_total", outcome="bypass") == 1
        finally:
            gate.set()
        got = [join.result(timeout=20) for join in joins]
    assert [answer.content for answer in got] == [bodies[name] for name in names]
    assert all(answer.headers["x-cache"] == "COALESCED" for answer in got)
    assert metric(proxy, "vlmrun_cache_prefetch_hits_total") == 2
    _eventually(lambda: metric(proxy, "vlmrun_cache_prefetches_total", result="fetched") == 2)
    assert [standin.hits("session", SESSION, name) for name in names] == [1, 1]
