"""A stand-in for the VLM Run API, served for real over HTTP on a loopback port.

It behaves like the API where the proxy and the SDKs can tell: bearer tokens that own sessions
and executions, exact content types per object prefix (real PNG bytes for ``img_``), 401/404/422
bodies in FastAPI's shapes, ``/v1/health``, ``/v1/artifacts/list``, chat completions with and
without SSE, and multipart ``/v1/files``. Tests script it: per-key request counters, a mode that
sends lowercase header names, and faults per object (cut body, 500, gates that hold the first or
the middle byte until the test releases them).

It also misbehaves on demand, as a hostile or broken API (or CDN) would: per-account bytes for
ids that collide across accounts, a ``Set-Cookie`` on every answer, compression whatever the
request asked for, ``ETag``s, redirects, and a record of every request's headers.

It is a raw ASGI app so that header names go out exactly as written here.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import io
import json
import threading
import zlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

from PIL import Image
from starlette.types import Receive, Scope, Send

CONTENT_TYPES = {
    "img": "image/png",
    "vid": "video/mp4",
    "aud": "audio/mpeg",
    "doc": "application/pdf",
    "recon": "application/octet-stream",
    "arr": "application/octet-stream",
    "url": "text/plain",
}


def png_bytes(seed: int, size: int = 16) -> bytes:
    image = Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, 120))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def pattern(seed: str, size: int) -> bytes:
    """``size`` deterministic pseudo-random bytes."""
    block = hashlib.sha256(seed.encode()).digest() * 2048  # 64 KiB
    whole, rest = divmod(size, len(block))
    return block * whole + block[:rest]


def generated_chunks(seed: str, size: int) -> Iterator[tuple[int, bytes]]:
    """``pattern(seed, size)`` as (offset, chunk) pairs of at most 256 KiB, never all at once."""
    block = hashlib.sha256(seed.encode()).digest() * 8192  # 256 KiB
    for offset in range(0, size, len(block)):
        yield offset, block[: min(len(block), size - offset)]


def generated_sha256(seed: str, size: int) -> str:
    digest = hashlib.sha256()
    for _, chunk in generated_chunks(seed, size):
        digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass
class Fault:
    """What to do to one object's next responses."""

    #: Send this status with a JSON body instead of the artifact.
    status: int | None = None
    #: Declare the full Content-Length, send this many bytes, then drop the connection (with
    #: ``hold_middle`` and ``hold_at``: send ``hold_at`` bytes and hold first).
    cut_at: int | None = None
    #: Hold the response (before the status line) until set.
    hold_start: threading.Event | None = None
    #: Send the first half of the body (or ``hold_at`` bytes), then hold until set.
    hold_middle: threading.Event | None = None
    hold_at: int | None = None
    #: Omit Content-Length (chunked transfer).
    chunked: bool = False
    #: Answer 302 to this URL instead of the bytes.
    redirect_to: str | None = None
    #: Send the body one byte at a time, this many seconds apart (a dripping upstream).
    drip: float | None = None
    #: Apply only to this many requests (None: all).
    times: int | None = None


class StandIn:
    """The scripted API. Thread-safe for the test thread; runs on the server's loop."""

    def __init__(self) -> None:
        self.tokens: dict[str, set[tuple[str, str]]] = {}
        self.artifacts: dict[tuple[str, str, str], tuple[bytes, str]] = {}
        self.faults: dict[str, Fault] = {}
        #: Artifact requests that reached us, by (kind, scope id, object id).
        self.artifact_hits: collections.Counter[tuple[str, str, str]] = collections.Counter()
        #: Requests by path.
        self.path_hits: collections.Counter[str] = collections.Counter()
        #: Every request's headers, in arrival order: (path, raw headers).
        self.seen: list[tuple[str, list[tuple[bytes, bytes]]]] = []
        #: Set whenever an artifact request arrives (tests clear it).
        self.arrived = threading.Event()
        #: Notified on every request (see :meth:`wait_for_requests`).
        self._requests_changed = threading.Condition()
        self.lowercase_headers = False
        #: SSE streams send their first event, then wait for this before the rest.
        self.sse_gate: threading.Event | None = None
        self.uploads: list[dict[str, Any]] = []
        #: Seconds to wait before answering an artifact request, like a remote API's round trip.
        self.latency = 0.0
        #: Scopes whose artifacts exist for any id ``<prefix>_<size>[_<tag>]``, streamed from a
        #: pattern without being held; ids containing ``cut`` are cut half-way, ``flaky`` get one
        #: 503 first (each once per key). For load tests.
        self.generated_scopes: set[tuple[str, str]] = set()
        self._spent_faults: set[tuple[str, str, str]] = set()
        #: Artifacts one token's account holds under ids another account may use too:
        #: (token, kind, scope id, object id) -> (bytes, content type). Looked up first.
        self.account_artifacts: dict[tuple[str, str, str, str], tuple[bytes, str]] = {}
        #: Sent as ``Set-Cookie`` on every answer when set.
        self.set_cookie: str | None = None
        #: ``gzip`` or ``deflate``: code every artifact body so, whatever the request asked for.
        #: Any other value is sent as the Content-Encoding of a body coded with gzip.
        self.compress: str | None = None
        #: Send ``ETag: "<sha256 of the body>"`` on artifact answers.
        self.etags = False
        #: ``/v1/health`` answers this status (and no body check of the key) when not 200.
        self.health_status = 200
        #: Listed by ``/v1/artifacts/list`` after the artifacts (e.g. items without object_id).
        self.extra_list_items: list[dict[str, Any]] = []
        #: Chat completions: the session they name, the JSON answer's message content, and the
        #: SSE deltas (per event; ``None`` sends no content). ``chat_raw_events`` go out first,
        #: verbatim (garbage, odd events). With ``chat_gzip``, answers are gzip-coded when the
        #: request accepts it (events flushed one by one).
        self.chat_session = "sess_chat01"
        self.chat_content = "img_a1b2c3"
        self.chat_deltas: list[str | None] = ["one", "two", "three"]
        self.chat_tool_arguments: list[str] = []
        self.chat_raw_events: list[bytes] = []
        self.chat_gzip = False
        #: Agent executions by id: ``GET /v1/agent/executions/{id}`` answers the record to a token
        #: granted that execution (404 otherwise); ``POST /v1/agent/execute`` answers
        #: ``executions[next_execution]`` (and grants it to the caller).
        self.executions: dict[str, dict[str, Any]] = {}
        self.next_execution = ""
        #: Seconds between SSE events; with ``chat_fresh_sessions`` each completion names a new
        #: generated session ``<chat_session>-<n>`` (granted to its caller). For benchmarks.
        self.chat_event_delay = 0.0
        self.chat_fresh_sessions = False
        self._chats = 0
        #: Sizes of generated objects by id (other ids carry their size in their name), and a
        #: per-response bandwidth limit for them in bytes/s (0: none).
        self.generated_sizes: dict[str, int] = {}
        self.bandwidth = 0.0
        #: Artifact requests being answered now, and the most at once so far.
        self.in_flight = 0
        self.max_in_flight = 0
        #: Sent as ``Retry-After`` with a fault's status when set.
        self.retry_after: str | None = None
        self._lock = threading.Lock()

    # -- scripting ---------------------------------------------------------------------------

    def grant(self, token: str, kind: str, scope_id: str) -> None:
        self.tokens.setdefault(token, set()).add((kind, scope_id))

    def add_token(self, token: str) -> None:
        self.tokens.setdefault(token, set())

    def add(self, kind: str, scope_id: str, object_id: str, size: int | None = None) -> bytes:
        """Publish an artifact; returns its bytes. ``img_`` gets a real PNG."""
        prefix = object_id.split("_", 1)[0]
        if prefix == "img":
            body = png_bytes(len(self.artifacts) + 1)
        elif prefix == "url":
            body = b"https://example.com/file.mp4"
        else:
            body = pattern(f"{kind}/{scope_id}/{object_id}", 1000 if size is None else size)
        self.artifacts[(kind, scope_id, object_id)] = (
            body,
            CONTENT_TYPES.get(prefix, "application/octet-stream"),
        )
        return body

    def add_for(self, token: str, kind: str, scope_id: str, object_id: str, body: bytes) -> bytes:
        """Publish ``body`` as ``object_id`` in *this token's account's* scope ``scope_id``
        (granting it), as if two accounts held scopes with the same id."""
        self.grant(token, kind, scope_id)
        prefix = object_id.split("_", 1)[0]
        content_type = CONTENT_TYPES.get(prefix, "application/octet-stream")
        self.account_artifacts[(token, kind, scope_id, object_id)] = (body, content_type)
        return body

    def headers_seen(self, path: str) -> list[dict[str, str]]:
        """The headers of every request for ``path`` so far, names lowercased."""
        with self._lock:
            return [
                {k.decode().lower(): v.decode("latin-1") for k, v in headers}
                for seen_path, headers in self.seen
                if seen_path == path
            ]

    def wait_for_requests(self, path: str, count: int, timeout: float = 20) -> bool:
        """Block until ``count`` requests for ``path`` have arrived (False on timeout)."""
        with self._requests_changed:
            return self._requests_changed.wait_for(lambda: self.path_hits[path] >= count, timeout)

    def hits(self, kind: str, scope_id: str, object_id: str) -> int:
        with self._lock:
            return self.artifact_hits[(kind, scope_id, object_id)]

    # -- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        with self._lock:
            self.path_hits[path] += 1
            self.seen.append((path, list(scope["headers"])))
        with self._requests_changed:
            self._requests_changed.notify_all()
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = dict(parse_qsl(scope["query_string"].decode(), keep_blank_values=True))
        # As FastAPI's HTTPBearer reads it: the scheme in any case, the token after one space.
        scheme, _, token = headers.get("authorization", "").partition(" ")
        token = token if scheme.lower() == "bearer" else ""
        method = scope["method"]
        if path == "/_standin/hits":
            return await self._json(
                send, 200, {"artifact_requests": sum(self.artifact_hits.values())}
            )
        if path == "/v1/health":
            if self.health_status != 200:
                return await self._json(send, self.health_status, {"detail": "Unavailable"})
            if token not in self.tokens:
                return await self._json(send, 401, {"detail": "Invalid API key"})
            return await self._json(send, 200, {"status": "ok"})
        if token not in self.tokens:
            return await self._json(send, 401, {"detail": "Invalid API key"})
        if path == "/v1/artifacts" and method == "GET":
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                return await self._artifact(send, token, query)
            finally:
                self.in_flight -= 1
        if path.startswith("/_standin/blob/") and method == "GET":  # a same-origin redirect target
            kind, scope_id, object_id = path.removeprefix("/_standin/blob/").split("/", 2)
            if (kind, scope_id) not in self.tokens[token]:
                return await self._json(send, 404, {"detail": "Not found"})
            body, content_type = self.artifacts[(kind, scope_id, object_id)]
            await self._start(
                send, 200, [("Content-Type", content_type), ("Content-Length", str(len(body)))]
            )
            return await send({"type": "http.response.body", "body": body})
        if path == "/v1/artifacts/list" and method == "GET":
            return await self._list(send, token, query)
        if path == "/v1/openai/chat/completions" and method == "POST":
            body = await _read_body(receive)
            gzip_ok = self.chat_gzip and "gzip" in headers.get("accept-encoding", "")
            return await self._chat(send, json.loads(body), gzip_ok, token)
        if path.startswith("//"):  # an SDK base URL ending in "/": routed as without it
            path = "/" + path.lstrip("/")
        if path.startswith("/v1/agent/executions/") and method == "GET":
            execution_id = path.removeprefix("/v1/agent/executions/")
            record = self.executions.get(execution_id)
            if record is None or ("execution", execution_id) not in self.tokens[token]:
                return await self._json(send, 404, {"detail": "Execution not found"})
            return await self._json(send, 200, record)
        if path == "/v1/agent/execute" and method == "POST":
            await _read_body(receive)
            self.grant(token, "execution", self.next_execution)
            return await self._json(send, 201, self.executions[self.next_execution])
        if path == "/v1/files" and method == "POST":
            return await self._upload(send, receive, headers, query)
        if path.replace("//", "/").startswith("/v1/echo"):
            body = await _read_body(receive)
            return await self._json(
                send,
                200,
                {
                    "method": method,
                    "raw_path": scope["raw_path"].decode("latin-1"),
                    "query": scope["query_string"].decode("latin-1"),
                    "body_sha256": hashlib.sha256(body).hexdigest(),
                    "headers": {k: v for k, v in headers.items() if k != "authorization"},
                },
            )
        return await self._json(send, 404, {"detail": "Not Found"})

    def _name(self, name: str) -> bytes:
        return (name.lower() if self.lowercase_headers else name).encode()

    async def _start(self, send: Send, status: int, headers: list[tuple[str, str]]) -> None:
        if self.set_cookie is not None:
            headers = [*headers, ("Set-Cookie", self.set_cookie)]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (self._name(k), v.encode("latin-1") if k == "Retry-After" else v.encode())
                    for k, v in headers
                ],
            }
        )

    async def _json(self, send: Send, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        await self._start(
            send, status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        await send({"type": "http.response.body", "body": body})

    def _fault(self, object_id: str) -> Fault | None:
        with self._lock:
            fault = self.faults.get(object_id)
            if fault is None:
                return None
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self.faults[object_id]
            return fault

    async def _artifact(self, send: Send, token: str, query: dict[str, str]) -> None:
        object_id = query.get("object_id")
        session_id, execution_id = query.get("session_id"), query.get("execution_id")
        if object_id is None:
            return await self._json(send, 422, _missing("object_id"))
        if (session_id is None) == (execution_id is None):
            return await self._json(
                send, 400, {"detail": "Either session_id or execution_id must be provided"}
            )
        kind, scope_id = ("session", session_id) if session_id else ("execution", execution_id)
        assert scope_id is not None
        key = (kind, scope_id, object_id)
        with self._lock:
            self.artifact_hits[key] += 1
        self.arrived.set()
        if self.latency:
            await asyncio.sleep(self.latency)
        if (kind, scope_id) in self.generated_scopes:
            return await self._generated(send, token, key)
        fault = self._fault(object_id)
        if fault and fault.hold_start:
            await _wait(fault.hold_start)
        own = self.account_artifacts.get((token, *key))
        if (kind, scope_id) not in self.tokens[token] or (
            own is None and key not in self.artifacts
        ):
            return await self._json(send, 404, {"detail": f"Artifact {object_id} not found"})
        if fault and fault.status:
            if self.retry_after is not None:
                body = b'{"detail": "Too Many Requests"}'
                headers = [("Content-Type", "application/json"), ("Retry-After", self.retry_after)]
                await self._start(send, fault.status, [*headers, ("Content-Length", "31")])
                return await send({"type": "http.response.body", "body": body})
            return await self._json(send, fault.status, {"detail": "Internal Server Error"})
        if fault and fault.redirect_to:
            await self._start(send, 302, [("Location", fault.redirect_to), ("Content-Length", "0")])
            return await send({"type": "http.response.body", "body": b""})
        body, content_type = own or self.artifacts[key]
        headers = [("Content-Type", content_type)]
        if self.etags:
            headers.append(("ETag", f'"{hashlib.sha256(body).hexdigest()}"'))
        if self.compress is not None:
            body = _compressed(self.compress, body)
            headers.append(("Content-Encoding", self.compress))
        if not (fault and fault.chunked):
            headers.append(("Content-Length", str(len(body))))
        await self._start(send, 200, headers)
        if fault and fault.cut_at is not None:
            sent = 0
            if fault.hold_middle and fault.hold_at is not None:  # hold, then cut
                sent = fault.hold_at
                await send({"type": "http.response.body", "body": body[:sent], "more_body": True})
                await _wait(fault.hold_middle)
            await send(
                {
                    "type": "http.response.body",
                    "body": body[sent : fault.cut_at],
                    "more_body": True,
                }
            )
            raise ConnectionAbortedError("stand-in cut the body on purpose")
        if fault and fault.drip is not None:
            for index in range(len(body)):
                await send(
                    {
                        "type": "http.response.body",
                        "body": body[index : index + 1],
                        "more_body": index + 1 < len(body),
                    }
                )
                await asyncio.sleep(fault.drip)
            return
        if fault and fault.hold_middle:
            half = len(body) // 2 if fault.hold_at is None else fault.hold_at
            await send({"type": "http.response.body", "body": body[:half], "more_body": True})
            await _wait(fault.hold_middle)
            await send({"type": "http.response.body", "body": body[half:]})
            return
        for start in range(0, max(len(body), 1), 1024 * 1024):
            chunk = body[start : start + 1024 * 1024]
            more = start + 1024 * 1024 < len(body)
            await send({"type": "http.response.body", "body": chunk, "more_body": more})

    async def _generated(self, send: Send, token: str, key: tuple[str, str, str]) -> None:
        kind, scope_id, object_id = key
        prefix, _, rest = object_id.partition("_")
        size_text = str(self.generated_sizes.get(object_id, rest.split("_", 1)[0]))
        if (kind, scope_id) not in self.tokens[token] or not size_text.isdigit():
            return await self._json(send, 404, {"detail": f"Artifact {object_id} not found"})
        with self._lock:
            first_time = key not in self._spent_faults
            self._spent_faults.add(key)
        if first_time and "flaky" in object_id:
            return await self._json(send, 503, {"detail": "Service Unavailable"})
        size = int(size_text)
        content_type = CONTENT_TYPES.get(prefix, "application/octet-stream")
        await self._start(
            send, 200, [("Content-Type", content_type), ("Content-Length", str(size))]
        )
        cut = size // 2 if first_time and "cut" in object_id else None
        for offset, chunk in generated_chunks("/".join(key), size):
            if cut is not None and offset + len(chunk) > cut:
                await send(
                    {"type": "http.response.body", "body": chunk[: cut - offset], "more_body": True}
                )
                raise ConnectionAbortedError("stand-in cut the body on purpose")
            more = offset + len(chunk) < size
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
            if self.bandwidth:
                await asyncio.sleep(len(chunk) / self.bandwidth)

    async def _list(self, send: Send, token: str, query: dict[str, str]) -> None:
        kind, scope_id = (
            ("session", query["session_id"])
            if "session_id" in query
            else ("execution", query.get("execution_id", ""))
        )
        if (kind, scope_id) not in self.tokens[token]:
            return await self._json(send, 404, {"detail": "Not found"})
        items = [
            {"object_id": obj, "filename": f"{obj}.bin", "source": "store"}
            for (k, s, obj) in self.artifacts
            if (k, s) == (kind, scope_id)
        ]
        items += self.extra_list_items
        await self._json(send, 200, {"namespace_id": scope_id, "items": items})

    async def _chat(
        self, send: Send, request: dict[str, Any], gzip_ok: bool = False, token: str = ""
    ) -> None:
        session_id = self.chat_session
        if self.chat_fresh_sessions:
            self._chats += 1
            session_id = f"{self.chat_session}-{self._chats}"
            self.generated_scopes.add(("session", session_id))
            self.grant(token, "session", session_id)
        chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "session_id": session_id}
        coder = zlib.compressobj(wbits=16 + zlib.MAX_WBITS) if gzip_ok else None
        coding = [("Content-Encoding", "gzip")] if coder else []
        if not request.get("stream"):
            answer = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": request.get("model", "vlmrun-orion-1"),
                "session_id": session_id,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": self.chat_content},
                    }
                ],
            }
            body = json.dumps(answer).encode()
            if coder:
                body = coder.compress(body) + coder.flush()
            await self._start(
                send,
                200,
                [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *coding],
            )
            return await send({"type": "http.response.body", "body": body})
        await self._start(
            send,
            200,
            [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"), *coding],
        )

        async def out(data: bytes, more: bool = True) -> None:
            if coder:
                mode = zlib.Z_SYNC_FLUSH if more else zlib.Z_FINISH
                data = coder.compress(data) + coder.flush(mode)
            await send({"type": "http.response.body", "body": data, "more_body": more})

        for raw in self.chat_raw_events:
            await out(raw)
        for index, word in enumerate(self.chat_deltas):
            delta: dict[str, Any] = {} if word is None else {"content": word}
            if index < len(self.chat_tool_arguments):
                call = {"index": 0, "function": {"arguments": self.chat_tool_arguments[index]}}
                delta["tool_calls"] = [call]
            event = {**chunk, "created": 1, "model": "vlmrun-orion-1"}
            last = index == len(self.chat_deltas) - 1
            event["choices"] = [
                {"index": 0, "delta": delta, "finish_reason": "stop" if last else None}
            ]
            await out(f"data: {json.dumps(event)}\n\n".encode())
            if index == 0 and self.sse_gate is not None:
                await _wait(self.sse_gate)
            if self.chat_event_delay:
                await asyncio.sleep(self.chat_event_delay)
        await out(b"data: [DONE]\n\n", more=False)

    async def _upload(
        self, send: Send, receive: Receive, headers: dict[str, str], query: dict[str, str]
    ) -> None:
        if not headers.get("content-type", "").startswith("multipart/form-data"):
            return await self._json(send, 422, _missing("file"))
        sha256, size, largest = hashlib.sha256(), 0, 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            sha256.update(chunk)
            size += len(chunk)
            largest = max(largest, len(chunk))
            if not message.get("more_body"):
                break
        record = {
            "id": f"file-{len(self.uploads)}",
            "bytes": size,
            "sha256": sha256.hexdigest(),
            "purpose": query.get("purpose"),
            "largest_chunk": largest,
        }
        self.uploads.append(record)
        await self._json(send, 201, record)


def _compressed(encoding: str, body: bytes) -> bytes:
    if encoding == "deflate":
        return zlib.compress(body)
    coder = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    return coder.compress(body) + coder.flush()


def _missing(name: str) -> dict[str, Any]:
    return {"detail": [{"loc": ["query", name], "msg": "Field required", "type": "missing"}]}


async def _read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _wait(event: threading.Event) -> None:
    """Wait for a test-controlled event without blocking the server's loop."""
    while not event.is_set():
        await asyncio.to_thread(event.wait, 0.5)


def main() -> None:
    """Serve a stand-in on 127.0.0.1 for benchmarks: ``python -m tests.standin --port N``."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", default="bench-token")
    parser.add_argument("--scope", default="sess_bench", help="a generated session")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per artifact request")
    parser.add_argument("--bandwidth", type=float, default=0.0, help="bytes/s per artifact answer")
    parser.add_argument(
        "--chat-refs",
        default="",
        help="completions name these generated artifacts: id=size,id=size (each in a new session)",
    )
    parser.add_argument("--chat-tail", type=int, default=0, help="SSE events after the refs")
    parser.add_argument("--chat-event-delay", type=float, default=0.0, help="seconds per event")
    args = parser.parse_args()
    api = StandIn()
    api.grant(args.token, "session", args.scope)
    api.generated_scopes.add(("session", args.scope))
    api.latency = args.latency
    api.bandwidth = args.bandwidth
    if args.chat_refs:
        sizes = dict(item.split("=", 1) for item in args.chat_refs.split(","))
        api.generated_sizes = {name: int(size) for name, size in sizes.items()}
        api.chat_session = args.scope
        api.chat_fresh_sessions = True
        api.chat_content = " ".join(api.generated_sizes)
        api.chat_deltas = ["Here they are: ", *(f"{name} " for name in sizes)]
        api.chat_deltas += ["and some more words. "] * args.chat_tail
        api.chat_event_delay = args.chat_event_delay
    uvicorn.run(
        api, host="127.0.0.1", port=args.port, http="h11", log_level="warning", lifespan="on"
    )


if __name__ == "__main__":
    main()
