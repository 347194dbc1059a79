"""Body digests: sha256 names the bytes, xxh3-128 checks them; old entries fall back to sha256."""

from __future__ import annotations

import hashlib
import json

import pytest

from proxy.integrity import BodyDigests, Verifier, intact
from proxy.store import EntryMeta

BODY = bytes(range(256)) * 4000


def _meta(with_xxh3: bool) -> EntryMeta:
    digests = BodyDigests()
    for start in range(0, len(BODY), 65536):
        digests.update(BODY[start : start + 65536])
    assert digests.sha256 == hashlib.sha256(BODY).hexdigest()
    return EntryMeta("x/y", len(BODY), digests.sha256, 0.0, digests.xxh3 if with_xxh3 else "")


@pytest.mark.parametrize("with_xxh3", [True, False])
def test_exact_bytes_pass_and_any_change_fails(with_xxh3: bool) -> None:
    """The right body passes; one flipped bit, a short or a long body fails."""
    meta = _meta(with_xxh3)
    assert intact(meta, BODY)
    flipped = bytearray(BODY)
    flipped[123_456] ^= 0x01
    for wrong in (bytes(flipped), BODY[:-1], BODY + b"\0"):
        assert not intact(meta, wrong)


def test_streamed_verification_matches_whole() -> None:
    """Feeding the body in pieces gives the same verdict as checking it whole."""
    verifier = Verifier(_meta(True))
    for start in range(0, len(BODY), 1000):
        verifier.update(BODY[start : start + 1000])
    assert verifier.matches()


def test_metadata_without_xxh3_still_loads() -> None:
    """Entries written before xxh3 was recorded are read and checked by sha256."""
    legacy = {
        "content_type": "a/b",
        "length": 3,
        "sha256": hashlib.sha256(b"abc").hexdigest(),
        "stored_at": 1,
    }
    meta = EntryMeta.from_json(json.dumps(legacy))
    assert meta.xxh3 == "" and intact(meta, b"abc") and not intact(meta, b"abd")
