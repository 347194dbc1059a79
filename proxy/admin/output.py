"""How the operator's commands write: tables, sizes, times, and a progress line on a terminal.

Results go to stdout (a table, or JSON with ``--json``); progress and questions go to stderr, and
only when it is a terminal: piped or redirected, a command prints its results and nothing else.
"""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Sequence
from typing import TextIO

#: Shortest time between two redraws of a progress line.
_REDRAW_SECONDS = 0.1
_BAR_WIDTH = 24


def human_size(size: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def rfc3339(when: float) -> str:
    """Seconds since the epoch as RFC 3339 in UTC, to the millisecond: for ``--json``."""
    moment = datetime.datetime.fromtimestamp(when, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def local_time(when: float) -> str:
    """Seconds since the epoch in local time, to the second: for people."""
    return datetime.datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M:%S")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; a column named SIZE is right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(w) if header == "SIZE" else cell.ljust(w)
            for header, cell, w in zip(headers, cells, widths, strict=True)
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def confirm(question: str) -> bool:
    """Ask on the terminal; True for an answer starting with y. Only call with a terminal."""
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower().startswith("y")


class Progress:
    """One line on stderr, redrawn in place while long work runs, if stderr is a terminal.

    Shows bytes done (of ``total_bytes`` when known, with a bar), the rate, and items done of
    ``total_items``. :meth:`note` prints a line above it; :meth:`finish` removes it.
    """

    def __init__(
        self,
        label: str,
        total_items: int,
        total_bytes: int | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.label = label
        self.total_items = total_items
        self.total_bytes = total_bytes
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty()
        self.items = 0
        self.bytes = 0
        self._started = time.monotonic()
        self._drawn = 0.0
        self._draw(force=True)

    def advance(self, size: int = 0, items: int = 0) -> None:
        self.bytes += size
        self.items += items
        self._draw()

    def note(self, line: str, out: TextIO | None = None) -> None:
        """Print ``line`` (to stdout unless ``out``), keeping the progress line below it."""
        self._clear()
        print(line, file=sys.stdout if out is None else out, flush=True)
        self._draw(force=True)

    def finish(self) -> None:
        self._draw(force=True)
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        return self.bytes / max(time.monotonic() - self._started, 1e-6)

    def _clear(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._drawn < _REDRAW_SECONDS:
            return
        self._drawn = now
        parts = [self.label]
        if self.total_bytes:
            done = min(self.bytes / self.total_bytes, 1.0)
            filled = round(done * _BAR_WIDTH)
            parts.append(f"[{'#' * filled}{'-' * (_BAR_WIDTH - filled)}] {done:4.0%}")
            parts.append(f"{human_size(self.bytes)} of {human_size(self.total_bytes)}")
        else:
            parts.append(human_size(self.bytes))
        parts.append(f"{human_size(self.rate)}/s")
        parts.append(f"{self.items}/{self.total_items}")
        self.stream.write("\r\x1b[K" + "  ".join(parts))
        self.stream.flush()
