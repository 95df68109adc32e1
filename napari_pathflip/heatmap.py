"""Where a heatmap becomes pixels and files: score grids, their exact placement on the slide, and exports.

Scores arrive per patch (256-px cells at 20x) or per region (4096-px cells) with level-0 top-left coordinates.
A grid cell r covers level-0 pixels [r*s, (r+1)*s) on each axis. Image layers place pixel centres, so a grid shown
with scale s has its pixel r centred at r*s + (s-1)/2: translate = (s-1)/2 (times mpp in micrometre units).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import annotations
from .annotations import Annotation, feature_collection, rectangle
from .errors import PathflipError


@dataclass
class ScoreGrid:
    """Scores on a regular grid of `cell` level-0 pixels; NaN where there is no tissue/score."""

    values: np.ndarray  # (rows, cols) float32
    cell: int  # level-0 pixels per cell side

    def placement(self, mpp: tuple[float, float] | None) -> tuple[tuple[float, float], tuple[float, float]]:
        """napari (scale, translate) in (y, x) order; micrometres when mpp is known, else level-0 pixels."""
        unit_x, unit_y = mpp if mpp is not None else (1.0, 1.0)
        offset = (self.cell - 1) / 2
        return (self.cell * unit_y, self.cell * unit_x), (offset * unit_y, offset * unit_x)


def score_grid(coords: np.ndarray, cell: int, scores: np.ndarray, dimensions: tuple[int, int]) -> ScoreGrid:
    """Scatter per-cell scores (level-0 top-left `coords` [N, 2] (x, y), cell size `cell`) onto a grid
    covering a slide of level-0 `dimensions` (w, h)."""
    coords = np.asarray(coords, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    if len(coords) != len(scores):
        raise PathflipError(f"{len(scores)} scores for {len(coords)} positions")
    cols, rows = -(-dimensions[0] // cell), -(-dimensions[1] // cell)
    values = np.full((rows, cols), np.nan, dtype=np.float32)
    index = coords // cell
    values[index[:, 1], index[:, 0]] = scores
    return ScoreGrid(values, cell)


def normalise(scores: np.ndarray) -> np.ndarray:
    """Scores rescaled to [0, 1] over the slide (NaN kept), so a threshold means the same for every query."""
    scores = np.asarray(scores, dtype=np.float32)
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return scores
    low, high = float(finite.min()), float(finite.max())
    return (scores - low) / (high - low) if high > low else np.where(np.isfinite(scores), 1.0, np.nan)


# key colours of matplotlib's 'inferno' at 0, 1/4, 1/2, 3/4, 1 (a perceptually ordered dark-to-bright map), with the
# opacity the heatmap layer gives each: the low end is transparent so the slide shows through weak scores
HEAT_COLOURS = np.array([[0, 0, 4, 0], [87, 16, 110, 150], [188, 55, 84, 230], [249, 142, 9, 255],
                         [252, 255, 164, 255]], dtype=np.float32)


def heat_rgba(values: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """RGBA (0-255 float) of HEAT_COLOURS for values in [0, 1] shown from `threshold` up, as the heatmap layer
    shows them with contrast limits (threshold, 1): linear between the key colours, transparent at and below it."""
    stops = np.linspace(0, 1, len(HEAT_COLOURS))
    values = np.clip((np.asarray(values, dtype=np.float32) - threshold) / max(1.0 - threshold, 1e-6), 0, 1)
    return np.stack([np.interp(values, stops, HEAT_COLOURS[:, c]) for c in range(4)], axis=-1)


def boxes_geojson(boxes: np.ndarray, scores: np.ndarray, name: str, kind: str = "region") -> dict:
    """Level-0 boxes (x0, y0, x1, y1) as a GeoJSON FeatureCollection that QuPath imports as annotations (written by
    annotations.feature_collection, the one GeoJSON writer, so `annotations.read_geojson` reads it back)."""
    boxes, scores = np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores, dtype=np.float64)
    return feature_collection([
        Annotation(rectangle(*box), f"{name} #{rank}", name, (255, 64, 0),
                   {"measurements": {"score": score, "rank": rank}, "pathflip": {"kind": kind, "query": name}})
        for rank, (box, score) in enumerate(zip(boxes.tolist(), scores.tolist()), 1)])


def save_geojson(path: str | Path, collection: dict) -> Path:
    """A GeoJSON FeatureCollection to `path`, atomically (annotations.save_geojson)."""
    return annotations.save_geojson(path, collection)


def save_scores_npz(path: str | Path, **arrays) -> Path:
    """Scores with their coordinates (level-0 x, y top-left) and cell sizes, as plain arrays (no pickle)."""
    path = Path(path)
    np.savez_compressed(path, **{k: np.asarray(v) for k, v in arrays.items()})
    return path


def overlay_png(path: str | Path, thumbnail: np.ndarray, grid: ScoreGrid, downsample: float, opacity: float = 0.7,
                threshold: float = 0.0) -> Path:
    """The thumbnail (taken at `downsample` from level 0) with `grid` (values in [0, 1]) blended on top as the
    heatmap layer shows it at this `opacity` and `threshold`."""
    from PIL import Image

    height, width = thumbnail.shape[:2]
    values = np.nan_to_num(grid.values, nan=0.0)
    # nearest upsampling of the grid to the thumbnail: cell c spans [c*cell, (c+1)*cell) level-0 pixels; pixels
    # past the grid's extent (no patches there) get no colour
    ys = (np.arange(height) * downsample // grid.cell).astype(int)
    xs = (np.arange(width) * downsample // grid.cell).astype(int)
    inside = (ys[:, None] < values.shape[0]) & (xs[None, :] < values.shape[1])
    up = np.where(inside, values[np.minimum(ys, values.shape[0] - 1)[:, None],
                                 np.minimum(xs, values.shape[1] - 1)[None, :]], 0.0)
    rgba = heat_rgba(up, threshold)
    weight = rgba[..., 3:] / 255 * opacity
    blended = thumbnail[..., :3] * (1 - weight) + rgba[..., :3] * weight
    Image.fromarray(np.rint(blended).astype(np.uint8)).save(path)
    return Path(path)
