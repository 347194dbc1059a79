"""The application factory: routes, lifespan and the one exception-to-response map."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.accesslog import AccessLog, AccessLogWriter
from proxy.artifacts import ArtifactRoute
from proxy.config import Config
from proxy.errors import ProxyError, ResponseAborted, handle_proxy_error, json_response
from proxy.front import ArtifactApp, Front
from proxy.metrics import Metrics
from proxy.probe import display_url
from proxy.services import Services
from proxy.threads import run_sync

log = logging.getLogger(__name__)

#: With several workers, each worker process reads its settings from here (JSON).
CONFIG_ENV = "VLMRUN_CACHE__WORKER_CONFIG"


class _AbortGuard:
    """Turns :class:`ResponseAborted` into a cut connection, and a client gone mid-request into
    one debug line, instead of logged tracebacks."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except ResponseAborted as exc:
            log.warning("response aborted: %s", exc)
        except ClientDisconnect:
            log.debug("client disconnected before its request was complete")


def create_app_from_env() -> Front:
    """The factory uvicorn calls in each worker process (``--workers N``)."""
    config = Config(**json.loads(os.environ[CONFIG_ENV]))
    configure_logging(config.log_level)
    return create_app(config)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every request's URL at INFO, query string (and presigned URLs) included.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


def create_app(config: Config | None = None) -> Front:
    """A proxy app for ``config`` (defaults if omitted). Nothing is opened until its lifespan."""
    config = config or Config()
    services = Services(config, Metrics())
    access_log = (
        AccessLogWriter(config.log_format, shared=config.workers > 1) if config.access_log else None
    )
    if access_log is not None:
        services.access_log = access_log.put

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await services.open()
        log.info(
            "serving %s from cache in %s", display_url(config.upstream_origin), config.cache_dir
        )
        if access_log is not None:
            access_log.start()
        try:
            yield
        finally:
            await services.close()
            if access_log is not None:
                await run_sync(access_log.stop)

    async def healthz(_request: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def readyz(_request: Request) -> Response:
        ready = services.serving and await run_sync(services.store.ready)
        return json_response(200 if ready else 503, {"status": "ready" if ready else "not ready"})

    async def metrics(_request: Request) -> Response:
        stats = await run_sync(services.store.stats)
        services.metrics.circuit_open.set(services.upstream.breaker.state == "open")
        services.metrics.upstream_up.set(not services.upstream.offline)
        shared = services.chain.shared
        services.metrics.redis_circuit_open.set(
            shared is not None and shared.call.breaker.state == "open"
        )
        body = services.metrics.render(stats)
        response = Response(body)
        response.raw_headers = [
            (b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode()),
        ]
        return response

    async def passthrough(scope: Scope, receive: Receive, send: Send) -> None:
        await services.passthrough(scope, receive, send)

    artifacts = ArtifactRoute(services)
    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/v1/artifacts", artifacts),
        ],
        middleware=[Middleware(_AbortGuard)],
        exception_handlers={ProxyError: handle_proxy_error},
        lifespan=lifespan,
    )
    # Everything else goes upstream verbatim: no 404s of our own, no slash redirects.
    app.router.default = passthrough
    app.router.redirect_slashes = False
    app.state.services = services
    fast: ASGIApp = ArtifactApp(artifacts)
    rest: ASGIApp = app
    if access_log is not None:  # one line per request, whichever way it went
        fast, rest = AccessLog(fast, writer=access_log), AccessLog(app, writer=access_log)
    put = None if access_log is None else access_log.put
    front = Front(rest, fast, app.state, now=artifacts.answer_now, log=put)
    front.client_reset = services.metrics.client_resets.inc  # called by the protocols' guards
    return front
