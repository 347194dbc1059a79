"""The access log: one line per request on stdout, written by a background thread.

Each line has the method, the route, the status, the outcome, the body bytes sent and the time
from the request's arrival to its last byte. On the artifact route (``GET /v1/artifacts``) it
adds the scope kind, scope id and object id, as that route parsed them (it leaves its key in the
ASGI scope under :data:`KEY_IN_SCOPE`; a malformed query shows none); on every other route it
shows the path without its query string. It never holds a header value (no token, no cookie)
nor any other query value.

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

Cost, measured with bench/accesslog.py (8 KiB hits, one worker pinned to one core): about
7 us of CPU per request when it was measured (numbers in the README). Built so:

* On the event loop: a wrapped ``send`` (a plain function returning the server's awaitable, so
  no extra coroutine per message), and the line formatted at once from the record's values
  (about 1 us; see :class:`AccessLogWriter` for why not later, in the writer). Not the logging
  module (a ``LogRecord`` alone costs about 6 us), no second parse of the query.
* Lines wait as strings, which the garbage collector does not track: a few hundred live tuples
  per batch set off its full collections (a pause of ~20 ms every few seconds).
* The writer thread wakes at most every :data:`LINGER` seconds and writes each batch with one
  ``write``: each wake-up and each write hands the interpreter lock back and forth. With
  several worker processes sharing stdout, writes are cut at line ends within ``PIPE_BUF``
  instead, so that their lines never interleave.
* If stdout cannot keep up, records beyond :data:`MAX_PENDING` lines or
  :data:`MAX_PENDING_CHARS` characters are dropped and counted.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from proxy.keys import ArtifactKey

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
_OUTCOMES = {
    b"HIT": "hit",
    b"MISS": "miss",
    b"COALESCED": "coalesced",
    b"OFFLINE": "offline",
    b"PREFETCH": "prefetch",  # a fetch the proxy made itself (proxy/prefetch), method PREFETCH
}
#: Lines waiting for the writer at most; more are dropped (and counted), not held.
MAX_PENDING = 100_000
#: Characters of the lines waiting for the writer at most (as many bytes, but for printable
#: non-ASCII ids in text lines). A client chooses how long its line is (a path of quotes, each
#: escaped, is twice its request line; ids of non-ASCII characters, each ``\\uXXXX``, kilobytes):
#: counting lines alone would let a stdout that blocks pin gigabytes of each worker.
MAX_PENDING_CHARS = 16 * 1024**2
#: Largest write that a pipe takes whole, so that workers' lines never interleave.
ATOMIC_WRITE = getattr(select, "PIPE_BUF", 512)
#: The writer collects records for this long before writing them in one go (seconds).
LINGER = 0.05

#: Where the artifact route leaves the key it parsed (None for ``filename=``) in the ASGI scope.
KEY_IN_SCOPE = "vlmrun_cache.artifact_key"

#: What the wrapper records per request, in this order: method, raw path, whether it is the
#: artifact route, the scope kind, scope id and object id that route parsed (or None), status,
#: X-Cache, body bytes sent, whether the body ended, whether the app raised, and start and end
#: on the ``time.perf_counter`` clock. Atomic values only (see the module docstring).
Record = tuple[
    str,
    bytes | str,
    bool,
    str | None,
    str | None,
    str | None,
    int,
    bytes,
    int,
    bool,
    bool,
    float,
    float,
]


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
        finished = 0.0  # when the last body byte was handed to the server

        # Not ``async def``: it returns the server's own awaitable, so each message costs no
        # extra coroutine (the app awaits what this returns).
        def logged(message: Message) -> Awaitable[None]:
            nonlocal status, cache, sent, finished
            kind = message["type"]
            if kind == "http.response.body":
                sent += len(message.get("body", b""))
                if not message.get("more_body", False):
                    finished = time.perf_counter()
            elif kind == "http.response.start":
                status = message["status"]
                cache = _x_cache(message.get("headers", ()))  # the offline /v1/health too
            return send(message)

        failed = False
        try:
            await self.app(scope, receive, logged)
        except BaseException:
            failed = True
            raise
        finally:
            self.put(
                record(
                    scope["method"],
                    scope.get("raw_path") or scope["path"],
                    artifact,
                    scope.get(KEY_IN_SCOPE) if artifact else None,
                    status,
                    cache,
                    sent,
                    finished != 0.0,
                    failed,
                    started,
                    finished or time.perf_counter(),  # the last byte, not background tasks
                )
            )


def record(
    method: str,
    path: bytes | str,
    artifact: bool,
    key: ArtifactKey | None,
    status: int,
    cache: bytes,
    sent: int,
    complete: bool,
    failed: bool,
    started: float,
    ended: float,
) -> Record:
    """A :data:`Record`; ``key`` is the one the artifact route parsed (None elsewhere)."""
    ids = (None, None, None) if key is None else (key.scope_kind, key.scope_id, key.object_id)
    return (method, path, artifact, *ids, status, cache, sent, complete, failed, started, ended)


def _x_cache(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The ``X-Cache`` value as the artifact route writes it: spelled so, the last header."""
    items: list[tuple[bytes, bytes]] = headers if isinstance(headers, list) else list(headers)
    for name, value in reversed(items):
        if name == b"X-Cache":
            return value
    return b""


# -- formatting: every microsecond here is one the server does not get ------------------------


def _status_and_outcome(
    route: str, artifact: bool, status: int, cache: bytes, complete: bool, failed: bool
) -> tuple[int, str]:
    """The status to show and the outcome word; see the module docstring for the rules."""
    if failed and status == 0:  # the server answers 500 for an app that raised before answering
        return 500, "error"
    if cache == b"OFFLINE":  # answered by the proxy itself while the API is unreachable
        return status, "offline"
    if status >= 400:
        return status, "error"
    if not complete:
        return status, "aborted"
    if artifact:
        return status, _OUTCOMES.get(cache, "bypass")
    return status, "-" if route in OWN_ROUTES else "pass"


@functools.lru_cache(maxsize=64)
def _timestamp(millis: int) -> str:
    """``2025-01-06T10:00:00.123Z`` for milliseconds since the epoch (UTC)."""
    seconds, millis = divmod(millis, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _word(value: str) -> str:
    """``value`` as one space-free, printable word of a text line (quoted JSON if need be)."""
    if value.isprintable() and " " not in value and '"' not in value and value:
        return value
    return _quoted(value)


#: A JSON string literal, ASCII only (json's own C encoder).
_quoted: Callable[[str], str] = json.encoder.encode_basestring_ascii


@functools.lru_cache(maxsize=4096)  # hits repeat keys: that is what a cache is for
def _text_ids(kind: str, scope_id: str, object_id: str) -> str:
    return f" {kind}={_word(scope_id)} object={_word(object_id)}"


@functools.lru_cache(maxsize=4096)
def _json_ids(kind: str | None, scope_id: str | None, object_id: str | None) -> str:
    if kind is None or scope_id is None or object_id is None:
        return '"scope_kind": null, "scope_id": null, "object_id": null'
    return (
        f'"scope_kind": {_quoted(kind)}, "scope_id": {_quoted(scope_id)}, '
        f'"object_id": {_quoted(object_id)}'
    )


def _route(path: bytes | str, artifact: bool) -> str:
    """The artifact route as routed (however its path was spelled), else the raw path."""
    if artifact:
        return ARTIFACT_ROUTE
    return path.decode("latin-1") if isinstance(path, bytes) else path


class Formatter:
    """Turns records into lines; ``clock`` maps the ``perf_counter`` clock to the epoch."""

    def __init__(self) -> None:
        self.clock = time.time() - time.perf_counter()

    def sync(self) -> None:
        """Follow changes of the wall clock (call once per batch)."""
        self.clock = time.time() - time.perf_counter()

    def fields(self, record: Sequence[Any]) -> dict[str, Any]:
        """A :data:`Record` as the named fields of :data:`FIELDS` (what a JSON line holds)."""
        (method, path, artifact, kind, sid, oid, status, cache, sent, done, failed, t0, t1) = record
        route = _route(path, artifact)
        status, word = _status_and_outcome(route, artifact, status, cache, done, failed)
        return {
            "ts": _timestamp(int((self.clock + t1) * 1000)),
            "method": method,
            "route": route,
            "status": status,
            "outcome": word,
            "bytes": sent,
            "ms": round((t1 - t0) * 1000, 3),
            "scope_kind": kind,
            "scope_id": sid,
            "object_id": oid,
        }

    def text(self, record: Sequence[Any]) -> str:
        (method, path, artifact, kind, sid, oid, status, cache, sent, done, failed, t0, t1) = record
        route = _route(path, artifact)
        status, word = _status_and_outcome(route, artifact, status, cache, done, failed)
        line = (
            f"{_timestamp(int((self.clock + t1) * 1000))} {_word(method)} {_word(route)} "
            f"{status} {word} {sent}B {(t1 - t0) * 1000:.2f}ms"
        )
        return line if kind is None else line + _text_ids(kind, sid, oid)

    def json(self, record: Sequence[Any]) -> str:
        """The same as ``json.dumps(self.fields(record))``, in a third of the time."""
        (method, path, artifact, kind, sid, oid, status, cache, sent, done, failed, t0, t1) = record
        route = _route(path, artifact)
        status, word = _status_and_outcome(route, artifact, status, cache, done, failed)
        return (
            f'{{"ts": "{_timestamp(int((self.clock + t1) * 1000))}", '
            f'"method": {_quoted(method)}, "route": {_quoted(route)}, "status": {status}, '
            f'"outcome": "{word}", "bytes": {sent}, "ms": {round((t1 - t0) * 1000, 3)!r}, '
            f"{_json_ids(kind, sid, oid)}}}"
        )


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
    """The lines waiting to be written, and the thread that writes them.

    :meth:`put` runs on the event loop and never blocks for long: it formats the record (about
    1 us) and appends the line to a list under a lock that the writer holds only to swap that
    list for an empty one, and wakes the writer when the list was empty. :meth:`start` and
    :meth:`stop` are for the lifespan; records put before ``stop`` are written before it
    returns.

    Lines are formatted as they are put, not by the writer: formatting takes the interpreter
    lock either way, and a writer formatting a busy server's batch at once (2,400 lines, 3 ms,
    at 48k requests/s) kept the event loop off its core for that long every batch, which was
    most of the p99 at 32 connections (4.4 ms, against 1.3 ms without the log). So the wall
    clock is followed as the first line of each batch is put, not as the batch is written: the
    first line after a laptop's sleep (the clock that stamps records stood still through it)
    would otherwise be stamped hours early.
    """

    def __init__(
        self,
        log_format: str,
        sink: Callable[[bytes], None] | None = None,
        shared: bool = False,
    ) -> None:
        """``sink`` takes the bytes (default: stdout); ``shared`` says other processes write
        to it too (``--workers``), so writes are cut at line ends within ``PIPE_BUF``."""
        self._formatter = Formatter()
        self._format: Callable[[Sequence[Any]], str] = getattr(self._formatter, log_format)
        self._sink = sink
        self._shared = shared
        self._lines: list[str] = []
        #: Characters in ``_lines``.
        self._chars = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: Records dropped since the last report.
        self.dropped = 0
        self._failed = False

    def put(self, record: Record) -> None:
        if not self._lines:  # a new batch: follow the wall clock (a racy look only costs one)
            self._formatter.sync()
        try:
            line = self._format(record)
        except Exception:  # one odd record must not end the log
            log.exception("cannot format an access log record")
            return
        with self._lock:
            lines = self._lines
            if len(lines) >= MAX_PENDING or self._chars + len(line) > MAX_PENDING_CHARS:
                self.dropped += 1
                return
            lines.append(line)
            self._chars += len(line)
            first = len(lines) == 1
        if first:
            self._wake.set()

    def start(self) -> None:
        if self._sink is None:
            self._sink = stdout_sink()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if not self._stopping:
                time.sleep(LINGER)  # a busy server: one write for many lines
            self._wake.clear()  # before the swap: a put after it wakes the next round
            self._flush()
            if self._stopping:  # read after the clear: a stop cannot be missed
                self._flush()
                return

    def _flush(self) -> None:
        with self._lock:
            lines, self._lines, self._chars = self._lines, [], 0
            dropped, self.dropped = self.dropped, 0
        self._write(lines, dropped)

    def _write(self, lines: list[str], dropped: int) -> None:
        if dropped:
            log.warning("stdout is too slow: %d access log lines dropped", dropped)
        if not lines:
            return
        if not self._shared:
            self._emit(("\n".join(lines) + "\n").encode())
            return
        chunk: list[bytes] = []
        size = 0
        for text in lines:
            line = (text + "\n").encode()
            if chunk and size + len(line) > ATOMIC_WRITE:
                self._emit(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._emit(b"".join(chunk))

    def _emit(self, data: bytes) -> None:
        assert self._sink is not None
        try:
            self._sink(data)
        except OSError as exc:  # stdout closed or full disk: keep serving, say it once
            if not self._failed:
                self._failed = True
                log.warning("cannot write the access log: %s", exc)
