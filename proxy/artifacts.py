"""``GET /v1/artifacts``: the cached route.

Hit:  parse key -> look up (length check) -> access check -> stream the file, hashing it.
Miss: parse key -> join or start the key's fill -> access check if joining with another
      credential -> stream the growing file.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from proxy.access import ProofScope, credential
from proxy.errors import (
    PayloadTooLarge,
    ProxyError,
    ResponseAborted,
    TooManyWaiters,
    UpstreamUnavailable,
    UpstreamUnreachable,
    UriTooLong,
    json_response,
)
from proxy.fill import Fill, FillFailed, Reader
from proxy.headers import CONTENT_LENGTH, CONTENT_TYPE, RawHeaders
from proxy.keys import ArtifactKey, parse_key
from proxy.metrics import SOURCES
from proxy.passthrough import relay
from proxy.protocols import HANGUPS
from proxy.ranges import RangeNotSatisfiable, byte_range, none_match
from proxy.resume import rest_from_upstream
from proxy.services import Services
from proxy.store import EntryMeta
from proxy.store.chain import Corrupt, Hit, Interrupted
from proxy.store.claims import Lease
from proxy.store.memory import MemoryTier
from proxy.threads import run_sync
from proxy.upstream import FAULT_STATUSES, Answer, read_answer
from proxy.validators import Validators

log = logging.getLogger(__name__)


CACHE_CONTROL = (b"Cache-Control", b"private, max-age=31536000, immutable")
#: RFC 9211 ``Cache-Status`` of a hit, by the tier that answered.
_FORWARDED = {
    b"MISS": b"vlmrun-cache; fwd=uri-miss",
    b"COALESCED": b"vlmrun-cache; fwd=uri-miss; collapsed",
}
_CACHE_STATUS = {
    tier: f"vlmrun-cache; hit; detail={tier}".encode() for tier in ("memory", "disk", "redis")
}
#: A GET needs no body; anything larger than this on the cached route is refused.
MAX_REQUEST_BODY = 64 * 1024
#: Yielded after each piece of a streamed body: an empty message, which the server sends only
#: once the client has taken most of the last piece. So the next ``chunk_size`` read waits for
#: a client that stops reading instead of being held beside the unsent piece (what a stalled
#: client holds: one piece, not two).
DRAINED = b""


#: What no header value may hold (as uvicorn checks it).
_UNSENDABLE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
#: What :meth:`ArtifactRoute.answer_now` gives: a 200's header fields, its body, and the key.
Immediate = tuple[RawHeaders, bytes, ArtifactKey]


class ArtifactRoute:
    """The ASGI app for ``/v1/artifacts``; anything but GET is passed through."""

    def __init__(self, services: Services) -> None:
        self.s = services
        metrics = services.metrics
        # Labelled children bound once: a hit updates them without a label lookup.
        self._outcomes = {
            outcome: metrics.requests.labels(outcome)
            for outcome in ("hit", "miss", "coalesced", "bypass", "error")
        }
        self._tiers = {tier: metrics.hits.labels(tier) for tier in _CACHE_STATUS}
        #: Bytes served by the source a hit names (``cache``: this replica's, ``shared``: Redis).
        self._served = {source: metrics.served_bytes.labels(source) for source in SOURCES}
        self._proven = metrics.access_checks.labels("proof")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        if scope["method"] != "GET":
            await self.s.passthrough(scope, receive, send)
            return
        try:
            _check_limits(request, self.s.config.max_query_length)
            key = parse_key(scope["query_string"])
        except ProxyError:
            self._count("error")
            raise
        scope["vlmrun_cache.artifact_key"] = key  # for the access log (proxy/accesslog.py)
        if key is None:  # filename= lookups name no immutable object
            self._count("bypass")
            await self.s.passthrough(scope, receive, send)
            return
        try:
            authorization = credential(scope["headers"])
        except ProxyError:
            self._count("error")
            raise
        fingerprint = self.s.access.fingerprint(authorization)
        if self.s.access.is_split(key.scope_kind, key.scope_id):
            key = key.owned_by(fingerprint)
        # The key's lease, taken by a lookup that finds nothing, for the fill to come (none
        # is wanted when a fill of the key runs here already).
        leases: list[Lease] | None = [] if self.s.fills.get(key) is None else None
        try:
            response = await self._hit(request, key, authorization, fingerprint, leases)
            if response is None:
                response = await self._miss(request, key, authorization, fingerprint, leases)
        except ProxyError:
            self._count("error")
            raise
        finally:
            _give_back(leases)
        await response(scope, receive, send)

    def _count(self, outcome: str) -> None:
        self._outcomes[outcome].inc()

    # -- access -------------------------------------------------------------------------------

    async def _authorize(
        self,
        request: Request,
        key: ArtifactKey,
        authorization: str | None,
        fingerprint: str | None,
        filler: str,
        recorded: Validators | None,
    ) -> Response | None:
        """``None`` if the credential may read ``key`` as stored by ``filler``, else the response
        to send instead.

        Without a live proof, upstream is asked (the same artifact request, with this
        credential; the body is not read). Its refusal is relayed. With a proof too old to
        trust online but young enough for offline use, the check is not retried and a
        502/503/504 counts as the API failing, not refusing: the proof serves, as it does
        when the API cannot be reached. A 200 that contradicts
        ``recorded`` (what the entry or running fill we would serve had from upstream) cannot be
        for the same bytes: the scope is split and this caller is served from upstream.
        """
        checks = self.s.metrics.access_checks
        access = self.s.access
        scope, needed, own = self._proof_scopes(key, fingerprint, filler)
        if (
            access.remembered(fingerprint, needed)
            or await run_sync(access.has_proof, fingerprint, needed)
            or await self.s.shared_proof(fingerprint, needed)
        ):
            self._proven.inc()
            return None
        # A proof too old to trust online may still serve while the API cannot be reached.
        fallback = await run_sync(access.has_proof, fingerprint, needed, True)
        check = self.s.upstream.artifact_request(key, authorization)
        try:
            async with self.s.upstream.stream(check, artifact=True, retry=not fallback) as upstream:
                if fallback and upstream.status_code in FAULT_STATUSES:  # failing, not refusing
                    checks.labels("offline").inc()
                    return None
                if upstream.status_code != 200:
                    answer = await read_answer(upstream)
                elif recorded is not None and Validators.of(upstream).conflicts(recorded):
                    answer = None
                else:  # the status line is the proof; skip the body
                    proven = (scope,) if own else (scope, needed)
                    await run_sync(access.record, fingerprint, *proven)
                    self.s.share_proofs(fingerprint, *proven)
                    checks.labels("granted").inc()
                    return None
        except UpstreamUnreachable:
            if fallback:
                checks.labels("offline").inc()
                return None
            checks.labels("unavailable").inc()
            raise
        except ProxyError:
            checks.labels("unavailable").inc()
            raise
        if upstream.status_code == 200:
            checks.labels("mismatch").inc()
            await self._split(key)
            return await self._bypass(request)
        checks.labels("denied").inc()
        self._count("error")
        if answer is None:
            raise UpstreamUnavailable("upstream refused access with an oversized body")
        return _replay(answer)

    def _proof_scopes(
        self, key: ArtifactKey, fingerprint: str | None, filler: str
    ) -> tuple[ProofScope, ProofScope, bool]:
        """The scope a proof of this credential covers, the scope it needs to read an entry
        stored by ``filler``, and whether the credential is ``filler``'s own."""
        per_object = self.s.config.access_check == "object"
        scope = key.proof_scope(per_object)
        own = (fingerprint or "") == filler
        return scope, scope if own else key.proof_scope(per_object, filler), own

    async def _split(self, key: ArtifactKey) -> None:
        """Two credentials got different answers for ``key``: stop sharing its scope."""
        log.warning(
            "%s %s answered differently for two credentials; its entries are no longer shared",
            key.scope_kind,
            key.scope_id,
        )
        await run_sync(self.s.access.split, key.scope_kind, key.scope_id)

    # -- hit ----------------------------------------------------------------------------------

    def answer_now(self, query: bytes, headers: RawHeaders) -> Immediate | None:
        """The whole answer to ``GET /v1/artifacts?{query}``, without waiting for anything,
        when it is the simplest hit: the entry is in the memory tier, this process remembers a
        live proof that the credential may read it, and the request asks for the whole body
        with no condition and sends none. Counted as the route counts a hit.

        ``None`` for anything else, also a request the route would refuse: the ASGI route
        then answers it as always. So this decides nothing the route does not, and never
        refuses. ``headers`` are the request's, names in lower case (as servers give them).
        """
        if len(query) > self.s.config.max_query_length:
            return None
        for name, _ in headers:
            if name in _CONDITIONS or name == b"expect":
                return None
        try:
            key = parse_key(query)
            authorization = credential(headers)
        except ProxyError:
            return None
        if key is None or authorization is None:
            return None
        access = self.s.access
        fingerprint = access.fingerprint(authorization)
        if access.is_split(key.scope_kind, key.scope_id):
            key = key.owned_by(fingerprint)
        copy = self.s.chain.memory.get(key.cache_key)
        if copy is None:
            return None
        meta = copy.meta
        _, needed, _ = self._proof_scopes(key, fingerprint, meta.filler)
        if not access.remembered(fingerprint, needed):
            return None
        fields = _body_headers(meta, meta.length, _common_headers(meta, b"HIT", MemoryTier.name))
        if _UNSENDABLE.search(fields[0][1]):  # a server refuses it: let the route's path do so
            return None
        self.s.chain.touch(key.cache_key)
        self._proven.inc()
        self._served["cache"].inc(meta.length)
        self._counted_hit("hit", MemoryTier.name, key.cache_key, meta)
        return fields, copy.body, key

    async def _hit(
        self,
        request: Request,
        key: ArtifactKey,
        authorization: str | None,
        fingerprint: str | None,
        leases: list[Lease] | None = None,
        outcome: str = "hit",
    ) -> Response | None:
        """The answer from a tier, or None. With ``leases``, a disk lookup that finds nothing
        takes the key's lease into it (:meth:`Fills.preclaim`); a hit from a later tier gives
        it back."""
        on_disk_miss = None
        if leases is not None:

            def on_disk_miss() -> None:
                lease = self.s.fills.preclaim(key)
                if lease is not None:
                    leases.append(lease)

        hit = await self.s.chain.lookup(key.cache_key, on_disk_miss)
        if hit is None:
            return None
        _give_back(leases)
        try:
            refusal = await self._authorize(
                request, key, authorization, fingerprint, hit.meta.filler, hit.meta.validators
            )
            if refusal is not None:
                hit.close()
                return refusal
            hit = self.s.chain.keep(key.cache_key, hit)  # backfill a Redis hit: authorized now
            response = self._entry_response(request, key, hit, outcome, authorization)
        except BaseException:
            hit.close()
            raise
        self._counted_hit(outcome, hit.tier, key.cache_key, hit.meta)
        return response

    def _counted_hit(self, outcome: str, tier: str, cache_key: str, meta: EntryMeta) -> None:
        """Count a hit served, whichever way: its outcome and tier, and a prefetched entry's
        first read."""
        self._count(outcome)
        self._tiers[tier].inc()
        if meta.prefetched:
            self.s.prefetcher.first_read(cache_key, meta)

    def _entry_response(
        self,
        request: Request,
        key: ArtifactKey,
        hit: Hit,
        outcome: str,
        authorization: str | None = None,
    ) -> Response:
        """The hit's response: whole, a single range, 304 or 416.

        A small entry's whole (already verified) body is in the hit; a larger one streams from
        its tier, hashed on the way.
        """
        meta = hit.meta
        common = _common_headers(meta, outcome.upper().encode(), hit.tier)
        headers = _conditions(request.scope)
        if "if-none-match" in headers and none_match(headers["if-none-match"], meta.etag):
            hit.close()
            return Whole(304, common)
        try:
            span = (
                byte_range(headers["range"], headers.get("if-range"), meta.etag, meta.length)
                if "range" in headers
                else None
            )
        except RangeNotSatisfiable:
            hit.close()
            return json_response(
                416,
                {"detail": "Range Not Satisfiable"},
                [(b"Content-Range", f"bytes */{meta.length}".encode()), *common],
            )
        start, end = span if span is not None else (0, meta.length)
        raw = _body_headers(meta, end - start, common)
        status = 200
        if span is not None:
            status = 206
            raw.append((b"Content-Range", f"bytes {start}-{end - 1}/{meta.length}".encode()))
        if hit.body is not None:
            self._served[hit.source].inc(end - start)
            body = hit.body[start:end] if span else hit.body
            return Whole(status, raw, body)
        verify = span is None  # a range is length-checked only: hashing it means reading it all
        return Streamed(
            self._stream_hit(key, hit, start, end, verify, authorization),
            raw,
            _closing(hit.close),
            status,
        )

    async def _stream_hit(
        self,
        key: ArtifactKey,
        hit: Hit,
        start: int,
        end: int,
        verify: bool,
        authorization: str | None = None,
    ) -> AsyncIterator[bytes]:
        served = self._served[hit.source]
        try:
            async for data in hit.chunks(start, end, verify):
                served.inc(len(data))
                yield data
                yield DRAINED
        except Interrupted as cut:  # the tier failed mid-body: the rest comes from upstream
            rest = rest_from_upstream(
                self.s.upstream, key, authorization, hit.meta, cut.offset, cut.digest
            )
            async for data in rest:
                self._served["upstream"].inc(len(data))
                yield data
        except Corrupt:
            self.s.chain.memory.drop(key.cache_key)
            raise ResponseAborted(f"cached {key.object_id} failed its integrity check") from None
        finally:
            hit.close()

    # -- miss ---------------------------------------------------------------------------------

    async def _miss(
        self,
        request: Request,
        key: ArtifactKey,
        authorization: str | None,
        fingerprint: str | None,
        leases: list[Lease] | None,
    ) -> Response:
        """``leases``: the key's lease, if the lookup took it. A fill started here takes it
        over; otherwise it is given back before anything is awaited: a fill this client joins
        (started meanwhile by another request, without it) may be waiting for it."""
        fills = self.s.fills
        fill = fills.get(key)
        on_close = None
        ours = fill is None and not (fills.full(fingerprint) or fills.uncacheable(key))
        if ours:
            fill = fills.start(
                key, authorization, fingerprint, lease=leases.pop() if leases else None
            )
        _give_back(leases)
        if fill is None:  # stream through uncached
            return await self._bypass(request)
        if ours:
            outcome = b"MISS"
        else:
            if fill.readers >= self.s.config.max_waiters:
                raise TooManyWaiters("too many clients are waiting for this artifact; retry")
            fills.waiters.acquire(fingerprint)  # 429 when this credential holds its share
            on_close = functools.partial(fills.waiters.release, fingerprint)
            outcome = b"COALESCED"
            if fills.adopt(fill):  # a prefetch this client came for: now its own fill
                self.s.metrics.prefetch_hits.inc()
        reader = fill.join(on_close)  # before any await: keeps the fill's file open for us
        try:
            await fill.started.wait()
            if fill.prefetch and (fill.error or fill.abandoned or fill.status not in (None, 200)):
                reader.close()  # a prefetch that did not get the bytes: go on our own
                return await self._bypass(request)
            if fill.error is not None:
                raise fill.error
            if fill.from_store:  # another worker process fetched it meanwhile
                reader.close()
                stored = await self._hit(
                    request, key, authorization, fingerprint, outcome="coalesced"
                )
                if stored is not None:
                    return stored
                return await self._bypass(request)
            if fill.answer is not None and fill.fingerprint == fingerprint:
                reader.close()
                self._count("error")
                return _replay(fill.answer)
            if not fill.streaming and not fill.has_direct:
                reader.close()  # refused for someone else, or no room: go on our own
                return await self._bypass(request)
            if fill.following:  # another worker process is fetching it
                outcome = b"COALESCED"
            if fingerprint is None or fingerprint != fill.filler:
                refusal = await self._authorize(
                    request, key, authorization, fingerprint, fill.filler, fill.validators
                )
                if refusal is not None:
                    reader.close()
                    return refusal
            direct = fill.take_direct()
            if direct is not None:  # not stored: this client streams it through
                reader.close()
                self._count("bypass")
                return self._direct_response(fill, direct, outcome)
            if not fill.streaming:  # another client took the unstored answer
                reader.close()
                return await self._bypass(request)
        except BaseException:
            reader.close()
            raise
        self._count("miss" if outcome == b"MISS" else "coalesced")
        return Streamed(
            self._stream_fill(reader),
            _fill_headers(fill, outcome),
            _closing(reader.close),
            wake=reader.hang_up,
        )

    async def _bypass(self, request: Request) -> Response:
        """Fetch with the caller's own credential and stream it through, uncached."""
        self._count("bypass")
        return await self.s.passthrough.forward(request, retry=True)

    def _direct_response(self, fill: Fill, upstream: httpx.Response, outcome: bytes) -> Response:
        served = self.s.metrics.served_bytes.labels("upstream")

        async def counted() -> AsyncIterator[bytes]:
            async for data in relay(upstream):
                served.inc(len(data))
                yield data

        headers: RawHeaders = [(CONTENT_TYPE, fill.content_type.encode("latin-1"))]
        validators = fill.validators
        if validators is not None and validators.length is not None:  # the bytes as sent
            headers.append((CONTENT_LENGTH, str(validators.length).encode()))
        if validators is not None and validators.encoding:
            headers.append((b"Content-Encoding", validators.encoding.encode("latin-1")))
        headers += [CACHE_CONTROL, (b"X-Cache", outcome), (b"Cache-Status", _FORWARDED[outcome])]
        response = StreamingResponse(counted(), background=BackgroundTask(upstream.aclose))
        return _raw(response, headers)

    async def _stream_fill(self, reader: Reader) -> AsyncIterator[bytes]:
        # Another replica's fetch, streamed through Redis, was not fetched from the API here.
        served = self._served["shared" if reader.fill.remote else "upstream"]
        try:
            async for data in reader.fill.chunks(self.s.config.chunk_size, reader):
                served.inc(len(data))
                yield data
                yield DRAINED
        except FillFailed as exc:
            raise ResponseAborted(str(exc)) from exc
        finally:
            reader.close()


def _give_back(leases: list[Lease] | None) -> None:
    """Release the leases a lookup took that no fill took over."""
    while leases:
        leases.pop().release()


def _check_limits(request: Request, max_query_length: int) -> None:
    """Refuse what no artifact request needs: huge queries and request bodies."""
    if len(request.scope["query_string"]) > max_query_length:
        raise UriTooLong(f"Query string longer than {max_query_length} bytes")
    headers = _conditions(request.scope)
    length = headers.get("content-length", "0")
    if "transfer-encoding" in headers or not length.isdigit() or int(length) > MAX_REQUEST_BODY:
        raise PayloadTooLarge("GET /v1/artifacts takes no request body")


#: The request headers the route looks at (besides Authorization).
_CONDITIONS = frozenset(
    (b"if-none-match", b"range", b"if-range", b"content-length", b"transfer-encoding")
)


def _conditions(scope: Scope) -> dict[str, str]:
    """The first value of each of :data:`_CONDITIONS` the request has, in one pass over its
    headers, kept in the scope (cheaper than Starlette's ``Headers`` for five names)."""
    found: dict[str, str] | None = scope.get("vlmrun_cache.conditions")
    if found is None:
        found = {}
        for name, value in scope["headers"]:
            if name in _CONDITIONS:
                found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        scope["vlmrun_cache.conditions"] = found
    return found


def _common_headers(meta: EntryMeta, outcome: bytes, tier: str) -> RawHeaders:
    """The header fields of every answer from a tier, body or not."""
    return [
        (b"ETag", meta.etag.encode()),
        CACHE_CONTROL,
        (b"Accept-Ranges", b"bytes"),
        (b"X-Cache", outcome),
        (b"Cache-Status", _CACHE_STATUS[tier]),
    ]


def _body_headers(meta: EntryMeta, length: int, common: RawHeaders) -> RawHeaders:
    return [
        (CONTENT_TYPE, meta.content_type.encode("latin-1")),
        (CONTENT_LENGTH, str(length).encode()),
        *common,
    ]


def _fill_headers(fill: Fill, outcome: bytes) -> RawHeaders:
    headers: RawHeaders = [(CONTENT_TYPE, fill.content_type.encode("latin-1"))]
    if fill.expected_length is not None:
        headers.append((CONTENT_LENGTH, str(fill.expected_length).encode()))
    headers += [CACHE_CONTROL, (b"X-Cache", outcome), (b"Cache-Status", _FORWARDED[outcome])]
    return headers


class Whole(Response):
    """A response whose headers (spelled as given) and body are all in hand: two ASGI messages,
    without Starlette's header building, which a hit would only replace."""

    def __init__(self, status: int, headers: RawHeaders, body: bytes = b"") -> None:
        self.status_code = status
        self.raw_headers = headers
        self.body = body
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send({"type": "http.response.body", "body": self.body})


class Streamed(StreamingResponse):
    """A streamed body in plain ASGI messages, from the event loop's task alone.

    Starlette's StreamingResponse runs each response in a task group beside a second task that
    waits for ``http.disconnect``: some 50 us of a miss's event-loop time. Under the proxy's
    own protocols (proxy/protocols.py) the scope holds the connection's hang-up callbacks
    instead: this one is called when the client goes, calls ``wake`` (so a body waiting for
    more bytes, a fill's, looks again and ends) and stops the stream before its next piece.
    Under another server (no callbacks in the scope) it is Starlette's."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        headers: RawHeaders,
        background: BackgroundTask,
        status_code: int = 200,
        wake: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(body, status_code=status_code, background=background)
        self.raw_headers = headers
        self._wake = wake
        self.gone = False

    def _hang_up(self) -> None:
        self.gone = True
        if self._wake is not None:
            self._wake()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hangups: set[Callable[[], None]] | None = scope.get(HANGUPS)
        if hangups is None:
            await super().__call__(scope, receive, send)
            return
        body = self.body_iterator
        assert isinstance(body, AsyncGenerator)
        hangups.add(self._hang_up)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            sent = 0
            async for chunk in body:
                if self.gone:
                    break
                sent += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not self.gone or sent == _declared_length(self.raw_headers):
                # Gone after every announced byte went out (an empty body is whole with its
                # head): the response ended whole. The server drops the message; the access
                # log sees the end.
                await send({"type": "http.response.body", "body": b""})
        finally:
            hangups.discard(self._hang_up)
            try:
                await body.aclose()  # skips the body's own finally if it never started...
            finally:
                if self.background is not None:  # ...so the close it owes runs here, always
                    await self.background()


def _declared_length(headers: RawHeaders) -> int | None:
    """The ``Content-Length`` among a response's header fields (as the route spells it)."""
    for name, value in headers:
        if name == CONTENT_LENGTH:
            return int(value)
    return None


def _closing(close: Callable[[], None]) -> BackgroundTask:
    """``close`` after the response, on the event loop: a plain function given to a
    BackgroundTask runs in anyio's thread pool (a thread hop per response), and these only
    close a descriptor and give back counts that belong to the loop."""

    async def run() -> None:
        close()

    return BackgroundTask(run)


def _raw(response: Response, headers: RawHeaders) -> Response:
    """Replace a response's headers with ``headers``, spelled exactly as given."""
    response.raw_headers = headers
    return response


def _replay(answer: Answer) -> Response:
    return Whole(answer.status, answer.headers, answer.body)
