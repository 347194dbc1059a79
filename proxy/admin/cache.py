"""Opening a cache directory for an operator's command, which a server may be using right now.

Opening changes nothing: the directory is checked, never created or chmod'ed; the index is read
through :class:`proxy.store.index.Index` (diskcache is not opened, nothing is swept, a damaged
database is reported and left for the server to move aside); the HMAC secret is only read. And a
command runs as the directory's owner only: anything it writes (the revocation list, SQLite's
journal) stays a file the server can open.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import pwd
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from proxy.admin.output import rfc3339
from proxy.config import Config
from proxy.keys import ArtifactKey
from proxy.metrics import OUTCOMES, TIERS
from proxy.services import CacheDirError, inspect_directory
from proxy.store import EntryMeta
from proxy.store.index import ENTRIES_DIR, Index, IndexedEntry

#: Entries removed per index transaction, so a running server's commits wait only briefly.
_REMOVE_BATCH = 256


class Failed(Exception):
    """The command cannot go on; the message says why, ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Stored:
    """One entry as listed: its index row, key and metadata (None when unreadable)."""

    row: IndexedEntry
    #: None for an entry stored under another key layout (an older version).
    key: ArtifactKey | None
    meta: EntryMeta | None

    @classmethod
    def of(cls, row: IndexedEntry) -> Stored:
        meta = None
        if row.tag is not None:
            try:
                meta = EntryMeta.from_json(row.tag)
            except (TypeError, ValueError, KeyError):
                meta = None
        return cls(row, ArtifactKey.from_cache_key(row.key), meta)

    def to_json(self) -> dict[str, Any]:
        """The entry as documented for ``ls --json``."""
        key, meta = self.key, self.meta
        return {
            "scope_kind": None if key is None else key.scope_kind,
            "scope_id": None if key is None else key.scope_id,
            "object_id": None if key is None else key.object_id,
            "owner": None if key is None else key.owner,
            "content_type": None if meta is None else meta.content_type,
            "length": self.row.size if meta is None else meta.length,
            "sha256": None if meta is None else meta.sha256,
            "stored_at": None if meta is None else rfc3339(meta.stored_at),
            "last_access": rfc3339(self.row.access_time),
        }


class Cache:
    """A checked cache directory; see the module docstring. Methods block."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.index = Index(directory / ENTRIES_DIR)

    def entries(self) -> list[Stored]:
        """Every entry (none before a server ever stored one)."""
        if not self.index.exists():
            return []
        try:
            return [Stored.of(row) for row in self.index.entries()]
        except sqlite3.DatabaseError as exc:
            raise self._unreadable(exc) from None

    def remove(self, entries: Iterable[Stored]) -> list[Stored]:
        """Remove the entries still as listed; returns those removed (see Index.remove)."""
        pending = list(entries)
        removed: list[Stored] = []
        try:
            for start in range(0, len(pending), _REMOVE_BATCH):
                batch = {s.row.rowid: s for s in pending[start : start + _REMOVE_BATCH]}
                done = self.index.remove(s.row for s in batch.values())
                removed += [batch[row.rowid] for row in done]
        except sqlite3.DatabaseError as exc:
            raise self._unreadable(exc) from None
        return removed

    def _unreadable(self, exc: sqlite3.DatabaseError) -> Failed:
        return Failed(
            f"the cache index {self.index.db_path} cannot be used ({exc}); nothing was changed. "
            "A damaged index is moved aside by the server when it next reads it (the cache then "
            "starts empty)"
        )


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def open_cache(config: Config) -> Cache:
    """The cache directory ``config`` names, checked without changing anything.

    Raises :class:`Failed`: code 2 if there is no such directory, 1 if it is another user's or
    unsafe (the reasons ``serve`` would refuse it for).
    """
    directory = Path(config.cache_dir)
    try:
        owner = directory.stat().st_uid
    except FileNotFoundError:
        raise Failed(
            f"cache_dir: {directory} does not exist (commands never create it); give the "
            "directory serve uses with --cache-dir, --config or VLMRUN_CACHE_CACHE_DIR",
            code=2,
        ) from None
    except OSError as exc:
        raise Failed(
            f"cache_dir: cannot look at {directory} ({exc.strerror}); run this command as the "
            "user who owns the cache"
        ) from None
    if owner != os.getuid():
        raise Failed(
            f"cache_dir: {directory} belongs to {_user(owner)}, and this command runs as "
            f"{_user(os.getuid())}; files it wrote there could not be opened by the server. "
            "Run it as the owner (e.g. sudo -u <owner>, or docker exec -u <uid>)"
        )
    try:
        return Cache(inspect_directory(str(directory)))
    except CacheDirError as exc:
        raise Failed(str(exc)) from None


@dataclasses.dataclass(frozen=True)
class ServerFigures:
    """What the running server's /metrics says (summed over its workers)."""

    url: str
    #: Artifact requests the cache could answer: every outcome but ``error``.
    requests: int
    #: Hits and coalesced requests: answered without a fetch of their own.
    hits: int
    #: Artifact requests answered with an error (a bad request, a refused key, the API down).
    errors: int
    bytes_saved: int
    max_bytes: int
    #: Hits by the tier that answered them (memory, disk).
    hits_by_tier: dict[str, int]

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.requests if self.requests else None


def server_address(cache_dir: Path) -> tuple[str, str, int] | None:
    """(scheme, host to dial, port) that ``serve`` recorded in the cache directory, if any."""
    # proxy.cli wires these commands in, so it is imported by the time they run.
    from proxy.cli import ADDRESS_FILE, dial_host

    try:
        address = json.loads((cache_dir / ADDRESS_FILE).read_text(encoding="utf-8"))
        return str(address["scheme"]), dial_host(str(address["host"])), int(address["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def server_figures(cache_dir: Path, timeout: float = 2.0) -> ServerFigures | None:
    """The figures of the server using ``cache_dir``, or None if none answers where it said."""
    address = server_address(cache_dir)
    if address is None or address[0] not in ("http", "https"):
        return None
    scheme, host, port = address
    from proxy.cli import origin_url, own_server  # proxy.cli wires these commands in

    url = origin_url(scheme, host, port)

    connection = own_server(scheme, host, port, timeout)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        if response.status != 200:
            return None
        text = response.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    samples: dict[tuple[str, str], float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                label = labels.get("outcome") or labels.get("source") or labels.get("tier") or ""
                samples[(sample.name, label)] = sample.value
    except ValueError:
        return None
    counts = {o: int(samples.get(("vlmrun_cache_requests_total", o), 0)) for o in OUTCOMES}
    return ServerFigures(
        url=url,
        requests=sum(n for outcome, n in counts.items() if outcome != "error"),
        hits=counts["hit"] + counts["coalesced"],
        errors=counts["error"],
        bytes_saved=sum(
            int(samples.get(("vlmrun_cache_served_bytes_total", source), 0))
            for source in ("cache", "shared")
        ),
        max_bytes=int(samples.get(("vlmrun_cache_max_bytes", ""), 0)),
        hits_by_tier={
            tier: hits
            for tier in TIERS
            if (hits := int(samples.get(("vlmrun_cache_hits_total", tier), 0))) or tier != "redis"
        },
    )
