"""Localize latency in a real viewer: from a keystroke in the finding box to the canvas repaint showing it.

Opens the demo slide in napari with the workspace, Analyzes it (cached after the first run), then types queries one
character at a time at a human pace and times each keystroke until the vispy canvas has drawn the heatmap for the
text it produced (debounce + grounding in the worker + layer update + draw). Region level: the first paint of every
keystroke; patch level: the refined heatmap that follows it (patch-level attribution in the top regions). Prints
p50/p95 of both, and how long one canvas draw takes here. Goal: p95 <= 100 ms on CPU.

    xvfb-run -a python benchmarks/bench_localize.py [--weights DIR] [--device cpu] [--repeats 1]

Without trained demo weights (sample_data/weights/pathflip) it measures a randomly initialised PathFLIP of the
default (all-MiniLM-L6-v2) size, which costs the same per query.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

QUERIES = ["necrosis", "tumour nest", "fat lobules", "lymphocytes at the edge", "normal glands"]


def random_weights(folder: Path) -> Path:
    from napari_pathflip.encoders import BuiltinEncoder
    from napari_pathflip.model import PathFLIP, PathFLIPConfig

    model = PathFLIP.from_bert(config=PathFLIPConfig(patch_dim=BuiltinEncoder().dim))
    model.save_pretrained(folder)
    (folder / "encoder.json").write_text(json.dumps({"encoder": "builtin"}))
    return folder


def wait_for(app, condition, timeout: float = 120.0) -> None:
    end = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > end:
            raise TimeoutError("timed out waiting for the viewer")
        app.processEvents()
        time.sleep(0.0005)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="PathFLIP weights (default: the bundled demo, else random default-size)")
    parser.add_argument("--cache", help="feature/encoding cache (default: a temporary folder)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--repeats", type=int, default=1, help="times to type the query list per level")
    parser.add_argument("--pause", type=float, default=0.12, help="seconds between keystrokes (typing pace)")
    args = parser.parse_args()

    import napari
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QApplication

    from napari_pathflip.weights import WeightsFolder

    tmp = Path(tempfile.mkdtemp(prefix="bench-localize-"))
    weights = Path(args.weights) if args.weights else WeightsFolder.resolve().path
    if not (weights / "config.json").is_file():
        weights = random_weights(tmp / "weights" / "pathflip")
        print(f"no trained weights found: using a random default-size PathFLIP ({weights})")

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    _, workspace = viewer.window.add_plugin_dock_widget("napari-pathflip")
    slide, localize = workspace.slide, workspace.localize
    slide.weights_edit.setText(str(weights))
    slide.cache_dir = Path(args.cache) if args.cache else tmp / "cache"
    slide.device_box.setCurrentText(args.device)
    slide.load_demo()
    started = time.perf_counter()
    slide.analyze()
    wait_for(app, lambda: localize.analysis is not None, timeout=600)
    print(f"analyze (extraction + encoding, or the cache): {time.perf_counter() - started:.1f} s")

    draws, updates, draw_ms, draw_began = [], [], [], [0.0]
    canvas = viewer.window._qt_viewer.canvas._scene_canvas

    def drawn(event) -> None:
        draws.append(time.perf_counter())
        draw_ms.append((draws[-1] - draw_began[0]) * 1000)

    canvas.events.draw.connect(lambda e: draw_began.__setitem__(0, time.perf_counter()), position="first")
    canvas.events.draw.connect(drawn, position="last")
    localize.heatmap_updated.connect(lambda text, level: updates.append((time.perf_counter(), text, level)))

    def measure(level: str) -> list[float]:
        localize.detail_box.setCurrentText(level)
        latencies = []
        for query in QUERIES * args.repeats:
            localize.query.clear()
            wait_for(app, lambda: True)
            for n in range(1, len(query) + 1):
                expected = query[:n]
                if expected != expected.strip():
                    QTest.keyClick(localize.query, query[n - 1])  # a trailing space does not change the query
                    continue
                del draws[:], updates[:]
                pressed = time.perf_counter()
                QTest.keyClick(localize.query, query[n - 1])

                def painted():  # the first canvas draw after the layers took this keystroke's result
                    shown = [u for u, t, lv in updates if t == expected and lv == level]
                    return next((d for d in draws if shown and d > shown[0]), None)

                wait_for(app, lambda: painted() is not None)
                latencies.append(painted() - pressed)
                pause_end = time.perf_counter() + args.pause
                wait_for(app, lambda: time.perf_counter() > pause_end)
        return latencies

    measure("regions")  # warm-up: first text encodings, first layer creation
    for level in ("regions", "patches"):
        del draw_ms[:]
        ms = np.array(measure(level)) * 1000
        print(f"{level:8s} keystroke -> repaint over {len(ms)} keystrokes: p50 {np.percentile(ms, 50):.1f} ms, "
              f"p95 {np.percentile(ms, 95):.1f} ms, max {ms.max():.1f} ms")
    print(f"one canvas draw (slide + heatmap + boxes) here: p50 {np.percentile(draw_ms, 50):.1f} ms "
          "(software OpenGL under Xvfb is much slower than a GPU)")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
