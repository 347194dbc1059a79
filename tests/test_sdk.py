"""The real ``vlmrun`` SDK (pinned 0.9.2) pointed at the proxy, with no other change."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from vlmrun.client import VLMRun
from vlmrun.client.exceptions import AuthenticationError

from tests.conftest import EXECUTION, SESSION, TOKEN
from tests.helpers import metric
from tests.servers import ServerThread
from tests.standin import StandIn

PATH_KINDS = ["vid_1a2b3c", "aud_1a2b3c", "doc_1a2b3c", "recon_1a2b3c"]


def _client(proxy: ServerThread, token: str = TOKEN) -> VLMRun:
    return VLMRun(api_key=token, base_url=f"{proxy.url}/v1", max_retries=1)


@pytest.mark.parametrize(("scope", "scope_id"), [("session", SESSION), ("execution", EXECUTION)])
def test_sdk_fetches_every_kind_and_repeats_from_cache(
    standin: StandIn, proxy, scope: str, scope_id: str
) -> None:
    """Images decode with PIL, files land as paths, arrays come back as bytes; repeats are hits."""
    bodies = {
        oid: standin.add(scope, scope_id, oid, size=50_000)
        for oid in ["img_1a2b3c", "arr_1a2b3c", *PATH_KINDS]
    }
    client = _client(proxy)
    by_scope = {f"{scope}_id": scope_id}
    for _ in range(2):
        image = client.artifacts.get(object_id="img_1a2b3c", **by_scope)
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (16, 16)
        assert client.artifacts.get(object_id="arr_1a2b3c", **by_scope) == bodies["arr_1a2b3c"]
        for object_id in PATH_KINDS:
            path = client.artifacts.get(object_id=object_id, **by_scope)
            assert isinstance(path, Path) and path.read_bytes() == bodies[object_id]
    for object_id in bodies:
        assert standin.hits(scope, scope_id, object_id) == 1
    assert metric(proxy, "vlmrun_cache_requests_total", outcome="hit") == len(bodies)


def test_sdk_hits_after_a_proxy_restart(standin: StandIn, start_proxy) -> None:
    """A new proxy process on the same cache directory serves what the old one stored."""
    body = standin.add("session", SESSION, "arr_feed01", size=10_000)
    first = start_proxy()
    assert _client(first).artifacts.get(object_id="arr_feed01", session_id=SESSION) == body
    first.stop()
    second = start_proxy()
    assert _client(second).artifacts.get(object_id="arr_feed01", session_id=SESSION) == body
    assert standin.hits("session", SESSION, "arr_feed01") == 1


def test_sdk_rejects_an_invalid_key_at_construction(standin: StandIn, proxy) -> None:
    """/v1/health is never answered by the proxy, so a wrong key still fails fast."""
    with pytest.raises(AuthenticationError):
        _client(proxy, token="key-not-issued")
    assert standin.path_hits["/v1/health"] == 1
