"""How long the GUI thread stalls during Analyze and the first Localize query, in a real viewer.

Opens a shown napari viewer with the workspace, types --query into the Finding field with no slide open, opens the
demo slide (sample_data/demo_slide.tiff) and types it again (the floors: nothing is grounded, each key only
repaints the field and the status line; the second runs while the weights preload), presses Analyze with the demo
weights (sample_data/weights/pathflip; a fresh cache unless --cache), waits --settle seconds, then types the first
query one character at a time at a human pace. A 50 ms QTimer ticks on the GUI thread all along; the longest gap
between two ticks is the longest time the viewer could not answer (a frozen pan, a key that does not show). Printed
for the floors, for Analyze (the click until the panels are ready plus the settle) and for the first query (the
first keystroke until the canvas has drawn its patch-level heatmap and boxes), with the Analyze status lines and
when each appeared, and how long the canvas draws took (under Xvfb the canvas and every repaint of the window are
drawn in software OpenGL). --why samples the GUI thread's stack while a tick is late, and the other threads' when
they held the interpreter lock meanwhile, and prints where the stalls were. Goal: the first query's longest gap
<= 100 ms.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_localize_stall.py [--why]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

TICK_MS = 50
IDLE = {"_worker", "wait", "select", "get", "run"}  # innermost functions of a thread that waits for work


class Ticks:
    """A QTimer's ticks on the GUI thread; `longest_gap(t0, t1)` is the longest wait between ticks in [t0, t1]."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.times: list[float] = []
        self.timer = QTimer(interval=TICK_MS)
        self.timer.timeout.connect(lambda: self.times.append(time.perf_counter()))
        self.timer.start()

    def longest_gap(self, start: float, end: float) -> tuple[float, float]:
        """(seconds, when it began)."""
        inside = [start] + [t for t in self.times if start < t < end] + [end]
        return max((b - a, a) for a, b in zip(inside, inside[1:]))


def _where(frame) -> str:
    stack = traceback.extract_stack(frame)
    ours = [f for f in stack if re.search(r"napari_pathflip|napari/|vispy|superqt|torch|transformers", f.filename)]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(ours[-3:] or stack[-3:]))


class StallSampler(threading.Thread):
    """While the GUI thread is more than `late` s past its last tick, samples its stack every 5 ms. A sample that
    comes more than 20 ms late means another thread held the interpreter lock meanwhile (the GUI thread cannot run
    Python then either): the other threads' stacks are sampled instead. `report()` names the frames seen most
    often."""

    def __init__(self, ticks: Ticks, late: float = 0.1):
        super().__init__(daemon=True)
        self.ticks, self.late, self.main = ticks, late, threading.main_thread().ident
        self.samples: Counter = Counter()
        self.held: Counter = Counter()
        self.window = (0.0, float("inf"))
        self.stop = threading.Event()

    def run(self) -> None:
        me, before = threading.get_ident(), time.perf_counter()
        while not self.stop.wait(0.005):
            now = time.perf_counter()
            starved, before = now - before > 0.025, now
            last = self.ticks.times[-1] if self.ticks.times else now
            if not (now - last > self.late and self.window[0] <= now <= self.window[1]):
                continue
            frames = sys._current_frames()
            if self.main in frames:
                self.samples[_where(frames[self.main])] += 1
            if starved:
                for ident, frame in frames.items():
                    # threads blocked on a queue, an event or a selector were not the ones holding the lock
                    if ident not in (self.main, me) and frame.f_code.co_name not in IDLE:
                        self.held[_where(frame)] += 1

    def report(self, title: str) -> None:
        print(f"  where the GUI thread was while late ({title}; {sum(self.samples.values())} samples):")
        for where, n in self.samples.most_common(6):
            print(f"    {n:4d}  {where}")
        if self.held:
            print("  the other threads when the interpreter lock was held elsewhere:")
            for where, n in self.held.most_common(6):
                print(f"    {n:4d}  {where}")
        self.samples.clear()
        self.held.clear()


def wait_for(app, condition, timeout: float = 600.0, poll=None) -> None:
    end = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > end:
            raise TimeoutError("timed out waiting for the viewer")
        app.processEvents()
        if poll is not None:
            poll()
        time.sleep(0.001)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="PathFLIP weights folder (default: the bundled demo weights)")
    parser.add_argument("--cache", help="feature/encoding cache (default: a fresh temporary folder)")
    parser.add_argument("--query", default="necrosis")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between Analyze and the first key")
    parser.add_argument("--pause", type=float, default=0.12, help="seconds between keystrokes (typing pace)")
    parser.add_argument("--why", action="store_true", help="print where the GUI thread was during the stalls")
    args = parser.parse_args()

    started = time.perf_counter()
    import napari
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QApplication

    from napari_pathflip.viewer.localize import BOXES, HEATMAP
    from napari_pathflip.weights import WeightsFolder

    weights = Path(args.weights) if args.weights else WeightsFolder.resolve().path
    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="bench-stall-"))
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1600, 1000)
    app = QApplication.instance()
    _, workspace = viewer.window.add_plugin_dock_widget("napari-pathflip")
    slide, localize = workspace.slide, workspace.localize
    slide.weights_edit.setText(str(weights))
    slide.cache_dir = cache
    slide.device_box.setCurrentText("cpu")
    ticks = Ticks()
    sampler = StallSampler(ticks)
    if args.why:
        sampler.start()
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    draws: list[float] = []
    draw_ms: list[tuple[float, float]] = []  # (when, how long) of each canvas draw
    began = [0.0]
    canvas.events.draw.connect(lambda event: began.__setitem__(0, time.perf_counter()), position="first")

    def drawn(event) -> None:
        draws.append(time.perf_counter())
        draw_ms.append((began[0], (draws[-1] - began[0]) * 1000))

    canvas.events.draw.connect(drawn, position="last")

    def draw_figures(start: float, end: float) -> str:
        ms = [d for t, d in draw_ms if start <= t <= end]
        return (f"{len(ms)} canvas draws, median {sorted(ms)[len(ms) // 2]:.0f} ms, longest {max(ms):.0f} ms"
                if ms else "no canvas draw")

    def type_query() -> tuple[float, float]:
        """Types --query into the Finding field at --pause per key; (first key, last key) times."""
        localize.query.setFocus()
        first = time.perf_counter()
        for n, char in enumerate(args.query):
            QTest.keyClick(localize.query, char)
            if n < len(args.query) - 1:
                pause_end = time.perf_counter() + args.pause
                wait_for(app, lambda end=pause_end: time.perf_counter() > end)
        return first, time.perf_counter()

    def type_alone(when: str) -> None:
        """The floor: the same typing with nothing to ground (each key repaints the field and the status line)."""
        first_key, last_key = type_query()
        idle_end = last_key + 0.5
        wait_for(app, lambda: time.perf_counter() > idle_end)
        gap, _ = ticks.longest_gap(first_key, idle_end)
        print(f"typing {args.query!r} {when} (nothing to ground): longest GUI gap {gap * 1000:.0f} ms")
        if args.why:
            sampler.report(f"typing {when}")
        localize.query.clear()

    idle_end = time.perf_counter() + 2.0  # napari and the workspace settle
    wait_for(app, lambda: time.perf_counter() > idle_end)
    type_alone("with no slide open")
    slide.load_demo()
    print(f"napari + workspace + demo slide up in {time.perf_counter() - started:.1f} s; weights {weights}, "
          f"cache {cache}")
    type_alone("after opening the slide (this is when the weights preload)")

    # ------------------------------------------------------------------------------------------------ Analyze
    lines: list[tuple[float, str]] = []

    def watch_status() -> None:
        text = re.sub(r"<[^>]+>", "", slide.status.text())
        if not lines or lines[-1][1] != text:
            lines.append((time.perf_counter(), text))

    clicked = time.perf_counter()
    sampler.window = (clicked, float("inf"))
    slide.analyze_button.click()
    wait_for(app, lambda: localize.analysis is not None, poll=watch_status)
    ready = time.perf_counter()
    settle_end = ready + args.settle
    wait_for(app, lambda: time.perf_counter() > settle_end, poll=watch_status)
    gap, at = ticks.longest_gap(clicked, settle_end)
    print(f"\nAnalyze: ready after {ready - clicked:.2f} s; longest GUI gap {gap * 1000:.0f} ms "
          f"(at +{at - clicked:.2f} s; the timer ticks every {TICK_MS} ms); {draw_figures(clicked, settle_end)}")
    for (t, text), following in zip(lines, [t for t, _ in lines[1:]] + [ready]):
        print(f"  +{t - clicked:6.2f} s  for {following - t:5.2f} s  {text[:110]}")
    if args.why:
        sampler.report("Analyze")

    # --------------------------------------------------------------------------------------------- first query
    updates: list[tuple[float, str, str]] = []
    localize.heatmap_updated.connect(lambda text, detail: updates.append((time.perf_counter(), text, detail)))
    sampler.window = (time.perf_counter(), float("inf"))
    first_key, last_key = type_query()

    def shown():
        """When the canvas first drew the query's patch-level heatmap and its boxes, or None."""
        done = [t for t, text, detail in updates if text == args.query and detail == "patches"]
        if not done or HEATMAP not in viewer.layers or BOXES not in viewer.layers:
            return None
        return next((d for d in draws if d > done[0]), None)

    wait_for(app, lambda: shown() is not None, timeout=120)
    end = shown()
    gap, at = ticks.longest_gap(first_key, end)
    first_region = next((t for t, text, detail in updates if detail == "regions"), end)
    print(f"\nfirst query {args.query!r} typed in {last_key - first_key:.2f} s; first heatmap "
          f"{(first_region - first_key) * 1000:.0f} ms after the first key; patch heatmap + boxes drawn "
          f"{(end - last_key) * 1000:.0f} ms after the last key")
    print(f"first query: longest GUI gap {gap * 1000:.0f} ms (at +{at - first_key:.2f} s after the first key); "
          f"{draw_figures(first_key, end)} (the slide with the heatmap and boxes; software OpenGL under Xvfb is far "
          "slower than a GPU)")
    if args.why:
        sampler.report("first query")
    sampler.stop.set()
    ticks.timer.stop()
    # background work still running (the chat dock loads its model after Analyze) must end before the viewer goes
    from qtpy.QtCore import QThreadPool
    wait_for(app, lambda: QThreadPool.globalInstance().activeThreadCount() == 0, timeout=300)
    viewer.close()
    if not args.cache:
        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
