"""One running fetch as its readers see it: the shared state of a :class:`Fill`, its window of
recent chunks, and each client's :class:`Reader`. :mod:`proxy.fills` runs the fetch that feeds
it (from upstream, another worker's file or another replica through Redis); the route reads it.

Readers keeping pace take chunks from the in-memory window, without touching the disk; readers
further behind ``pread`` the temporary file through one shared descriptor. Each goes at its own
pace. Readers hold back the final byte until the fill is complete (committed, or verified
against the committed entry when followed), so a body cut short or failing its check is never
delivered whole.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import AsyncIterator, Callable

import httpx

from proxy.errors import ProxyError
from proxy.keys import ArtifactKey
from proxy.threads import run_sync
from proxy.upstream import Answer
from proxy.validators import Validators

#: Recent bytes kept in memory for readers that keep pace; also how far the disk writer may lag
#: before the fill waits for it.
WINDOW_BYTES = 1024**2


class FillFailed(Exception):
    """The fill broke after streaming began; readers must abort their responses."""


class TooLarge(FillFailed):
    """A body of unknown size grew past what may be stored (or a coded one exploded)."""


class PrefetchTooLarge(FillFailed):
    """A prefetch nobody joined passed ``prefetch_max_object_size``: not worth the bytes."""


class Fill:
    """The shared state of one running fetch. All attributes change on the event loop only."""

    def __init__(self, key: ArtifactKey, fingerprint: str | None, prefetch: bool = False) -> None:
        self.key = key
        #: Started by the proxy for a reference it saw (:mod:`proxy.prefetch`), not by a client.
        #: Until a client joins, it is abandoned past ``prefetch_max_object_size``; a client
        #: that joins it is never handed its non-200 answer (it fetches on its own instead).
        self.prefetch = prefetch
        #: True once a client adopted this prefetch (:meth:`Fills.adopt`): from then on it is a
        #: client's fill, counted in ``max_fills_per_key``, no longer as a prefetch.
        self.adopted = False
        #: True once any client joined this prefetch (its first read, counted once).
        self.joined = False
        #: Called once on adoption (the prefetcher frees the slot it held for this fill).
        self.on_adopt: Callable[[], None] | None = None
        #: Why a prefetch stopped short of storing the body ("too_large", or "not_stored" for
        #: no room or a coding we do not undo), if it did.
        self.abandoned: str | None = None
        #: HMAC of the credential of the client that started the fill.
        self.fingerprint = fingerprint
        #: HMAC of the credential upstream is asked with: ``fingerprint``, or the credential of
        #: another process's fetch this fill follows (:mod:`proxy.follower`).
        self.filler = fingerprint or ""
        #: True when the bytes come from another process's fetch.
        self.following = False
        #: True when that process is another replica, the bytes coming through Redis.
        self.remote = False
        #: Set once the upstream's status is known (or the request failed).
        self.started = asyncio.Event()
        #: Before ``started``: the failure to reach upstream, if any.
        self.error: ProxyError | None = None
        #: A non-200 answer, replayable to the same credential.
        self.answer: Answer | None = None
        #: The upstream's status, once known.
        self.status: int | None = None
        #: A 200 response nobody tees: the first reader to :meth:`take_direct` streams it.
        self._direct: httpx.Response | None = None
        self.content_type = "application/octet-stream"
        #: The body's length as clients get it (identity), when known in advance.
        self.expected_length: int | None = None
        #: What the upstream's 200 said about the body; set before ``started``.
        self.validators: Validators | None = None
        #: Bytes received and available to readers (from the window or the file).
        self.written = 0
        #: Bytes safely in the temporary file.
        self.durable = 0
        #: True once every byte is written and the length checked.
        self.complete = False
        #: True once the fill is over, committed or not; readers may then send the last byte.
        self.done = False
        self.readers = 0
        self._progress = asyncio.Event()
        self._fd: int | None = None
        self._refs = 1  # the fill's own, dropped when it ends
        #: Recent chunks as (offset, bytes); every byte at or past ``durable`` is in here.
        self._window: deque[tuple[int, bytes]] = deque()
        self._window_bytes = 0
        #: Set once the temporary file stopped taking writes (disk full, I/O error), or the
        #: commit did not store the body (refused, or failed): nothing of this fill is stored.
        self.disk_failed = False
        #: A small body with no temporary file: the window keeps every byte of it (see
        #: :meth:`proxy.fills.Fills._fill_in_memory`).
        self.in_memory = False
        #: Another process fetched and stored the key meanwhile: read it from the store.
        self.from_store = False

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
        return self._fd is not None or self.in_memory

    def join(self, on_close: Callable[[], None] | None = None) -> Reader:
        """Register a reader, before awaiting anything; close the reader when done
        (``on_close`` is then called once)."""
        self._refs += 1
        self.readers += 1
        return Reader(self, on_close)

    def _release(self) -> None:
        self._refs -= 1
        if self._refs == 0 and self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def has_direct(self) -> bool:
        """True while an unstored 200 waits for a reader to :meth:`take_direct` it."""
        return self._direct is not None

    def take_direct(self) -> httpx.Response | None:
        """The untee'd upstream response, for exactly one caller; it must close it."""
        response, self._direct = self._direct, None
        return response

    async def chunks(self, chunk_size: int, reader: Reader | None = None) -> AsyncIterator[bytes]:
        """The body as it grows. Raises FillFailed if the fill breaks before the end. Ends
        early, without an error, once ``reader`` hung up (:meth:`Reader.hang_up`).

        The caller must have joined before the fill started, and checked :attr:`streaming`.
        """
        assert self.streaming
        offset = 0
        while True:
            # The last byte only once the body is known good: a fill that read every byte and
            # then failed its check (a follower's sha256) must not deliver a full-length body.
            available = self.written if self.done and self.complete else self.written - 1
            if offset < available:
                size = min(chunk_size, available - offset)
                data = self._from_window(offset, size)
                if data is None:  # fell behind the window: that part is on disk
                    fd = self._fd
                    assert fd is not None  # a fill in memory keeps every byte in the window
                    size = min(size, self.durable - offset)
                    data = await run_sync(os.pread, fd, size, offset)
                    if len(data) != size:
                        raise FillFailed("temporary file shrank under a reader")
                offset += len(data)
                yield data
            elif self.done:
                if not self.complete:
                    raise FillFailed("upstream body did not complete")
                return
            elif reader is not None and reader.gone:
                return
            else:
                await self.changed()

    def _from_window(self, offset: int, size: int) -> bytes | None:
        """Up to ``size`` bytes at ``offset`` from one window chunk, or None if not in memory."""
        for start, chunk in reversed(self._window):  # readers keeping pace want the newest
            if start <= offset < start + len(chunk):
                return chunk[offset - start : offset - start + size]
            if start < offset:
                return None
        return None

    def whole_body(self) -> bytes:
        """The body of a complete fill in memory (:attr:`in_memory`), from its window."""
        assert self.in_memory and self.complete
        return b"".join(chunk for _, chunk in self._window)

    def _publish(self, chunk: bytes) -> None:
        self._window.append((self.written, chunk))
        self._window_bytes += len(chunk)
        self.written += len(chunk)
        self._notify()

    def attach(
        self,
        fd: int,
        filler: str,
        content_type: str,
        expected_length: int | None,
        validators: Validators,
    ) -> None:
        self._fd, self.filler, self.following = fd, filler, True
        self.content_type, self.expected_length = content_type, expected_length
        self.validators = validators
        self.started.set()

    def append_durable(self, data: bytes) -> None:
        self._publish(data)
        self._made_durable(len(data))

    def _made_durable(self, size: int) -> None:
        """``size`` more bytes are in the file: trim the window down to its budget."""
        self.durable += size
        while self._window_bytes > WINDOW_BYTES and self._window:
            start, chunk = self._window[0]
            if start + len(chunk) > self.durable:
                break
            self._window.popleft()
            self._window_bytes -= len(chunk)


class Reader:
    """One client's hold on a fill; :meth:`close` is idempotent."""

    def __init__(self, fill: Fill, on_close: Callable[[], None] | None = None) -> None:
        self.fill = fill
        self._open = True
        self._on_close = on_close
        #: The client went away: its stream ends at the next look (see :meth:`hang_up`).
        self.gone = False

    def hang_up(self) -> None:
        """The client went away: wake its stream (waiting for more of the body) to end it."""
        self.gone = True
        self.fill._notify()

    def close(self) -> None:
        if self._open:
            self._open = False
            self.fill._release()
            if self._on_close is not None:
                self._on_close()
