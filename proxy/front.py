"""The hot path's front door: ``GET /v1/artifacts`` goes straight to its route.

Every other request goes through Starlette (middleware, router, exception handlers). The artifact
route needs none of that: it is one path and one method, and it maps its own few outcomes the way
the app's handlers would (a :class:`ProxyError` becomes the API's JSON error shape, a
:class:`ResponseAborted` a cut connection, a client gone mid-request one debug line). Skipping
Starlette's layers is a fifth of a small hit's cost. The HTTP-layer guards (proxy/guards.py) sit
below this, in the protocol, so nothing here bypasses them.

Before that, the protocol (proxy/protocols.py) offers every parsed ``GET /v1/artifacts`` head to
:meth:`Front.answer_now`: the simplest hit (the entry in the memory tier, a live proof for the
credential in memory, no condition, range or body) needs nothing to wait for, so it is answered
there and then, in the bytes a server would write, without an ASGI task, scope or message. That
is half of a small hit's cost. Everything else, and every request the route would refuse, goes
the ASGI way: :meth:`~proxy.artifacts.ArtifactRoute.answer_now` only ever answers a hit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.accesslog import Record, record
from proxy.artifacts import ArtifactRoute, Immediate
from proxy.errors import ProxyError, ResponseAborted, error_response
from proxy.headers import RawHeaders

log = logging.getLogger(__name__)

ARTIFACT_PATH = "/v1/artifacts"


class ArtifactApp:
    """The artifact route as an ASGI app of its own, with the app's error mapping."""

    def __init__(self, route: ArtifactRoute) -> None:
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.route(scope, receive, send)
        except ProxyError as exc:  # raised before the response started, by design
            await error_response(exc)(scope, receive, send)
        except ResponseAborted as exc:
            log.warning("response aborted: %s", exc)
        except ClientDisconnect:
            log.debug("client disconnected before its request was complete")


#: The request target of an artifact request, up to its query.
_TARGET = ARTIFACT_PATH.encode() + b"?"
_STATUS_200 = b"HTTP/1.1 200 OK\r\n"


class Front:
    """Dispatches ``GET /v1/artifacts`` to ``artifacts``; everything else to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        artifacts: ASGIApp,
        state: Any,
        now: Callable[[bytes, RawHeaders], Immediate | None] | None = None,
        log: Callable[[Record], None] | None = None,
    ) -> None:
        self.app = app
        self.artifacts = artifacts
        #: The Starlette app's state (``services``), for tests and tools.
        self.state = state
        self._now = now
        self._log = log
        #: Called when the HTTP layer resets a client that stopped reading (``send_timeout``).
        self.client_reset: Callable[[], object] = lambda: None

    def answer_now(
        self, target: bytes, headers: RawHeaders, server_fields: RawHeaders
    ) -> list[bytes] | None:
        """The bytes of a whole HTTP/1.1 200 answering ``GET target``, if it is a hit to be
        answered at once (see the module docstring), logged as the access log logs it; else
        None. ``server_fields`` are the server's own (``Date``), first as a server writes them.
        """
        if self._now is None or not target.startswith(_TARGET) or b"#" in target:
            return None
        started = time.perf_counter()
        found = self._now(target[len(_TARGET) :], headers)
        if found is None:
            return None
        fields, body, key = found
        head = [_STATUS_200]
        for name, value in (*server_fields, *fields):  # spelled as uvicorn's httptools writes
            head += (name.lower(), b": ", value, b"\r\n")
        head.append(b"\r\n")
        if self._log is not None:
            sent, ended = len(body), time.perf_counter()
            self._log(
                record(
                    "GET", ARTIFACT_PATH, True, key, 200, b"HIT", sent, True, False, started, ended
                )
            )
        return [b"".join(head), body]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == ARTIFACT_PATH and scope["method"] == "GET":
            await self.artifacts(scope, receive, send)
        else:
            await self.app(scope, receive, send)
