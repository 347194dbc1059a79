"""Everything that is not a cacheable artifact fetch goes upstream verbatim, streamed both ways."""

from __future__ import annotations

import hashlib
import json
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.conftest import SESSION, TOKEN
from tests.helpers import auth, metric
from tests.standin import StandIn


def test_method_path_query_body_and_headers_are_forwarded(standin: StandIn, proxy) -> None:
    """Raw path (double slash kept), query order, body and end-to-end headers arrive unchanged."""
    body = b'{"name": "x", "n": [1, 2, 3]}'
    response = httpx.request(
        "PATCH",
        f"{proxy.url}/v1//echo/a%2Fb?z=1&a=2&a=3",
        content=body,
        headers={
            **auth(),
            "Content-Type": "application/json",
            "X-Stainless-Lang": "python",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "1",
            "Keep-Alive": "timeout=5",
        },
    )
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["method"] == "PATCH"
    assert echoed["raw_path"] == "/v1//echo/a%2Fb"
    assert echoed["query"] == "z=1&a=2&a=3"
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echoed["headers"]["x-stainless-lang"] == "python"
    assert echoed["headers"]["content-length"] == str(len(body))
    assert "x-drop-me" not in echoed["headers"] and "keep-alive" not in echoed["headers"]


def test_health_and_listing_are_never_answered_from_cache(standin: StandIn, proxy) -> None:
    """/v1/health and /v1/artifacts/list go upstream every time and see a growing session."""
    for _ in range(2):
        assert httpx.get(f"{proxy.url}/v1/health", headers=auth()).status_code == 200
    assert httpx.get(f"{proxy.url}/v1/health", headers=auth("nope")).status_code == 401
    url = f"{proxy.url}/v1/artifacts/list?session_id={SESSION}"
    assert httpx.get(url, headers=auth()).json()["items"] == []
    standin.add("session", SESSION, "img_abcdef")
    assert [i["object_id"] for i in httpx.get(url, headers=auth()).json()["items"]] == [
        "img_abcdef"
    ]
    assert standin.path_hits["/v1/health"] == 3
    assert standin.path_hits["/v1/artifacts/list"] == 2
    assert metric(proxy, "vlmrun_cache_passthrough_requests_total") == 5


def test_non_get_artifact_requests_pass_through(standin: StandIn, proxy) -> None:
    """Only GET /v1/artifacts is cached; other methods reach upstream as they are."""
    response = httpx.post(
        f"{proxy.url}/v1/artifacts?object_id=arr_1&session_id={SESSION}", headers=auth()
    )
    assert response.status_code == 404
    assert standin.path_hits["/v1/artifacts"] == 1


def test_chat_completion_json(standin: StandIn, proxy) -> None:
    """A non-streaming chat completion comes back whole, with its session_id."""
    response = httpx.post(
        f"{proxy.url}/v1/openai/chat/completions",
        json={"model": "vlmrun-orion-1:auto", "messages": [{"role": "user", "content": "hi"}]},
        headers=auth(),
    )
    assert response.status_code == 200
    assert response.json()["session_id"] == "sess_chat01"


def test_server_sent_events_are_forwarded_as_they_arrive(standin: StandIn, proxy) -> None:
    """The first event reaches the client while upstream is still holding back the rest."""
    standin.sse_gate = threading.Event()
    request = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    events = []
    with httpx.stream(
        "POST", f"{proxy.url}/v1/openai/chat/completions", json=request, headers=auth(), timeout=10
    ) as response:
        assert response.headers["content-type"] == "text/event-stream"
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line.removeprefix("data: "))
            if len(events) == 1:
                assert json.loads(events[0])["session_id"] == "sess_chat01"
                standin.sse_gate.set()  # only now may upstream send the rest
    assert events[-1] == "[DONE]" and len(events) == 4


def _multipart(path: Path, boundary: str) -> Iterator[bytes]:
    """A multipart/form-data body with one ``file`` field, read from disk in 64 KiB pieces."""
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
        "Content-Type: video/mp4\r\n\r\n"
    ).encode()
    with path.open("rb") as f:
        while chunk := f.read(65536):
            yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()


def test_large_multipart_upload_streams_through(standin: StandIn, proxy, tmp_path: Path) -> None:
    """A 32 MiB upload arrives intact (201) without the proxy holding it in memory."""
    upload = tmp_path / "video.mp4"
    upload.write_bytes(hashlib.sha256(b"seed").digest() * (1024 * 1024))  # 32 MiB
    boundary = "vlmrun-test-boundary"
    expected, length = hashlib.sha256(), 0
    for piece in _multipart(upload, boundary):
        expected.update(piece)
        length += len(piece)
    tracemalloc.start()
    try:
        response = httpx.post(
            f"{proxy.url}/v1/files?purpose=assistants",
            content=_multipart(upload, boundary),
            headers={
                **auth(),
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(length),
            },
            timeout=60,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 201
    assert standin.uploads[0]["sha256"] == expected.hexdigest()
    assert standin.uploads[0]["bytes"] == length
    # Client, proxy and stand-in share this process: all of them together stayed far below 32 MiB.
    assert peak < 8 * 1024 * 1024


def test_unreachable_upstream_gives_a_clear_502(start_proxy) -> None:
    """With nothing listening upstream, requests get a JSON 502 at once, not a hang or a 500."""
    proxy = start_proxy(upstream="http://127.0.0.1:1")
    passthrough = httpx.get(f"{proxy.url}/v1/models", headers=auth())
    artifact = httpx.get(
        f"{proxy.url}/v1/artifacts?object_id=arr_1&session_id={SESSION}", headers=auth()
    )
    for response in (passthrough, artifact):
        assert response.status_code == 502
        assert response.headers["content-type"] == "application/json"
        assert "upstream unavailable" in response.json()["detail"]
    assert TOKEN not in passthrough.text + artifact.text
