"""Heatmap geometry and exports (core, no Qt)."""

import json

import numpy as np
import pytest
from PIL import Image

from napari_pathflip.errors import PathflipError
from napari_pathflip.heatmap import (HEAT_COLOURS, ScoreGrid, box_annotations, default_threshold,
                                     finding_areas, heat_rgba, normalise, overlay_png, save_geojson, save_scores_npz,
                                     score_grid)


def test_grid_cells_land_on_their_level0_pixels():
    coords = np.array([[0, 0], [512, 256], [256, 768]])
    grid = score_grid(coords, 256, np.array([1.0, 2.0, 3.0]), dimensions=(700, 1000))
    assert grid.values.shape == (4, 3)
    assert grid.values[0, 0] == 1 and grid.values[1, 2] == 2 and grid.values[3, 1] == 3
    assert np.isnan(grid.values).sum() == 12 - 3
    scale, translate = grid.placement(mpp=(0.5, 0.25))
    assert scale == (64.0, 128.0) and translate == (255 / 2 * 0.25, 255 / 2 * 0.5)
    # pixel-centre convention: cell r spans level-0 pixels [r*s, (r+1)*s); its centre is r*s + (s-1)/2
    s = 256
    for r in range(4):
        centre_level0 = r * s + (s - 1) / 2
        assert r * scale[0] + translate[0] == pytest.approx(centre_level0 * 0.25)
    with pytest.raises(Exception, match="scores for"):
        score_grid(coords, 256, np.ones(2), (700, 1000))


def test_normalise_and_exports(tmp_path):
    assert np.allclose(normalise(np.array([2.0, 4.0, np.nan]))[:2], [0, 1])
    boxes = np.array([[0, 0, 4096, 4096], [4096, 0, 8192, 4096]])
    path = save_geojson(tmp_path / "boxes.geojson", box_annotations(boxes, [0.9, 0.1], "necrosis"))
    collection = json.loads(path.read_text())
    ring = collection["features"][0]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and [4096, 4096] in ring
    assert collection["features"][1]["properties"]["measurements"]["score"] == pytest.approx(0.1)
    npz = np.load(save_scores_npz(tmp_path / "s.npz", coords=np.zeros((3, 2)), scores=np.ones(3)))
    assert npz["coords"].shape == (3, 2)
    grid = score_grid(np.array([[0, 0], [256, 0]]), 256, np.array([0.0, 1.0]), (512, 256))
    thumb = np.full((16, 32, 3), 200, np.uint8)
    image = np.asarray(Image.open(overlay_png(tmp_path / "o.png", thumb, grid, downsample=16, opacity=1.0)))
    assert image.shape[0] > 16 and image.shape[2] == 3  # the thumbnail, and the legend below it
    thumbnail = image[:16, :32]
    np.testing.assert_array_equal(thumbnail[:, 16:], np.broadcast_to(HEAT_COLOURS[-1, :3], (16, 16, 3)))
    np.testing.assert_array_equal(thumbnail[:, :16], thumb[:, :16])  # 0 = no tissue: transparent


def test_the_colour_of_a_value_does_not_depend_on_the_threshold():
    values = np.array([0.0, 0.3, 0.5, 0.75, 1.0])
    stops = np.linspace(0, 1, len(HEAT_COLOURS))
    expected = np.stack([np.interp(values, stops, HEAT_COLOURS[:, c]) for c in range(4)], axis=-1)
    np.testing.assert_allclose(heat_rgba(values), expected)
    shown = heat_rgba(values, threshold=0.5)
    np.testing.assert_allclose(shown[2:], expected[2:])  # at and above: HEAT_COLOURS' own colour and alpha
    np.testing.assert_allclose(heat_rgba(0.75, 0.5), HEAT_COLOURS[3])
    assert (shown[:2, 3] == 0).all() and heat_rgba(0.49, 0.5)[3] == 0  # below: fully transparent
    assert default_threshold(True) == 0.5 and default_threshold(False) == 0.2


# a hand-made heatmap (cell = 10 level-0 px), 0 = no tissue:
#   a 3x3 ring at 0.6 around a hole, touching a 0.9 cell only at a corner (8-connected: one area),
#   a 2x2 block at 0.7, a single 0.7 cell (same best value: the block, larger, comes first), two 0.4 cells
BLOBS = np.array([
    [0.6, 0.6, 0.6, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.6, 0.0, 0.6, 0.0, 0.4, 0.0, 0.7, 0.7],
    [0.6, 0.6, 0.6, 0.0, 0.4, 0.0, 0.7, 0.7],
    [0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7],
], dtype=np.float32)


def test_finding_areas_are_8_connected_cells_at_the_threshold_best_first():
    areas = finding_areas(ScoreGrid(BLOBS, 10), 0.5, tissue_cells=20)
    assert [(round(a.probability, 6), a.cells) for a in areas] == [(0.9, 9), (0.7, 4), (0.7, 1)]
    ring, block, single = areas
    assert ring.box == (0, 0, 40, 40) and block.box == (60, 10, 80, 30) and single.box == (70, 40, 80, 50)
    assert ring.mean == pytest.approx((8 * 0.6 + 0.9) / 9) and ring.fraction == pytest.approx(9 / 20)
    assert ring.area == 900 and single.area == 100
    # the exact outline: the ring with its hole as an interior ring, and the corner cell as a second part (cells
    # that touch at a corner only do not share an edge); no vertex in the middle of a side
    parts = sorted(ring.outline, key=len, reverse=True)
    assert len(parts) == 2
    (exterior, hole), (corner,) = parts
    assert _corners(exterior) == {(0, 0), (30, 0), (30, 30), (0, 30)}
    assert _corners(hole) == {(10, 10), (20, 10), (20, 20), (10, 20)}
    assert _corners(corner) == {(30, 30), (40, 30), (40, 40), (30, 40)}
    assert all(ring[0] == ring[-1] and len(ring) == 5 for ring in (exterior, hole, corner))
    assert block.outline == [[[[60, 10], [60, 30], [80, 30], [80, 10], [60, 10]]]]
    # the threshold decides: at 0.4 the 0.4 cells join the ring's area (their corner touches the 0.9 cell); above
    # 0.9 nothing; top_k keeps the best
    assert [a.cells for a in finding_areas(ScoreGrid(BLOBS, 10), 0.4, 20)] == [11, 4, 1]
    assert finding_areas(ScoreGrid(BLOBS, 10), 0.95, 20) == []
    assert [a.probability for a in finding_areas(ScoreGrid(BLOBS, 10), 0.5, 20, top_k=2)] == pytest.approx([0.9, 0.7])
    # 0 is no tissue: never an area, whatever the threshold
    assert sum(a.cells for a in finding_areas(ScoreGrid(BLOBS, 10), 0.0, 20)) == int((BLOBS > 0).sum())
    with pytest.raises(PathflipError, match="no tissue"):
        finding_areas(ScoreGrid(BLOBS, 10), 0.5, 0)


def _corners(ring) -> set:
    return {tuple(point) for point in ring}


def test_an_outline_of_thousands_of_cells_is_exact_and_quick():
    import time

    import shapely

    yy, xx = np.mgrid[:300, :300]
    distance = np.hypot(yy - 150, xx - 150)
    disc = ((distance < 140) & (distance > 30)).astype(np.float32)
    started = time.perf_counter()
    (area,) = finding_areas(ScoreGrid(disc, 256), 0.5, tissue_cells=int(disc.sum()))
    assert time.perf_counter() - started < 5
    (exterior, hole), = area.outline
    polygon = shapely.Polygon(exterior, [hole])
    assert polygon.is_valid and polygon.area == area.cells * 256 ** 2 == area.area and area.fraction == 1
    # the outline is the cells' union: a cell centre is inside it exactly when the cell is in the area
    centres = shapely.points((xx.ravel() + 0.5) * 256, (yy.ravel() + 0.5) * 256)
    np.testing.assert_array_equal(shapely.contains(polygon, centres), disc.ravel() > 0)


def test_the_png_has_a_legend_with_the_threshold_marked(tmp_path):
    grid = ScoreGrid(np.array([[0.3, 0.9]], np.float32), 256)
    thumb = np.full((16, 32, 3), 200, np.uint8)

    def legend(threshold, calibrated=True):
        path = overlay_png(tmp_path / f"{threshold}.png", thumb, grid, 16, 0.7, threshold, "necrosis", calibrated,
                           "not found on this slide: p = 0.03")
        return np.asarray(Image.open(path))[16:]

    strip = legend(0.5)
    assert strip.shape[1] >= 300  # wide enough for its words even under a 32-px thumbnail
    background = np.all(strip == 255, axis=-1)
    assert (~background).sum() > 2000  # drawn: the bar, its ticks and words

    def mark(strip):  # the threshold mark: the longest vertical run of black pixels
        black = np.all(strip == 0, axis=-1).astype(int)
        runs = np.zeros(black.shape[1], int)
        current = np.zeros(black.shape[1], int)
        for row in black:
            current = (current + 1) * row
            runs = np.maximum(runs, current)
        return int(np.argmax(runs)), int(runs.max())

    marks = {t: mark(legend(t)) for t in (0.2, 0.5, 0.8)}
    (x20, run), (x50, _), (x80, _) = marks[0.2], marks[0.5], marks[0.8]
    assert run > 14  # taller than any letter
    assert x20 < x50 < x80 and abs((x80 - x50) - (x50 - x20)) <= 1
    assert abs(x50 - strip.shape[1] / 2) <= 2  # the bar spans the strip between equal margins
    # below the threshold the bar is the white background (shown transparent); above it, coloured
    bar = next(y for y in range(strip.shape[0]) if (np.ptp(strip[y].astype(int), axis=-1) > 40).sum() > 50)
    row = strip[bar + 2]
    assert np.all(row[x20 + 4:x50 - 4] == 255) and not np.any(np.all(row[x50 + 4:x80] == 255, axis=-1))
    # the title says what the values are: a relative map's legend differs from a calibrated one's
    assert not np.array_equal(legend(0.5, calibrated=False), strip)
