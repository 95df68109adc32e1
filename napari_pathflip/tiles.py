"""Where extraction decodes patches straight from a slide file's compressed tiles (its fast reading path).

`TileLevel.open(slide, level)` reads one native level of a slide that tiffslide opened, tile by tile: the raw tile
bytes (`os.pread`, so any number of threads can read at once) decoded by tifffile's own decoder for that page, with
the page's JPEG tables and colour space (imagecodecs: libjpeg-turbo for JPEG, OpenJPEG for JPEG 2000, ...). That
is the very call the slide's zarr store makes for a chunk, so the pixels equal `Slide.read_region`'s. It returns
None for what it does not read (slides of the other backends, remote files, computed levels, stripped or planar
pages, composed series); the caller then keeps the slide reader.

The slide's own viewer levels (`backends/tiffslide.py`) decode through a `TileLevel` too, built on the page and the
file descriptor tiffslide already holds (`TileLevel.of_page`), so the file is opened and parsed once.

`PatchTiles` cuts a known list of patch windows out of a level: each tile is decoded once, when the first window
needs it, and dropped after the last one has been cut, so tiles shared by neighbouring or overlapping patches are
never decoded twice and only the band of tiles between two patch rows is held in memory.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .slide import Slide


def usable_cores() -> int:
    """CPU cores this process may use: its affinity mask (which containers and taskset narrow), shared with the
    other torchrun processes on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


class TileUnavailable(Exception):
    """A tile that this reader does not decode: missing from the file or failing to decode (let the slide reader
    read that part: it fills missing tiles as the file says and names a damaged tile in its error)."""


class TileLevel:
    """One tiled level of a local TIFF-based slide, read as raw tiles. Thread-safe; close() when done."""

    def __init__(self, path: str, page, level: int, fd: int | None = None):
        """`fd`: an open descriptor of the file to read through (left open by close()); None opens the file."""
        self.path, self.level = path, level
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.tile_height, self.tile_width = int(page.tilelength), int(page.tilewidth)
        self.tiles_per_row = -(-self.width // self.tile_width)
        self._offsets = [int(v) for v in page.dataoffsets]
        self._counts = [int(v) for v in page.databytecounts]
        self._decode = page.decode
        self._args = {}
        if page.jpegtables is not None:
            self._args["jpegtables"] = page.jpegtables
        if page.jpegheader is not None:  # NDPI
            self._args["jpegheader"] = page.jpegheader
        self._owns_fd = fd is None
        self._fd = os.open(path, os.O_RDONLY) if fd is None else fd

    @classmethod
    def of_page(cls, path: str, page, level: int, fd: int) -> TileLevel | None:
        """A level read through `fd` from an already parsed tifffile `page`, or None when this reader does not
        handle the page (stripped, planar, not 8-bit RGB(A), ...)."""
        if not _decodable_tiles(page):
            return None
        page.decode  # noqa: B018 - builds the decoder while the file is open
        return cls(path, page, level, fd)

    @classmethod
    def open(cls, slide: Slide, level: int) -> TileLevel | None:
        """The file's tiles of `level`, or None when this reader does not handle the level (see module doc)."""
        if (slide.backend != "tiffslide" or "://" in slide.path or level >= slide.native_levels
                or slide.properties.get("tiffslide.series-composition")):
            return None
        import tifffile

        try:
            tif = tifffile.TiffFile(slide.path)
        except (OSError, tifffile.TiffFileError, ValueError):
            return None
        with tif:
            series = tif.series[slide.properties.get("tiffslide.series-index") or 0]
            if level >= len(series.levels) or len(series.levels[level].pages) != 1:
                return None
            page = series.levels[level].pages[0]
            if not (_decodable_tiles(page)
                    and (page.imagewidth, page.imagelength) == tuple(slide.level_dimensions[level])):
                return None
            page.decode  # noqa: B018 - builds the decoder while the file is open
            return cls(slide.path, page, level)

    def tile_rows_cols(self, x: int, y: int, width: int, height: int) -> tuple[range, range]:
        """Tile rows and columns under the level-pixel window (x, y, width, height), clipped to the level."""
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, self.width), min(y + height, self.height)
        if x1 <= x0 or y1 <= y0:
            return range(0), range(0)
        return (range(y0 // self.tile_height, (y1 - 1) // self.tile_height + 1),
                range(x0 // self.tile_width, (x1 - 1) // self.tile_width + 1))

    def read_raw(self, index: int) -> bytes:
        """The compressed bytes of tile `index` (row-major)."""
        offset, count = self._offsets[index], self._counts[index]
        if not offset or not count:
            raise TileUnavailable(f"tile {index} is not stored in the file")
        return os.pread(self._fd, count, offset)

    def decode_raw(self, index: int, data: bytes) -> np.ndarray:
        """Tile `index` from its bytes as (rows, columns, samples) uint8; edge tiles may be cut to the level."""
        try:
            pixels = self._decode(data, index, **self._args)[0]
        except Exception as exc:  # any decoder failure: the slide reader reports it with the tile's pixel range
            raise TileUnavailable(f"tile {index}: {type(exc).__name__}: {exc}") from exc
        return pixels.reshape(pixels.shape[-3:])

    def decode(self, index: int) -> np.ndarray:
        return self.decode_raw(index, self.read_raw(index))

    def close(self) -> None:
        if self._owns_fd:
            os.close(self._fd)


def _decodable_tiles(page) -> bool:
    """Whether a tifffile page is what TileLevel reads: one plane of 8-bit RGB(A) tiles, samples interleaved."""
    return bool(page.is_tiled and page.tiledepth == 1 and page.planarconfig == 1 and page.bitspersample == 8
                and page.samplesperpixel in (3, 4) and page.imagedepth == 1)


class _Tile:
    """A decoded tile shared by the windows that need it: the first asker decodes, the others wait for it."""

    def __init__(self):
        self.ready = threading.Event()
        self.pixels: np.ndarray | None = None
        self.error: TileUnavailable | None = None


class PatchTiles:
    """Windows of `size` px at level-pixel positions, cut from a TileLevel with each tile decoded once.

    `windows`: every (x, y) that will be read, each exactly once (in any order and from any thread). Outside the
    level a window is white, like Slide.read_region.
    """

    def __init__(self, level: TileLevel, windows: np.ndarray, size: int):
        self.level, self.size = level, size
        self._uses = Counter(index for x, y in windows for index in self._indices(int(x), int(y)))
        self._tiles: dict[int, _Tile] = {}  # decoded (or being decoded) and still needed
        self._lock = threading.Lock()

    def _indices(self, x: int, y: int) -> list[int]:
        rows, cols = self.level.tile_rows_cols(x, y, self.size, self.size)
        return [row * self.level.tiles_per_row + col for row in rows for col in cols]

    def _acquire(self, index: int) -> np.ndarray:
        with self._lock:
            tile = self._tiles.get(index)
            claim = tile is None
            if claim:
                tile = self._tiles[index] = _Tile()
        if claim:
            try:
                tile.pixels = self.level.decode(index)
            except TileUnavailable as exc:
                tile.error = exc
            finally:
                tile.ready.set()  # also when decoding died otherwise: nobody waits forever
        tile.ready.wait()
        if tile.pixels is None:
            raise tile.error or TileUnavailable(f"tile {index} was not decoded")
        return tile.pixels

    def _release(self, indices: list[int]) -> None:
        with self._lock:
            for index in indices:
                self._uses[index] -= 1
                if not self._uses[index]:
                    del self._uses[index]
                    self._tiles.pop(index, None)

    def read(self, windows: np.ndarray) -> np.ndarray:
        """The windows at level pixels (x, y) as [N, size, size, 3] uint8.

        Raises TileUnavailable when a tile is missing or damaged; the windows count as read either way (their
        tiles are released), so the caller reads them elsewhere.
        """
        out = np.empty((len(windows), self.size, self.size, 3), dtype=np.uint8)
        level = self.level
        pending = [self._indices(int(x), int(y)) for x, y in windows]
        try:
            for k, (x, y) in enumerate(windows):
                x, y = int(x), int(y)
                if x < 0 or y < 0 or x + self.size > level.width or y + self.size > level.height:
                    out[k] = 255
                for index in pending[k]:
                    pixels = self._acquire(index)
                    ty = index // level.tiles_per_row * level.tile_height
                    tx = index % level.tiles_per_row * level.tile_width
                    y0, x0 = max(y, ty), max(x, tx)
                    y1 = min(y + self.size, ty + level.tile_height, level.height)
                    x1 = min(x + self.size, tx + level.tile_width, level.width)
                    if pixels.shape[0] < y1 - ty or pixels.shape[1] < x1 - tx:
                        raise TileUnavailable(f"tile {index} decodes to {pixels.shape}, smaller than its place")
                    out[k, y0 - y : y1 - y, x0 - x : x1 - x] = pixels[y0 - ty : y1 - ty, x0 - tx : x1 - tx, :3]
        finally:
            self._release([index for indices in pending for index in indices])
        return out
