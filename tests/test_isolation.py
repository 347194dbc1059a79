"""Who may read what, exhaustively: 3 keys x sessions and executions x cached or not x upstream
up or down. No key ever receives bytes of a scope it does not own."""

from __future__ import annotations

import itertools

import pytest

from tests.helpers import fetch
from tests.servers import ServerThread
from tests.standin import StandIn

KEYS = ["key-matrix-0", "key-matrix-1", "key-matrix-2"]
SCOPES = [(kind, f"{kind[:4]}_m{i}") for i in range(3) for kind in ("session", "execution")]


def _owns(standin: StandIn, key: str, scope: tuple[str, str]) -> bool:
    return scope in standin.tokens.get(key, set())


@pytest.fixture
def matrix(standin: StandIn) -> dict[tuple[str, str, str], bytes]:
    """Key i owns session/execution i; key 0 also owns session 1 (a shared scope)."""
    for index, key in enumerate(KEYS):
        standin.grant(key, "session", f"sess_m{index}")
        standin.grant(key, "execution", f"exec_m{index}")
    standin.grant(KEYS[0], "session", "sess_m1")
    bodies = {}
    for (kind, scope_id), state in itertools.product(SCOPES, ("cached", "fresh", "down")):
        object_id = {"cached": "vid_c00000", "fresh": "vid_f00000", "down": "vid_d00000"}[state]
        bodies[(kind, scope_id, object_id)] = standin.add(kind, scope_id, object_id, size=40_000)
    return bodies


def test_cross_key_matrix(standin: StandIn, upstream: ServerThread, proxy, matrix) -> None:
    """Owners get exact bytes (offline too, once they proved access); nobody else ever does."""
    owners = {scope: [k for k in KEYS if _owns(standin, k, scope)] for scope in SCOPES}
    for kind, scope_id in SCOPES:  # each owner primes its cached objects (and its proofs)
        for key in owners[(kind, scope_id)]:
            assert (
                fetch(proxy, "vid_c00000", key, kind, scope_id).content
                == matrix[(kind, scope_id, "vid_c00000")]
            )
    checked = 0
    for up in (True, False):
        if not up:
            upstream.stop()
        for key, (kind, scope_id), object_id in itertools.product(
            KEYS, SCOPES, ["vid_c00000", "vid_f00000" if up else "vid_d00000"]
        ):
            body = matrix[(kind, scope_id, object_id)]
            response = fetch(proxy, object_id, key, kind, scope_id)
            owner = _owns(standin, key, (kind, scope_id))
            can_read = owner and (up or object_id == "vid_c00000")
            if can_read:
                assert (response.status_code, response.content) == (200, body), (
                    key,
                    kind,
                    scope_id,
                    object_id,
                    up,
                )
            else:
                assert response.status_code in ((404,) if up else (502,)), (
                    key,
                    kind,
                    scope_id,
                    object_id,
                    up,
                )
                assert body[:64] not in response.content
            checked += 1
    assert checked == 2 * len(KEYS) * len(SCOPES) * 2
