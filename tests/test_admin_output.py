"""What the operator's commands show: a progress line (bytes and rate) for verify and warm on a
terminal, none when piped; purge asks on a terminal. Run as real processes on a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

from tests.conftest import SESSION, TOKEN
from tests.helpers import fetch
from tests.operators import admin, misses_then_hits
from tests.servers import ServerThread
from tests.standin import StandIn


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", *args]


def on_terminal(
    args: list[str], env: dict[str, str] | None = None, typed: bytes = b"", stdin: bool = False
) -> tuple[int, str, str]:
    """Run a command with stderr (and with ``stdin``, stdin too, ``typed`` already waiting
    there) on a pseudo-terminal; its status, stdout, and what the terminal showed."""
    controller, terminal = pty.openpty()
    shown: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: the process closed its end
                return
            if not data:
                return
            shown.append(data)

    with subprocess.Popen(
        _command(*args),
        stdin=terminal if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
        env={**os.environ, **(env or {})},
    ) as process:
        os.close(terminal)
        if typed:
            os.write(controller, typed)
        reader = threading.Thread(target=read)
        reader.start()
        assert process.stdout is not None
        out = process.stdout.read().decode()
        code = process.wait(timeout=60)
    reader.join(timeout=30)
    os.close(controller)
    return code, out, b"".join(shown).decode(errors="replace")


def piped(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(*args),
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


def test_verify_shows_progress_on_a_terminal_only(
    standin: StandIn, proxy: ServerThread, cache_dir: Path
) -> None:
    """On a terminal verify draws a progress line with a bar, bytes and rate; piped, its
    stderr stays empty and stdout holds the result alone."""
    for index in range(3):
        standin.add("session", SESSION, f"arr_9b000{index}", size=400_000)
        misses_then_hits(proxy, standin, f"arr_9b000{index}")
    code, out, shown = on_terminal(["verify", "--cache-dir", str(cache_dir)])
    assert code == 0 and out.startswith("verified 3 entries")
    assert "\r" in shown and "verify  [" in shown and "100%" in shown
    assert "1.1 MiB of 1.1 MiB" in shown and "/s  3/3" in shown
    quiet = piped(["verify", "--cache-dir", str(cache_dir)])
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout.startswith("verified 3 entries") and len(quiet.stdout.splitlines()) == 1


def test_warm_shows_progress_on_a_terminal_only(standin: StandIn, proxy: ServerThread) -> None:
    """On a terminal warm draws a progress line with bytes, rate and objects done; piped,
    stderr stays empty and stdout lists what it fetched."""
    standin.add("session", SESSION, "arr_9b0101", size=300_000)
    standin.add("session", SESSION, "arr_9b0102", size=300_000)
    env = {"VLMRUN_API_KEY": TOKEN}
    code, out, shown = on_terminal(["warm", "--session", SESSION, "--proxy", proxy.url], env)
    assert code == 0 and "fetched  arr_9b0101" in out
    assert "\r" in shown and "warm  " in shown and "/s  2/2" in shown and "KiB" in shown
    standin.add("session", SESSION, "arr_9b0103", size=300_000)
    quiet = piped(["warm", "--session", SESSION, "--proxy", proxy.url], env)
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert "fetched  arr_9b0103" in quiet.stdout and "/s" not in quiet.stdout


def test_purge_asks_on_a_terminal(standin: StandIn, proxy: ServerThread, cache_dir: Path) -> None:
    """On a terminal purge asks first: "n" keeps everything (exit 1), "y" removes."""
    misses_then_hits(proxy, standin, "arr_9b0201")
    args = ["purge", "--all", "--cache-dir", str(cache_dir)]
    code, out, shown = on_terminal(args, typed=b"n\n", stdin=True)
    assert code == 1 and out == "nothing removed\n"
    assert f"Remove 1 entry (2.9 KiB) from {cache_dir}? [y/N]" in shown
    assert fetch(proxy, "arr_9b0201").headers["x-cache"] == "HIT"
    code, out, shown = on_terminal(args, typed=b"y\n", stdin=True)
    assert code == 0 and out.startswith("removed 1 entry, 3000 bytes")
    assert fetch(proxy, "arr_9b0201").headers["x-cache"] == "MISS"


def test_a_reader_that_stops_early_gets_no_traceback(
    standin: StandIn, proxy: ServerThread, cache_dir: Path
) -> None:
    """`vlmrun-cache ls --json | head -c 100`: the pipe closes before the listing is written;
    the command ends quietly with status 1 instead of a BrokenPipeError traceback. The same
    for doctor, which flushes each line as it goes."""
    misses_then_hits(proxy, standin, "arr_9b0301")
    for args in (["ls", "--json"], ["doctor", "--upstream", proxy.url, "--port", "0"]):
        reader, writer = os.pipe()
        os.close(reader)  # gone before the first byte, as head is after its 100 bytes
        try:
            ended = subprocess.run(
                _command(*args, "--cache-dir", str(cache_dir)),
                stdout=writer,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            os.close(writer)
        assert (ended.returncode, ended.stderr) == (1, ""), args


def test_a_setting_flag_given_to_a_command_says_where_settings_go(tmp_path: Path) -> None:
    """``purge --redis-url ...`` (as the server takes it) is refused with where the setting goes
    instead, so that a purge never runs without the Redis the server uses."""
    ran = admin("purge", "--all", "--yes", "--redis-url", "redis://127.0.0.1:1/0")
    assert ran.code == 2
    assert "unrecognized arguments: --redis-url" in ran.err
    assert "VLMRUN_CACHE_REDIS_URL" in ran.err and "redis_url = ..." in ran.err
    assert "VLMRUN_CACHE" not in admin("stats", "--bogus").err  # not a setting: argparse's words
