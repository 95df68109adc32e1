"""Extraction throughput against its bounds, all measured in the same run, so the ratios hold across machines.

    .venv/bin/python benchmarks/bench_extract.py [--patches 3000] [--demo] [--batch-size 64] [--rounds 4]
                                                 [--seconds 1.5] [--workers N] [--skip-cpu]

CPU, built-in encoder, on each slide: the real Aperio CMU-1-Small-Region.svs (240-px JPEG tiles with shared JPEG
tables; from ../shared/data/wsi when present), a synthetic pyramidal JPEG TIFF (256-px tiles, written on demand to
benchmarks/_data/, which git ignores) and with --demo also sample_data/demo_slide.tiff (YCbCr JPEG), every patch of
the grid:

- model-only: the encoder on the slide's patches already in memory, on all usable cores, both as torch threads in
  one thread and as extraction lays the cores out (plan_workers); the bound is the faster of the two.
- raw decode: every tile the grid needs, decoded once from bytes already in memory, on all cores (the decode bound).
- decode: the extraction's tile reader alone (file reads, decode, cutting patches), on all cores.
- end to end: extract_features into a fresh store; "whole" is the whole call (open, tissue mask, reading, encoding,
  store), "patches" starts at its first progress report (reading + encoding + store writes). Once with the tile
  reader and once with the previous reading path (reader="slide": Slide.read_region strips) in the same pipeline.

The measures alternate in rounds (one discarded warm-up round, then --rounds), each ratio is taken within a round
and the median over rounds is printed with its range: on a machine whose cores other processes share, load changes
then hit a figure and its bound alike instead of skewing the ratio.

CUDA (only when a GPU is visible): a random-weight ViT-B/16 (transformers ViTConfig) at 448 and 224 px, bf16 vs
fp32, on the synthetic slide.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from napari_pathflip.encoders import BuiltinEncoder, Encoder, HFVisionEncoder
from napari_pathflip.extraction import (BatchReader, ExtractionConfig, Workers, EncoderRunner, encoded_batches,
                                        extract_features, plan_workers, resolve_device)
from napari_pathflip.slide import open_slide
from napari_pathflip.tiles import TileLevel, usable_cores
from napari_pathflip.tiling import TilingConfig, build_grid

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "_data"
CMU = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
EVERY_PATCH = TilingConfig(min_tissue_fraction=0.0)  # every patch, so the count is known


def synthetic_slide(patches: int) -> Path:
    """A 0.5 um/px pyramidal JPEG TIFF that is all tissue-like texture: about `patches` patches of 256 px."""
    import tifffile

    side = int(math.ceil(math.sqrt(patches))) * 256
    path = DATA / f"bench_{side}.tiff"
    if path.exists():
        return path
    DATA.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # eosin background with haematoxylin blobs, smooth variation and JPEG-unfriendly noise (realistic decode cost)
    yy, xx = np.mgrid[:side, :side].astype(np.float32)
    image = np.empty((side, side, 3), np.uint8)
    shade = 20 * np.sin(xx / 150) * np.cos(yy / 170)
    noise = rng.normal(0, 12, (side, side)).astype(np.float32)
    image[..., 0] = np.clip(225 + shade + noise, 0, 255)
    image[..., 1] = np.clip(150 + shade + noise, 0, 255)
    image[..., 2] = np.clip(200 + shade + noise, 0, 255)
    for cy, cx in rng.integers(0, side, size=(side * side // 400, 2)):
        image[max(cy - 3, 0) : cy + 3, max(cx - 3, 0) : cx + 3] = (90, 60, 150)
    options = dict(tile=(256, 256), compression="jpeg", photometric="rgb", resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=2, resolution=(2e4, 2e4), **options)
        for level in (1, 2):
            image = np.ascontiguousarray(image[::2, ::2])
            tif.write(image, subfiletype=1, resolution=(2e4 / 2**level,) * 2, **options)
    return path


def _rate(run, seconds: float) -> float:
    """Items per second of `run()` (which returns how many items it did), repeated for at least `seconds`."""
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        count += run()
    return count / (time.perf_counter() - start)


def in_rounds(measures: dict, rounds: int) -> dict[str, np.ndarray]:
    """Each measure (a function returning {name: rate}) `rounds` times, the measures alternating, after one
    discarded warm-up round; {name: rates per round}."""
    out: dict[str, list[float]] = {}
    for r in range(rounds + 1):
        for measure in measures.values():
            for name, value in measure().items():
                if r:
                    out.setdefault(name, []).append(value)
    return {name: np.array(values) for name, values in out.items()}


def _median(values: np.ndarray, percent: bool = False) -> str:
    """Median and range of per-round figures."""
    f = (lambda v: f"{v:.1%}") if percent else (lambda v: f"{v:.0f}")
    return f"{f(np.median(values))} ({f(values.min())}-{f(values.max())})"


def _reader(slide, grid, batch_size: int, mode: str = "auto") -> BatchReader:
    n = len(grid.coords)
    batches = [(s, min(s + batch_size, n), 0) for s in range(0, n, batch_size)]
    return BatchReader(slide, grid, grid.coords, batches, grid.patch_size_level0, mode)


def model_only_cpu(encoder: Encoder, patches: np.ndarray, batch_size: int, workers: Workers, seconds: float) -> float:
    """Patches/s of preprocess + forward on the slide's patches in memory, with the cores laid out as `workers`."""
    runner = EncoderRunner(encoder, torch.device("cpu"), ExtractionConfig(batch_size=batch_size))
    batches = [patches[s : s + batch_size] for s in range(0, len(patches) - batch_size + 1, batch_size)]
    count = 4 * max(workers.threads, 1) * len(batches)
    threads = torch.get_num_threads()
    torch.set_num_threads(workers.torch_threads)
    try:
        return _rate(lambda: sum(len(f) for _, f in encoded_batches(
            lambda i: batches[i % len(batches)], runner, workers, count)), seconds)
    finally:
        torch.set_num_threads(threads)


def model_only_device(encoder: Encoder, device: torch.device, batch_size: int, amp: bool, seconds: float) -> float:
    """Patches/s of preprocess + forward on an in-memory uint8 batch already on the device."""
    runner = EncoderRunner(encoder, device, ExtractionConfig(batch_size=batch_size, amp=amp))
    patches = torch.randint(0, 256, (batch_size, 256, 256, 3), dtype=torch.uint8, device=device)

    def step() -> int:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=runner.amp):
            encoder.forward(encoder.preprocess(patches))
        torch.cuda.synchronize(device)
        return batch_size

    step()
    return _rate(step, seconds)


def raw_decode(slide, grid, batch_size: int, cores: int, seconds: float) -> float:
    """Patches/s when every tile the grid needs is decoded once from bytes in memory, on `cores` threads."""
    level, reader = TileLevel.open(slide, grid.read_level), _reader(slide, grid, batch_size)
    needed = set()
    for start, stop, _ in reader.batches:
        for x, y in reader.windows(grid.coords[start:stop]):
            rows, cols = level.tile_rows_cols(int(x), int(y), grid.read_size, grid.read_size)
            needed |= {row * level.tiles_per_row + col for row in rows for col in cols}
    reader.close()
    tiles = [(index, level.read_raw(index)) for index in sorted(needed)]
    with ThreadPoolExecutor(cores) as pool:
        def run() -> int:
            list(pool.map(lambda tile: level.decode_raw(*tile), tiles))
            return len(grid.coords)

        rate = _rate(run, seconds)
    level.close()
    return rate


def decode_only(slide, grid, batch_size: int, cores: int, mode: str, seconds: float) -> float:
    """Patches/s of the extraction's reader alone (a fresh reader per pass: its tile plan is single-use)."""
    with ThreadPoolExecutor(cores) as pool:
        def run() -> int:
            reader = _reader(slide, grid, batch_size, mode)
            try:
                return sum(len(p) for p in pool.map(reader, range(len(reader.batches))))
            finally:
                reader.close()

        return _rate(run, seconds)


def end_to_end(slide: Path, encoder: Encoder, device: str, config: ExtractionConfig, seconds: float,
               tiling: TilingConfig = EVERY_PATCH) -> tuple[float, float, int]:
    """(whole call, patch phase) patches/s of extract_features into fresh stores (at least `seconds` of whole
    calls), and the patch count."""
    whole = phase = 0.0
    count = 0
    while whole == 0.0 or whole < seconds:
        store = Path(tempfile.mkdtemp(prefix="bench_store_"))
        first = []
        try:
            start = time.perf_counter()
            fs = extract_features(slide, store, encoder, device=device, tiling=tiling, config=config,
                                  progress=lambda done, total, first=first: first or first.append(time.perf_counter()))
            end = time.perf_counter()
        finally:
            shutil.rmtree(store, ignore_errors=True)
        whole, phase, count = whole + end - start, phase + end - first[0], count + len(fs)
    return count / whole, count / phase, len(fs)


def bench_slide(path: Path, args, encoder: Encoder, cores: int) -> None:
    config = ExtractionConfig(batch_size=args.batch_size, num_workers=args.workers)
    workers = plan_workers(config, torch.device("cpu"), cores)
    layouts = {f"{cores} torch threads in one thread": Workers(0, cores, "cpu"),
               f"{workers.threads} threads x {workers.torch_threads} torch thread, as extraction": workers}
    seconds = args.seconds
    with open_slide(path) as slide:
        grid = build_grid(slide, EVERY_PATCH)
        reader = _reader(slide, grid, args.batch_size)
        patches = np.concatenate([reader(i) for i in range(min(4, len(reader.batches)))])
        reader.close()
        level = TileLevel.open(slide, grid.read_level)
        tiles = f"{level.tile_width}-px tiles" if level else "not read by the tile reader"
        print(f"\n{path.name}: {len(grid.coords)} patches of {grid.read_size} px at level {grid.read_level} "
              f"({tiles}); {cores} usable cores; workers: {workers.describe()}", flush=True)
        measures = {
            "slide reader": lambda: {"slide reader": decode_only(slide, grid, args.batch_size, cores, "slide",
                                                                 seconds)},
        }
        if level:
            level.close()
            measures["raw decode"] = lambda: {"raw decode": raw_decode(slide, grid, args.batch_size, cores, seconds)}
            measures["tile reader"] = lambda: {"tile reader": decode_only(slide, grid, args.batch_size, cores, "auto",
                                                                          seconds)}
        decode = in_rounds(measures, args.rounds)
        if level:
            print(f"  decode      raw decode {_median(decode['raw decode'])} patches/s   tile reader "
                  f"{_median(decode['tile reader'])} patches/s   ratio "
                  f"{_median(decode['tile reader'] / decode['raw decode'], True)}", flush=True)
        print(f"  decode      previous reading path (slide reader) {_median(decode['slide reader'])} patches/s",
              flush=True)

    def model_only(name: str, layout: Workers):
        return lambda: {name: model_only_cpu(encoder, patches, args.batch_size, layout, seconds)}

    def extraction(label: str, mode: str):
        def measure():
            whole, phase, _ = end_to_end(path, encoder, "cpu", ExtractionConfig(
                batch_size=args.batch_size, num_workers=args.workers, reader=mode), seconds)
            return {f"{label} whole": whole, f"{label} patches": phase}
        return measure

    rates = in_rounds({**{name: model_only(name, layout) for name, layout in layouts.items()},
                       "tiles": extraction("end to end", "auto"),
                       "slide": extraction("previous reading path", "slide")}, args.rounds)
    bound = np.maximum.reduce([rates[name] for name in layouts])
    print("  model-only  " + "   ".join(f"{_median(rates[name])} patches/s ({name})" for name in layouts), flush=True)
    for label in ("end to end", "previous reading path"):
        whole, phase = rates[f"{label} whole"], rates[f"{label} patches"]
        print(f"  {label:<22} whole {_median(whole)} patches/s = {_median(whole / bound, True)} of model-only   "
              f"patches {_median(phase)} patches/s = {_median(phase / bound, True)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=3000, help="synthetic slide size")
    parser.add_argument("--demo", action="store_true", help="also sample_data/demo_slide.tiff")
    parser.add_argument("--workers", type=int, default=None, help="extraction workers (default: plan_workers)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of alternating measures (medians printed)")
    parser.add_argument("--seconds", type=float, default=1.5, help="minimum duration of each measure in a round")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    synthetic = synthetic_slide(args.patches)
    slides = [CMU] * CMU.exists() + [synthetic] + [ROOT / "sample_data" / "demo_slide.tiff"] * args.demo
    cores = usable_cores()
    print(f"torch {torch.__version__}; {cores} usable cores; batch {args.batch_size}; load average "
          f"{os.getloadavg()[0]:.2f} (other processes share these cores: compare the ratios)", flush=True)

    if not args.skip_cpu:
        encoder = BuiltinEncoder()
        for path in slides:
            bench_slide(path, args, encoder, cores)
        print(f"\nload average {os.getloadavg()[0]:.2f}", flush=True)

    if not torch.cuda.is_available():
        print("\ncuda: no GPU visible, ViT-B/16 part skipped")
        return
    from transformers import ViTConfig, ViTModel

    device = resolve_device("cuda")
    config = ExtractionConfig(num_workers=args.workers)
    print(f"\ncuda: {torch.cuda.get_device_name(device)}; workers: {plan_workers(config, device).describe()}",
          flush=True)
    for size in (448, 224):
        folder = DATA / f"vit_b16_{size}"
        if not (folder / "model.safetensors").exists():
            torch.manual_seed(0)
            ViTModel(ViTConfig(image_size=size, patch_size=16), add_pooling_layer=False).save_pretrained(folder)
        for amp in (True, False):
            encoder = HFVisionEncoder(folder)
            batch = 256
            bound = model_only_device(encoder, device, batch, amp, args.seconds)
            config = ExtractionConfig(batch_size=batch, num_workers=args.workers, amp=amp)
            end_to_end(synthetic, encoder, "cuda", config, 0.0)  # warm-up
            whole, phase, n = end_to_end(synthetic, encoder, "cuda", config, args.seconds)
            print(f"  ViT-B/16 {size}px {'bf16' if amp else 'fp32'} batch {batch} ({n} patches): model-only "
                  f"{bound:8.1f} patches/s   end to end whole {whole:8.1f} patches/s ({whole / bound:5.1%})   "
                  f"patches {phase:8.1f} patches/s ({phase / bound:5.1%})", flush=True)


if __name__ == "__main__":
    main()
