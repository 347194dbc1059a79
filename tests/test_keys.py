"""Parsing an artifact request into its cache key."""

from __future__ import annotations

import httpx
import pytest

from proxy.config import Config
from proxy.errors import InvalidRequest
from proxy.keys import ArtifactKey, parse_key
from proxy.upstream import Upstream


def test_both_sdk_orders_give_one_key() -> None:
    """Python sends object_id first, Node the scope first: same key."""
    python = parse_key(b"object_id=img_a1b2c3&session_id=S")
    node = parse_key(b"session_id=S&object_id=img_a1b2c3")
    assert python == node == ArtifactKey("session", "S", "img_a1b2c3")


def test_keys_are_unambiguous() -> None:
    """Ids containing separators cannot collide with other (scope, object) pairs."""
    a = parse_key(b"object_id=x%7Cy&session_id=s")
    b = parse_key(b"object_id=y&session_id=s%7Cx")
    assert a is not None and b is not None and a.cache_key != b.cache_key
    execution = parse_key(b"object_id=y&execution_id=s%7Cx")
    assert execution is not None and execution.cache_key != b.cache_key


def test_filename_requests_are_not_cacheable() -> None:
    """filename= lookups are passed through."""
    assert parse_key(b"filename=a.pdf&session_id=S") is None


@pytest.mark.parametrize(
    "query",
    [
        b"",
        b"object_id=a",
        b"session_id=s",
        b"object_id=a&session_id=s&execution_id=e",
        b"object_id=a&object_id=b&session_id=s",
        b"object_id=&session_id=s",
        b"object_id=a%0d%0ab&session_id=s",
        b"object_id=%c3%28&session_id=s",
        b"object_id=" + b"a" * 600 + b"&session_id=s",
    ],
)
def test_invalid_queries(query: bytes) -> None:
    """Each is a 422 with a FastAPI-shaped detail item."""
    with pytest.raises(InvalidRequest) as caught:
        parse_key(query)
    (item,) = caught.value.detail
    assert item["loc"][0] == "query" and item["msg"] and item["type"]


def test_stored_keys_read_back_and_older_layouts_are_recognised() -> None:
    """A cache key parses back into the key that made it, a split scope's owner included; keys
    of another layout version (or garbage) are None."""
    for key in (
        ArtifactKey("session", 'S "1"', "img_a1b2c3"),
        ArtifactKey("execution", "E", "arr_1").owned_by("f" * 64),
    ):
        assert ArtifactKey.from_cache_key(key.cache_key) == key
    for other in ('["v1", "session", "S", "img_a"]', '["session", "S", "img_a"]', "{", "[]"):
        assert ArtifactKey.from_cache_key(other) is None


@pytest.mark.parametrize(
    ("scope_id", "object_id"),
    [
        ("sess_0123-abcd.ef~9", "img_a1b2c3"),
        ("s 1", "img_a"),
        ("s&session_id=other", "o=1"),
        ("é", "img_%41"),
        ("s", "a/b?c#d"),
    ],
)
def test_the_upstream_url_of_a_key_is_httpx_s_own(scope_id: str, object_id: str) -> None:
    """The artifact URL built without httpx's encoding (plain ids) is the URL httpx builds
    from the same params, byte for byte; other ids still go through httpx's encoding."""
    upstream = Upstream(Config(upstream="http://127.0.0.1:9/"))
    key = ArtifactKey("session", scope_id, object_id)
    built = upstream.artifact_request(key, "Bearer t").url
    expected = httpx.Request(
        "GET", httpx.URL("http://127.0.0.1:9/v1/artifacts"), params=key.upstream_params()
    ).url
    assert (built.raw_path, str(built)) == (expected.raw_path, str(expected))
    assert dict(built.params) == {"object_id": object_id, "session_id": scope_id}
