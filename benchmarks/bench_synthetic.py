"""Synthetic slide throughput: texture banks, slide specs, patch rendering and TIFF writing on one core.

    python benchmarks/bench_synthetic.py [--patches 4000] [--size 12288] [--write]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from training import synthetic


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patches", type=int, default=4000)
    parser.add_argument("--size", type=int, default=12288)
    parser.add_argument("--write", action="store_true", help="also time writing one slide")
    args = parser.parse_args()

    t = time.perf_counter()
    synthetic.index_banks()
    print(f"texture banks (once per process): {time.perf_counter() - t:.2f} s")
    config = synthetic.SyntheticConfig(width=args.size, height=args.size)
    t = time.perf_counter()
    specs = [synthetic.make_slide_spec(seed, "train", config) for seed in range(4)]
    print(f"slide spec {args.size} px: {(time.perf_counter() - t) / len(specs):.3f} s each")
    for spec in specs[:2]:
        t = time.perf_counter()
        synthetic.render_patches(spec, [[0, 0]])  # per-slide RGB banks
        first = time.perf_counter() - t
        coords, _ = spec.tissue_patches()
        picks = coords[np.random.default_rng(0).integers(0, len(coords), args.patches)]
        t = time.perf_counter()
        synthetic.render_patches(spec, picks, 256)
        dt = time.perf_counter() - t
        print(f"seed {spec.seed}: per-slide stain banks {first:.2f} s; {args.patches / dt:.0f} patches/s "
              f"(256 px, random tissue patches, one core)")
    if args.write:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            path = synthetic.write_slide(specs[0], tmp, "bench")
            print(f"write_slide {args.size} px: {time.perf_counter() - t:.2f} s, {path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
