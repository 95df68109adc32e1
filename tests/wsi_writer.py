"""Small pyramidal JPEG-tiled TIFF slides for the tiling and extraction tests (tifffile, SubIFD pyramid)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


def write_pyramid(path: Path, image: np.ndarray, mpp: float, levels: int = 3, tile: int = 256) -> Path:
    """RGB uint8 `image` as level 0 at `mpp` um/px plus 2x-decimated levels (tiffslide reads mpp from the tags)."""
    options = dict(tile=(tile, tile), compression="jpeg", photometric="rgb", resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=levels - 1, resolution=(1e4 / mpp, 1e4 / mpp), **options)
        for level in range(1, levels):
            image = image[::2, ::2]
            scale = 1e4 / (mpp * 2**level)
            tif.write(np.ascontiguousarray(image), subfiletype=1, resolution=(scale, scale), **options)
    return path


def corrupt_tile(path: Path, level: int, x: int, y: int) -> None:
    """Overwrite the JPEG header of the tile holding level pixel (x, y), so decoding it fails."""
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[level].keyframe
        per_row = -(-page.imagewidth // page.tilewidth)
        index = (y // page.tilelength) * per_row + x // page.tilewidth
        offset = page.dataoffsets[index]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * 64)


def write_unknown_compression(path: Path) -> Path:
    """A small RGB TIFF whose Compression tag names a scheme no reader knows (52479): a header that parses, image
    data that cannot be decoded."""
    tifffile.imwrite(path, np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].tags["Compression"].valueoffset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write((52479).to_bytes(2, "little"))
    return path
