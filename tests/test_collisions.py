"""Two accounts holding the same scope id: whatever the order and the way of asking, nobody is
ever served the other account's bytes, in both access-check modes; keys of one account share."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers import fetch
from tests.standin import Fault, StandIn

SCOPE = "sess_5a3e00"  # held by both accounts
ALICE, ALICE_TOO, BOB, STRANGER = "key-alice-a", "key-alice-b", "key-bob-a", "key-stranger"
#: Alice's account has two keys; Bob's account has the same scope id with other bytes.
ACCOUNTS = {ALICE: "alice", ALICE_TOO: "alice", BOB: "bob"}
OBJECTS = ("arr_000001", "arr_000002", "arr_000003", "arr_000004")
KINDS = ("hit", "miss", "coalesced", "range", "if-none-match")


@pytest.fixture
def colliding(standin: StandIn) -> dict[tuple[str, str], bytes]:
    """(account, object) -> bytes; Bob's differ in length from Alice's."""
    bodies: dict[tuple[str, str], bytes] = {}
    for index, object_id in enumerate(OBJECTS):
        for account, size in (("alice", 30_000 + index), ("bob", 31_000 + index)):
            bodies[(account, object_id)] = bytes([index + 1, len(account)]) * (size // 2)
    for token, account in ACCOUNTS.items():
        for object_id in OBJECTS:
            standin.add_for(token, "session", SCOPE, object_id, bodies[(account, object_id)])
    standin.add_token(STRANGER)
    return bodies


def _get(proxy, token: str, object_id: str, **headers: str) -> httpx.Response:
    return fetch(proxy, object_id, token, "session", SCOPE, **headers)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("first", [ALICE, BOB])
@pytest.mark.parametrize("mode", ["scope", "object"])
def test_colliding_scope_ids_never_share_bytes(
    standin: StandIn, start_proxy, colliding, mode: str, first: str, kind: str
) -> None:
    """Each account has filled something in the scope (so holds a proof from its own fill);
    then one caches an object and the other asks for it as a hit, a miss, by joining the running
    fill, with a Range or with the first one's ETag. Everyone always gets their own bytes."""
    proxy = start_proxy(access_check=mode)
    second = BOB if first == ALICE else ALICE

    def own(token: str, object_id: str) -> bytes:
        return colliding[(ACCOUNTS[token], object_id)]

    def expect_own(response: httpx.Response, token: str, object_id: str) -> None:
        body = own(token, object_id)
        if response.status_code == 206:
            start, end = map(int, response.headers["content-range"][6:].split("/")[0].split("-"))
            assert response.content == body[start : end + 1], (token, object_id)
        else:
            assert (response.status_code, response.content) == (200, body), (token, object_id)

    expect_own(_get(proxy, first, "arr_000002"), first, "arr_000002")  # proof from own fill
    expect_own(_get(proxy, second, "arr_000003"), second, "arr_000003")  # and for the other
    if kind == "miss":  # the second account fills it; the first, holding a proof, asks next
        expect_own(_get(proxy, second, "arr_000001"), second, "arr_000001")
        expect_own(_get(proxy, first, "arr_000001"), first, "arr_000001")
    elif kind == "coalesced":
        release = threading.Event()
        standin.faults["arr_000001"] = Fault(hold_middle=release, times=1)
        standin.arrived.clear()
        with ThreadPoolExecutor(2) as pool:
            filling = pool.submit(_get, proxy, first, "arr_000001")
            assert standin.arrived.wait(10)
            joining = pool.submit(_get, proxy, second, "arr_000001")
            expect_own(joining.result(timeout=20), second, "arr_000001")  # before the fill ends
            release.set()
            expect_own(filling.result(timeout=20), first, "arr_000001")
    else:
        expect_own(_get(proxy, first, "arr_000001"), first, "arr_000001")
        cached = _get(proxy, first, "arr_000001")  # a hit, with the entry's ETag
        expect_own(cached, first, "arr_000001")
        headers = {
            "hit": {},
            "range": {"Range": "bytes=0-99"},
            "if-none-match": {"If-None-Match": cached.headers["etag"]},
        }[kind]
        expect_own(_get(proxy, second, "arr_000001", **headers), second, "arr_000001")
    for token in (first, second, first, second):  # and from now on, as hits or not, the same
        expect_own(_get(proxy, token, "arr_000001"), token, "arr_000001")
        expect_own(_get(proxy, token, "arr_000001", Range="bytes=10-20"), token, "arr_000001")
    expect_own(_get(proxy, ALICE_TOO, "arr_000001"), ALICE_TOO, "arr_000001")
    assert _get(proxy, STRANGER, "arr_000001").status_code == 404


@pytest.mark.parametrize("mode", ["scope", "object"])
def test_keys_of_one_account_share_what_they_fetched(
    standin: StandIn, start_proxy, colliding, mode: str
) -> None:
    """Two keys of one account: the second key is checked with the API once (status only),
    then served from the cache; the artifact's body is fetched once."""
    proxy = start_proxy(access_check=mode)
    assert _get(proxy, ALICE, "arr_000004").headers["x-cache"] == "MISS"
    second = _get(proxy, ALICE_TOO, "arr_000004")
    assert (second.headers["x-cache"], second.content) == (
        "HIT",
        colliding[("alice", "arr_000004")],
    )
    assert _get(proxy, ALICE_TOO, "arr_000004").headers["x-cache"] == "HIT"
    assert standin.hits("session", SCOPE, "arr_000004") == 2  # the fill, and one check


def test_equal_lengths_are_told_apart_by_etag(standin: StandIn, start_proxy) -> None:
    """When the API sends ETags, two accounts' artifacts of the same type and length are still
    told apart."""
    standin.etags = True
    alice_bytes, bob_bytes = b"a" * 5000, b"b" * 5000
    standin.add_for(ALICE, "session", SCOPE, "img_e0e0e0", alice_bytes)
    standin.add_for(BOB, "session", SCOPE, "img_e0e0e0", bob_bytes)
    standin.add_for(BOB, "session", SCOPE, "img_e1e1e1", bob_bytes)
    proxy = start_proxy()
    assert _get(proxy, BOB, "img_e1e1e1").content == bob_bytes  # Bob holds a scope proof
    assert _get(proxy, ALICE, "img_e0e0e0").content == alice_bytes
    assert _get(proxy, BOB, "img_e0e0e0").content == bob_bytes
    assert _get(proxy, ALICE, "img_e0e0e0").content == alice_bytes
    assert _get(proxy, BOB, "img_e0e0e0").content == bob_bytes


def test_validators_compare_etags_across_codings() -> None:
    """A CDN compressing one answer does not hide a different ETag; the same ETag with a coding
    suffix or weak prefix still agrees; lengths compare only within one coding."""
    from proxy.validators import Validators

    identity = Validators("image/png", 1000, "", (("etag", '"AAA"'),))
    assert Validators("image/png", 800, "gzip", (("etag", '"BBB"'),)).conflicts(identity)
    assert not Validators("image/png", 800, "gzip", (("etag", 'W/"AAA-gzip"'),)).conflicts(identity)
    assert not Validators("image/png", 800, "gzip").conflicts(identity)
    assert Validators("image/png", 999, "").conflicts(identity)
    assert Validators("image/jpeg", 1000, "").conflicts(identity)
