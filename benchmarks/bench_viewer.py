"""Viewer benchmark: open slides in napari and pan across level 0, each figure next to a bound or to napari-wsi's.

Slides (the generated ones are cached in benchmarks/_data/, which git ignores):

* `cmu`: the real CMU-1-Small-Region.svs of tests/data (one stored 2,220 x 2,967 px level, 240-px JPEG tiles);
* `large`: a 40,960 x 40,960 px Aperio-layout SVS (JPEG, 256-px tiles, levels 4x apart) whose tiles are real H&E
  tiles of the CMU slide, randomly flipped; the layout both tiffslide and OpenSlide read as a pyramid;
* `jp2k`: the same at 16,384 px with JPEG 2000 tiles (Aperio compression 33005), the codec TCGA slides use.

Part 1, bounds (the large slide; skipped with --compare-only):

* open-to-layer, for the first slide of a session (fresh processes: napari started, nothing opened yet) and warm
  (median of --repeats), against its bound from the same run: napari opening, with its own reader, a PNG of the
  pixels it draws first (the pyramid level it picks for the whole slide on this canvas), i.e. napari's own cost to
  show those pixels, which no reader goes below. tifffile's raw figure (open the file, decode that level's tiles)
  is printed beside it;
* what the plugin imports to open a slide (torch, transformers, scipy, skimage, sklearn and dask.array must not be
  among them);
* first full frame, panning level 0 along an overlapping path (a drag), tiles decoded, RSS during panning.

Part 2, side by side with napari-wsi 1.3.0 (AstraZeneca's reader, OpenSlide backend) on each of --slides: every
measurement in a fresh napari process (ours and napari-wsi's alternate, --runs each), the same 1600 x 1000 window
and the same places: time to layer (viewer.open, the session's first slide), first full frame (the screenshot
after it), the zoom to level 0 (one screen pixel per level-0 pixel), then --pans screenshots each at a new place at
that zoom (ms per frame, also as CPU time of all the process's threads, which the load of a shared machine
disturbs far less; tiles decoded and tiles/s), RSS before opening, after panning and at peak. Medians with
[min-max] and ours/napari-wsi ratios (below 1: ours is faster or smaller). --baseline DIR adds our plugin as
found in DIR (say a `git worktree` of an earlier commit) to the same runs, for before/after figures.

napari-wsi is not a dependency of the project. Install it in a venv of its own with the same napari, Qt and numpy
as ours (the comparison is skipped, saying how, when it is missing):

    python3 -m venv benchmarks/_data/napari-wsi-venv
    .venv/bin/pip freeze --exclude-editable | grep -iv '^torch' > benchmarks/_data/constraints.txt
    benchmarks/_data/napari-wsi-venv/bin/pip install -c benchmarks/_data/constraints.txt \\
        "napari[pyqt6]==0.9.2" "napari-wsi[openslide]==1.3.0" openslide-bin

Run under a display, e.g.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_viewer.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data"
CMU = HERE.parent / "tests" / "data" / "CMU-1-Small-Region.svs"
WSI_PYTHON = DATA / "napari-wsi-venv" / "bin" / "python"
HEAVY = ("torch", "transformers", "scipy", "skimage", "sklearn", "dask.array")
PLUGINS = {"ours": "napari-pathflip", "baseline": "napari-pathflip", "napari-wsi": "napari-wsi"}
JP2K_SIZE = 16384  # side of the JPEG 2000 slide: enough levels and places, built in seconds


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory; field "VmHWM" gives its peak (unlike ru_maxrss, not inherited from the
    process that started this one)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_slide(path: Path, size: int, jp2k: bool = False, tile: int = 256) -> None:
    """An Aperio-layout SVS (level 0, thumbnail, then levels 4x apart) whose tiles are real H&E tiles of the CMU
    slide, randomly flipped: JPEG tiles, or JPEG 2000 codestreams (compression 33005, encoded once per variant, at
    about TCGA's 15 kB a tile)."""
    import imagecodecs
    import tifffile
    import tiffslide

    source = tiffslide.TiffSlide(CMU).read_region((0, 0), 0, (2048, 2048), as_array=True)
    bank = [source[y : y + tile, x : x + tile] for y in range(0, 2048, tile) for x in range(0, 2048, tile)]
    bank = [t for t in bank if t.mean() < 230] or bank
    variants = [t[::fy, ::fx] for t in bank for fy in (1, -1) for fx in (1, -1)]
    if jp2k:
        variants = [imagecodecs.jpeg2k_encode(np.ascontiguousarray(t), 30, codecformat="J2K") for t in variants]
        options = dict(compression=33005)
    else:
        options = dict(compression="jpeg", compressionargs={"level": 80})
    rng = np.random.default_rng(0)

    def tiles(level_size: int):
        for _ in range((-(-level_size // tile)) ** 2):
            yield variants[rng.integers(len(variants))]

    sizes = [size]
    while sizes[-1] > 1024:
        sizes.append(sizes[-1] // 4)
    head = "Aperio Image Library v12.0.15 \r\n"
    common = dict(tile=(tile, tile), photometric="rgb", dtype=np.uint8, metadata=None, **options)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(size), shape=(size, size, 3), **common,
                  description=f"{head}{size}x{size} ({tile}x{tile})|AppMag = 20|MPP = 0.5")
        tif.write(source[::8, ::8], photometric="rgb", metadata=None, description=f"{head}thumbnail")
        for s in sizes[1:]:
            tif.write(tiles(s), shape=(s, s, 3), **common, description=f"{head}{s}x{s}")


def slide_path(name: str, size: int) -> Path:
    """The slide file for a --slides name, generated on first use."""
    if name == "cmu":
        return CMU
    path = DATA / (f"bench_{size}.svs" if name == "large" else f"bench_jp2k_{JP2K_SIZE}.svs")
    if not path.exists():
        DATA.mkdir(exist_ok=True)
        start = time.perf_counter()
        partial = path.with_suffix(".partial.svs")  # an interrupted build leaves no slide behind
        make_slide(partial, size if name == "large" else JP2K_SIZE, jp2k=name == "jp2k")
        partial.rename(path)
        print(f"generated {path.name} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s")
    return path


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


def count_decoded_tiles(reader: str) -> dict:
    """Counts the file tiles the reader decodes from now on (instrumentation only): ours at the slide's tile
    source, napari-wsi at its zarr store, which OpenSlide answers one tile per chunk."""
    counted = {"tiles": 0}
    if reader == "napari-wsi":
        from napari_wsi.backends.openslide import OpenSlideStore

        get = OpenSlideStore.get

        async def counting_get(self, key, *args, **kwargs):
            counted["tiles"] += self._parse_key(key) is not None
            return await get(self, key, *args, **kwargs)

        OpenSlideStore.get = counting_get
        return counted
    from napari_pathflip import slide as slide_module

    source = slide_module._TileSource
    name = "_read_or_grey" if hasattr(source, "_read_or_grey") else "read"  # the file read, under any cache
    read = getattr(source, name)

    def counting_read(self, y0, y1, x0, x1):
        th, tw = self.native.tile if hasattr(self, "native") else self.array.chunks[:2]
        counted["tiles"] += len(range(y0 // th, -(-y1 // th))) * len(range(x0 // tw, -(-x1 // tw)))
        return read(self, y0, y1, x0, x1)

    setattr(source, name, counting_read)
    return counted


def pan_places(shape: tuple[int, int], canvas: tuple[int, int], count: int) -> list[tuple[float, float]]:
    """Level-0 (y, x) centres, each a new place with the whole canvas inside the slide; the same for every run."""
    rng = np.random.default_rng(26)

    def between(side: int, view: int) -> float:
        return rng.uniform(min(view, side) / 2, side - min(view, side) / 2)

    return [(between(shape[0], canvas[0]), between(shape[1], canvas[1])) for _ in range(count)]


def measure_view(reader: str, path: Path, pans: int) -> dict:
    """One reader, one slide, a fresh napari: time to layer, first frame, zoom to level 0, new places, RSS."""
    viewer = new_viewer()
    rss_before = rss_mib()
    start = time.perf_counter()
    (layer,) = viewer.open(str(path), plugin=PLUGINS[reader])
    to_layer = time.perf_counter() - start
    start = time.perf_counter()
    viewer.screenshot(canvas_only=True)
    first = time.perf_counter() - start
    counted = count_decoded_tiles(reader)  # only now: its imports are no part of the time to layer
    scale = float(layer.scale[-1])  # world units per level-0 pixel: um for ours, pixels for napari-wsi
    level0 = layer.data[0] if layer.multiscale else layer.data
    canvas_h, canvas_w = viewer.window._qt_viewer.canvas.size
    places = pan_places(level0.shape[:2], (canvas_h, canvas_w), pans + 1)
    viewer.camera.zoom = 1.0 / scale
    viewer.camera.center = (places[0][0] * scale, places[0][1] * scale)
    start = time.perf_counter()
    viewer.screenshot(canvas_only=True)
    zoom = time.perf_counter() - start
    counted["tiles"] = 0
    frames, cpu = [], []
    for y, x in places[1:]:
        viewer.camera.center = (y * scale, x * scale)
        start, start_cpu = time.perf_counter(), time.process_time()
        viewer.screenshot(canvas_only=True)
        frames.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    result = {"to_layer": to_layer, "first": first, "zoom": zoom, "pan": float(np.mean(frames)),
              "pan_cpu": float(np.mean(cpu)), "tiles": counted["tiles"] / pans,
              "tiles_per_s": counted["tiles"] / sum(frames), "rss_before": rss_before, "rss": rss_mib(),
              "peak": rss_mib("VmHWM"), "canvas": [canvas_w, canvas_h],
              "levels": len(layer.data) if layer.multiscale else 1}
    viewer.close()
    return result


def child(kind: str, path: Path, options: dict) -> None:
    """One measurement in a fresh interpreter; prints a JSON line."""
    if kind == "imports":  # the plugin's own path to layer data, without napari
        before = set(sys.modules)
        from napari_pathflip.viewer.reader import read_slide

        read_slide(str(path))
        new = {m.split(".")[0] for m in set(sys.modules) - before}
        third_party = sorted(m for m in new if m not in sys.stdlib_module_names and not m.startswith("_"))
        print(json.dumps({"heavy": [h for h in HEAVY if h in sys.modules], "top": third_party}))
        return
    if kind == "view":
        print(json.dumps(measure_view(options["reader"], path, options["pans"])))
        return
    viewer = new_viewer()
    if kind == "level":  # the level napari draws first for the whole slide on this canvas, the layer's scale/units
        (layer,) = viewer.open(str(path), plugin="napari-pathflip")
        viewer.screenshot(canvas_only=True)
        downsample = layer.downsample_factors[layer.data_level]
        print(json.dumps({"level": int(layer.data_level), "kwargs": {
            "scale": [float(s * d) for s, d in zip(layer.scale, downsample)], "units": [str(u) for u in layer.units]}}))
    else:
        kwargs = {"plugin": "napari-pathflip"} if kind == "slide" else options
        print(json.dumps({"s": timed_open(viewer, path, **kwargs)}))
    viewer.close()


def run_child(kind: str, path: Path, options: dict | None = None, python: str = sys.executable,
              pythonpath: str | None = None) -> dict:
    command = [python, __file__, "--child", kind, str(path), json.dumps(options or {})]
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{kind} measurement with {python} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ms(seconds) -> str:
    return f"{1000 * float(np.median(seconds)):.0f} ms"


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def bounds(args) -> None:
    """Part 1: the large slide against napari's own bounds (see the module doc)."""
    path = slide_path("large", args.size)
    first = run_child("level", path)
    level, png_kwargs = first["level"], first["kwargs"]
    png = DATA / f"bench_{args.size}_level{level}.png"
    if not png.exists():
        from PIL import Image

        Image.fromarray(raw_read(path, level)).save(png)
    imports = run_child("imports", path)
    first_slide, first_png = [], []
    for _ in range(args.sessions):  # alternated, so both see the same machine load
        first_slide.append(run_child("slide", path)["s"])
        first_png.append(run_child("png", png, png_kwargs)["s"])

    decoded = count_decoded_tiles("ours")
    viewer = new_viewer()
    rss_before = rss_mib()
    t0 = time.perf_counter()
    (layer,) = viewer.open(str(path), plugin="napari-pathflip")
    viewer.screenshot(canvas_only=True)
    t_frame = time.perf_counter() - t0

    # pan across level 0 as a drag does: a zoom where one screen pixel is one level-0 pixel, each view overlapping
    # the last, moving right and swinging up and down
    mpp = layer.scale[-1]
    viewer.scene.camera.zoom = 1.0 / mpp
    level0 = layer.data[0]
    width = level0.shape[1] * mpp
    xs = np.linspace(0.1, 0.9, args.steps) * width
    decoded["tiles"] = 0
    rss_samples = []
    t_pan = time.perf_counter()
    for i, x in enumerate(xs):
        viewer.scene.camera.center = (0.5 * width * (1 + 0.6 * np.sin(i / 7)), x)
        viewer.screenshot(canvas_only=True)
        rss_samples.append(rss_mib())
    t_pan = time.perf_counter() - t_pan
    canvas = viewer.window._qt_viewer.canvas.size
    pixels = args.steps * canvas[0] * canvas[1]
    peak = rss_mib("VmHWM")
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
    print(f"panning level 0:      {args.steps / t_pan:8.1f} frames/s, {pixels / t_pan / 1e6:.1f} Mpx/s of level-0 "
          f"view ({canvas[1]} x {canvas[0]} canvas, each view overlapping the last, as in a drag)")
    print(f"tiles decoded panning:{decoded['tiles'] / t_pan:8.1f} tiles/s ({decoded['tiles']} tiles)")
    print(f"RSS before open:      {rss_before:8.0f} MiB")
    print(f"RSS while panning:    {min(rss_samples):8.0f} .. {max(rss_samples):.0f} MiB "
          f"(first half max {max(rss_samples[: len(rss_samples) // 2]):.0f}, "
          f"second half max {max(rss_samples[len(rss_samples) // 2 :]):.0f})")
    print(f"peak RSS (to the end of panning): {peak:8.0f} MiB   (target <= 600 MiB)")


ROWS = [  # (key, label, scale to the unit shown, format)
    ("to_layer", "time to layer (ms)", 1000, ".0f"),
    ("first", "first full frame (ms)", 1000, ".0f"),
    ("zoom", "zoom to level 0 (ms)", 1000, ".0f"),
    ("pan", "pan, level 0, new place (ms/frame)", 1000, ".1f"),
    ("pan_cpu", "  its CPU time, all threads (ms/frame)", 1000, ".1f"),
    ("tiles", "tiles decoded per pan", 1, ".1f"),
    ("tiles_per_s", "tiles/s while panning", 1, ".0f"),
    ("rss_before", "RSS before opening (MiB)", 1, ".0f"),
    ("rss", "RSS after panning (MiB)", 1, ".0f"),
    ("peak", "peak RSS (MiB)", 1, ".0f"),
]


def compare(args) -> None:
    """Part 2: ours and napari-wsi (and --baseline) on each slide, fresh processes alternating."""
    wsi_python = Path(args.wsi_python)
    readers = {"ours": (sys.executable, None)}
    if args.baseline:
        readers["baseline"] = (sys.executable, str(Path(args.baseline).resolve()))
    if wsi_python.exists():
        readers["napari-wsi"] = (str(wsi_python), None)
    else:
        print(f"\nnapari-wsi comparison skipped: no {wsi_python}. Install napari-wsi in a venv of its own (see the top "
              "of benchmarks/bench_viewer.py) or pass --wsi-python.")
    for name in args.slides:
        path = slide_path(name, args.size)
        runs = {reader: [] for reader in readers}
        for _ in range(args.runs):
            for reader, (python, pythonpath) in readers.items():
                runs[reader].append(run_child("view", path, {"reader": reader, "pans": args.pans}, python, pythonpath))
        canvas = runs["ours"][0]["canvas"]
        levels = {reader: results[0]["levels"] for reader, results in runs.items()}
        print(f"\n{path.name}: medians of {args.runs} fresh napari processes each [min-max]; canvas {canvas[0]} x "
              f"{canvas[1]}; {args.pans} new places at level-0 zoom; levels shown: "
              + ", ".join(f"{reader} {count}" for reader, count in levels.items()) + f"; load {load()}")
        header = f"{'':38}" + "".join(f"{reader:>22}" for reader in readers)
        others = [reader for reader in readers if reader != "ours"]
        print(header + "".join(f"{'ours/' + reader:>20}" for reader in others))
        for key, label, unit, fmt in ROWS:
            cells, medians = [], {}
            for reader, results in runs.items():
                values = np.array([r[key] for r in results]) * unit
                medians[reader] = float(np.median(values))
                cells.append(f"{medians[reader]:{fmt}} [{values.min():{fmt}}-{values.max():{fmt}}]")
            ratios = [f"{medians['ours'] / medians[r]:.2f}" if medians[r] else "-" for r in others]
            print(f"{label:38}" + "".join(f"{cell:>22}" for cell in cells) + "".join(f"{r:>20}" for r in ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40960, help="side of the large slide in level-0 pixels")
    parser.add_argument("--steps", type=int, default=60, help="camera moves while panning level 0 in part 1")
    parser.add_argument("--repeats", type=int, default=7, help="warm opens (and as many PNG opens) per median")
    parser.add_argument("--sessions", type=int, default=3, help="fresh processes for each first-open figure")
    parser.add_argument("--slides", nargs="*", default=["cmu", "large", "jp2k"], choices=["cmu", "large", "jp2k"],
                        help="slides of the napari-wsi comparison (none: skip it)")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per reader and slide in the comparison")
    parser.add_argument("--pans", type=int, default=12, help="new places per comparison run")
    parser.add_argument("--wsi-python", default=str(WSI_PYTHON), help="python of the venv with napari-wsi")
    parser.add_argument("--baseline", help="a source tree whose napari_pathflip to measure beside ours")
    parser.add_argument("--compare-only", action="store_true", help="skip part 1 (the bounds)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "PATH", "OPTIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), json.loads(args.child[2]))
        return
    print(f"load average before: {load()} ({os.cpu_count()} CPUs)", flush=True)
    if not args.compare_only:
        bounds(args)
    if args.slides:
        compare(args)
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
