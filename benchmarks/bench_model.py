"""PathFLIP model timings: `ground` latency for a new text and `encode_slide` throughput.

    python benchmarks/bench_model.py                  # CPU; adds CUDA rows when a GPU is present
    python benchmarks/bench_model.py --threads 1 --ground-patches 16

Goals: ground p95 <= 30 ms on CPU for a slide with 1,000 regions and a new text (issue 4); encode_slide for
500 regions x 256 patches <= 1.0 s on 2 CPU cores (issue 18; <= 50 ms on an H100). Weights are the default
MiniLM-initialised model (random for the rest): timings do not depend on training.

encode_slide is printed next to its bound from the same run: the time this machine's plain matrix multiply (one
GEMM shape, same device and dtype) takes for the same number of floating-point operations, counted by torch's
FlopCounterMode over encode_slide's matmuls and attention. A ratio of 1.0 would be encode_slide at GEMM speed.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from napari_pathflip.model import PathFLIP


# FlopCounterMode knows the CUDA attention kernels; the CPU one has the same arithmetic
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)

PATCH = 256


def synthetic_slide(regions: int, patches_per_region: int, dim: int, seed: int = 0):
    """`regions` full 16 x 16-patch regions on a square-ish grid, `patches_per_region` patches in each."""
    rng = np.random.default_rng(seed)
    cols = int(np.ceil(np.sqrt(regions)))
    local = np.stack(np.meshgrid(np.arange(16), np.arange(16)), -1).reshape(-1, 2)
    coords = []
    for r in range(regions):
        keep = local[rng.choice(256, patches_per_region, replace=False)]
        coords.append((keep + 16 * np.array([r % cols, r // cols])) * PATCH)
    coords = np.concatenate(coords)
    return rng.standard_normal((len(coords), dim)).astype(np.float32), coords


def percentiles(times_s: list[float]) -> str:
    ms = np.array(times_s) * 1e3
    return f"p50 {np.percentile(ms, 50):7.1f} ms  p95 {np.percentile(ms, 95):7.1f} ms  (n={len(ms)})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gemm_seconds(flops: float, device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """Seconds that `flops` take as n x n x n matrix multiplies (timed: whole ones, then scaled)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    count = max(1, round(flops / (2 * n**3)))
    sync(device)
    start = time.perf_counter()
    for _ in range(count):
        a @ b
    sync(device)
    return (time.perf_counter() - start) * flops / (2 * n**3 * count)


def bench_encode(model: PathFLIP, args, device: torch.device, autocast_dtype=None) -> None:
    feats, coords = synthetic_slide(500, 256, model.config.patch_dim, seed=1)
    feats_t = torch.from_numpy(feats).to(device)
    with FlopCounterMode(display=False) as counter:  # also the warm-up
        model.encode_slide(feats_t, coords, PATCH, autocast_dtype=autocast_dtype)
    flops = counter.get_total_flops()
    gemm_seconds(flops, device, autocast_dtype or torch.float32)  # warm-up
    times, bounds = [], []
    for _ in range(args.repeats):  # alternated, so both see the same machine load
        sync(device)
        start = time.perf_counter()
        model.encode_slide(feats_t, coords, PATCH, autocast_dtype=autocast_dtype)
        sync(device)
        times.append(time.perf_counter() - start)
        bounds.append(gemm_seconds(flops, device, autocast_dtype or torch.float32))
    label = f"{device.type}{' bf16' if autocast_dtype else ''}"
    ratio = np.median(times) / np.median(bounds)
    print(f"encode_slide 500 regions x 256 patches [{label}]: {percentiles(times)}; {flops / 1e9:.0f} GFLOP, as "
          f"plain GEMMs here p50 {1e3 * np.median(bounds):.0f} ms ({flops / np.median(bounds) / 1e9:.0f} GFLOP/s): "
          f"ratio {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--texts", type=int, default=50, help="new texts to ground")
    parser.add_argument("--regions", type=int, default=1000, help="regions of the grounding slide")
    parser.add_argument("--ground-patches", type=int, default=64, help="patches per region of the grounding slide")
    parser.add_argument("--repeats", type=int, default=5, help="timed encode_slide runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = PathFLIP.from_bert().eval().requires_grad_(False)  # FlopCounterMode's module hooks need no-grad weights
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, hidden {model.config.hidden_size}, "
          f"{model.config.num_layers} layers, d {model.config.embed_dim}; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    feats, coords = synthetic_slide(args.regions, args.ground_patches, model.config.patch_dim)
    start = time.perf_counter()
    enc = model.encode_slide(feats, coords, PATCH)
    print(f"grounding slide: {enc.num_regions} regions, {len(coords)} patches, encoded in "
          f"{time.perf_counter() - start:.2f} s")
    texts = [f"finding {i}: {w} with {v} nuclei" for i, (w, v) in enumerate(
        zip(np.resize(["tumour cells", "necrosis", "lymphocytes", "mitotic figures", "gland formation"], args.texts),
            np.resize(["pleomorphic", "small round", "vesicular", "hyperchromatic"], args.texts)))]
    model.ground(enc, "warm-up text", patch_level=False)
    region_times, patch_times = [], []
    for text in texts:
        start = time.perf_counter()
        model.ground(enc, text, patch_level=False)
        region_times.append(time.perf_counter() - start)
    for text in texts[:10]:
        start = time.perf_counter()
        model.ground(enc, text, top_k=5)
        patch_times.append(time.perf_counter() - start)
    print(f"ground, region level, new text, {enc.num_regions} regions [cpu]: {percentiles(region_times)}")
    print(f"ground, + patch level for top 5 regions [cpu]: {percentiles(patch_times)}")

    # weights with a patch-text head (python -m training patch-head) score every patch with one product
    model.add_patch_head()
    enc = model.encode_slide(feats, coords, PATCH)
    head_times = []
    for text in texts:
        start = time.perf_counter()
        model.ground(enc, text, top_k=5)
        head_times.append(time.perf_counter() - start)
    print(f"ground with a patch-text head, regions + all {len(coords)} patches, new text [cpu]: "
          f"{percentiles(head_times)}")
    model.patch_head, model.config.patch_head = None, False  # encode_slide timings below as before

    bench_encode(model, args, torch.device("cpu"))
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        model.to(cuda)
        bench_encode(model, args, cuda)
        bench_encode(model, args, cuda, autocast_dtype=torch.bfloat16)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
