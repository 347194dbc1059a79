"""The hot path's front door: ``GET /v1/artifacts`` goes straight to its route.

Every other request goes through Starlette (middleware, router, exception handlers). The artifact
route needs none of that: it is one path and one method, and it maps its own few outcomes the way
the app's handlers would (a :class:`ProxyError` becomes the API's JSON error shape, a
:class:`ResponseAborted` a cut connection, a client gone mid-request one debug line). Skipping
Starlette's layers is a fifth of a small hit's cost. The HTTP-layer guards (proxy/guards.py) sit
below this, in the protocol, so nothing here bypasses them.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.artifacts import ArtifactRoute
from proxy.errors import ProxyError, ResponseAborted, error_response

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


class Front:
    """Dispatches ``GET /v1/artifacts`` to ``artifacts``; everything else to ``app``."""

    def __init__(self, app: ASGIApp, artifacts: ASGIApp, state: Any) -> None:
        self.app = app
        self.artifacts = artifacts
        #: The Starlette app's state (``services``), for tests and tools.
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == ARTIFACT_PATH and scope["method"] == "GET":
            await self.artifacts(scope, receive, send)
        else:
            await self.app(scope, receive, send)
