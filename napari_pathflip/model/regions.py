"""Regions from patch coordinates: region index = floor(coord / region size) per axis, padded with a mask; where a
region lies in the section (its position, and which of the nine areas holds it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PathflipError

# The nine areas of a section, 3 x 3 over the extent of its tissue, in reading order: how captions name places, and
# the area tokens of the chat's "areas" visual layout.
AREA_NAMES = ("upper left", "upper central", "upper right", "left", "central", "right", "lower left", "lower central",
              "lower right")


@dataclass
class RegionLayout:
    grid: np.ndarray  # [N, 2] int64 region (column, row) on the region grid, sorted row-major
    boxes: np.ndarray  # [N, 4] int64 level-0 (x0, y0, x1, y1) of each region window
    index: np.ndarray  # [N, M] int64 patch rows of each region, -1 = padding
    patch_region: np.ndarray  # [P] int64 region of each patch row
    region_size_level0: int

    @property
    def num_regions(self) -> int:
        return self.index.shape[0]

    @property
    def positions(self) -> np.ndarray:
        return region_positions(self.grid)


def region_positions(grid: np.ndarray) -> np.ndarray:
    """[N, 2] float32 (x, y) centre of each region cell within the extent of the slide's regions, each axis in
    (0, 1): relative to the tissue, as a pathologist's "upper left part of the section" is."""
    grid = np.asarray(grid, dtype=np.float64)
    low, high = grid.min(0), grid.max(0)
    return ((grid - low + 0.5) / (high - low + 1)).astype(np.float32)


def area_of(positions: np.ndarray) -> np.ndarray:
    """[N] int64 index into AREA_NAMES of each (x, y) position in (0, 1) (`region_positions`)."""
    cell = np.minimum((np.asarray(positions, dtype=np.float32) * 3).astype(np.int64), 2)  # (column, row)
    return cell[:, 1] * 3 + cell[:, 0]


def group_regions(coords, patch_size_level0: int, region_patches: int = 16,
                  max_patches: int = 256) -> RegionLayout:
    """Group patch rows into regions of `region_patches` x `region_patches` patches by their level-0 coordinates.

    coords [P, 2] level-0 (x, y) top-left of each patch; the row order does not matter (padding is masked and
    attention over a region's patches is order-free).
    """
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] == 0:
        raise PathflipError(f"patch coordinates must have shape [P, 2] with P > 0, got {coords.shape}")
    if patch_size_level0 <= 0:
        raise PathflipError(f"patch_size_level0 must be positive, got {patch_size_level0}")
    size = int(patch_size_level0) * region_patches
    cells = np.floor_divide(coords.astype(np.int64), size)
    # unique over (row, column) gives a row-major region order
    uniq, inverse = np.unique(cells[:, ::-1], axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.bincount(inverse)
    if counts.max() > max_patches:
        raise PathflipError(
            f"a region holds {counts.max()} patches but at most {max_patches} fit: check patch_size_level0 "
            f"({patch_size_level0}) - it must be the level-0 size of one patch (e.g. 512 for 20x patches on a "
            "40x slide) - and that patches do not overlap")
    order = np.argsort(inverse, kind="stable")
    starts = np.cumsum(counts) - counts
    slot = np.arange(len(order)) - starts[inverse[order]]
    index = np.full((len(uniq), counts.max()), -1, dtype=np.int64)
    index[inverse[order], slot] = order
    grid = uniq[:, ::-1].astype(np.int64)
    boxes = np.concatenate([grid * size, (grid + 1) * size], axis=1)
    return RegionLayout(grid=grid, boxes=boxes, index=index, patch_region=inverse.astype(np.int64),
                        region_size_level0=size)
