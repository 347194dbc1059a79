"""What ``serve`` says at start-up, in a few INFO lines on stderr.

Where it listens, the cache directory with its size and bound, the upstream and whether it
answers, and the one line to paste into the shell that runs an agent. The upstream is asked in a
background thread: start-up never waits for an API that is slow or unreachable. No line ever
holds a credential.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

from proxy.config import Config, format_size
from proxy.probe import HEALTH_PATH, check_upstream, display_url
from proxy.store.disk import peek_stats

log = logging.getLogger(__name__)

#: Seconds the start-up check of the upstream may take, per phase (connect, read).
UPSTREAM_CHECK_TIMEOUT = 2.0
#: Addresses that listen everywhere: clients on this machine dial loopback instead.
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 (names, not a bind)


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def listen_url(config: Config) -> str:
    """``scheme://host:port`` the server listens on (https when TLS is configured)."""
    scheme = "https" if config.tls_certfile else "http"
    return f"{scheme}://{_host_in_url(config.host)}:{config.port}"


def client_base_url(config: Config) -> str:
    """The base URL a client on this machine gives the SDK (``VLMRUN_BASE_URL``)."""
    scheme = "https" if config.tls_certfile else "http"
    host = "127.0.0.1" if config.host in _WILDCARDS else config.host
    return f"{scheme}://{_host_in_url(host)}:{config.port}/v1"


def cache_line(config: Config) -> str:
    """``<dir>: 12 entries, 3.4 MiB of 10 GiB``, read without touching a running server."""
    try:
        stats = peek_stats(config.cache_dir, config.max_size)
    except sqlite3.Error as exc:
        return f"{config.cache_dir}: its index cannot be read ({exc})"
    entries = "1 entry" if stats.entries == 1 else f"{stats.entries} entries"
    used, bound = format_size(stats.bytes), format_size(stats.max_bytes)
    return f"{config.cache_dir}: {entries}, {used} of {bound} (max_size)"


def announce(config: Config) -> threading.Thread:
    """Log the start-up lines; the upstream's answer follows from the returned thread."""
    upstream = display_url(config.upstream_origin)
    log.info("listening on %s", listen_url(config))
    log.info("cache %s", cache_line(config))
    log.info("upstream %s: checking %s in the background", upstream, HEALTH_PATH)
    if config.redis_url:
        kind = "Redis Cluster" if config.redis_cluster else "Redis"
        log.info(
            "shared tier: %s %s, keys %s* (connects on first use; serving never waits for it)",
            kind,
            display_url(config.redis_url),
            config.redis_prefix,
        )
    log.info("point clients here: export VLMRUN_BASE_URL=%s", client_base_url(config))
    thread = threading.Thread(
        target=_report_upstream, args=(config.upstream_origin,), name="upstream-check", daemon=True
    )
    thread.start()
    return thread


def _report_upstream(origin: str) -> None:
    answer = check_upstream(origin, UPSTREAM_CHECK_TIMEOUT)
    level = logging.INFO if answer.reachable else logging.WARNING
    log.log(level, "upstream %s %s", display_url(origin), answer.describe())
