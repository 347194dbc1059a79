"""The access log: one line per request on stdout, in text or JSON, with no secret in it."""

from __future__ import annotations

import datetime
import json
import logging
import re
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.accesslog import FIELDS, AccessLogWriter, Formatter, Record
from tests.conftest import SESSION, TOKEN
from tests.helpers import auth
from tests.servers import Daemon, ServerThread
from tests.standin import StandIn

WRONG_TOKEN = "key-wrong-999"
#: A query value of a passed-through route: it must not reach the log.
QUERY_SECRET = "sess_query_value_7f3a"

_TEXT_LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<method>[A-Z]+) (?P<route>\S+) "
    r"(?P<status>\d+) (?P<outcome>\S+) (?P<bytes>\d+)B (?P<ms>\d+\.\d\d)ms"
    r"(?: (?P<scope_kind>session|execution)=(?P<scope_id>\S+) object=(?P<object_id>\S+))?$"
)


def parse_access_log(output: str, log_format: str) -> list[dict[str, Any]]:
    """The access log lines in ``output`` (the daemon's other log lines are skipped), as dicts
    with the JSON field names; text lines are parsed into the same shape."""
    found = []
    for line in output.splitlines():
        if log_format == "json" and line.startswith("{"):
            found.append(json.loads(line))
        elif log_format == "text" and (match := _TEXT_LINE.match(line)):
            record: dict[str, Any] = match.groupdict()
            for name in ("status", "bytes"):
                record[name] = int(record[name])
            record["ms"] = float(record["ms"])
            found.append(record)
    return found


StartDaemon = Callable[..., Daemon]


def _listening(daemon: Daemon, timeout: float = 60) -> bool:
    """Dial until the daemon accepts connections (start-up, not a race: at log level warning
    it prints nothing that says it is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and daemon.process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=1):
                return True
        except OSError:
            time.sleep(0.02)
    return False


@pytest.fixture
def start_daemon(upstream: ServerThread, cache_dir: Path) -> Iterator[StartDaemon]:
    """``python -m proxy serve`` against the stand-in, with extra flags; stopped at the end."""
    started: list[Daemon] = []

    def start(*args: str) -> Daemon:
        daemon = Daemon("--upstream", upstream.url, "--cache-dir", str(cache_dir), *args)
        started.append(daemon)
        assert _listening(daemon), daemon.output
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.kill()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_one_line_per_request_with_outcome_bytes_and_ids(
    log_format: str, standin: StandIn, start_daemon: StartDaemon
) -> None:
    """A miss, a hit, a refused token, a passthrough with a query and /healthz each log one
    line with method, route, status, outcome, body bytes and time; artifact lines name the
    scope and object, other lines show the path without its query; no token or query value."""
    daemon = start_daemon("--log-format", log_format)
    body = standin.add("session", SESSION, "img_a11a11")
    url = f"{daemon.url}/v1/artifacts?object_id=img_a11a11&session_id={SESSION}"
    assert httpx.get(url, headers=auth()).headers["x-cache"] == "MISS"
    assert httpx.get(url, headers=auth()).headers["x-cache"] == "HIT"
    assert httpx.get(url, headers=auth(WRONG_TOKEN)).status_code == 401
    health = f"{daemon.url}/v1/health?check={QUERY_SECRET}"
    assert httpx.get(health, headers=auth()).status_code == 200
    assert httpx.get(f"{daemon.url}/healthz").status_code == 200
    assert daemon.wait_for("/healthz"), daemon.output

    lines = parse_access_log(daemon.output, log_format)
    assert [(r["method"], r["route"], r["status"], r["outcome"]) for r in lines] == [
        ("GET", "/v1/artifacts", 200, "miss"),
        ("GET", "/v1/artifacts", 200, "hit"),
        ("GET", "/v1/artifacts", 401, "error"),
        ("GET", "/v1/health", 200, "pass"),
        ("GET", "/healthz", 200, "-"),
    ]
    assert [r["bytes"] for r in lines[:2]] == [len(body), len(body)]
    for record in lines[:3]:
        assert (record["scope_kind"], record["scope_id"], record["object_id"]) == (
            "session",
            SESSION,
            "img_a11a11",
        )
    for record in lines[3:]:
        assert record.get("scope_kind") is None and record.get("object_id") is None
    for record in lines:
        assert record["ms"] >= 0
        assert datetime.datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
        if log_format == "json":
            assert tuple(record) == FIELDS
    assert daemon.stop()
    for secret in (TOKEN, WRONG_TOKEN, QUERY_SECRET):
        assert secret not in daemon.output
    assert "HTTP/1.1" not in daemon.output  # uvicorn's own access log is off


def test_an_empty_artifact_fetched_whole_is_logged_as_delivered(
    standin: StandIn, start_daemon: StartDaemon
) -> None:
    """A miss of a 0-byte artifact is whole once its head is sent (Content-Length: 0): a
    client that closes its connection then, before the fill has committed, got all of it, and
    the line says ``miss``, not ``aborted``."""
    daemon = start_daemon()
    standin.add("session", SESSION, "arr_e0e0e0", size=0)
    url = f"{daemon.url}/v1/artifacts?object_id=arr_e0e0e0&session_id={SESSION}"
    with httpx.Client() as client:
        first = client.get(url, headers=auth())
    assert (first.status_code, first.headers["x-cache"], first.content) == (200, "MISS", b"")
    assert httpx.get(f"{daemon.url}/healthz").status_code == 200
    assert daemon.wait_for("/healthz"), daemon.output
    (line,) = [r for r in parse_access_log(daemon.output, "text") if r["route"] == "/v1/artifacts"]
    assert (line["status"], line["outcome"], line["bytes"]) == (200, "miss", 0)


@pytest.mark.parametrize(
    ("flags", "logged"),
    [(["--log-level", "warning"], True), (["--access-log", "false"], False)],
    ids=["quiet-log-level", "access-log-off"],
)
def test_the_access_log_has_its_own_switch(
    flags: list[str], logged: bool, start_daemon: StartDaemon
) -> None:
    """log_level=warning does not silence the access log; access_log=false does (lines still
    queued are written before the server exits, so stopping it settles the question)."""
    daemon = start_daemon(*flags)
    assert httpx.get(f"{daemon.url}/healthz").status_code == 200
    daemon.stop()  # at log level warning, uvicorn does not say it shut down gracefully
    assert daemon.process.returncode in (0, -signal.SIGTERM)
    assert bool(parse_access_log(daemon.output, "text")) is logged, daemon.output


def _record(**changes: Any) -> Record:
    values: dict[str, Any] = {
        "method": "GET",
        "route": "/v1/files",
        "artifact": False,
        "scope_kind": None,
        "scope_id": None,
        "object_id": None,
        "status": 200,
        "cache": b"",
        "sent": 10,
        "complete": True,
        "failed": False,
        "began": 100.0,
        "ended": 100.001,
    }
    values.update(changes)
    return tuple(values.values())  # type: ignore[return-value]


FORMAT = Formatter()
fields, format_json, format_text = FORMAT.fields, FORMAT.json, FORMAT.text


KEY = {"scope_kind": "session", "scope_id": "s", "object_id": "a"}


@pytest.mark.parametrize(
    ("changes", "outcome", "status"),
    [
        ({"complete": False}, "aborted", 200),
        ({"status": 0, "complete": False}, "aborted", 0),
        ({"status": 0, "complete": False, "failed": True}, "error", 500),
        ({"artifact": True, **KEY, "cache": b"COALESCED"}, "coalesced", 200),
        ({"artifact": True, **KEY, "cache": b"OFFLINE"}, "offline", 200),
        ({"artifact": True}, "bypass", 200),
        ({"artifact": True, **KEY, "cache": b"HIT", "status": 416}, "error", 416),
        ({"route": "/metrics"}, "-", 200),
        ({"route": "/v1/health", "cache": b"OFFLINE"}, "offline", 200),
        ({"route": "/v1/health", "cache": b"OFFLINE", "status": 403}, "offline", 403),
    ],
)
def test_outcomes_follow_the_response(changes: dict[str, Any], outcome: str, status: int) -> None:
    """Status 400 or more is an error, a response cut short is aborted (status 0 if none was
    sent, 500 if the app raised first), else X-Cache names the outcome on the artifact route."""
    record = _record(**changes)
    assert (fields(record)["outcome"], fields(record)["status"]) == (outcome, status)
    assert json.loads(format_json(record)) == fields(record)
    parsed = parse_access_log(format_text(record), "text")[0]
    assert (parsed["outcome"], parsed["status"]) == (outcome, status)


def test_odd_characters_cannot_forge_a_line() -> None:
    """A path or id with spaces, quotes or line breaks is quoted: one request, one line, and
    the JSON line still parses to the same values."""
    line = format_text(_record(route='/v1/a b"\n{"x":1}'))
    assert "\n" not in line and ' "/v1/a b\\"\\n{\\"x\\":1}" 200 pass ' in line
    odd = _record(
        artifact=True, scope_kind="session", scope_id='s"1', object_id="a b\u2028", cache=b"HIT"
    )
    assert format_text(odd).endswith('session="s\\"1" object="a b\\u2028"')
    assert json.loads(format_json(odd)) == fields(odd)
    assert json.loads(format_json(odd))["object_id"] == "a b\u2028"


@pytest.mark.parametrize("shared", [False, True], ids=["one-process", "workers"])
def test_the_writer_keeps_order_and_flushes_on_stop(shared: bool) -> None:
    """Lines come out in the order requests ended, all written by the time stop returns: a batch
    in one write, or with several workers in writes a pipe takes whole, cut at line ends."""
    writes: list[bytes] = []
    writer = AccessLogWriter("json", writes.append, shared=shared)
    for n in range(500):  # before start: one batch, whatever the machine's speed
        writer.put(_record(route=f"/v1/files/{n}"))
    writer.start()
    writer.stop()
    lines = b"".join(writes).decode().splitlines()
    assert [json.loads(line)["route"] for line in lines] == [f"/v1/files/{n}" for n in range(500)]
    assert all(chunk.endswith(b"\n") for chunk in writes)
    if shared:
        assert len(writes) > 1 and all(len(chunk) <= select.PIPE_BUF for chunk in writes)
    else:
        assert len(writes) == 1


def test_a_line_put_after_the_wall_clock_jumped_is_stamped_with_the_new_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A laptop that slept: the monotonic clock (``perf_counter``, which stamps records) stood
    still while the wall clock ran on. Lines are formatted as they are put, so the first one
    put after the wake-up must already be stamped with the wall clock, not hours in the past
    (its batch has not been flushed yet, and the writer used to follow the clock only then)."""
    writes: list[bytes] = []
    writer = AccessLogWriter("json", writes.append)
    slept = 3 * 3600.0
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() + slept)  # the OS clock: a boundary
    ended = time.perf_counter()
    writer.put(_record(began=ended - 0.001, ended=ended))
    writer.start()
    writer.stop()
    (line,) = b"".join(writes).decode().splitlines()
    stamped = datetime.datetime.fromisoformat(json.loads(line)["ts"].replace("Z", "+00:00"))
    assert abs(stamped.timestamp() - (wall() + slept)) < 60


def test_lines_waiting_for_a_blocked_stdout_hold_a_bounded_size_however_long_they_are(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """stdout blocked (a stalled log collector, a paused terminal): lines wait, then are
    dropped and counted. The bound is on their size, not only their number: a request line of
    8 KiB of quotes (a GET with a body, refused by the proxy itself: no upstream needed) logs a
    16 KiB line, and 100,000 such lines would pin 1.6 GB of each worker's memory."""
    writes: list[bytes] = []
    writer = AccessLogWriter("text", writes.append)  # not started yet: nothing is written
    record = _record(route="/v1/" + '"' * 8000, status=400)
    assert len(format_text(record)) > 16_000
    for _ in range(3_000):  # 48 MB of lines
        writer.put(record)
    with caplog.at_level(logging.WARNING, logger="proxy.accesslog"):
        writer.start()
        writer.stop()
    written = b"".join(writes)
    assert 0 < len(written) <= 16 * 1024**2
    dropped = 3_000 - written.count(b"\n")
    assert dropped > 0 and f"{dropped} access log lines dropped" in caplog.text
