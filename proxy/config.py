"""Settings: defaults < base TOML file < TOML file < environment (``VLMRUN_CACHE_<KEY>``) < flags.

The base file is an installation's own defaults (the container image's address and cache
directory), named by :data:`BASE_CONFIG_ENV`; the user's ``--config`` file and environment
outrank it.

Everything is parsed once into a frozen :class:`Config`; an invalid value raises
:class:`ConfigError` whose message names the offending key, so start-up fails loudly.
"""

from __future__ import annotations

import dataclasses
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import platformdirs

ENV_PREFIX = "VLMRUN_CACHE_"
#: Holds the replicas' shared HMAC secret itself (not a setting: it never enters Config, which
#: is passed to worker processes and shown by ``doctor``).
SECRET_ENV = "VLMRUN_CACHE_SECRET"  # noqa: S105 (a variable's name)
#: Largest value Redis stores in one string, less room for the metadata.
REDIS_STRING_LIMIT = 512 * 1000**2 - 1024**2
#: Names the base file. Two underscores: not a setting, so ``VLMRUN_CACHE_<KEY>`` never clashes.
BASE_CONFIG_ENV = "VLMRUN_CACHE__BASE_CONFIG"

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "p": 1000**5,
    "pb": 1000**5,
    "pib": 1024**5,
}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER_WITH_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_LOG_FORMATS = ("text", "json")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class ConfigError(ValueError):
    """An invalid setting; the message starts with the key's name."""


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as ``512MiB``, ``10GiB``, ``1.5GB``, ``4096``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512MiB or 10GiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _NUMBER_WITH_UNIT.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size such as 512MiB or 10GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def format_size(size: int) -> str:
    """``size`` bytes for people: ``512 B``, ``8.0 KiB``, ``3.4 MiB``, ``10 GiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    digits = 0 if unit == "B" else 1
    return f"{value:.{digits}f}".removesuffix(".0") + f" {unit}"


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``250ms``, ``30s``, ``10m``, ``1h``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s or 1h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    match = _NUMBER_WITH_UNIT.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _DURATION_UNITS:
        raise ValueError(f"{value!r} is not a duration such as 30s, 10m or 1h")
    return float(match.group(1)) * _DURATION_UNITS[unit]


def _parse_int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    try:
        return int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None


def _parse_workers(value: object) -> int:
    """A number of server processes, or ``auto``: one per core this process may run on."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return min(64, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    return _parse_int(value)


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{value!r} is not true or false")


def _parse_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def default_cache_dir() -> str:
    """The per-user cache directory, e.g. ``~/.cache/vlmrun-artifact-cache`` on Linux."""
    return platformdirs.user_cache_dir("vlmrun-artifact-cache", appauthor=False)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of the proxy. Sizes are bytes, durations seconds."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: PEM certificate chain and private key: both set, the proxy serves https; neither, http.
    tls_certfile: str = ""
    tls_keyfile: str = ""
    upstream: str = "https://api.vlm.run"
    cache_dir: str = dataclasses.field(default_factory=default_cache_dir)
    max_size: int = 10 * 1024**3
    #: 0 means a quarter of ``max_size``; use :attr:`object_size_limit` for the effective value.
    max_object_size: int = 0
    #: Hot small entries kept in memory by each worker process (0: no memory tier).
    memory_cache_size: int = 64 * 1024**2
    proof_ttl: float = 3600.0
    #: "scope": one upstream 200 proves access to a whole session/execution; "object": to one
    #: artifact (for deployments that cannot rely on scope ids being unique across accounts).
    access_check: str = "scope"
    #: While the API cannot be reached, proofs up to this old still serve hits (and /v1/health).
    offline_proof_ttl: float = 7 * 86400.0
    connect_timeout: float = 5.0
    #: Time for an artifact fetch to get its response headers, per attempt.
    first_byte_timeout: float = 8.0
    #: Idle read limit for artifact fetches; below the Python SDK's 30 s request timeout.
    read_timeout: float = 25.0
    #: Extra attempts for an artifact fetch that fails before its first byte (connect, 5xx).
    retries: int = 2
    #: Backoff before retry n is uniform in [0, retry_backoff * 2^(n-1)].
    retry_backoff: float = 0.25
    #: Consecutive upstream failures that open the circuit breaker.
    breaker_threshold: int = 5
    #: How long an open breaker fails requests at once before letting a probe through.
    breaker_cooldown: float = 5.0
    #: Idle read limit for everything passed through (SSE streams, uploads).
    passthrough_timeout: float = 600.0
    max_connections: int = 100
    #: Artifact fetches running at once; further misses stream through uncached.
    max_fills: int = 64
    #: Clients following one fill; further ones get 503.
    max_waiters: int = 1024
    #: Upstream connections for fills and access checks, a pool apart from passed-through traffic.
    artifact_connections: int = 80
    #: Fills one credential may run at once; its further misses stream through uncached.
    max_fills_per_key: int = 32
    #: Passed-through requests (and uncached artifact streams) per credential at once (then 429).
    max_passthrough_per_key: int = 50
    #: Clients of one credential following fills at once (then 429).
    max_waiters_per_key: int = 512
    #: Longest a fill may take in all; a longer one is abandoned (clients see a failed transfer).
    fill_timeout: float = 3600.0
    #: Slowest a fill may run, in bytes/s averaged over ``fill_rate_window``, before abandoned.
    fill_min_rate: int = 16 * 1024
    fill_rate_window: float = 60.0
    #: Longest silence in a client's request body (uploads) before it is answered 408.
    body_timeout: float = 30.0
    #: Slowest a client's request body may arrive, averaged over ``fill_rate_window`` (then 408).
    upload_min_rate: int = 16 * 1024
    #: Longest query string accepted on the artifact route.
    max_query_length: int = 4096
    #: Longest request head (request line, header fields, line ends); longer: 431.
    max_header_bytes: int = 64 * 1024
    #: Longest line of a request head, without its line end; longer: 431 (414 for the request line).
    max_header_line: int = 8 * 1024
    #: Most header fields in one request; more: 431.
    max_headers: int = 100
    #: Client connections open at once, per server process; further ones get 503 and are closed.
    max_client_connections: int = 1000
    #: Time from the first byte of a request head to its end; slower: 408 and closed.
    header_timeout: float = 10.0
    #: Longest a response may wait for its client to take more of it (the connection's send
    #: buffer full all along); then the connection is reset. nginx's send_timeout, also 60 s.
    send_timeout: float = 60.0
    #: Free disk space to keep; a fill that would eat into it streams through uncached.
    min_free_space: int = 256 * 1024**2
    #: How long shutdown waits for running fills before abandoning them.
    shutdown_timeout: float = 10.0
    #: Bytes per disk read when serving (and per message sent): 1 MiB reads serve a 50 MiB hit
    #: about 1.4x as fast as 256 KiB ones here (bench/run.py), each read being a thread hop.
    chunk_size: int = 1024 * 1024
    #: uvicorn's HTTP implementation: httptools (fast) when installed, else h11.
    http: str = "auto"
    #: Server processes sharing the port and the disk cache.
    workers: int = 1
    log_level: str = "info"
    #: Format of the access log lines on stdout: "text" (for people) or "json" (one object a line).
    log_format: str = "text"
    #: One line per request on stdout, whatever ``log_level`` says.
    access_log: bool = True
    #: A file holding the HMAC secret shared by every replica (``VLMRUN_CACHE_SECRET`` instead
    #: gives the secret itself); empty: a secret created per cache directory. Needed with Redis.
    secret_file: str = ""
    #: The shared tier (see :mod:`proxy.store.shared`): ``redis://``, ``rediss://`` (TLS) or
    #: ``unix://``; empty: no shared tier.
    redis_url: str = ""
    #: A file holding the Redis password (kept out of ``redis_url`` and so out of every display).
    redis_password_file: str = ""
    #: ``redis_url`` names a node of a Redis Cluster.
    redis_cluster: bool = False
    #: Starts every key; the ``v1`` is the layout version (old and new replicas can share Redis).
    redis_prefix: str = "vlmrun-cache:v1:"
    #: Longest one Redis call may take before it counts as a failure (no retries).
    redis_timeout: float = 0.05
    #: Consecutive Redis failures that open its breaker, and how long it stays open.
    redis_breaker_threshold: int = 3
    redis_breaker_cooldown: float = 5.0
    #: Largest artifact stored in Redis (its strings stop at 512 MB).
    shared_max_object_size: int = 64 * 1024**2
    #: How long an artifact (and a proof, up to its own age limit) stays in Redis.
    shared_ttl: float = 7 * 86400.0
    #: Redis hits up to this size are read whole before the answer starts (a failure then
    #: falls back to upstream unseen); larger ones stream.
    redis_buffer_size: int = 1024**2
    #: Life of a replica's lease on an artifact it fetches for the fleet (renewed every third of
    #: it while the fetch runs): how long others wait for a holder that died before taking over.
    redis_lease_ttl: float = 10.0
    #: Fetch the artifacts a completion or execution names before the client asks (see
    #: :mod:`proxy.prefetch`), with the requester's own credential.
    prefetch: bool = True
    #: A prefetch of a larger artifact is abandoned (unless a client has joined it).
    prefetch_max_object_size: int = 64 * 1024**2
    #: Prefetches running at once, on top of the ``max_fills`` room kept for clients.
    prefetch_concurrency: int = 4
    #: Prefetches one credential may run at once.
    prefetch_per_key: int = 2
    #: Decoded bytes of one answer read for artifact references at most.
    prefetch_scan_limit: int = 1024**2

    @property
    def object_size_limit(self) -> int:
        return self.max_object_size or self.max_size // 4

    @property
    def upstream_origin(self) -> str:
        return self.upstream.rstrip("/")


_PARSERS: dict[str, Callable[[object], Any]] = {
    "host": _parse_str,
    "port": _parse_int,
    "tls_certfile": _parse_str,
    "tls_keyfile": _parse_str,
    "upstream": _parse_str,
    "cache_dir": _parse_str,
    "max_size": parse_size,
    "max_object_size": parse_size,
    "memory_cache_size": parse_size,
    "proof_ttl": parse_duration,
    "access_check": _parse_str,
    "offline_proof_ttl": parse_duration,
    "connect_timeout": parse_duration,
    "first_byte_timeout": parse_duration,
    "read_timeout": parse_duration,
    "retries": _parse_int,
    "retry_backoff": parse_duration,
    "breaker_threshold": _parse_int,
    "breaker_cooldown": parse_duration,
    "passthrough_timeout": parse_duration,
    "max_connections": _parse_int,
    "max_fills": _parse_int,
    "max_waiters": _parse_int,
    "artifact_connections": _parse_int,
    "max_fills_per_key": _parse_int,
    "max_passthrough_per_key": _parse_int,
    "max_waiters_per_key": _parse_int,
    "fill_timeout": parse_duration,
    "fill_min_rate": parse_size,
    "fill_rate_window": parse_duration,
    "body_timeout": parse_duration,
    "upload_min_rate": parse_size,
    "max_query_length": _parse_int,
    "max_header_bytes": parse_size,
    "max_header_line": parse_size,
    "max_headers": _parse_int,
    "max_client_connections": _parse_int,
    "header_timeout": parse_duration,
    "send_timeout": parse_duration,
    "min_free_space": parse_size,
    "shutdown_timeout": parse_duration,
    "chunk_size": parse_size,
    "http": _parse_str,
    "workers": _parse_workers,
    "log_level": _parse_str,
    "log_format": _parse_str,
    "access_log": _parse_bool,
    "secret_file": _parse_str,
    "redis_url": _parse_str,
    "redis_password_file": _parse_str,
    "redis_cluster": _parse_bool,
    "redis_prefix": _parse_str,
    "redis_timeout": parse_duration,
    "redis_breaker_threshold": _parse_int,
    "redis_breaker_cooldown": parse_duration,
    "shared_max_object_size": parse_size,
    "shared_ttl": parse_duration,
    "redis_buffer_size": parse_size,
    "redis_lease_ttl": parse_duration,
    "prefetch": _parse_bool,
    "prefetch_max_object_size": parse_size,
    "prefetch_concurrency": _parse_int,
    "prefetch_per_key": _parse_int,
    "prefetch_scan_limit": parse_size,
}
KEYS = tuple(_PARSERS)


def env_name(key: str) -> str:
    """The environment variable that sets ``key``, e.g. ``VLMRUN_CACHE_PORT``."""
    return ENV_PREFIX + key.upper()


def flag_name(key: str) -> str:
    """The command-line flag that sets ``key``, e.g. ``--max-size``."""
    return "--" + key.replace("_", "-")


#: ``password=`` in a URL's query string: redis-py takes the password from there too.
_QUERY_PASSWORD = re.compile(r"(?i)([?&;]password=)[^&;#]*")


def redact_url(url: str) -> str:
    """``url`` without its password (``redis://:***@host``, ``?password=***``), for every place
    it is shown. A raw password may hold ``/ # ?`` or ``@``: everything before the last ``@``
    after the scheme is taken as user info (hiding too much is the safe side)."""
    url = _QUERY_PASSWORD.sub(r"\1***", url)
    scheme, separator, rest = url.partition("://")
    if not separator or "@" not in rest:
        return url
    userinfo, _, location = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user + ':' if colon else ''}***@{location}"


def _parses(url: str) -> bool:
    """Whether ``url`` has a host and a numeric port (or none), as redis-py will read it."""
    try:
        parts = urlsplit(url)
        return bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # "Port could not be cast to integer value as <part of a password>"
        return False


def _validate_redis(config: Config, fail: Callable[[str, str], None], has_secret: bool) -> None:
    if not config.redis_url:
        return
    parts = urlsplit(config.redis_url)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.netloc or parts.path):
        fail(
            "redis_url",
            f"{redact_url(config.redis_url)!r} is not a redis://, rediss:// or unix:// URL",
        )
    if parts.scheme in ("redis", "rediss") and not _parses(config.redis_url):
        fail(  # the URL is not shown: a password split at the wrong place is unredactable
            "redis_url",
            "does not parse as redis://[[user]:password@]host[:port][/db]; percent-encode "
            "/ # ? @ in a password, or put it in redis_password_file",
        )
    if not has_secret:
        fail(
            "redis_url",
            "replicas sharing Redis need one HMAC secret: set secret_file (the same file on "
            f"every replica) or the environment variable {SECRET_ENV}",
        )
    if "{" in config.redis_prefix or "}" in config.redis_prefix:
        fail("redis_prefix", "must not contain { or } (Redis Cluster hash tags)")
    if config.redis_timeout <= 0 or config.redis_breaker_cooldown <= 0:
        fail("redis_timeout", "redis_timeout and redis_breaker_cooldown must be larger than zero")
    if config.redis_breaker_threshold < 1:
        fail("redis_breaker_threshold", "must be at least 1")
    if not 0 < config.shared_max_object_size <= REDIS_STRING_LIMIT:
        fail("shared_max_object_size", "must be larger than zero and below 511 MB (a Redis string)")
    if config.shared_ttl < 1:
        fail("shared_ttl", "must be at least 1s")
    if config.redis_buffer_size > 64 * 1024**2:
        fail("redis_buffer_size", "must be at most 64MiB (it is held in memory per request)")
    if not 0.3 <= config.redis_lease_ttl <= 600:
        fail("redis_lease_ttl", "must be between 300ms and 10m (it is renewed every third of it)")


def _validate(config: Config, sources: Mapping[str, str], has_secret: bool = False) -> None:
    """Raise :class:`ConfigError` for the first invalid value; ``sources`` says where each
    non-default value came from, so that the message names the file, variable or flag."""

    def fail(key: str, why: str) -> None:
        where = f" (from {sources[key]})" if key in sources else ""
        raise ConfigError(f"{key}: {why}{where}")

    if not 0 < config.port < 65536:
        fail("port", f"{config.port} is not a TCP port (1-65535)")
    if config.tls_certfile and not config.tls_keyfile:
        fail("tls_keyfile", "must be set with tls_certfile (TLS needs both, or neither)")
    if config.tls_keyfile and not config.tls_certfile:
        fail("tls_certfile", "must be set with tls_keyfile (TLS needs both, or neither)")
    if config.tls_certfile:
        for key in ("tls_certfile", "tls_keyfile"):
            try:
                with open(getattr(config, key), "rb"):
                    pass
            except OSError as exc:
                fail(key, f"cannot read {getattr(config, key)}: {exc.strerror}")
        try:
            # A password-protected key is refused here rather than prompted for at start-up.
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                config.tls_certfile, config.tls_keyfile, password=b""
            )
        except ssl.SSLError as exc:
            fail(
                "tls_keyfile",
                "does not load with tls_certfile (want a PEM certificate chain and its matching "
                f"PEM key, without a password): {exc}",
            )
    parts = urlsplit(config.upstream)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        fail("upstream", f"{config.upstream!r} is not an http(s) URL such as https://api.vlm.run")
    if parts.path not in ("", "/") or parts.query:
        fail("upstream", "give the origin only (no /v1 path): requests keep their own path")
    if config.max_size <= 0:
        fail("max_size", "must be larger than zero")
    if config.max_object_size > config.max_size:
        fail("max_object_size", "cannot be larger than max_size")
    if config.proof_ttl <= 0:
        fail("proof_ttl", "must be larger than zero")
    if config.offline_proof_ttl < config.proof_ttl:
        fail("offline_proof_ttl", "cannot be shorter than proof_ttl")
    if config.access_check not in ("scope", "object"):
        fail("access_check", "must be scope or object")
    for key in (
        "connect_timeout",
        "first_byte_timeout",
        "read_timeout",
        "passthrough_timeout",
        "shutdown_timeout",
        "fill_timeout",
        "fill_rate_window",
        "body_timeout",
    ):
        if getattr(config, key) <= 0:
            fail(key, "must be larger than zero")
    for key in (
        "max_connections",
        "max_fills",
        "max_waiters",
        "breaker_threshold",
        "artifact_connections",
        "max_fills_per_key",
        "max_passthrough_per_key",
        "max_waiters_per_key",
        "prefetch_concurrency",
        "prefetch_per_key",
    ):
        if getattr(config, key) < 1:
            fail(key, "must be at least 1")
    if not 0 <= config.retries <= 10:
        fail("retries", "must be between 0 and 10")
    if config.max_query_length < 256:
        fail("max_query_length", "must be at least 256")
    if config.max_header_line < 1024:
        fail("max_header_line", "must be at least 1KiB")
    if config.max_header_bytes < config.max_header_line:
        fail("max_header_bytes", "cannot be smaller than max_header_line")
    if config.max_headers < 32:
        fail("max_headers", "must be at least 32 (SDKs send 10 to 20 headers)")
    if config.max_client_connections < 1:
        fail("max_client_connections", "must be at least 1")
    if config.header_timeout <= 0:
        fail("header_timeout", "must be larger than zero")
    if config.send_timeout <= 0:
        fail("send_timeout", "must be larger than zero")
    if not 4096 <= config.chunk_size <= 16 * 1024**2:
        fail("chunk_size", "must be between 4KiB and 16MiB")
    if config.prefetch_scan_limit < 4096:
        fail("prefetch_scan_limit", "must be at least 4KiB")
    if not 1 <= config.workers <= 64:
        fail("workers", "must be between 1 and 64")
    if config.http not in ("auto", "h11", "httptools"):
        fail("http", "must be auto, h11 or httptools")
    if config.log_level.lower() not in _LOG_LEVELS:
        fail("log_level", f"must be one of {', '.join(_LOG_LEVELS)}")
    if config.log_format not in _LOG_FORMATS:
        fail("log_format", f"must be one of {', '.join(_LOG_FORMATS)}")
    if not config.cache_dir:
        fail("cache_dir", "must not be empty")
    _validate_redis(config, fail, has_secret or bool(config.secret_file))


def _apply(
    base: dict[str, Any], values: Mapping[str, object], source: str, sources: dict[str, str]
) -> None:
    for key, raw in values.items():
        if key not in _PARSERS:
            raise ConfigError(f"{key}: unknown setting (from {source}); known: {', '.join(KEYS)}")
        try:
            base[key] = _PARSERS[key](raw)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc} (from {source})") from None
        sources[key] = source


def _apply_file(
    values: dict[str, Any], file: str | Path, source: str, sources: dict[str, str]
) -> None:
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config: cannot read {source} {file}: {exc.strerror}") from None
    try:
        _apply(values, tomllib.loads(text), f"{source} {file}", sources)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {source} {file} is not valid TOML: {exc}") from None


def load(
    file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
    base: str | Path | None = None,
) -> Config:
    """Merge defaults, the ``base`` TOML file, the TOML ``file``, ``env`` and ``flags`` (later
    wins) into a Config.

    Only environment variables named ``VLMRUN_CACHE_<KEY>`` for a known key are read; others
    (for instance the SDK's own ``VLMRUN_CACHE_DIR``) are ignored.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # where each value came from, for error messages
    if base is not None:
        _apply_file(values, base, "base file", sources)
    if file is not None:
        _apply_file(values, file, "file", sources)
    environ = os.environ if env is None else env
    for key in KEYS:
        if (name := env_name(key)) in environ:
            _apply(values, {key: environ[name]}, f"environment variable {name}", sources)
    for key, value in (flags or {}).items():
        if value is not None:
            _apply(values, {key: value}, f"flag {flag_name(key)}", sources)
    for key in ("log_level", "log_format"):
        if key in values:
            values[key] = values[key].lower()
    for key in ("cache_dir", "tls_certfile", "tls_keyfile", "secret_file", "redis_password_file"):
        if key in values:
            values[key] = os.path.expanduser(values[key])
    config = Config(**values)
    _validate(config, sources, has_secret=bool(environ.get(SECRET_ENV)))
    return config
