"""Where patch features are computed: slide -> tissue grid -> batches decoded and encoded in threads -> store.

`extract_features` is the core API (napari passes its own progress callback and cancel event); `main` is the
`pathflip extract` command with cohort mode, torchrun sharding and a summary.

Patches are decoded from the slide file's compressed tiles (tiles.py: each tile decoded once, however many
patches share it; pixels identical to Slide.read_region's), or through Slide.read_region for what tiles.py does
not read. Worker threads decode (the decoders release the GIL); how the cores are split between decoding and the
encoder is `plan_workers`. Batches never straddle a store chunk and are encoded exactly as they are grouped here,
so a resumed run computes exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .encoders import Encoder, build_encoder
from .errors import PathflipError
from .weights import resolve_device
from .features import FeatureSet, SlideStore, store_key
from .slide import Slide, is_slide_path, open_slide
from .tiles import PatchTiles, TileLevel, TileUnavailable, usable_cores
from .tiling import PatchGrid, TilingConfig, build_grid, region_ids, resolve_mpp


class ExtractionCancelled(PathflipError):
    """Extraction stopped on request; finished chunks are kept and the next run continues from them."""


@dataclass
class ExtractionConfig:
    batch_size: int = 64  # patches per read/encode batch (halved on CUDA out-of-memory for the forward pass)
    # bound on one batch's patches as float32 (what the encoder's input holds): a batch_size past it is capped
    # (batch_patches; the command says so), so --batch-size 100000 cannot take all memory
    batch_memory_mb: int = 128
    # worker threads that decode batches (and on CPU encode them, see plan_workers); None: from the cores this
    # process may run on; 0: decode and encode in the calling thread
    num_workers: int | None = None
    chunk_size: int = 1024  # patches per store chunk: the unit of resume (at most this much work is redone)
    dtype: str = "float32"  # stored feature dtype: float32 or float16
    amp: bool = True  # bf16 autocast on CUDA (encoders that are plain statistics opt out)
    channels_last: bool = True  # on CUDA
    prefetch_factor: int = 2  # batches per worker decoded or in progress ahead of the one consumed (bounds memory)
    cpu_threads: int | None = None  # torch threads per encoding thread on CPU; None: the cores shared out
    reader: str = "auto"  # "auto": the file's tiles (tiles.py) where supported, else "slide": Slide.read_region
    allow_pickle: bool = False  # let encoders load pickle checkpoints (CONCH's pytorch_model.bin)


@dataclass(frozen=True)
class Workers:
    """How extraction uses the cores: `threads` workers decode batches; on CPU each worker also encodes the batches
    it decoded, with `torch_threads` torch threads, while on a GPU the calling thread encodes.

    On CPU the encoder is the slower stage (the built-in one about 4x decode's cost per patch), so a fixed split
    (a decode core, an encoder core) leaves the decode core mostly idle, and torch threads that share a core with
    a busy decoder stall at every op (2 torch threads beside one busy process: 20x slower, measured). Workers that
    each decode and then encode keep every core busy with no such sharing: while one encodes, another decodes.
    """

    threads: int
    torch_threads: int | None  # CPU: torch threads per encoding thread; None on a GPU
    device: str

    @property
    def encode_in_workers(self) -> bool:
        return self.torch_threads is not None and self.threads > 0

    def describe(self) -> str:
        if self.torch_threads is None:
            return f"decode {self.threads} thread{'s' * (self.threads != 1)}, encoder on {self.device}"
        torch_threads = f"{self.torch_threads} torch thread{'s' * (self.torch_threads != 1)}"
        if self.threads == 0:
            return f"decode and encoder in the calling thread ({torch_threads})"
        return f"decode + encoder in {self.threads} thread{'s' * (self.threads != 1)} ({torch_threads} each)"


def plan_workers(config: ExtractionConfig, device: torch.device, cores: int | None = None) -> Workers:
    """The split of `cores` (default: usable_cores()) for `config` on `device` (see Workers)."""
    cores = cores or usable_cores()
    if device.type != "cpu":  # one core feeds the GPU, the others decode
        return Workers(max(1, cores - 1) if config.num_workers is None else config.num_workers, None, str(device))
    if config.num_workers == 0:
        return Workers(0, config.cpu_threads or torch.get_num_threads(), "cpu")
    if config.num_workers is None:
        torch_threads = config.cpu_threads or 1
        return Workers(max(1, cores // torch_threads), torch_threads, "cpu")
    return Workers(config.num_workers, config.cpu_threads or max(1, cores // config.num_workers), "cpu")


def batch_patches(config: ExtractionConfig, patch_size: int) -> int:
    """The batch size extraction uses: config.batch_size, capped so that one batch of `patch_size`-px patches as
    float32 fits config.batch_memory_mb (several batches are in flight: see encoded_batches)."""
    per_patch = patch_size * patch_size * 3 * 4
    return max(1, min(config.batch_size, config.batch_memory_mb * 2**20 // per_patch))


ProgressFn = Callable[[int, int], "bool | None"]  # (patches done, total) -> False to cancel


def _versions() -> dict:
    out = {}
    for name in ("napari-pathflip", "torch", "numpy", "tiffslide", "tifffile", "h5py", "scikit-image"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------------------------------------------------------
# reading


def _runs(coords: np.ndarray, stride0: int):
    """(start, stop) of each horizontal run of touching patches in row-major `coords`."""
    i = 0
    while i < len(coords):
        j = i + 1
        while j < len(coords) and coords[j, 1] == coords[i, 1] and coords[j, 0] - coords[j - 1, 0] == stride0:
            j += 1
        yield i, j
        i = j


class BatchReader:
    """uint8 patches [B, P, P, 3] of batch i, for any number of threads at once.

    Reads from the file's tiles (tiles.py) when `mode` is "auto" and the level allows it, else (and for a batch
    whose tiles are missing or damaged) each run of touching patches as one strip through Slide.read_region, the
    reference path; a damaged tile then raises its PathflipError naming slide, level and pixels. Patch positions at
    the read level are rounded per run as the strips are, so both paths cut the same pixels. close() when done.
    """

    def __init__(self, slide: Slide, grid: PatchGrid, coords: np.ndarray, batches: list, stride0: int,
                 mode: str = "auto"):
        if mode not in ("auto", "slide"):
            raise PathflipError(f"reader {mode!r}: use auto or slide.")
        self.slide, self.coords, self.batches, self.stride0 = slide, coords, batches, stride0
        self.level, self.read_size, self.patch_size = grid.read_level, grid.read_size, grid.patch_size
        self._level = TileLevel.open(slide, self.level) if mode == "auto" and batches else None
        self._tiles = None
        if self._level is not None:
            windows = np.concatenate([self.windows(self.coords[start:stop]) for start, stop, _ in batches])
            self._tiles = PatchTiles(self._level, windows, self.read_size)

    @property
    def source(self) -> str:
        return "file tiles" if self._tiles is not None else "slide reader"

    def windows(self, coords: np.ndarray) -> np.ndarray:
        """Top-left level pixels of the patches at level-0 `coords`, as the strips of read_strips place them."""
        ds = self.slide.downsamples[self.level]
        out = np.empty((len(coords), 2), dtype=np.int64)
        for i, j in _runs(coords, self.stride0):
            x0 = int(coords[i, 0])
            out[i:j, 0] = [int(round(x0 / ds)) + int(round((coords[k, 0] - x0) / ds)) for k in range(i, j)]
            out[i:j, 1] = int(round(int(coords[i, 1]) / ds))
        return out

    def read_strips(self, coords: np.ndarray) -> np.ndarray:
        """Patches at `coords` through Slide.read_region, each run of touching patches read as one strip."""
        ds = self.slide.downsamples[self.level]
        out = np.empty((len(coords), self.patch_size, self.patch_size, 3), dtype=np.uint8)
        for i, j in _runs(coords, self.stride0):
            x0, y = int(coords[i, 0]), int(coords[i, 1])
            width = int(round((coords[j - 1, 0] - x0) / ds)) + self.read_size
            strip = self.slide.read_region((x0, y), self.level, (width, self.read_size))
            for k in range(i, j):
                left = int(round((coords[k, 0] - x0) / ds))
                out[k] = _resize(strip[:, left : left + self.read_size], self.patch_size)
        return out

    def __call__(self, index: int) -> np.ndarray:
        start, stop, _ = self.batches[index]
        coords = self.coords[start:stop]
        if self._tiles is not None:
            try:
                patches = self._tiles.read(self.windows(coords))
            except TileUnavailable:
                return self.read_strips(coords)
            if self.read_size == self.patch_size:
                return patches
            return np.stack([_resize(patch, self.patch_size) for patch in patches])
        return self.read_strips(coords)

    def close(self) -> None:
        if self._level is not None:
            self._level.close()


def _resize(patch: np.ndarray, size: int) -> np.ndarray:
    """Resample a read patch to the target patch size (only when no pyramid level matches the target mpp)."""
    if patch.shape[0] == size and patch.shape[1] == size:
        return patch
    from PIL import Image

    # PIL's bilinear filter widens its support when shrinking, i.e. it is antialiased
    return np.asarray(Image.fromarray(np.ascontiguousarray(patch)).resize((size, size), Image.BILINEAR))


# ---------------------------------------------------------------------------------------------------------------
# encoding


class EncoderRunner:
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


def encoded_batches(read: Callable[[int], np.ndarray], runner: EncoderRunner, workers: Workers, count: int,
                    prefetch_factor: int = 2):
    """(i, features of batch i) for i = 0 .. count - 1 in order; `read(i)` gives batch i's uint8 patches.

    Worker threads read ahead; at most prefetch_factor batches per worker are decoded or being encoded beyond the
    one consumed, so memory stays bounded when the consumer is slower. Closing the generator cancels the batches
    not started and waits for the running ones.
    """
    if workers.threads == 0:
        for i in range(count):
            yield i, runner(torch.from_numpy(read(i)))
        return

    def task(i: int):
        patches = torch.from_numpy(read(i))
        if workers.encode_in_workers:
            return runner(patches)
        return patches.pin_memory() if runner.cuda else patches

    def init():  # torch's thread count is per thread under OpenMP: set it in each worker
        if workers.torch_threads is not None:
            torch.set_num_threads(workers.torch_threads)

    depth = workers.threads * max(1, prefetch_factor)
    pending: deque = deque()  # futures of batches count - len(pending) ... in order, once all are submitted

    def oldest(index: int):
        result = pending.popleft().result()
        return index, result if workers.encode_in_workers else runner(result)

    with ThreadPoolExecutor(workers.threads, thread_name_prefix="pathflip-extract", initializer=init) as pool:
        try:
            for i in range(count):
                pending.append(pool.submit(task, i))
                if len(pending) >= depth:
                    yield oldest(i - len(pending) + 1)
            while pending:
                yield oldest(count - len(pending))
        finally:
            for future in pending:
                future.cancel()


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

    `slide_or_path`: an open Slide (kept open; the worker threads read through it or through the file's tiles) or
    a path/URL (opened with `mpp` and `storage_options`). `store_dir`: the
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
            return _extract(slide, store, encoder, key, device, tiling, config, progress, cancel)
        finally:
            store.unlock()
    finally:
        if own:
            slide.close()


def _extract(slide, store, encoder, key, device, tiling, config, progress, cancel) -> FeatureSet:
    grid = build_grid(slide, tiling)
    if len(grid) == 0:  # an empty store would only fail later, far from the cause
        raise PathflipError(
            f"{slide.path}: no tissue was found (tissue covers {grid.tissue_fraction:.1%} of the thumbnail and no "
            f"patch is at least {tiling.min_tissue_fraction:.0%} tissue), so there is nothing to extract. If the "
            "slide holds tissue, lower the tissue threshold (--min-tissue, TilingConfig.min_tissue_fraction); "
            "otherwise it is blank or not a brightfield slide: use a different slide."
        )
    stride0 = grid.patch_size_level0 if not tiling.stride else int(round(
        tiling.stride * grid.patch_size_level0 / tiling.patch_size))
    config = dataclasses.replace(config, batch_size=batch_patches(config, grid.patch_size))
    runner = EncoderRunner(encoder, resolve_device(device), config)
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
        reader = BatchReader(slide, grid, coords, batches, stride0, config.reader)
        workers = plan_workers(config, runner.device)
        buffers: dict[int, list[np.ndarray]] = {}
        threads = torch.get_num_threads()
        if workers.torch_threads is not None:
            torch.set_num_threads(workers.torch_threads)
        results = encoded_batches(reader, runner, workers, len(batches), config.prefetch_factor)
        try:
            for index, features in results:
                start, stop, c = batches[index]
                buffers.setdefault(c, []).append(features.astype(config.dtype))
                if sum(len(b) for b in buffers[c]) == store.chunk_length(plan, c):
                    store.write_chunk(c, np.concatenate(buffers.pop(c)))
                finished += stop - start
                if (progress and progress(finished, total) is False) or stop_requested():
                    raise ExtractionCancelled(
                        f"{slide.path}: extraction cancelled after {finished} of {total} patches; the finished "
                        "chunks are kept and the next run continues from them."
                    )
        finally:
            results.close()  # cancels the batches not started and waits for the running ones
            reader.close()
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
    """Slide paths from files, folders (searched recursively) and CSV files (column `slide`, else the first).

    A folder of DICOM instances is one slide, not one per file."""
    slides: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = [p for p in sorted(path.rglob("*")) if is_slide_path(p)]  # files by name, DICOM folders too
            dicom = {p for p in found if p.is_dir()}
            slides += [item] if is_slide_path(path) else [str(p) for p in found if p.parent not in dicom]
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
