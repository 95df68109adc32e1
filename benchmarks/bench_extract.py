"""Extraction throughput: end-to-end patches/s vs. the model-only bound measured in the same run.

CPU: the built-in encoder on a synthetic pyramidal JPEG-tiled TIFF (written on demand to benchmarks/_data/, which git
ignores) or on sample_data/demo_slide.tiff when present. CUDA (only when a GPU is visible): a random-weight
ViT-B/16 (transformers ViTConfig) at 448 and 224 px, bf16 vs fp32.

    .venv/bin/python benchmarks/bench_extract.py [--patches 3000] [--workers 2] [--batch-size 64] [--skip-cpu]

End-to-end = reading (JPEG decode in DataLoader workers) + transfer + preprocessing + model + store writes.
Model-only = the same encoder on a batch already in memory (on the device), i.e. the ceiling for end to end.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_pathflip.encoders import BuiltinEncoder, Encoder, HFVisionEncoder
from napari_pathflip.extraction import ExtractionConfig, _Runner, extract_features, resolve_device
from napari_pathflip.tiling import TilingConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "_data"


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


def model_only(encoder: Encoder, device: torch.device, batch_size: int, amp: bool, seconds: float = 5.0) -> float:
    """Patches/s of preprocess + forward on an in-memory uint8 batch already on the device."""
    runner = _Runner(encoder, device, ExtractionConfig(batch_size=batch_size, amp=amp))
    patches = torch.randint(0, 256, (batch_size, 256, 256, 3), dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=runner.amp):
            encoder.forward(encoder.preprocess(patches))

    for _ in range(3):
        step()
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += batch_size
    sync()
    return count / (time.perf_counter() - start)


def end_to_end(slide: Path, encoder: Encoder, device: str, config: ExtractionConfig) -> tuple[float, int]:
    store = Path(tempfile.mkdtemp(prefix="bench_store_"))
    try:
        tiling = TilingConfig(min_tissue_fraction=0.0)  # every patch, so the count is known
        start = time.perf_counter()
        fs = extract_features(slide, store, encoder, device=device, tiling=tiling, config=config)
        return len(fs) / (time.perf_counter() - start), len(fs)
    finally:
        shutil.rmtree(store, ignore_errors=True)


def report(label: str, e2e: float, n: int, bound: float) -> None:
    print(f"{label:<38} end-to-end {e2e:8.1f} patches/s ({n} patches)   model-only {bound:8.1f} patches/s   "
          f"ratio {e2e / bound:5.1%}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=3000, help="synthetic slide size (ignored for the demo slide)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cpu-threads", type=int, default=2)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--demo", action="store_true", help="use sample_data/demo_slide.tiff instead")
    args = parser.parse_args()
    demo = ROOT / "sample_data" / "demo_slide.tiff"
    slide = demo if args.demo and demo.exists() else synthetic_slide(args.patches)
    print(f"slide: {slide.relative_to(ROOT)}  torch {torch.__version__}  cpu threads {args.cpu_threads}  "
          f"workers {args.workers}", flush=True)

    if not args.skip_cpu:
        torch.set_num_threads(args.cpu_threads)
        encoder = BuiltinEncoder()
        bound = model_only(encoder, torch.device("cpu"), args.batch_size, amp=False)
        config = ExtractionConfig(batch_size=args.batch_size, num_workers=args.workers)
        e2e, n = end_to_end(slide, encoder, "cpu", config)
        report(f"cpu builtin (d={encoder.dim}) batch {args.batch_size}", e2e, n, bound)

    if not torch.cuda.is_available():
        print("cuda: no GPU visible, ViT-B/16 part skipped")
        return
    from transformers import ViTConfig, ViTModel

    device = resolve_device("cuda")
    print(f"cuda: {torch.cuda.get_device_name(device)}", flush=True)
    for size in (448, 224):
        folder = DATA / f"vit_b16_{size}"
        if not (folder / "model.safetensors").exists():
            torch.manual_seed(0)
            ViTModel(ViTConfig(image_size=size, patch_size=16), add_pooling_layer=False).save_pretrained(folder)
        for amp in (True, False):
            encoder = HFVisionEncoder(folder)
            batch = 256
            bound = model_only(encoder, device, batch, amp=amp)
            config = ExtractionConfig(batch_size=batch, num_workers=max(args.workers, 8), amp=amp)
            e2e, n = end_to_end(slide, encoder, "cuda", config)
            report(f"cuda ViT-B/16 {size}px {'bf16' if amp else 'fp32'} batch {batch}", e2e, n, bound)


if __name__ == "__main__":
    main()
