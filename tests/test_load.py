"""The load test in bench/load.py, short, as a test: ``pytest -m slow`` (not in the default run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bounded_load_with_faults(tmp_path: Path) -> None:
    """100 clients, 20 s, 8 KiB-50 MiB objects with faults: no unexpected error, bounded RSS."""
    out = tmp_path / "load.json"
    result = subprocess.run(
        [
            sys.executable,
            "bench/load.py",
            "--clients",
            "100",
            "--duration",
            "20",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    figures = json.loads(out.read_text())
    assert result.returncode == 0, result.stdout + result.stderr
    assert figures["unexpected_errors"] == 0
    assert figures["hit"] > 0 and figures["miss"] > 0 and figures["coalesced"] > 0
    assert figures["proxy_peak_rss_MiB"] < 400
