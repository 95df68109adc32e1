"""Viewer benchmark: open a ~40,000 x 40,000 px slide in napari and pan across level 0, each figure next to its bound.

Generates the slide on demand (pyramidal JPEG-tiled TIFF built from real H&E tiles of the CMU slide in tests/data,
cached in benchmarks/_data/, not committed), then prints:

* open-to-layer, for the first slide of a session (fresh processes: napari started, nothing opened yet) and warm
  (median of --repeats), against its bound from the same run: napari opening, with its own reader, a PNG of the
  pixels it draws first (the pyramid level it picks for the whole slide on this canvas), i.e. napari's own cost to
  show those pixels, which no reader goes below. tifffile's raw figure (open the file, decode that level's tiles)
  is printed beside it;
* what the plugin imports to open a slide (torch, transformers, scipy, skimage, sklearn and dask.array must not be
  among them);
* first full frame, tile decode throughput while panning level 0, RSS during panning.

Run under a display, e.g.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_viewer.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CMU = HERE.parent / "tests" / "data" / "CMU-1-Small-Region.svs"
HEAVY = ("torch", "transformers", "scipy", "skimage", "sklearn", "dask.array")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_slide(path: Path, size: int, tile: int = 256) -> None:
    """A pyramidal JPEG TIFF whose tiles are real H&E tiles of the CMU slide, randomly flipped."""
    import tifffile
    import tiffslide

    source = tiffslide.TiffSlide(CMU).read_region((0, 0), 0, (2048, 2048), as_array=True)
    bank = [source[y : y + tile, x : x + tile] for y in range(0, 2048, tile) for x in range(0, 2048, tile)]
    bank = [t for t in bank if t.mean() < 230] or bank
    rng = np.random.default_rng(0)

    def tiles(level_size: int):
        n = -(-level_size // tile)
        for _ in range(n * n):
            t = bank[rng.integers(len(bank))]
            yield t[:: rng.choice([-1, 1]), :: rng.choice([-1, 1])]

    sizes = [size]
    while sizes[-1] > 1024:
        sizes.append(sizes[-1] // 4)
    options = dict(tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs={"level": 80})
    resolution = (1e4 / 0.5, 1e4 / 0.5, "CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(size), shape=(size, size, 3), dtype=np.uint8, subifds=len(sizes) - 1,
                  resolution=resolution[:2], resolutionunit=resolution[2], **options)
        for s in sizes[1:]:
            tif.write(tiles(s), shape=(s, s, 3), dtype=np.uint8, subfiletype=1, **options)


def raw_read(path: Path, level: int) -> np.ndarray:
    """tifffile alone: open the file and decode the tiles of one level."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return tif.series[0].levels[level].asarray(maxworkers=1)


def new_viewer():
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1600, 1000)
    QApplication.processEvents()
    return viewer


def timed_open(viewer, path: Path, **kwargs) -> float:
    """Seconds napari takes from open to layer; the layer is removed again."""
    start = time.perf_counter()
    layers = viewer.open(str(path), **kwargs)
    elapsed = time.perf_counter() - start
    for layer in layers:
        viewer.layers.remove(layer)
    return elapsed


def child(kind: str, path: Path, layer_kwargs: dict) -> None:
    """One measurement in a fresh interpreter; prints a JSON line."""
    if kind == "imports":  # the plugin's own path to layer data, without napari
        before = set(sys.modules)
        from napari_pathflip.viewer.reader import read_slide

        read_slide(str(path))
        new = {m.split(".")[0] for m in set(sys.modules) - before}
        third_party = sorted(m for m in new if m not in sys.stdlib_module_names and not m.startswith("_"))
        print(json.dumps({"heavy": [h for h in HEAVY if h in sys.modules], "top": third_party}))
        return
    viewer = new_viewer()
    if kind == "level":  # the level napari draws first for the whole slide on this canvas, the layer's scale/units
        (layer,) = viewer.open(str(path), plugin="napari-pathflip")
        viewer.screenshot(canvas_only=True)
        downsample = layer.downsample_factors[layer.data_level]
        print(json.dumps({"level": int(layer.data_level), "kwargs": {
            "scale": [float(s * d) for s, d in zip(layer.scale, downsample)], "units": [str(u) for u in layer.units]}}))
    else:
        kwargs = {"plugin": "napari-pathflip"} if kind == "slide" else layer_kwargs
        print(json.dumps({"s": timed_open(viewer, path, **kwargs)}))
    viewer.close()


def run_child(kind: str, path: Path, layer_kwargs: dict | None = None) -> dict:
    command = [sys.executable, __file__, "--child", kind, str(path), json.dumps(layer_kwargs or {})]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ms(seconds) -> str:
    return f"{1000 * float(np.median(seconds)):.0f} ms"


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40960, help="slide side in level-0 pixels")
    parser.add_argument("--steps", type=int, default=60, help="camera moves while panning level 0")
    parser.add_argument("--repeats", type=int, default=7, help="warm opens (and as many PNG opens) per median")
    parser.add_argument("--sessions", type=int, default=3, help="fresh processes for each first-open figure")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "PATH", "LAYER_KWARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), json.loads(args.child[2]))
        return

    path = HERE / "_data" / f"bench_{args.size}.tiff"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        t = time.perf_counter()
        make_slide(path, args.size)
        print(f"generated {path.name} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s")
    print(f"load average before: {load()} ({os.cpu_count()} CPUs)", flush=True)
    first = run_child("level", path)
    level, png_kwargs = first["level"], first["kwargs"]
    png = HERE / "_data" / f"bench_{args.size}_level{level}.png"
    if not png.exists():
        from PIL import Image

        Image.fromarray(raw_read(path, level)).save(png)
    imports = run_child("imports", path)
    first_slide, first_png = [], []
    for _ in range(args.sessions):  # alternated, so both see the same machine load
        first_slide.append(run_child("slide", path)["s"])
        first_png.append(run_child("png", png, png_kwargs)["s"])

    from napari_pathflip import slide as slide_module

    # count the file tiles decoded (instrumentation only)
    decoded = {"tiles": 0, "bytes": 0}
    read = slide_module._TileSource.read

    def counting_read(self, y0, y1, x0, x1):
        out = read(self, y0, y1, x0, x1)
        th, tw = self.array.chunks[:2]
        decoded["tiles"] += len(range(y0 // th, -(-y1 // th))) * len(range(x0 // tw, -(-x1 // tw)))
        decoded["bytes"] += out.nbytes
        return out

    slide_module._TileSource.read = counting_read
    viewer = new_viewer()
    rss_before = rss_mib()
    t0 = time.perf_counter()
    (layer,) = viewer.open(str(path), plugin="napari-pathflip")
    viewer.screenshot(canvas_only=True)
    t_frame = time.perf_counter() - t0

    # pan across level 0: a zoom where one screen pixel is one level-0 pixel, moving right then down
    mpp = layer.scale[-1]
    viewer.scene.camera.zoom = 1.0 / mpp
    level0 = layer.data[0]
    decoded.update(tiles=0, bytes=0)
    width = level0.shape[1] * mpp
    xs = np.linspace(0.1, 0.9, args.steps) * width
    rss_samples = []
    t_pan = time.perf_counter()
    for i, x in enumerate(xs):
        viewer.scene.camera.center = (0.5 * width * (1 + 0.6 * np.sin(i / 7)), x)
        viewer.screenshot(canvas_only=True)
        rss_samples.append(rss_mib())
    t_pan = time.perf_counter() - t_pan
    canvas = viewer.window._qt_viewer.canvas.size
    pixels = args.steps * canvas[0] * canvas[1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    viewer.layers.clear()

    warm, warm_png, raw = [], [], []
    for _ in range(args.repeats):  # alternated, so all three see the same machine load
        warm.append(timed_open(viewer, path, plugin="napari-pathflip"))
        warm_png.append(timed_open(viewer, png, **png_kwargs))
        start = time.perf_counter()
        raw_read(path, level)
        raw.append(time.perf_counter() - start)
    viewer.close()

    cold, cold_png, hot, hot_png = (float(np.median(v)) for v in (first_slide, first_png, warm, warm_png))
    side = layer.data[level].shape[0]
    print(f"slide: {level0.shape[1]} x {level0.shape[0]} px, {len(layer.data)} levels, "
          f"{path.stat().st_size / 2**20:.0f} MiB; napari draws level {level} first ({side} x {side} px)")
    print(f"plugin imports to open a slide: {', '.join(imports['top'])}; heavy ({', '.join(HEAVY)}): "
          f"{', '.join(imports['heavy']) or 'none'}")
    print(f"open-to-layer, first slide of a session: {ms(cold):>7}   bound (napari opens those pixels as PNG) "
          f"{ms(cold_png)}: ratio {cold / cold_png:.2f}  (medians of {args.sessions} fresh sessions; target <= 500 ms)")
    print(f"open-to-layer, warm:                     {ms(hot):>7}   bound (napari opens those pixels as PNG) "
          f"{ms(hot_png)}: ratio {hot / hot_png:.2f}  (medians of {args.repeats}; target <= 300 ms)")
    print(f"raw tifffile open + decode of level {level}'s tiles: {ms(raw)} (warm, one thread)")
    print(f"first full frame:     {t_frame * 1000:8.0f} ms   (target <= 1000 ms)")
    print(f"panning level 0:      {args.steps / t_pan:8.1f} frames/s, {pixels / t_pan / 1e6:.1f} Mpx/s of new "
          f"level-0 view ({canvas[0]}x{canvas[1]} canvas, every frame at a new place)")
    print(f"tiles decoded panning:{decoded['tiles'] / t_pan:8.1f} tiles/s, "
          f"{decoded['bytes'] / t_pan / 2**20:.1f} MiB/s ({decoded['tiles']} tiles)")
    print(f"RSS before open:      {rss_before:8.0f} MiB")
    print(f"RSS while panning:    {min(rss_samples):8.0f} .. {max(rss_samples):.0f} MiB "
          f"(first half max {max(rss_samples[: len(rss_samples) // 2]):.0f}, "
          f"second half max {max(rss_samples[len(rss_samples) // 2 :]):.0f})")
    print(f"peak RSS (to the end of panning): {peak:8.0f} MiB   (target <= 600 MiB)")
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
