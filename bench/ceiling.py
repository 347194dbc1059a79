"""The Python ceilings: the artifacts' bytes from memory, on the proxy's server, protocol and loop.

    python bench/ceiling.py --port N --app starlette|raw [--guards]

``starlette`` is a one-route Starlette app; ``raw`` is a bare ASGI callable. Both answer
``GET /v1/artifacts?object_id=...`` with the header fields of a hit (Content-Type,
Content-Length, ETag, Cache-Control, Accept-Ranges, X-Cache, Cache-Status; bench/run.py checks
that the proxy sends these and no others) and the bytes, built once per id.
Whatever our proxy does on a hit (a lookup, an access check, a disk read, a hash, its guards,
its log line), these do none of it: their requests per second are the most a uvicorn server
can do here, with a framework and without one.

Both run as ``serve`` runs the proxy: uvicorn with the same HTTP protocol (``http_protocol``
of the proxy's default, httptools when installed), the same loop (uvicorn's ``auto``: uvloop
when installed), the same keep-alive and server-header settings, one process. The proxy's
protocol is uvicorn's wrapped in its guards (proxy/protocols.py); the guards are the proxy's
work, so the ceilings run uvicorn's own. ``--guards`` runs the proxy's instead: the raw app
behind the guards shows what they cost, apart from everything else the proxy does.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from functools import cache
from pathlib import Path
from urllib.parse import parse_qsl

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SCOPE
from proxy.cli import http_protocol, uvicorn_options
from proxy.config import Config
from tests.standin import generated_chunks


@cache
def hit(object_id: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The raw header fields and the body of a hit on ``object_id`` (``arr_<size>_...``)."""
    size = int(object_id.split("_")[1])
    data = b"".join(chunk for _, chunk in generated_chunks(f"session/{SCOPE}/{object_id}", size))
    headers = [
        (b"Content-Type", b"application/octet-stream"),
        (b"Content-Length", str(len(data)).encode()),
        (b"ETag", f'"{hashlib.sha256(data).hexdigest()}"'.encode()),
        (b"Cache-Control", b"private, max-age=31536000, immutable"),
        (b"Accept-Ranges", b"bytes"),
        (b"X-Cache", b"HIT"),
        (b"Cache-Status", b"vlmrun-cache; hit; detail=memory"),
    ]
    return headers, data


async def artifact(request: Request) -> Response:
    headers, data = hit(request.query_params["object_id"])
    response = Response(data)
    response.raw_headers = headers
    return response


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/v1/artifacts", artifact)])


async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A hit with no framework: one dict lookup, two sends."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    query = dict(parse_qsl(scope["query_string"].decode("latin-1")))
    headers, data = hit(query["object_id"])
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--app", choices=["starlette", "raw"], default="starlette")
    parser.add_argument(
        "--guards", action="store_true", help="run the proxy's guarded protocol (a diagnostic)"
    )
    args = parser.parse_args()
    config = Config()
    options = uvicorn_options(config)  # the keep-alive, lifespan and server-header settings
    if not args.guards:
        options["http"] = http_protocol(config.http)  # uvicorn's own, without the guards
    options["access_log"] = False  # a ceiling writes no log (serve's uvicorn writes none either)
    app = starlette_app() if args.app == "starlette" else raw_app
    uvicorn.run(app, host="127.0.0.1", port=args.port, **options)


if __name__ == "__main__":
    main()
