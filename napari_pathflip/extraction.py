"""Where patch features are computed: slide -> tissue grid -> batched reads in workers -> encoder -> feature store.

`extract_features` is the core API (napari passes its own progress callback and cancel event); `main` is the
`pathflip extract` command with cohort mode, torchrun sharding and a summary.

Reading runs in DataLoader worker processes, each with its own slide handle (opened lazily in the worker, never
pickled). A batch's patches that touch each other on a row are read as one strip, so a JPEG tile shared by
neighbouring patches is decoded once per strip instead of once per patch. Batches never straddle a store chunk,
so a resumed run computes exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .encoders import ENCODER_HELP, Encoder, build_encoder
from .errors import PathflipError
from .features import FeatureSet, SlideStore, store_key
from .slide import Slide, is_slide_path, open_slide
from .tiling import PatchGrid, TilingConfig, build_grid, region_ids, resolve_mpp


class ExtractionCancelled(PathflipError):
    """Extraction stopped on request; finished chunks are kept and the next run continues from them."""


@dataclass
class ExtractionConfig:
    batch_size: int = 64  # patches per read/encode batch (halved on CUDA out-of-memory for the forward pass)
    num_workers: int = 2  # DataLoader reader processes; 0 reads in this process
    chunk_size: int = 1024  # patches per store chunk: the unit of resume (at most this much work is redone)
    dtype: str = "float32"  # stored feature dtype: float32 or float16
    amp: bool = True  # bf16 autocast on CUDA (encoders that are plain statistics opt out)
    channels_last: bool = True  # on CUDA
    prefetch_factor: int = 2  # batches each worker reads ahead
    # multiprocessing start method of the readers. None: fork when called from the main thread (scripts, the CLI),
    # forkserver when called from another thread (napari's workers: forking a process whose GUI thread runs can
    # leave the copy broken; a forkserver child starts clean but re-imports the __main__ script, as spawn does)
    worker_start_method: str | None = None
    cpu_threads: int | None = None  # torch threads while encoding on CPU; None keeps torch's setting
    allow_pickle: bool = False  # let encoders load pickle checkpoints (CONCH's pytorch_model.bin)


def _worker_context(config: ExtractionConfig):
    """The multiprocessing context of the reader processes (see ExtractionConfig.worker_start_method)."""
    import multiprocessing

    method = config.worker_start_method
    if method is None:
        if threading.current_thread() is threading.main_thread() or (
                "forkserver" not in multiprocessing.get_all_start_methods()):
            return None
        method = "forkserver"
    context = multiprocessing.get_context(method)
    if method == "forkserver":  # readers fork from a server that has already imported torch and this module
        context.set_forkserver_preload(["torch", __name__])
    return context


ProgressFn = Callable[[int, int], "bool | None"]  # (patches done, total) -> False to cancel


def _versions() -> dict:
    out = {}
    for name in ("napari-pathflip", "torch", "numpy", "tiffslide", "tifffile", "h5py", "scikit-image"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def resolve_device(device: str = "auto") -> torch.device:
    """"auto": the CUDA device of this process (LOCAL_RANK under torchrun) when there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise PathflipError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu.")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(device)


# ---------------------------------------------------------------------------------------------------------------
# reading


class PatchBatches(torch.utils.data.Dataset):
    """Item i = uint8 patches [B, P, P, 3] of batch i, or the message of the PathflipError that stopped it."""

    def __init__(self, slide: Slide, mpp, storage_options, coords, batches, grid: PatchGrid, stride0: int):
        self.path, self.mpp, self.storage_options = slide.path, mpp, storage_options
        self.coords, self.batches = coords, batches
        self.level, self.read_size, self.patch_size = grid.read_level, grid.read_size, grid.patch_size
        self.stride0 = stride0
        self._slide, self._pid = slide, os.getpid()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_slide"], state["_pid"] = None, None  # a handle never crosses processes
        return state

    def _handle(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():  # a fresh (spawned or forked) worker
            self._slide = open_slide(self.path, mpp=self.mpp, storage_options=self.storage_options)
            self._pid = os.getpid()
        return self._slide

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        start, stop, _ = self.batches[index]
        try:
            return torch.from_numpy(self.read(self.coords[start:stop]))
        except PathflipError as exc:
            return str(exc)  # re-raised in the main process without DataLoader's traceback wrapping

    def read(self, coords: np.ndarray) -> np.ndarray:
        """Patches at `coords` (row-major); horizontal runs of touching patches are read as one strip."""
        slide = self._handle()
        ds = slide.downsamples[self.level]
        out = np.empty((len(coords), self.patch_size, self.patch_size, 3), dtype=np.uint8)
        i = 0
        while i < len(coords):
            j = i + 1
            while j < len(coords) and coords[j, 1] == coords[i, 1] and coords[j, 0] - coords[j - 1, 0] == self.stride0:
                j += 1
            x0, y = int(coords[i, 0]), int(coords[i, 1])
            width = int(round((coords[j - 1, 0] - x0) / ds)) + self.read_size
            strip = slide.read_region((x0, y), self.level, (width, self.read_size))
            for k in range(i, j):
                left = int(round((coords[k, 0] - x0) / ds))
                out[k] = _resize(strip[:, left : left + self.read_size], self.patch_size)
            i = j
        return out


def _resize(patch: np.ndarray, size: int) -> np.ndarray:
    """Resample a read patch to the target patch size (only when no pyramid level matches the target mpp)."""
    if patch.shape[0] == size and patch.shape[1] == size:
        return patch
    from PIL import Image

    # PIL's bilinear filter widens its support when shrinking, i.e. it is antialiased
    return np.asarray(Image.fromarray(np.ascontiguousarray(patch)).resize((size, size), Image.BILINEAR))


# ---------------------------------------------------------------------------------------------------------------
# encoding


class _Runner:
    """Runs an encoder on uint8 batches on one device: transfer, preprocess, autocast, OOM back-off."""

    def __init__(self, encoder: Encoder, device: torch.device, config: ExtractionConfig):
        self.encoder, self.device = encoder, device
        self.cuda = device.type == "cuda"
        encoder.prepare(device, channels_last=self.cuda and config.channels_last)
        self.amp = self.cuda and config.amp and encoder.supports_amp
        self.micro = config.batch_size

    @torch.inference_mode()
    def __call__(self, patches: torch.Tensor) -> np.ndarray:
        x = patches.to(self.device, non_blocking=self.cuda)
        outputs, start = [], 0
        while start < len(x):
            part = x[start : start + self.micro]
            try:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    y = self.encoder.forward(self.encoder.preprocess(part))
                outputs.append(y.float().cpu())
                start += len(part)
            except torch.OutOfMemoryError as exc:
                if self.micro == 1:
                    raise PathflipError(
                        f"the {self.encoder.name} encoder does not fit in GPU memory even one patch at a time; "
                        "free the GPU or use --device cpu."
                    ) from exc
                del exc
                torch.cuda.empty_cache()
                self.micro = max(1, self.micro // 2)
        return torch.cat(outputs).numpy()


# ---------------------------------------------------------------------------------------------------------------
# core API


def extract_features(
    slide_or_path: Slide | str | os.PathLike,
    store_dir: str | os.PathLike,
    encoder: str | Encoder = "builtin",
    *,
    device: str = "auto",
    mpp: float | None = None,
    tiling: TilingConfig | None = None,
    config: ExtractionConfig | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    storage_options: dict | None = None,
) -> FeatureSet:
    """Patch features of one slide, from the store when finished there, else computed (resuming earlier work).

    `slide_or_path`: an open Slide (kept open) or a path/URL (opened with `mpp` and `storage_options`). Reader
    workers reopen the slide by path, so pass `storage_options` for remote slides either way. `store_dir`: the
    store root; each (slide, encoder, grid) gets its own folder there (see features.py).

    Raises PathflipError for unreadable slides (naming the slide and tile), slides smaller than one patch or
    without a known pixel size, and ExtractionCancelled when `cancel` is set or `progress` returns False (the
    chunks finished so far are kept; the next call continues).
    """
    tiling, config = tiling or TilingConfig(), config or ExtractionConfig()
    if config.dtype not in ("float32", "float16"):
        raise PathflipError(f"feature dtype {config.dtype!r}: use float32 or float16.")
    own = not isinstance(slide_or_path, Slide)
    slide = open_slide(slide_or_path, mpp=mpp, storage_options=storage_options) if own else slide_or_path
    try:
        encoder = build_encoder(encoder, allow_pickle=config.allow_pickle)
        mpp_used, _ = resolve_mpp(slide)
        key = store_key(slide.fingerprint, encoder.encoder_id, tiling.as_key(), mpp_used, config.dtype)
        store = SlideStore(store_dir, slide.name, key)
        cached = store.load_complete()
        if cached is not None:
            if progress:
                progress(len(cached), len(cached))
            return cached
        store.lock()
        try:
            cached = store.load_complete()  # another process may have finished it while we waited
            if cached is not None:
                return cached
            return _extract(slide, store, encoder, key, device, tiling, config, progress, cancel, storage_options)
        finally:
            store.unlock()
    finally:
        if own:
            slide.close()


def _extract(slide, store, encoder, key, device, tiling, config, progress, cancel, storage_options) -> FeatureSet:
    grid = build_grid(slide, tiling)
    stride0 = grid.patch_size_level0 if not tiling.stride else int(round(
        tiling.stride * grid.patch_size_level0 / tiling.patch_size))
    runner = _Runner(encoder, resolve_device(device), config)
    ids, origins = region_ids(grid.coords, grid.region_size_level0)
    plan = {
        "key": key,
        "num_patches": len(grid.coords),
        "dim": int(encoder.dim),
        "chunk_size": int(config.chunk_size),
        "dtype": config.dtype,
        "encoder_id": encoder.encoder_id,
        "slide": slide.path,
    }
    plan = store.start(plan, grid.coords, ids, origins)
    coords, ids, origins = store.load_grid()
    total, chunk = plan["num_patches"], plan["chunk_size"]
    done = store.done_chunks(plan)
    pending = [c for c in range(-(-total // chunk)) if c not in done]
    batches = [
        (start, min(start + config.batch_size, (c + 1) * chunk, total), c)
        for c in pending
        for start in range(c * chunk, min((c + 1) * chunk, total), config.batch_size)
    ]
    finished = total - sum(store.chunk_length(plan, c) for c in pending)

    def stop_requested() -> bool:
        return cancel is not None and cancel.is_set()

    if progress and progress(finished, total) is False or stop_requested():
        raise ExtractionCancelled(f"{slide.path}: extraction cancelled; run again to continue.")
    if batches:
        dataset = PatchBatches(slide, slide.mpp if slide.mpp_source == "user" else None, storage_options, coords,
                               batches, grid, stride0)
        workers = min(config.num_workers, len(batches))
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            pin_memory=runner.cuda,
            prefetch_factor=config.prefetch_factor if workers else None,
            multiprocessing_context=_worker_context(config) if workers else None,
        )
        buffers: dict[int, list[np.ndarray]] = {}
        threads = torch.get_num_threads()
        if config.cpu_threads and not runner.cuda:
            torch.set_num_threads(config.cpu_threads)  # leave cores to the reader processes
        batch_iter = iter(loader)
        try:
            for index, item in enumerate(batch_iter):
                if isinstance(item, str):
                    raise PathflipError(item)
                c = batches[index][2]
                buffers.setdefault(c, []).append(runner(item).astype(config.dtype))
                if sum(len(b) for b in buffers[c]) == store.chunk_length(plan, c):
                    store.write_chunk(c, np.concatenate(buffers.pop(c)))
                finished += len(item)
                if (progress and progress(finished, total) is False) or stop_requested():
                    raise ExtractionCancelled(
                        f"{slide.path}: extraction cancelled after {finished} of {total} patches; the finished "
                        "chunks are kept and the next run continues from them."
                    )
        finally:
            del batch_iter  # stops the workers now, also when cancelled or failed
            torch.set_num_threads(threads)
    attrs = {
        "slide_path": slide.path,
        "slide_name": slide.name,
        "slide_fingerprint": slide.fingerprint,
        "mpp": list(grid.mpp),
        "mpp_source": grid.mpp_source,
        "target_mpp": grid.target_mpp,
        "patch_size": grid.patch_size,
        "patch_size_level0": grid.patch_size_level0,
        "region_patches": tiling.region_patches,
        "region_size_level0": grid.region_size_level0,
        "overlap": grid.patch_size_level0 - stride0,
        "level0_magnification": round(grid.level0_magnification, 3),
        "target_magnification": round(grid.target_magnification, 3),
        "read_level": grid.read_level,
        "tissue_fraction": grid.tissue_fraction,
        "tiling": tiling.as_key(),
        "encoder_id": encoder.encoder_id,
        "encoder_name": encoder.name,
        "dim": int(encoder.dim),
        "dtype": config.dtype,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    feature_set = FeatureSet(
        features=store.gather(plan), coords=coords, region_ids=ids, region_origins=origins, attrs=attrs
    )
    return store.finish(feature_set)


# ---------------------------------------------------------------------------------------------------------------
# command line


def collect_slides(inputs: list[str]) -> list[str]:
    """Slide paths from files, folders (searched recursively) and CSV files (column `slide`, else the first)."""
    slides: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            slides += sorted(str(p) for p in path.rglob("*") if p.is_file() and is_slide_path(p))
        elif path.suffix.lower() == ".csv":
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            if not rows:
                continue
            header = [h.strip() for h in rows[0]]
            column = header.index("slide") if "slide" in header else 0
            for row in rows[1:]:
                if row and row[column].strip():
                    entry = Path(row[column].strip())
                    slides.append(str(entry if entry.is_absolute() or "://" in str(entry) else path.parent / entry))
        else:
            slides.append(item)
    return list(dict.fromkeys(slides))  # keep order, drop repeats


def shard(slides: list[str]) -> tuple[list[str], int, int]:
    """This process's share under torchrun: rank r of w takes slides r, r + w, r + 2w, ..."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return slides[rank::world], rank, world


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pathflip extract", description="Extract patch features into a store.")
    parser.add_argument("inputs", nargs="+", metavar="SLIDE_OR_FOLDER", help="slide files, folders or CSV files")
    parser.add_argument("--out", required=True, help="feature store folder")
    parser.add_argument("--encoder", default="builtin", help=ENCODER_HELP)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--mpp", type=float, default=None, help="level-0 um/px for slides that lack it (overrides)")
    parser.add_argument("--workers", type=int, default=ExtractionConfig.num_workers)
    parser.add_argument("--batch-size", type=int, default=ExtractionConfig.batch_size)
    parser.add_argument("--chunk-size", type=int, default=ExtractionConfig.chunk_size)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for encoding on CPU")
    parser.add_argument("--target-mpp", type=float, default=TilingConfig.target_mpp)
    parser.add_argument("--patch-size", type=int, default=TilingConfig.patch_size)
    parser.add_argument("--stride", type=int, default=None, help="patch step at target mpp (default: patch size)")
    parser.add_argument("--min-tissue", type=float, default=TilingConfig.min_tissue_fraction)
    parser.add_argument("--float16", action="store_true", help="store features as float16")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickle checkpoints (CONCH .bin)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    slides, rank, world = shard(collect_slides(args.inputs))
    tiling = TilingConfig(target_mpp=args.target_mpp, patch_size=args.patch_size, stride=args.stride,
                          min_tissue_fraction=args.min_tissue)
    config = ExtractionConfig(
        batch_size=args.batch_size, num_workers=args.workers, chunk_size=args.chunk_size,
        dtype="float16" if args.float16 else "float32", allow_pickle=args.allow_pickle, cpu_threads=args.threads,
    )
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    print(f"{prefix}{len(slides)} slide(s) -> {args.out}", flush=True)
    encoder = build_encoder(args.encoder, allow_pickle=args.allow_pickle)  # built once, shared by all slides
    summary: dict[str, list] = {"done": [], "skipped": [], "failed": []}
    for path in slides:
        bar = None
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(desc=Path(path).name, unit="patch", leave=False, file=sys.stderr)

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
        except PathflipError as exc:
            summary["failed"].append({"slide": path, "reason": str(exc)})
        finally:
            if bar is not None:
                bar.close()

    print(f"{prefix}summary: {len(summary['done'])} done, {len(summary['skipped'])} skipped (already complete), "
          f"{len(summary['failed'])} failed")
    for entry in summary["done"] + summary["skipped"]:
        print(f"  ok      {entry['slide']}: {entry['patches']} patches (mpp from {entry['mpp_source']}) -> {entry['store']}")
    for entry in summary["failed"]:
        print(f"  FAILED  {entry['slide']}: {entry['reason']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"summary-rank{rank}.json").write_text(json.dumps(summary, indent=1))
    return 1 if summary["failed"] else 0
