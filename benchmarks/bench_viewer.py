"""Viewer benchmark: open a ~40,000 x 40,000 px slide in napari and pan across level 0.

Generates the slide on demand (pyramidal JPEG-tiled TIFF built from real H&E tiles of the CMU slide, cached in
benchmarks/_data/, not committed), then prints: open-to-layer time, first full frame, tile-read throughput while
panning level 0, and RSS (peak and during panning). Run under a display, e.g.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_viewer.py
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CMU = HERE.parents[1] / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40960, help="slide side in level-0 pixels")
    parser.add_argument("--steps", type=int, default=60, help="camera moves while panning level 0")
    args = parser.parse_args()

    path = HERE / "_data" / f"bench_{args.size}.tiff"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        t = time.perf_counter()
        make_slide(path, args.size)
        print(f"generated {path.name} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s")

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_pathflip import slide as slide_module
    from napari_pathflip.slide import open_slide

    # count what is decoded from the file (instrumentation only)
    decoded = {"tiles": 0, "bytes": 0}
    getitem = slide_module._TileSource.__getitem__

    def counting_getitem(self, key):
        out = getitem(self, key)
        decoded["tiles"] += 1
        decoded["bytes"] += out.nbytes
        return out

    slide_module._TileSource.__getitem__ = counting_getitem
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1600, 1000)
    QApplication.processEvents()
    rss_before = rss_mib()

    t0 = time.perf_counter()
    viewer.open(str(path), plugin="napari-pathflip")
    t_layer = time.perf_counter() - t0
    layer = viewer.layers[0]
    viewer.screenshot(canvas_only=True)
    t_frame = time.perf_counter() - t0
    # the same again in this process: libraries imported, nothing of the slide cached by us
    t1 = time.perf_counter()
    viewer.open(str(path), plugin="napari-pathflip", name="again")
    t_layer_warm = time.perf_counter() - t1
    viewer.layers.remove("again")

    slide = open_slide(path)
    n_levels, mpp = len(slide.levels), slide.mpp[0]
    # pan across level 0: a zoom where one screen pixel is one level-0 pixel, moving right then down
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
    print(f"slide: {level0.shape[1]} x {level0.shape[0]} px, {n_levels} levels, {path.stat().st_size / 2**20:.0f} MiB")
    print(f"open-to-layer:        {t_layer * 1000:8.0f} ms cold (first slide: imports tiffslide/zarr), "
          f"{t_layer_warm * 1000:.0f} ms warm   (target <= 300 ms)")
    print(f"first full frame:     {t_frame * 1000:8.0f} ms   (target <= 1000 ms)")
    print(f"panning level 0:      {args.steps / t_pan:8.1f} frames/s, {pixels / t_pan / 1e6:.1f} Mpx/s of new "
          f"level-0 view ({canvas[0]}x{canvas[1]} canvas, every frame at a new place)")
    print(f"tile reads panning:   {decoded['tiles'] / t_pan:8.1f} tiles/s, {decoded['bytes'] / t_pan / 2**20:.1f} MiB/s "
          f"decoded ({decoded['tiles']} tiles)")
    print(f"RSS before open:      {rss_before:8.0f} MiB")
    print(f"RSS while panning:    {min(rss_samples):8.0f} .. {max(rss_samples):.0f} MiB "
          f"(first half max {max(rss_samples[: len(rss_samples) // 2]):.0f}, "
          f"second half max {max(rss_samples[len(rss_samples) // 2 :]):.0f})")
    print(f"peak RSS:             {peak:8.0f} MiB   (target <= 600 MiB)")
    viewer.close()


if __name__ == "__main__":
    main()
