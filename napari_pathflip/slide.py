"""Where a slide is read: a whole-slide image as a lazy multiscale pyramid.

`open_slide` opens a slide file through one of the backends in `backends/` (tiffslide by default: SVS, generic
tiled TIFF/BigTIFF, NDPI, SCN, BIF, OME-TIFF, local paths and fsspec URLs; wsidicom for DICOM WSI; OpenSlide for
MIRAX, VMS/VMU, SVSLIDE and other formats tiffslide does not read) and gives the same `Slide` for all of them.
Every level is a lazy RGB uint8 array that decodes only the file tiles a read touches. Files with too few
levels get lazily computed coarser levels (2x box filter of the level above) down to about `min_level_size` pixels,
so a zoomed-out view never asks for level 0 as one block. `Slide.levels` offers the pyramid as dask arrays whose
chunks are the file's tiles; the viewer takes the plain array-likes instead (`display_levels`), so opening a slide
in napari never imports dask.array (which pulls in scipy: about half a second on a cold start).

napari reads the visible part of a level, widened to the level's `chunks`, again whenever the view leaves what it
read last. The viewer's levels therefore decode a read's file tiles side by side on one thread per core, keep
recently decoded tiles (`DisplayConfig.tile_cache_mib`), and offer a level that fits one texture as a single chunk
(`DisplayConfig.whole_level_side`): napari reads it once and pans across it without reading again.

The pixel size is believed when the file's vendor metadata states it (Aperio MPP, DICOM pixel spacing, ...) or
when a TIFF resolution tag gives a microscope's resolution (`PLAUSIBLE_MPP`); a tag of 72 or 300 dpi is a
screen or print setting, so such a slide opens in pixel units and `Slide.mpp_note` says why.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .backends import SLIDE_SUFFIXES, Backend, NativeLevel, is_dicom_folder, open_backend
from .errors import PathflipError
from .tiles import usable_cores

if TYPE_CHECKING:
    import dask.array as da

PLAUSIBLE_MPP = (0.05, 20.0)  # um/px a slide scanner or microscope camera gives (about 200x to 0.5x)


@dataclass(frozen=True)
class DisplayConfig:
    """How the viewer's pyramid (`Slide.display_levels`) reads."""

    # decoded file tiles kept per open slide: a pan back, or the next view of a drag, finds most of its tiles here
    tile_cache_mib: int = 32
    # a level at most this many px a side, whose whole reading decodes at most this squared in file pixels, is one
    # chunk: read once, then panned without reading (4096 px fits the texture of any GPU napari runs on)
    whole_level_side: int = 4096


@dataclass
class Slide:
    """An open whole-slide image. Coordinates are level-0 pixels (x, y) unless a name says otherwise."""

    path: str
    downsamples: list[float]  # per level, relative to level 0
    native_levels: int  # levels stored in the file; the rest are computed
    mpp: tuple[float, float] | None  # micrometres per level-0 pixel (x, y); None: pixel units only
    mpp_source: str  # "file", "user" or "none"
    mpp_note: str  # where the mpp comes from, or why the slide is in pixel units (for the workspace to show)
    objective_power: float | None
    vendor: str | None
    fingerprint: str
    backend: str  # which library reads the file: "tiffslide", "wsidicom" or "openslide"
    properties: dict = field(repr=False)
    _backend: Backend = field(repr=False, default=None)
    _sources: list = field(repr=False, default_factory=list)  # every level as a _Level, level 0 first
    _min_level_size: int = field(repr=False, default=1024)

    @functools.cached_property
    def levels(self) -> list[da.Array]:
        """The pyramid as dask arrays (level 0 first, each (height, width, 3) uint8), chunks = the file's tiles."""
        import dask.array as da

        # name=False: a random graph name; tokenizing a level would hash (or pickle) its zarr store
        return [da.from_array(level, chunks=level.chunks, asarray=False, name=False) for level in self._sources]

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        height, width = self._sources[0].shape[:2]
        return width, height

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(level.shape[1], level.shape[0]) for level in self._sources]

    @property
    def name(self) -> str:
        return Path(self.path.rstrip("/")).name

    @property
    def associated_names(self) -> list[str]:
        return self._backend.associated_names

    def associated_image(self, name: str) -> np.ndarray | None:
        """Thumbnail, label or macro image as RGB uint8, or None when the file has none of that name."""
        return self._backend.associated_image(name)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed `downsample` (small tolerance for rounding)."""
        candidates = [i for i, d in enumerate(self.downsamples) if d <= downsample * 1.01]
        return max(candidates) if candidates else 0

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Pixels (height, width, 3) uint8 of `size` (w, h) at `level`, top-left `location` in level-0 (x, y).

        Parts outside the slide are white, so edge patches keep their size.
        """
        ds = self.downsamples[level]
        x, y = int(round(location[0] / ds)), int(round(location[1] / ds))
        width, height = size
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        array = self._sources[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, array.shape[1]), min(y + height, array.shape[0])
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = array.read(y0, y1, x0, x1)
        return out

    def display_levels(self, on_error, config: DisplayConfig = DisplayConfig()) -> list[_Level]:
        """The pyramid for a viewer, as array-likes (no dask): damaged tiles go to `on_error(PathflipError)` and
        show grey; tiles are decoded in parallel and cached, small levels are one chunk (see the module doc)."""
        cache = _TileCache(config.tile_cache_mib * 2**20)
        levels = _pyramid(self._backend.levels, self.path, self._min_level_size, on_error, cache)
        native_pixels = math.prod(levels[self.native_levels - 1].shape[:2])
        for index, level in enumerate(levels):
            # a computed level is read from the whole of the coarsest stored level
            cost = math.prod(level.shape[:2]) if index < self.native_levels else native_pixels
            if max(level.shape[:2]) <= config.whole_level_side and cost <= config.whole_level_side**2:
                level.chunks = level.shape
        return levels

    def metadata(self) -> dict:
        """Plain-data description of the slide (goes into napari's `layer.metadata`)."""
        return {
            "path": self.path,
            "fingerprint": self.fingerprint,
            "dimensions": self.dimensions,
            "level_dimensions": self.level_dimensions,
            "level_downsamples": self.downsamples,
            "native_levels": self.native_levels,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "mpp_note": self.mpp_note,
            "objective_power": self.objective_power,
            "vendor": self.vendor,
            "backend": self.backend,
            "associated_images": self.associated_names,
            "units": "micrometre" if self.mpp else f"pixel ({self.mpp_note}; pass mpp to open_slide for micrometres)",
        }

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Level(ABC):
    """One pyramid level as a lazy (height, width, 3) uint8 array-like: a read decodes only the file tiles it
    touches. napari takes these as they are; `Slide.levels` wraps them in dask with `chunks` as chunks."""

    dtype = np.dtype(np.uint8)
    ndim = 3
    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @abstractmethod
    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] (a non-empty range inside the level) as (y1 - y0, x1 - x0, 3) uint8."""

    def __getitem__(self, key) -> np.ndarray:
        """Basic indexing: integers and slices (positive steps) over rows, columns and channels."""
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 3 or not all(isinstance(k, (int, np.integer, slice)) for k in key):
            raise IndexError(f"a slide level takes integers and slices, not {key!r}")
        key += (slice(None),) * (3 - len(key))
        window, local = [], []
        for k, n in zip(key[:2], self.shape[:2]):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 1:
                    raise IndexError("a slide level takes positive slice steps only")
                window.append((start, max(start, stop)))
                local.append(slice(None, None, step))
            else:
                i = int(k) + n if k < 0 else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"index {k} is out of bounds for a level side of {n}")
                window.append((i, i + 1))
                local.append(0)
        (y0, y1), (x0, x1) = window
        empty = y1 == y0 or x1 == x0
        pixels = np.empty((y1 - y0, x1 - x0, 3), self.dtype) if empty else self.read(y0, y1, x0, x1)
        return pixels[(*local, key[2])]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self[:, :], dtype=dtype)


class _TileSource(_Level):
    """A level stored in the file; decode failures become a PathflipError naming slide and tile.

    With `on_error` set (the viewer's case) a damaged tile is reported through it and drawn mid-grey instead, so
    one bad tile never takes the display down. With a `cache` (the viewer's levels) a read is cut into `blocks`
    (the file's tiles, squares for strips) that are decoded side by side and kept in the cache.
    """

    def __init__(self, native: NativeLevel, path: str, level: int, on_error=None, cache: _TileCache | None = None):
        self.native, self.path, self.level, self.on_error, self.cache = native, path, level, on_error, cache
        self.shape = (*native.shape, 3)
        self.blocks = _square_chunks(native.tile)
        self.chunks = (*self.blocks, 3)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self.cache is None:
            return self._read_or_grey(y0, y1, x0, x1)[0]
        out = np.empty((y1 - y0, x1 - x0, 3), dtype=self.dtype)
        bh, bw = self.blocks

        def place(by: int, bx: int, block: np.ndarray) -> None:
            ys, ye, xs, xe = max(y0, by), min(y1, by + bh), max(x0, bx), min(x1, bx + bw)
            out[ys - y0 : ye - y0, xs - x0 : xe - x0] = block[ys - by : ye - by, xs - bx : xe - bx]

        def decode(by: int, bx: int) -> None:
            block, intact = self._read_or_grey(by, min(by + bh, self.shape[0]), bx, min(bx + bw, self.shape[1]))
            if intact:  # a damaged tile is tried (and reported) again rather than kept grey
                self.cache.put((self.level, by, bx), block)
            place(by, bx, block)

        missing = []
        for by in range(y0 - y0 % bh, y1, bh):
            for bx in range(x0 - x0 % bw, x1, bw):
                block = self.cache.get((self.level, by, bx))
                if block is None:
                    missing.append((by, bx))
                else:
                    place(by, bx, block)
        _each(decode, missing)
        return out

    def _read_or_grey(self, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, bool]:
        """The pixels, and whether they are the file's (False: grey for a damaged tile, reported to on_error)."""
        try:
            return self.native.read(y0, y1, x0, x1), True
        except Exception as exc:
            (ty0, ty1), (tx0, tx1), exc = self._damaged_tile(y0, y1, x0, x1, exc)
            error = PathflipError(
                f"{self.path}: level {self.level} pixels x {tx0}-{tx1}, y {ty0}-{ty1} cannot be decoded "
                f"({type(exc).__name__}: {exc}). The file is damaged there; re-export or re-scan the slide."
            )
            if self.on_error is None:
                raise error from exc
            self.on_error(error)
            return np.full((y1 - y0, x1 - x0, 3), 128, dtype=self.dtype), False

    def _damaged_tile(self, y0: int, y1: int, x0: int, x1: int, exc):
        """The first file tile inside the range that fails to decode (its pixel ranges), for a precise message."""
        th, tw = self.native.tile
        for ty in range(y0 // th * th, y1, th):
            for tx in range(x0 // tw * tw, x1, tw):
                ty1, tx1 = min(ty + th, self.shape[0]), min(tx + tw, self.shape[1])
                try:
                    self.native.read(ty, ty1, tx, tx1)
                except Exception as tile_exc:
                    return (ty, ty1), (tx, tx1), tile_exc
        return (y0, y1), (x0, x1), exc


class _Coarser(_Level):
    """The 2x box-filtered level above (odd trailing rows/columns dropped), computed in `block`-px squares that are
    also its dask chunks. About 32 MiB of recent blocks stay cached: a zoomed-out view revisits them, and each one
    costs four times its pixels of the level above."""

    def __init__(self, parent: _Level, block: int):
        self.parent, self.block = parent, block
        self.shape = (parent.shape[0] // 2, parent.shape[1] // 2, 3)
        self.chunks = (block, block, 3)
        self._cached_block = functools.lru_cache(maxsize=max(4, 2**25 // (3 * block * block)))(self._block)

    def _block(self, by: int, bx: int) -> np.ndarray:
        y1, x1 = min(by + self.block, self.shape[0]), min(bx + self.block, self.shape[1])
        above = self.parent.read(2 * by, 2 * y1, 2 * bx, 2 * x1)
        sums = above.reshape(y1 - by, 2, x1 - bx, 2, 3).sum(axis=(1, 3), dtype=np.uint16)
        return (sums // 4).astype(np.uint8)  # the mean rounded down, as np.mean(...).astype(np.uint8) gives

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = np.empty((y1 - y0, x1 - x0, 3), dtype=self.dtype)
        b = self.block
        for by in range(y0 - y0 % b, y1, b):
            for bx in range(x0 - x0 % b, x1, b):
                ys, ye, xs, xe = max(y0, by), min(y1, by + b), max(x0, bx), min(x1, bx + b)
                block = self._cached_block(by, bx)
                out[ys - y0 : ye - y0, xs - x0 : xe - x0] = block[ys - by : ye - by, xs - bx : xe - bx]
        return out


class _TileCache:
    """Decoded blocks of one slide's viewer levels, keyed (level, y, x); the least recently used go beyond
    `max_bytes`. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.nbytes = max_bytes, 0
        self._blocks: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int, int]) -> np.ndarray | None:
        with self._lock:
            block = self._blocks.get(key)
            if block is not None:
                self._blocks.move_to_end(key)
            return block

    def put(self, key: tuple[int, int, int], block: np.ndarray) -> None:
        with self._lock:
            if key in self._blocks or block.nbytes > self.max_bytes:
                return
            self._blocks[key] = block
            self.nbytes += block.nbytes
            while self.nbytes > self.max_bytes:
                self.nbytes -= self._blocks.popitem(last=False)[1].nbytes


@functools.cache
def _decoders() -> ThreadPoolExecutor:
    """Threads, one per usable core, that decode the tiles of a viewer read side by side (the decoders release the
    GIL). Shared by every open slide; a task here never waits on another task here."""
    return ThreadPoolExecutor(max_workers=usable_cores(), thread_name_prefix="pathflip-tiles")


def _each(function, items: list[tuple]) -> None:
    """function(*item) for every item: on the decoding threads when there are several (errors are raised here)."""
    if len(items) < 2:
        for item in items:
            function(*item)
        return
    for _ in _decoders().map(lambda item: function(*item), items):
        pass


def _square_chunks(chunks: tuple[int, int], target: int = 512) -> tuple[int, int]:
    """File tiles as dask chunks; strips (very flat tiles) become squares of about `target` px."""
    tile_h, tile_w = chunks
    if tile_h * 4 < tile_w or tile_w * 4 < tile_h:
        return (target, target)
    return (tile_h, tile_w)


def _pyramid(natives: list[NativeLevel], path: str, min_level_size: int, on_error=None,
             cache: _TileCache | None = None) -> list[_Level]:
    """The file's levels, plus computed 2x levels until the coarsest is <= min_level_size."""
    levels: list[_Level] = [_TileSource(native, path, index, on_error, cache) for index, native in enumerate(natives)]
    block = min(max(levels[-1].chunks[0], 256), 1024)
    while max(levels[-1].shape[:2]) > min_level_size and min(levels[-1].shape[:2]) >= 2:
        levels.append(_Coarser(levels[-1], block))
    return levels


def open_slide(
    path: str | os.PathLike,
    *,
    mpp: float | tuple[float, float] | None = None,
    storage_options: dict | None = None,
    min_level_size: int = 1024,
    backend: str | None = None,
) -> Slide:
    """Open a whole-slide image lazily.

    `path` is a local path (a file, or a folder of DICOM instances) or an fsspec URL. `mpp` overrides (or supplies)
    the level-0 pixel size in micrometres. `backend` forces "tiffslide", "wsidicom" or "openslide" instead of the
    one chosen from the file (see `backends`). Raises PathflipError when the file is missing, not a slide, or
    cannot be decoded.
    """
    path = os.fspath(path)
    if "://" not in path and not os.path.exists(path):
        raise PathflipError(f"cannot open {path}: no such file. Check the path.")
    if backend is None and "://" not in path and os.path.isdir(path) and not is_dicom_folder(path):
        raise PathflipError(
            f"cannot open {path}: it is a folder without DICOM files; pass a slide file (.svs, .tiff, .ndpi, .mrxs, "
            "...) or the folder of a DICOM whole-slide image."
        )
    opened = open_backend(path, storage_options, backend)
    try:
        mpp_xy, source, note = _resolve_mpp(opened, mpp)
        sources = _pyramid(opened.levels, path, min_level_size)
    except PathflipError:
        opened.close()
        raise
    native = list(opened.downsamples)
    downsamples = native + [native[-1] * 2.0**i for i in range(1, len(sources) - len(native) + 1)]
    return Slide(
        path=path,
        downsamples=downsamples,
        native_levels=len(native),
        mpp=mpp_xy,
        mpp_source=source,
        mpp_note=note,
        objective_power=opened.objective_power,
        vendor=opened.vendor,
        fingerprint=opened.fingerprint,
        backend=opened.name,
        properties=opened.properties,
        _backend=opened,
        _sources=sources,
        _min_level_size=min_level_size,
    )


def _resolve_mpp(opened: Backend, mpp) -> tuple[tuple[float, float] | None, str, str]:
    """(mpp, source, note): the user's value, else the file's when believable, else None (pixel units) and why."""
    if mpp is not None:
        mpp_xy = (mpp, mpp) if np.isscalar(mpp) else tuple(mpp)
        if not all(math.isfinite(v) and v > 0 for v in mpp_xy):
            raise PathflipError(f"{opened.path}: invalid mpp {mpp_xy}; pass a positive micrometres-per-pixel value.")
        return tuple(float(v) for v in mpp_xy), "user", f"{mpp_xy[0]:g} um/px given by the user"
    pixel_units = "so the slide is in pixel units"
    if opened.mpp is None:
        return None, "none", f"the file states no pixel size, {pixel_units}"
    mpp_xy = opened.mpp
    if not all(math.isfinite(v) and v > 0 for v in mpp_xy):
        return None, "none", f"{opened.mpp_origin} gives an invalid pixel size {mpp_xy}, {pixel_units}"
    low, high = PLAUSIBLE_MPP
    if opened.mpp_from_tag and not all(low <= v <= high for v in mpp_xy):
        return None, "none", (
            f"{opened.mpp_origin} says {mpp_xy[0]:g} um/px ({25400.0 / mpp_xy[0]:.4g} dpi), not a microscope's "
            f"resolution ({low:g}-{high:g} um/px), {pixel_units}"
        )
    return mpp_xy, "file", f"{mpp_xy[0]:g} um/px from {opened.mpp_origin}"


def is_slide_path(path: str | os.PathLike) -> bool:
    """Whether the name looks like a slide we read, or a local folder holds DICOM files (the reader's first,
    cheap check)."""
    text = os.fspath(path)
    if text.lower().endswith(SLIDE_SUFFIXES):
        return True
    return "://" not in text and os.path.isdir(text) and is_dicom_folder(text)
