"""The upstream HTTP client's plumbing: one pool shared by every user, made safe to share.

Four things a stock ``httpx.AsyncClient`` does are wrong for a proxy that many credentials use:

* It keeps a cookie jar. A ``Set-Cookie`` answered to one user would go out on every other
  user's later requests. :class:`SharedClient` has no jar: nothing is parsed or stored, and a
  client's own ``Cookie`` header goes upstream with that request only.
* It puts a connection back in the pool as soon as a response's last framed byte is read. An
  upstream that wrote *more* than its ``Content-Length`` leaves those bytes in the connection's
  buffer, where they would be read as the answer to the next request, maybe another user's.
  :class:`_ExactlyFramedHTTP11` closes a connection that holds any byte past the message, and
  never reuses one after an answer that has no body by its framing (to ``HEAD``, a 204 or a
  304): a server that sends a body there anyway may send it late. (Bytes that arrive later
  than that on a framed answer make the idle socket readable, which httpcore treats as expired;
  an upstream that sends an unsolicited answer *after* the next request went out cannot be told
  apart from a real one by any HTTP/1.1 client.)
* Its pool (httpcore 1.0's ``_assign_requests_to_connections``, run each time a request enters
  or leaves it) costs O(connections²) per pass, and its keep-alive check counts *every*
  connection instead of the idle ones: with more than ``max_keepalive_connections`` open, each
  connection that falls idle is closed at once, and the next request connects (a TLS handshake,
  against the real API) again. It also hands one idle connection to several waiting requests in
  a row (all but one then go round again), and may close an idle connection a waiting request
  was just given (httpcore PRs #1000 and #1035, issue #1110). And it asks every idle
  connection's socket whether it is readable (a server that closed it), one ``poll`` syscall
  each. :class:`_Pool` does one pass in linear time: one ``poll`` for all idle sockets, at most
  ``max_keepalive_connections`` idle ones kept (the oldest closed first), never one that
  a request was given, and each idle connection given to one request.
* It builds the next request of a redirect even when not following it, and fails on a malformed
  ``Location`` (a 500 for a header we only relay). :class:`SharedClient` leaves redirects alone:
  artifact fetches follow them under :mod:`proxy.redirects`, everything else relays them.

Both rely on internals of httpx 0.28 and httpcore 1.0, pinned in ``pyproject.toml``; the tests
in ``tests/test_hostile_upstream.py`` fail if an upgrade changes them.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from typing import Any

import anyio.streams.tls
import httpcore
import httpx
from httpcore._async.http11 import HTTPConnectionState


class _NoCookies(httpx.Cookies):
    """A cookie store that never stores: responses' cookies are ignored, requests get none."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set_cookie_header(self, request: httpx.Request) -> None:
        return None


class SharedClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` without a cookie jar; see the module docstring."""

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, _cookies: Any) -> None:
        return None  # httpx's constructor assigns a jar; we keep none

    async def _send_handling_redirects(
        self, request: httpx.Request, follow_redirects: bool, history: list[httpx.Response]
    ) -> httpx.Response:
        return await self._send_single_request(request)


_NO_COOKIES = _NoCookies()


class _ExactlyFramedHTTP11(httpcore.AsyncHTTP11Connection):
    """An HTTP/1.1 connection that is reused only if the last message ended exactly."""

    _bodiless = False
    #: Whether the idle socket was readable, as :class:`_Pool` found out for all at once (None
    #: outside its rounds: then httpcore asks the socket itself).
    probed: bool | None = None
    _fd: int | None = None

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed), looked up once."""
        if self._fd is None:
            sock: socket.socket | None = self._network_stream.get_extra_info("socket")
            self._fd = -1 if sock is None else sock.fileno()
        return self._fd if self._state != HTTPConnectionState.CLOSED else -1

    def has_expired(self) -> bool:
        if self.probed is None:
            return super().has_expired()
        keepalive_expired = self._expire_at is not None and time.monotonic() > self._expire_at
        return keepalive_expired or (self.is_idle() and self.probed)

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        self._bodiless = request.method == b"HEAD"
        response = await super().handle_async_request(request)
        self._bodiless = self._bodiless or response.status in (204, 304)
        return response

    async def _response_closed(self) -> None:
        leftover, _closed = self._h11_state.trailing_data
        if leftover or self._bodiless or _read_ahead(self._network_stream):
            # more than it framed (in the parser's buffer, or read off the socket but not yet
            # parsed), or maybe more to come
            async with self._state_lock:
                await self.aclose()
            return
        await super()._response_closed()


def _read_ahead(stream: httpcore.AsyncNetworkStream) -> bool:
    """Whether ``stream`` holds bytes taken off its socket that the HTTP parser has not read.

    httpcore reads 64 KiB at a time, but the event loop reads what the socket has (uvloop: up
    to 256 KB a read) into anyio's queue, and a TLS stream keeps records in its BIO and
    decrypted bytes in its ``SSLObject``. Bytes there after an answer's last framed
    byte are more than it framed: neither the parser's leftover nor a ``poll`` of the idle
    socket shows them (``tests/test_security.py`` has the attack). Streams of another shape
    than httpcore 1.0's anyio backend are not looked into."""
    inner = getattr(stream, "_stream", None)
    while inner is not None:
        if isinstance(inner, anyio.streams.tls.TLSStream):
            if inner._ssl_object.pending() or inner._read_bio.pending:
                return True
            inner = inner.transport_stream
            continue
        protocol = getattr(inner, "_protocol", None)
        return bool(getattr(protocol, "read_queue", None))
    return False


class _Connection(httpcore.AsyncHTTPConnection):
    """Opens :class:`_ExactlyFramedHTTP11` connections (HTTP/1.1 only)."""

    def never_opened(self) -> bool:
        return self._connection is None and not self._connect_failed

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        if self._connection is None:
            try:
                async with self._request_lock:
                    if self._connection is None:
                        stream = await self._connect(request)
                        self._connection = _ExactlyFramedHTTP11(
                            origin=self._origin,
                            stream=stream,
                            keepalive_expiry=self._keepalive_expiry,
                        )
            except BaseException:
                self._connect_failed = True
                raise
        return await super().handle_async_request(request)


def _never_opened(connection: httpcore.AsyncConnectionInterface) -> bool:
    """Whether ``connection`` was made for a request and never began to connect. One that no
    request holds (the request was cancelled before its task ran again) would stay in the pool
    for good, neither idle nor busy, one of ``max_connections`` lost (httpcore 1.0 keeps it
    too). One that is connecting is held by its request until the connect succeeds or fails."""
    return isinstance(connection, _Connection) and connection.never_opened()


class _Pool(httpcore.AsyncConnectionPool):
    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        """The pool's pass (see the module docstring): drop closed connections, close expired
        ones and idle ones past the keep-alive limit, then give each waiting request an idle
        connection of its origin, or a new one while under ``max_connections``, or a new one in
        place of an idle connection of another origin. Returns the connections to close."""
        probed = self._probe_idle()
        try:
            return self._pass()
        finally:
            for inner in probed:
                inner.probed = None

    def _pass(self) -> list[httpcore.AsyncConnectionInterface]:
        given = {id(r.connection) for r in self._requests if r.connection is not None}
        closing: list[httpcore.AsyncConnectionInterface] = []
        kept: list[httpcore.AsyncConnectionInterface] = []
        idle: list[httpcore.AsyncConnectionInterface] = []  # and not given: free to take
        for connection in self._connections:
            if connection.is_closed():
                continue
            if id(connection) not in given and _never_opened(connection):
                continue  # made for a request cancelled before it ran: no socket to close
            if connection.has_expired():
                closing.append(connection)
                continue
            kept.append(connection)
            if id(connection) not in given and connection.is_available():
                idle.append(connection)
        surplus = len(idle) - self._max_keepalive_connections
        if surplus > 0:  # the first in the list were opened first: the oldest go
            dropped, idle = idle[:surplus], idle[surplus:]
            closing += dropped
            gone = {id(connection) for connection in dropped}
            kept = [connection for connection in kept if id(connection) not in gone]
        self._connections = kept
        for request in self._requests:
            if not request.is_queued():
                continue
            origin = request.request.url.origin
            found = next((c for c in idle if c.can_handle_request(origin)), None)
            if found is not None:
                idle.remove(found)
            elif len(self._connections) < self._max_connections:
                found = self.create_connection(origin)
                self._connections.append(found)
            elif idle:  # full: one idle connection of another origin makes way
                victim = idle.pop(0)
                self._connections.remove(victim)
                closing.append(victim)
                found = self.create_connection(origin)
                self._connections.append(found)
            else:
                break  # it (and every request after it) waits for a connection to free up
            request.assign_to_connection(found)
        return closing

    def _probe_idle(self) -> list[_ExactlyFramedHTTP11]:
        """Ask the kernel in one ``poll`` which idle sockets are readable (closed by the server,
        or holding bytes nobody asked for), for :meth:`_ExactlyFramedHTTP11.has_expired`
        during the pass. Returns the connections asked about."""
        idle = [
            inner
            for connection in self._connections
            if isinstance(inner := getattr(connection, "_connection", None), _ExactlyFramedHTTP11)
            and inner.is_idle()
        ]
        if not idle:
            return idle
        poller = select.poll()
        fds = [inner.fileno() for inner in idle]
        for fd in fds:
            if fd >= 0:
                poller.register(fd, select.POLLIN)
        ready = {fd for fd, _events in poller.poll(0)}
        for inner, fd in zip(idle, fds, strict=True):
            inner.probed = fd < 0 or fd in ready
        return idle

    def create_connection(self, origin: httpcore.Origin) -> httpcore.AsyncConnectionInterface:
        return _Connection(
            origin=origin,
            ssl_context=self._ssl_context,
            keepalive_expiry=self._keepalive_expiry,
            http1=True,
            http2=False,
            retries=self._retries,
            network_backend=self._network_backend,
            socket_options=self._socket_options,
        )


def transport(
    limits: httpx.Limits, verify: ssl.SSLContext | None = None
) -> httpx.AsyncHTTPTransport:
    """httpx's transport over a pool of :class:`_ExactlyFramedHTTP11` connections; ``verify``
    replaces httpx's default TLS context (the system's CAs by certifi)."""
    result = httpx.AsyncHTTPTransport(limits=limits, trust_env=False, verify=verify or True)
    context: ssl.SSLContext | None = result._pool._ssl_context
    result._pool = _Pool(
        ssl_context=context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
    )
    return result
