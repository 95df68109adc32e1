"""`pathflip extract`: patch features of slides, folders and CSV lists into a resumable feature store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import PathflipError
from ..extraction import ExtractionConfig, batch_patches, extract_features, plan_workers, shard
from ..encoders import build_encoder
from ..files import atomic_write_json
from ..tiling import TilingConfig
from ..weights import resolve_device
from .options import (add_allow_pickle, add_device, add_encoder, add_mpp, add_progress, fraction, non_negative_int,
                      positive_float, positive_int, slide_inputs, unexpected)


def extract_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pathflip extract", description="Extract patch features into a store.")
    parser.add_argument("inputs", nargs="+", metavar="SLIDE_OR_FOLDER", help="slide files, folders or CSV files")
    parser.add_argument("--out", required=True, help="feature store folder")
    add_encoder(parser, default="builtin")
    add_device(parser)
    add_mpp(parser)
    parser.add_argument("--batch-size", type=positive_int, default=ExtractionConfig.batch_size)
    parser.add_argument("--chunk-size", type=positive_int, default=ExtractionConfig.chunk_size)
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="decode threads (on CPU each also encodes); default: from the usable cores")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads per encoding thread on CPU")
    parser.add_argument("--reader", default=ExtractionConfig.reader, choices=["auto", "slide"],
                        help="auto: decode the file's tiles directly where possible; slide: always the slide reader")
    parser.add_argument("--target-mpp", type=positive_float, default=TilingConfig.target_mpp)
    parser.add_argument("--patch-size", type=positive_int, default=TilingConfig.patch_size)
    parser.add_argument("--stride", type=positive_int, default=None,
                        help="patch step at target mpp (default: patch size)")
    parser.add_argument("--min-tissue", type=fraction, default=TilingConfig.min_tissue_fraction)
    parser.add_argument("--float16", action="store_true", help="store features as float16")
    add_allow_pickle(parser)
    add_progress(parser)
    args = parser.parse_args(argv)

    slides, rank, world = shard(slide_inputs(args.inputs))
    tiling = TilingConfig(target_mpp=args.target_mpp, patch_size=args.patch_size, stride=args.stride,
                          min_tissue_fraction=args.min_tissue)
    config = ExtractionConfig(
        batch_size=args.batch_size, num_workers=args.workers, chunk_size=args.chunk_size,
        dtype="float16" if args.float16 else "float32", allow_pickle=args.allow_pickle, cpu_threads=args.threads,
        reader=args.reader,
    )
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    workers = plan_workers(config, resolve_device(args.device)).describe()
    print(f"{prefix}{len(slides)} slide(s) -> {args.out}; {workers}", flush=True)
    batch = batch_patches(config, tiling.patch_size)
    if batch < config.batch_size:
        print(f"{prefix}batch size capped at {batch} patches: {config.batch_size} patches of {tiling.patch_size} px "
              f"would take {config.batch_size * tiling.patch_size ** 2 * 12 / 2 ** 30:.1f} GB as float32 per batch "
              f"(bound: {config.batch_memory_mb} MB, ExtractionConfig.batch_memory_mb)", flush=True)
    encoder = build_encoder(args.encoder, allow_pickle=args.allow_pickle)  # built once, shared by all slides
    summary: dict[str, list] = {"done": [], "skipped": [], "failed": []}
    for path in slides:
        bar = None
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(desc=Path(path).name, unit="patch", leave=False, file=sys.stderr, postfix=workers)

        def progress(done: int, total: int, bar=bar) -> None:
            if bar is not None:
                bar.total = total
                bar.n = done
                bar.refresh()

        try:
            feature_set = extract_features(path, args.out, encoder, device=args.device, mpp=args.mpp,
                                           tiling=tiling, config=config, progress=progress)
            status = "skipped" if feature_set.from_cache else "done"
            summary[status].append({"slide": path, "patches": len(feature_set), "store": str(feature_set.path),
                                    "mpp_source": feature_set.attrs.get("mpp_source")})
        except (PathflipError, OSError) as exc:
            summary["failed"].append({"slide": path, "reason": str(exc)})
        except Exception as exc:  # a bug on one slide must not cost the cohort its other slides
            summary["failed"].append({"slide": path, "reason": unexpected(exc)})
        finally:
            if bar is not None:
                bar.close()

    print(f"{prefix}summary: {len(summary['done'])} done, {len(summary['skipped'])} skipped (already complete), "
          f"{len(summary['failed'])} failed")
    for entry in summary["done"] + summary["skipped"]:
        print(f"  ok      {entry['slide']}: {entry['patches']} patches (mpp from {entry['mpp_source']}) "
              f"-> {entry['store']}")
    for entry in summary["failed"]:
        print(f"  FAILED  {entry['slide']}: {entry['reason']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"summary-rank{rank}.json", summary)
    return 1 if summary["failed"] else 0
