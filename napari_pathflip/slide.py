"""Where a slide is read: a whole-slide image as a lazy multiscale Dask pyramid.

`open_slide` wraps tiffslide (SVS, generic tiled TIFF/BigTIFF, NDPI, SCN, BIF, OME-TIFF; local paths and fsspec
URLs). Every level is a dask array of RGB uint8 whose chunks are the file's tiles, so nothing is decoded until a
viewer or the tiler asks for it. Files with too few levels get lazily computed coarser levels (2x box filter of the
level above) down to about `min_level_size` pixels, so a zoomed-out view never asks for level 0 as one block.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np

from .errors import PathflipError

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".ome.tif", ".ome.tiff", ".btf", ".tf8")


@dataclass
class Slide:
    """An open whole-slide image. Coordinates are level-0 pixels (x, y) unless a name says otherwise."""

    path: str
    levels: list[da.Array]  # level 0 first, each (height, width, 3) uint8
    downsamples: list[float]  # per level, relative to level 0
    native_levels: int  # levels stored in the file; the rest are computed
    mpp: tuple[float, float] | None  # micrometres per level-0 pixel (x, y); None: pixel units only
    mpp_source: str  # "file", "user" or "none"
    objective_power: float | None
    vendor: str | None
    fingerprint: str
    properties: dict = field(repr=False)
    _handle: object = field(repr=False, default=None)
    _arrays: list = field(repr=False, default_factory=list)
    _min_level_size: int = field(repr=False, default=1024)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        height, width = self.levels[0].shape[:2]
        return width, height

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(level.shape[1], level.shape[0]) for level in self.levels]

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
        array = self.levels[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, array.shape[1]), min(y + height, array.shape[0])
        if x1 > x0 and y1 > y0:
            if level < self.native_levels:  # straight from the file: half the cost of going through dask
                pixels = _TileSource(self._arrays[level], self.path, level)[slice(y0, y1), slice(x0, x1)][..., :3]
            else:
                pixels = array[y0:y1, x0:x1].compute(scheduler="synchronous")
            out[y0 - y : y1 - y, x0 - x : x1 - x] = pixels
        return out

    def display_levels(self, on_error) -> list[da.Array]:
        """The pyramid for a viewer: damaged tiles go to `on_error(PathflipError)` and show grey."""
        native = self.downsamples[: self.native_levels]
        return _pyramid(self._arrays, native, self.path, self._min_level_size, on_error)[0]

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


class _TileSource:
    """Array-like over one zarr level that turns decode failures into a PathflipError naming slide and tile.

    With `on_error` set (the viewer's case) a damaged tile is reported through it and drawn mid-grey instead, so
    one bad tile never takes the display down.
    """

    def __init__(self, array, path: str, level: int, on_error=None):
        self.array, self.path, self.level, self.on_error = array, path, level, on_error
        self.shape, self.dtype, self.ndim = tuple(array.shape), np.dtype(array.dtype), len(array.shape)

    def __getitem__(self, key):
        try:
            return np.asarray(self.array[key])
        except Exception as exc:
            (y0, y1), (x0, x1), exc = self._damaged_tile(key, exc)
            error = PathflipError(
                f"{self.path}: level {self.level} pixels x {x0}-{x1}, y {y0}-{y1} cannot be decoded "
                f"({type(exc).__name__}: {exc}). The file is damaged there; re-export or re-scan the slide."
            )
            if self.on_error is None:
                raise error from exc
            self.on_error(error)
            shape = tuple(len(range(*k.indices(n))) for k, n in zip(key, self.shape))
            return np.full(shape, 128, dtype=self.dtype)

    def _damaged_tile(self, key, exc):
        """The first file tile inside `key` that fails to decode (its pixel ranges), for a precise message."""
        th, tw = self.array.chunks[:2]
        rows, cols = (range(*k.indices(n)) for k, n in zip(key[:2], self.shape[:2]))
        for ty in range(rows.start // th * th, rows.stop, th):
            for tx in range(cols.start // tw * tw, cols.stop, tw):
                y1, x1 = min(ty + th, self.shape[0]), min(tx + tw, self.shape[1])
                try:
                    self.array[ty:y1, tx:x1]
                except Exception as tile_exc:
                    return (ty, y1), (tx, x1), tile_exc
        return (rows.start, rows.stop), (cols.start, cols.stop), exc


def _square_chunks(chunks: tuple[int, int], target: int = 512) -> tuple[int, int]:
    """File tiles as dask chunks; strips (very flat tiles) become squares of about `target` px."""
    tile_h, tile_w = chunks
    if tile_h * 4 < tile_w or tile_w * 4 < tile_h:
        return (target, target)
    return (tile_h, tile_w)


def _coarser(level: da.Array, chunk: int) -> da.Array:
    """A 2x box-filtered copy of `level`, lazily; odd trailing rows/columns are dropped."""
    height, width = (level.shape[0] // 2) * 2, (level.shape[1] // 2) * 2
    trimmed = level[:height, :width].rechunk((chunk * 2, chunk * 2, 3))
    return da.coarsen(np.mean, trimmed, {0: 2, 1: 2}, trim_excess=True).astype(np.uint8)


def _pyramid(arrays, native_downsamples, path, min_level_size, on_error=None):
    """Dask levels over the file's levels, plus computed 2x levels until the coarsest is <= min_level_size."""
    levels = []
    for index, array in enumerate(arrays):
        chunks = _square_chunks(tuple(array.chunks[:2])) + (array.shape[2],)
        source = _TileSource(array, path, index, on_error)
        levels.append(da.from_array(source, chunks=chunks, asarray=False)[..., :3])
    downsamples = list(native_downsamples)
    chunk = min(max(levels[-1].chunksize[0], 256), 1024)
    while max(levels[-1].shape[:2]) > min_level_size and min(levels[-1].shape[:2]) >= 2:
        levels.append(_coarser(levels[-1], chunk))
        downsamples.append(downsamples[-1] * 2.0)
    return levels, downsamples


def _fingerprint(path: str, handle, storage_options: dict | None) -> str:
    """Identity of the file's content: size, head and tail bytes, and level geometry (cheap, no full read)."""
    import fsspec

    digest = hashlib.sha256()
    with fsspec.open(path, "rb", **(storage_options or {})) as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        digest.update(str(size).encode())
        f.seek(0)
        digest.update(f.read(1 << 16))
        f.seek(max(0, size - (1 << 16)))
        digest.update(f.read(1 << 16))
    digest.update(repr(handle.level_dimensions).encode())
    return digest.hexdigest()[:16]


def _check_decodable(handle, path: str) -> None:
    """Refuse files whose pages tifffile cannot decode at all (unknown compression, empty pages)."""
    import tifffile

    series = handle.ts_tifffile.series[handle.properties.get("tiffslide.series-index") or 0]
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
    try:
        handle = tiffslide.TiffSlide(path, storage_options=storage_options)
    except (tifffile.TiffFileError, ValueError, KeyError, IndexError, NotImplementedError, OSError) as exc:
        raise PathflipError(
            f"cannot open {path}: not a readable whole-slide image ({type(exc).__name__}: {exc}). "
            "Supported: SVS, tiled TIFF/BigTIFF, NDPI, SCN, BIF, OME-TIFF."
        ) from exc
    try:
        _check_decodable(handle, path)
        group = handle.zarr_group
        arrays = [group[str(index)] for index in range(handle.level_count)]
        for index, array in enumerate(arrays):
            if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
                raise PathflipError(
                    f"cannot open {path}: level {index} is {array.shape} {array.dtype}; only RGB(A) 8-bit "
                    "brightfield slides are supported."
                )
    except PathflipError:
        handle.close()
        raise
    native_downsamples = [float(d) for d in handle.level_downsamples]
    levels, downsamples = _pyramid(arrays, native_downsamples, path, min_level_size)

    props = dict(handle.properties)
    if mpp is not None:
        mpp_xy, source = (mpp, mpp) if np.isscalar(mpp) else tuple(mpp), "user"
    elif props.get("tiffslide.mpp-x") and props.get("tiffslide.mpp-y"):
        mpp_xy, source = (float(props["tiffslide.mpp-x"]), float(props["tiffslide.mpp-y"])), "file"
    else:
        mpp_xy, source = None, "none"
    if mpp_xy is not None and not all(math.isfinite(v) and v > 0 for v in mpp_xy):
        raise PathflipError(f"{path}: invalid mpp {mpp_xy}; pass a positive micrometres-per-pixel value.")
    power = props.get("tiffslide.objective-power")
    return Slide(
        path=path,
        levels=levels,
        downsamples=downsamples,
        native_levels=len(arrays),
        mpp=tuple(float(v) for v in mpp_xy) if mpp_xy else None,
        mpp_source=source,
        objective_power=float(power) if power else None,
        vendor=props.get("tiffslide.vendor"),
        fingerprint=_fingerprint(path, handle, storage_options),
        properties=props,
        _handle=handle,
        _arrays=arrays,
        _min_level_size=min_level_size,
    )


def is_slide_path(path: str | os.PathLike) -> bool:
    """Whether the name looks like a slide format we read (the reader's first, cheap check)."""
    return str(path).lower().endswith(SLIDE_SUFFIXES)
