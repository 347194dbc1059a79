"""``vlmrun-cache warm``: a scope's artifacts fetched through a running proxy with the caller's
key; cached ones are not downloaded again; refused keys are told so; offline hits follow."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from proxy.admin.output import human_size
from tests.conftest import EXECUTION, OTHER_TOKEN, SESSION, TOKEN
from tests.helpers import fetch
from tests.operators import admin, misses_then_hits
from tests.servers import Daemon, ServerThread
from tests.standin import StandIn


def test_warm_fetches_what_is_missing_and_skips_the_rest(
    standin: StandIn, live_server: Daemon, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """warm lists the session through the proxy, skips items without an object_id, leaves a
    cached artifact alone (nothing downloaded) and fetches the others, which are hits after."""
    misses_then_hits(live_server, standin, "arr_3a0001")
    bodies = {
        "arr_3a0002": standin.add("session", SESSION, "arr_3a0002", size=700_000),
        "img_3a0003": standin.add("session", SESSION, "img_3a0003"),
    }
    standin.extra_list_items.append({"filename": "notes.txt", "source": "workspace"})
    monkeypatch.setenv("VLMRUN_API_KEY", TOKEN)
    ran = admin("warm", "--session", SESSION, "--proxy", live_server.url)
    assert ran.code == 0, ran
    fetched = human_size(sum(len(body) for body in bodies.values()))
    assert ran.out.splitlines()[-1] == (
        f"session {SESSION}: fetched 2 ({fetched}), 1 already cached, 0 failed; "
        "skipped 1 listed item without an object_id"
    )
    assert "cached   arr_3a0001" in ran.out and "fetched  arr_3a0002  683.6 KiB" in ran.out
    assert ran.err == "" and TOKEN not in ran.out
    assert standin.hits("session", SESSION, "arr_3a0001") == 1  # not downloaded again
    for object_id, body in bodies.items():
        assert standin.hits("session", SESSION, object_id) == 1
        hit = fetch(live_server, object_id)
        assert (hit.headers["x-cache"], hit.content) == ("HIT", body)

    # Again, at the address serve would use with these settings: nothing left to fetch. The
    # default cache directory is one of this test's (it may hold the address of a server the
    # user stopped: see the test below).
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_dir.parent / "xdg"))
    monkeypatch.setenv("VLMRUN_CACHE_PORT", str(live_server.port))
    again = admin("warm", "--session", SESSION)
    assert again.code == 0 and "fetched 0 (0 B), 3 already cached" in again.out
    # And found through the address the server recorded in its cache directory.
    monkeypatch.delenv("VLMRUN_CACHE_PORT")
    monkeypatch.delenv("VLMRUN_CACHE_CACHE_DIR", raising=False)
    found = admin("warm", "--session", SESSION, "--cache-dir", str(cache_dir))
    assert found.code == 0 and "3 already cached" in found.out, found
    assert sum(standin.hits("session", SESSION, o) for o in bodies) == 2


def test_warm_looks_past_an_address_left_by_a_stopped_server(
    standin: StandIn, proxy: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve`` leaves its address in its cache directory when it stops. A proxy started since
    on the port the settings name (here the default cache directory's server stopped, and the
    user set VLMRUN_CACHE_PORT) is the one to warm, not the address where nothing answers."""
    default = tmp_path / "xdg" / "vlmrun-artifact-cache"
    default.mkdir(parents=True)
    with socket.socket() as closed:  # a port nothing listens on once this block ends
        closed.bind(("127.0.0.1", 0))
        gone = closed.getsockname()[1]
    stale = {"scheme": "http", "host": "127.0.0.1", "port": gone}
    (default / "serve.json").write_text(json.dumps(stale))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("VLMRUN_CACHE_CACHE_DIR", raising=False)
    monkeypatch.setenv("VLMRUN_CACHE_PORT", str(proxy.port))
    monkeypatch.setenv("VLMRUN_API_KEY", TOKEN)
    standin.add("session", SESSION, "arr_3a0101")
    ran = admin("warm", "--session", SESSION)
    assert ran.code == 0, ran
    assert "fetched 1" in ran.out.splitlines()[-1]


def test_warm_reads_the_key_from_a_file_and_warms_an_execution(
    standin: StandIn, proxy: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--api-key-file gives the key (VLMRUN_API_KEY unset); --execution warms an execution; a
    --proxy URL ending in /v1 is accepted."""
    monkeypatch.delenv("VLMRUN_API_KEY", raising=False)
    body = standin.add("execution", EXECUTION, "doc_3a0101", size=20_000)
    key_file = tmp_path / "key"
    key_file.write_text(TOKEN + "\n")
    ran = admin(
        "warm",
        "--execution",
        EXECUTION,
        "--api-key-file",
        str(key_file),
        "--proxy",
        proxy.url + "/v1",
    )
    assert ran.code == 0 and "fetched 1" in ran.out, ran
    hit = fetch(proxy, "doc_3a0101", scope="execution", scope_id=EXECUTION)
    assert (hit.headers["x-cache"], hit.content) == ("HIT", body)


def test_warm_with_a_refused_key_says_so_and_fetches_nothing(
    standin: StandIn, proxy: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key the API refuses gets a clear message and exit 1, with nothing fetched; a key that
    cannot see the session is told so (1); no key at all is a usage error (2)."""
    standin.add("session", SESSION, "arr_3a0201")
    monkeypatch.setenv("VLMRUN_API_KEY", "key-wrong-999")
    refused = admin("warm", "--session", SESSION, "--proxy", proxy.url)
    assert refused.code == 1
    assert "the API refused this key (401 Invalid API key); nothing was fetched" in refused.err
    assert "key-wrong-999" not in refused.out + refused.err
    monkeypatch.setenv("VLMRUN_API_KEY", OTHER_TOKEN)
    unseen = admin("warm", "--session", SESSION, "--proxy", proxy.url)
    assert unseen.code == 1 and f"cannot list session {SESSION}: 404" in unseen.err
    assert standin.hits("session", SESSION, "arr_3a0201") == 0
    monkeypatch.delenv("VLMRUN_API_KEY")
    missing = admin("warm", "--session", SESSION, "--proxy", proxy.url)
    assert missing.code == 2 and "no API key: set VLMRUN_API_KEY" in missing.err


def test_warm_reports_what_it_could_not_fetch(
    standin: StandIn, proxy: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An artifact the API fails to give is reported with the API's answer, the others are
    still fetched, and the exit status is 1."""
    standin.add("session", SESSION, "arr_3a0301")
    body = standin.add("session", SESSION, "arr_3a0302")
    standin.extra_list_items.append({"object_id": "arr_3a0303", "source": "store"})  # not there
    monkeypatch.setenv("VLMRUN_API_KEY", TOKEN)
    ran = admin("warm", "--session", SESSION, "--proxy", proxy.url)
    assert ran.code == 1
    assert "failed   arr_3a0303: 404 Artifact arr_3a0303 not found" in ran.out
    assert "fetched 2" in ran.out and "1 failed" in ran.out
    assert fetch(proxy, "arr_3a0302").content == body


def test_warm_then_offline_hits(
    standin: StandIn,
    upstream: ServerThread,
    proxy: ServerThread,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Warming before going offline buys offline hits: every artifact of the session is cached
    and the key has a fresh proof for it, even one whose earlier proof was revoked."""
    earlier = misses_then_hits(proxy, standin, "arr_3a0401")
    later = standin.add("session", SESSION, "arr_3a0402", size=5_000)
    assert admin("revoke", "--all", cache_dir=cache_dir).code == 0  # arr_3a0401's proof is void
    monkeypatch.setenv("VLMRUN_API_KEY", TOKEN)
    assert admin("warm", "--session", SESSION, "--proxy", proxy.url).code == 0
    upstream.stop()
    for object_id, body in (("arr_3a0401", earlier), ("arr_3a0402", later)):
        hit = fetch(proxy, object_id)
        assert (hit.status_code, hit.headers["x-cache"], hit.content) == (200, "HIT", body)
    assert fetch(proxy, "arr_3a0401", OTHER_TOKEN).status_code == 502  # no proof, no bytes
