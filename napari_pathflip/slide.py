"""Where a slide is read: a whole-slide image as a lazy multiscale pyramid.

`open_slide` wraps tiffslide (SVS, generic tiled TIFF/BigTIFF, NDPI, SCN, BIF, OME-TIFF; local paths and fsspec
URLs). Every level is a lazy RGB uint8 array that decodes only the file tiles a read touches. Files with too few
levels get lazily computed coarser levels (2x box filter of the level above) down to about `min_level_size` pixels,
so a zoomed-out view never asks for level 0 as one block. `Slide.levels` offers the pyramid as dask arrays whose
chunks are the file's tiles; the viewer takes the plain array-likes instead (`display_levels`), so opening a slide
in napari never imports dask.array (which pulls in scipy: about half a second on a cold start).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import PathflipError

if TYPE_CHECKING:
    import dask.array as da

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".ome.tif", ".ome.tiff", ".btf", ".tf8")


@dataclass
class Slide:
    """An open whole-slide image. Coordinates are level-0 pixels (x, y) unless a name says otherwise."""

    path: str
    downsamples: list[float]  # per level, relative to level 0
    native_levels: int  # levels stored in the file; the rest are computed
    mpp: tuple[float, float] | None  # micrometres per level-0 pixel (x, y); None: pixel units only
    mpp_source: str  # "file", "user" or "none"
    objective_power: float | None
    vendor: str | None
    fingerprint: str
    properties: dict = field(repr=False)
    _handle: object = field(repr=False, default=None)
    _arrays: list = field(repr=False, default_factory=list)  # the file's levels as zarr arrays
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
        return list(self._handle.associated_images.keys())

    def associated_image(self, name: str) -> np.ndarray | None:
        """Thumbnail, label or macro image as RGB uint8, or None when the file has none of that name."""
        images = self._handle.associated_images
        if name not in images:
            return None
        return np.asarray(images[name].convert("RGB"))

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

    def display_levels(self, on_error) -> list[_Level]:
        """The pyramid for a viewer, as array-likes (no dask): damaged tiles go to `on_error(PathflipError)` and
        show grey."""
        return _pyramid(self._arrays, self.path, self._min_level_size, on_error)

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
            "objective_power": self.objective_power,
            "vendor": self.vendor,
            "associated_images": self.associated_names,
            "units": "micrometre" if self.mpp else "pixel (no mpp in the file: pass mpp to open_slide for physical units)",
        }

    def close(self) -> None:
        self._handle.close()

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
    """A level stored in the file (a zarr array); decode failures become a PathflipError naming slide and tile.

    With `on_error` set (the viewer's case) a damaged tile is reported through it and drawn mid-grey instead, so
    one bad tile never takes the display down.
    """

    def __init__(self, array, path: str, level: int, on_error=None):
        self.array, self.path, self.level, self.on_error = array, path, level, on_error
        self.shape = (*array.shape[:2], 3)
        self.chunks = (*_square_chunks(tuple(array.chunks[:2])), 3)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        try:
            return np.asarray(self.array[y0:y1, x0:x1])[..., :3]
        except Exception as exc:
            (ty0, ty1), (tx0, tx1), exc = self._damaged_tile(y0, y1, x0, x1, exc)
            error = PathflipError(
                f"{self.path}: level {self.level} pixels x {tx0}-{tx1}, y {ty0}-{ty1} cannot be decoded "
                f"({type(exc).__name__}: {exc}). The file is damaged there; re-export or re-scan the slide."
            )
            if self.on_error is None:
                raise error from exc
            self.on_error(error)
            return np.full((y1 - y0, x1 - x0, 3), 128, dtype=self.dtype)

    def _damaged_tile(self, y0: int, y1: int, x0: int, x1: int, exc):
        """The first file tile inside the range that fails to decode (its pixel ranges), for a precise message."""
        th, tw = self.array.chunks[:2]
        for ty in range(y0 // th * th, y1, th):
            for tx in range(x0 // tw * tw, x1, tw):
                ty1, tx1 = min(ty + th, self.shape[0]), min(tx + tw, self.shape[1])
                try:
                    self.array[ty:ty1, tx:tx1]
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


def _square_chunks(chunks: tuple[int, int], target: int = 512) -> tuple[int, int]:
    """File tiles as dask chunks; strips (very flat tiles) become squares of about `target` px."""
    tile_h, tile_w = chunks
    if tile_h * 4 < tile_w or tile_w * 4 < tile_h:
        return (target, target)
    return (tile_h, tile_w)


def _pyramid(arrays, path: str, min_level_size: int, on_error=None) -> list[_Level]:
    """The file's levels, plus computed 2x levels until the coarsest is <= min_level_size."""
    levels: list[_Level] = [_TileSource(array, path, index, on_error) for index, array in enumerate(arrays)]
    block = min(max(levels[-1].chunks[0], 256), 1024)
    while max(levels[-1].shape[:2]) > min_level_size and min(levels[-1].shape[:2]) >= 2:
        levels.append(_Coarser(levels[-1], block))
    return levels


def _fingerprint(handle) -> str:
    """Identity of the file's content: size, head and tail bytes, and level geometry (cheap, no full read; through
    the handle tiffslide already opened, so the file is opened once)."""
    fh = handle.ts_tifffile.filehandle
    digest = hashlib.sha256()
    with fh.lock:
        size = fh.size
        digest.update(str(size).encode())
        fh.seek(0)
        digest.update(fh.read(1 << 16))
        fh.seek(max(0, size - (1 << 16)))
        digest.update(fh.read(1 << 16))
    digest.update(repr(handle.level_dimensions).encode())
    return digest.hexdigest()[:16]


def _decodable_levels(handle, path: str, properties: dict) -> list:
    """The file's levels as zarr arrays; refuses files tifffile cannot decode at all (unknown compression, empty
    pages) and anything but RGB(A) 8-bit."""
    import tifffile

    series = handle.ts_tifffile.series[properties.get("tiffslide.series-index") or 0]
    for level in series.levels:
        page = level.keyframe
        try:
            tifffile.COMPRESSION(page.compression)
        except ValueError as exc:
            raise PathflipError(
                f"cannot open {path}: its image data uses an unknown compression ({page.compression}). "
                "The file is damaged or not a whole-slide image; check it opens in QuPath or re-export it."
            ) from exc
        if min(level.shape[:2]) < 1:
            raise PathflipError(f"cannot open {path}: the image has no pixels.")
    group = handle.zarr_group
    arrays = [group[str(index)] for index in range(handle.level_count)]
    for index, array in enumerate(arrays):
        if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
            raise PathflipError(
                f"cannot open {path}: level {index} is {array.shape} {array.dtype}; only RGB(A) 8-bit "
                "brightfield slides are supported."
            )
    return arrays


def open_slide(
    path: str | os.PathLike,
    *,
    mpp: float | tuple[float, float] | None = None,
    storage_options: dict | None = None,
    min_level_size: int = 1024,
) -> Slide:
    """Open a whole-slide image lazily.

    `path` is a local path or an fsspec URL. `mpp` overrides (or supplies) the level-0 pixel size in micrometres.
    Raises PathflipError when the file is missing, not a slide, or cannot be decoded.
    """
    import tifffile
    import tiffslide

    path = os.fspath(path)
    is_url = "://" in path
    if not is_url and not os.path.exists(path):
        raise PathflipError(f"cannot open {path}: no such file. Check the path.")
    if not is_url and os.path.isdir(path):
        raise PathflipError(f"cannot open {path}: it is a folder; pass a slide file (.svs, .tiff, .ndpi, ...).")
    unreadable = (tifffile.TiffFileError, ValueError, KeyError, IndexError, NotImplementedError, OSError)
    try:
        handle = tiffslide.TiffSlide(path, storage_options=storage_options)
    except unreadable as exc:
        raise _not_a_slide(path, exc) from exc
    try:
        props = dict(handle.properties)  # tiffslide parses the vendor metadata here, once
        arrays = _decodable_levels(handle, path, props)
        fingerprint = _fingerprint(handle)
    except unreadable as exc:
        handle.close()
        raise _not_a_slide(path, exc) from exc
    except PathflipError:
        handle.close()
        raise
    sources = _pyramid(arrays, path, min_level_size)
    native = [float(d) for d in handle.level_downsamples]
    downsamples = native + [native[-1] * 2.0**i for i in range(1, len(sources) - len(arrays) + 1)]

    if mpp is not None:
        mpp_xy, source = (mpp, mpp) if np.isscalar(mpp) else tuple(mpp), "user"
    elif props.get("tiffslide.mpp-x") and props.get("tiffslide.mpp-y"):
        mpp_xy, source = (float(props["tiffslide.mpp-x"]), float(props["tiffslide.mpp-y"])), "file"
    else:
        mpp_xy, source = None, "none"
    if mpp_xy is not None and not all(math.isfinite(v) and v > 0 for v in mpp_xy):
        handle.close()
        raise PathflipError(f"{path}: invalid mpp {mpp_xy}; pass a positive micrometres-per-pixel value.")
    power = props.get("tiffslide.objective-power")
    return Slide(
        path=path,
        downsamples=downsamples,
        native_levels=len(arrays),
        mpp=tuple(float(v) for v in mpp_xy) if mpp_xy else None,
        mpp_source=source,
        objective_power=float(power) if power else None,
        vendor=props.get("tiffslide.vendor"),
        fingerprint=fingerprint,
        properties=props,
        _handle=handle,
        _arrays=arrays,
        _sources=sources,
        _min_level_size=min_level_size,
    )


def _not_a_slide(path: str, exc: Exception) -> PathflipError:
    return PathflipError(
        f"cannot open {path}: not a readable whole-slide image ({type(exc).__name__}: {exc}). "
        "Supported: SVS, tiled TIFF/BigTIFF, NDPI, SCN, BIF, OME-TIFF."
    )


def is_slide_path(path: str | os.PathLike) -> bool:
    """Whether the name looks like a slide format we read (the reader's first, cheap check)."""
    return str(path).lower().endswith(SLIDE_SUFFIXES)
