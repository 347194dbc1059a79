"""``vlmrun-cache`` and ``python -m proxy``: parse flags, load the config, run uvicorn."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn

from proxy import __version__
from proxy.app import CONFIG_ENV, configure_logging, create_app
from proxy.config import KEYS, Config, ConfigError, load
from proxy.guards import Limits
from proxy.metrics import MULTIPROC_ENV
from proxy.protocols import GuardedHTTP

_HELP = {
    "host": "address to listen on (default 127.0.0.1)",
    "port": "port to listen on (default 8080)",
    "upstream": "origin of the VLM Run API (default https://api.vlm.run)",
    "cache_dir": "cache directory (default: the user's cache directory)",
    "max_size": "upper bound on cached bytes, e.g. 512MiB or 10GiB (default 10GiB)",
    "max_object_size": "larger artifacts stream through uncached (default max-size / 4)",
    "proof_ttl": "how long an upstream 200 proves access to a scope (default 1h)",
    "connect_timeout": "time to connect to the upstream (default 5s)",
    "first_byte_timeout": "time for an artifact fetch to get headers, per attempt (default 8s)",
    "read_timeout": "longest upstream silence on artifact fetches (default 25s)",
    "retries": "extra attempts for artifact fetches failing before the first byte (default 2)",
    "retry_backoff": "base of the jittered exponential backoff (default 250ms)",
    "breaker_threshold": "consecutive upstream failures that open the breaker (default 5)",
    "breaker_cooldown": "how long the open breaker fails fast (default 5s)",
    "passthrough_timeout": "longest upstream silence on passed-through traffic (default 10m)",
    "max_connections": "most connections to the upstream (default 100)",
    "max_fills": "artifact fetches at once; more stream through uncached (default 64)",
    "max_waiters": "clients following one fetch; more get 503 (default 1024)",
    "max_query_length": "longest artifact query string (default 4096)",
    "max_header_bytes": "longest request head; longer get 431 (default 64KiB)",
    "max_header_line": "longest line of a request head; longer get 431 (default 8KiB)",
    "max_headers": "most header fields in a request; more get 431 (default 100)",
    "max_client_connections": "client connections at once per process; more get 503 (default 1000)",
    "header_timeout": "time to receive a request head from its first byte (default 10s)",
    "min_free_space": "disk space to keep free; fetches beyond it are not stored (default 256MiB)",
    "shutdown_timeout": "how long shutdown waits for running fetches (default 10s)",
    "chunk_size": "bytes per read when serving from disk (default 256KiB)",
    "http": "auto, h11 or httptools (default auto: httptools when installed)",
    "workers": "server processes sharing the port and the cache (default 1)",
    "log_level": "critical, error, warning, info or debug (default info)",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmrun-cache", description="A local caching reverse proxy for the VLM Run API."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy. Settings: defaults < --config file < VLMRUN_CACHE_<KEY> "
        "environment variables < flags.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML file (see config.example.toml)")
    for key in KEYS:
        serve.add_argument("--" + key.replace("_", "-"), dest=key, metavar="VALUE", help=_HELP[key])
    return parser


def http_protocol(choice: str) -> str:
    if choice != "auto":
        return choice
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


def uvicorn_options(config: Config) -> dict[str, Any]:
    """The uvicorn settings that decide what a client meets: the HTTP protocol with the guards
    of proxy/guards.py (proxy/protocols.py) and their limits. ``serve`` runs with exactly these,
    and so do the tests.
    """
    return {
        # Either protocol keeps Content-Type's spelling; see proxy/headers.py.
        "http": GuardedHTTP(http_protocol(config.http), Limits.from_config(config)),
        # uvicorn's default, stated: idle connections, new or between requests, close after it.
        "timeout_keep_alive": 5,
        "lifespan": "on",
        "server_header": False,
    }


METRICS_DIR_PREFIX = "vlmrun-cache-metrics-"


def remove_stale_metrics_dirs() -> None:
    """Remove metrics directories of earlier runs whose parent process is gone (uvicorn ends by
    re-raising SIGTERM, so ``atexit`` does not always get to clean up)."""
    for path in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        pid = path.name.removeprefix(METRICS_DIR_PREFIX).split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            continue


def serve(config: Config) -> None:
    configure_logging(config.log_level)
    if config.workers > 1:
        # Workers are fresh interpreters: they get the settings, and a shared directory for
        # prometheus-client's multiprocess mode, through the environment.
        os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(config))
        remove_stale_metrics_dirs()
        metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
        atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)
        os.environ[MULTIPROC_ENV] = metrics_dir
        app: object = "proxy.app:create_app_from_env"
    else:
        app = create_app(config)
    uvicorn.run(
        app,  # type: ignore[arg-type]
        factory=config.workers > 1,
        workers=config.workers,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=30,
        **uvicorn_options(config),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    flags = {key: getattr(args, key) for key in KEYS}
    try:
        config = load(args.config, os.environ, flags)
    except ConfigError as exc:
        print(f"vlmrun-cache: invalid setting {exc}", file=sys.stderr)
        return 2
    serve(config)
    return 0
