"""A picture of the team deployment's dashboard (deploy/grafana/dashboards/vlmrun-cache.json),
made without Grafana: a short workload runs through real HAProxy (deploy/haproxy.cfg) in front of
two real proxies, a real Prometheus (deploy/prometheus.yml, scraping every second) scrapes them,
and each panel's own queries are evaluated over the run and drawn with Pillow where the panel
sits. The VLM Run API (the stand-in) is unreachable for a while in the middle of the run.

    python bench/dashboard.py                          # 90 s -> deploy/grafana/dashboard.png
    python bench/dashboard.py --duration 30 --out /tmp/dashboard.png

Needs haproxy and prometheus (Debian packages). Grafana's look is approximated, not copied.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.app import create_app
from proxy.cli import uvicorn_options
from proxy.config import load
from tests.deployfiles import DASHBOARD_FILE, REPLICAS, dashboard
from tests.deployservers import Balancer, Prometheus, wait_until
from tests.servers import ServerThread
from tests.standin import StandIn

TOKEN, SESSION = "key-dashboard-0001", "sess_da5b0a"
SIZES = (8 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20)
COLUMN, UNIT = 64, 34  # pixels per grid column and per grid row unit
PALETTE = ["#73BF69", "#F2CC0C", "#5794F2", "#FF9830", "#F2495C", "#B877D9", "#8AB8FF", "#FADE2A"]
BACKGROUND, PANEL, TEXT, DIM = "#111217", "#181b1f", "#ccccdc", "#6e7079"
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.truetype(FONT, size)
    except OSError:
        return ImageFont.load_default()


# --- the run ---------------------------------------------------------------------------------


def workload(lb: Balancer, objects: list[str], deadline: float, seed: int) -> None:
    """One client: mostly artifacts (Zipf-like popularity), some /v1/health, some unknown ids."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(objects))]
    with httpx.Client(base_url=lb.url, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        while time.monotonic() < deadline:
            roll = rng.random()
            try:
                if roll < 0.08:
                    client.get("/v1/health", timeout=10)
                else:
                    oid = "arr_404404" if roll < 0.11 else rng.choices(objects, weights)[0]
                    client.get(f"/v1/artifacts?object_id={oid}&session_id={SESSION}", timeout=30)
            except httpx.HTTPError:
                pass
            time.sleep(0.01)  # pacing, so that two cores draw readable curves


def run(duration: float, directory: Path) -> tuple[Prometheus, float, float, list[Any]]:
    """Start everything, run the workload with an API outage in the middle; returns Prometheus
    (still running), the run's start and end, and what to stop."""
    api = StandIn()
    api.grant(TOKEN, "session", SESSION)
    api.latency = 0.03
    rng = random.Random(7)
    objects = [f"arr_{index:06x}" for index in range(150)]
    for oid in objects:
        api.add("session", SESSION, oid, size=rng.choice(SIZES))
    upstream = ServerThread(api).start()
    replicas = {}
    for name in REPLICAS:
        config = load(
            env={},
            flags={
                "upstream": upstream.url,
                "cache_dir": str(directory / name),
                "max_size": "96MiB",
                "memory_cache_size": "8MiB",
                "access_log": False,
            },
        )
        replicas[name] = ServerThread(create_app(config), **uvicorn_options(config)).start()
    lb = Balancer(replicas, directory)
    assert wait_until(lambda: lb.states() == {name: "UP" for name in REPLICAS})
    targets = {f"{name}:8080": server.port for name, server in replicas.items()}
    prometheus = Prometheus({**targets, "lb:8404": lb.metrics_port}, directory)
    assert wait_until(lambda: prometheus.value("sum(up)") == 3, timeout=60)
    start = time.time()
    deadline = time.monotonic() + duration
    clients = [
        threading.Thread(target=workload, args=(lb, objects, deadline, seed)) for seed in range(4)
    ]
    for client in clients:
        client.start()
    time.sleep(duration * 0.55)
    upstream.stop()  # the API goes away ...
    time.sleep(duration * 0.15)
    upstream = ServerThread(api, port=upstream.port).start()  # ... and comes back
    for client in clients:
        client.join()
    time.sleep(3)  # the last scrapes
    return prometheus, start, time.time(), [lb, *replicas.values(), upstream]


# --- drawing ---------------------------------------------------------------------------------


def human(value: float, unit: str | None) -> str:
    if value != value:  # NaN
        return "-"
    if unit == "percentunit":
        return f"{value * 100:.0f}%"
    if unit in ("bytes", "Bps"):
        suffix = "/s" if unit == "Bps" else ""
        for name in ("B", "KiB", "MiB", "GiB"):
            if abs(value) < 1024 or name == "GiB":
                return (
                    f"{value:.0f} {name}{suffix}" if name == "B" else f"{value:.1f} {name}{suffix}"
                )
            value /= 1024
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    suffix = {"reqps": " req/s", "ops": "/s"}.get(unit or "", "")
    return f"{value:.3g}{suffix}" if abs(value) < 1000 else f"{value:,.0f}{suffix}"


def legend(fmt: str, labels: dict[str, str]) -> str:
    text = fmt
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text if fmt != "__auto" else ",".join(labels.values()) or "value"


def draw_timeseries(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    panel: dict[str, Any],
    series: list[tuple[str, list[tuple[float, float]]]],
    start: float,
    end: float,
) -> None:
    x0, y0, x1, y1 = box
    unit = panel["fieldConfig"]["defaults"].get("unit")
    values = [v for _, points in series for _, v in points if v == v]
    top = panel["fieldConfig"]["defaults"].get("max") or max(values, default=1) or 1
    plot = (x0 + 56, y0 + 30, x1 - 10, y1 - 22 - 14 * ((len(series) + 1) // 2))
    small = font(10)
    for fraction in (0, 0.5, 1):
        y = plot[3] - (plot[3] - plot[1]) * fraction
        draw.line([(plot[0], y), (plot[2], y)], fill="#23262b")
        draw.text((x0 + 6, y - 6), human(top * fraction, unit), fill=DIM, font=small)
    for index, (name, points) in enumerate(series):
        color = PALETTE[index % len(PALETTE)]
        line = [
            (
                plot[0] + (plot[2] - plot[0]) * (t - start) / (end - start),
                plot[3] - (plot[3] - plot[1]) * min(v / top, 1),
            )
            for t, v in points
            if v == v
        ]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        lx = x0 + 8 + (index % 2) * ((x1 - x0) // 2)
        ly = plot[3] + 8 + 14 * (index // 2)
        draw.rectangle([lx, ly + 3, lx + 10, ly + 7], fill=color)
        draw.text((lx + 14, ly - 2), name[:40], fill=TEXT, font=small)


def draw_heatmap(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    series: list[tuple[str, list[tuple[float, float]]]],
    start: float,
    end: float,
) -> None:
    x0, y0, x1, y1 = box
    cumulative = sorted(series, key=lambda s: float(s[0].replace("+Inf", "inf")))
    # Prometheus buckets count everything up to their bound; a heatmap shows each bucket's own.
    buckets = [
        (bound, [(t, v - below[i][1]) for i, (t, v) in enumerate(points)] if row else points)
        for row, ((bound, points), (_, below)) in enumerate(
            zip(cumulative, [cumulative[0], *cumulative[:-1]], strict=True)
        )
    ]
    plot = (x0 + 56, y0 + 30, x1 - 10, y1 - 10)
    peak = max((v for _, points in buckets for _, v in points if v == v), default=1) or 1
    height = (plot[3] - plot[1]) / max(len(buckets), 1)
    small = font(10)
    for row, (bound, points) in enumerate(buckets):
        y = plot[3] - (row + 1) * height
        if row % 3 == 0:
            draw.text(
                (x0 + 6, y), f"≤{bound}s" if bound != "+Inf" else "+Inf", fill=DIM, font=small
            )
        width = (plot[2] - plot[0]) / max(len(points), 1)
        for column, (_, value) in enumerate(points):
            if value == value and value > 0:
                shade = int(60 + 195 * min(value / peak, 1))
                x = plot[0] + column * width
                draw.rectangle(
                    [x, y, x + width, y + height - 1], fill=(shade, int(shade * 0.55), 30)
                )


def render(prometheus: Prometheus, start: float, end: float, out: Path) -> None:
    board = dashboard()
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"])
    image = Image.new("RGB", (24 * COLUMN + 16, bottom * UNIT + 60), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text(
        (10, 14),
        f"{board['title']}  ·  {int(end - start)} s run through HAProxy, two replicas",
        fill=TEXT,
        font=font(18),
    )
    span = f"{int(end - start)}s"
    for panel in board["panels"]:
        g = panel["gridPos"]
        box = (
            8 + g["x"] * COLUMN,
            50 + g["y"] * UNIT,
            8 + (g["x"] + g["w"]) * COLUMN - 6,
            50 + (g["y"] + g["h"]) * UNIT - 6,
        )
        if panel["type"] == "row":
            draw.text((box[0] + 4, box[1] + 6), panel["title"], fill=TEXT, font=font(15))
            continue
        draw.rectangle(box, fill=PANEL, outline="#2c3235")
        draw.text((box[0] + 8, box[1] + 6), panel["title"], fill=TEXT, font=font(12))
        series: list[tuple[str, list[tuple[float, float]]]] = []
        for target in panel["targets"]:
            expr = (
                target["expr"]
                .replace("$__rate_interval", "10s")
                .replace("$__range", span)
                .replace("$replica", ".*")
            )
            if panel["type"] == "stat":
                value = prometheus.value(expr)
                text = (
                    human(value, panel["fieldConfig"]["defaults"].get("unit"))
                    if value is not None
                    else "no data"
                )
                mappings = panel["fieldConfig"]["defaults"].get("mappings")
                if mappings and value is not None:
                    text = mappings[0]["options"].get(str(int(value)), {}).get("text", text)
                draw.text((box[0] + 12, box[1] + 40), text, fill="#73BF69", font=font(30))
                continue
            answer = httpx.get(
                f"http://127.0.0.1:{prometheus.port}/api/v1/query_range",
                params={"query": expr, "start": start, "end": end, "step": 2},
                timeout=30,
            ).json()
            for result in answer["data"]["result"]:
                name = legend(target["legendFormat"], result["metric"])
                if panel["type"] == "heatmap":
                    name = result["metric"].get("le", name)
                series.append((name, [(float(t), float(v)) for t, v in result["values"]]))
        if panel["type"] == "timeseries":
            draw_timeseries(draw, box, panel, series, start, end)
        elif panel["type"] == "heatmap":
            draw_heatmap(draw, box, series, start, end)
        if panel["type"] != "stat" and not series:
            draw.text((box[0] + 12, box[1] + 40), "no data", fill=DIM, font=font(14))
    image.save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of workload")
    parser.add_argument("--out", type=Path, default=DASHBOARD_FILE.parents[1] / "dashboard.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vlmrun-dashboard-") as directory:
        prometheus, start, end, running = run(args.duration, Path(directory))
        try:
            render(prometheus, start, end, args.out)
        finally:
            prometheus.stop()
            for thing in running:
                thing.stop()
    print(args.out)


if __name__ == "__main__":
    main()
