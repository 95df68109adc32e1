"""The workspace in a real viewer under Xvfb: Analyze the demo slide, type a finding, heatmap/boxes/pin/exports,
zero-shot, errors as notifications, the event loop serving during extraction, screenshots, and (with the trained
demo weights) the heatmap peak on the finding's true region."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from napari.utils.notifications import notification_manager
from PIL import Image
from qtpy.QtCore import QTimer

from napari_pathflip.annotations import mask_for, read_geojson
from napari_pathflip.analysis import finding_areas
from napari_pathflip.heatmap import ScoreGrid, overlay_png
from napari_pathflip.slide import open_slide
from napari_pathflip.viewer.localize import BOXES, HEATMAP
from napari_pathflip.weights import WeightsFolder
from napari_pathflip.viewer.tasks import LatestRunner

PLUGIN = "napari-pathflip"
DEMO = "PathFLIP demo slide"
DEMO_SIZE, MPP, PATCH, REGION = 8192, 0.5, 256, 4096


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One feature/encoding cache for the module: the demo slide is extracted once, then Analyze is instant."""
    return tmp_path_factory.mktemp("pathflip-cache")


@pytest.fixture
def viewer(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1600, 1000)  # a workstation window: the workspace and the chat beside the canvas
    return viewer


def _messages_since(count):
    return [str(n.message) for n in notification_manager.records[count:]]


def _workspace(viewer, weights, cache, device="cpu"):
    _, workspace = viewer.window.add_plugin_dock_widget(PLUGIN)
    workspace.slide.weights_edit.setText(str(weights))
    workspace.slide.cache_dir = cache
    workspace.slide.device_box.setCurrentText(device)
    return workspace


def _open_and_analyze(viewer, workspace, qtbot, timeout=90_000):
    workspace.slide.open_demo.click()
    assert workspace.slide.current_layer == viewer.layers[DEMO]
    with qtbot.waitSignal(workspace.slide.analysis_changed, timeout=timeout) as ready:
        workspace.slide.analyze_button.click()
    assert ready.args[0] is workspace.slide.analysis is not None
    qtbot.waitUntil(lambda: not workspace.slide.running, timeout=5000)


def _type(qtbot, localize, text, timeout=30_000):
    """Type `text` and wait for the heatmap of the chosen level (region level paints first, patches follow)."""
    localize.query.clear()
    level = localize.detail_box.currentText()
    with qtbot.waitSignal(localize.heatmap_updated, timeout=timeout,
                          check_params_cb=lambda query, shown: query == text and shown == level):
        qtbot.keyClicks(localize.query, text)


def test_analyze_type_a_finding_pin_and_export(viewer, weights, cache, qtbot, tmp_path):
    workspace = _workspace(viewer, weights, cache)
    # the workspace brings up the chat dock, with the chat told about every analysis
    qtbot.waitUntil(lambda: "PathFLIP chat" in viewer.window.dock_widgets, timeout=5000)
    assert viewer.window.dock_widgets["PathFLIP chat"] is workspace.chat
    ticks = []
    timer = QTimer(interval=20)
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start()
    steps, lines = [], []  # Analyze's steps, and its status line at each extraction count
    workspace.slide._stepped.connect(steps.append)
    workspace.slide._progressed.connect(lambda done, total: lines.append(workspace.slide.status.text()))
    _open_and_analyze(viewer, workspace, qtbot)
    timer.stop()
    status = workspace.slide.status.text()
    assert "extracted now" in status and "regions" in status and "device: cpu" in status
    assert steps == [0, 1] and "step 3 of 4: extracting patch features, 0 / " in lines[0]
    assert "step 4 of 4: encoding the slide" in lines[-1]
    # the GUI thread kept serving the timer while extraction and encoding ran in the worker
    assert len(ticks) >= 20

    localize = workspace.localize
    _type(qtbot, localize, "necrosis")
    slide, heat = viewer.layers[DEMO], viewer.layers[HEATMAP]
    cells = DEMO_SIZE // PATCH
    assert heat.data.shape == (cells, cells)
    assert tuple(heat.scale) == pytest.approx((PATCH * MPP, PATCH * MPP))
    assert tuple(heat.translate) == pytest.approx(((PATCH - 1) / 2 * MPP,) * 2)
    # cell (r, c) covers level-0 pixels [r*256, (r+1)*256): its centre is the centre of that block of slide pixels
    for r, c in [(0, 0), (5, 17), (cells - 1, cells - 1)]:
        centre = (r * PATCH + (PATCH - 1) / 2, c * PATCH + (PATCH - 1) / 2)
        np.testing.assert_allclose(heat.data_to_world((r, c)), slide.data_to_world(centre))
    # random weights: scores that only rank, shown relative to the slide's range from the default 0.2 up
    assert not localize.result.calibrated and localize.result.presence is None
    assert 0 <= np.nanmin(heat.data) and np.nanmax(heat.data) == pytest.approx(1.0)
    assert localize.threshold_label.text() == "0.20" and localize.legend.title == "relative score"
    assert tuple(heat.contrast_limits) == (0.0, 1.0) and heat.colormap.map(np.array([0.19]))[0, 3] == 0
    assert "ranked only" in localize.status.text() and "grounded in" in localize.status.text()
    # the boxes are the finding areas of the heatmap as shown (analysis.finding_areas at the threshold)
    areas = finding_areas(localize.analysis, localize.result, 0.2, True, localize.top_k.value())
    assert localize.box_kind.currentText() == "areas" and [a.box for a in localize.areas] == [a.box for a in areas]
    assert viewer.layers[BOXES].nshapes == localize.boxes_list.count() == len(areas) > 0

    localize.box_kind.setCurrentText("regions")
    boxes = viewer.layers[BOXES]
    # top 5 asked; the 8,192-px demo slide has 2 x 2 regions of 4,096 px, so every region gets its box
    side = DEMO_SIZE // REGION
    assert localize.top_k.value() == 5 and side * side == 4
    assert boxes.nshapes == side * side and localize.boxes_list.count() == side * side
    scores = localize.result.top_boxes[:, 4]
    assert list(boxes.text.values) == [f"#{rank} {score:.3f}" for rank, score in enumerate(scores, 1)]
    x0, y0, x1, y1 = localize.result.top_boxes[0, :4]
    np.testing.assert_allclose(boxes.data_to_world(boxes.data[0].min(0)), slide.data_to_world((y0 - 0.5, x0 - 0.5)))

    localize.threshold.setValue(50)
    localize.opacity.setValue(40)
    assert heat.colormap.map(np.array([0.49]))[0, 3] == 0 and heat.opacity == pytest.approx(0.4)

    # clicking a box in the list zooms the camera onto it
    localize.boxes_list.setCurrentRow(1)
    bx0, by0, bx1, by1 = localize.result.top_boxes[1, :4]
    centre = slide.data_to_world(((by0 + by1) / 2 - 0.5, (bx0 + bx1) / 2 - 0.5))
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], centre)

    pinned = localize.pin()
    assert pinned.name == "pin: necrosis" and pinned.data.shape == heat.data.shape
    frozen = pinned.data.copy()

    # region level: one cell per 4096-px region, placed with the same convention
    localize.detail_box.setCurrentText("regions")
    qtbot.waitUntil(lambda: viewer.layers[HEATMAP].data.shape == (side, side), timeout=30_000)
    assert tuple(heat.scale) == pytest.approx((REGION * MPP,) * 2)
    assert tuple(heat.translate) == pytest.approx(((REGION - 1) / 2 * MPP,) * 2)
    _type(qtbot, localize, "fat lobules")
    np.testing.assert_array_equal(pinned.data, frozen)  # a pin does not follow the query
    localize.box_kind.setCurrentText("areas")  # the exports hold the areas shown

    written = {}
    for suffix in (".geojson", ".npz", ".png"):
        with qtbot.waitSignal(localize.exported, timeout=30_000) as done:
            localize.export(suffix, tmp_path / f"out{suffix}")
        written[suffix] = Path(done.args[0])
    collection = json.loads(written[".geojson"].read_text())
    assert collection["type"] == "FeatureCollection" and collection["features"]
    assert {f["properties"]["classification"]["name"] for f in collection["features"]} == {"fat lobules"}
    assert {f["properties"]["pathflip"]["kind"] for f in collection["features"]} == {"area"}
    # the finding areas outline exactly the cells the layer shows at the panel's threshold
    regions = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="xy"), -1).reshape(-1, 2) * REGION
    outlined = mask_for(read_geojson(written[".geojson"]), None, regions, REGION).reshape(side, side)
    np.testing.assert_array_equal(outlined, heat.data >= 0.5)
    with np.load(written[".npz"], allow_pickle=False) as scores:
        assert scores["patch_coords"].shape == (len(scores["patch_scores"]), 2)
        assert scores["region_boxes"].shape == (side * side, 4) and np.isclose(scores["region_scores"].sum(), 1, atol=1e-4)
    # the exports hold the heatmap on screen: its grid, and the PNG blends it at the panel's threshold and opacity
    with np.load(written[".npz"], allow_pickle=False) as scores:
        np.testing.assert_array_equal(scores["heatmap"], heat.data)
        assert scores["heatmap_cell"] == REGION and scores["threshold"] == pytest.approx(0.5)
    png = np.asarray(Image.open(written[".png"]))
    with open_slide(localize.analysis.slide_path) as demo:
        level = len(demo.levels) - 1
        thumbnail = demo.read_region((0, 0), level, demo.level_dimensions[level])
        downsample = demo.downsamples[level]
    expected = Image.open(overlay_png(tmp_path / "expected.png", thumbnail, ScoreGrid(heat.data, REGION),
                                      downsample, opacity=0.4, threshold=0.5))
    # the PNG's thumbnail part (a legend follows below it) is exactly the blend of the layer's grid
    png = png[:thumbnail.shape[0], :thumbnail.shape[1]]
    np.testing.assert_array_equal(png, np.asarray(expected)[:thumbnail.shape[0], :thumbnail.shape[1]])
    rows = np.minimum(np.arange(png.shape[0]) * downsample // REGION, side - 1).astype(int)
    cols = np.minimum(np.arange(png.shape[1]) * downsample // REGION, side - 1).astype(int)
    shown = heat.data[rows[:, None], cols[None, :]] > 0.5
    painted = np.any(png != thumbnail[..., :3], axis=-1)
    assert painted.any() and not painted[~shown].any()  # colour only where the layer shows the heatmap


def test_box_click_on_canvas_zooms_unless_already_inside(viewer, weights, cache, qtbot):
    workspace = _workspace(viewer, weights, cache)
    _open_and_analyze(viewer, workspace, qtbot)
    localize = workspace.localize
    _type(qtbot, localize, "tumour")
    viewer.reset_view()
    slide = viewer.layers[DEMO]
    x0, y0, x1, y1 = localize.boxes[0]  # the best finding area
    inside = np.asarray(slide.data_to_world(((y0 + y1) / 2, x0 + 10)))

    class Click:  # what napari hands a drag callback: a press, then a release without moves
        type, position = "mouse_press", tuple(inside)

    def click():
        event = Click()
        callback = localize._click_box(viewer, event)
        next(callback)
        event.type = "mouse_release"
        with pytest.raises(StopIteration):
            next(callback)

    overview = viewer.scene.camera.zoom
    click()
    assert viewer.scene.camera.zoom > overview
    centre = slide.data_to_world(((y0 + y1) / 2 - 0.5, (x0 + x1) / 2 - 0.5))
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], centre)
    viewer.scene.camera.zoom *= 4  # already zoomed inside the box: a click no longer moves the camera
    viewer.scene.camera.center = tuple(inside)
    click()
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], inside)


def test_zero_shot_and_latest_query_wins(viewer, weights, cache, qtbot):
    workspace = _workspace(viewer, weights, cache)
    _open_and_analyze(viewer, workspace, qtbot)
    localize = workspace.localize
    localize.prompts.setPlainText("necrosis\nadipose tissue\n\nnormal glands\n")
    with qtbot.waitSignal(localize.classified, timeout=30_000) as done:
        localize.classify_button.click()
    probabilities = done.args[0]
    assert list(probabilities) == ["necrosis", "adipose tissue", "normal glands"]
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert "%" in localize.class_result.text()

    # a burst of edits: whatever lands in between, the final layer shows the final text
    painted = []
    localize.heatmap_updated.connect(lambda query, level: level == "patches" and painted.append(query))
    for text in ["n", "ne", "nec", "necr", "necro", "necrotic debris"]:
        localize.query.setText(text)
        localize.request()
    qtbot.waitUntil(lambda: bool(painted) and painted[-1] == "necrotic debris", timeout=30_000)
    qtbot.wait(200)
    assert painted[-1] == "necrotic debris"
    assert viewer.layers[HEATMAP].metadata["pathflip_query"] == "necrotic debris"


def test_latest_runner_drops_stale_results(qtbot):
    import threading

    runner = LatestRunner()
    gate = threading.Event()
    results = []
    runner.finished.connect(lambda value, seq: results.append(value))
    runner.submit(lambda: gate.wait(5) and "first")
    runner.submit(lambda: "second")  # waits behind the first, then is replaced by the third
    runner.submit(lambda: "third")
    gate.set()
    qtbot.waitUntil(lambda: results == ["third"], timeout=5000)
    qtbot.wait(100)
    assert results == ["third"]
    failures = []
    runner.failed.connect(lambda exc, seq: failures.append(exc))
    runner.submit(lambda: 1 / 0)
    qtbot.waitUntil(lambda: bool(failures), timeout=5000)
    assert isinstance(failures[0], ZeroDivisionError)
    runner.shutdown()


def test_errors_become_notifications_and_the_widget_stays_usable(viewer, weights, wsi_dir, qtbot, tmp_path):
    workspace = _workspace(viewer, tmp_path / "no-weights", tmp_path / "cache")
    slide = workspace.slide
    before = len(notification_manager.records)
    slide.analyze_button.click()  # nothing open yet
    assert any("Open a slide first" in m for m in _messages_since(before))

    slide.open_demo.click()
    before = len(notification_manager.records)
    slide.analyze_button.click()
    qtbot.waitUntil(lambda: not slide.running, timeout=30_000)
    assert any("no PathFLIP weights in" in m for m in _messages_since(before))
    assert slide.analyze_button.isEnabled() and slide.analysis is None

    # cancel during extraction (fresh cache): a notification, and a later Analyze resumes
    slide.weights_edit.setText(str(weights))
    before = len(notification_manager.records)
    slide._progressed.connect(lambda done, total: slide.cancel())
    slide.analyze_button.click()
    qtbot.waitUntil(lambda: not slide.running, timeout=60_000)
    assert any("cancelled" in m for m in _messages_since(before)) and slide.analysis is None

    # unreadable tiles: the extraction error names the tile and says what to do
    viewer.open(str(wsi_dir / "unreadable.svs"), plugin=PLUGIN)
    slide.layer_box.setCurrentText("unreadable")
    before = len(notification_manager.records)
    slide.analyze_button.click()
    qtbot.waitUntil(lambda: not slide.running, timeout=60_000)
    assert any("unreadable" in m for m in _messages_since(before))
    assert slide.analyze_button.isEnabled()

    # typing before any analysis asks for Analyze instead of failing
    workspace.localize.query.setText("necrosis")
    qtbot.waitUntil(lambda: "Analyze" in workspace.localize.status.text(), timeout=2000)


def _overlay_difference(a, b) -> float:
    """Fraction of canvas pixels that changed visibly (a channel by more than 40 of 255)."""
    return float((np.abs(a[..., :3].astype(int) - b[..., :3].astype(int)).max(-1) > 40).mean())


def test_screenshot_shows_the_heatmap(viewer, weights, cache, qtbot, tmp_path):
    """The overlay is visibly rendered; with PATHFLIP_SCREENSHOT_DIR set, saves the README screenshots (with the
    trained demo weights when they exist)."""
    trained = (WeightsFolder.resolve().path / "config.json").is_file()
    workspace = _workspace(viewer, WeightsFolder.resolve().path if trained else weights, cache)
    out = Path(os.environ.get("PATHFLIP_SCREENSHOT_DIR", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    viewer.window.resize(1800, 1000)
    _open_and_analyze(viewer, workspace, qtbot)
    viewer.reset_view()
    slide_only = viewer.screenshot(canvas_only=True)
    viewer.screenshot(str(out / "open_slide.png"), canvas_only=False)
    _type(qtbot, workspace.localize, "necrosis")
    viewer.layers.selection.active = viewer.layers[DEMO]
    overlay = viewer.screenshot(canvas_only=True)
    window = viewer.screenshot(str(out / "localize_necrosis.png"), canvas_only=False)
    assert window.shape[1] > overlay.shape[1]  # the whole window, with the docks
    assert _overlay_difference(overlay, slide_only) > 0.01  # the top regions' heatmap: a few % of the canvas
    viewer.layers[HEATMAP].visible = False
    viewer.layers[BOXES].visible = False
    hidden = viewer.screenshot(canvas_only=True)
    assert _overlay_difference(hidden, slide_only) < 0.001


def test_necrosis_heatmap_peak_lies_on_the_true_region(viewer, cache, qtbot):
    """With the trained demo weights, the patch-level heatmap for "necrosis" peaks inside the necrosis of the demo
    slide (its truth: training.synthetic.demo_spec()). The paper's eq. 5 attention alone put it on the tumour rim;
    the weights' patch-text head (training/patch_head.py) is what finds it."""
    from training.synthetic import demo_spec

    trained = WeightsFolder.resolve().path
    if not (trained / "config.json").is_file():
        pytest.fail(f"the trained demo weights are missing from {trained}: run `python -m training demo` "
                    "(it writes sample_data/weights/pathflip) and run this test again")
    workspace = _workspace(viewer, trained, cache)
    _open_and_analyze(viewer, workspace, qtbot)
    _type(qtbot, workspace.localize, "necrosis")
    heat = viewer.layers[HEATMAP]
    row, col = np.unravel_index(np.argmax(heat.data), heat.data.shape)
    necrosis = next(f for f in demo_spec().findings if f.name == "necrosis")
    x, y, w, h = necrosis.bbox
    # the peak cell's centre, back in level-0 pixels through the layer's own placement
    cy, cx = np.asarray(viewer.layers[DEMO].world_to_data(heat.data_to_world((row, col))))
    assert x <= cx < x + w and y <= cy < y + h, f"peak at level-0 ({cx:.0f}, {cy:.0f}), necrosis bbox {necrosis.bbox}"
    assert necrosis.mask[row, col] or necrosis.mask[max(row - 1, 0):row + 2, max(col - 1, 0):col + 2].any()


def _calibrated(monkeypatch, presence: float) -> None:
    """Grounding results made calibrated, as weights with a calibrated patch-text head give them (the shipped ones
    are not yet): patch probabilities = the slide's `presence` times the real patch scores rescaled to [0, 1]; the
    region level stays uncalibrated, as in the model."""
    from napari_pathflip.analysis import SlideAnalysis
    from napari_pathflip.heatmap import normalise

    ground = SlideAnalysis.ground

    def calibrated(self, text, top_k=5, patch_level=True):
        result = ground(self, text, top_k=top_k, patch_level=patch_level)
        result.presence = presence
        if result.patch_scores is not None:
            result.patch_scores = presence * np.nan_to_num(normalise(result.patch_scores))
            result.calibrated = True
        return result

    monkeypatch.setattr(SlideAnalysis, "ground", calibrated)


def test_not_found_says_so_and_paints_nothing(viewer, weights, cache, qtbot, monkeypatch):
    _calibrated(monkeypatch, presence=0.03)
    workspace = _workspace(viewer, weights, cache)
    _open_and_analyze(viewer, workspace, qtbot)
    localize = workspace.localize
    _type(qtbot, localize, "necrosis")
    assert localize.result.calibrated and localize.result.status == "not found"
    assert "not found on this slide: p = 0.03" in localize.status.text() and "grounded in" in localize.status.text()
    heat = viewer.layers[HEATMAP]
    # a finding the slide does not show paints nothing (analysis.heatmap_grid), whatever the threshold: no area
    assert localize.threshold_value == 0.5 and heat.data.max() == 0
    assert heat.colormap.map(heat.data.ravel())[:, 3].max() == 0
    assert localize.areas == [] and viewer.layers[BOXES].nshapes == 0 and localize.boxes_list.count() == 0
    assert "no area at p" in localize.status.text()


def test_calibrated_colour_scale_legend_and_areas_follow_the_threshold(viewer, weights, cache, qtbot, monkeypatch):
    from napari_pathflip.heatmap import heat_rgba
    from napari_pathflip.viewer.localize import area_label

    _calibrated(monkeypatch, presence=0.95)
    workspace = _workspace(viewer, weights, cache)
    _open_and_analyze(viewer, workspace, qtbot)
    localize, slide = workspace.localize, viewer.layers[DEMO]
    _type(qtbot, localize, "necrosis")
    heat, boxes = viewer.layers[HEATMAP], viewer.layers[BOXES]
    assert "found: p = 0.95" in localize.status.text()
    # probabilities shown as they are (not stretched to the slide's range), from the calibrated default 0.5 up
    assert heat.data.max() == pytest.approx(0.95) and localize.threshold_label.text() == "0.50"
    assert localize.legend.title == "P(patch shows the finding)" and localize.legend.isVisible()
    pinned = localize.pin()

    def check_scale(threshold: float) -> None:
        """The layer's colours at `threshold`: transparent below it, heat_rgba (fixed in [0, 1]) from it up."""
        samples = np.linspace(0, 1, 256)
        below = samples < threshold
        colours = heat.colormap.map(samples)
        assert tuple(heat.contrast_limits) == (0.0, 1.0) and (colours[below, 3] == 0).all()
        np.testing.assert_allclose(colours[~below], heat_rgba(samples[~below], threshold) / 255, atol=1e-6)
        ramp = localize.legend.ramp(100)  # the legend: white below the threshold, the heat colours above it
        assert localize.legend.threshold == threshold and (ramp[: int(threshold * 100) - 1] == 255).all()
        assert (ramp[int(threshold * 100) + 1:] < 255).any(axis=1).all()

    def check_areas(threshold: float) -> list:
        """The boxes shown are analysis.finding_areas of the heatmap at `threshold`, labelled on the canvas."""
        expected = finding_areas(localize.analysis, localize.result, threshold, True, localize.top_k.value())
        assert [a.box for a in localize.areas] == [a.box for a in expected] and expected
        np.testing.assert_array_equal(localize.boxes, [a.box for a in expected])
        assert boxes.nshapes == localize.boxes_list.count() == len(expected)
        assert list(boxes.text.values) == [area_label(i, a, True) for i, a in enumerate(expected, 1)]
        assert boxes.text.values[0].startswith("#1 p ") and "% of tissue" in boxes.text.values[0]
        x0, y0 = expected[0].box[:2]
        np.testing.assert_allclose(boxes.data_to_world(boxes.data[0].min(0)), slide.data_to_world((y0 - 0.5, x0 - 0.5)))
        return expected

    check_scale(0.5)
    at_half = check_areas(0.5)
    localize.threshold.setValue(30)
    assert localize.threshold_label.text() == "0.30"
    check_scale(0.3)
    qtbot.waitUntil(lambda: [a.box for a in localize.areas] != [a.box for a in at_half], timeout=5000)
    check_areas(0.3)
    assert pinned.colormap.name == "pathflip heat 0.50" != heat.colormap.name  # a pin keeps its colours
    # the list follows the boxes shown: regions, and a click in the list zooms to that region
    localize.box_kind.setCurrentText("regions")
    np.testing.assert_array_equal(localize.boxes, localize.result.top_boxes[:, :4])
    assert boxes.nshapes == localize.boxes_list.count() == len(localize.result.top_boxes)
    localize.boxes_list.setCurrentRow(1)
    x0, y0, x1, y1 = localize.result.top_boxes[1, :4]
    np.testing.assert_allclose(viewer.scene.camera.center[-2:],
                               slide.data_to_world(((y0 + y1) / 2 - 0.5, (x0 + x1) / 2 - 0.5)))


def test_a_cited_finding_in_the_chat_shows_its_heatmap_and_zooms_to_its_box(viewer, cache, qtbot, tmp_path):
    """The grounded chat beside Localize (its own column, not a tab): "Where is the fat?" is answered from the
    evidence with the finding as a link; clicking it shows the fat heatmap in Localize and zooms onto the cited
    box. "What is this?" about a drawn rectangle over the glands names them. With PATHFLIP_SCREENSHOT_DIR set,
    saves the README's screenshot."""
    from qtpy.QtCore import QUrl

    from napari_pathflip.viewer.layers import box_world

    shipped = WeightsFolder.resolve().path
    if not (WeightsFolder(shipped).chat_dir / "chat_config.json").is_file():
        pytest.fail(f"the demo weights are missing from {shipped.parent}: run `python -m training demo`")
    viewer.window.resize(1800, 1000)
    workspace = _workspace(viewer, shipped, cache)
    _open_and_analyze(viewer, workspace, qtbot)
    chat = workspace.chat
    qtbot.waitUntil(lambda: chat.is_ready, timeout=90_000)
    assert not chat.visibleRegion().isEmpty() and not workspace.localize.visibleRegion().isEmpty()  # side by side

    answers = []
    chat.answered.connect(answers.append)
    chat.question.setText("Where is the fat?")
    chat.send()
    qtbot.waitUntil(lambda: bool(answers) and not chat.busy, timeout=30_000)
    answer = answers.pop()
    assert answer.grounded and "lower left" in answer.text  # the demo slide's fat lobules (synthetic truth)
    assert "cite:1:0" in chat.transcript.toHtml()
    viewer.reset_view()
    overview = viewer.scene.camera.zoom
    box = answer.citations[0].evidence.boxes[0].box
    with qtbot.waitSignal(workspace.localize.heatmap_updated, timeout=30_000,
                          check_params_cb=lambda query, shown: query == "fat"):
        chat.transcript.anchorClicked.emit(QUrl("cite:1:0"))
    qtbot.waitUntil(lambda: viewer.scene.camera.zoom > overview, timeout=5000)
    assert workspace.localize.result.text == "fat" and viewer.layers[HEATMAP].visible
    low, high = box_world(viewer.layers[DEMO], box)
    assert np.all(low <= np.asarray(viewer.scene.camera.center[-2:])) and np.all(
        np.asarray(viewer.scene.camera.center[-2:]) <= high)

    # a region question: a rectangle drawn over the normal glands (right part of the demo slide)
    slide = viewer.layers[DEMO]
    shapes = viewer.add_shapes([np.array([[3600, 5700], [4300, 5700], [4300, 6800], [3600, 6800]])],
                               shape_type="rectangle", name="region", scale=slide.scale[-2:],
                               translate=slide.translate[-2:], units=slide.units[-2:])
    shapes.selected_data = {0}
    chat.question.setText("What is this?")
    assert chat.send()
    qtbot.waitUntil(lambda: bool(answers) and not chat.busy, timeout=30_000)
    region = answers.pop()
    assert region.text.startswith("This region shows normal glands"), region.text
    assert "about the region x 5700-6800, y 3600-4300" in chat.transcript_markdown()

    viewer.layers.selection.active = viewer.layers[DEMO]
    folder = Path(os.environ.get("PATHFLIP_SCREENSHOT_DIR", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(folder / "chat_grounded.png"), canvas_only=False)
