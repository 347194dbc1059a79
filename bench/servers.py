"""The servers the benchmark compares, and the checks that they serve what they should.

* the proxy, as ``serve`` runs (bench/common.py), and the same with its access log off;
* the Python ceilings (bench/ceiling.py): a Starlette app and a raw ASGI app, on the proxy's
  server, protocol and loop;
* nginx as an equivalent cache (``proxy_cache`` keyed on the three query parameters, with
  ``proxy_cache_lock``), one worker process, on two ports: ``sendfile on`` and ``sendfile off``
  (which is faster depends on the machine; the tables use the faster and say which).

Before anything is measured, :func:`check_hit` fetches one artifact from each: a benchmark
that times errors or short answers measures nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import SCOPE, TOKEN, child

SERVER_CPU = 0  # servers on core 0, load generators on core 1
LOAD_CPU = 1
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass(frozen=True)
class Target:
    """One server under test, as the tables name it."""

    name: str
    base: str
    #: Its main process, for CPU time (its children, such as nginx's worker, are counted too).
    pid: int


def url(base: str, object_id: str) -> str:
    return f"{base}/v1/artifacts?object_id={object_id}&session_id={SCOPE}"


#: What every nginx of the benchmarks runs as (``{dir}``: its own temporary directory).
NGINX_MAIN = """
user root;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
"""

NGINX_CONF = (
    NGINX_MAIN
    + """http {{
    access_log off;
    # tcp_nopush stays off (nginx's default): with sendfile on it made 50 MiB hits about a third
    # slower here, with wrk reading 8 KiB at a time.
    keepalive_requests 1000000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy_temp;
    proxy_cache_path {dir}/cache levels=1:2 keys_zone=artifacts:64m max_size=20g inactive=7d use_temp_path=off;
    upstream api {{ server 127.0.0.1:{upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port_sendfile};
        sendfile on;
        include {dir}/location.conf;
    }}
    server {{
        listen 127.0.0.1:{port_no_sendfile};
        sendfile off;
        include {dir}/location.conf;
    }}
}}
"""
)

NGINX_LOCATION = """
location /v1/artifacts {
    proxy_pass http://api;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_cache artifacts;
    proxy_cache_key "$arg_session_id|$arg_execution_id|$arg_object_id";
    proxy_cache_valid 200 7d;
    add_header X-Cache $upstream_cache_status;  # HIT, MISS: checked like the proxy's
    proxy_cache_lock on;
    proxy_cache_lock_timeout 60s;
    proxy_read_timeout 60s;
}
"""


def nginx_version() -> str:
    if shutil.which("nginx") is None:
        return "not installed"
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False).stderr
    return out.strip().rsplit("/", 1)[-1]


@contextlib.contextmanager
def nginx(
    port_sendfile: int, port_no_sendfile: int, upstream_port: int, logs: Path
) -> Iterator[subprocess.Popen[bytes] | None]:
    """nginx with one cache on two ports, ``sendfile on`` and ``off``; None if not installed."""
    if shutil.which("nginx") is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as directory:
        conf = Path(directory) / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                dir=directory,
                port_sendfile=port_sendfile,
                port_no_sendfile=port_no_sendfile,
                upstream=upstream_port,
            )
        )
        (Path(directory) / "location.conf").write_text(NGINX_LOCATION)
        args = ["nginx", "-p", directory, "-c", str(conf), "-g", "daemon off;"]
        with child(args, port_sendfile, SERVER_CPU, logs / "nginx.log") as process:
            yield process


def ceiling(
    port: int, app: str, logs: Path, guards: bool = False
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """bench/ceiling.py's ``app`` (starlette or raw) on ``port``, pinned like the proxy; with
    ``guards``, behind the proxy's guarded protocol."""
    args = [sys.executable, "bench/ceiling.py", "--port", str(port), "--app", app]
    args += ["--guards"] if guards else []
    name = f"ceiling-{app}{'-guards' if guards else ''}"
    return child(args, port, SERVER_CPU, logs / f"{name}.log")


def check_hit(target: Target, object_id: str, size: int) -> dict[str, str]:
    """GET ``object_id`` from ``target`` twice (the first may be a miss); the second must be a
    whole 200 of ``size`` bytes with ``X-Cache: HIT`` (the ceilings say so too). Returns its
    header fields."""
    with httpx.Client(headers=AUTH, timeout=120) as client:
        client.get(url(target.base, object_id)).raise_for_status()
        response = client.get(url(target.base, object_id))
    if response.status_code != 200 or len(response.content) != size:
        raise RuntimeError(
            f"{target.name}: {response.status_code} with {len(response.content)} bytes "
            f"for {object_id}, expected 200 with {size}"
        )
    if response.headers.get("x-cache") != "HIT":
        raise RuntimeError(f"{target.name}: X-Cache {response.headers.get('x-cache')} on a repeat")
    return dict(response.headers)


def header_names(headers: dict[str, str]) -> set[str]:
    """The names a benchmark cares about: all but Date and Server (uvicorn and nginx differ)."""
    return {name.lower() for name in headers} - {"date", "server"}


def loaded(pid: int, library: str) -> bool:
    """Whether process ``pid`` has a shared object of ``library`` (e.g. uvloop) mapped."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    return f"/{library}/" in maps


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its children so far."""
    total = 0.0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for each in pids:
        with contextlib.suppress(FileNotFoundError):
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        each = todo.pop()
        found.add(each)
        todo += parents.get(each, [])
    return found


def foreign_cpu_seconds(ours: set[int]) -> float:
    """CPU time used so far by every process not in ``ours`` (and by the children they have
    reaped): what else this machine was doing while we measured."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        if int(stat.parent.name) in ours:
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            total += sum(int(n) for n in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


class ForeignShare:
    """How much of a core processes outside the benchmark have used since it was made (a
    whole run's note: how busy the rest of the machine was while we measured)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._foreign = foreign_cpu_seconds(descendants(os.getpid()))

    def cores(self) -> float:
        elapsed = time.monotonic() - self.started
        return max(0.0, foreign_cpu_seconds(descendants(os.getpid())) - self._foreign) / elapsed
