"""Heatmap geometry and exports (core, no Qt)."""

import json

import numpy as np
import pytest
from PIL import Image

from napari_pathflip.heatmap import boxes_geojson, normalise, overlay_png, save_geojson, save_scores_npz, score_grid


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
    path = save_geojson(tmp_path / "boxes.geojson", boxes_geojson(boxes, [0.9, 0.1], "necrosis"))
    collection = json.loads(path.read_text())
    ring = collection["features"][0]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and [4096, 4096] in ring
    assert collection["features"][1]["properties"]["measurements"]["score"] == pytest.approx(0.1)
    npz = np.load(save_scores_npz(tmp_path / "s.npz", coords=np.zeros((3, 2)), scores=np.ones(3)))
    assert npz["coords"].shape == (3, 2)
    grid = score_grid(np.array([[0, 0], [256, 0]]), 256, np.array([0.0, 1.0]), (512, 256))
    thumb = np.full((16, 32, 3), 200, np.uint8)
    image = np.asarray(Image.open(overlay_png(tmp_path / "o.png", thumb, grid, downsample=16, opacity=1.0)))
    assert image.shape == (16, 32, 3)
    assert image[:, 16:].mean() > image[:, :16].mean()  # the high score is the bright half of 'inferno'
