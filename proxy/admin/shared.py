"""The operator's commands on the shared tier: what ``stats`` shows of Redis and what ``purge``
deletes there (or the next disk miss of any replica would bring purged bytes back from Redis).

They use the server's own tier (:mod:`proxy.store.shared`), with a longer timeout than serving
does: an operator can wait a second or two. The Redis URL is shown without its password.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from proxy.access import shared_secret
from proxy.admin.cache import Failed
from proxy.config import Config, ConfigError
from proxy.keys import KEY_VERSION
from proxy.probe import display_url
from proxy.store.redisclient import Unavailable, guarded
from proxy.store.shared import Names, SharedTier

#: Seconds one Redis call of an operator's command may take.
ADMIN_TIMEOUT = 5.0
T = TypeVar("T")


def _run(config: Config, work: Callable[[SharedTier], Awaitable[T]]) -> T:
    """``work`` on the configured tier; :class:`Failed` if Redis cannot be used."""
    try:
        secret = shared_secret(config.secret_file, os.environ)
    except ConfigError as exc:
        raise Failed(str(exc), code=2) from None
    if secret is None:
        raise Failed("redis_url is set but no shared secret (secret_file or VLMRUN_CACHE_SECRET)")

    async def main() -> T:
        tier = SharedTier.configured(config, secret, guarded(config, timeout=ADMIN_TIMEOUT))
        try:
            return await work(tier)
        finally:
            await tier.aclose()

    try:
        return asyncio.run(main())
    except (Unavailable, OSError, ConnectionError) as exc:
        raise Failed(f"Redis at {display_url(config.redis_url)} cannot be used: {exc}") from None
    except Exception as exc:  # redis-py's own errors from scans
        raise Failed(
            f"Redis at {display_url(config.redis_url)} cannot be used: {type(exc).__name__}"
        ) from None


def stats(config: Config) -> dict[str, Any]:
    """Entries and bytes of artifacts under ``redis_prefix`` (a scan), for ``stats``."""
    entries, size = _run(config, lambda tier: tier.census())
    return {
        "url": display_url(config.redis_url),
        "prefix": config.redis_prefix,
        "entries": entries,
        "bytes": size,
    }


def pattern(args: argparse.Namespace, names: Names) -> str | None:
    """What ``purge`` deletes in Redis; None for ``--older-than`` (Redis keeps its own recency:
    entries expire after ``shared_ttl`` or go by its LRU)."""
    if getattr(args, "session", None) is not None:
        return names.scope_pattern(KEY_VERSION, "session", args.session)
    if getattr(args, "execution", None) is not None:
        return names.scope_pattern(KEY_VERSION, "execution", args.execution)
    if getattr(args, "object", None) is not None:
        return names.object_pattern(args.object)
    if getattr(args, "older_than", None) is not None:
        return None
    return names.entries_pattern()


def purge(args: argparse.Namespace, config: Config) -> int | None:
    """Delete the Redis entries ``args`` names; how many (None: ``--older-than``)."""

    async def work(tier: SharedTier) -> int | None:
        found = pattern(args, tier.names)
        return None if found is None else await tier.delete_matching(found)

    return _run(config, work)


def forget_proofs(config: Config) -> int:
    """Delete every access proof in Redis (``revoke --all``); how many."""
    return _run(config, lambda tier: tier.delete_matching(tier.names.proofs_pattern()))
