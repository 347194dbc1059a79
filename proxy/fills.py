"""Single-flight fills: one upstream fetch per key, streamed to every waiting client as it grows.

A :class:`Fill` runs as its own task, detached from the request that started it, so a client that
disconnects does not waste the download. It tees the upstream body into a temporary file and
publishes its progress; any number of readers follow the growing file with ``pread`` on one shared
descriptor, each at its own pace (a slow reader never slows the fill). The entry is committed only
if upstream answered 200, the body completed and its length matches ``Content-Length``.

Readers hold back the final byte until the fill has finished committing, so a client that has the
whole body can rely on the next request being a hit, and a body cut short is never delivered whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import BinaryIO

import anyio.to_thread
import httpx

from proxy.access import AccessProofs
from proxy.config import Config
from proxy.errors import ProxyError
from proxy.keys import ArtifactKey
from proxy.metrics import Metrics
from proxy.store import EntryMeta, FillFile, Store
from proxy.upstream import Answer, artifact_request, open_stream, read_answer, translate

log = logging.getLogger(__name__)


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
        #: A non-200 answer, replayable; ``fallback`` when it was too large to keep.
        self.answer: Answer | None = None
        self.fallback = False
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

    # -- progress ---------------------------------------------------------------------------

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def changed(self) -> None:
        """Wait until ``written``, ``complete`` or ``done`` changes."""
        await self._progress.wait()

    # -- the shared read descriptor ---------------------------------------------------------

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
    """The registry of running fills, at most one per key."""

    def __init__(
        self,
        config: Config,
        client: httpx.AsyncClient,
        store: Store,
        access: AccessProofs,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._client = client
        self._store = store
        self._access = access
        self._metrics = metrics
        self._running: dict[ArtifactKey, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, key: ArtifactKey) -> Fill | None:
        return self._running.get(key)

    def __len__(self) -> int:
        return len(self._running)

    def start(self, key: ArtifactKey, authorization: str | None, fingerprint: str | None) -> Fill:
        assert key not in self._running
        fill = Fill(key, fingerprint)
        self._running[key] = fill
        task = asyncio.create_task(self._run(fill, authorization), name=f"fill {key.object_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill

    async def aclose(self) -> None:
        """Let running fills finish (they hold no client hostage); cancel them on a second call."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, fill: Fill, authorization: str | None) -> None:
        started_at = time.monotonic()
        temp: FillFile | None = None
        try:
            request = artifact_request(self._client, self._config, fill.key, authorization)
            async with open_stream(self._client, request) as response:
                if response.status_code != 200:
                    fill.answer = await read_answer(response)
                    fill.fallback = fill.answer is None
                    return
                self._remember_proof(fill)
                fill.content_type = response.headers.get("content-type", fill.content_type)
                fill.expected_length = _content_length(response)
                temp = await anyio.to_thread.run_sync(self._store.begin_fill)
                fill._fd = os.open(temp.path, os.O_RDONLY)
                fill.started.set()
                sha256 = await self._tee(fill, response, temp.file)
            self._metrics.upstream_fetch.observe(time.monotonic() - started_at)
            if fill.expected_length is not None and fill.written != fill.expected_length:
                raise FillFailed(f"body ended at {fill.written} of {fill.expected_length} bytes")
            fill.complete = True
            fill._notify()
            meta = EntryMeta(fill.content_type, fill.written, sha256, time.time())
            pending, temp = temp, None
            await anyio.to_thread.run_sync(self._store.commit, fill.key.cache_key, pending, meta)
        except ProxyError as exc:
            self._metrics.upstream_errors.inc()
            fill.error = exc
        except FillFailed as exc:
            self._metrics.upstream_errors.inc()
            log.warning("fill of %s failed: %s", fill.key.object_id, exc)
        except OSError as exc:
            # A failed commit leaves complete readers unharmed; a failed write aborts them;
            # before streaming began, readers fall back to passing the request through.
            log.warning("fill of %s: disk error %s", fill.key.object_id, exc.strerror)
        except Exception:
            log.exception("fill of %s failed unexpectedly", fill.key.object_id)
        finally:
            if temp is not None:
                with contextlib.suppress(OSError):
                    await anyio.to_thread.run_sync(self._store.discard, temp)
            fill.done = True
            fill.started.set()
            self._running.pop(fill.key, None)
            fill._release()
            fill._notify()

    async def _tee(self, fill: Fill, response: httpx.Response, out: BinaryIO) -> str:
        """Copy the body to ``out`` as it arrives, publishing progress; returns its sha256."""
        sha256 = hashlib.sha256()

        def write(chunk: bytes) -> None:
            out.write(chunk)
            out.flush()  # readers pread the file: bytes must be in the page cache
            sha256.update(chunk)

        try:
            async for chunk in response.aiter_raw():  # as they arrive: no re-chunking delay
                await anyio.to_thread.run_sync(write, chunk)
                fill.written += len(chunk)
                fill._notify()
        except httpx.HTTPError as exc:
            raise FillFailed(str(translate(exc).detail)) from exc
        return sha256.hexdigest()

    def _remember_proof(self, fill: Fill) -> None:
        task = asyncio.create_task(
            anyio.to_thread.run_sync(
                self._access.record, fill.fingerprint, fill.key.scope_kind, fill.key.scope_id
            )
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)
