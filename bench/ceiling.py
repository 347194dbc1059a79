"""The Python ceiling: a minimal Starlette app serving the artifacts' bytes from memory.

    python bench/ceiling.py --port N [--http h11|httptools]

Whatever our proxy does on a hit (a lookup, an access check, a disk read, a hash), this app does
none of it: its requests per second are the most a Starlette/uvicorn server can do here.
"""

from __future__ import annotations

import argparse
import sys
from functools import cache
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SCOPE
from tests.standin import generated_chunks


@cache
def body(object_id: str) -> bytes:
    size = int(object_id.split("_")[1])
    return b"".join(chunk for _, chunk in generated_chunks(f"session/{SCOPE}/{object_id}", size))


async def artifact(request: Request) -> Response:
    data = body(request.query_params["object_id"])
    return Response(data, media_type="application/octet-stream")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--http", default="h11")
    args = parser.parse_args()
    app = Starlette(routes=[Route("/v1/artifacts", artifact)])
    uvicorn.run(
        app, host="127.0.0.1", port=args.port, http=args.http, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
