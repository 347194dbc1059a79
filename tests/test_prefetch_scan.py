"""The reference scanner on its own: what it finds, what it refuses, and that nothing breaks it."""

from __future__ import annotations

import gzip
import itertools
import json
import secrets
import tracemalloc
import zlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.prefetch.scan import MAX_REFS, Scanner
from proxy.prefetch.watch import watched

Found = list[tuple[str, str, str]]


def _scan(
    chunks: list[bytes],
    kind: Any = "completion",
    form: Any = "sse",
    encoding: str = "",
    limit: int = 1024**2,
    finish: bool = True,
) -> Found:
    found: Found = []
    scanner = Scanner(kind, form, encoding, limit, lambda *ref: found.append(ref))
    for chunk in chunks:
        scanner.feed(chunk)
    if finish:
        scanner.finish()
    return found


def _event(content: str | None, session: str = "sess_1", **delta: Any) -> bytes:
    body: dict[str, Any] = {} if content is None else {"content": content}
    body.update(delta)
    payload = {"session_id": session, "choices": [{"index": 0, "delta": body}]}
    return f"data: {json.dumps(payload)}\n\n".encode()


def test_a_reference_split_across_events_is_found() -> None:
    """``img_a1`` then ``b2c3`` in the next event is one reference."""
    assert _scan([_event("see img_a1"), _event("b2c3 here")]) == [
        ("session", "sess_1", "img_a1b2c3")
    ]


def test_a_reference_that_goes_on_in_the_next_event_is_no_reference() -> None:
    """``img_a1b2c3`` followed by ``d`` in the next event is ``img_a1b2c3d``: not an id."""
    assert _scan([_event("img_a1b2c3"), _event("d and more")]) == []
    assert _scan([_event("x "), _event("img_a1b2c3")]) == [("session", "sess_1", "img_a1b2c3")]


def test_neighbours_make_a_reference_invalid() -> None:
    """Letters, digits or underscores on either side, upper-case hex, unknown prefixes: none."""
    text = "ximg_a1b2c3 img_a1b2c3_ img_A1B2C3 pic_a1b2c3 vid_a1b2c 9arr_000000 doc_abcdef!"
    assert _scan([_event(text)]) == [("session", "sess_1", "doc_abcdef")]


def test_a_reference_at_the_very_end_is_found_when_its_choice_finishes() -> None:
    """A match touching the end waits for more text, until ``finish_reason`` says there is none
    (before the stream itself ends)."""
    last = _event("the end: img_a1b2c3")
    assert _scan([last], finish=False) == []
    done = last.replace(b'"delta"', b'"finish_reason": "stop", "delta"')
    assert _scan([done], finish=False) == [("session", "sess_1", "img_a1b2c3")]


def test_a_split_reference_keeps_its_left_neighbour() -> None:
    """Carried-over text still knows the character before a reference (``x`` makes it none)."""
    assert _scan([_event("0123456789abcx"), _event("img_a1"), _event("b2c3 ")]) == []


def test_tool_call_arguments_and_event_framing() -> None:
    """Tool-call arguments are scanned; CRLF line ends, comments and multi-line data work."""
    call = [{"index": 0, "function": {"arguments": '{"image": "aud_00ff'}}]
    call2 = [{"index": 0, "function": {"arguments": '11"}'}}]
    chunks = [
        b": keep-alive\r\n\r\n",
        _event(None, tool_calls=call).replace(b"\n", b"\r\n"),
        _event(None, tool_calls=call2),
        b'data: {"session_id": "sess_1",\n'
        b'data: "choices": [{"delta": {"content": "arr_123456 "}}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    assert [ref[2] for ref in _scan(chunks)] == ["aud_00ff11", "arr_123456"]


def test_events_cut_anywhere_give_the_same_references() -> None:
    """The stream split at every byte boundary finds the same thing."""
    stream = (
        _event("one img_a1") + _event("b2c3 two vid_") + _event("0a0b0c.") + b"data: [DONE]\n\n"
    )
    whole = _scan([stream])
    assert [ref[2] for ref in whole] == ["img_a1b2c3", "vid_0a0b0c"]
    for cut in range(1, len(stream)):
        assert _scan([stream[:cut], stream[cut:]]) == whole
    assert _scan([bytes([byte]) for byte in stream]) == whole


def test_gzip_and_deflate_bodies_are_decoded() -> None:
    """A gzip event stream flushed event by event, and a deflate JSON body."""
    coder = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    chunks = [coder.compress(_event("img_a1")) + coder.flush(zlib.Z_SYNC_FLUSH)]
    chunks.append(coder.compress(_event("b2c3.")) + coder.flush())
    assert _scan(chunks, encoding="gzip") == [("session", "sess_1", "img_a1b2c3")]
    body = json.dumps({"session_id": "s", "choices": [{"message": {"content": "url_abc123"}}]})
    found = _scan([zlib.compress(body.encode())], form="json", encoding="deflate")
    assert found == [("session", "s", "url_abc123")]


def test_a_decompression_bomb_is_read_only_up_to_the_limit() -> None:
    """100 MB of zeros behind a reference: the scanner reads ``limit`` bytes and stops."""
    coder = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    bomb = coder.compress(_event("img_a1b2c3 ") + b"\0" * 100_000_000) + coder.flush()
    assert len(bomb) < 200_000
    assert _scan([bomb], encoding="gzip", limit=64 * 1024, finish=False) == [
        ("session", "sess_1", "img_a1b2c3")
    ]


def test_unknown_codings_and_garbage_are_ignored() -> None:
    """A brotli body, a body that claims gzip but is not, binary junk: nothing found, no error."""
    assert _scan([_event("img_a1b2c3 ")], encoding="br") == []
    assert _scan([b"not gzip at all" + _event("img_a1b2c3 ")], encoding="gzip") == []
    assert _scan([b"\xff\xfe\x00data: {]\n\n" * 100, _event("img_a1b2c3 ")]) == [
        ("session", "sess_1", "img_a1b2c3")
    ]


def test_json_completion_and_execution_scopes() -> None:
    """Completions are scoped by ``session_id``; executions by ``id``, only once completed."""
    answer = {"session_id": "sess_9", "choices": [{"message": {"content": "[img_a1b2c3]"}}]}
    assert _scan([json.dumps(answer).encode()], form="json") == [
        ("session", "sess_9", "img_a1b2c3")
    ]
    execution = {"id": "exec_1", "status": "completed", "response": {"video": {"id": "vid_00aa11"}}}
    found = _scan([json.dumps(execution).encode()], kind="execution", form="json")
    assert found == [("execution", "exec_1", "vid_00aa11")]
    execution["status"] = "running"
    assert _scan([json.dumps(execution).encode()], kind="execution", form="json") == []


def test_a_json_body_over_the_limit_is_not_scanned() -> None:
    """Reading stops at the limit; an incomplete document names nothing."""
    body = json.dumps({"session_id": "s", "pad": "x" * 10_000, "ref": "img_a1b2c3"}).encode()
    assert _scan([body], form="json", limit=4096) == []
    assert _scan([body], form="json", limit=20_000) == [("session", "s", "img_a1b2c3")]


def test_bad_scopes_are_refused_and_references_are_bounded() -> None:
    """A scope id with control characters or over 512 characters names nothing; at most
    MAX_REFS references per answer, each once."""
    assert _scan([_event("img_a1b2c3 ", session="bad\nid")]) == []
    assert _scan([_event("img_a1b2c3 ", session="s" * 513)]) == []
    many = " ".join(f"arr_{n:06x}" for n in range(500))
    found = _scan([_event(many + " " + many + " ")])
    assert len(found) == MAX_REFS and len(set(found)) == MAX_REFS


def test_deeply_nested_json_does_not_break_the_scanner() -> None:
    """100,000 nested arrays (past Python's recursion limit) are ignored quietly."""
    body = b'{"session_id": "s", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert _scan([body], form="json") == []
    assert _scan([b"data: " + body + b"\n\n"]) == []


def test_watched_routes() -> None:
    """Completions, one execution and execute are watched (also with ``//``); the list is not."""
    assert watched("POST", b"/v1/openai/chat/completions") == "completion"
    assert watched("POST", b"/v1//openai/chat/completions") == "completion"
    assert watched("GET", b"/v1/agent/executions/exec_1") == "execution"
    assert watched("POST", b"/v1/agent/execute") == "execution"
    assert watched("GET", b"/v1/agent/executions") is None
    assert watched("GET", b"/v1/agent/executions/") is None
    assert watched("GET", b"/v1/agent/executions/exec_1/cancel") is None
    assert watched("GET", b"/v1/openai/chat/completions") is None


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=300), max_size=20),
    form=st.sampled_from(["sse", "json"]),
    encoding=st.sampled_from(["", "gzip", "deflate", "br"]),
    limit=st.integers(min_value=1, max_value=5000),
)
def test_any_garbage_is_scanned_without_raising(
    chunks: list[bytes], form: str, encoding: str, limit: int
) -> None:
    """Whatever the bytes, feed and finish return normally and report well-formed refs only."""
    for ref in _scan(chunks, form=form, encoding=encoding, limit=limit):
        assert ref[0] == "session" and ref[2][:3] in (
            "img",
            "vid",
            "aud",
            "doc",
            "rec",
            "url",
            "arr",
        )


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abcdef0123456789_ xgimvudocrlarsn", max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_splitting_a_text_into_events_never_changes_what_is_found(
    text: str, cuts: list[int]
) -> None:
    """The same content split into deltas anywhere gives the same references as in one piece."""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert _scan([_event(p) for p in pieces]) == _scan([_event(text)])


def test_a_gzip_stream_of_several_members_is_read_to_its_last_member() -> None:
    """A gzip body may be several members back to back (RFC 1952 §2.2; a server that compresses
    each event on its own sends that): a reference in a later member is found, as the client's
    own gzip decoder finds it."""
    members = [gzip.compress(_event(text)) for text in ("first ", "then img_a1b2c3 ", "end")]
    assert gzip.decompress(b"".join(members)).count(b"img_a1b2c3") == 1
    expected = [("session", "sess_1", "img_a1b2c3")]
    assert _scan(members, encoding="gzip") == expected
    assert _scan([b"".join(members)], encoding="gzip") == expected


def test_memory_stays_bounded_past_the_end_of_a_gzip_member() -> None:
    """An endless stream of gzip members (each event its own member) once held every byte after
    the first member in the decompressor's ``unused_data``; now the scan limit counts the
    decoded bytes of every member and the scanner lets go of the rest."""
    member = gzip.compress(b"".join(_event(secrets.token_hex(500)) for _ in range(40)))
    found: Found = []
    scanner = Scanner("completion", "sse", "gzip", 64 * 1024, lambda *ref: found.append(ref))
    tracemalloc.start()
    try:
        for _ in range(500):  # about 12 MiB on the wire
            scanner.feed(member)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024**2, peak
    scanner.feed(gzip.compress(_event("img_a1b2c3 ")))  # past the limit: not read any more
    scanner.finish()
    assert found == []
