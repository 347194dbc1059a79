"""``vlmrun-cache`` and ``python -m proxy``: parse flags, load the config, run uvicorn.

``serve`` records the address it listens on in the cache directory, and ``healthcheck`` dials
that address, so a health check follows a port set by flag, file or environment.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import errno
import http.client
import ipaddress
import json
import logging
import os
import shutil
import ssl
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn

from proxy import __version__, admin, doctor
from proxy.app import CONFIG_ENV, configure_logging, create_app
from proxy.banner import announce
from proxy.config import BASE_CONFIG_ENV, KEYS, Config, ConfigError, env_name, flag_name, load
from proxy.guards import Limits
from proxy.metrics import MULTIPROC_ENV
from proxy.protocols import GuardedHTTP
from proxy.services import inspect_directory, prepare_directory

log = logging.getLogger(__name__)

_HELP = {
    "host": "address to listen on (default 127.0.0.1)",
    "port": "port to listen on (default 8080)",
    "tls_certfile": "PEM certificate chain: serve https (with --tls-keyfile; default: http)",
    "tls_keyfile": "PEM private key of --tls-certfile, without a password",
    "upstream": "origin of the VLM Run API (default https://api.vlm.run)",
    "cache_dir": "cache directory (default: the user's cache directory)",
    "max_size": "upper bound on cached bytes, e.g. 512MiB or 10GiB (default 10GiB)",
    "max_object_size": "larger artifacts stream through uncached (default max-size / 4)",
    "memory_cache_size": "hot small entries kept in memory per worker (default 64MiB; 0: none)",
    "proof_ttl": "how long an upstream 200 proves access to a scope (default 1h)",
    "offline_proof_ttl": "while the API is unreachable, proofs this old still count (default 7d)",
    "access_check": "scope (one check per session/execution) or object (per artifact)",
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
    "artifact_connections": "upstream connections for fills and access checks (default 80)",
    "max_fills_per_key": "fills one API key may run at once; more stream uncached (default 32)",
    "max_passthrough_per_key": "passed-through requests per API key at once (default 50)",
    "max_waiters_per_key": "clients of one API key following fills at once (default 512)",
    "fill_timeout": "longest a fill may take before it is abandoned (default 1h)",
    "fill_min_rate": "slowest a fill may run, per second, before it is abandoned (default 16KiB)",
    "fill_rate_window": "the window fill_min_rate is averaged over (default 60s)",
    "body_timeout": "longest silence in a client's upload before a 408 (default 30s)",
    "upload_min_rate": "slowest a client's upload may arrive, per second (default 16KiB)",
    "max_query_length": "longest artifact query string (default 4096)",
    "max_header_bytes": "longest request head; longer get 431 (default 64KiB)",
    "max_header_line": "longest line of a request head; longer get 431 (default 8KiB)",
    "max_headers": "most header fields in a request; more get 431 (default 100)",
    "max_client_connections": "client connections at once per process; more get 503 (default 1000)",
    "header_timeout": "time to receive a request head from its first byte (default 10s)",
    "send_timeout": "longest a response waits for its client to read more of it (default 60s)",
    "min_free_space": "disk space to keep free; fetches beyond it are not stored (default 256MiB)",
    "shutdown_timeout": "how long shutdown waits for running fetches (default 10s)",
    "chunk_size": "bytes per read when serving from disk (default 1MiB)",
    "http": "auto, h11 or httptools (default auto: httptools when installed)",
    "workers": "server processes sharing the port and the cache, or auto: one per core (default 1)",
    "log_level": "critical, error, warning, info or debug (default info)",
    "log_format": "access log lines as text or json (default text)",
    "access_log": "one line per request on stdout: true or false (default true)",
    "secret_file": "file with the HMAC secret every replica shares (or $VLMRUN_CACHE_SECRET)",
    "redis_url": "shared tier: redis://host:6379/0, rediss:// (TLS) or unix:// (default: none)",
    "redis_password_file": "file holding the Redis password (keeps it out of the URL)",
    "redis_cluster": "redis_url names a node of a Redis Cluster: true or false (default false)",
    "redis_prefix": "prefix of every Redis key (default vlmrun-cache:v1:)",
    "redis_timeout": "longest one Redis call may take (default 50ms)",
    "redis_breaker_threshold": "consecutive Redis failures that open its breaker (default 3)",
    "redis_breaker_cooldown": "how long the open Redis breaker skips Redis (default 5s)",
    "shared_max_object_size": "larger artifacts stay out of Redis (default 64MiB)",
    "shared_ttl": "how long an artifact stays in Redis (default 7d)",
    "redis_buffer_size": "Redis hits up to this size are read whole before answering (1MiB)",
    "redis_lease_ttl": "life of a fleet fetch lease, renewed while it runs (default 10s)",
    "prefetch": "fetch the artifacts an answer names before the client asks: true or false "
    "(default true)",
    "prefetch_max_object_size": "larger artifacts are not prefetched (default 64MiB)",
    "prefetch_concurrency": "prefetches at once, besides the clients' fills (default 4)",
    "prefetch_per_key": "prefetches one API key may run at once (default 2)",
    "prefetch_scan_limit": "bytes of one answer read for artifact references (default 1MiB)",
}


_SETTINGS = (
    f"Settings: defaults < the file named by ${BASE_CONFIG_ENV} < --config file "
    "< VLMRUN_CACHE_<KEY> environment variables < flags."
)
_START_HERE = """\
start here:
  vlmrun-cache serve        run the proxy on http://127.0.0.1:8080
  export VLMRUN_BASE_URL=http://127.0.0.1:8080/v1
                            in the shell that runs your agent (unchanged vlmrun SDK code)
  vlmrun-cache doctor       check the settings, the cache directory and the API

Run without a command, vlmrun-cache prints this help and exits with status 2."""


def _add_settings(command: argparse.ArgumentParser) -> None:
    """``--config FILE`` and one flag per setting, as ``serve`` takes them."""
    command.add_argument("--config", metavar="FILE", help="TOML file (see config.example.toml)")
    for key in KEYS:
        command.add_argument(flag_name(key), dest=key, metavar="VALUE", help=_HELP[key])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmrun-cache",
        description="A local caching reverse proxy for the VLM Run API.",
        epilog=_START_HERE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    serve = commands.add_parser(
        "serve", help="run the proxy", description=f"Run the proxy. {_SETTINGS}"
    )
    _add_settings(serve)
    healthcheck = commands.add_parser(
        "healthcheck",
        help="exit 0 if the running proxy answers /healthz, else 1",
        description=f"Dial the address that serve recorded in <cache_dir>/{ADDRESS_FILE} and GET "
        "/healthz; exit 0 on 200, else 1. The cache directory is found as serve finds it.",
    )
    healthcheck.add_argument("--config", metavar="FILE", help="TOML file (see config.example.toml)")
    healthcheck.add_argument("--cache-dir", metavar="VALUE", help=_HELP["cache_dir"])
    healthcheck.add_argument(
        "--timeout", type=float, default=2.0, metavar="SECONDS", help="per connect and read (2)"
    )
    admin.add_commands(commands)  # stats, ls, purge, verify, warm, revoke: proxy/admin/
    diagnose = commands.add_parser(
        "doctor",
        help="check the settings, the cache directory and the API; exit 1 on a problem",
        description="Check what serve needs, one line each: the settings, the port, the cache "
        "directory, free disk space, the cache index and the upstream API (GET /v1/health "
        "without credentials). Exit 1 if any check finds a problem, else 0. Safe beside a "
        f"running proxy. {_SETTINGS}",
    )
    _add_settings(diagnose)
    diagnose.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="for the API check (5)"
    )
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
        "access_log": False,  # ours is proxy/accesslog.py
        # The proxy never looks at the client's address or scheme: uvicorn's X-Forwarded-*
        # rewriting (on by default for clients on 127.0.0.1) would only cost a dict per request.
        "proxy_headers": False,
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


def is_loopback(host: str) -> bool:
    """True if ``host`` is reachable from this machine only; any other name counts as exposed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_clear_text(config: Config) -> None:
    """One WARNING when clients' API keys would cross the network unencrypted."""
    if not config.tls_certfile and not is_loopback(config.host):
        log.warning(
            "listening on %s without TLS: API keys sent to this proxy cross the network in "
            "clear text; set tls_certfile and tls_keyfile, or bind 127.0.0.1 behind a TLS "
            "terminator",
            config.host,
        )


#: In the cache directory: where ``serve`` listens, as JSON ``{"scheme", "host", "port"}``.
ADDRESS_FILE = "serve.json"


def write_address_file(config: Config) -> Path:
    """Record the address this server will listen on in ``<cache_dir>/serve.json`` (mode 0600).

    Written atomically (a temporary file, then a rename). It is left behind at exit: a stale file
    names an address where nothing answers, which is what a health check should then report.
    """
    directory = Path(config.cache_dir)
    # Created only if missing, as the app's start-up would: owner-only (secret, proofs).
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{ADDRESS_FILE}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:  # mkstemp makes it 0600
            scheme = "https" if config.tls_certfile else "http"
            json.dump({"scheme": scheme, "host": config.host, "port": config.port}, out)
        os.replace(temporary, directory / ADDRESS_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return directory / ADDRESS_FILE


def own_server(scheme: str, host: str, port: int, timeout: float) -> http.client.HTTPConnection:
    """A connection to the server recorded in our own cache directory. Over TLS its certificate
    is not verified: what matters is that our own process answers, not who signed it (only
    ``/healthz`` and ``/metrics`` are asked, without a credential)."""
    if scheme == "http":
        return http.client.HTTPConnection(host, port, timeout=timeout)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return http.client.HTTPSConnection(host, port, timeout=timeout, context=context)


class Unhealthy(Exception):
    """The proxy did not answer its health check; the message says why."""


def dial_host(host: str) -> str:
    """The address to dial for a server listening on ``host``: a wildcard listens on loopback."""
    wildcards = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}  # noqa: S104 (dialled)
    return wildcards.get(host, host)


def origin_url(scheme: str, host: str, port: int) -> str:
    """``scheme://host:port``, an IPv6 address in brackets."""
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def check_health(cache_dir: str | Path, timeout: float = 2.0) -> str:
    """GET ``/healthz`` at the address recorded in ``cache_dir``; its URL if it answered 200.

    Raises :class:`Unhealthy` if there is no address, nothing answers within ``timeout`` seconds
    (per connect and per read), or the answer is not 200.
    """
    path = Path(cache_dir) / ADDRESS_FILE
    try:
        address = json.loads(path.read_text(encoding="utf-8"))
        scheme, host, port = str(address["scheme"]), str(address["host"]), int(address["port"])
    except FileNotFoundError:
        raise Unhealthy(f"{path} does not exist: the proxy has not started here") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Unhealthy(f"{path} cannot be read: {exc!r}") from None
    if scheme not in ("http", "https"):
        raise Unhealthy(f"{path}: scheme {scheme!r} is not supported")
    host = dial_host(host)
    url = f"{origin_url(scheme, host, port)}/healthz"
    connection = own_server(scheme, host, port, timeout)
    try:
        connection.request("GET", "/healthz")
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        raise Unhealthy(f"{url}: {exc!r}") from None
    finally:
        connection.close()
    if status != 200:
        raise Unhealthy(f"{url} answered {status}")
    return url


def listen_problem(config: Config) -> str | None:
    """Why ``serve`` could not listen where it is told, in one line that says what to change;
    None if it can. Asked before the banner and ``serve.json``: a second ``serve`` on a taken
    port must neither announce an address it never gets nor overwrite the running server's
    record, and uvicorn's own message (errno 98, exit 3) does not say what to do."""
    error = doctor.bind_error(config)
    if error is None:
        return None
    if error.errno == errno.EADDRINUSE and doctor.proxy_answers(config):
        why = "a proxy already answers there (vlmrun-cache stats shows it)"
        return doctor.cannot_listen(config, error, why)
    return doctor.cannot_listen(config, error)


def serve(config: Config) -> None:
    configure_logging(config.log_level)
    warn_if_clear_text(config)
    try:
        write_address_file(config)
    except OSError as exc:  # the app's start-up will fail on the directory and say why
        log.warning("cannot record the listening address in %s: %s", config.cache_dir, exc)
    announce(config)
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
        ssl_certfile=config.tls_certfile or None,
        ssl_keyfile=config.tls_keyfile or None,
        log_level=config.log_level,
        timeout_graceful_shutdown=30,
        # uvicorn kills a worker whose ping goes unanswered this long (default 5 s): on a busy
        # small machine a GIL-heavy moment (hashing, SQLite) must not cost in-flight requests.
        timeout_worker_healthcheck=30,
        **uvicorn_options(config),
    )


def _flags(args: argparse.Namespace) -> dict[str, str | None]:
    if args.command == "healthcheck":
        return {"cache_dir": args.cache_dir}
    return {key: getattr(args, key) for key in KEYS}


def _load(args: argparse.Namespace) -> Config:
    """The settings, merged as every command merges them (see ``_SETTINGS``)."""
    base = os.environ.get(BASE_CONFIG_ENV) or None
    return load(args.config, os.environ, _flags(args), base=base)


def _sources(args: argparse.Namespace) -> list[str]:
    """Where settings came from, by name only (no value), lowest precedence first."""
    sources = []
    if base := os.environ.get(BASE_CONFIG_ENV):
        sources.append(f"base file {base}")
    if args.config:
        sources.append(f"file {args.config}")
    variables = [env_name(key) for key in KEYS if env_name(key) in os.environ]
    if variables:
        sources.append(f"environment ({', '.join(variables)})")
    flags = [flag_name(key) for key, value in _flags(args).items() if value is not None]
    if flags:
        sources.append(f"flags ({', '.join(flags)})")
    return sources


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _run(argv)
        sys.stdout.flush()  # here, so that a reader gone early is caught below
        return code
    except BrokenPipeError:
        # `vlmrun-cache ls --json | head`: the reader has what it wanted; no traceback. stdout
        # now points at /dev/null, so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _unrecognized(command: str | None, unknown: list[str]) -> str:
    """argparse's message, and for a setting given to an operator command, where it goes."""
    message = f"unrecognized arguments: {' '.join(unknown)}"
    flags = {flag_name(key): key for key in KEYS}
    settings = [flags[arg.split("=", 1)[0]] for arg in unknown if arg.split("=", 1)[0] in flags]
    if command in admin.COMMANDS and settings:
        key = settings[0]
        message += (
            f"\n`{command}` takes settings from --config FILE and the environment only: set "
            f"{env_name(key)}, or `{key} = ...` in the file, as for the server it works beside"
        )
    return message


def _run(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(_unrecognized(args.command, unknown))
    if args.command is None:  # a first try: lead to serve rather than fail with a usage error
        parser.print_help()
        return 2
    if args.command in admin.COMMANDS:  # they never create or prepare a cache directory
        return admin.run(args)
    if args.command == "doctor":
        return doctor.run(lambda: _load(args), _sources(args), args.timeout, sys.stdout)
    checking = args.command == "healthcheck"
    try:
        config = _load(args)
        if checking:  # the same rules for the directory, but a health check creates nothing
            inspect_directory(config.cache_dir)
        elif problem := listen_problem(config):
            print(f"vlmrun-cache: {problem}", file=sys.stderr)
            return 2
        else:  # before uvicorn starts: an unsafe directory is one clean line, not a traceback
            prepare_directory(config.cache_dir)
    except ConfigError as exc:
        print(f"vlmrun-cache: invalid setting {exc}", file=sys.stderr)
        return 1 if checking else 2  # a health check exits 0 or 1 (Docker reserves 2)
    if checking:
        try:
            print(f"healthy: {check_health(config.cache_dir, args.timeout)}")
        except Unhealthy as exc:
            print(f"vlmrun-cache: unhealthy: {exc}", file=sys.stderr)
            return 1
        return 0
    serve(config)
    return 0
