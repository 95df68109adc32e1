"""Where a heatmap becomes pixels, areas and files: score grids, their exact placement on the slide, the heat colours
(`heat_rgba`, one fixed scale), the areas a threshold marks (`finding_areas`), and exports (PNG with a legend, NPZ,
QuPath GeoJSON).

Scores arrive per patch (256-px cells at 20x) or per region (4096-px cells) with level-0 top-left coordinates.
A grid cell r covers level-0 pixels [r*s, (r+1)*s) on each axis. Image layers place pixel centres, so a grid shown
with scale s has its pixel r centred at r*s + (s-1)/2: translate = (s-1)/2 (times mpp in micrometre units).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import annotations
from .annotations import Annotation, rectangle
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
CALIBRATED_THRESHOLD = 0.5  # a calibrated map shows (and outlines) the patches more likely than not to show the text
RELATIVE_THRESHOLD = 0.2  # a map that only ranks shows the top 80% of the slide's range
ANNOTATION_COLOUR = (255, 64, 0)  # the QuPath class colour of exported areas and regions
LEGEND_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)
LEGEND_WIDTH = 400  # the PNG is at least this wide, so the legend's words fit beside a small thumbnail


def default_threshold(calibrated: bool) -> float:
    """The threshold a heatmap is shown and outlined at unless a person picks one: a probability for calibrated
    maps (GroundingResult.calibrated), a fraction of the slide's range for maps that only rank."""
    return CALIBRATED_THRESHOLD if calibrated else RELATIVE_THRESHOLD


def heat_rgba(values: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """RGBA (0-255 float) of heatmap values in [0, 1] on a fixed scale: HEAT_COLOURS interpolated at the value itself
    (so a colour means the same value whatever the threshold), fully transparent below `threshold`. The single source
    of the heat colours: the overlay PNG, its legend and the napari layer's colormap (sampled from this at 256
    points) all come from here."""
    values = np.clip(np.asarray(values, dtype=np.float32), 0, 1)
    stops = np.linspace(0, 1, len(HEAT_COLOURS))
    rgba = np.stack([np.interp(values, stops, HEAT_COLOURS[:, c]) for c in range(4)], axis=-1)
    rgba[values < threshold, 3] = 0
    return rgba


# ------------------------------------------------------------------------------------------------ finding areas


@dataclass
class FindingArea:
    """A connected part of the heatmap at or above the threshold: what a person is pointed to."""

    box: tuple[int, int, int, int]  # level-0 (x0, y0, x1, y1) on the outer edges of its cells
    probability: float  # the highest grid value inside (a probability on calibrated maps, else a relative score)
    mean: float  # the mean grid value over its cells
    cells: int  # grid cells (patches or regions) inside
    fraction: float  # cells / the slide's tissue cells
    area: float  # level-0 px^2 (cells x cell side^2)
    # the exact outline of the union of its cells, level-0 px, as GeoJSON MultiPolygon coordinates: parts, each
    # [exterior, *holes], each ring closed [[x, y], ...] (several parts when cells touch only at corners)
    outline: list

    def describe(self, calibrated: bool) -> str:
        """One line: "p = 0.91, 3.2% of tissue, x 0-4096, y 256-1024 (level-0 px)"."""
        x0, y0, x1, y1 = self.box
        value = f"p = {self.probability:.2f}" if calibrated else f"score {self.probability:.2f} of the slide's range"
        return f"{value}, {self.fraction:.1%} of tissue, x {x0}-{x1}, y {y0}-{y1} (level-0 px)"


def finding_areas(grid: ScoreGrid, threshold: float, tissue_cells: int, top_k: int | None = None) -> list[FindingArea]:
    """The 8-connected groups of cells of `grid` at or above `threshold` (the cells the heatmap shows, heat_rgba),
    best first (highest value; ties: larger first), the first `top_k` (None: all). A value of 0 is no tissue
    (analysis.heatmap_grid) and never part of an area. The one place a thresholded heatmap becomes areas."""
    from scipy import ndimage

    if tissue_cells < 1:
        raise PathflipError("the slide has no tissue cells to measure finding areas against; extract its patches "
                            "first.")
    values = np.nan_to_num(grid.values, nan=0.0)
    labels, count = ndimage.label((values >= threshold) & (values > 0), structure=np.ones((3, 3)))
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    best = ndimage.maximum(values, labels, index)
    means = ndimage.mean(values, labels, index)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = sorted(range(count), key=lambda i: (-best[i], -sizes[i]))[:top_k]
    slices = ndimage.find_objects(labels)
    areas = []
    for i in order:
        rows, cols = slices[i]
        box = (cols.start * grid.cell, rows.start * grid.cell, cols.stop * grid.cell, rows.stop * grid.cell)
        outline = _outline(labels[rows, cols] == i + 1, cols.start, rows.start, grid.cell)
        areas.append(FindingArea(box, float(best[i]), float(means[i]), int(sizes[i]), float(sizes[i] / tissue_cells),
                                 float(sizes[i]) * grid.cell ** 2, outline))
    return areas


def _outline(mask: np.ndarray, col0: int, row0: int, cell: int) -> list:
    """The union of `mask`'s cells (its [0, 0] is grid cell (row0, col0)) as GeoJSON MultiPolygon coordinates in
    level-0 px: each row's runs of cells merged into one box first (a few boxes per row, not one per cell), then
    united; collinear vertices dropped; normalised so the same cells always give the same coordinates."""
    import shapely

    padded = np.pad(mask, ((0, 0), (1, 1))).astype(np.int8)
    rows, starts = np.nonzero(np.diff(padded, axis=1) == 1)
    _, stops = np.nonzero(np.diff(padded, axis=1) == -1)  # row-major like `starts`: the i-th stop ends the i-th run
    boxes = shapely.box(col0 + starts, row0 + rows, col0 + stops, row0 + rows + 1)
    union = shapely.normalize(shapely.simplify(shapely.union_all(boxes), 0))
    parts = getattr(union, "geoms", [union])
    return [[(np.asarray(ring.coords) * cell).tolist() for ring in (part.exterior, *part.interiors)]
            for part in parts]


# ------------------------------------------------------------------------------------------------------ exports


def area_annotations(areas: list[FindingArea], query: str, calibrated: bool) -> list[Annotation]:
    """Finding areas as QuPath annotations (classification = the query) with their measurements; a relative
    map's values are named scores, not probabilities."""
    value = "probability" if calibrated else "score (relative to the slide)"
    return [Annotation([[np.asarray(ring, dtype=np.float64) for ring in part] for part in area.outline],
                       f"{query} area #{rank}", query, ANNOTATION_COLOUR,
                       {"measurements": {value: area.probability, f"mean {value}": area.mean,
                                         "area fraction of tissue": area.fraction, "area (level-0 px^2)": area.area},
                        "pathflip": {"kind": "area", "query": query, "calibrated": calibrated}},
                       multipolygon=True)
            for rank, area in enumerate(areas, 1)]


def box_annotations(boxes: np.ndarray, scores: np.ndarray, query: str, kind: str = "region") -> list[Annotation]:
    """Level-0 boxes (x0, y0, x1, y1) with their scores as QuPath annotations (classification = the query)."""
    boxes, scores = np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores, dtype=np.float64)
    return [Annotation(rectangle(*box), f"{query} {kind} #{rank}", query, ANNOTATION_COLOUR,
                       {"measurements": {"score": score, "rank": rank}, "pathflip": {"kind": kind, "query": query}})
            for rank, (box, score) in enumerate(zip(boxes.tolist(), scores.tolist()), 1)]


def save_geojson(path: str | Path, collection) -> Path:
    """Annotations (or a FeatureCollection) to `path` as GeoJSON that QuPath imports, atomically: written by
    annotations.feature_collection, the one GeoJSON writer, so `annotations.read_geojson` reads it back."""
    return annotations.save_geojson(path, collection)


def save_scores_npz(path: str | Path, **arrays) -> Path:
    """Scores with their coordinates (level-0 x, y top-left) and cell sizes, as plain arrays (no pickle)."""
    path = Path(path)
    np.savez_compressed(path, **{k: np.asarray(v) for k, v in arrays.items()})
    return path


def overlay_png(path: str | Path, thumbnail: np.ndarray, grid: ScoreGrid, downsample: float, opacity: float = 0.7,
                threshold: float = 0.0, query: str = "", calibrated: bool = False, verdict: str = "") -> Path:
    """The thumbnail (taken at `downsample` from level 0) with `grid` (values in [0, 1]) blended on top as the
    heatmap layer shows it at this `opacity` and `threshold` (the top-left of the PNG is exactly that blend), and
    below it a legend: the colour bar 0..1 with a mark at the threshold, what the values mean for `query`, and the
    `verdict` (GroundingResult.verdict)."""
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
    blended = _blend(thumbnail[..., :3], heat_rgba(up, threshold), opacity)
    legend = _legend(max(width, LEGEND_WIDTH), threshold, opacity, query, calibrated, verdict)
    canvas = np.full((height + legend.shape[0], legend.shape[1], 3), 255, dtype=np.uint8)
    canvas[:height, :width] = blended
    canvas[height:] = legend
    Image.fromarray(canvas).save(path)
    return Path(path)


def _blend(rgb: np.ndarray, rgba: np.ndarray, opacity: float) -> np.ndarray:
    weight = rgba[..., 3:] / 255 * opacity
    return np.rint(rgb * (1 - weight) + rgba[..., :3] * weight).astype(np.uint8)


def legend_ramp(width: int, threshold: float, opacity: float) -> np.ndarray:
    """[width, 3] uint8: a colour bar's colours from 0 (left) to 1 (right), the heat colours over white at this
    opacity (white below the threshold): the PNG's legend and the Localize panel's draw this one ramp."""
    return _blend(np.full((width, 3), 255.0), heat_rgba(np.linspace(0, 1, width), threshold), opacity)


def _legend(width: int, threshold: float, opacity: float, query: str, calibrated: bool, verdict: str) -> np.ndarray:
    """The legend strip [H, width, 3]: title, the colour bar (the heat colours over white at this opacity, as the
    layer looks over a white background; white below the threshold), ticks, a black mark at the threshold, the
    verdict."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    margin, line = 12, 18
    top, bar_height = 8 + line, 14
    x0, x1 = margin, width - margin
    ramp = legend_ramp(x1 - x0, threshold, opacity)
    image = Image.new("RGB", (width, top + bar_height + 2 * line + 10), "white")
    image.paste(Image.fromarray(np.broadcast_to(ramp, (bar_height, x1 - x0, 3)).copy()), (x0, top))
    draw = ImageDraw.Draw(image)
    draw.rectangle((x0 - 1, top - 1, x1, top + bar_height), outline=(128, 128, 128))
    if query:
        title = f"P(patch shows {query})" if calibrated else f"{query}: score relative to this slide"
        draw.text((margin, 4), title, fill="black", font=font)
    for tick in LEGEND_TICKS:
        x = x0 + round(tick * (x1 - x0 - 1))
        draw.line((x, top + bar_height, x, top + bar_height + 3), fill="black")
        label = f"{tick:g}"
        half = draw.textlength(label, font=font) / 2
        draw.text((min(max(x - half, 0), width - 2 * half), top + bar_height + 4), label, fill="black", font=font)
    mark = x0 + round(threshold * (x1 - x0 - 1))
    draw.line((mark, top - 5, mark, top + bar_height + 4), fill="black", width=2)
    draw.text((margin, top + bar_height + 4 + line), verdict, fill="black", font=font)
    return np.asarray(image)
