"""The miss baseline: a minimal forwarder on the proxy's stack, with no cache behind it.

    python bench/forwarder.py --port N --upstream http://127.0.0.1:M [--proxy-pool]

A bare ASGI app that sends every ``GET /v1/artifacts`` upstream with httpx (the proxy's client
library, one ``AsyncClient`` with the proxy's pool limits) and relays the answer's status,
``Content-Type``, ``Content-Length`` and body chunks as they come. It checks nothing, stores
nothing, hashes nothing and logs nothing: whatever a miss costs the proxy beyond this is the
cache's work (the access check, the fill's temporary file, the durable commit, the index,
the hash, metrics and the log line).

It runs as ``serve`` runs the proxy, like bench/ceiling.py: uvicorn with the proxy's HTTP
protocol (uvicorn's own, without the proxy's guards), the same loop, keep-alive and
server-header settings, one process.

With ``--proxy-pool`` its client sends through the proxy's own transport (proxy/transport.py:
httpcore's pool with a linear pass that keeps its idle connections), so that the pool's share
of the difference can be told from the cache's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx
import uvicorn
from starlette.types import Receive, Scope, Send

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.cli import http_protocol, uvicorn_options
from proxy.config import Config
from proxy.transport import transport

#: The header fields relayed, in the spelling the SDKs read.
KEPT = {b"content-type": b"Content-Type", b"content-length": b"Content-Length"}


class Forwarder:
    def __init__(self, upstream: str, connections: int, proxy_pool: bool = False) -> None:
        limits = httpx.Limits(
            max_connections=connections, max_keepalive_connections=min(32, connections)
        )
        pool = transport(limits) if proxy_pool else None
        self.client = httpx.AsyncClient(
            base_url=upstream, limits=limits, trust_env=False, transport=pool
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await self.client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        headers = [(name, value) for name, value in scope["headers"] if name == b"authorization"]
        request = self.client.build_request(
            "GET", "/v1/artifacts", headers=headers, params=scope["query_string"].decode("latin-1")
        )
        response = await self.client.send(request, stream=True)
        try:
            relayed = [
                (KEPT[name.lower()], value)
                for name, value in response.headers.raw
                if name.lower() in KEPT
            ]
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": relayed}
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--proxy-pool", action="store_true", help="the proxy's own transport")
    args = parser.parse_args()
    config = Config()
    options = uvicorn_options(config)
    options["http"] = http_protocol(config.http)
    options["access_log"] = False
    app = Forwarder(args.upstream, config.max_connections, args.proxy_pool)
    uvicorn.run(app, host="127.0.0.1", port=args.port, **options)


if __name__ == "__main__":
    main()
