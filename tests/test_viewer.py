"""The napari layer in a real viewer under Xvfb: reader, sample data, workspace widget, errors, screenshot."""

import numpy as np
import pytest
import tiffslide
from napari.utils.notifications import notification_manager

from napari_pathflip.viewer.reader import napari_get_reader

PLUGIN = "napari-pathflip"


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer(show=True)


def _errors_since(count):
    return [n.message for n in notification_manager.records[count:]]


def test_reader_declines_other_files(tmp_path):
    assert napari_get_reader(str(tmp_path / "cells.png")) is None
    assert napari_get_reader([str(tmp_path / "a.svs"), str(tmp_path / "b.svs")]) is None
    assert napari_get_reader(str(tmp_path / "a.svs")) is not None


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "small.svs"])
def test_slide_layer_matches_tiffslide(viewer, wsi_dir, name):
    viewer.open(str(wsi_dir / name), plugin=PLUGIN)
    layer = viewer.layers[0]
    reference = tiffslide.TiffSlide(wsi_dir / name)
    width, height = reference.dimensions
    assert layer.multiscale and layer.rgb and tuple(layer.contrast_limits) == (0, 255)
    assert layer.data[0].shape == (height, width, 3)
    assert all(max(level.shape[:2]) > 1024 for level in layer.data[:-1])
    assert max(layer.data[-1].shape[:2]) <= 1024
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert all(str(unit) == "micrometer" for unit in layer.units)
    info = layer.metadata["pathflip_slide"]
    assert info["mpp"] == pytest.approx((0.499, 0.499)) and info["objective_power"] == 20
    h, w = min(height, 300), min(width, 200)
    expected = reference.read_region((0, height - h), 0, (w, h), as_array=True)
    np.testing.assert_array_equal(np.asarray(layer.data[0][height - h :, :w]), expected)


@pytest.mark.parametrize("name", ["broken.svs", "unopenable.tiff"])
def test_unopenable_files_notify_and_viewer_stays_usable(viewer, wsi_dir, name):
    before = len(notification_manager.records)
    assert viewer.open(str(wsi_dir / name), plugin=PLUGIN) == []
    assert any("cannot open" in message for message in _errors_since(before))
    viewer.open(str(wsi_dir / "small.svs"), plugin=PLUGIN)
    assert len(viewer.layers) == 1


def test_missing_file_through_the_reader_notifies(wsi_dir):
    # napari itself refuses paths that do not exist before asking a reader; scripts may call the reader directly
    before = len(notification_manager.records)
    path = str(wsi_dir / "missing.svs")
    assert napari_get_reader(path)(path) == [(None,)]
    assert any("no such file" in message for message in _errors_since(before))


def test_reader_imports_nothing_heavy(wsi_dir):
    """Opening a slide into layer data (the reader's whole path, in a fresh interpreter) imports no model or
    science stack: they cost seconds on a cold start and the viewer needs none of them."""
    import subprocess
    import sys

    heavy = ["torch", "transformers", "scipy", "skimage", "sklearn", "dask.array", "napari_pathflip.model"]
    code = (f"import sys; from napari_pathflip.viewer.reader import read_slide; "
            f"(data, kwargs, kind), = read_slide({str(wsi_dir / 'CMU-1-Small-Region.svs')!r}); "
            f"assert kind == 'image' and data[-1][:, :].any(); print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_damaged_tiles_show_grey_and_notify(viewer, wsi_dir, qtbot):
    before = len(notification_manager.records)
    viewer.open(str(wsi_dir / "unreadable.svs"), plugin=PLUGIN)
    layer = viewer.layers[0]
    assert (np.asarray(layer.data[0]) == 128).all()
    qtbot.waitUntil(lambda: any("cannot be decoded" in m for m in _errors_since(before)), timeout=5000)
    viewer.screenshot(canvas_only=True)  # drawing the damaged slide does not raise


def test_demo_slide_sample(viewer):
    viewer.open_sample(PLUGIN, "demo_slide")
    layer = viewer.layers["PathFLIP demo slide"]
    assert tuple(layer.scale) == pytest.approx((0.5, 0.5))
    assert layer.data[0].shape[0] >= 8192 and max(layer.data[-1].shape[:2]) <= 1024


def test_workspace_widget_describes_selected_slide(viewer, wsi_dir, qtbot):
    from qtpy.QtCore import Qt
    from qtpy.QtGui import QTextDocument

    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN)
    info = widget.slide.info
    shown = QTextDocument()
    shown.setHtml(info.text())
    # what the label renders, not its markup (a plain-text label showed "File &gt; Open")
    assert info.textFormat() == Qt.TextFormat.RichText and "No slide open. Open one (File > Open)" in shown.toPlainText()
    viewer.open(str(wsi_dir / "CMU-1-Small-Region.svs"), plugin=PLUGIN)
    qtbot.waitUntil(lambda: "2220 x 2967" in info.text(), timeout=3000)
    assert "0.499 um/px (file)" in info.text() and "objective: 20x" in info.text()
    widget.slide.open_demo.click()
    assert "PathFLIP demo slide" in viewer.layers


def _tissue_fraction(image):
    rgb = image[..., :3].astype(int)
    # H&E pinks and purples: red and blue above green
    return float(((rgb[..., 0] - rgb[..., 1] > 25) & (rgb[..., 2] - rgb[..., 1] > 10)).mean())


def test_screenshot_shows_slide_pixels(viewer, wsi_dir, tmp_path):
    empty = viewer.screenshot(canvas_only=True)
    viewer.open(str(wsi_dir / "CMU-1-Small-Region.svs"), plugin=PLUGIN)
    viewer.reset_view()
    shot = viewer.screenshot(str(tmp_path / "cmu.png"), canvas_only=False)
    canvas = viewer.screenshot(canvas_only=True)
    assert _tissue_fraction(empty) == 0.0
    assert _tissue_fraction(canvas) > 0.05
    assert shot.shape[0] > canvas.shape[0] or shot.shape[1] > canvas.shape[1]  # the whole window was captured


def test_panning_a_small_slide_at_full_resolution_reads_nothing_more(viewer, wsi_dir, monkeypatch):
    """CMU's level 0 fits one texture, so it is one chunk: the first full-resolution view reads it whole and
    panning across it reads nothing again (napari re-reads only when a view leaves the chunks it read)."""
    from napari_pathflip.slide import _Level

    (layer,) = viewer.open(str(wsi_dir / "CMU-1-Small-Region.svs"), plugin=PLUGIN)
    mpp = layer.scale[-1]
    viewer.camera.zoom = 1.0 / mpp
    viewer.camera.center = (1000 * mpp, 800 * mpp)
    viewer.screenshot(canvas_only=True)
    assert layer.data_level == 0
    reads = []
    getitem = _Level.__getitem__
    monkeypatch.setattr(_Level, "__getitem__", lambda self, key: reads.append(key) or getitem(self, key))
    shots = []
    for y, x in ((2400, 1600), (600, 600), (1500, 1200)):
        viewer.camera.center = (y * mpp, x * mpp)
        shots.append(viewer.screenshot(canvas_only=True))
    assert all(_tissue_fraction(shot) > 0.01 for shot in shots) and not np.array_equal(shots[0], shots[1])
    assert layer.data_level == 0 and reads == []
