"""The long-lived parts the routes share, opened and closed by the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
import stat
import tempfile
import threading
import time
from pathlib import Path

import anyio.to_thread

from proxy.access import ANY_SCOPE, AccessProofs, ProofScope, shared_secret
from proxy.config import Config, ConfigError
from proxy.fills import Fills
from proxy.fleet import Fleet
from proxy.metrics import Metrics
from proxy.passthrough import Passthrough
from proxy.prefetch import Prefetcher
from proxy.prefetch.scheduler import LogRecord
from proxy.store import Store
from proxy.store.chain import Chain, DiskTier
from proxy.store.claims import Claims
from proxy.store.disk import TOUCH_FLUSH_SECONDS, DiskStore
from proxy.store.memory import MemoryTier
from proxy.store.redisclient import guarded
from proxy.store.shared import SharedTier
from proxy.threads import run_sync
from proxy.upstream import Upstream

#: The names the proxy keeps in its cache directory, and the type each must have. None of them
#: may be a symbolic link: through one, fills would write, sweeps delete, or the HMAC secret be
#: read and chmod'ed somewhere else.
OWNED_NAMES = {
    "secret": stat.S_IFREG,  # proxy/access.py
    "access": stat.S_IFDIR,  # proxy/access.py
    "splits.jsonl": stat.S_IFREG,  # proxy/access.py
    "revocations.jsonl": stat.S_IFREG,  # proxy/access.py
    "tmp": stat.S_IFDIR,  # proxy/store/disk.py
    "entries": stat.S_IFDIR,  # proxy/store/disk.py
    "locks": stat.S_IFDIR,  # proxy/store/claims.py
}


log = logging.getLogger(__name__)

#: Housekeeping rounds (of TOUCH_FLUSH_SECONDS) between sweeps of expired proofs in memory.
PROOF_EXPIRY_ROUNDS = 60


class CacheDirError(ConfigError):
    """The cache directory cannot be used safely; the message starts with ``cache_dir``."""


#: Ends every refusal: the three ways to point the proxy elsewhere.
_HOW_TO_CHANGE = "to change it: cache_dir in a config file, VLMRUN_CACHE_CACHE_DIR, or --cache-dir"
#: Prefix of the empty file that checks that the directory takes writes (removed at once).
WRITE_CHECK_PREFIX = ".write-check-"


def _refuse(why: str) -> CacheDirError:
    return CacheDirError(f"cache_dir: {why} ({_HOW_TO_CHANGE})")


def prepare_directory(path: str) -> Path:
    """Create the cache directory, or check an existing one and the names we keep in it.

    A missing directory is created 0700 (missing parents get the default mode). An existing one
    must be a directory of the current user that group and others cannot write: it holds the
    HMAC secret and credentials' proofs. Its mode is never changed (it may be someone's /tmp).
    ``path`` itself may be a symbolic link (the user's choice); names inside it may not.
    Last, an empty file is created in it and removed, so that a directory that does not take
    writes (permissions, a read-only file system) is refused here and not at the first fill.
    Raises :class:`CacheDirError`, whose message says what is wrong and what to do, to refuse.
    """
    directory = Path(path)
    try:
        directory.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        _check_existing(directory)
    except OSError as exc:
        raise _refuse(f"cannot create {directory}: {_why_not(directory, exc)}") from None
    for name, kind in OWNED_NAMES.items():
        _check_owned(directory / name, kind)
    check_writable(directory)
    return directory


def inspect_directory(path: str) -> Path:
    """Check an existing cache directory for an operator's command, changing nothing.

    The same rules as :func:`prepare_directory`, but a missing directory is refused, not
    created, and a loose subdirectory is reported, not tightened. Raises :class:`CacheDirError`.
    """
    directory = Path(path)
    _check_existing(directory)
    for name, kind in OWNED_NAMES.items():
        _check_owned(directory / name, kind, tighten=False)
    return directory


def check_writable(directory: Path) -> None:
    """Create an empty file in ``directory`` and remove it; refuse if that fails."""
    try:
        fd, name = tempfile.mkstemp(prefix=WRITE_CHECK_PREFIX, dir=directory)
    except OSError as exc:
        raise _refuse(f"{directory} does not take writes: {_why_not(directory, exc)}") from None
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def _why_not(directory: Path, exc: OSError) -> str:
    """What ``exc``, raised creating ``directory`` or a file in it, means for the user."""
    if exc.errno == errno.EROFS:
        return "it is on a read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"no permission (this process runs as uid {os.getuid()})"
    if exc.errno == errno.ENOTDIR:
        blocker = in_the_way(directory)
        if blocker is not None:
            return f"{blocker} is a file, not a directory"
    if exc.errno == errno.ENOSPC:
        return "the disk is full"
    return exc.strerror or str(exc)


def in_the_way(directory: Path) -> Path | None:
    """The first ancestor of ``directory`` (or itself) that exists but is not a directory."""
    for path in (*reversed(directory.absolute().parents), directory.absolute()):
        try:
            if not stat.S_ISDIR(path.stat().st_mode):
                return path
        except OSError:  # missing from here down, or not ours to look at
            return None
    return None


def _check_existing(directory: Path) -> None:
    try:
        info = directory.stat()
    except OSError as exc:
        raise _refuse(f"cannot use {directory}: {_why_not(directory, exc)}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise _refuse(f"{directory} is not a directory; choose a directory path")
    if info.st_uid != os.getuid():
        raise _refuse(
            f"{directory} belongs to uid {info.st_uid}, not to this user (uid {os.getuid()}); "
            "choose a directory of your own, or a new path (it is created 0700)"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _refuse(
            f"{directory} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}) "
            "and would hold the proxy's secret; choose a new path (it is created 0700), "
            f"or run chmod go-w {directory} if the directory is yours alone"
        )


def _check_owned(path: Path, kind: int, tighten: bool = True) -> None:
    """Refuse a symbolic link or a wrong type at ``path``; a directory of ours that others can
    enter (left by an older version) is made 0700 through a descriptor, never by path (with
    ``tighten``; refused without)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return  # created 0700 (0600 for the secret) by whoever keeps it
    except OSError as exc:
        raise _refuse(f"cannot use {path}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise _refuse(
            f"{path} is a symbolic link, which the proxy never follows inside its cache "
            "directory; remove the link, or choose another cache_dir"
        )
    if stat.S_IFMT(info.st_mode) != kind:
        wanted = "directory" if kind == stat.S_IFDIR else "regular file"
        raise _refuse(f"{path} is not a {wanted}; remove it, or choose another cache_dir")
    if info.st_uid != os.getuid():
        raise _refuse(f"{path} belongs to uid {info.st_uid}; remove it or choose another cache_dir")
    if kind == stat.S_IFDIR and info.st_mode & 0o077:
        if not tighten:
            raise _refuse(
                f"{path} can be entered by others (mode {stat.S_IMODE(info.st_mode):o}); "
                "starting the server makes it 0700"
            )
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            raise _refuse(f"cannot open {path}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)


def sweep_at_low_priority(store: Store) -> None:
    """Lower this thread's priority (on Linux a thread has its own nice value), then sweep."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    store.sweep_orphans()


class Services:
    """Config and metrics from construction; the rest exists between :meth:`open` and close."""

    store: Store
    chain: Chain
    access: AccessProofs
    upstream: Upstream
    fills: Fills
    prefetcher: Prefetcher
    passthrough: Passthrough

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.serving = False
        #: Where prefetches are logged (the access log's ``put``), if it is on.
        self.access_log: LogRecord | None = None

    async def open(self) -> None:
        config = self.config
        directory = await run_sync(prepare_directory, config.cache_dir)
        self.store = await run_sync(
            lambda: DiskStore(
                directory,
                max_bytes=config.max_size,
                max_object_bytes=config.object_size_limit,
                on_evict=self.metrics.evicted,
                on_reset=self.metrics.store_failures.labels("index").inc,
                on_evict_unread=self.metrics.prefetch_evicted_unread_bytes.inc,
            )
        )
        # Once per server start; fills running in other processes hold locks and are spared.
        await run_sync(self.store.sweep_temporary)
        secret = await run_sync(shared_secret, config.secret_file, os.environ)
        self.chain = Chain(
            MemoryTier(config.memory_cache_size, config.memory_cache_size // 64),
            DiskTier(
                self.store,
                config.chunk_size,
                self.metrics.integrity_failures.inc,
                config.min_free_space,
            ),
            self._shared_tier(secret),
        )
        self.access = await run_sync(
            AccessProofs, directory, config.proof_ttl, config.offline_proof_ttl, secret
        )
        self.upstream = Upstream(config)
        self.fills = Fills(
            config,
            self.upstream,
            self.store,
            self.access,
            self.metrics,
            Claims(directory),
            self.chain.publish,
            self.share_proofs,
            self._fleet(),
        )
        self.prefetcher = Prefetcher(
            config, self.fills, self.store, self.access, self.upstream, self.metrics
        )
        self.prefetcher.access_log = self.access_log
        self.passthrough = Passthrough(
            self.upstream,
            self.metrics,
            self.access,
            config,
            self.prefetcher if config.prefetch else None,
        )
        self._housekeeping = asyncio.create_task(self._flush_touches_periodically())
        # After start-up, not during it: the scan is proportional to the number of entries.
        self._sweep = asyncio.create_task(self._sweep_once())
        self.serving = True

    def _shared_tier(self, secret: bytes | None) -> SharedTier | None:
        """The Redis tier, when ``redis_url`` is set (config validation ensured a secret). It
        connects on first use: a Redis that is down at start-up delays nothing."""
        config = self.config
        if not config.redis_url or secret is None:
            return None
        errors = self.metrics.redis_errors
        call = guarded(config, lambda kind: errors.labels(kind).inc())
        writes = self.metrics.redis_writes
        return SharedTier.configured(
            config,
            secret,
            call,
            on_reject=errors.labels("rejected").inc,
            on_write=lambda result: writes.labels(result).inc(),
        )

    def _fleet(self) -> Fleet | None:
        """Fleet single-flight (:mod:`proxy.fleet`), on the shared tier's guarded connection."""
        shared = self.chain.shared
        if shared is None:
            return None
        config, metrics = self.config, self.metrics
        return Fleet(
            shared.call,
            shared.names,
            lease_ttl=config.redis_lease_ttl,
            entry_ttl=config.shared_ttl,
            max_object_bytes=config.shared_max_object_size,
            on_lease=lambda outcome: metrics.leases.labels(outcome).inc(),
            on_write=lambda result: metrics.redis_writes.labels(result).inc(),
        )

    def share_proofs(self, fingerprint: str | None, *scopes: ProofScope) -> None:
        """Proofs just recorded here, for the other replicas (in the background)."""
        shared = self.chain.shared
        if shared is None or fingerprint is None:
            return
        life = min(self.config.offline_proof_ttl, self.config.shared_ttl)
        shared.share_proofs(fingerprint, (*scopes, ANY_SCOPE), time.time(), life)

    async def shared_proof(self, fingerprint: str | None, scope: ProofScope) -> bool:
        """Whether another replica recorded a live proof for ``fingerprint`` and ``scope``
        (then it is kept here too). Refusals are never shared: there are none to find."""
        shared = self.chain.shared
        if shared is None or fingerprint is None:
            return False
        proven = await shared.proven_at(fingerprint, scope)
        if proven is None:
            return False
        return await run_sync(self.access.adopt, fingerprint, scope, proven)

    async def _sweep_once(self) -> None:
        """The orphan sweep, by one worker process per server start, in a thread of its own
        at the lowest priority (not one of anyio's, which would keep that priority)."""
        if await run_sync(self.store.claim_sweep):
            threading.Thread(
                target=sweep_at_low_priority, args=(self.store,), name="orphan-sweep", daemon=True
            ).start()

    async def _flush_touches_periodically(self) -> None:
        """Every :data:`TOUCH_FLUSH_SECONDS`: persist access times, pick up scopes another
        worker process split (so a split reaches every worker within that time), and delete a
        bounded batch of expired proofs from disk; now and then, from memory too."""
        rounds = 0
        while True:
            await anyio.sleep(TOUCH_FLUSH_SECONDS)
            await run_sync(self.store.flush_touches)
            await run_sync(self.access.refresh)
            await run_sync(self._expire_proofs)
            rounds += 1
            if rounds % PROOF_EXPIRY_ROUNDS == 0:
                await run_sync(self.access.forget_stale)

    def _expire_proofs(self) -> None:
        try:
            self.access.expire()
        except sqlite3.Error as exc:  # locked by another worker's batch: the next round
            log.debug("expired proofs not deleted this round: %s", exc)

    async def close(self) -> None:
        self.serving = False
        self._housekeeping.cancel()
        self._sweep.cancel()
        self.prefetcher.close()
        await self.fills.aclose()
        await self.chain.aclose()
        await self.upstream.aclose()
        await run_sync(self.store.close)
        await run_sync(self.access.close)
