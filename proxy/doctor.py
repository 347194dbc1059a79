"""``vlmrun-cache doctor``: would ``serve`` work here? One line per check, then a verdict.

Checks, in order: the settings (loaded exactly as ``serve`` loads them), the listening port, the
cache directory (safe and writable, or creatable), the free disk space, the cache index, and the
upstream API; with ``redis_url``, the shared tier. Each line starts with ``ok`` or ``problem``;
a problem says what to change. The exit status is 1 if there is any problem, else 0.

Nothing here disturbs a server running on the same cache: the index is opened read-only (no
sweep, no reset), no secret is created, and a missing directory is not created. (An existing one
gets the same checks ``serve`` makes at start-up, which create and remove one empty file.)
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx
import redis
import redis.cluster
import redis.exceptions

from proxy.access import shared_secret
from proxy.banner import client_base_url, listen_url
from proxy.config import Config, ConfigError, env_name, flag_name, format_size
from proxy.probe import check_upstream, display_url
from proxy.services import in_the_way, prepare_directory
from proxy.store.disk import peek_stats
from proxy.store.redisclient import read_password


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, whether it is fine, and the details."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'problem':<8} {self.name:<10} {self.detail}"


def _setting(key: str) -> str:
    """How to change ``key``: ``port (VLMRUN_CACHE_PORT, --port)``."""
    return f"{key} ({env_name(key)}, {flag_name(key)})"


def check_config(sources: Sequence[str]) -> Check:
    """Where the loaded settings came from, and a known mix-up of variable names."""
    detail = "loaded from " + " < ".join(["defaults", *sources])
    if "VLMRUN_CACHE_DIR" in os.environ and env_name("cache_dir") not in os.environ:
        detail += (
            "; note: VLMRUN_CACHE_DIR is the SDK's own cache, this proxy's is "
            f"{env_name('cache_dir')}"
        )
    return Check("config", True, detail)


def check_port(config: Config) -> Check:
    """Whether ``serve`` could listen where it is told to (binds and closes at once); a port
    taken by a proxy that answers ``/healthz`` is fine."""
    where = listen_url(config)
    clients = f"clients: export VLMRUN_BASE_URL={client_base_url(config)}"
    error = bind_error(config)
    if error is None:
        return Check("listen", True, f"{where} is free; {clients}")
    if error.errno == errno.EADDRINUSE and proxy_answers(config):
        return Check("listen", True, f"a proxy already answers at {where}; {clients}")
    return Check("listen", False, cannot_listen(config, error))


def bind_error(config: Config) -> OSError | None:
    """Why a socket cannot be bound where ``serve`` would listen (bound and closed at once, with
    uvicorn's ``SO_REUSEADDR``), or None."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((config.host, config.port))
    except OSError as exc:
        return exc
    return None


def cannot_listen(config: Config, error: OSError, why: str = "") -> str:
    """One line for a failed bind that says what to change."""
    if not why:
        in_use = error.errno == errno.EADDRINUSE
        why = "in use by another program" if in_use else error.strerror or str(error)
    change = f"change {_setting('port')} or {_setting('host')}"
    return f"cannot listen on {listen_url(config)}: {why}; {change}"


def proxy_answers(config: Config) -> bool:
    url = client_base_url(config).removesuffix("/v1") + "/healthz"
    try:  # our own server on this machine: that it answers matters, not who signed its cert
        response = httpx.get(url, timeout=2, verify=False, trust_env=False)  # noqa: S501
        return response.status_code == 200 and response.json() == {"status": "ok"}
    except (httpx.HTTPError, ValueError):
        return False


def check_cache_dir(config: Config) -> Check:
    """Safe and writable if it exists (the checks of ``serve``), else creatable."""
    directory = Path(config.cache_dir)
    if not directory.exists():
        return _check_creatable(directory)
    try:
        prepare_directory(config.cache_dir)
    except ConfigError as exc:
        return Check("cache_dir", False, str(exc).removeprefix("cache_dir: "))
    return Check("cache_dir", True, f"{directory}: private to this user, takes writes")


def _check_creatable(directory: Path) -> Check:
    """A missing directory: can ``serve`` create it? (Found out without creating anything.)"""
    change = f"change {_setting('cache_dir')}"
    blocker = in_the_way(directory)
    if blocker is not None:
        return Check("cache_dir", False, f"{blocker} is a file, not a directory; {change}")
    parent = _nearest_existing(directory)
    if parent is None:
        return Check("cache_dir", False, f"cannot look into the parents of {directory}; {change}")
    if os.statvfs(parent).f_flag & os.ST_RDONLY:
        return Check("cache_dir", False, f"{parent} is on a read-only file system; {change}")
    if not os.access(parent, os.W_OK | os.X_OK):
        return Check(
            "cache_dir", False, f"no permission to create {directory} in {parent}; {change}"
        )
    return Check("cache_dir", True, f"{directory} does not exist yet; serve creates it (mode 0700)")


def _nearest_existing(directory: Path) -> Path | None:
    for path in (directory.absolute(), *directory.absolute().parents):
        try:
            if path.is_dir():
                return path
        except OSError:
            return None
    return None


def check_disk(config: Config) -> Check:
    """Free space on the cache's disk against ``min_free_space``."""
    where = _nearest_existing(Path(config.cache_dir))
    if where is None:
        return Check("disk", False, f"cannot look at the disk of {config.cache_dir}")
    free = shutil.disk_usage(where).free
    detail = f"{format_size(free)} free (min_free_space {format_size(config.min_free_space)})"
    if free < config.min_free_space:
        return Check(
            "disk",
            False,
            f"{detail}: new artifacts would stream through uncached; free some space or lower "
            f"{_setting('min_free_space')}",
        )
    if free - config.min_free_space < config.max_size:
        detail += f"; the cache can grow to about {format_size(free - config.min_free_space)}"
    return Check("disk", True, detail)


def check_index(config: Config) -> Check:
    """The cache index opens read-only and answers; its size against ``max_size``."""
    try:
        stats = peek_stats(config.cache_dir, config.max_size)
    except sqlite3.Error as exc:
        return Check(
            "index",
            False,
            f"cannot read {Path(config.cache_dir) / 'entries'} ({exc}); serve sets a damaged "
            "index aside and starts cold, or remove that directory yourself",
        )
    entries = "1 entry" if stats.entries == 1 else f"{stats.entries} entries"
    size = f"{format_size(stats.bytes)} of {format_size(stats.max_bytes)} (max_size)"
    return Check("index", True, f"{entries}, {size}")


def check_api(config: Config, timeout: float) -> Check:
    """``GET /v1/health`` without credentials: reachable (a 401 counts), and how fast."""
    answer = check_upstream(config.upstream_origin, timeout)
    detail = f"{display_url(config.upstream_origin)} {answer.describe()}"
    if answer.reachable:
        return Check("upstream", True, detail)
    hint = (
        "check the network, or " if answer.status is None else "is it the VLM Run API? "
    ) + f"change {_setting('upstream')}"
    return Check("upstream", False, f"{detail}; {hint}")


def check_redis(config: Config, timeout: float) -> Check:
    """The shared tier: the secret loads, Redis answers ``PING``, and evicts as it should
    (``maxmemory`` set, ``allkeys-lru``). The URL is shown without its password."""
    shown = display_url(config.redis_url)
    try:
        shared_secret(config.secret_file, os.environ)
    except ConfigError as exc:
        return Check("redis", False, f"{exc}; serve would stop here")
    began = time.monotonic()
    try:
        options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        password = read_password(config)
        if password is not None:
            options["password"] = password
        client: Any = (
            redis.cluster.RedisCluster.from_url(config.redis_url, **options)
            if config.redis_cluster
            else redis.Redis.from_url(config.redis_url, **options)
        )
        try:
            client.ping()
            ms = (time.monotonic() - began) * 1000
            try:
                memory = client.config_get("maxmemory*")
            except redis.exceptions.ResponseError:  # CONFIG disabled (managed services)
                return Check(
                    "redis",
                    True,
                    f"{shown} answers in {ms:.0f} ms; its maxmemory settings cannot be read "
                    "here: make sure it runs with maxmemory and allkeys-lru",
                )
        finally:
            client.close()
    except (redis.exceptions.RedisError, OSError) as exc:
        return Check(
            "redis",
            False,
            f"{shown} unreachable ({type(exc).__name__}); serve still starts and serves from "
            f"memory, disk and upstream; check it or change {_setting('redis_url')}",
        )
    if isinstance(memory, dict) and "maxmemory" not in memory:  # a cluster: one per node
        memory = next(iter(memory.values()), {})
    limit = int(memory.get("maxmemory", 0) or 0)
    policy = str(memory.get("maxmemory-policy", ""))
    detail = f"{shown} answers in {ms:.0f} ms; maxmemory {format_size(limit)}, {policy}"
    if limit == 0 or policy != "allkeys-lru":
        return Check(
            "redis",
            False,
            f"{detail}; run Redis with maxmemory set and maxmemory-policy allkeys-lru, or it "
            "fills up and refuses writes",
        )
    return Check("redis", True, detail)


def run(load: Callable[[], Config], sources: Sequence[str], timeout: float, out: TextIO) -> int:
    """Print one line per check to ``out`` as it completes; 1 if any found a problem, else 0.

    ``load`` loads the settings as ``serve`` does; ``sources`` names where they came from.
    """
    checks: list[Check] = []

    def report(check: Check) -> None:
        checks.append(check)
        print(check.line(), file=out, flush=True)

    try:
        config = load()
    except ConfigError as exc:
        report(Check("config", False, f"{exc}; serve would stop here"))
    else:
        report(check_config(sources))
        report(check_port(config))
        directory = check_cache_dir(config)
        report(directory)
        report(check_disk(config))
        if directory.ok and Path(config.cache_dir).is_dir():
            report(check_index(config))
        report(check_api(config, timeout))
        if config.redis_url:
            report(check_redis(config, timeout))
    problems = sum(not check.ok for check in checks)
    if problems:
        print(f"{problems} problem{'s' if problems > 1 else ''} found", file=out)
        return 1
    print("all checks passed: vlmrun-cache serve should start here", file=out)
    return 0
