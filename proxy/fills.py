"""Single-flight fills: one upstream fetch per key, streamed to every waiting client as it grows.

A :class:`Fill` runs as its own task, detached from the request that started it, so a client that
disconnects does not waste the download. It tees the upstream body into a temporary file and
publishes its progress; any number of readers follow the growing file with ``pread`` on one shared
descriptor, each at its own pace (a slow reader never slows the fill). The entry is committed only
if upstream answered 200, the body completed and its length matches ``Content-Length``.

Readers hold back the final byte until the fill has finished committing, so a client that has the
whole body can rely on the next request being a hit, and a body cut short is never delivered whole.

When the disk cannot take the body, nothing is lost: if that is known before the first byte (too
little free space for the announced length, or no temporary file), the open upstream response is
handed to one reader to stream through directly and the others fetch on their own; if a write
fails half-way, the rest of the body is kept in memory (up to :data:`MEMORY_TAIL_LIMIT`) for the
readers already following.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, BinaryIO

import anyio
import anyio.to_thread
import httpx

from proxy.access import AccessProofs
from proxy.config import Config
from proxy.errors import ProxyError
from proxy.integrity import BodyDigests
from proxy.keys import ArtifactKey
from proxy.metrics import Metrics
from proxy.store import EntryMeta, FillFile, Store
from proxy.upstream import Answer, Upstream, read_answer, translate

log = logging.getLogger(__name__)

#: Bytes a fill keeps in memory for its readers after its file stopped taking writes.
MEMORY_TAIL_LIMIT = 32 * 1024**2


class FillFailed(Exception):
    """The fill broke after streaming began; readers must abort their responses."""


class Fill:
    """The shared state of one running fetch. All attributes change on the event loop only."""

    def __init__(self, key: ArtifactKey, fingerprint: str | None) -> None:
        self.key = key
        #: HMAC of the credential upstream is being asked with.
        self.fingerprint = fingerprint
        #: Set once the upstream's status is known (or the request failed).
        self.started = asyncio.Event()
        #: Before ``started``: the failure to reach upstream, if any.
        self.error: ProxyError | None = None
        #: A non-200 answer, replayable to the same credential.
        self.answer: Answer | None = None
        #: A 200 response nobody tees: the first reader to :meth:`take_direct` streams it.
        self._direct: httpx.Response | None = None
        self.content_type = "application/octet-stream"
        self.expected_length: int | None = None
        self.written = 0
        #: True once every byte is written and the length checked.
        self.complete = False
        #: True once the fill is over, committed or not; readers may then send the last byte.
        self.done = False
        self.readers = 0
        self._progress = asyncio.Event()
        self._fd: int | None = None
        self._refs = 1  # the fill's own, dropped when it ends
        #: Offset where the in-memory tail starts, once the file stopped taking writes.
        self._tail_start: int | None = None
        self._tail = bytearray()

    # -- progress -----------------------------------------------------------------------------

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def changed(self) -> None:
        """Wait until ``written``, ``complete`` or ``done`` changes."""
        await self._progress.wait()

    # -- readers ------------------------------------------------------------------------------

    @property
    def streaming(self) -> bool:
        """True when a 200 body is (or was) being written and readers can follow it."""
        return self._fd is not None

    def join(self) -> Reader:
        """Register a reader, before awaiting anything; close the reader when done."""
        self._refs += 1
        self.readers += 1
        return Reader(self)

    def _release(self) -> None:
        self._refs -= 1
        if self._refs == 0 and self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def take_direct(self) -> httpx.Response | None:
        """The untee'd upstream response, for exactly one caller; it must close it."""
        response, self._direct = self._direct, None
        return response

    async def chunks(self, chunk_size: int) -> AsyncIterator[bytes]:
        """The body as it grows. Raises FillFailed if the fill breaks before the end.

        The caller must have joined before the fill started, and checked :attr:`streaming`.
        """
        fd = self._fd
        assert fd is not None
        offset = 0
        while True:
            available = self.written if self.done else self.written - 1
            if offset < available:
                size = min(chunk_size, available - offset)
                tail_start = self._tail_start
                if tail_start is not None and offset >= tail_start:
                    data = bytes(self._tail[offset - tail_start : offset - tail_start + size])
                else:
                    if tail_start is not None:
                        size = min(size, tail_start - offset)
                    data = await anyio.to_thread.run_sync(os.pread, fd, size, offset)
                if len(data) != size:
                    raise FillFailed("temporary file shrank under a reader")
                offset += size
                yield data
            elif self.done:
                if not self.complete:
                    raise FillFailed("upstream body did not complete")
                return
            else:
                await self.changed()


class Reader:
    """One client's hold on a fill; :meth:`close` is idempotent."""

    def __init__(self, fill: Fill) -> None:
        self.fill = fill
        self._open = True

    def close(self) -> None:
        if self._open:
            self._open = False
            self.fill._release()


class Fills:
    """The registry of running fills, at most one per key and ``max_fills`` in all."""

    def __init__(
        self,
        config: Config,
        upstream: Upstream,
        store: Store,
        access: AccessProofs,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._upstream = upstream
        self._store = store
        self._access = access
        self._metrics = metrics
        self._running: dict[ArtifactKey, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, key: ArtifactKey) -> Fill | None:
        return self._running.get(key)

    def __len__(self) -> int:
        return len(self._running)

    @property
    def full(self) -> bool:
        return len(self._running) >= self._config.max_fills

    def start(self, key: ArtifactKey, authorization: str | None, fingerprint: str | None) -> Fill:
        assert key not in self._running
        fill = Fill(key, fingerprint)
        self._running[key] = fill
        self._spawn(self._run(fill, authorization), f"fill {key.object_id}")
        return fill

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Wait up to ``shutdown_timeout`` for running fills, then cancel the rest.

        A cancelled fill leaves no entry: commits are atomic and its temporary file is removed.
        """
        if not self._tasks:
            return
        with anyio.move_on_after(self._config.shutdown_timeout):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the fill task ------------------------------------------------------------------------

    async def _run(self, fill: Fill, authorization: str | None) -> None:
        started_at = time.monotonic()
        temp: FillFile | None = None
        response: httpx.Response | None = None
        try:
            request = self._upstream.artifact_request(fill.key, authorization)
            response = await self._upstream.send(request, artifact=True)
            if response.status_code != 200:
                fill.answer = await read_answer(response)
                return
            self._remember_proof(fill)
            fill.content_type = response.headers.get("content-type", fill.content_type)
            fill.expected_length = _content_length(response)
            temp = await self._begin(fill.expected_length)
            if temp is None:
                fill._direct, response = response, None  # the reader that takes it closes it
                return
            fill._fd = os.open(temp.path, os.O_RDONLY)
            fill.started.set()
            digests = await self._tee(fill, response, temp.file)
            self._metrics.upstream_fetch.observe(time.monotonic() - started_at)
            if fill.expected_length is not None and fill.written != fill.expected_length:
                raise FillFailed(f"body ended at {fill.written} of {fill.expected_length} bytes")
            fill.complete = True
            fill._notify()
            if fill._tail_start is None:
                meta = EntryMeta(
                    fill.content_type, fill.written, digests.sha256, time.time(), digests.xxh3
                )
                pending, temp = temp, None
                await self._commit(fill.key, pending, meta)
        except ProxyError as exc:
            self._metrics.upstream_errors.inc()
            fill.error = exc
        except FillFailed as exc:
            self._metrics.upstream_errors.inc()
            log.warning("fill of %s failed: %s", fill.key.object_id, exc)
        except Exception:
            log.exception("fill of %s failed unexpectedly", fill.key.object_id)
        finally:
            if response is not None:
                await response.aclose()
            if temp is not None:
                await anyio.to_thread.run_sync(self._store.discard, temp)
            fill.done = True
            fill.started.set()
            self._running.pop(fill.key, None)
            fill._release()
            fill._notify()

    async def _begin(self, length: int | None) -> FillFile | None:
        """A temporary file for a body of ``length`` bytes, or None if the disk cannot take it."""
        directory = getattr(self._store, "directory", None)
        try:
            if directory is not None:
                free = (await anyio.to_thread.run_sync(shutil.disk_usage, directory)).free
                if free - (length or 0) < self._config.min_free_space:
                    self._metrics.store_failures.labels("no_space").inc()
                    return None
            return await anyio.to_thread.run_sync(self._store.begin_fill)
        except OSError as exc:
            log.warning("cannot start a fill (%s); streaming through uncached", exc.strerror)
            self._metrics.store_failures.labels("write").inc()
            return None

    async def _tee(self, fill: Fill, response: httpx.Response, out: BinaryIO) -> BodyDigests:
        """Copy the body to ``out`` as it arrives, publishing progress; returns its digests."""
        digests = BodyDigests()

        def write(chunk: bytes) -> None:
            digests.update(chunk)
            out.write(chunk)
            out.flush()  # readers pread the file: bytes must be in the page cache

        try:
            async for chunk in response.aiter_raw():  # as they arrive: no re-chunking delay
                if fill._tail_start is None:
                    try:
                        await anyio.to_thread.run_sync(write, chunk)
                    except OSError as exc:
                        self._spill(fill, exc)
                else:
                    digests.update(chunk)
                if fill._tail_start is not None:
                    fill._tail += chunk
                    if len(fill._tail) > MEMORY_TAIL_LIMIT:
                        raise FillFailed("disk full and the rest does not fit in memory")
                fill.written += len(chunk)
                fill._notify()
        except httpx.HTTPError as exc:
            raise FillFailed(str(translate(exc).detail)) from exc
        return digests

    def _spill(self, fill: Fill, exc: OSError) -> None:
        """The file stopped taking writes: keep the rest in memory, never commit."""
        log.warning(
            "fill of %s: disk write failed (%s); not caching it", fill.key.object_id, exc.strerror
        )
        self._metrics.store_failures.labels("write").inc()
        # Whatever part of the failed chunk reached the file is ignored: readers switch to
        # memory exactly at the last fully written offset.
        fill._tail_start = fill.written

    async def _commit(self, key: ArtifactKey, temp: FillFile, meta: EntryMeta) -> None:
        try:
            await anyio.to_thread.run_sync(self._store.commit, key.cache_key, temp, meta)
        except OSError as exc:  # readers already have every byte; only the cache misses out
            log.warning("could not store %s: %s", key.object_id, exc.strerror or exc)
            self._metrics.store_failures.labels("commit").inc()

    def _remember_proof(self, fill: Fill) -> None:
        self._spawn(
            anyio.to_thread.run_sync(
                self._access.record, fill.fingerprint, fill.key.scope_kind, fill.key.scope_id
            ),
            "record proof",
        )


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)
