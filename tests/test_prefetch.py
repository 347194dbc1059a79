"""Prefetch end to end: completions and executions through the real OpenAI and vlmrun SDKs make
the first artifact fetch local, with the requester's key only, within limits."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from PIL import Image
from vlmrun.client import VLMRun

from proxy.keys import ArtifactKey
from proxy.prefetch.scan import MAX_REFS
from proxy.store import EntryMeta
from proxy.store.disk import DiskStore
from tests.conftest import EXECUTION, OTHER_TOKEN, SESSION, TOKEN
from tests.helpers import auth, fetch, metric
from tests.servers import ServerThread
from tests.standin import Fault, StandIn

COMPLETIONS = "/v1/openai/chat/completions"


def _openai(proxy: ServerThread, token: str = TOKEN) -> OpenAI:
    return OpenAI(api_key=token, base_url=f"{proxy.url}/v1/openai", max_retries=0, timeout=20)


def _vlmrun(proxy: ServerThread, token: str = TOKEN) -> VLMRun:
    return VLMRun(api_key=token, base_url=f"{proxy.url}/v1", max_retries=1)


def _complete(proxy: ServerThread, token: str = TOKEN) -> Any:
    messages: Any = [{"role": "user", "content": "make me an image"}]
    with _openai(proxy, token) as client:
        return client.chat.completions.create(model="vlmrun-orion-1", messages=messages)


def _eventually(check: Callable[[], bool], timeout: float = 20) -> None:
    """Wait for a state the proxy reaches on its own after answering (bounded)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _prefetches(proxy: ServerThread, result: str) -> float:
    return metric(proxy, "vlmrun_cache_prefetches_total", result=result)


def _served_locally(proxy: ServerThread) -> float:
    return metric(proxy, "vlmrun_cache_requests_total", outcome="hit") + metric(
        proxy, "vlmrun_cache_requests_total", outcome="coalesced"
    )


def test_json_completion_makes_the_first_sdk_get_local(
    standin: StandIn, proxy: ServerThread, capfd: pytest.CaptureFixture[str]
) -> None:
    """The OpenAI SDK's completion names img_…; the vlmrun SDK's first get of it is served by the
    proxy (a hit, or joining the prefetch) with one upstream request in all; the prefetch is in
    the access log, marked as such."""
    standin.chat_session = SESSION
    standin.chat_content = 'Done: {"image": {"id": "img_a1b2c3", "type": "image"}}'
    standin.add("session", SESSION, "img_a1b2c3")
    response = _complete(proxy)
    assert response.choices[0].message.content == standin.chat_content
    assert response.model_extra is not None and response.model_extra["session_id"] == SESSION
    # At once: the prefetch is registered before the answer's last byte goes out.
    image = _vlmrun(proxy).artifacts.get(session_id=SESSION, object_id="img_a1b2c3")
    assert isinstance(image, Image.Image) and image.size == (16, 16)
    assert standin.hits("session", SESSION, "img_a1b2c3") == 1
    assert _served_locally(proxy) == 1
    assert metric(proxy, "vlmrun_cache_requests_total", outcome="miss") == 0
    assert _prefetches(proxy, "fetched") == 1
    _eventually(lambda: metric(proxy, "vlmrun_cache_prefetch_hits_total") == 1)
    proxy.stop()
    lines = [line for line in capfd.readouterr().out.splitlines() if "PREFETCH" in line]
    assert len(lines) == 1, lines
    assert " PREFETCH /v1/artifacts 200 prefetch " in lines[0]
    assert f"session={SESSION} object=img_a1b2c3" in lines[0] and TOKEN not in lines[0]


def test_streamed_gzip_completion_with_references_split_across_events(
    standin: StandIn, proxy: ServerThread
) -> None:
    """SSE, gzip-coded (the OpenAI SDK asks for it), with refs cut between events: the stream
    arrives unchanged and both artifacts are fetched before the client asks."""
    standin.chat_session = SESSION
    standin.chat_gzip = True
    standin.chat_deltas = ["a video vid_0a", "0b0c and an array arr_", "123456", None, ". arr_1"]
    standin.add("session", SESSION, "arr_111111")
    standin.chat_deltas.append("11111")  # the very end of the stream
    video = standin.add("session", SESSION, "vid_0a0b0c", size=300_000)
    array = standin.add("session", SESSION, "arr_123456", size=5_000)
    messages: Any = [{"role": "user", "content": "go"}]
    with _openai(proxy) as openai_client:
        stream = openai_client.chat.completions.create(
            model="vlmrun-orion-1", messages=messages, stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == "a video vid_0a0b0c and an array arr_123456. arr_111111"
    assert "gzip" in standin.headers_seen(COMPLETIONS)[-1]["accept-encoding"]
    client = _vlmrun(proxy)  # at once: the references were queued as their events went by
    path = client.artifacts.get(session_id=SESSION, object_id="vid_0a0b0c")
    assert isinstance(path, Path) and path.read_bytes() == video
    assert client.artifacts.get(session_id=SESSION, object_id="arr_123456") == array
    assert standin.hits("session", SESSION, "vid_0a0b0c") == 1
    assert standin.hits("session", SESSION, "arr_123456") == 1
    assert client.artifacts.get(session_id=SESSION, object_id="arr_111111") is not None
    assert standin.hits("session", SESSION, "arr_111111") == 1
    assert _served_locally(proxy) == 3


def test_a_completed_execution_prefetches_its_artifacts(
    standin: StandIn, proxy: ServerThread
) -> None:
    """``client.executions.get`` of a completed execution, then ``artifacts.get`` by execution
    id: one upstream fetch. A running execution, and ``POST /v1/agent/execute`` answering one,
    prefetch nothing; a completed one from execute does."""
    body = standin.add("execution", EXECUTION, "arr_0f0f0f", size=20_000)
    record = {
        "id": EXECUTION,
        "name": "image/blur-image",
        "created_at": "2025-01-01T00:00:00Z",
        "status": "completed",
        "usage": {"credits_used": 1},
        "response": {"array": {"id": "arr_0f0f0f"}},
    }
    standin.executions[EXECUTION] = record
    client = _vlmrun(proxy)
    assert client.executions.get(EXECUTION).status == "completed"
    assert standin.wait_for_requests("/v1/artifacts", 1)
    assert client.artifacts.get(execution_id=EXECUTION, object_id="arr_0f0f0f") == body
    assert standin.hits("execution", EXECUTION, "arr_0f0f0f") == 1

    standin.add("execution", "exec_2", "arr_2f2f2f")
    standin.executions["exec_2"] = {**record, "id": "exec_2", "status": "running"}
    standin.executions["exec_2"]["response"] = {"array": {"id": "arr_2f2f2f"}}
    standin.next_execution = "exec_2"
    answer = httpx.post(f"{proxy.url}/v1/agent/execute", headers=auth(), json={}, timeout=20)
    assert answer.status_code == 201
    fetched = fetch(proxy, "arr_2f2f2f", scope="execution", scope_id="exec_2")
    assert fetched.headers["x-cache"] == "MISS"  # nothing was prefetched for a running one

    standin.add("execution", "exec_3", "arr_3f3f3f")
    standin.executions["exec_3"] = {**record, "id": "exec_3"}
    standin.executions["exec_3"]["response"] = {"array": {"id": "arr_3f3f3f"}}
    standin.next_execution = "exec_3"
    httpx.post(f"{proxy.url}//v1/agent/execute", headers=auth(), json={}, timeout=20)
    assert standin.wait_for_requests("/v1/artifacts", 3)
    fetched = fetch(proxy, "arr_3f3f3f", scope="execution", scope_id="exec_3")
    assert fetched.headers["x-cache"] in ("HIT", "COALESCED")
    assert standin.hits("execution", "exec_3", "arr_3f3f3f") == 1


def test_a_completion_seen_with_key_b_never_reaches_a_bytes(
    standin: StandIn, proxy: ServerThread
) -> None:
    """B's completion names an artifact of A's session: the prefetch goes with B's key only, the
    API refuses it, nothing is stored, B still gets 404, and the refusal is not asked again."""
    body = standin.add("session", SESSION, "arr_aaaaaa", size=4_000)
    standin.chat_session = SESSION
    standin.chat_content = "arr_aaaaaa"
    _complete(proxy, OTHER_TOKEN)
    assert standin.wait_for_requests("/v1/artifacts", 1)
    _eventually(lambda: _prefetches(proxy, "refused") == 1)
    assert standin.headers_seen("/v1/artifacts")[0]["authorization"] == f"Bearer {OTHER_TOKEN}"
    assert fetch(proxy, "arr_aaaaaa", token=OTHER_TOKEN).status_code == 404
    _complete(proxy, OTHER_TOKEN)  # remembered: not asked again
    _eventually(lambda: _prefetches(proxy, "refused") == 2)
    assert standin.hits("session", SESSION, "arr_aaaaaa") == 2  # the prefetch and B's own get
    mine = fetch(proxy, "arr_aaaaaa")
    assert mine.headers["x-cache"] == "MISS" and mine.content == body  # B stored nothing


def test_a_cached_artifact_named_to_key_b_is_not_fetched_and_not_served_to_b(
    standin: StandIn, proxy: ServerThread
) -> None:
    """A's artifact is cached; B's completion names it: no request goes up with B's key for the
    prefetch, and B's own get is checked with the API and refused."""
    standin.add("session", SESSION, "arr_bbbbbb", size=4_000)
    assert fetch(proxy, "arr_bbbbbb").status_code == 200
    standin.chat_session = SESSION
    standin.chat_content = "arr_bbbbbb"
    _complete(proxy, OTHER_TOKEN)
    _eventually(lambda: _prefetches(proxy, "already_cached") == 1)
    assert standin.hits("session", SESSION, "arr_bbbbbb") == 1
    refused = fetch(proxy, "arr_bbbbbb", token=OTHER_TOKEN)
    assert refused.status_code == 404 and refused.content != b""
    assert metric(proxy, "vlmrun_cache_access_checks_total", result="denied") == 1


def test_a_429_pauses_that_key_only(standin: StandIn, proxy: ServerThread) -> None:
    """After a 429 with Retry-After, that key's next references are not prefetched until then;
    another key's still are; the client's own get works."""
    standin.chat_session = SESSION
    standin.add("session", SESSION, "arr_c00001")
    standin.add("session", SESSION, "arr_c00002")
    standin.faults["arr_c00001"] = Fault(status=429, times=1)
    standin.retry_after = "120"
    standin.chat_content = "arr_c00001"
    _complete(proxy)
    _eventually(lambda: _prefetches(proxy, "rate_limited") == 1)
    standin.chat_content = "arr_c00002"
    _complete(proxy)
    _eventually(lambda: _prefetches(proxy, "rate_limited") == 2)
    assert standin.hits("session", SESSION, "arr_c00002") == 0
    standin.grant(OTHER_TOKEN, "session", "sess_other")
    standin.add("session", "sess_other", "arr_c00003")
    standin.chat_session = "sess_other"
    standin.chat_content = "arr_c00003"
    _complete(proxy, OTHER_TOKEN)
    _eventually(lambda: _prefetches(proxy, "fetched") == 1)
    assert fetch(proxy, "arr_c00001").status_code == 200


def test_limits_hold_under_a_flood_of_references(standin: StandIn, proxy: ServerThread) -> None:
    """One completion naming 60 artifacts: at most MAX_REFS are fetched, two at a time for that
    key; meanwhile another key's prefetch and the first key's own misses still go through."""
    gate = threading.Event()
    names = [f"arr_f{n:05x}" for n in range(60)]
    for name in names:
        standin.add("session", SESSION, name, size=2_000)
        standin.faults[name] = Fault(hold_start=gate)
    standin.chat_session = SESSION
    standin.chat_content = " ".join(names)
    try:
        _complete(proxy)
        assert standin.wait_for_requests("/v1/artifacts", 2)
        standin.grant(OTHER_TOKEN, "session", "sess_other")
        standin.add("session", "sess_other", "arr_0be000")
        standin.chat_session = "sess_other"
        standin.chat_content = "arr_0be000"
        _complete(proxy, OTHER_TOKEN)
        assert standin.wait_for_requests("/v1/artifacts", 3)  # B's, while A's two are held
        _eventually(lambda: _prefetches(proxy, "fetched") == 1)
        standin.add("session", SESSION, "arr_c1e1e1")
        assert fetch(proxy, "arr_c1e1e1").headers["x-cache"] == "MISS"  # the clients' room
        assert standin.in_flight == 2
    finally:
        gate.set()
    _eventually(lambda: _prefetches(proxy, "fetched") == 1 + MAX_REFS)
    assert standin.max_in_flight == 3
    assert sum(standin.hits("session", SESSION, name) for name in names) == MAX_REFS
    assert all(standin.hits("session", SESSION, name) == 0 for name in names[MAX_REFS:])


def test_odd_references_never_disturb_the_completion(
    standin: StandIn, upstream: ServerThread, proxy: ServerThread
) -> None:
    """Garbage events, huge lines, lookalike ids: the client gets the stream byte for byte as the
    API sent it, and only the one real reference is fetched."""
    standin.chat_session = SESSION
    standin.chat_raw_events = [
        b"data: {not json\n\n",
        b"data: " + b"x" * 200_000 + b"\n\n",
        b"\xff\xfe\x00 binary junk\n\n",
        b'data: {"session_id": "\\u0000bad", "choices": [{"delta": {"content": "img_000001"}}]}'
        b"\n\n",
        b'data: [1, 2, {"choices": "img_000002"}]\n\n',
    ]
    standin.chat_deltas = ["ximg_000003 img_000004_ IMG_000005 img_00000", "6x arr_0000", "07."]
    standin.add("session", SESSION, "arr_000007")
    request = {"model": "m", "messages": [], "stream": True}
    direct = httpx.post(f"{upstream.url}{COMPLETIONS}", json=request, headers=auth(), timeout=20)
    through = httpx.post(f"{proxy.url}{COMPLETIONS}", json=request, headers=auth(), timeout=20)
    assert through.status_code == 200 and through.content == direct.content
    assert standin.wait_for_requests("/v1/artifacts", 1)
    assert fetch(proxy, "arr_000007").headers["x-cache"] in ("HIT", "COALESCED")
    assert set(standin.artifact_hits) == {("session", SESSION, "arr_000007")}


def test_prefetch_off_fetches_nothing_unasked(standin: StandIn, start_proxy: Any) -> None:
    """With prefetch = false the completion is relayed and nothing is fetched until asked."""
    proxy = start_proxy(prefetch=False)
    standin.chat_session = SESSION
    standin.chat_content = "arr_0ff0ff"
    standin.add("session", SESSION, "arr_0ff0ff")
    _complete(proxy)
    assert fetch(proxy, "arr_0ff0ff").headers["x-cache"] == "MISS"
    assert standin.hits("session", SESSION, "arr_0ff0ff") == 1
    assert all(
        _prefetches(proxy, result) == 0 for result in ("fetched", "refused", "dropped", "error")
    )


def test_a_prefetch_over_its_size_cap_is_abandoned(standin: StandIn, start_proxy: Any) -> None:
    """An artifact larger than prefetch_max_object_size is not prefetched (its Content-Length
    says so); the client's own get fetches and stores it as usual."""
    proxy = start_proxy(prefetch_max_object_size="64KiB")
    standin.chat_session = SESSION
    standin.chat_content = "vid_b16b16"
    body = standin.add("session", SESSION, "vid_b16b16", size=300_000)
    _complete(proxy)
    _eventually(lambda: _prefetches(proxy, "too_large") == 1)
    got = fetch(proxy, "vid_b16b16")
    assert got.headers["x-cache"] == "MISS" and got.content == body
    assert fetch(proxy, "vid_b16b16").headers["x-cache"] == "HIT"


@pytest.mark.parametrize("size", [10_000, 200_000], ids=["in-memory", "file"])
def test_a_prefetch_the_disk_has_no_room_for_is_not_counted_fetched(
    standin: StandIn, start_proxy: Any, size: int
) -> None:
    """With less free space than min_free_space, a prefetch stores nothing: it counts as an
    error (and a no_space store failure), not as fetched, and the client's get is a miss."""
    proxy = start_proxy(min_free_space=1024**5)  # 1 PiB: more than any test disk has free
    standin.chat_session = SESSION
    standin.chat_content = "arr_f011f0"
    body = standin.add("session", SESSION, "arr_f011f0", size=size)
    _complete(proxy)
    _eventually(lambda: _prefetches(proxy, "error") == 1)
    assert _prefetches(proxy, "fetched") == 0
    assert metric(proxy, "vlmrun_cache_store_failures_total", reason="no_space") == 1
    got = fetch(proxy, "arr_f011f0")
    assert (got.headers["x-cache"], got.content) == ("MISS", body)


@pytest.mark.parametrize("failure", ["fsync", "refused"])
def test_a_prefetch_whose_commit_fails_is_not_counted_fetched(
    standin: StandIn, start_proxy: Any, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """A large prefetch whose every byte arrived but whose commit failed (the fsync before it
    raised EIO, or the store refused the entry) stored nothing: it counts as an error, as a
    small one does, not as fetched, and the client's get is a miss."""
    import errno
    import os

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".fill"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    if failure == "fsync":
        monkeypatch.setattr(os, "fsync", fsync)
    else:
        monkeypatch.setattr(DiskStore, "commit", _refusing_commit)
    proxy = start_proxy()
    standin.chat_session = SESSION
    standin.chat_content = "arr_f011f1"
    body = standin.add("session", SESSION, "arr_f011f1", size=200_000)
    _complete(proxy)
    _eventually(lambda: _prefetches(proxy, "error") + _prefetches(proxy, "fetched") == 1)
    assert (_prefetches(proxy, "error"), _prefetches(proxy, "fetched")) == (1, 0)
    got = fetch(proxy, "arr_f011f1")
    assert (got.headers["x-cache"], got.content) == ("MISS", body)


def _refusing_commit(
    self: DiskStore, key: str, fill: Any, meta: EntryMeta, sync: bool = True
) -> bool:
    """:meth:`DiskStore.commit` of a store that keeps nothing (as when its index fails)."""
    self.discard(fill)
    return False


def test_a_client_joining_a_failed_prefetch_fetches_on_its_own(
    standin: StandIn, proxy: ServerThread
) -> None:
    """The client joins the running prefetch; the API answers that prefetch 500 (not retried):
    the client is not handed the 500 but fetches itself, and gets the bytes."""
    gate = threading.Event()
    body = standin.add("session", SESSION, "arr_500500", size=10_000)
    standin.faults["arr_500500"] = Fault(status=500, hold_start=gate, times=1)
    standin.chat_session = SESSION
    standin.chat_content = "arr_500500"
    _complete(proxy)
    assert standin.wait_for_requests("/v1/artifacts", 1)
    fills = proxy.app.state.services.fills
    key = ArtifactKey("session", SESSION, "arr_500500")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        client = pool.submit(fetch, proxy, "arr_500500")
        _eventually(lambda: fills.get(key) is not None and fills.get(key).readers == 1)
        gate.set()
        got = client.result(timeout=20)
    assert got.status_code == 200 and got.content == body
    assert standin.hits("session", SESSION, "arr_500500") == 2
    assert _prefetches(proxy, "error") == 1


def test_prefetched_entries_go_first_and_unread_evictions_are_counted(tmp_path: Path) -> None:
    """A prefetched entry is committed at the cold end of the LRU: it is evicted before older
    entries that were read, and counted as evicted unread; once read, it is an ordinary entry
    (its first read is reported once)."""
    unread: list[int] = []
    store = DiskStore(tmp_path, 30_000, 30_000, on_evict_unread=unread.append)

    def put(key: str, prefetched: bool) -> EntryMeta:
        fill = store.begin_fill()
        fill.file.write(b"x" * 10_000)
        meta = EntryMeta("application/octet-stream", 10_000, "0" * 64, 0.0, prefetched=prefetched)
        assert store.commit(key, fill, meta)
        return meta

    put("old", False)
    put("older", False)
    put("prefetched", True)
    put("new", False)  # makes room: the prefetched one goes, not "old"
    assert unread == [10_000]
    assert store.get("prefetched") is None
    old = store.get("old")
    assert old is not None
    old.close()
    meta = put("read-later", True)
    assert store.first_read("read-later", meta) is True
    assert store.first_read("read-later", meta) is False
    entry = store.get("read-later")
    assert entry is not None and entry.meta.prefetched is False
    entry.close()
    store.close()


def test_a_client_joining_a_prefetch_takes_it_over(standin: StandIn, proxy: ServerThread) -> None:
    """The client joins a running prefetch (one upstream request for both); the fill becomes
    the client's, so the key's next queued prefetch starts while it still runs."""
    gate = threading.Event()
    names = ["arr_a00001", "arr_a00002", "arr_a00003"]
    bodies = {name: standin.add("session", SESSION, name, size=3_000) for name in names}
    for name in names:
        standin.faults[name] = Fault(hold_start=gate)
    standin.chat_session = SESSION
    standin.chat_content = " ".join(names)
    _complete(proxy)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            assert standin.wait_for_requests("/v1/artifacts", 2)  # prefetch_per_key
            client = pool.submit(fetch, proxy, names[0])
            assert standin.wait_for_requests("/v1/artifacts", 3)  # its slot went to the third
        finally:
            gate.set()
        got = client.result(timeout=20)
    assert got.headers["x-cache"] == "COALESCED" and got.content == bodies[names[0]]
    assert [standin.hits("session", SESSION, name) for name in names] == [1, 1, 1]
    assert metric(proxy, "vlmrun_cache_prefetch_hits_total") == 1
    _eventually(lambda: _prefetches(proxy, "fetched") == 3)


def test_prefetch_and_client_meet_across_worker_processes(
    standin: StandIn, live_server: Any
) -> None:
    """With one or two workers, whichever worker the client's get reaches while the prefetch
    runs (or after) meets it through the fill path: one upstream request per artifact."""
    standin.latency = 0.2  # the gets arrive while the prefetches are still running
    standin.chat_session = SESSION
    names = [f"arr_d0000{n}" for n in range(4)]
    bodies = {name: standin.add("session", SESSION, name, size=200_000) for name in names}
    for name in names:
        standin.chat_content = f"here: {name}"
        _complete(live_server)
        got = fetch(live_server, name)  # a new connection: any worker
        assert got.status_code == 200 and got.content == bodies[name]
        if live_server.process.args[-1] == "1":  # one worker: the get always meets the prefetch
            assert got.headers["x-cache"] in ("HIT", "COALESCED"), got.headers
        assert standin.hits("session", SESSION, name) == 1


def test_a_prefetch_of_colliding_ids_never_crosses_accounts(
    standin: StandIn, proxy: ServerThread
) -> None:
    """B's account holds a session with the same id as A's (a hostile or broken API): B's
    prefetch stores B's bytes, and A's later get is checked, found to disagree, and served A's
    own bytes; B never receives A's, nor A B's."""
    mine = standin.add("session", SESSION, "arr_c0111d", size=5_000)
    theirs = standin.add_for(OTHER_TOKEN, "session", SESSION, "arr_c0111d", b"B" * 6_000)
    standin.chat_session = SESSION
    standin.chat_content = "arr_c0111d"
    _complete(proxy, OTHER_TOKEN)
    _eventually(lambda: _prefetches(proxy, "fetched") == 1)
    assert fetch(proxy, "arr_c0111d").content == mine
    assert metric(proxy, "vlmrun_cache_access_checks_total", result="mismatch") == 1
    assert fetch(proxy, "arr_c0111d", token=OTHER_TOKEN).content == theirs
    assert fetch(proxy, "arr_c0111d").content == mine


def test_a_full_queue_drops_the_oldest(standin: StandIn, proxy: ServerThread) -> None:
    """Two completions of one key naming 32 artifacts each while its two prefetches are held:
    the key's queue keeps the newest 32, the 30 oldest are dropped and never fetched."""
    gate = threading.Event()
    first = [f"arr_e0{n:04x}" for n in range(MAX_REFS)]
    second = [f"arr_e1{n:04x}" for n in range(MAX_REFS)]
    for name in first + second:
        standin.add("session", SESSION, name, size=1_000)
        standin.faults[name] = Fault(hold_start=gate)
    standin.chat_session = SESSION
    try:
        standin.chat_content = " ".join(first)
        _complete(proxy)
        assert standin.wait_for_requests("/v1/artifacts", 2)
        standin.chat_content = " ".join(second)
        _complete(proxy)
        assert _prefetches(proxy, "dropped") == MAX_REFS - 2
    finally:
        gate.set()
    _eventually(lambda: _prefetches(proxy, "fetched") == 2 + MAX_REFS)
    assert [standin.hits("session", SESSION, name) for name in first[2:]] == [0] * (MAX_REFS - 2)
    assert all(standin.hits("session", SESSION, name) == 1 for name in second)


def test_a_prefetch_of_unannounced_size_stops_at_its_cap(
    standin: StandIn, start_proxy: Any
) -> None:
    """Without a Content-Length, the prefetch is abandoned once the bytes pass its cap: nothing
    is stored, and the client's own get fetches it whole."""
    proxy = start_proxy(prefetch_max_object_size="64KiB")
    body = standin.add("session", SESSION, "vid_c4c4c4", size=3_000_000)
    standin.faults["vid_c4c4c4"] = Fault(chunked=True)
    standin.chat_session = SESSION
    standin.chat_content = "vid_c4c4c4"
    _complete(proxy)
    _eventually(lambda: _prefetches(proxy, "too_large") == 1)
    got = fetch(proxy, "vid_c4c4c4")
    assert got.headers["x-cache"] == "MISS" and got.content == body
    assert metric(proxy, "vlmrun_cache_store_failures_total", reason="too_large") == 0


def test_nothing_is_prefetched_while_the_breaker_is_open(
    standin: StandIn, start_proxy: Any
) -> None:
    """A prefetch's 503 opens the breaker (threshold 1): it is not retried, and the queued
    prefetches are dropped instead of going to an upstream that is failing."""
    proxy = start_proxy(breaker_threshold=1)
    gate = threading.Event()
    names = [f"arr_b0000{n}" for n in range(5)]
    for name in names:
        standin.add("session", SESSION, name)
    for name in names[:2]:
        standin.faults[name] = Fault(status=503, hold_start=gate)
    standin.chat_session = SESSION
    standin.chat_content = " ".join(names)
    try:
        _complete(proxy)
        assert standin.wait_for_requests("/v1/artifacts", 2)
    finally:
        gate.set()
    _eventually(lambda: _prefetches(proxy, "error") == 2)
    assert _prefetches(proxy, "dropped") == 3
    assert [standin.hits("session", SESSION, name) for name in names] == [1, 1, 0, 0, 0]
