"""The access log: one line per request on stdout, written by a background thread.

Each line has the method, the route, the status, the outcome, the body bytes sent and the time
from the request's arrival to its last byte. On the artifact route (``GET /v1/artifacts``) it
adds the scope kind, scope id and object id parsed from the query; on every other route it shows
the path without its query string. It never holds a header value (no token, no cookie) nor any
other query value.

Outcomes, read from the response as a client sees it (the routes know nothing of this log):

* ``offline``: answered by the proxy itself while the API was unreachable (``X-Cache:
  OFFLINE``, e.g. the SDK's ``/v1/health``), whatever the status;
* ``error``: the status is 400 or more;
* ``aborted``: no response, or one cut before its last byte (a broken upstream, a failed
  integrity check, a client that left); status 0 when no response was sent;
* on the artifact route, its ``X-Cache`` (``hit``, ``miss``, ``coalesced``, ``offline``), or
  ``bypass`` without one (``filename=`` lookups, fetches streamed through uncached);
* ``-`` on the proxy's own endpoints (``/healthz``, ``/readyz``, ``/metrics``), ``pass`` on
  everything passed through.

Formats (``log_format``), ``text`` then ``json`` (one line each)::

    2025-01-06T10:00:00.123Z GET /v1/artifacts 200 hit 8192B 0.41ms session=sess_1 object=img_2
    {"ts": "2025-01-06T10:00:00.123Z", "method": "GET", "route": "/v1/artifacts", "status": 200,
     "outcome": "hit", "bytes": 8192, "ms": 0.41, "scope_kind": "session", "scope_id": "sess_1",
     "object_id": "img_2"}

JSON lines always carry every field of :data:`FIELDS` (the scope fields are null off the
artifact route). ``ts`` is when the response ended, in UTC.

Cost on the event loop: a few attribute reads and one put of a tuple on a queue per request.
Everything else, parsing the artifact key and formatting included, happens in the writer thread,
which writes batches with one ``write`` each, cut at line ends and at most ``PIPE_BUF`` bytes,
so that the lines of several worker processes sharing stdout never interleave. (Not the logging
module: a ``LogRecord`` costs microseconds on the event loop per request.) If stdout cannot keep
up, lines beyond :data:`MAX_PENDING` are dropped and counted rather than held in memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.errors import ProxyError
from proxy.keys import parse_key

log = logging.getLogger(__name__)

#: Every JSON line has these fields, in this order.
FIELDS = (
    "ts",
    "method",
    "route",
    "status",
    "outcome",
    "bytes",
    "ms",
    "scope_kind",
    "scope_id",
    "object_id",
)
ARTIFACT_ROUTE = "/v1/artifacts"
OWN_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
_OUTCOMES = {b"HIT": "hit", b"MISS": "miss", b"COALESCED": "coalesced", b"OFFLINE": "offline"}
#: Records waiting for the writer at most; more are dropped (and counted) instead of queued.
MAX_PENDING = 100_000
#: Largest write that a pipe takes whole, so that workers' lines never interleave.
ATOMIC_WRITE = getattr(select, "PIPE_BUF", 512)
#: The writer collects records for this long before writing them in one go (seconds).
LINGER = 0.05

#: What the wrapper records per request: (method, raw path, the query on the artifact route else
#: None, status, X-Cache, body bytes sent, whether the body ended, whether the app raised,
#: seconds taken, end time).
Record = tuple[str, str, bytes | None, int, bytes, int, bool, bool, float, float]


class AccessLog:
    """Pure ASGI middleware: one :data:`Record` per HTTP request, handed to ``writer``."""

    def __init__(self, app: ASGIApp, writer: AccessLogWriter) -> None:
        self.app = app
        self.put = writer.put

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        artifact = scope["path"] == ARTIFACT_ROUTE and scope["method"] == "GET"
        status = 0
        cache = b""
        sent = 0
        complete = False
        finished = 0.0  # when the last body byte was handed to the server

        async def logged(message: Message) -> None:
            nonlocal status, cache, sent, complete, finished
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                if not message.get("more_body", False):
                    complete = True
                    finished = time.perf_counter()
            elif message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):  # the offline /v1/health too
                    if name.lower() == b"x-cache":
                        cache = value
            await send(message)

        failed = False
        try:
            await self.app(scope, receive, logged)
        except BaseException:
            failed = True
            raise
        finally:
            path = scope.get("raw_path") or scope["path"]
            self.put(
                (
                    scope["method"],
                    path.decode("latin-1") if isinstance(path, bytes) else path,
                    scope["query_string"] if artifact else None,
                    status,
                    cache,
                    sent,
                    complete,
                    failed,
                    (finished or time.perf_counter()) - started,  # not background tasks
                    time.time(),
                )
            )


def outcome(route: str, artifact: bool, status: int, cache: bytes, complete: bool) -> str:
    """The outcome word of a request; see the module docstring for the rules."""
    if cache == b"OFFLINE":  # answered by the proxy itself while the API is unreachable
        return "offline"
    if status >= 400:
        return "error"
    if not complete:
        return "aborted"
    if artifact:
        return _OUTCOMES.get(cache, "bypass")
    return "-" if route in OWN_ROUTES else "pass"


def fields(record: Record) -> dict[str, Any]:
    """A record as the named fields of :data:`FIELDS`."""
    method, route, query, status, cache, sent, complete, failed, seconds, ended = record
    if failed and status == 0:  # the server answers 500 for an app that raised before answering
        status = 500
    artifact = query is not None
    key = None
    if query is not None:
        route = ARTIFACT_ROUTE  # as routed, however the path was spelled on the wire
        with contextlib.suppress(ProxyError):  # a malformed query shows no ids
            key = parse_key(query)
    return {
        "ts": _timestamp(ended),
        "method": method,
        "route": route,
        "status": status,
        "outcome": outcome(route, artifact, status, cache, complete),
        "bytes": sent,
        "ms": round(seconds * 1000, 3),
        "scope_kind": key.scope_kind if key else None,
        "scope_id": key.scope_id if key else None,
        "object_id": key.object_id if key else None,
    }


def _timestamp(when: float) -> str:
    seconds = int(when)
    millis = int((when - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _word(value: str) -> str:
    """``value`` as one space-free, printable word of a text line (quoted JSON if need be)."""
    if value and value.isprintable() and " " not in value and '"' not in value:
        return value
    return json.dumps(value)


def format_text(record: Record) -> str:
    f = fields(record)
    line = (
        f"{f['ts']} {_word(f['method'])} {_word(f['route'])} {f['status']} {f['outcome']} "
        f"{f['bytes']}B {f['ms']:.2f}ms"
    )
    if f["scope_kind"] is not None:
        line += f" {f['scope_kind']}={_word(f['scope_id'])} object={_word(f['object_id'])}"
    return line


def format_json(record: Record) -> str:
    return json.dumps(fields(record), separators=(", ", ": "))


FORMATS: dict[str, Callable[[Record], str]] = {"text": format_text, "json": format_json}


def stdout_sink() -> Callable[[bytes], None]:
    """Write bytes to stdout's file descriptor, each call with one ``write`` when it fits."""
    stream = sys.stdout
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # no descriptor (replaced, or no stdout)

        def write_stream(data: bytes) -> None:
            if stream is not None:
                stream.write(data.decode())
                stream.flush()

        return write_stream

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write


class AccessLogWriter:
    """A queue of records and the thread that formats and writes them.

    :meth:`put` may be called from the event loop (it never blocks); :meth:`start` and
    :meth:`stop` from the lifespan. Records put before ``stop`` are written before it returns.
    """

    def __init__(self, log_format: str, sink: Callable[[bytes], None] | None = None) -> None:
        self._format = FORMATS[log_format]
        self._sink = sink
        self._queue: queue.SimpleQueue[Record | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: Records dropped since the last report (a count: races only make it approximate).
        self.dropped = 0
        self._failed = False

    def put(self, record: Record) -> None:
        if self._queue.qsize() < MAX_PENDING:
            self._queue.put(record)
        else:
            self.dropped += 1

    def start(self) -> None:
        if self._sink is None:
            self._sink = stdout_sink()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        stopping = False
        while not stopping:
            records = [self._queue.get()]
            time.sleep(LINGER)  # a busy server: one write for many lines
            with contextlib.suppress(queue.Empty):
                while True:
                    records.append(self._queue.get_nowait())
            if None in records:
                stopping = True
            self._write([r for r in records if r is not None])

    def _write(self, records: list[Record]) -> None:
        lines = []
        for record in records:
            try:
                lines.append(self._format(record).encode() + b"\n")
            except Exception:  # one odd record must not end the log
                log.exception("cannot format an access log record")
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            log.warning("stdout is too slow: %d access log lines dropped", dropped)
        chunk = b""
        for line in lines:
            if chunk and len(chunk) + len(line) > ATOMIC_WRITE:
                self._emit(chunk)
                chunk = b""
            chunk += line
        if chunk:
            self._emit(chunk)

    def _emit(self, data: bytes) -> None:
        assert self._sink is not None
        try:
            self._sink(data)
        except OSError as exc:  # stdout closed or full disk: keep serving, say it once
            if not self._failed:
                self._failed = True
                log.warning("cannot write the access log: %s", exc)
