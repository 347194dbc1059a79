"""End to end through a real proxy server: hits, misses, coalescing, validation, integrity."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from proxy.store import VERIFIED_WHOLE
from tests.conftest import EXECUTION, OTHER_TOKEN, SESSION, TOKEN
from tests.helpers import artifact_url, auth, fetch, metric, raw_head_block
from tests.standin import Fault, StandIn


def test_second_fetch_is_a_hit_with_the_same_bytes(standin: StandIn, proxy) -> None:
    """A miss goes upstream once; the repeat is served from disk, byte for byte."""
    body = standin.add("session", SESSION, "arr_a1b2c3", size=700_000)
    first = fetch(proxy, "arr_a1b2c3")
    second = fetch(proxy, "arr_a1b2c3")
    assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
    assert (second.status_code, second.headers["x-cache"]) == (200, "HIT")
    assert first.content == body and second.content == body
    assert standin.hits("session", SESSION, "arr_a1b2c3") == 1


def test_hit_headers(standin: StandIn, proxy) -> None:
    """A hit carries length, a strong sha256 ETag, immutable caching and range support."""
    body = standin.add("execution", EXECUTION, "doc_0f0f0f", size=5000)
    fetch(proxy, "doc_0f0f0f", scope="execution", scope_id=EXECUTION)
    hit = fetch(proxy, "doc_0f0f0f", scope="execution", scope_id=EXECUTION)
    assert hit.headers["content-type"] == "application/pdf"
    assert hit.headers["content-length"] == str(len(body))
    assert hit.headers["etag"] == f'"{hashlib.sha256(body).hexdigest()}"'
    assert hit.headers["cache-control"] == "private, max-age=31536000, immutable"
    assert hit.headers["accept-ranges"] == "bytes"


@pytest.mark.parametrize("http", ["h11", "httptools"])
@pytest.mark.parametrize("lowercase_upstream", [False, True])
def test_content_type_is_spelled_exactly_on_the_wire(
    standin: StandIn, start_proxy, lowercase_upstream: bool, http: str
) -> None:
    """Content-Type is capitalised on misses and hits, with either of uvicorn's HTTP protocols,
    even when upstream sends it lowercase."""
    proxy = start_proxy(http=http)
    standin.lowercase_headers = lowercase_upstream
    standin.add("session", SESSION, "img_c0ffee")
    target = f"/v1/artifacts?object_id=img_c0ffee&session_id={SESSION}"
    miss = raw_head_block(proxy, target)
    hit = raw_head_block(proxy, target)
    for block in (miss, hit):
        assert b"\r\nContent-Type: image/png\r\n" in block
        assert b"content-type:" not in block
    assert b"x-cache: miss" in miss.lower() and b"x-cache: hit" in hit.lower()


def test_parameter_order_does_not_matter(standin: StandIn, proxy) -> None:
    """The Node SDK's order (scope first) hits what the Python SDK's order (object first) cached."""
    standin.add("session", SESSION, "arr_00aa11")
    fetch(proxy, "arr_00aa11")
    node_style = httpx.get(
        f"{proxy.url}/v1/artifacts?session_id={SESSION}&object_id=arr_00aa11", headers=auth()
    )
    assert node_style.headers["x-cache"] == "HIT"


@pytest.mark.parametrize(
    ("query", "loc"),
    [
        (f"session_id={SESSION}", ["query", "object_id"]),
        ("object_id=arr_1", ["query", "session_id"]),
        (
            f"object_id=arr_1&session_id={SESSION}&execution_id={EXECUTION}",
            ["query", "execution_id"],
        ),
        (f"object_id=arr_1&object_id=arr_2&session_id={SESSION}", ["query", "object_id"]),
        ("object_id=&session_id=s", ["query", "object_id"]),
        ("object_id=arr_1&session_id=" + "x" * 600, ["query", "session_id"]),
        ("object_id=arr%001&session_id=s", ["query", "object_id"]),
        ("object_id=%ff%fe&session_id=s", ["query", "query"]),
        ("", ["query", "session_id"]),
    ],
)
def test_invalid_requests_get_422_without_going_upstream(
    standin: StandIn, proxy, query: str, loc: list[str]
) -> None:
    """Malformed artifact requests are answered locally in the API's validation error shape."""
    response = httpx.get(f"{proxy.url}/v1/artifacts?{query}", headers=auth())
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"
    (item,) = response.json()["detail"]
    assert item["loc"] == loc and item["msg"] and item["type"]
    assert standin.path_hits["/v1/artifacts"] == 0


def test_filename_requests_pass_through_uncached(standin: StandIn, proxy) -> None:
    """``filename=`` names no immutable object: every such request goes upstream."""
    url = f"{proxy.url}/v1/artifacts?filename=report.pdf&session_id={SESSION}"
    httpx.get(url, headers=auth())
    httpx.get(url, headers=auth())
    assert standin.path_hits["/v1/artifacts"] == 2
    assert metric(proxy, "vlmrun_cache_requests_total", outcome="bypass") == 2


def test_upstream_errors_are_relayed_and_not_cached(standin: StandIn, proxy) -> None:
    """A 404 or 500 goes to the client verbatim and is asked again next time."""
    missing = fetch(proxy, "arr_404404")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "Artifact arr_404404 not found"}
    standin.add("session", SESSION, "arr_500500")
    standin.faults["arr_500500"] = Fault(status=500, times=3)  # outlasts the 2 retries
    assert fetch(proxy, "arr_500500").status_code == 500
    assert fetch(proxy, "arr_500500").headers["x-cache"] == "MISS"
    assert standin.hits("session", SESSION, "arr_500500") == 4


# -- who may read --------------------------------------------------------------------------


def test_other_token_is_refused_after_the_object_is_cached(standin: StandIn, proxy) -> None:
    """A valid key that does not own the session gets upstream's 404, never the cached bytes."""
    body = standin.add("session", SESSION, "vid_5e5e5e", size=300_000)
    assert fetch(proxy, "vid_5e5e5e").content == body
    for _ in range(2):
        refused = fetch(proxy, "vid_5e5e5e", token=OTHER_TOKEN)
        assert refused.status_code == 404
        assert body[:64] not in refused.content
    assert metric(proxy, "vlmrun_cache_access_checks_total", result="denied") == 2


def test_missing_or_unknown_credentials_are_refused(standin: StandIn, proxy) -> None:
    """No Authorization header, or a key upstream does not know, gets upstream's 401."""
    body = standin.add("session", SESSION, "aud_111111", size=2000)
    assert fetch(proxy, "aud_111111").content == body
    assert fetch(proxy, "aud_111111", token=None).status_code == 401
    assert fetch(proxy, "aud_111111", token="key-mallory").status_code == 401


def test_a_second_owner_is_checked_once_then_remembered(standin: StandIn, proxy) -> None:
    """Another key that owns the scope is verified upstream on its first hit, then by its proof."""
    standin.add("session", SESSION, "arr_222222")
    standin.grant(OTHER_TOKEN, "session", SESSION)
    fetch(proxy, "arr_222222")
    for _ in range(3):
        assert fetch(proxy, "arr_222222", token=OTHER_TOKEN).headers["x-cache"] == "HIT"
    assert standin.hits("session", SESSION, "arr_222222") == 2  # the fill and one check
    assert metric(proxy, "vlmrun_cache_access_checks_total", result="granted") == 1
    assert metric(proxy, "vlmrun_cache_access_checks_total", result="proof") == 2


def test_joining_a_fill_with_another_token_is_checked(standin: StandIn, proxy) -> None:
    """A request that would join a running fill is refused if its key does not own the scope."""
    body = standin.add("session", SESSION, "arr_333333", size=400_000)
    release = threading.Event()
    standin.faults["arr_333333"] = Fault(hold_middle=release, times=1)
    with httpx.stream(
        "GET", artifact_url(proxy, "arr_333333"), headers=auth(), timeout=20
    ) as leader:
        chunks = leader.iter_raw()
        first = next(chunks)  # the fill is running and half-way
        refused = fetch(proxy, "arr_333333", token=OTHER_TOKEN)
        release.set()
        rest = b"".join(chunks)
    assert refused.status_code == 404
    assert first + rest == body


# -- coalescing ----------------------------------------------------------------------------


def test_forty_concurrent_misses_cost_one_upstream_request(standin: StandIn, proxy) -> None:
    """All 40 first requests stream the one growing fill and get identical, correct bytes."""
    body = standin.add("session", SESSION, "vid_404040", size=3_000_000)
    release = threading.Event()
    standin.faults["vid_404040"] = Fault(hold_middle=release, times=1)
    everyone_streaming = threading.Barrier(41)

    def client() -> tuple[str, bytes]:
        with httpx.stream(
            "GET", artifact_url(proxy, "vid_404040"), headers=auth(), timeout=30
        ) as r:
            chunks = r.iter_raw()
            first = next(
                chunks
            )  # arrives before upstream finished: the file is streamed as it grows
            everyone_streaming.wait(timeout=30)
            return r.headers["x-cache"], first + b"".join(chunks)

    with ThreadPoolExecutor(40) as pool:
        futures = [pool.submit(client) for _ in range(40)]
        everyone_streaming.wait(timeout=30)
        release.set()
        results = [f.result() for f in futures]
    assert all(data == body for _, data in results)
    assert sorted(kind for kind, _ in results) == ["COALESCED"] * 39 + ["MISS"]
    assert standin.hits("session", SESSION, "vid_404040") == 1
    assert metric(proxy, "vlmrun_cache_requests_total", outcome="coalesced") == 39
    assert fetch(proxy, "vid_404040").headers["x-cache"] == "HIT"


@pytest.mark.parametrize("size", [1, 40_000, 65_536])
def test_a_small_fill_is_held_in_memory_and_written_at_its_commit(
    standin: StandIn, proxy, cache_dir: Path, size: int
) -> None:
    """A body of announced length up to 64 KiB makes no temporary file while it arrives: the
    leader and a client joining half-way both stream it from memory, and it is on disk (and a
    hit) once the commit is done, one upstream request for both."""
    object_id = f"arr_5{size:05x}"
    body = standin.add("session", SESSION, object_id, size=size)
    release = threading.Event()
    standin.faults[object_id] = Fault(hold_middle=release, hold_at=size // 2, times=1)
    joined = threading.Event()

    def follower() -> httpx.Response:
        with httpx.stream("GET", artifact_url(proxy, object_id), headers=auth(), timeout=20) as r:
            joined.set()  # the headers came: it is following the fill
            r.read()
            return r

    with httpx.stream("GET", artifact_url(proxy, object_id), headers=auth(), timeout=20) as leader:
        chunks = leader.iter_raw()
        first = next(chunks) if size > 1 else b""  # half-way (the last byte waits for the commit)
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(follower)
            assert joined.wait(timeout=20)
            assert list((cache_dir / "tmp").iterdir()) == []
            assert _stored_files(cache_dir) == []
            release.set()
            rest = b"".join(chunks)
            other = second.result(timeout=20)
    assert first + rest == body and other.content == body
    assert (leader.headers["x-cache"], other.headers["x-cache"]) == ("MISS", "COALESCED")
    assert standin.hits("session", SESSION, object_id) == 1
    assert len(_stored_files(cache_dir)) == 1 and list((cache_dir / "tmp").iterdir()) == []
    assert fetch(proxy, object_id).headers["x-cache"] == "HIT"


def test_only_entries_that_every_read_verifies_whole_skip_the_fsync(
    standin: StandIn, start_proxy, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry of 64 KiB at most is committed without an fsync: every disk read checks it
    whole, whatever chunk_size is (here smaller), so bytes a power failure garbles are a miss,
    never served, even to a range request. A larger entry, which a range reads unverified, is
    fsynced before it is indexed."""
    import os

    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".fill"):  # a fill's, not a proof's
            synced.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    proxy = start_proxy(chunk_size="16KiB")
    small = standin.add("session", SESSION, "arr_5a5a5a", size=VERIFIED_WHOLE)
    large = standin.add("session", SESSION, "arr_1a1a1a", size=VERIFIED_WHOLE + 1)
    larger = standin.add("session", SESSION, "arr_1b1b1b", size=200_000)
    for object_id, body in (("arr_5a5a5a", small), ("arr_1a1a1a", large), ("arr_1b1b1b", larger)):
        assert fetch(proxy, object_id).content == body
    assert sorted(synced) == [VERIFIED_WHOLE + 1, 200_000]
    (stored,) = [p for p in _stored_files(cache_dir) if p.stat().st_size == VERIFIED_WHOLE]
    stored.write_bytes(b"\0" * VERIFIED_WHOLE)  # as a power failure may leave it
    again = fetch(proxy, "arr_5a5a5a", Range="bytes=0-99")  # a miss answers whole
    assert (again.status_code, again.headers["x-cache"], again.content) == (200, "MISS", small)
    assert fetch(proxy, "arr_5a5a5a", Range="bytes=0-99").content == small[:100]


def test_a_small_fill_cut_short_is_never_delivered_whole_nor_stored(
    standin: StandIn, proxy, cache_dir: Path
) -> None:
    """An in-memory fill whose upstream stops early aborts both its clients and stores nothing."""
    body = standin.add("session", SESSION, "arr_c07c07", size=30_000)
    release = threading.Event()
    standin.faults["arr_c07c07"] = Fault(
        cut_at=20_000, hold_middle=release, hold_at=10_000, times=1
    )
    joined = threading.Event()

    def follower() -> bytes:
        with httpx.stream(
            "GET", artifact_url(proxy, "arr_c07c07"), headers=auth(), timeout=20
        ) as r:
            joined.set()
            return b"".join(r.iter_raw())

    with ThreadPoolExecutor(1) as pool:
        with httpx.stream(
            "GET", artifact_url(proxy, "arr_c07c07"), headers=auth(), timeout=20
        ) as leader:
            chunks = leader.iter_raw()
            next(chunks)
            second = pool.submit(follower)
            assert joined.wait(timeout=20)
            release.set()
            with pytest.raises(httpx.HTTPError):
                b"".join(chunks)
        with pytest.raises(httpx.HTTPError):
            second.result(timeout=20)
    assert _stored_files(cache_dir) == [] and list((cache_dir / "tmp").iterdir()) == []
    again = fetch(proxy, "arr_c07c07")
    assert (again.headers["x-cache"], again.content) == ("MISS", body)


@pytest.mark.parametrize("size", [40_000, 2_000_000], ids=["in-memory", "file"])
def test_fill_survives_the_client_disconnecting(standin: StandIn, proxy, size: int) -> None:
    """A client that hangs up mid-miss does not waste the download: the entry still commits,
    and a client that joined the fill before the hang-up gets every byte."""
    body = standin.add("session", SESSION, "recon_777777", size=size)
    release = threading.Event()
    standin.faults["recon_777777"] = Fault(hold_middle=release, times=1)
    url = artifact_url(proxy, "recon_777777")
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(httpx.stream("GET", url, headers=auth(), timeout=20))
        assert first.headers["x-cache"] == "MISS"
        next(first.iter_raw())
        client = stack.enter_context(httpx.Client(timeout=20))
        joined = stack.enter_context(client.stream("GET", url, headers=auth()))
        assert joined.headers["x-cache"] == "COALESCED"
        first.close()  # the client that started the fill hangs up
        release.set()
        assert joined.read() == body
    again = fetch(proxy, "recon_777777")  # joins the still-running fill, or hits
    assert again.content == body
    assert fetch(proxy, "recon_777777").headers["x-cache"] == "HIT"
    assert standin.hits("session", SESSION, "recon_777777") == 1


# -- broken upstream bodies ----------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
def test_cut_upstream_body_is_never_cached(standin: StandIn, proxy, chunked: bool) -> None:
    """A body cut short fails the client's transfer, is not committed, and is refetched whole."""
    body = standin.add("session", SESSION, "arr_c0c0c0", size=1_000_000)
    standin.faults["arr_c0c0c0"] = Fault(cut_at=400_000, chunked=chunked, times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        fetch(proxy, "arr_c0c0c0")
    again = fetch(proxy, "arr_c0c0c0")
    assert (again.headers["x-cache"], again.content) == ("MISS", body)
    assert fetch(proxy, "arr_c0c0c0").headers["x-cache"] == "HIT"
    assert standin.hits("session", SESSION, "arr_c0c0c0") == 2


# -- ranges and conditionals ---------------------------------------------------------------


def test_range_and_conditional_requests_on_a_hit(standin: StandIn, proxy) -> None:
    """Single ranges get 206, past-the-end 416, several ranges the whole body, a known ETag 304."""
    body = standin.add("session", SESSION, "vid_0a0b0c", size=600_000)
    fetch(proxy, "vid_0a0b0c")
    etag = fetch(proxy, "vid_0a0b0c").headers["etag"]
    part = fetch(proxy, "vid_0a0b0c", Range="bytes=10-19")
    assert (part.status_code, part.content) == (206, body[10:20])
    assert part.headers["content-range"] == f"bytes 10-19/{len(body)}"
    tail = fetch(proxy, "vid_0a0b0c", Range="bytes=-300000")
    assert (tail.status_code, tail.content) == (206, body[-300_000:])
    open_ended = fetch(proxy, "vid_0a0b0c", Range="bytes=599990-")
    assert open_ended.content == body[599_990:]
    beyond = fetch(proxy, "vid_0a0b0c", Range="bytes=700000-")
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(body)}"
    several = fetch(proxy, "vid_0a0b0c", Range="bytes=0-1,5-6")
    assert (several.status_code, several.content) == (200, body)
    not_modified = fetch(proxy, "vid_0a0b0c", **{"If-None-Match": etag})
    assert (not_modified.status_code, not_modified.content) == (304, b"")
    assert standin.hits("session", SESSION, "vid_0a0b0c") == 1


def test_conditional_request_from_a_stranger_is_checked_first(standin: StandIn, proxy) -> None:
    """A 304 would reveal the ETag matches: a key without access gets upstream's refusal instead."""
    standin.add("session", SESSION, "arr_e7a9e7")
    fetch(proxy, "arr_e7a9e7")
    etag = fetch(proxy, "arr_e7a9e7").headers["etag"]
    stranger = fetch(proxy, "arr_e7a9e7", token=OTHER_TOKEN, **{"If-None-Match": etag})
    assert stranger.status_code == 404


# -- integrity -----------------------------------------------------------------------------


def _stored_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "entries").rglob("*.val"))


@pytest.mark.parametrize("size", [5_000, 2_000_000])
def test_truncated_entry_is_refetched(standin: StandIn, proxy, cache_dir: Path, size: int) -> None:
    """A stored file shorter than recorded is treated as a miss, evicted and refetched."""
    body = standin.add("session", SESSION, "arr_7a7a7a", size=size)
    fetch(proxy, "arr_7a7a7a")
    (stored,) = _stored_files(cache_dir)
    with stored.open("r+b") as f:
        f.truncate(size // 2)
    again = fetch(proxy, "arr_7a7a7a")
    assert (again.headers["x-cache"], again.content) == ("MISS", body)
    assert metric(proxy, "vlmrun_cache_integrity_failures_total") == 1


def test_small_entry_with_wrong_bytes_is_refetched(
    standin: StandIn, proxy, cache_dir: Path
) -> None:
    """A small entry is hashed before answering: garbage of the right size is never served."""
    body = standin.add("session", SESSION, "arr_9b9b9b", size=10_000)
    fetch(proxy, "arr_9b9b9b")
    (stored,) = _stored_files(cache_dir)
    stored.write_bytes(b"\0" * len(body))
    again = fetch(proxy, "arr_9b9b9b")
    assert (again.headers["x-cache"], again.content) == ("MISS", body)
    assert standin.hits("session", SESSION, "arr_9b9b9b") == 2


def test_large_entry_with_wrong_bytes_aborts_the_transfer(
    standin: StandIn, proxy, cache_dir: Path
) -> None:
    """A streamed hit failing its digest is cut before its last chunk, evicted, then refetched."""
    body = standin.add("session", SESSION, "vid_8c8c8c", size=3_000_000)
    fetch(proxy, "vid_8c8c8c")
    (stored,) = _stored_files(cache_dir)
    garbage = bytearray(body)
    garbage[-10] ^= 0xFF
    stored.write_bytes(bytes(garbage))
    with pytest.raises(httpx.RemoteProtocolError):
        fetch(proxy, "vid_8c8c8c")
    again = fetch(proxy, "vid_8c8c8c")
    assert (again.headers["x-cache"], again.content) == ("MISS", body)
    assert metric(proxy, "vlmrun_cache_integrity_failures_total") == 1


# -- size limits and restarts --------------------------------------------------------------


def test_objects_over_the_object_limit_stream_through_uncached(
    standin: StandIn, start_proxy
) -> None:
    """An artifact larger than max_object_size is delivered whole but fetched every time."""
    proxy = start_proxy(max_size="4MiB", max_object_size="1MiB")
    body = standin.add("session", SESSION, "vid_b16b16", size=1_500_000)
    assert fetch(proxy, "vid_b16b16").content == body
    assert fetch(proxy, "vid_b16b16").content == body
    assert standin.hits("session", SESSION, "vid_b16b16") == 2
    assert metric(proxy, "vlmrun_cache_entries") == 0


def test_restarted_proxy_still_hits(standin: StandIn, start_proxy) -> None:
    """Entries and access proofs survive a restart on the same directory."""
    body = standin.add("session", SESSION, "img_4e5f60")
    first = start_proxy()
    fetch(first, "img_4e5f60")
    first.stop()
    second = start_proxy()
    again = fetch(second, "img_4e5f60")
    assert (again.headers["x-cache"], again.content) == ("HIT", body)
    assert standin.hits("session", SESSION, "img_4e5f60") == 1
    assert metric(second, "vlmrun_cache_access_checks_total", result="proof") == 1


def test_eviction_keeps_the_cache_under_its_bound(
    standin: StandIn, start_proxy, cache_dir: Path
) -> None:
    """With many objects of mixed sizes, cached bytes never exceed max_size."""
    proxy = start_proxy(max_size="2MiB", max_object_size="1MiB")
    sizes = [1000, 300_000, 70_000, 900_000, 5, 450_000, 1_048_576, 123_456, 640_000, 2048] * 3
    for index, size in enumerate(sizes):
        object_id = f"arr_{index:06x}"
        body = standin.add("session", SESSION, object_id, size=size)
        assert fetch(proxy, object_id).content == body
        on_disk = sum(p.stat().st_size for p in _stored_files(cache_dir))
        assert on_disk <= 2 * 1024 * 1024
        assert metric(proxy, "vlmrun_cache_bytes") == on_disk
    assert metric(proxy, "vlmrun_cache_evictions_total") > 0
    assert fetch(proxy, f"arr_{len(sizes) - 1:06x}").headers["x-cache"] == "HIT"


def test_no_token_gets_bytes_through_a_cold_miss(standin: StandIn, proxy) -> None:
    """Isolation holds on the miss path too: the first request by a stranger is refused."""
    standin.add("session", SESSION, "arr_5a5a5a")
    assert fetch(proxy, "arr_5a5a5a", token=OTHER_TOKEN).status_code == 404
    assert fetch(proxy, "arr_5a5a5a").status_code == 200


def test_a_stalled_reader_does_not_hold_the_fill_hostage(standin: StandIn, proxy) -> None:
    """One client that stops reading does not slow another following the same fill."""
    body = standin.add("session", SESSION, "vid_51051c", size=24_000_000)
    release = threading.Event()
    standin.faults["vid_51051c"] = Fault(hold_middle=release, times=1)
    url = artifact_url(proxy, "vid_51051c")
    with (
        httpx.stream("GET", url, headers=auth(), timeout=30) as slow,
        httpx.stream("GET", url, headers=auth(), timeout=30) as fast,
    ):
        slow_chunks, fast_chunks = slow.iter_raw(), fast.iter_raw()
        slow_head = next(slow_chunks)  # then the slow one stops reading: its buffers fill up
        fast_head = next(fast_chunks)
        release.set()
        assert fast_head + b"".join(fast_chunks) == body  # finishes while the other is stalled
        assert fast.headers["x-cache"] == "COALESCED"
        assert slow_head + b"".join(slow_chunks) == body
    assert standin.hits("session", SESSION, "vid_51051c") == 1


@pytest.mark.parametrize(
    ("scope_id", "object_id"),
    [
        ("sess 1", "vid_a&object_id=vid_plain"),  # a second object_id smuggled in a value
        ("sess&session_id=" + SESSION, "vid_a"),  # another session smuggled in a value
        ("séss", "vid_%41#frag"),  # unicode, a percent sign, a fragment mark
        ("sess+1", "vid_a+b;c"),
    ],
)
def test_ids_that_need_encoding_reach_the_api_intact(
    standin: StandIn, proxy, scope_id: str, object_id: str
) -> None:
    """Ids that are not plain go through httpx's encoding (proxy/upstream.py builds plain ones
    itself): the API sees exactly the ids asked for, never an id or a scope smuggled in one,
    and a second request is a hit on the same key."""
    decoy = standin.add("session", SESSION, "vid_plain")
    standin.grant(TOKEN, "session", scope_id)
    body = standin.add("session", scope_id, object_id)
    assert body != decoy
    first = fetch(proxy, object_id, scope_id=scope_id)
    assert (first.status_code, first.content) == (200, body)
    assert standin.artifact_hits == {("session", scope_id, object_id): 1}
    again = fetch(proxy, object_id, scope_id=scope_id)
    assert (again.content, again.headers["x-cache"]) == (body, "HIT")
