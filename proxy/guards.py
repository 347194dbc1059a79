"""Guards in front of the app, in uvicorn's protocol layer: header limits, a deadline for each
request head, and a cap on client connections.

They hold for both of uvicorn's HTTP/1.1 protocols (h11 and httptools), and act before a parser
buffers a head and before the app does any per-header work. What a client that trips one sees:

* a head over ``max_header_bytes``, a header line over ``max_header_line`` or more than
  ``max_headers`` fields: 431, and the connection closes (a request line over
  ``max_header_line``: 414);
* a head not complete ``header_timeout`` after its first byte: 408, and the connection closes;
* a connection beyond ``max_client_connections`` (per process): 503 at once, and it closes;
* a response its client has taken not one byte of for ``send_timeout`` while the connection's
  buffers are full (nginx's send_timeout): the connection is reset, and with it what the
  response held (its piece of the body, a fill's file, a waiter place). So is a connection
  closed (idle, or after a response) with bytes its client never takes: a close waits for
  them. A slow reader that keeps reading is never cut.

Answers are JSON in the API's shape, ``{"detail": "..."}``. A new connection that sends nothing
is closed after uvicorn's ``timeout_keep_alive``, like one idle between requests.

Two layers measure a head. :class:`HeadMeter` counts its bytes and lines as they arrive, before
the parser sees them, so a huge head costs neither memory nor parsing. It cannot know where the
next head starts inside a read that also ends a request (pipelining), so :class:`FieldCount`
checks the same limits on what the parser reports: the backstop for heads the meter missed.
:class:`ConnectionGuard` holds both for one connection, with its timers and refusals;
proxy/protocols.py plugs it into uvicorn's protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import http
import json
import logging
import socket
import struct
import termios
from collections.abc import Callable, Iterable

from uvicorn.server import ServerState

from proxy.config import Config
from proxy.errors import BadRequest, HeaderFieldsTooLarge, ProxyError, UriTooLong
from proxy.headers import CONTENT_LENGTH, CONTENT_TYPE

log = logging.getLogger(__name__)

#: After refusing a head, how long to keep reading (and dropping) what the client still sends.
#: Closing a socket with unread input makes the kernel send a reset, and the client would see
#: that instead of the answer.
LINGER_SECONDS = 2.0

_CR = 0x0D


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one client may ask of the server. Sizes are bytes, the timeout seconds."""

    #: Longest request head: request line, header fields and line ends.
    max_header_bytes: int
    #: Longest line of a head (request line or header field), without its line end.
    max_header_line: int
    #: Most header fields in one head.
    max_headers: int
    #: Most client connections open at once, per server process.
    max_client_connections: int
    #: Time from the first byte of a request head to its end.
    header_timeout: float
    #: Longest a response may wait for its client to read more of it.
    send_timeout: float = 60.0

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        return cls(
            max_header_bytes=config.max_header_bytes,
            max_header_line=config.max_header_line,
            max_headers=config.max_headers,
            max_client_connections=config.max_client_connections,
            header_timeout=config.header_timeout,
            send_timeout=config.send_timeout,
        )

    def check_line(self, length: int, request_line: bool) -> None:
        if length > self.max_header_line:
            if request_line:
                raise UriTooLong(f"Request line longer than {self.max_header_line} bytes")
            raise HeaderFieldsTooLarge(f"Header line longer than {self.max_header_line} bytes")

    def check_fields(self, count: int) -> None:
        if count > self.max_headers:
            raise HeaderFieldsTooLarge(f"More than {self.max_headers} header fields")

    def check_size(self, size: int) -> None:
        if size > self.max_header_bytes:
            raise HeaderFieldsTooLarge(f"Request head larger than {self.max_header_bytes} bytes")


class HeadMeter:
    """Measures a request head as its bytes arrive, before a parser buffers them.

    Lines end at LF (a CR before it is not part of the line); the head ends at the first empty
    line after the request line. Empty lines before the request line are skipped, as RFC 9112
    section 2.2 lets servers do. Bytes after the end of the head are not looked at.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.reset()

    def reset(self) -> None:
        """Expect a new head."""
        #: Bytes of the head so far, line ends included.
        self.size = 0
        #: Complete lines so far, empty ones before the request line not counted.
        self.lines = 0
        #: Bytes of the line in progress, its LF not yet seen.
        self.line = 0
        self.complete = False
        self._after_cr = False  # the last byte fed was a CR

    def feed(self, data: bytes) -> None:
        """Count ``data`` into the head; raise a :class:`ProxyError` when it passes a limit."""
        if self.size == 0 and self._whole(data):
            return
        start = 0
        while start < len(data) and not self.complete:
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline + 1
            self.size += end - start
            self.line += end - start
            if newline < 0:
                self._after_cr = data[-1] == _CR
                self.limits.check_line(self.line - self._after_cr, self.lines == 0)
                self.limits.check_size(self.size)
                return
            length = self.line - 1
            if length and (data[newline - 1] == _CR if newline > start else self._after_cr):
                length -= 1
            self.line = 0
            start = end
            if length == 0:
                self.complete = self.lines > 0
            else:
                self.limits.check_line(length, self.lines == 0)
                self.lines += 1
                self.limits.check_fields(self.lines - 1)
            self.limits.check_size(self.size)

    def _whole(self, data: bytes) -> bool:
        """The common case at C speed: a whole head in one piece, CRLF line ends, within every
        limit. False (nothing counted) sends ``data`` through the line-by-line meter, which
        also names the limit a head breaks."""
        end = data.find(b"\r\n\r\n")
        if end <= 0 or data[0] in b"\r\n":  # empty lines before the request line are skipped
            return False
        line_ends = data.count(b"\r\n", 0, end)
        if data.count(b"\n", 0, end) != line_ends:  # a bare LF ends a line too
            return False
        limits = self.limits
        if end + 4 > limits.max_header_bytes or line_ends > limits.max_headers:
            return False
        # No line is longer than the head; only a head longer than a line can hold one too long.
        if end > limits.max_header_line and max(map(len, data[:end].split(b"\r\n"))) > (
            limits.max_header_line
        ):
            return False
        self.size, self.lines, self.complete = end + 4, line_ends + 1, True
        return True


class FieldCount:
    """The limits on a head as its parser reports it: its target, then its fields one by one."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.reset()

    def reset(self) -> None:
        self.size = 0
        self.target_length = 0
        self.fields = 0
        self.last_line = 0

    def target(self, length: int) -> None:
        """``length`` more bytes of the request target; raise if past a limit."""
        if not self.fits_target(length):
            self.refuse_target()

    def fits_target(self, length: int) -> bool:
        """Count ``length`` more bytes of the request target (parsers may report it in pieces);
        True if the head is still within every limit, else :meth:`refuse_target` raises."""
        self.target_length += length
        self.size += length
        limits = self.limits
        return self.target_length <= limits.max_header_line and self.size <= limits.max_header_bytes

    def refuse_target(self) -> None:
        self.limits.check_line(self.target_length, request_line=True)
        self.limits.check_size(self.size)

    def fits(self, name: bytes, value: bytes) -> bool:
        """Count a field; True if the head is still within every limit. When it is not,
        :meth:`refuse` raises what :meth:`field` would have."""
        self.fields += 1
        self.last_line = line = len(name) + 1 + len(value)
        self.size += line + 2
        limits = self.limits
        return (
            self.fields <= limits.max_headers
            and line <= limits.max_header_line
            and self.size <= limits.max_header_bytes
        )

    def refuse(self) -> None:
        """Raise the refusal for the field :meth:`fits` found over a limit."""
        self.limits.check_fields(self.fields)
        self.limits.check_line(self.last_line, request_line=False)
        self.limits.check_size(self.size)

    def field(self, name: bytes, value: bytes) -> None:
        self.fields += 1
        self.limits.check_fields(self.fields)
        line = len(name) + 1 + len(value)  # "name:value", its shortest spelling
        self.limits.check_line(line, request_line=False)
        self.size += line + 2
        self.limits.check_size(self.size)

    def head(self, target: bytes, fields: Iterable[tuple[bytes, bytes]]) -> None:
        """Check a whole parsed head."""
        self.reset()
        self.target(len(target))
        for name, value in fields:
            self.field(name, value)


def _unsent(transport: asyncio.Transport) -> int:
    """Bytes written to ``transport`` that its client has not acknowledged: the transport's
    buffer and, on Linux, the socket's send queue (``SIOCOUTQ``), which is where a slow
    reader's progress shows first (the transport refills the socket only once half of the
    kernel's buffer, megabytes, is free)."""
    size = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            size += struct.unpack("i", queued)[0]
    return size


def _refusal_response(
    status: int, detail: str, default_headers: list[tuple[bytes, bytes]]
) -> bytes:
    """A complete response that closes the connection, its body ``{"detail": detail}``."""
    body = json.dumps({"detail": detail}, separators=(",", ":")).encode()
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode(),
        *(name + b": " + value for name, value in default_headers),
        CONTENT_TYPE + b": application/json",
        CONTENT_LENGTH + b": " + str(len(body)).encode(),
        b"Connection: close",
        b"",
        body,
    ]
    return b"\r\n".join(lines)


class ConnectionGuard:
    """The guards of one client connection, driven by its protocol.

    ``responding`` tells whether a response is being written, or owed to a request that came
    before (pipelining): a refusal then drops further input at once, but its answer waits until
    those responses are complete (:meth:`response_complete`).
    """

    def __init__(
        self,
        limits: Limits,
        loop: asyncio.AbstractEventLoop,
        server_state: ServerState,
        responding: Callable[[], bool],
        on_reset: Callable[[], object] | None = None,
    ) -> None:
        self.limits = limits
        #: Called when a client that stopped reading is reset (``send_timeout``).
        self._on_reset = on_reset
        self.meter = HeadMeter(limits)
        self.fields = FieldCount(limits)
        self.refused = False
        #: A limit the parser tripped over; answered when the protocol reports the parse error.
        self.pending: ProxyError | None = None
        self._loop = loop
        self._server_state = server_state
        self._responding = responding
        self._transport: asyncio.Transport | None = None
        self._refusal: tuple[int, str, bool] | None = None  # status, detail, linger: unanswered
        self._deadline: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._stalled: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> bool:
        """Take the new connection, unless it is over the cap: then refuse it (False)."""
        self._transport = transport
        if len(self._server_state.connections) <= self.limits.max_client_connections:
            return True
        detail = "Too many client connections; retry later"
        self._refuse(503, detail, linger=False)
        return False

    def connection_lost(self) -> None:
        for timer in (self._deadline, self._linger, self._stalled):
            if timer is not None:
                timer.cancel()

    def writing_paused(self) -> None:
        """The send buffer is full: the client has ``send_timeout`` to take some of it."""
        if self._stalled is None:
            self._watch_sending()

    def writing_resumed(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        self.closed()  # a transport resumes while closing too: its tail is still watched

    def closed(self) -> None:
        """The connection was closed (after a response, idle, or refused) with bytes still in
        the transport's buffer: the close waits for the client to take them, so it gets
        ``send_timeout`` to, as while writing. Else a client that leaves the end of a
        response unread holds the connection (its place under ``max_client_connections``, the
        buffer) for ever: the tail may be below the mark that pauses writing, or the watch of
        a paused write would see the close and stop."""
        transport = self._transport
        if (
            self._stalled is None
            and transport is not None
            and transport.is_closing()
            and transport.get_write_buffer_size()
        ):
            self._watch_sending()

    def _watch_sending(self, unsent: int | None = None) -> None:
        transport = self._transport
        # A closing transport with bytes to send is still open (see closed); once they are
        # gone, or the connection is lost, there is nothing left to watch.
        if transport is None or (transport.is_closing() and not transport.get_write_buffer_size()):
            self._stalled = None
            return
        now = _unsent(transport)
        if unsent is not None and now >= unsent:  # not one byte taken in send_timeout
            self._stalled = None
            self._not_reading(transport)
            return
        # A slow reader that keeps taking bytes is not stalled, however long a piece takes.
        self._stalled = self._loop.call_later(self.limits.send_timeout, self._watch_sending, now)

    def _not_reading(self, transport: asyncio.Transport) -> None:
        log.debug("resetting a client that read nothing for %g s", self.limits.send_timeout)
        if self._on_reset is not None:
            self._on_reset()
        # A reset, not a close: the kernel would otherwise keep trying to deliver what the
        # socket still holds (megabytes) to a client that does not read it.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def admit(self, data: bytes) -> bool:
        """Meter ``data`` before the parser sees it; False means drop it (the head was refused)."""
        if self.refused:
            return False
        if self.meter.complete:
            return True
        started = self.meter.size > 0
        try:
            self.meter.feed(data)
        except ProxyError as exc:
            self._refuse(exc.status_code, str(exc.detail), linger=True)
            return False
        if self.meter.complete:
            self._stop_deadline()
        elif not started:
            self._deadline = self._loop.call_later(self.limits.header_timeout, self._too_slow)
        return True

    def parsed(self, check: Callable[[], None]) -> None:
        """Run a :class:`FieldCount` check on what the parser reports, remembering a refusal."""
        try:
            check()
        except ProxyError as exc:
            self.pending = exc
            raise

    def answer_pending(self) -> bool:
        """Answer a limit the parser tripped over, if that is why it failed."""
        if self.pending is None:
            return False
        self._refuse(self.pending.status_code, str(self.pending.detail), linger=True)
        return True

    def refuse_request(self, detail: str) -> None:
        """The parser failed: answer the limit it tripped over, or else a 400 saying
        ``detail``, as every refusal: once the responses owed before it are complete."""
        if self.pending is None:
            self.pending = BadRequest(detail)
        self.answer_pending()

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        detail = f"Request head not received within {self.limits.header_timeout:g} s"
        self._refuse(408, detail, linger=False)

    def response_complete(self) -> None:
        """After each response: give the answer to a refusal that waited for it."""
        if self._refusal is not None and not self._responding():
            self._send_refusal()
        self.closed()  # a response without keep-alive closes the connection

    def _refuse(self, status: int, detail: str, linger: bool) -> None:
        if self.refused:
            return
        self.refused = True
        self._stop_deadline()
        log.debug("refusing a client with %d: %s", status, detail)
        self._refusal = (status, detail, linger)
        if not self._responding():
            self._send_refusal()

    def _send_refusal(self) -> None:
        assert self._refusal is not None and self._transport is not None
        (status, detail, linger), self._refusal = self._refusal, None
        transport = self._transport
        if transport.is_closing():
            return
        transport.write(_refusal_response(status, detail, self._server_state.default_headers))
        if linger and transport.can_write_eof():
            transport.write_eof()
            self._linger = self._loop.call_later(LINGER_SECONDS, self._close)
        else:
            self._close()

    def _close(self) -> None:
        assert self._transport is not None
        self._transport.close()
        self.closed()
