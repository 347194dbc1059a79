"""Shared by the tests of the operator's commands: running one, a server to run it against."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

from proxy.cli import main
from proxy.store.index import Index
from tests.conftest import SESSION
from tests.helpers import fetch
from tests.servers import Daemon, ServerThread
from tests.standin import StandIn


@dataclasses.dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


def admin(*args: str, cache_dir: Path | None = None) -> Ran:
    """Run ``vlmrun-cache <args>`` in this process (``--cache-dir`` added when given)."""
    argv = [*args, "--cache-dir", str(cache_dir)] if cache_dir is not None else list(args)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: usage errors and --help
            code = int(exc.code or 0)
    return Ran(code, out.getvalue(), err.getvalue())


def cache_key(object_id: str, scope: str = "session", scope_id: str = SESSION) -> str:
    return json.dumps(["v2", scope, scope_id, object_id])


def stored_file(cache_dir: Path, object_id: str) -> Path:
    """The file holding an entry's bytes."""
    index = Index(cache_dir / "entries")
    (row,) = [row for row in index.entries() if row.key == cache_key(object_id)]
    path = index.path(row)
    assert path is not None
    return path


def misses_then_hits(server: Daemon | ServerThread, standin: StandIn, object_id: str) -> bytes:
    """Fetch an artifact of the session (published now if the stand-in lacks it) until the
    server answers it from the cache; its bytes."""
    if ("session", SESSION, object_id) not in standin.artifacts:
        standin.add("session", SESSION, object_id, size=3_000)
    first = fetch(server, object_id)
    assert first.status_code == 200, first.text
    for _ in range(3):  # from disk, then (with two workers, maybe) from memory
        again = fetch(server, object_id)
        assert (again.headers["x-cache"], again.content) == ("HIT", first.content)
    assert standin.hits("session", SESSION, object_id) == 1
    return first.content


def refetched(server: Daemon | ServerThread, standin: StandIn, object_id: str, body: bytes) -> bool:
    """True if the next request went to the API (a MISS) and got ``body``."""
    before = standin.hits("session", SESSION, object_id)
    response = fetch(server, object_id)
    assert response.content == body
    return (
        response.headers["x-cache"] == "MISS"
        and standin.hits("session", SESSION, object_id) == before + 1
    )
