"""``stats``, ``ls``, ``purge``, ``verify`` and ``revoke``: the commands that work on the cache
directory itself (``warm`` goes through the proxy: :mod:`proxy.admin.warm`).

Each takes the parsed arguments and the resolved settings, prints its result, and returns the
exit status or raises :class:`proxy.admin.cache.Failed`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.access import Revocations, existing_secret, fingerprint_with, shared_secret
from proxy.admin import shared
from proxy.admin.cache import Cache, Failed, Stored, open_cache, server_figures
from proxy.admin.output import Progress, confirm, human_size, local_time, rfc3339, table
from proxy.config import Config, ConfigError
from proxy.integrity import BodyDigests
from proxy.store import RECHECK_SECONDS

#: Bytes read at a time while verifying.
_READ_SIZE = 1024 * 1024


def _scope(stored: Stored) -> str:
    key = stored.key
    if key is None:
        return "(older key layout)"
    owner = "" if key.owner is None else f" (copy of {key.owner[:8]})"
    return f"{key.scope_kind} {key.scope_id}{owner}"


def _rows(entries: list[Stored]) -> list[list[str]]:
    """One table row per entry: scope, object, type, size, when stored, when last read."""
    return [
        [
            _scope(s),
            "-" if s.key is None else s.key.object_id,
            "-" if s.meta is None else s.meta.content_type,
            human_size(s.row.size),
            "-" if s.meta is None else local_time(s.meta.stored_at),
            local_time(s.row.access_time),
        ]
        for s in entries
    ]


_HEADERS = ("SCOPE", "OBJECT", "TYPE", "SIZE", "STORED", "LAST READ")


def _sorted(entries: list[Stored]) -> list[Stored]:
    return sorted(entries, key=lambda s: (s.key is None, _scope(s), s.key and s.key.object_id))


# -- stats ------------------------------------------------------------------------------------


def stats(args: argparse.Namespace, config: Config) -> int:
    cache = open_cache(config)
    entries = cache.entries()
    stored_at = [s.meta.stored_at for s in entries if s.meta is not None]
    server = server_figures(cache.directory)
    # What the running server enforces wins over what the settings say now.
    max_bytes = server.max_bytes if server is not None and server.max_bytes else config.max_size
    total = sum(s.row.size for s in entries)
    other_layout = sum(s.key is None for s in entries)
    result: dict[str, Any] = {
        "cache_dir": str(cache.directory),
        "entries": len(entries),
        "bytes": total,
        "max_bytes": max_bytes,
        "oldest_stored_at": rfc3339(min(stored_at)) if stored_at else None,
        "newest_stored_at": rfc3339(max(stored_at)) if stored_at else None,
        "other_layout_entries": other_layout,
        "server": None,
        "redis": None,
    }
    redis_line = ""
    if config.redis_url:
        try:
            result["redis"] = found = shared.stats(config)
            redis_line = (
                f"{_entries(found['entries'])}, {human_size(found['bytes'])} at {found['url']} "
                f"(keys {found['prefix']}*)"
            )
        except Failed as exc:
            redis_line = str(exc)
    if server is not None:
        result["server"] = {
            "url": server.url,
            "requests": server.requests,
            "hits": server.hits,
            "errors": server.errors,
            "hit_rate": server.hit_rate,
            "bytes_saved": server.bytes_saved,
            "hits_by_tier": server.hits_by_tier,
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    lines = [
        ["cache directory", str(cache.directory)],
        [
            "entries",
            f"{len(entries)}"
            + (f" ({other_layout} of an older key layout)" if other_layout else ""),
        ],
        ["size", f"{human_size(total)} of {human_size(max_bytes)} ({total / max_bytes:.1%})"],
        ["oldest", local_time(min(stored_at)) if stored_at else "-"],
        ["newest", local_time(max(stored_at)) if stored_at else "-"],
    ]
    if redis_line:
        lines.append(["redis", redis_line])
    if server is None:
        lines.append(["server", "not answering at the address serve recorded"])
    else:
        rate = "-" if server.hit_rate is None else f"{server.hit_rate:.1%}"
        lines.append(["server", server.url])
        tiers = ", ".join(f"{n} from {tier}" for tier, n in server.hits_by_tier.items())
        errors = f"; {server.errors} answered with an error, not counted" if server.errors else ""
        lines.append(["hit rate", f"{rate} ({server.hits} of {server.requests} requests{errors})"])
        lines.append(["hits", tiers])
        lines.append(["bytes saved", human_size(server.bytes_saved)])
    print("\n".join(f"{name:<16} {value}" for name, value in lines))
    return 0


# -- ls ---------------------------------------------------------------------------------------


def _selector(args: argparse.Namespace) -> Callable[[Stored], bool]:
    """Which entries ``--session``, ``--execution``, ``--object`` and ``--older-than`` name."""
    if getattr(args, "session", None) is not None:
        return lambda s: (
            s.key is not None
            and (s.key.scope_kind, s.key.scope_id)
            == (
                "session",
                args.session,
            )
        )
    if getattr(args, "execution", None) is not None:
        return lambda s: (
            s.key is not None
            and (s.key.scope_kind, s.key.scope_id)
            == (
                "execution",
                args.execution,
            )
        )
    if getattr(args, "object", None) is not None:
        return lambda s: s.key is not None and s.key.object_id == args.object
    if getattr(args, "older_than", None) is not None:
        cutoff = time.time() - args.older_than
        return lambda s: s.row.access_time < cutoff
    return lambda s: True


def ls(args: argparse.Namespace, config: Config) -> int:
    everything = open_cache(config).entries()
    entries = _sorted([s for s in everything if s.key is not None and _selector(args)(s)])
    if args.json:
        print(json.dumps([s.to_json() for s in entries], indent=2))
        return 0
    if entries:
        print(table(_HEADERS, _rows(entries)))
    print(f"{_entries(len(entries))}, {human_size(sum(s.row.size for s in entries))}")
    other_layout = sum(s.key is None for s in everything)
    if other_layout:
        print(f"(and {_entries(other_layout)} of an older key layout, never served; purge --all)")
    return 0


def _entries(count: int) -> str:
    return f"{count} {'entry' if count == 1 else 'entries'}"


# -- purge ------------------------------------------------------------------------------------


def purge(args: argparse.Namespace, config: Config) -> int:
    cache = open_cache(config)
    selected = [s for s in cache.entries() if _selector(args)(s)]
    size = sum(s.row.size for s in selected)
    if not selected and not config.redis_url:
        print("nothing to remove")
        return 0
    what = f"{_entries(len(selected))} ({human_size(size)}) from {cache.directory}"
    if config.redis_url:
        what += " and the matching entries in Redis"
    if not args.yes:
        if not sys.stdin.isatty():
            raise Failed(f"would remove {what}; without a terminal to ask on, give --yes")
        if not confirm(f"Remove {what}?"):
            print("nothing removed")
            return 1
    removed = cache.remove(selected)
    if removed:  # until then a worker may still serve a memory copy it checked just before
        time.sleep(RECHECK_SECONDS)
    freed = sum(s.row.size for s in removed)
    print(f"removed {_entries(len(removed))}, {freed} bytes ({human_size(freed)})")
    if len(removed) < len(selected):
        print(
            f"{_entries(len(selected) - len(removed))} changed meanwhile (evicted, or stored "
            "again by a fill that finished) and left as they are"
        )
    if config.redis_url:  # else the next disk miss of any replica brings them back
        deleted = shared.purge(args, config)
        if deleted is None:
            print("Redis keeps its own recency: its entries expire after shared_ttl, or by LRU")
        else:
            print(f"removed {_entries(deleted)} from Redis")
    return 0


# -- verify -----------------------------------------------------------------------------------


def _problem(cache: Cache, stored: Stored, progress: Progress) -> str | None:
    """What is wrong with an entry's bytes, or None: re-hash the whole file."""
    meta, path = stored.meta, cache.index.path(stored.row)
    if meta is None:
        return "metadata"
    if path is None:
        return "file name"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "unreadable"
    try:
        if os.fstat(fd).st_size != meta.length:
            return "length"
        digests = BodyDigests()
        while data := os.read(fd, _READ_SIZE):
            digests.update(data)
            progress.advance(len(data))
    except OSError:
        return "unreadable"
    finally:
        os.close(fd)
    if digests.sha256 != meta.sha256 or (meta.xxh3 and digests.xxh3 != meta.xxh3):
        return "digest"
    return None


def verify(args: argparse.Namespace, config: Config) -> int:
    cache = open_cache(config)
    entries = cache.entries()
    started = time.monotonic()
    progress = Progress("verify", len(entries), sum(s.row.size for s in entries))
    damaged: list[tuple[Stored, str]] = []
    for stored in entries:
        problem = _problem(cache, stored, progress)
        # Removed at once, and only if still the entry that was read: one a fill replaced
        # meanwhile, or that was evicted, is no damage of ours to report.
        if problem is not None and cache.remove([stored]):
            damaged.append((stored, problem))
            if not args.json:
                progress.note(f"damaged ({problem}), removed: {_scope(stored)} {_object(stored)}")
        progress.advance(items=1)
    progress.finish()
    checked = sum(s.row.size for s in entries)
    if args.json:
        report = {
            "checked": len(entries),
            "bytes": checked,
            "damaged": [{**s.to_json(), "problem": problem} for s, problem in damaged],
            "removed": len(damaged),
        }
        print(json.dumps(report, indent=2))
    else:
        elapsed = time.monotonic() - started
        print(
            f"verified {_entries(len(entries))} ({human_size(checked)}) in {elapsed:.1f} s: "
            + (f"{len(damaged)} damaged, removed" if damaged else "all intact")
        )
    return 1 if damaged else 0


def _object(stored: Stored) -> str:
    return "-" if stored.key is None else stored.key.object_id


# -- revoke -----------------------------------------------------------------------------------


def _authorization(key_file: str) -> str:
    """The ``Authorization`` value a client sends with the key in ``key_file``."""
    try:
        key = Path(key_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise Failed(f"--key-file: cannot read {key_file}: {exc}", code=2) from None
    if not key or "\n" in key:
        raise Failed(f"--key-file: {key_file} should hold one API key", code=2)
    return key if key.startswith("Bearer ") else f"Bearer {key}"


def revoke(args: argparse.Namespace, config: Config) -> int:
    cache = open_cache(config)
    now = time.time()
    if args.all:
        Revocations.append(cache.directory, None, now)
        time.sleep(RECHECK_SECONDS)  # every worker has looked at the list again by now
        print(
            f"revoked every access proof recorded in {cache.directory} until {rfc3339(now)}; "
            "each key's next request is checked with the API"
        )
        if config.redis_url:  # or this replica would adopt them again from Redis
            print(f"removed {shared.forget_proofs(config)} proof records from Redis")
        return 0
    authorization = _authorization(args.key_file)
    try:
        # The replicas' shared secret names credentials when there is one.
        secret = shared_secret(config.secret_file, os.environ) or existing_secret(cache.directory)
    except (OSError, ConfigError) as exc:
        raise Failed(f"cannot read the cache's secret: {exc}") from None
    fingerprint = fingerprint_with(secret, authorization) if secret is not None else None
    if fingerprint is None:
        print(f"no proof was ever recorded in {cache.directory} (it has no secret): nothing to do")
        return 0
    Revocations.append(cache.directory, fingerprint, now)
    time.sleep(RECHECK_SECONDS)
    print(
        f"revoked the access proofs of the key in {args.key_file} (fingerprint "
        f"{fingerprint[:12]}...) recorded until {rfc3339(now)}; its next request is checked "
        "with the API"
    )
    return 0
