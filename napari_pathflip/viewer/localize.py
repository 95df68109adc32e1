"""Localize: type a finding, see where it is on the slide.

Typing restarts a short debounce timer; the query then goes to a `LatestRunner` (grounding off the GUI thread,
only the newest query's result is painted). The result becomes two layers kept in place between queries:
"PathFLIP heatmap" (an Image layer of normalised scores placed with heatmap.ScoreGrid.placement over the slide
layer's own scale, so cells line up with slide pixels exactly) and "PathFLIP boxes" (the top-k regions as a Shapes
layer with their scores). Pin copies the heatmap into a layer of its own; zero-shot classification and exports run
in napari workers.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QListWidget,
                            QPlainTextEdit, QPushButton, QSlider, QSpinBox, QVBoxLayout)

from ..analysis import SlideAnalysis, heatmap_grid, write_grounding
from ..errors import PathflipError
from ..heatmap import HEAT_COLOURS, ScoreGrid
from ..text import query_text
from .fields import QueryField
from .layers import box_world, grid_placement, zoom_to
from .progress import RunningWorkers
from .tasks import MODEL_LOCK, LatestRunner, notify_error, run_in_background

HEATMAP = "PathFLIP heatmap"
BOXES = "PathFLIP boxes"
DEBOUNCE_MS = 30  # short: a grounding costs milliseconds and the LatestRunner coalesces bursts anyway
# how fine the heatmap is: patch scores (every patch with a patch-text head, else those of the top regions), or
# region scores only ("level" is kept for pyramid levels)
DETAILS = ("patches", "regions")

def heat_colormap():
    from napari.utils.colormaps import Colormap

    return Colormap(HEAT_COLOURS / 255, controls=np.linspace(0, 1, len(HEAT_COLOURS)), name="pathflip heat")


def _ground(analysis: SlideAnalysis, text: str, top_k: int, patch_level: bool):
    """Worker body for one query: grounding and its grid, timed."""
    started = time.perf_counter()
    with MODEL_LOCK:
        result = analysis.ground(text, top_k=top_k, patch_level=patch_level)
    grid = heatmap_grid(analysis.encoding, result, patch_level)
    return result, grid, patch_level, time.perf_counter() - started


def _file_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:40] or "query"


class LocalizePanel(QGroupBox):
    """Signals: `heatmap_updated(query, detail)` after the layers show a new result ("regions" first on every
    query, then "patches" when that detail is chosen); `classified(dict)` with zero-shot probabilities;
    `exported(path)` after an export file is written."""

    heatmap_updated = Signal(str, str)
    classified = Signal(dict)
    exported = Signal(str)

    def __init__(self, viewer, parent=None):
        super().__init__("Localize", parent)
        self.viewer = viewer
        self.analysis: SlideAnalysis | None = None
        self.slide_layer = None
        self.result = None  # the GroundingResult on screen
        self.grid: ScoreGrid | None = None  # the heatmap on screen (analysis.heatmap_grid)
        self.grid_patch_level = False  # whether it is the patch grid
        self.runner = LatestRunner(self)
        self.runner.finished.connect(self._show)
        self.runner.failed.connect(lambda exc, seq: notify_error(exc))
        self.probabilities: dict[str, float] = {}
        self._workers = RunningWorkers()

        self.query = QueryField("Type a finding, e.g. necrosis", DEBOUNCE_MS)
        self.query.paused.connect(self.request)
        self.detail_box = QComboBox()
        self.detail_box.addItems(DETAILS)
        self.detail_box.setToolTip("patches: patch-level attribution inside the top regions; regions: region "
                                  "attention only (4096-px windows)")
        self.detail_box.currentIndexChanged.connect(self.request)
        self.top_k = QSpinBox(minimum=1, maximum=50, value=5)
        self.top_k.setToolTip("How many top regions to box (weights without a patch-text head: and explain at "
                              "patch level)")
        self.top_k.valueChanged.connect(self.request)
        self.opacity = QSlider(Qt.Orientation.Horizontal, minimum=0, maximum=100, value=70)
        self.opacity.valueChanged.connect(self._restyle)
        self.threshold = QSlider(Qt.Orientation.Horizontal, minimum=0, maximum=95, value=20)
        self.threshold.setToolTip("Scores below this fraction of the slide's range are transparent")
        self.threshold.valueChanged.connect(self._restyle)
        self.boxes_list = QListWidget()
        self.boxes_list.setMaximumHeight(110)
        self.boxes_list.setToolTip("Top regions, best first: click one to zoom to it")
        self.boxes_list.currentRowChanged.connect(lambda row: row >= 0 and self.zoom_to_box(row))
        self.pin_button = QPushButton("Pin")
        self.pin_button.setToolTip("Keep this query's heatmap as its own layer")
        self.pin_button.clicked.connect(self.pin)
        self.export_buttons = {}
        for suffix, tip in ((".png", "slide thumbnail with the heatmap blended on top"),
                            (".npz", "scores with level-0 coordinates (patches and regions)"),
                            (".geojson", "top regions as QuPath annotations")):
            button = QPushButton(suffix[1:].upper())
            button.setToolTip(f"Export {tip}")
            button.clicked.connect(lambda checked=False, s=suffix: self.export(s))
            self.export_buttons[suffix] = button
        self.status = QLabel("Analyze a slide, then type a finding.")
        self.status.setWordWrap(True)
        self.prompts = QPlainTextEdit()
        self.prompts.setPlaceholderText("Zero-shot classes, one prompt per line, e.g.\nadenocarcinoma\n"
                                        "squamous cell carcinoma")
        self.prompts.setMaximumHeight(80)
        self.classify_button = QPushButton("Classify slide")
        self.classify_button.clicked.connect(self.classify)
        self.class_result = QLabel()
        self.class_result.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Finding", self.query)
        detail_row = QHBoxLayout()
        detail_row.addWidget(self.detail_box)
        detail_row.addWidget(QLabel("top"))
        detail_row.addWidget(self.top_k)
        form.addRow("Detail", detail_row)
        form.addRow("Opacity", self.opacity)
        form.addRow("Threshold", self.threshold)
        actions = QHBoxLayout()
        actions.addWidget(self.pin_button)
        actions.addWidget(QLabel("Export"))
        for button in self.export_buttons.values():
            actions.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.status)
        layout.addWidget(self.boxes_list)
        layout.addLayout(actions)
        layout.addWidget(QLabel("<b>Zero-shot classification</b>"))
        layout.addWidget(self.prompts)
        layout.addWidget(self.classify_button)
        layout.addWidget(self.class_result)

        viewer.mouse_drag_callbacks.append(self._click_box)
        self._enable(False)

    # -------------------------------------------------------------------------------------------------- analysis
    def set_analysis(self, analysis: SlideAnalysis | None, slide_layer=None) -> None:
        self.runner.invalidate()
        self.analysis, self.slide_layer = analysis, slide_layer
        self.result, self.grid = None, None
        if analysis is None:
            for name in (HEATMAP, BOXES):
                if name in self.viewer.layers:
                    self.viewer.layers.remove(name)
            self.boxes_list.clear()
            self.status.setText("Analyze a slide, then type a finding.")
        self._enable(analysis is not None)
        if analysis is not None:
            self.status.setText("Type a finding: the heatmap follows as you type.")
            self.request()

    def _enable(self, on: bool) -> None:
        for widget in (self.pin_button, self.classify_button, *self.export_buttons.values()):
            widget.setEnabled(on)

    # -------------------------------------------------------------------------------------------------- grounding
    @property
    def patch_level(self) -> bool:
        return self.detail_box.currentText() == "patches"

    def request(self, *args) -> None:
        """Ground the current text (called by the debounce timer and when the detail or top-k changes).

        Region level first: it costs one text encoding, so the heatmap follows every keystroke; the patch-level
        scores (each patch of the top regions through the Q-Former on its own) follow as a second job unless a
        newer query supersedes it."""
        text = self.query.text().strip()
        if not text:
            self.runner.invalidate()
            return
        try:
            text = query_text(text)
        except PathflipError as exc:  # said in the status line: a notification on every keystroke would be noise
            self.runner.invalidate()
            self.status.setText(str(exc))
            return
        if self.analysis is None:
            self.status.setText("Press <b>Analyze</b> in the slide panel first.")
            return
        self.runner.submit(_ground, self.analysis, text, self.top_k.value(), False)

    def _show(self, payload, seq: int) -> None:
        result, grid, patch_level, seconds = payload
        if self.analysis is None or self.slide_layer not in self.viewer.layers:
            return
        self.result, self.grid, self.grid_patch_level = result, grid, patch_level
        self._paint_heatmap(grid, result.text)
        self._paint_boxes(result)
        detail = "patches" if patch_level else "regions"
        refine = self.patch_level and not patch_level
        if refine:
            self.runner.submit(_ground, self.analysis, result.text, self.top_k.value(), True)
        name = "patch" if patch_level else "region"
        self.status.setText(f"<b>{result.text}</b>: {name} level, grounded in {seconds * 1000:.0f} ms"
                            + (" (patch level follows)" if refine else ""))
        self.heatmap_updated.emit(result.text, detail)

    def _paint_heatmap(self, grid: ScoreGrid, text: str) -> None:
        scale, translate = grid_placement(grid, self.slide_layer)
        if HEATMAP in self.viewer.layers:
            layer = self.viewer.layers[HEATMAP]
            # placement first (only when the detail changed: each assignment refreshes the layer), then the data
            if not np.allclose(layer.scale[-2:], scale):
                layer.scale, layer.translate = scale, translate
            layer.data = grid.values
        else:
            layer = self.viewer.add_image(grid.values, name=HEATMAP, scale=scale, translate=translate,
                                          colormap=heat_colormap(), blending="translucent",
                                          units=self.slide_layer.units)
            self.viewer.layers.selection.active = self.slide_layer
        layer.metadata["pathflip_query"] = text
        self._restyle()

    def _restyle(self, *args) -> None:
        if HEATMAP in self.viewer.layers:  # pinned layers keep the style they were pinned with
            layer = self.viewer.layers[HEATMAP]
            layer.opacity = self.opacity.value() / 100
            layer.contrast_limits = (self.threshold.value() / 100, 1.0)

    def _paint_boxes(self, result) -> None:
        boxes = result.top_boxes
        # level-0 pixel x covers [x - 0.5, x + 0.5) around its centre in the slide layer's data coordinates
        rectangles = [np.array([[y0, x0], [y1, x1]]) - 0.5 for x0, y0, x1, y1, _ in boxes]
        features = {"rank": np.arange(1, len(boxes) + 1), "score": boxes[:, 4]}
        text = {"string": "#{rank} {score:.3f}", "color": "white", "anchor": "upper_left", "size": 10}
        slide = self.slide_layer
        width = float(max(boxes[:, 2] - boxes[:, 0])) / 150 if len(boxes) else 1.0
        if BOXES in self.viewer.layers:
            # updated in place: removing a layer costs a full garbage collection (hundreds of ms)
            layer = self.viewer.layers[BOXES]
            same = layer.nshapes == len(rectangles) and all(
                np.array_equal(old, new) for old, new in zip(layer.data, rectangles))
            if not same:
                layer.data = [(r, "rectangle") for r in rectangles]
                layer.edge_color, layer.face_color, layer.edge_width = "#00e5ff", "transparent", width
            layer.features = features
        else:
            self.viewer.add_shapes(rectangles, shape_type="rectangle", name=BOXES, edge_color="#00e5ff",
                                   edge_width=width, face_color="transparent", features=features, text=text,
                                   scale=slide.scale[-2:], translate=slide.translate[-2:], units=slide.units)
            self.viewer.layers.selection.active = slide
        self.boxes_list.blockSignals(True)
        self.boxes_list.clear()
        for rank, (x0, y0, x1, y1, score) in enumerate(boxes.tolist(), 1):
            self.boxes_list.addItem(f"#{rank}  {score:.3f}   x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f} px")
        self.boxes_list.blockSignals(False)

    # ------------------------------------------------------------------------------------------------------ camera
    def _box_world(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """World (y, x) corners of top box `index`."""
        return box_world(self.slide_layer, self.result.top_boxes[index, :4])

    def zoom_to_box(self, index: int) -> None:
        zoom_to(self.viewer, self.slide_layer, self.result.top_boxes[index, :4])

    def box_at(self, world_yx) -> int | None:
        """Index of the best top box containing a world (y, x) point, or None."""
        if self.result is None or self.slide_layer is None or BOXES not in self.viewer.layers:
            return None
        for index in range(len(self.result.top_boxes)):
            low, high = self._box_world(index)
            if np.all(low <= world_yx) and np.all(world_yx < high):
                return index
        return None

    def _click_box(self, viewer, event):
        """A click (no drag) on a top box zooms to it, unless the view is already inside that box."""
        if BOXES not in viewer.layers or not viewer.layers[BOXES].visible:
            return
        position = np.asarray(event.position[-2:], dtype=float)
        yield
        if event.type == "mouse_move":
            return  # a drag pans the slide as usual
        index = self.box_at(position)
        if index is None:
            return
        low, high = self._box_world(index)
        visible = np.asarray(viewer.canvas.size) / viewer.scene.camera.zoom
        if np.any(visible > (high - low)):
            self.zoom_to_box(index)

    # --------------------------------------------------------------------------------------------------- pin, zero-shot
    def pin(self):
        """The current heatmap as a layer of its own, named after its query; returns the layer."""
        from napari.utils.notifications import show_warning

        if self.grid is None or HEATMAP not in self.viewer.layers:
            show_warning("Type a finding first: Pin keeps the heatmap on screen as its own layer.")
            return None
        current = self.viewer.layers[HEATMAP]
        layer = self.viewer.add_image(
            current.data.copy(), name=f"pin: {self.result.text}", scale=current.scale, translate=current.translate,
            colormap=current.colormap, contrast_limits=current.contrast_limits, opacity=current.opacity,
            blending="translucent", units=current.units, metadata={"pathflip_pinned": self.result.text})
        self.viewer.layers.selection.active = self.slide_layer
        return layer

    def classify(self) -> None:
        from napari.utils.notifications import show_warning

        prompts = [line.strip() for line in self.prompts.toPlainText().splitlines() if line.strip()]
        if self.analysis is None:
            show_warning("Analyze a slide first.")
            return
        if len(prompts) < 2:
            show_warning("Zero-shot classification needs at least two prompts, one per line.")
            return
        analysis = self.analysis

        def work():
            with MODEL_LOCK:
                return analysis.classify(prompts)

        self.class_result.setText("Classifying...")
        self._workers.keep(run_in_background(work, on_done=lambda p: self._show_classes(prompts, p),
                                      on_error=self._class_failed))

    def _show_classes(self, prompts: list[str], probabilities: np.ndarray) -> None:
        self.probabilities = {p: float(v) for p, v in zip(prompts, probabilities)}
        rows = sorted(self.probabilities.items(), key=lambda item: -item[1])
        self.class_result.setText("<table>" + "".join(
            f"<tr><td>{p}</td><td align='right'>&nbsp;{v * 100:.1f} %</td>"
            f"<td>&nbsp;{'&#9608;' * round(v * 20)}</td></tr>" for p, v in rows) + "</table>")
        self.classified.emit(dict(self.probabilities))

    def _class_failed(self, exc) -> None:
        self.class_result.setText("")
        notify_error(exc)

    # ------------------------------------------------------------------------------------------------------ export
    def export(self, suffix: str, path: str | Path | None = None):
        """Write the current query as .png / .npz / .geojson (asks where when `path` is None); returns the worker."""
        from napari.utils.notifications import show_warning

        if self.result is None or self.analysis is None:
            show_warning("Type a finding first: exports hold the current query's scores.")
            return None
        if path is None:
            default = f"{self.slide_layer.name}_{_file_stem(self.result.text)}{suffix}"
            path, _ = QFileDialog.getSaveFileName(self, f"Export {suffix}", default, f"*{suffix}")
            if not path:
                return None
        path = Path(path)
        analysis, result, top_k = self.analysis, self.result, self.top_k.value()
        # the heatmap as shown: its grid, threshold and opacity
        threshold, opacity, patch_level = (self.threshold.value() / 100, self.opacity.value() / 100,
                                           self.grid_patch_level)

        def work():
            current = result
            if suffix == ".npz" and current.patch_scores is None:  # the NPZ always carries patch scores
                with MODEL_LOCK:
                    current = analysis.ground(result.text, top_k=top_k, patch_level=True)
            return str(write_grounding(analysis, current, path, threshold, opacity, patch_level))

        return self._workers.keep(run_in_background(work, on_done=self._exported))

    def _exported(self, path: str) -> None:
        from napari.utils.notifications import show_info

        show_info(f"PathFLIP: wrote {path}")
        self.exported.emit(path)

    def close_down(self) -> None:
        self.runner.shutdown()
        if self._click_box in self.viewer.mouse_drag_callbacks:
            self.viewer.mouse_drag_callbacks.remove(self._click_box)
