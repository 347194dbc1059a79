"""Hostile and malformed input: always a 4xx or upstream's own answer; never a 500, a hang,
a dropped connection, or a file touched outside the cache directory."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode

from tests.conftest import EXECUTION, SESSION, TOKEN
from tests.helpers import artifact_url, auth
from tests.servers import ServerThread
from tests.standin import Fault, StandIn

SPEC = Path(__file__).parent / "openapi" / "get-artifact.yaml"
OPERATION = schemathesis.openapi.from_path(str(SPEC))["/v1/artifacts"]["GET"]
CASES = st.one_of(
    OPERATION.as_strategy(GenerationMode.POSITIVE), OPERATION.as_strategy(GenerationMode.NEGATIVE)
)
#: Statuses the proxy itself may answer with, besides upstream's own answers.
OWN_STATUSES = {200, 206, 304, 413, 414, 416, 422}


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _assert_well_formed(status: int, body: bytes) -> None:
    assert status < 500, body[:300]
    if status == 422:
        detail = json.loads(body)["detail"]
        assert isinstance(detail, list) and detail
        assert all({"loc", "msg", "type"} <= set(item) for item in detail)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=CASES)
def test_schemathesis_fuzz(
    standin: StandIn, proxy, tmp_path: Path, case: schemathesis.Case
) -> None:
    """Cases generated from the API's OpenAPI, valid and invalid, get well-formed 4xx or 200s."""
    standin.add("session", SESSION, "img_a1b2c3")
    outside = _tree(tmp_path) - {p for p in _tree(tmp_path) if p.startswith("cache")}
    response = case.call(base_url=proxy.url, headers=auth(), timeout=20)
    _assert_well_formed(response.status_code, response.content)
    after = _tree(tmp_path) - {p for p in _tree(tmp_path) if p.startswith("cache")}
    assert after == outside


HOSTILE_QUERIES = [
    f"object_id=img_a1b2c3&object_id=img_a1b2c3&session_id={SESSION}",
    f"object_id=&session_id={SESSION}",
    f"object_id=img_a1b2c3&session_id=&execution_id={EXECUTION}",
    "object_id=" + "a" * 5000 + f"&session_id={SESSION}",
    f"object_id=img%00a1b2c3&session_id={SESSION}",
    f"object_id=img%0d%0aX-Injected:%201&session_id={SESSION}",
    f"object_id=%zz%&session_id={SESSION}",
    f"object_id=%E9%FF&session_id={SESSION}",
    f"object_id=../../../../etc/passwd&session_id={SESSION}",
    "object_id=img_a1b2c3&session_id=../../../../tmp/x",
    f"object_id=..%2F..%2Fsecret&session_id={SESSION}",
    f"object_id=img_a1b2c3&session_id={SESSION}&" + "&".join(f"p{i}=v" for i in range(500)),
    f"object_id=img_a1b2c3&session_id={SESSION}&object_id",
    f"session_id={SESSION}&object_id=img_a1b2c3;execution_id={EXECUTION}",
    "=&=&&&",
]


@pytest.mark.parametrize("query", HOSTILE_QUERIES)
def test_hostile_queries(standin: StandIn, proxy, tmp_path: Path, query: str) -> None:
    """Each hand-written nasty query gets an answer in the API shape and writes nothing outside."""
    standin.add("session", SESSION, "img_a1b2c3")
    outside = {p for p in _tree(tmp_path) if not p.startswith("cache")}
    status, body = _raw_get(proxy, f"/v1/artifacts?{query}".encode())
    _assert_well_formed(status, body)
    assert status in OWN_STATUSES | {401, 404}
    assert {p for p in _tree(tmp_path) if not p.startswith("cache")} == outside


def test_non_utf8_bytes_in_the_request_line(proxy) -> None:
    """Raw bytes that are not UTF-8 are refused with a 422, not a crash."""
    status, body = _raw_get(proxy, b"/v1/artifacts?object_id=\xff\xfe&session_id=s")
    assert status in (400, 422), body


def test_huge_headers_are_refused_cleanly(proxy) -> None:
    """A 100 KB header is answered with a 4xx by the HTTP layer, and the server carries on."""
    status, _ = _raw_get(
        proxy,
        f"/v1/artifacts?object_id=img_a1b2c3&session_id={SESSION}".encode(),
        extra=b"X-Big: " + b"a" * 100_000 + b"\r\n",
    )
    assert 400 <= status < 500
    assert httpx.get(f"{proxy.url}/healthz").status_code == 200


def test_many_range_specs(standin: StandIn, proxy) -> None:
    """A Range with a thousand parts (as many as fit the 8 KiB line limit) is served whole, once."""
    body = standin.add("session", SESSION, "arr_a1b2c3", size=10_000)
    url = f"{proxy.url}/v1/artifacts?object_id=arr_a1b2c3&session_id={SESSION}"
    httpx.get(url, headers=auth())
    ranges = "bytes=" + ",".join(f"{i}-{i}" for i in range(1000))
    response = httpx.get(url, headers={**auth(), "Range": ranges})
    assert (response.status_code, response.content) == (200, body)


def test_request_body_on_the_cached_route_is_refused(proxy) -> None:
    """A GET carrying a large body gets 413 before anything else happens."""
    response = httpx.request(
        "GET",
        f"{proxy.url}/v1/artifacts?object_id=img_a1b2c3&session_id={SESSION}",
        content=b"x" * 100_000,
        headers=auth(),
    )
    assert response.status_code == 413
    assert "detail" in response.json()


def test_too_many_waiters_get_503(standin: StandIn, start_proxy) -> None:
    """Beyond max_waiters on one fill, extra clients are turned away with a 503, not queued."""
    proxy = start_proxy(max_waiters=1)
    body = standin.add("session", SESSION, "vid_0a0a0a", size=500_000)
    release = threading.Event()
    standin.faults["vid_0a0a0a"] = Fault(hold_middle=release, times=1)
    with httpx.stream(
        "GET", artifact_url(proxy, "vid_0a0a0a"), headers=auth(), timeout=20
    ) as first:
        chunks = first.iter_raw()
        head = next(chunks)
        turned_away = httpx.get(artifact_url(proxy, "vid_0a0a0a"), headers=auth(), timeout=20)
        release.set()
        rest = b"".join(chunks)
    assert head + rest == body
    assert turned_away.status_code == 503


def _raw_get(server: ServerThread, target: bytes, extra: bytes = b"") -> tuple[int, bytes]:
    """Send a request line exactly as given; return status and body (Connection: close)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as conn:
        conn.sendall(
            b"GET "
            + target
            + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\n"
            + extra
            + b"Connection: close\r\n\r\n"
        )
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    assert data, "connection dropped without an answer"
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body
