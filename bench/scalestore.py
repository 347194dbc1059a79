"""The store-level probes of bench/scale.py: prepared directories, runs and the table.

Each probe (bench/scaleprobes.py) runs in a process of its own whose ``proxy`` package is one
revision's; the directories it needs are prepared here, by this tree's code, afresh for each
run. Revisions alternate; each figure is the median of a few runs (the sweep over the large
cache: one run, it takes a while).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT
from proxy.access import AccessProofs
from proxy.store import EntryMeta
from proxy.store.disk import DiskStore

KiB, GiB = 1024, 1024**3


def prepare_room(directory: Path) -> None:
    """12,288 entries of 1 KiB filling the bound exactly: a 12 MiB commit evicts them all."""
    count = 12_288
    store = DiskStore(directory, max_bytes=2**40, max_object_bytes=GiB)
    body = b"s" * KiB
    meta = EntryMeta("application/octet-stream", KiB, hashlib.sha256(body).hexdigest(), 0.0)
    store.load(((f"small{i}", body, meta) for i in range(count)), batch=2000)
    store.close()
    (directory / "populated.json").write_text(json.dumps({"count": count, "bytes": count * KiB}))


def prepare_proofs(directory: Path) -> None:
    """200,000 proofs that expired a second ago, as a proxy that never cleaned them left."""
    proofs = AccessProofs(directory, ttl=3600)
    with proofs._proofs.transact():
        for index in range(200_000):
            key = json.dumps([f"{index:064x}", "session", "s"], separators=(",", ":"))
            proofs._proofs.set(key, 0, expire=-1)
    proofs.close()


#: probe -> (its figures as the table names them, a preparation per run or None: the cache)
PROBES = {
    "sweep": (
        [
            ("seconds", "orphan sweep alone over the large cache, s", "{:.1f}"),
            ("peak_growth_mib", "its peak RSS growth, MiB", "{:.0f}"),
            ("kept_mib", "RSS it keeps, MiB", "{:.0f}"),
        ],
        None,
    ),
    "lookups": (
        [
            ("per_second", "lookups outside the memory index, 40 threads, /s", "{:,.0f}"),
            ("rss_growth_mib", "their RSS growth, MiB", "{:.1f}"),
            ("connections", "index connections opened", "{}"),
        ],
        None,
    ),
    "room": (
        [
            ("seconds", "one 12 MiB commit evicting 12,288 entries of 1 KiB, s", "{:.2f}"),
            ("entries_after", "entries after it", "{:,}"),
        ],
        prepare_room,
    ),
    "room-contended": (
        [
            ("seconds", "the same while another store commits 1 KiB entries, s", "{:.2f}"),
            ("longest_wait_s", "longest wait of one of those commits, s", "{:.2f}"),
            ("concurrent_commits", "commits the other store made meanwhile", "{:,}"),
            ("over_bound", "bytes ever seen above the bound", "{:,}"),
        ],
        prepare_room,
    ),
    "proofs": (
        [
            ("open_s", "opening the proofs with 200k expired ones on disk, s", "{:.2f}"),
            ("one_expiry_s", "one housekeeping expiry, s", "{:.2f}"),
            ("left_on_disk", "expired proofs still on disk after it", "{:,}"),
        ],
        prepare_proofs,
    ),
    "live-proofs": (
        [("on_disk", "of 400,000 live proofs recorded, still on disk", "{:,}")],
        lambda directory: None,
    ),
}


def run_probes(trees: dict[str, Path], large: Path, repeats: int = 3) -> list[str]:
    """Each probe for each revision, alternating; medians of ``repeats`` (the sweep: one)."""
    labels = list(trees)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for probe, (_, prepare) in PROBES.items():
        for _ in range(1 if probe == "sweep" else repeats):
            for label in labels:
                with tempfile.TemporaryDirectory(prefix=f"scale-{probe}-") as scratch:
                    directory = large
                    if prepare is not None:
                        directory = Path(scratch) / "cache"
                        directory.mkdir(mode=0o700)
                        prepare(directory)
                    out = subprocess.run(
                        [sys.executable, str(ROOT / "bench/scaleprobes.py"), probe, str(directory)],
                        cwd=trees[label],
                        env={**os.environ, "PYTHONPATH": str(trees[label])},
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                figures = json.loads(out.strip().splitlines()[-1])
                print(probe, label, json.dumps(figures), flush=True)
                results.setdefault((probe, label), []).append(figures)
    lines = [
        "Store-level probes (bench/scaleprobes.py), each revision's code in a process of its "
        f"own, alternating; medians of {repeats} (the sweep: one run).",
        "",
        "| probe | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for probe, (figures, _) in PROBES.items():
        for name, title, form in figures:
            cells = []
            for label in labels:
                values = [run[name] for run in results[(probe, label)] if run.get(name) is not None]
                cells.append(form.format(_median(values)) if values else "-")
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _median(values: list[float]) -> float:
    middle = statistics.median(values)
    return int(middle) if all(isinstance(v, int) for v in values) else middle
