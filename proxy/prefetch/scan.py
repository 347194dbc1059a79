"""Finding the artifacts an answer names, as its bytes go by: bounded, and never raising.

A :class:`Scanner` is fed the body of one passed-through answer exactly as the client gets it
(compressed or not) and reports ``(scope kind, scope id, object id)`` through ``found`` as soon as
both are known. It decodes ``gzip``/``deflate`` through a streaming decompressor whose output is
capped, and reads at most ``limit`` decoded bytes in all, so memory and CPU per answer are bounded
whatever the upstream sends: a bomb, an endless stream, garbage, deep nesting. Any failure
silences the scanner for the rest of that answer; nothing ever reaches the relay.

What counts as a reference (the API's object ids) is :data:`REF`, matched in *decoded* content:

* server-sent events (``text/event-stream``): each ``data:`` event is parsed as JSON; per choice,
  ``delta.content`` and each tool call's ``function.arguments`` are scanned as one running text
  with the last :data:`CARRY` characters carried over, so ``img_a1`` + ``b2c3`` split across
  events is found. A match touching the end of what has arrived waits for the next piece (it
  might go on: ``img_a1b2c3d`` is no reference), until the choice's ``finish_reason`` or the
  end of the stream. The scope is the events' top-level ``session_id``.
* a JSON body: every string value, once the whole body (at most ``limit`` bytes) is in. For a
  completion the scope is its ``session_id``; for an execution, its ``id``, and only when its
  ``status`` is ``completed``.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Callable
from typing import Any, Literal

from proxy.keys import MAX_ID_LENGTH

log = logging.getLogger(__name__)

#: An object id as the API writes it (see tests/openapi/get-artifact.yaml), with no letter, digit
#: or underscore on either side: ``\b`` with ``re.ASCII`` is exactly that, and matches faster
#: than the equivalent lookarounds.
REF = re.compile(r"\b(?:img|vid|aud|doc|recon|url|arr)_[0-9a-f]{6}\b", re.ASCII)
#: Characters of a text carried into the next piece: a whole reference (12) plus the character
#: before it, with room to spare.
CARRY = 15
#: References reported per answer at most; later ones are ignored.
MAX_REFS = 32
#: An event (or a line) longer than this is skipped: real ones are a few hundred bytes.
MAX_EVENT = 64 * 1024
#: Running texts (choices times content/tool calls) followed per answer at most.
MAX_TEXTS = 16

Kind = Literal["completion", "execution"]
Format = Literal["json", "sse"]
#: Called with (scope kind, scope id, object id) for each reference found.
Found = Callable[[str, str, str], None]
#: What :func:`parse_json` finds in a JSON answer: its scope, if any, and its references.
Parsed = tuple[tuple[str, str] | None, list[str]]


class _Stop(Exception):
    """The scanner gives up on this answer (over a limit, or undecodable)."""


class _Decoder:
    """The answer's ``Content-Encoding`` undone, with the output capped per call."""

    def __init__(self, encoding: str) -> None:
        coding = encoding.strip().lower()
        self._wbits = 0
        if coding in ("gzip", "x-gzip"):
            self._wbits = 16 + zlib.MAX_WBITS
        elif coding == "deflate":
            self._wbits = zlib.MAX_WBITS
        elif coding not in ("", "identity"):  # br, zstd, several codings: not ours to read
            raise _Stop(f"cannot decode {coding!r}")
        self._zlib = zlib.decompressobj(self._wbits) if self._wbits else None

    def decode(self, data: bytes, budget: int) -> bytes:
        """Up to ``budget`` decoded bytes of ``data`` (the rest of the answer is not read).

        A gzip body may be several members back to back: each ending member's ``unused_data``
        starts the next one. (Left in a finished decompressor, every later byte would pile up
        in its ``unused_data``: an endless stream of members would grow without bound.)
        """
        if self._zlib is None:
            return data[:budget]
        out = b""
        try:
            while data and len(out) < budget:
                if self._zlib.eof:
                    if self._wbits != 16 + zlib.MAX_WBITS:  # one zlib stream, then nothing
                        raise _Stop("data after the end of the deflate stream")
                    self._zlib = zlib.decompressobj(self._wbits)
                out += self._zlib.decompress(data, budget - len(out))
                data = self._zlib.unused_data if self._zlib.eof else b""
        except zlib.error as exc:
            raise _Stop(str(exc)) from None
        return out


class Scanner:
    """Scans one answer; see the module docstring. ``feed`` and ``finish`` never raise."""

    def __init__(
        self,
        kind: Kind,
        form: Format,
        encoding: str,
        limit: int,
        found: Found,
        execution: str | None = None,
    ) -> None:
        self.kind = kind
        #: The execution id the request named (``GET /v1/agent/executions/{id}``), if any: an
        #: answer about another execution is not scanned.
        self.execution = execution
        self.form = form
        self._found = found
        self._left = limit
        self._alive = True
        self._scope: tuple[str, str] | None = None
        self._refs: list[str] = []  # in order of appearance, unique
        self._reported = 0
        self._tails: dict[tuple[int, int], str] = {}
        self._buffer = bytearray()  # the JSON body so far, or an unfinished SSE line
        self._event: list[bytes] = []  # data lines of the SSE event being read
        self._event_size = 0
        self._skipping_line = False
        try:
            self._decoder = _Decoder(encoding)
        except _Stop:
            self._alive = False

    @property
    def refs(self) -> list[str]:
        return list(self._refs)

    @property
    def scope(self) -> tuple[str, str] | None:
        return self._scope

    def feed(self, chunk: bytes) -> None:
        if not self._alive or not chunk:
            return
        try:
            data = self._decoder.decode(chunk, self._left)
            self._left -= len(data)
            if self.form == "sse":
                self._sse(data)
            else:
                self._buffer += data
            if self._left <= 0:
                raise _Stop("scan limit reached")
        except Exception:  # _Stop, or anything a hostile body provokes: stop, never raise
            self._stop()

    def take_json(self) -> bytes | None:
        """The whole JSON body read so far, taken out of the scanner for :func:`parse_json`
        (which may then run in a worker thread); None for events, or once stopped."""
        if not self._alive or self.form != "json":
            return None
        body, self._buffer = bytes(self._buffer), bytearray()
        return body

    def parsed(self, parsed: Parsed) -> None:
        """What :func:`parse_json` found in the body :meth:`take_json` gave: report it."""
        scope, refs = parsed
        try:
            if scope is not None:
                self._set_scope(*scope)
            for object_id in refs:
                self._ref(object_id)
        except _Stop:
            pass
        self._stop()

    def finish(self) -> None:
        """The answer ended whole: scan what waited for more."""
        if not self._alive:
            return
        try:
            body = self.take_json()
            if body is not None:
                self.parsed(parse_json(self.kind, body, self.execution))
            else:
                for text in list(self._tails):
                    self._text(text, "", final=True)
        except Exception as exc:
            log.debug("prefetch scan stopped: %s", type(exc).__name__)
        self._stop()

    def _stop(self) -> None:
        self._alive = False
        self._buffer = bytearray()
        self._event = []
        self._tails.clear()

    # -- server-sent events -------------------------------------------------------------------

    def _sse(self, data: bytes) -> None:
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                rest = data[start:]
                if len(self._buffer) + len(rest) > MAX_EVENT:
                    self._buffer.clear()
                    self._skipping_line = True
                elif not self._skipping_line:
                    self._buffer += rest
                return
            piece = data[start:end]
            start = end + 1
            if self._skipping_line:
                self._skipping_line = False
                self._buffer.clear()
                continue
            line = bytes(self._buffer + piece) if self._buffer else piece
            self._buffer.clear()
            self._line(line.rstrip(b"\r"))

    def _line(self, line: bytes) -> None:
        if not line:
            event, self._event, self._event_size = self._event, [], 0
            if event:
                self._sse_event(b"\n".join(event))
            return
        if not line.startswith(b"data:"):
            return  # comments, event:, id:, retry:
        value = line[5:].removeprefix(b" ")
        self._event_size += len(value)
        if self._event_size > MAX_EVENT:
            self._event = []
            return
        self._event.append(value)

    def _sse_event(self, data: bytes) -> None:
        if data.strip() == b"[DONE]":
            return
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            return
        if not isinstance(event, dict):
            return
        self._set_scope("session", event.get("session_id"))
        choices = event.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices[:MAX_TEXTS]:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            delta = choice.get("delta")
            if not isinstance(index, int) or not isinstance(delta, dict):
                continue
            content = delta.get("content")
            if isinstance(content, str):
                self._text((index, -1), content)
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for position, call in enumerate(calls[:MAX_TEXTS]):
                    self._tool_call(index, position, call)
            if choice.get("finish_reason"):  # this choice says no more: judge what waited
                for text in [text for text in self._tails if text[0] == index]:
                    self._text(text, "", final=True)

    def _tool_call(self, index: int, position: int, call: object) -> None:
        if not isinstance(call, dict):
            return
        number = call.get("index", position)
        function = call.get("function")
        if isinstance(number, int) and isinstance(function, dict):
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                self._text((index, number), arguments)

    def _text(self, text: tuple[int, int], piece: str, final: bool = False) -> None:
        """Scan one running text's next ``piece`` with its carried-over tail."""
        tail = self._tails.get(text)
        if tail is None:
            if len(self._tails) >= MAX_TEXTS:
                return
            tail = ""
        whole = tail + piece
        for match in REF.finditer(whole):
            if match.end() < len(tail):
                continue  # judged whole in an earlier piece
            if match.end() == len(whole) and not final:
                continue  # might go on in the next piece; judged then
            self._ref(match.group())
        self._tails[text] = whole[-CARRY:]

    # -- results ------------------------------------------------------------------------------

    def _set_scope(self, kind: str, scope_id: object) -> None:
        if self._scope is not None or not _valid_id(scope_id):
            return
        assert isinstance(scope_id, str)
        self._scope = (kind, scope_id)
        self._report()

    def _ref(self, object_id: str) -> None:
        if object_id in self._refs:
            return
        self._refs.append(object_id)
        self._report()
        if len(self._refs) >= MAX_REFS:
            raise _Stop("enough references")  # nothing more to look for in this answer

    def _report(self) -> None:
        if self._scope is None:
            return
        kind, scope_id = self._scope
        while self._reported < len(self._refs):
            object_id = self._refs[self._reported]
            self._reported += 1
            self._found(kind, scope_id, object_id)


def parse_json(kind: Kind, body: bytes, execution: str | None = None) -> Parsed:
    """The scope and the references (unique, in order, at most :data:`MAX_REFS`) of a JSON
    answer: for a completion its ``session_id``; for an execution its ``id``, and only when its
    ``status`` is ``completed`` (and the id is ``execution``, the one the request named, if
    any). A pure function that never raises: parsing a large body costs tens of milliseconds,
    so :class:`proxy.prefetch.watch.Watch` runs it off the event loop."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None, []
    if not isinstance(document, dict):
        return None, []
    if kind == "completion":
        kind_id = ("session", document.get("session_id"))
    elif document.get("status") == "completed":
        kind_id = ("execution", document.get("id"))
    else:
        return None, []
    if not _valid_id(kind_id[1]) or (execution is not None and kind_id[1] != execution):
        return None, []
    scope = (kind_id[0], str(kind_id[1]))
    refs: list[str] = []
    # One search, not one per string: a newline is no word character, so no match spans two
    # strings and \b holds at each string's edges, as it would in each alone.
    for match in REF.finditer("\n".join(_strings(document))):
        if match.group() not in refs:
            refs.append(match.group())
            if len(refs) >= MAX_REFS:
                break
    return scope, refs


def _valid_id(value: object) -> bool:
    """A scope id the artifact route would accept (see :func:`proxy.keys.parse_key`)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_LENGTH
        and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
    )


def _strings(document: Any) -> list[str]:
    """Every string value in a parsed JSON document (iteratively: no recursion limit)."""
    found: list[str] = []
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))  # popped in document order
        elif isinstance(item, list):
            stack.extend(reversed(item))
    return found
