"""Single-flight fills: one upstream fetch per key, streamed to every waiting client as it grows
(what the clients read, :class:`~proxy.fill.Fill`, is in :mod:`proxy.fill`).

A :class:`Fill` runs as its own task, detached from the request that started it, so a client that
disconnects does not waste the download. Each upstream chunk is published at once in an in-memory
window of recent chunks, and a writer task appends the chunks to a temporary file in batches (one
worker-thread hop per batch, hashing on the way). Readers keeping pace take chunks from the
window, without touching the disk; readers further behind ``pread`` the file through one shared
descriptor. Each goes at its own pace: a slow reader never slows the fill. The entry is committed
only if upstream answered 200, the body completed and its length matches ``Content-Length``.

Readers hold back the final byte until the fill has finished committing, so a client that has the
whole body can rely on the next request being a hit, and a body cut short is never delivered whole.

When the disk cannot take the body, nothing is lost: if that is known before the first byte (too
little free space for the announced length, or no temporary file), the open upstream response is
handed to one reader to stream through directly and the others fetch on their own; if a write
fails half-way, the window stops shrinking and keeps the rest of the body (up to
:data:`MEMORY_TAIL_LIMIT`) for the readers already following.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from functools import partial
from typing import Any, BinaryIO

import anyio
import anyio.to_thread
import httpx

from proxy.access import AccessProofs
from proxy.capacity import PerKey, RateFloor
from proxy.config import Config
from proxy.decoding import DecodeError, decodable, decode
from proxy.errors import ProxyError
from proxy.fill import WINDOW_BYTES, Fill, FillFailed, PrefetchTooLarge, TooLarge
from proxy.fleet import Broadcast, Fleet, RemoteBody, RemoteFailed, resumable
from proxy.follower import FollowFailed, follow
from proxy.integrity import BodyDigests
from proxy.keys import ArtifactKey
from proxy.metrics import Metrics
from proxy.store import EntryMeta, FillFile, Store, commit, has_room
from proxy.store.batches import Batches
from proxy.store.claims import POLL_SECONDS, AlreadyStored, Announcement, Coordinator, Lease
from proxy.store.lease import Held, Stored
from proxy.threads import run_sync
from proxy.upstream import Upstream, read_answer, translate
from proxy.validators import Validators

log = logging.getLogger(__name__)

#: Bytes a fill keeps in memory for its readers after its file stopped taking writes.
MEMORY_TAIL_LIMIT = 16 * 1024**2
#: A coded body expanding more than this many times is a decompression bomb.
DECODE_RATIO_LIMIT = 200
#: How long a key whose body was too large is passed through instead of filled.
UNCACHEABLE_SECONDS = 600.0
#: Bodies of announced length up to this are kept whole in memory while they arrive and written
#: to disk in the commit's hop (see :meth:`Fills._fill_in_memory`).
SMALL_FILL = 64 * 1024


class Fills:
    """The registry of running fills, at most one per key and ``max_fills`` in all."""

    def __init__(
        self,
        config: Config,
        upstream: Upstream,
        store: Store,
        access: AccessProofs,
        metrics: Metrics,
        coordinator: Coordinator | None = None,
        publish: Callable[[str, EntryMeta], None] | None = None,
        share_proofs: Callable[[str | None, tuple[str, ...]], None] | None = None,
        fleet: Fleet | None = None,
    ) -> None:
        self._config = config
        #: Fleet single-flight through Redis (:mod:`proxy.fleet`), with a shared tier.
        self._fleet = fleet
        self._coordinator = coordinator
        #: Called after a commit: copies the entry to the shared tier (in the background).
        self._share_entry = publish
        #: Called with each proof a fill records: shares it with the other replicas.
        self._share_proofs = share_proofs
        self._upstream = upstream
        self._store = store
        self._batches = Batches(store, config.min_free_space)
        self._access = access
        self._metrics = metrics
        self._running: dict[ArtifactKey, Fill] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        #: Keys whose bodies proved too large to store, until when (time.monotonic()).
        self._uncacheable: dict[ArtifactKey, float] = {}
        #: Running fills that are prefetches: they do not count against clients' ``max_fills``.
        self._prefetching = 0
        #: Fills each credential runs (``max_fills_per_key``).
        self._per_key = PerKey(config.max_fills_per_key, "artifact fetches")
        #: Clients each credential has following fills (``max_waiters_per_key``).
        self.waiters = PerKey(config.max_waiters_per_key, "clients waiting for artifacts")

    def get(self, key: ArtifactKey) -> Fill | None:
        return self._running.get(key)

    def uncacheable(self, key: ArtifactKey) -> bool:
        """True for a while after a fill of ``key`` grew past what may be stored: its requests
        are then passed through (with whatever coding the upstream applies) instead."""
        until = self._uncacheable.get(key)
        if until is None:
            return False
        if until < time.monotonic():
            del self._uncacheable[key]
            return False
        return True

    def full(self, fingerprint: str | None) -> bool:
        """True when no fill may start for this credential: every slot is taken, or it holds
        its share of them."""
        clients = len(self._running) - self._prefetching
        return clients >= self._config.max_fills or self._per_key.full(fingerprint)

    def start(
        self,
        key: ArtifactKey,
        authorization: str | None,
        fingerprint: str | None,
        *,
        prefetch: bool = False,
        on_done: Callable[[Fill], None] | None = None,
        lease: Lease | None = None,
    ) -> Fill:
        """Start the fill of ``key`` with ``authorization`` (kept in this task's memory only).

        A ``prefetch`` counts against neither ``max_fills`` nor the credential's
        ``max_fills_per_key`` (:mod:`proxy.prefetch` bounds its own), makes one attempt, and
        is abandoned past ``prefetch_max_object_size`` unless a client joined it. ``on_done``
        is called with the fill once it is over, before any reader learns that it is. A
        ``lease`` of the key taken already (:meth:`preclaim`) is the fill's to release.
        """
        assert key not in self._running
        fill = Fill(key, fingerprint, prefetch)
        self._running[key] = fill
        if prefetch:
            self._prefetching += 1
        else:
            self._per_key.acquire(fingerprint)
        self._spawn(self._run(fill, authorization, on_done, lease), f"fill {key.object_id}")
        return fill

    def preclaim(self, key: ArtifactKey) -> Lease | None:
        """Blocks: the route calls it in the worker-thread hop of a disk lookup that found
        nothing. The key's lease for :meth:`start`, if it can be had at once (no other process
        fetches the key, none stored it meanwhile); else None, also on an error: the fill then
        claims in a hop of its own, as a prefetch's does."""
        if self._coordinator is None:
            return None
        try:
            return self._coordinator.try_now(key.cache_key, partial(self._stored, key.cache_key))
        except OSError:
            return None

    def _spawn(self, work: Coroutine[Any, Any, object], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Wait up to ``shutdown_timeout`` for running fills, then cancel the rest.

        A cancelled fill leaves no entry: commits are atomic and its temporary file is removed.
        A batch of small commits under way (:mod:`proxy.store.batches`) is waited for, queued
        ones too, so that none reaches the store after it closes.
        """
        if self._tasks:
            with anyio.move_on_after(self._config.shutdown_timeout):
                await asyncio.gather(*self._tasks, return_exceptions=True)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._batches.aclose()

    # -- the fill task ------------------------------------------------------------------------

    def adopt(self, fill: Fill) -> bool:
        """A client joins the prefetch ``fill``. True the first time, for counting.

        The fill becomes a client's fill (the prefetch's slot is freed for the next one) only
        if the credential it is fetched with has room for one more (``max_fills_per_key``): it
        then counts there. Otherwise it stays a prefetch, within the prefetcher's limits, until
        it ends or a later client joins with room: a key joining every prefetch its answers
        start must not get a fill per reference besides its share."""
        if not fill.prefetch:
            return False
        first, fill.joined = not fill.joined, True
        if fill.adopted or fill.done or self._per_key.full(fill.fingerprint):
            return first
        self._per_key.acquire(fill.fingerprint)
        fill.adopted = True
        self._prefetching -= 1
        if fill.on_adopt is not None:
            callback, fill.on_adopt = fill.on_adopt, None
            callback()
        return first

    def _abandon_prefetch(self, fill: Fill, length: int | None) -> bool:
        """True if ``fill`` is a prefetch nobody joined whose body is over its cap."""
        limit = self._config.prefetch_max_object_size
        if fill.prefetch and fill.readers == 0 and length is not None and length > limit:
            fill.abandoned = "too_large"
            return True
        return False

    async def _run(
        self,
        fill: Fill,
        authorization: str | None,
        on_done: Callable[[Fill], None] | None,
        lease: Lease | None,
    ) -> None:
        started_at = time.monotonic()
        temp: FillFile | None = None
        response: httpx.Response | None = None
        claim: Lease | None = lease
        held: Held | None = None
        broadcast: Broadcast | None = None
        try:
            got = lease if lease is not None else await self._claim(fill)
            if fill.from_store:
                return
            if isinstance(got, tuple):  # another process is fetching it: follow its file
                await follow(fill, *got, self._store, self._config.fill_timeout)
                fill.complete = True
                return
            claim = got
            fleet = await self._fleet_claim(fill)
            if fill.from_store:
                return
            if isinstance(fleet, RemoteBody):  # another replica is fetching it: follow Redis
                await self._follow_remote(fill, fleet, claim, authorization)
                return
            held = fleet
            request = self._upstream.artifact_request(fill.key, authorization)
            response = await self._upstream.send(request, artifact=True, retry=not fill.prefetch)
            fill.status = response.status_code
            if response.status_code != 200:
                fill.answer = await read_answer(response)
                return
            self._remember_proof(fill)
            validators = fill.validators = Validators.of(response)
            fill.content_type = validators.content_type
            encoding = validators.encoding
            fill.expected_length = None if encoding else validators.length
            if self._abandon_prefetch(fill, validators.length):
                return
            if held is None and self._small(validators):
                await self._fill_in_memory(fill, response, validators, started_at)
                return
            if not encoding or decodable(encoding):
                # Without a fleet lease to broadcast first, readers get the file in the same hop.
                opener = _opener(claim, fill) if held is None else None
                temp = await self._begin(fill.expected_length or validators.length, fill, opener)
            if temp is None and fill.prefetch and fill.readers == 0:  # nobody to relay it to
                large = (validators.length or 0) > self._config.object_size_limit
                fill.abandoned = "too_large" if large else "not_stored"
                return
            if temp is None:  # no room, too large, or a coding we do not undo: relay it as is
                fill._direct, response = response, None  # the reader that takes it closes it
                return  # and other processes waiting for the key fetch on their own
            if held is not None:
                broadcast = await self._broadcast(fill, held)
                held = None
                fill._fd = await run_sync(_opener(claim, fill), temp.path)
            fill.started.set()
            body = decode(encoding, response.aiter_raw()) if encoding else response.aiter_raw()
            tap = broadcast.feed if broadcast is not None else None
            digests = await self._tee(fill, body, temp.file, response if encoding else None, tap)
            self._fetched(fill, response, validators, started_at)
            assert digests is not None
            meta = _entry_meta(fill, validators)(digests)
            shared = broadcast is not None and not broadcast.stopped
            stored = False
            if not fill.disk_failed:
                pending, temp = temp, None
                stored = await self._commit(fill, pending, meta, publish=not shared)
            if broadcast is not None:  # if it fails (or failed), the committed copy is uploaded
                publish, key = self._share_entry, fill.key.cache_key
                later = None
                if shared and stored and publish is not None:
                    later = partial(publish, key, meta)
                broadcast.finish(meta, later)
                broadcast = None
        except ProxyError as exc:
            self._metrics.upstream_errors.inc()
            fill.error = exc
        except PrefetchTooLarge:
            fill.abandoned = "too_large"
        except TooLarge as exc:
            self._uncacheable[fill.key] = time.monotonic() + UNCACHEABLE_SECONDS
            self._metrics.store_failures.labels("too_large").inc()
            log.warning("fill of %s abandoned: %s; passing it through", fill.key.object_id, exc)
        except FillFailed as exc:
            self._metrics.upstream_errors.inc()
            log.warning("fill of %s failed: %s", fill.key.object_id, exc)
        except (FollowFailed, RemoteFailed) as exc:
            log.warning("following the fill of %s failed: %s", fill.key.object_id, exc)
        except Exception:
            log.exception("fill of %s failed unexpectedly", fill.key.object_id)
        finally:
            if response is not None:
                await response.aclose()
            if temp is not None:
                await run_sync(self._store.discard, temp)
            if claim is not None:
                claim.release()
            if broadcast is not None:  # the fetch failed or was abandoned
                broadcast.finish(None)
            if held is not None:
                self._spawn(held.release(), "release lease")
            fill.done = True
            fill.started.set()
            self._running.pop(fill.key, None)
            if fill.prefetch and not fill.adopted:
                self._prefetching -= 1
            else:  # a client's fill, or a prefetch a client adopted (counted there)
                self._per_key.release(fill.fingerprint)
            if on_done is not None:
                try:
                    on_done(fill)
                except Exception:
                    log.exception("after the fill of %s", fill.key.object_id)
            fill._release()
            fill._notify()

    def _small(self, validators: Validators) -> bool:
        """True for a body to keep in memory until its commit (:meth:`_fill_in_memory`)."""
        length = validators.length
        return (
            not validators.encoding
            and length is not None
            and length <= min(SMALL_FILL, self._config.object_size_limit)
        )

    async def _fill_in_memory(
        self, fill: Fill, response: httpx.Response, validators: Validators, started_at: float
    ) -> None:
        """Fetch a small body of announced length into ``fill``'s window, which keeps it whole
        (readers take it from there), then hash it, write it and commit it in one commit-thread
        hop, in a batch with the other small fills' commits waiting then
        (:mod:`proxy.store.batches`). A fill with a temporary file from the start makes two
        more hops (one to create, open and announce the file, one per batch appended), a third
        of a 1 KiB miss's cost beside a bare forwarder (bench/misses.py). Nothing is announced:
        another worker of the host wanting the key waits for the lease (a few milliseconds at
        this size), then reads the entry. Its file is not fsynced: every read verifies an entry
        this small whole (see :mod:`proxy.store`)."""
        fill.in_memory = True
        fill.started.set()
        await self._tee(fill, response.aiter_raw(), None)
        self._fetched(fill, response, validators, started_at)
        body = fill.whole_body()
        meta_of = _entry_meta(fill, validators)
        key = fill.key

        def meta() -> EntryMeta:
            digests = BodyDigests()
            digests.update(body)
            return meta_of(digests)

        entry, failure = await self._batches.write(key.cache_key, body, meta)
        if isinstance(failure, OSError):  # the commit's, as the store said for this entry
            log.warning("could not store %s: %s", key.object_id, failure.strerror or failure)
            failure = "commit"
        if failure is None:
            if self._share_entry is not None:  # off the hot path
                self._share_entry(fill.key.cache_key, entry)
            return
        fill.disk_failed = True  # not stored (a prefetch counts it so)
        if failure != "refused":
            self._metrics.store_failures.labels(failure).inc()

    def _fetched(
        self, fill: Fill, response: httpx.Response, validators: Validators, started_at: float
    ) -> None:
        """The body has arrived: check its length against the announced one, and tell readers."""
        self._metrics.upstream_fetch.observe(time.monotonic() - started_at)
        sent = response.num_bytes_downloaded
        if validators.length is not None and sent != validators.length:
            raise FillFailed(f"body ended at {sent} of {validators.length} bytes")
        fill.complete = True
        fill._notify()

    async def _claim(self, fill: Fill) -> Lease | tuple[int, Announcement] | None:
        """Make sure no other process is fetching this key (see :mod:`proxy.store.claims`).

        Returns the lease; or, when another process is fetching the key and announced its file,
        that file (open) and the announcement, to follow; or None when there is no coordinator,
        when another process stored the key meanwhile (``fill.from_store``), or after waiting
        ``first_byte_timeout`` for a holder that is slow (then we fetch regardless).
        """
        if self._coordinator is None:
            return None
        key = fill.key.cache_key
        give_up = time.monotonic() + self._config.first_byte_timeout
        stored = partial(self._stored, key)  # in the claim's own hop, with the lease held
        while True:
            patience = max(0.0, give_up - time.monotonic())
            got = await self._coordinator.claim(key, patience, stored)
            if not isinstance(got, Announcement):
                break
            fd = await run_sync(self._store.open_fill, got.name)
            if fd is not None:
                return fd, got
            await anyio.sleep(POLL_SECONDS)  # it just ended: its lock goes next
        if isinstance(got, AlreadyStored):  # another process stored it meanwhile
            fill.from_store = True
            return None
        return got

    def _stored(self, key: str) -> bool:
        """Blocks: True if the store has ``key``."""
        entry = self._store.get(key)
        if entry is None:
            return False
        entry.close()
        return True

    def _on_lease(self, outcome: str) -> None:
        self._metrics.leases.labels(outcome).inc()

    async def _fleet_claim(self, fill: Fill) -> Held | RemoteBody | None:
        """After the local claim: which replica of the fleet fetches (:mod:`proxy.fleet`).
        Sets ``fill.from_store`` when another replica already stored it in Redis."""
        if self._fleet is None:
            return None
        config = self._config
        got = await self._fleet.claim(
            fill.key.cache_key, config.first_byte_timeout, config.read_timeout
        )
        if isinstance(got, Stored):
            fill.from_store = True
            return None
        return got

    async def _broadcast(self, fill: Fill, held: Held) -> Broadcast | None:
        """Start sharing this fetch through Redis as it arrives, when the body may go there;
        otherwise tell the waiting replicas to fetch on their own."""
        assert self._fleet is not None and fill.validators is not None
        if not self._fleet.shares(fill.expected_length):
            self._spawn(held.release(unshared=True), "release lease")
            return None
        broadcast = self._fleet.broadcast(held, lambda work: self._spawn(work, "fleet"))
        length = fill.expected_length or 0
        if not await broadcast.start(fill.content_type, length, fill.validators, fill.filler):
            self._spawn(held.release(), "release lease")
            return None
        return broadcast

    async def _follow_remote(
        self, fill: Fill, remote: RemoteBody, claim: Lease | None, authorization: str | None
    ) -> None:
        """Stream another replica's fetch from Redis into this fill (and a local file, which
        other workers of this host may follow); complete only if the entry that replica
        published has exactly the bytes streamed. If that fetch stops half-way, the rest comes
        from upstream (:func:`proxy.fleet.resumable`). Before the first byte a failure leaves
        the fill unstarted: its clients then fetch on their own."""
        record = remote.record
        if self._abandon_prefetch(fill, record.expected_length):
            return
        validators = Validators.from_dict(record.validators)
        fill.content_type, fill.expected_length = record.content_type, record.expected_length
        fill.validators, fill.filler, fill.following = validators, record.filler, True
        fill.remote = True
        temp = await self._begin(record.expected_length, fill, _opener(claim, fill))
        if temp is None:
            raise RemoteFailed("no room on disk to follow another replica's fetch")
        try:
            fill.started.set()

            async def fetch() -> httpx.Response:
                request = self._upstream.artifact_request(fill.key, authorization)
                return await self._upstream.send(request, artifact=True, retry=not fill.prefetch)

            digests = await self._tee(fill, resumable(remote, fetch), temp.file)
            assert digests is not None
            meta = remote.meta
            if remote.resumed:  # upstream vouches for the bytes: a fill of our own
                self._on_lease("resumed")
                if fill.written != record.expected_length:
                    raise RemoteFailed(f"body ended at {fill.written} of {fill.expected_length}")
                meta = _entry_meta(fill, validators)(digests)
            elif meta is None or (meta.length, meta.sha256) != (fill.written, digests.sha256):
                raise RemoteFailed("the published entry has other bytes than were streamed")
            # Unread here only if this is a prefetch nobody joined (whatever the holder's was).
            meta = dataclasses.replace(meta, prefetched=fill.prefetch and fill.readers == 0)
            fill.complete = True
            fill._notify()
            if not fill.disk_failed:
                pending, temp = temp, None
                await self._commit(fill, pending, meta, publish=remote.resumed)
        finally:
            if temp is not None:
                await run_sync(self._store.discard, temp)

    async def _begin(
        self, length: int | None, fill: Fill, opener: Callable[[str], int] | None
    ) -> FillFile | None:
        """A temporary file for a body of ``length`` bytes, or None if it will not be stored
        (larger than an entry may be, or the disk cannot take it). With ``opener``
        (:func:`_opener`), also opens it for ``fill``'s readers and announces it: one
        worker-thread hop for the free space, the file, the descriptor and the announcement."""
        if length is not None and length > self._config.object_size_limit:
            return None

        def begin() -> FillFile | None:
            if not has_room(self._store, length or 0, self._config.min_free_space):
                return None
            temp = self._store.begin_fill()
            if opener is not None:
                try:
                    fill._fd = opener(temp.path)
                except BaseException:
                    self._store.discard(temp)
                    raise
            return temp

        try:
            temp = await run_sync(begin)
            if temp is None:
                self._metrics.store_failures.labels("no_space").inc()
            return temp
        except OSError as exc:
            log.warning("cannot start a fill (%s); streaming through uncached", exc.strerror)
            self._metrics.store_failures.labels("write").inc()
            return None

    async def _tee(
        self,
        fill: Fill,
        body: AsyncIterator[bytes],
        out: BinaryIO | None,
        coded: httpx.Response | None = None,
        tap: Callable[[bytes], None] | None = None,
    ) -> BodyDigests | None:
        """Publish the body chunk by chunk as it arrives while a writer task appends it to
        ``out`` in batches; returns its digests once every byte is hashed (and written).
        ``tap`` is given each chunk too (the fleet's copy to Redis; it must not block).
        Without ``out`` (a fill in memory) the window keeps the body: nothing is written or
        hashed here, and None is returned."""
        digests = BodyDigests()
        pending: list[bytes] = []
        wake = asyncio.Event()
        receiving = True

        def write(batch: bytes) -> None:
            digests.update(batch)
            if not fill.disk_failed:
                assert out is not None
                out.write(batch)
                out.flush()  # readers pread the file: bytes must be in the page cache

        async def writer() -> None:
            while receiving or pending:
                if not pending:
                    wake.clear()
                    await wake.wait()
                    continue
                batch = b"".join(pending)
                pending.clear()
                try:
                    await run_sync(write, batch)
                except OSError as exc:  # the digests already include the batch
                    self._spill(fill, exc)
                if not fill.disk_failed:
                    fill._made_durable(len(batch))
                fill._notify()

        writing = None if out is None else asyncio.create_task(writer())
        config = self._config
        now = time.monotonic()
        deadline = now + config.fill_timeout
        floor = RateFloor(config.fill_min_rate, config.fill_rate_window, now)
        try:
            async for chunk in body:  # as they arrive: no re-chunking delay
                # Silence is read_timeout's; a trickle is caught here, as each piece arrives.
                now = time.monotonic()
                if now > deadline:
                    raise FillFailed(f"took longer than fill_timeout ({config.fill_timeout:g} s)")
                if floor.too_slow(now, fill.written):
                    raise FillFailed(f"slower than fill_min_rate ({config.fill_min_rate} B/s)")
                if fill.written + len(chunk) > config.object_size_limit or (
                    coded is not None
                    and fill.written > DECODE_RATIO_LIMIT * coded.num_bytes_downloaded + 2**20
                ):  # only an unannounced or coded body gets here: its size was not known
                    raise TooLarge(
                        f"larger than an entry may be (or expands {DECODE_RATIO_LIMIT}x)"
                    )
                if self._abandon_prefetch(fill, fill.written + len(chunk)):
                    raise PrefetchTooLarge("prefetch past prefetch_max_object_size")
                expected = fill.expected_length
                if expected is not None and fill.written + len(chunk) > expected:
                    # Chunked framing beside a Content-Length (h11 follows the framing): the
                    # body is wrong already; stop before readers send bytes past the length
                    # they announced, or an in-memory fill buffers 2 MiB, not SMALL_FILL.
                    raise FillFailed(f"body longer than the announced {expected} bytes")
                fill._publish(chunk)
                if tap is not None:
                    tap(chunk)
                if writing is not None:
                    pending.append(chunk)
                    wake.set()
                while fill._window_bytes > (
                    MEMORY_TAIL_LIMIT if fill.disk_failed else 2 * WINDOW_BYTES
                ):  # the disk is behind: let it catch up; if it failed, memory is all we have
                    if fill.disk_failed or writing is None or writing.done():
                        raise FillFailed("disk full and the rest does not fit in memory")
                    await fill.changed()
        except httpx.HTTPError as exc:
            raise FillFailed(str(translate(exc).detail)) from exc
        except DecodeError as exc:
            raise FillFailed(str(exc)) from exc
        finally:
            receiving = False
            wake.set()
            if writing is not None:
                await writing
        return None if writing is None else digests

    def _spill(self, fill: Fill, exc: OSError) -> None:
        """The file stopped taking writes: keep the rest in memory, never commit."""
        log.warning(
            "fill of %s: disk write failed (%s); not caching it", fill.key.object_id, exc.strerror
        )
        self._metrics.store_failures.labels("write").inc()
        fill.disk_failed = True

    async def _commit(
        self, fill: Fill, temp: FillFile, meta: EntryMeta, publish: bool = True
    ) -> bool:
        """Store ``fill``'s entry; True if it was stored (then copied to the shared tier with
        ``publish``). If not, ``fill.disk_failed`` says so (a prefetch counts it an error)."""
        key = fill.key
        stored = False
        try:
            stored = await commit(self._store, key.cache_key, temp, meta)
        except OSError as exc:  # readers already have every byte; only the cache misses out
            log.warning("could not store %s: %s", key.object_id, exc.strerror or exc)
            self._metrics.store_failures.labels("commit").inc()
        if not stored:
            fill.disk_failed = True
            return False
        if publish and self._share_entry is not None:  # off the hot path
            self._share_entry(key.cache_key, meta)
        return True

    def _remember_proof(self, fill: Fill) -> None:
        scope = fill.key.proof_scope(self._config.access_check == "object")
        if not self._access.record(fill.fingerprint, scope, on_loop=True):  # a write is due
            self._spawn(run_sync(self._access.record, fill.fingerprint, scope), "record proof")
        if self._share_proofs is not None:
            self._share_proofs(fill.fingerprint, scope)


def _entry_meta(fill: Fill, validators: Validators) -> Callable[[BodyDigests], EntryMeta]:
    """What makes the entry of the body ``fill`` fetched from upstream itself (``fill.written``
    bytes), once given its digests: all else is read now, on the event loop."""
    content_type, length, filler = fill.content_type, fill.written, fill.fingerprint or ""
    prefetched = fill.prefetch and fill.readers == 0

    def meta(digests: BodyDigests) -> EntryMeta:
        return EntryMeta(
            content_type,
            length,
            digests.sha256,
            time.time(),
            digests.xxh3,
            validators.with_length(length),
            filler,
            prefetched=prefetched,
        )

    return meta


def _opener(claim: Lease | None, fill: Fill) -> Callable[[str], int]:
    """What opens ``fill``'s temporary file (its path, given) for its readers (a descriptor)
    and announces it under ``claim``, which tells this host's other workers which file it
    writes (they follow it). It blocks: call it from a worker thread.

    Not announced: a prefetch of unannounced size. It is abandoned at
    ``prefetch_max_object_size`` unless a client of its own process joins, which would break a
    follower's transfer; other workers wait for its claim instead, and fetch themselves if it
    is abandoned."""
    validators = fill.validators
    unannounced_size = fill.prefetch and fill.expected_length is None
    lease = None if validators is None or unannounced_size else claim

    def open_and_announce(path: str) -> int:
        fd = os.open(path, os.O_RDONLY)
        if lease is not None and validators is not None:
            announcement = Announcement(
                fill.key.cache_key,
                os.path.basename(path),
                fill.content_type,
                fill.expected_length,
                validators.to_dict(),
                fill.filler,
            )
            lease.announce(announcement)
        return fd

    return open_and_announce
