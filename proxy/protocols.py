"""uvicorn's two HTTP/1.1 protocols, h11 and httptools, each driving a
:class:`~proxy.guards.ConnectionGuard`: the guards sit between the socket and the parser, and
between the parser and the app."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.errors import HeaderFieldsTooLarge, ProxyError
from proxy.guards import ConnectionGuard, Limits
from proxy.headers import RawHeaders


class _Guarded:
    """What both guarded protocols do around uvicorn's: tell the guard of the connection's
    start, end and stalled writes, and call the hang-ups of its responses when it ends."""

    guard: ConnectionGuard
    hangups: Hangups
    app: Any  # uvicorn's protocols set these three
    cycle: Any
    loop: asyncio.AbstractEventLoop

    def _new_guard(self, limits: Limits, server_state: ServerState) -> ConnectionGuard:
        """This connection's guard; it counts its resets on the app's metrics (proxy/front.py)."""
        reset = getattr(self.app, "client_reset", None)
        return ConnectionGuard(limits, self.loop, server_state, self._responding, reset)

    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if self.guard.connection_made(transport):
            _close_when_silent(self)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.connection_lost()
        super().connection_lost(exc)  # type: ignore[misc]
        _hang_up(self.hangups)

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()  # type: ignore[misc]
        self.guard.closed()  # an idle connection may still hold the end of its last response

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        self.guard.writing_paused()

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        self.guard.writing_resumed()


class GuardedH11Protocol(_Guarded, H11Protocol):  # type: ignore[misc]
    """uvicorn's h11 protocol behind the guards."""

    def __init__(
        self,
        config: UvicornConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: Limits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = self._new_guard(limits, server_state)
        self.conn = _CheckedH11Connection(self.guard)
        self.hangups = Hangups()

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self.guard.meter.complete and self.conn.their_state is h11.IDLE:
            self.guard.meter.reset()  # the last request is done: these bytes start a new head
        if self.guard.admit(data):
            super().data_received(data)
            if self.cycle is not None:  # its task has not run yet (h11 takes one at a time)
                self.cycle.scope[HANGUPS] = self.hangups

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.guard.response_complete()

    def send_400_response(self, msg: str) -> None:
        if self.guard.pending is None and _refused_is_being_answered(self.cycle):
            super().send_400_response(msg)
        else:
            self.guard.refuse_request(msg)


class _CheckedH11Connection(h11.Connection):
    """h11's server side, with the limits checked on each head it parses."""

    def __init__(self, guard: ConnectionGuard) -> None:
        # h11 refuses an incomplete head larger than this on its own ("Receive buffer too long").
        super().__init__(h11.SERVER, max_incomplete_event_size=guard.limits.max_header_bytes)
        self._guard = guard

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                self._guard.pending = HeaderFieldsTooLarge(
                    f"Request head larger than {self._guard.limits.max_header_bytes} bytes"
                )
            raise
        if isinstance(event, h11.Request):
            request = event
            try:
                self._guard.parsed(lambda: self._guard.fields.head(request.target, request.headers))
            except ProxyError as exc:
                raise h11.RemoteProtocolError(str(exc.detail)) from exc
        return event


class GuardedHttpToolsProtocol(_Guarded, HttpToolsProtocol):  # type: ignore[misc]
    """uvicorn's httptools protocol behind the guards."""

    def __init__(
        self,
        config: UvicornConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: Limits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = self._new_guard(limits, server_state)
        #: The app's answer to a hit that needs no waiting (proxy/front.py), if the app is
        #: ours (uvicorn wraps it in nothing at the settings ``serve`` uses).
        self._answer_now: AnswerNow | None = getattr(self.app, "answer_now", None)
        #: The request being parsed was answered by ``_answer_now``.
        self._answered = False
        self.hangups = Hangups()

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self.guard.admit(data):
            super().data_received(data)

    def on_headers_complete(self) -> None:
        # A request is here: the connection is not idle, even if an answer given earlier in
        # this same piece of input armed the keep-alive timer.
        self._unset_keepalive_if_required()
        if self._answer_now is not None and self._answer_at_once():
            return
        self.scope[HANGUPS] = self.hangups  # type: ignore[literal-required]
        super().on_headers_complete()

    def _answer_at_once(self) -> bool:
        """Answer the parsed head with ``_answer_now`` if it is a plain keep-alive HTTP/1.1 GET,
        nothing is before it in the connection (no response under way or queued, none waiting
        for the client to read) and the app has the answer. Its message completes the rest."""
        parser = self.parser
        if (
            self._responding()
            or self.pipeline
            or self.flow.write_paused
            or self.transport.is_closing()
            or parser.get_method() != b"GET"
            or parser.get_http_version() != "1.1"
            or not parser.should_keep_alive()
            or parser.should_upgrade()
        ):
            return False
        assert self._answer_now is not None
        answer = self._answer_now(self.url, self.headers, self.server_state.default_headers)
        if answer is None:
            return False
        self.transport.writelines(answer)
        self._answered = True
        return True

    def on_body(self, body: bytes) -> None:
        if not self._answered:  # answered requests have none (no length, no transfer coding)
            super().on_body(body)

    # httptools calls these as it parses; raising in them stops the parser (HttpParserError).
    # The field count starts at zero (a new guard) and is reset after each message.
    def on_url(self, url: bytes) -> None:
        fields = self.guard.fields
        if not fields.fits_target(len(url)):
            self.guard.parsed(fields.refuse_target)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        fields = self.guard.fields
        if not fields.fits(name, value):
            self.guard.parsed(fields.refuse)
        super().on_header(name, value)

    def on_message_complete(self) -> None:
        if self._answered:  # its response is written: what follows is as after any response
            self._answered = False
            self.on_response_complete()
        else:
            super().on_message_complete()
        self.guard.meter.reset()  # whatever follows starts a new head
        self.guard.fields.reset()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.guard.response_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's writes its 400 at once and closes: right for a request whose own body is
        # broken, but ahead of the responses owed to requests pipelined before a refused head
        # (the client read the 400 as the answer to its first request, and those answers were
        # lost with the connection). The guard answers that one after them.
        if (
            self.guard.pending is None
            and not self.pipeline
            and _refused_is_being_answered(self.cycle)
        ):
            super().send_400_response(msg)
        else:
            self.guard.refuse_request(msg)


#: Where a request's scope holds its connection's hang-up callbacks: a streamed response
#: (proxy/artifacts.py) adds one while it runs, and the protocol calls each when the client
#: goes, so that the response needs no task of its own waiting for ``http.disconnect``.
HANGUPS = "vlmrun_cache.hangups"


class Hangups(set[Callable[[], None]]):
    """A connection's hang-up callbacks. One added after the client went is called at once: a
    response is made only when its request's wait ends (a follower's, for a fill to start),
    which may be after the connection was lost, and would otherwise stream into it until the
    body's end, keeping its waiter place and the fill's file."""

    lost = False

    def add(self, hangup: Callable[[], None]) -> None:
        if self.lost:
            hangup()
        else:
            super().add(hangup)


def _hang_up(hangups: Hangups) -> None:
    hangups.lost = True
    for hangup in list(hangups):
        hangup()
    hangups.clear()


#: :meth:`proxy.front.Front.answer_now`: (target, header fields, the server's fields) -> the
#: bytes of a whole response, or None.
AnswerNow = Callable[[bytes, RawHeaders, RawHeaders], list[bytes] | None]


def _refused_is_being_answered(cycle: Any) -> bool:
    """Whether the request the parser just refused is the one being answered (its body is
    broken): then no answer is owed before the refusal, and the app is to hear the client go."""
    return cycle is not None and cycle.more_body and not cycle.response_complete


def _close_when_silent(protocol: GuardedH11Protocol | GuardedHttpToolsProtocol) -> None:
    """Close a new connection that sends nothing as uvicorn closes one idle between requests
    (uvicorn arms that timer only after a response); its first byte disarms it."""
    protocol.timeout_keep_alive_task = protocol.loop.call_later(
        protocol.timeout_keep_alive, protocol.timeout_keep_alive_handler
    )


@dataclasses.dataclass(frozen=True)
class GuardedHTTP:
    """uvicorn's ``http=``: makes the guarded protocol for each connection.

    An instance rather than a class, so that the limits travel with it to worker processes
    (uvicorn pickles its settings for them).
    """

    #: ``h11`` or ``httptools``.
    http: str
    limits: Limits

    def __call__(
        self,
        config: UvicornConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> asyncio.Protocol:
        protocol = GuardedHttpToolsProtocol if self.http == "httptools" else GuardedH11Protocol
        return protocol(config, server_state, app_state, _loop, limits=self.limits)
