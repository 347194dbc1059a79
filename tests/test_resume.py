"""Finishing a body from upstream after a tier failed mid-way (proxy/resume.py)."""

from __future__ import annotations

import httpx
import pytest

from proxy.errors import ResponseAborted
from proxy.resume import _skip


def _answer(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers)


def test_a_range_answer_starting_where_we_stopped_is_used_as_is() -> None:
    assert _skip(_answer(206, **{"Content-Range": "bytes 1000-4999/5000"}), 1000) == 0


def test_a_whole_body_answer_skips_what_was_sent() -> None:
    """An API that ignores Range sends it all again: the bytes already sent are dropped."""
    assert _skip(_answer(200), 1000) == 1000


@pytest.mark.parametrize(
    "answer",
    [
        _answer(206, **{"Content-Range": "bytes 0-4999/5000"}),  # another range
        _answer(206),  # no Content-Range at all
        _answer(404),
        _answer(200, **{"Content-Encoding": "gzip"}),  # not the artifact's own bytes
    ],
)
def test_anything_else_ends_the_transfer(answer: httpx.Response) -> None:
    with pytest.raises(ResponseAborted):
        _skip(answer, 1000)
