"""Prefetch as an attacker of a shared proxy sees it: what one key's completions, joins and
timing can do to the limits that protect the other keys, and what a run leaves behind."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import anyio
import httpx
import pytest

from proxy.keys import ArtifactKey
from proxy.prefetch.watch import Watch
from tests.conftest import OTHER_TOKEN, SESSION, TOKEN
from tests.helpers import auth, fetch, metric
from tests.servers import ServerThread
from tests.standin import Fault, StandIn
from tests.test_prefetch import COMPLETIONS, _complete, _eventually


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


def test_no_credential_reaches_the_logs_metrics_or_disk(
    standin: StandIn,
    start_proxy: Any,
    cache_dir: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Prefetches that are fetched, refused and rate limited, with the access log on and debug
    logging: neither key appears in anything the proxy printed, served as metrics, or left in
    its cache directory (entries, index, proofs, claims)."""
    proxy = start_proxy(log_level="debug")
    standin.chat_session = SESSION
    standin.add("session", SESSION, "arr_5ec001")
    standin.add("session", SESSION, "arr_5ec002")
    standin.faults["arr_5ec002"] = Fault(status=429, times=1)
    standin.chat_content = "arr_5ec001 arr_5ec002"
    _complete(proxy)
    _complete(proxy, OTHER_TOKEN)  # B names A's artifacts: refused with B's key
    _eventually(lambda: metric(proxy, "vlmrun_cache_prefetches_total", result="refused") >= 1)
    _eventually(lambda: metric(proxy, "vlmrun_cache_prefetches_total", result="fetched") == 1)
    assert metric(proxy, "vlmrun_cache_prefetches_total", result="rate_limited") == 1
    assert fetch(proxy, "arr_5ec001").headers["x-cache"] == "HIT"
    metrics = httpx.get(f"{proxy.url}/metrics", timeout=20).text
    proxy.stop()
    printed = capfd.readouterr()
    assert "PREFETCH" in printed.out + printed.err
    files = [path for path in cache_dir.rglob("*") if path.is_file()]
    assert files
    for token in (TOKEN, OTHER_TOKEN):
        assert token not in printed.out + printed.err + metrics
        for path in files:
            assert token.encode() not in path.read_bytes(), path


class _Submitted:
    """What a watch hands the prefetcher: the references it submits, and the scan limiter."""

    def __init__(self) -> None:
        self.scan_limiter = anyio.CapacityLimiter(1)
        self.refs: list[tuple[str, ...]] = []

    def submit(self, *job: str) -> None:
        self.refs.append(job)


def test_a_large_json_answer_is_parsed_off_the_event_loop() -> None:
    """An execution answer of a megabyte of small JSON values (its shape is the user's to
    choose, through the agent's output) costs tens of milliseconds to parse: the event loop
    keeps serving others meanwhile, and the reference is still submitted before the answer's
    last byte goes out."""
    body = json.dumps(
        {"id": "exec_1", "status": "completed", "response": [[]] * 200_000, "a": "arr_0a0b0c"}
    ).encode()
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]

    async def run() -> tuple[int, list[tuple[str, ...]]]:
        prefetcher = _Submitted()
        watch = Watch("execution", "json", "", 2 * 1024**2, cast(Any, prefetcher), "Bearer k", "fp")
        watch.length = len(body)
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        async def upstream() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        task = asyncio.create_task(ticker())
        relayed = []
        during = 0
        async for chunk in watch.around(upstream()):
            if len(relayed) == len(chunks) - 2:
                before = ticks  # the next chunk is the last: scanned and parsed before it goes
            relayed.append(chunk)
            if len(relayed) == len(chunks):
                during = ticks - before
                submitted = list(prefetcher.refs)
        stop.set()
        await task
        assert b"".join(relayed) == body
        return during, submitted

    during, submitted = asyncio.run(run())
    assert submitted == [("Bearer k", "fp", "execution", "exec_1", "arr_0a0b0c")]
    assert during > 1  # the loop ran other tasks while the body was parsed


def test_spelling_the_scheme_differently_is_still_one_key(
    standin: StandIn, proxy: ServerThread
) -> None:
    """The API reads the ``Bearer`` scheme in any case (HTTPBearer), so ``bearer K`` and
    ``BEARER K`` are the same key as ``Bearer K``: one key's completions sent with three
    spellings still run at most ``prefetch_per_key`` (2) prefetches at once, not two per
    spelling (64 spellings would take every prefetch slot and queue of the proxy)."""
    gate = threading.Event()
    standin.chat_session = SESSION
    names = [f"arr_5c{n:04x}" for n in range(6)]
    for name in names:
        standin.add("session", SESSION, name, size=1_000)
        standin.faults[name] = Fault(hold_start=gate)
    request = {"model": "m", "messages": []}
    try:
        for n, scheme in enumerate(("Bearer", "bearer", "BEARER")):
            standin.chat_content = " ".join(names[2 * n : 2 * n + 2])
            answer = httpx.post(
                f"{proxy.url}{COMPLETIONS}",
                json=request,
                headers={"Authorization": f"{scheme} {TOKEN}"},
                timeout=20,
            )
            assert answer.status_code == 200
        # Each completion's references were queued before its answer's last byte went out.
        prefetcher = proxy.app.state.services.prefetcher
        assert (prefetcher._running, len(prefetcher._queue)) == (2, 4)
        assert standin.wait_for_requests("/v1/artifacts", 2)
    finally:
        gate.set()
    _eventually(lambda: metric(proxy, "vlmrun_cache_prefetches_total", result="fetched") == 6)
    assert standin.max_in_flight == 2


def test_a_client_following_a_prefetch_from_another_worker_gets_the_whole_body(
    standin: StandIn, start_proxy: Any
) -> None:
    """Two workers on one cache (two proxies on one directory, as ``--workers 2``): worker 1
    prefetches an artifact sent without a Content-Length; a client of worker 2 asks for it
    meanwhile. Worker 1 has no reader of its own, so once the bytes pass
    prefetch_max_object_size it abandons the prefetch: such a prefetch is not announced to other
    workers (a follower's transfer would break there), so the client of worker 2 waits for the
    claim and then fetches the whole artifact itself."""
    first = start_proxy(prefetch_max_object_size="64KiB")
    second = start_proxy(prefetch=False)
    gate = threading.Event()
    body = standin.add("session", SESSION, "vid_f0110e", size=1_000_000)
    standin.faults["vid_f0110e"] = Fault(chunked=True, hold_middle=gate, hold_at=32 * 1024)
    standin.chat_session = SESSION
    standin.chat_content = "vid_f0110e"
    assert httpx.get(f"{second.url}/metrics", timeout=20).status_code == 200  # started
    fills = second.app.state.services.fills
    key = ArtifactKey("session", SESSION, "vid_f0110e")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            _complete(first)
            assert standin.wait_for_requests("/v1/artifacts", 1)
            client = pool.submit(fetch, second, "vid_f0110e")
            _eventually(lambda: fills.get(key) is not None)  # waiting for worker 1's claim
        finally:
            gate.set()
        try:
            got = client.result(timeout=20)
        except httpx.HTTPError as exc:  # the transfer broke off
            pytest.fail(f"the client of worker 2 got a broken transfer: {exc!r}")
    assert got.status_code == 200 and got.content == body


def test_a_large_json_answer_never_waits_behind_another_ones_parse() -> None:
    """While another answer's large body is being parsed (the scan limiter is taken, as by a
    user flooding large execution answers), a large answer goes out whole at once, unscanned:
    its last chunk does not queue behind someone else's parses."""
    body = json.dumps({"id": "exec_1", "status": "completed", "a": "arr_0a0b0c" * 10_000})

    async def run() -> tuple[bytes, list[tuple[str, ...]]]:
        prefetcher = _Submitted()
        watch = Watch("execution", "json", "", 2**20, cast(Any, prefetcher), "Bearer k", "fp")
        watch.length = len(body)

        async def upstream() -> AsyncIterator[bytes]:
            yield body.encode()

        held, done = asyncio.Event(), asyncio.Event()

        async def other_parse() -> None:
            async with prefetcher.scan_limiter:
                held.set()
                await done.wait()

        other = asyncio.create_task(other_parse())
        await held.wait()
        try:
            with anyio.fail_after(5):
                relayed = b"".join([chunk async for chunk in watch.around(upstream())])
        finally:
            done.set()
            await other
        return relayed, prefetcher.refs

    relayed, submitted = asyncio.run(run())
    assert relayed == body.encode() and submitted == []


def test_an_execution_answer_about_another_execution_prefetches_nothing(
    standin: StandIn, proxy: ServerThread
) -> None:
    """``GET /v1/agent/executions/exec_asked`` answered with the record of another execution (a
    misrouted or stale answer): nothing is prefetched for that other execution. The id as the
    API decodes it counts: ``exec%5Fok`` is ``exec_ok``, whose answer is prefetched."""
    record = {"status": "completed", "response": {"array": {"id": "arr_0e0e0e"}}}
    for execution in ("exec_asked", "exec_other", "exec_ok"):
        standin.grant(TOKEN, "execution", execution)
    standin.executions["exec_asked"] = {**record, "id": "exec_other"}
    standin.add("execution", "exec_other", "arr_0e0e0e")
    answer = httpx.get(f"{proxy.url}/v1/agent/executions/exec_asked", headers=auth(), timeout=20)
    assert answer.status_code == 200 and answer.json()["id"] == "exec_other"
    # A prefetch would have been queued or started before the answer's last byte went out.
    services = proxy.app.state.services
    assert services.fills.get(ArtifactKey("execution", "exec_other", "arr_0e0e0e")) is None
    assert not services.prefetcher._queue
    assert standin.hits("execution", "exec_other", "arr_0e0e0e") == 0

    standin.executions["exec_ok"] = {**record, "id": "exec_ok"}
    standin.add("execution", "exec_ok", "arr_0e0e0e")
    answer = httpx.get(f"{proxy.url}/v1/agent/executions/exec%5Fok", headers=auth(), timeout=20)
    assert answer.status_code == 200
    assert standin.wait_for_requests("/v1/artifacts", 1)
    assert standin.hits("execution", "exec_ok", "arr_0e0e0e") == 1


def test_an_odd_retry_after_never_holds_a_prefetch_slot(standin: StandIn, start_proxy: Any) -> None:
    """A 429 whose ``Retry-After`` is ``²`` (a byte ``str.isdigit`` calls a digit, ``float``
    refuses) once raised in the prefetcher's bookkeeping: the slot of that prefetch was never
    given back. With ``prefetch_concurrency = 1`` one such answer stopped every key's
    prefetches for good; now it pauses that key for the default time, and others go on."""
    proxy = start_proxy(prefetch_concurrency=1)
    standin.chat_session = SESSION
    standin.add("session", SESSION, "arr_2e2e01")
    standin.faults["arr_2e2e01"] = Fault(status=429, times=1)
    standin.retry_after = "\xb2"
    standin.chat_content = "arr_2e2e01"
    _complete(proxy)
    _eventually(lambda: metric(proxy, "vlmrun_cache_prefetches_total", result="rate_limited") == 1)
    standin.grant(OTHER_TOKEN, "session", "sess_other")
    standin.add("session", "sess_other", "arr_2e2e02")
    standin.chat_session = "sess_other"
    standin.chat_content = "arr_2e2e02"
    _complete(proxy, OTHER_TOKEN)
    _eventually(lambda: metric(proxy, "vlmrun_cache_prefetches_total", result="fetched") == 1)
