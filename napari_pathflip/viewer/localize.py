"""Localize: type a finding, see where it is on the slide.

Typing restarts a short debounce timer; the query then goes to a `LatestRunner` (grounding off the GUI thread,
only the newest query's result is painted). The result becomes two layers kept in place between queries:
"PathFLIP heatmap", an Image layer of analysis.heatmap_grid placed with heatmap.ScoreGrid.placement over the slide
layer's own scale (cells line up with slide pixels exactly), on the fixed colour scale of heatmap.heat_rgba: a
colour is the same value on every slide and every query (a probability when the result is calibrated), and values
below the threshold are transparent. "PathFLIP boxes", a Shapes layer: the finding areas of the thresholded map
(analysis.finding_areas) with their probability and share of the tissue, or the top regions.

Nothing the first query needs is set up on the GUI thread while it runs, where it stalled the viewer for up to
1.7 s: the libraries a result needs are imported in the background when the panel is made, the characters of the
box labels are rendered into napari's canvas font one per timer tick, and once a slide is analysed both layers are
made (the heatmap all 0, the boxes empty), one event-loop turn apart; a query only fills them in. With a
patch-text head every patch costs no more than the regions, so the patch heatmap comes at once; otherwise the
region heatmap comes first and the patch attribution of the top regions follows. Pin copies the heatmap into a
layer of its own; zero-shot classification and exports run in napari workers.
"""

from __future__ import annotations

import html
import re
import string
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qtpy.QtCore import QRectF, Qt, QTimer, Signal
from qtpy.QtGui import QColor, QImage, QPainter, QPen
from qtpy.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QListWidget,
                            QPlainTextEdit, QPushButton, QSlider, QSpinBox, QVBoxLayout, QWidget)

from ..analysis import SlideAnalysis, finding_areas, heatmap_grid, score_heatmap, write_grounding
from ..errors import PathflipError
from ..heatmap import LEGEND_TICKS, FindingArea, ScoreGrid, default_threshold, heat_rgba, legend_ramp
from ..heatmap import finding_areas as grid_areas
from ..text import query_text
from .fields import QueryField
from .layers import box_world, glyph_loaders, grid_placement, zoom_to
from .progress import RunningWorkers
from .tasks import MODEL_LOCK, LatestRunner, ahead_of_need, notify_error, run_in_background

HEATMAP = "PathFLIP heatmap"
BOXES = "PathFLIP boxes"
DEBOUNCE_MS = 30  # short: a grounding costs milliseconds and the LatestRunner coalesces bursts anyway
# how fine the heatmap is: patch scores (every patch with a patch-text head, else those of the top regions), or
# region scores only ("level" is kept for pyramid levels)
DETAILS = ("patches", "regions")
# what the boxes outline: the finding areas (connected cells of the heatmap at or above the threshold), or the top
# regions (4096-px windows) by their score
BOX_KINDS = ("areas", "regions")
COLORMAP_SAMPLES = 256  # values of heat_rgba a heatmap colormap holds (napari interpolates between them)
AREAS_DELAY_MS = 60  # the finding areas follow the threshold slider once it has rested this long
BOX_COLOUR = "#00e5ff"
BOX_EDGE = 1 / 150  # the boxes' edge width, as a fraction of the region size
GLYPH_INTERVAL_MS = 0  # one character of the box labels is rendered per idle event-loop turn once the panel exists
TITLES = {True: "P(patch shows the finding)", False: "relative score"}


def heat_colormap(threshold: float = 0.0):
    """The heatmap's napari colormap for contrast limits (0, 1): heatmap.heat_rgba sampled at COLORMAP_SAMPLES values
    over [0, 1] at `threshold` (transparent below it)."""
    from napari.utils.colormaps import Colormap

    values = np.linspace(0, 1, COLORMAP_SAMPLES)
    if threshold > 0:  # a step at the threshold: napari interpolates between controls, which would blur the edge
        values = np.union1d(values[np.abs(values - threshold) > 1e-6], [threshold - 1e-6, threshold])
    return Colormap(heat_rgba(values, threshold) / 255, controls=values, name=colormap_name(threshold))


def colormap_name(threshold: float) -> str:
    """Named by the threshold (the slider's steps), so napari's registry of colormaps holds one per threshold however
    often the slider moves."""
    return f"pathflip heat {threshold:.2f}"


@dataclass
class Grounded:
    """One query's result as a worker hands it to the GUI: the grounding, its heatmap grid and finding areas (at
    `threshold`), and how long grounding took."""

    result: object  # GroundingResult
    grid: ScoreGrid
    patch_level: bool
    seconds: float
    threshold: float
    areas: list[FindingArea]


def _ground(analysis: SlideAnalysis, text: str, top_k: int, patch_level: bool, scale: tuple) -> Grounded:
    """Worker body for one query. `scale` = (calibrated, threshold) of the panel's slider: the finding areas are
    found at that threshold when the result's values are of the same kind, else at the kind's default."""
    started = time.perf_counter()
    with MODEL_LOCK:
        result = analysis.ground(text, top_k=top_k, patch_level=patch_level)
    seconds = time.perf_counter() - started
    calibrated, threshold = scale
    if result.calibrated != calibrated:
        threshold = default_threshold(result.calibrated)
    return Grounded(result, heatmap_grid(analysis.encoding, result, patch_level), patch_level, seconds, threshold,
                    finding_areas(analysis, result, threshold, patch_level, top_k))


def _import_ahead() -> None:
    """Background body when the panel is made: imports what showing a result needs, so that the GUI thread never
    does (scipy and shapely for finding areas; pandas for napari's layer features, which the boxes layer would
    otherwise import on the GUI thread: 0.2-0.6 s)."""
    import pandas  # noqa: F401  (napari's Shapes layer keeps its features in a DataFrame)

    grid_areas(ScoreGrid(np.ones((1, 1), dtype=np.float32), 1), 0.5, tissue_cells=1)


def area_label(rank: int, area: FindingArea, calibrated: bool) -> str:
    """A finding area's label on the canvas: its rank, probability (or relative score) and share of the tissue."""
    return f"#{rank} {'p' if calibrated else 'score'} {area.probability:.2f}, {area.fraction:.1%} of tissue"


def region_label(rank: int, score: float) -> str:
    return f"#{rank} {score:.3f}"


# every character a box label can hold (the canvas renders each once before the first labels are drawn)
LABEL_GLYPHS = string.digits + "".join(
    area_label(1, FindingArea((0, 0, 0, 0), 0.0, 0.0, 0, 0.0, 0.0, []), calibrated) for calibrated in (True, False)
) + region_label(1, 0.0)


def _file_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:40] or "query"


class HeatLegend(QWidget):
    """The heatmap's colour scale: heat_rgba over [0, 1] as the layer shows it over a white background at the
    panel's opacity (white below the threshold), ticks at heatmap.LEGEND_TICKS, the threshold marked, titled by what
    the values are (TITLES: a probability when calibrated, else a score relative to the slide's range)."""

    BAR_HEIGHT, MARGIN = 12, 8

    def __init__(self, parent=None):
        super().__init__(parent)
        self.threshold, self.calibrated, self.opacity = 0.0, False, 1.0
        self.setMinimumHeight(self.fontMetrics().height() * 2 + self.BAR_HEIGHT + 10)
        self.setMinimumWidth(160)

    @property
    def title(self) -> str:
        return TITLES[self.calibrated]

    def show_scale(self, threshold: float, calibrated: bool, opacity: float) -> None:
        self.threshold, self.calibrated, self.opacity = threshold, calibrated, opacity
        self.setToolTip(f"{self.title}: coloured from {threshold:.2f} up, transparent below")
        self.update()

    def ramp(self, width: int) -> np.ndarray:
        """[width, 3] uint8: the bar's colours, left (0) to right (1)."""
        return legend_ramp(width, self.threshold, self.opacity)

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        metrics = self.fontMetrics()
        x0, x1 = self.MARGIN, self.width() - self.MARGIN
        top = metrics.height() + 2
        painter.drawText(x0, metrics.ascent(), self.title)
        row = np.ascontiguousarray(self.ramp(max(x1 - x0, 1))[None])
        image = QImage(row.data, row.shape[1], 1, row.shape[1] * 3, QImage.Format.Format_RGB888)
        painter.drawImage(QRectF(x0, top, x1 - x0, self.BAR_HEIGHT), image)
        painter.setPen(QColor(128, 128, 128))
        painter.drawRect(x0, top, x1 - x0, self.BAR_HEIGHT)
        painter.setPen(QColor(0, 0, 0))
        bottom = top + self.BAR_HEIGHT
        for tick in LEGEND_TICKS:
            x = round(x0 + tick * (x1 - x0))
            painter.drawLine(x, bottom, x, bottom + 3)
            label = f"{tick:g}"
            half = metrics.horizontalAdvance(label) / 2
            painter.drawText(round(min(max(x - half, 0), self.width() - 2 * half)), bottom + 3 + metrics.ascent(),
                             label)
        mark = round(x0 + self.threshold * (x1 - x0))
        painter.setPen(QPen(QColor(0, 0, 0), 2))
        painter.drawLine(mark, top - 3, mark, bottom + 3)
        painter.end()


class LocalizePanel(QGroupBox):
    """Signals: `heatmap_updated(query, detail)` after the layers show a new result (with weights that have no
    patch-text head "regions" first on every query, then "patches" when that detail is chosen); `classified(dict)`
    with zero-shot probabilities; `exported(path)` after an export file is written; `layers_ready()` once the
    heatmap and boxes layers of a newly analysed slide exist."""

    heatmap_updated = Signal(str, str)
    classified = Signal(dict)
    exported = Signal(str)
    layers_ready = Signal()

    def __init__(self, viewer, parent=None):
        super().__init__("Localize", parent)
        self.viewer = viewer
        self.analysis: SlideAnalysis | None = None
        self.slide_layer = None
        self.result = None  # the GroundingResult on screen
        self.grid: ScoreGrid | None = None  # the heatmap on screen (analysis.heatmap_grid)
        self.grid_patch_level = False  # whether it is the patch grid
        self.areas: list[FindingArea] = []  # the finding areas at the threshold shown
        self.boxes = np.zeros((0, 4))  # level-0 (x0, y0, x1, y1) of the boxes shown, best first
        self.calibrated: bool | None = None  # what the threshold slider measures (None before the first result)
        self._patches_at_once = False  # the weights score every patch at the cost of the regions (a patch-text head)
        self._summary = ""  # the status line of the result shown, before its areas
        self.runner = LatestRunner(self)
        self.runner.finished.connect(self._show)
        self.runner.failed.connect(lambda exc, seq: notify_error(exc))
        self.probabilities: dict[str, float] = {}
        self._workers = RunningWorkers()

        self.query = QueryField("Type a finding, e.g. necrosis", DEBOUNCE_MS)
        self.query.paused.connect(self.request)
        self.detail_box = QComboBox()
        self.detail_box.addItems(DETAILS)
        self.detail_box.setToolTip("patches: a score for every patch (weights with a patch-text head), else the "
                                   "patch attribution inside the top regions; regions: region scores only "
                                   "(4096-px windows)")
        self.detail_box.currentIndexChanged.connect(self.request)
        self.box_kind = QComboBox()
        self.box_kind.addItems(BOX_KINDS)
        self.box_kind.setToolTip("areas: the parts of the heatmap at or above the threshold, with their probability "
                                 "and share of the tissue; regions: the top regions (4096-px windows) by score")
        self.box_kind.currentIndexChanged.connect(self._paint_boxes)
        self.box_kind.currentIndexChanged.connect(self._show_status)
        self.top_k = QSpinBox(minimum=1, maximum=50, value=5)
        self.top_k.setToolTip("How many boxes (the best areas or regions); weights without a patch-text head "
                              "also explain this many regions at patch level")
        self.top_k.valueChanged.connect(self.request)
        self.opacity = QSlider(Qt.Orientation.Horizontal, minimum=0, maximum=100, value=70)
        self.opacity.valueChanged.connect(self._restyle)
        self.threshold = QSlider(Qt.Orientation.Horizontal, minimum=0, maximum=99,
                                 value=round(default_threshold(False) * 100))
        self.threshold.valueChanged.connect(self._threshold_moved)
        self.threshold_label = QLabel()
        self.threshold_label.setMinimumWidth(self.threshold_label.fontMetrics().horizontalAdvance("0.00 "))
        self.legend = HeatLegend()
        self._areas_timer = QTimer(self, singleShot=True, interval=AREAS_DELAY_MS)
        self._areas_timer.timeout.connect(self._refresh_areas)
        self.boxes_list = QListWidget()
        self.boxes_list.setMaximumHeight(110)
        self.boxes_list.setToolTip("The boxes, best first: click one to zoom to it")
        self.boxes_list.currentRowChanged.connect(lambda row: row >= 0 and self.zoom_to_box(row))
        self.pin_button = QPushButton("Pin")
        self.pin_button.setToolTip("Keep this query's heatmap as its own layer")
        self.pin_button.clicked.connect(self.pin)
        self.export_buttons = {}
        for suffix, tip in ((".png", "slide thumbnail with the heatmap blended on top and its legend"),
                            (".npz", "scores with level-0 coordinates (patches and regions) and the finding areas"),
                            (".geojson", ("the finding area outlines (and the top regions when they are shown) "
                                          "as QuPath annotations"))):
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
        form.addRow("Detail", self.detail_box)
        boxes_row = QHBoxLayout()
        boxes_row.addWidget(self.box_kind)
        boxes_row.addWidget(QLabel("top"))
        boxes_row.addWidget(self.top_k)
        form.addRow("Boxes", boxes_row)
        form.addRow("Opacity", self.opacity)
        threshold_row = QHBoxLayout()
        threshold_row.addWidget(self.threshold)
        threshold_row.addWidget(self.threshold_label)
        form.addRow("Threshold", threshold_row)
        form.addRow(self.legend)
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
        self._glyphs = glyph_loaders(viewer, LABEL_GLYPHS)
        self._glyph_timer = QTimer(self, interval=GLYPH_INTERVAL_MS)
        self._glyph_timer.timeout.connect(self._load_glyph)
        self._glyph_timer.start()
        ahead_of_need(_import_ahead)
        self._show_threshold()
        self._enable(False)

    # -------------------------------------------------------------------------------------------------- analysis
    def set_analysis(self, analysis: SlideAnalysis | None, slide_layer=None) -> None:
        self.runner.invalidate()
        self.analysis, self.slide_layer = analysis, slide_layer
        self.result, self.grid, self.areas, self.boxes = None, None, [], np.zeros((0, 4))
        self._patches_at_once = False
        self._summary = ""
        self.boxes_list.clear()
        if analysis is None:
            for name in (HEATMAP, BOXES):
                if name in self.viewer.layers:
                    self.viewer.layers.remove(name)
            self.status.setText("Analyze a slide, then type a finding.")
        else:
            self._clear_layers()
            QTimer.singleShot(0, lambda: self._make_boxes_layer(analysis))
            self.status.setText("Type a finding: the heatmap follows as you type.")
            self.request()
        self._enable(analysis is not None)

    def _clear_layers(self) -> None:
        """The heatmap layer becomes the analysed slide's patch grid, all 0 (made now when missing: napari sets it up
        while nothing else happens, not at the first query), and the boxes layer loses the last slide's boxes."""
        encoding = self.analysis.encoding
        self._paint_heatmap(score_heatmap(encoding, np.zeros(len(encoding.patch_coords)), relative=False), "")
        if BOXES in self.viewer.layers:
            self._paint_boxes()

    def _make_boxes_layer(self, analysis: SlideAnalysis) -> None:
        """The boxes layer, empty, in an event-loop turn after the heatmap's (set_analysis)."""
        if analysis is not self.analysis:
            return
        if self.slide_layer in self.viewer.layers and BOXES not in self.viewer.layers:
            self._add_boxes()
        self.layers_ready.emit()

    def _load_glyph(self) -> None:
        """One character of the box labels into the canvas font (see layers.glyph_loaders), one per timer tick."""
        if self._glyphs:
            self._glyphs.pop()()
        else:
            self._glyph_timer.stop()

    def _enable(self, on: bool) -> None:
        for widget in (self.pin_button, self.classify_button, *self.export_buttons.values()):
            widget.setEnabled(on)

    # -------------------------------------------------------------------------------------------------- grounding
    @property
    def patch_level(self) -> bool:
        return self.detail_box.currentText() == "patches"

    @property
    def threshold_value(self) -> float:
        """The threshold shown: a probability for calibrated results, else a fraction of the slide's range."""
        return self.threshold.value() / 100

    @property
    def box_kind_shown(self) -> str:
        return self.box_kind.currentText()

    def request(self, *args) -> None:
        """Ground the current text (called by the debounce timer and when the detail or top-k changes).

        With a patch-text head the patch heatmap costs what the regions cost and is asked for at once. Without one,
        region level first: it costs one text encoding, so the heatmap follows every keystroke; the patch-level
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
        self.runner.submit(_ground, self.analysis, text, self.top_k.value(),
                           self.patch_level and self._patches_at_once, self._scale())

    def _scale(self) -> tuple:
        return self.calibrated, self.threshold_value

    def _show(self, grounded: Grounded, seq: int) -> None:
        # a result queued before the slide (or the query) changed belongs to what is no longer on screen
        if seq != self.runner.latest or self.analysis is None or self.slide_layer not in self.viewer.layers:
            return
        result = grounded.result
        self._patches_at_once = self._patches_at_once or result.method == "patch_head"
        refine = self.patch_level and not grounded.patch_level
        if refine and self._patches_at_once:  # a head's patch heatmap costs nothing more: show it instead
            self.runner.submit(_ground, self.analysis, result.text, self.top_k.value(), True, self._scale())
            return
        self.result, self.grid, self.grid_patch_level = result, grounded.grid, grounded.patch_level
        if not refine:  # a region preview does not move the slider: the patch result follows at once
            self._measure(result.calibrated)
        self.areas = (grounded.areas if grounded.threshold == self.threshold_value else
                      finding_areas(self.analysis, result, self.threshold_value, grounded.patch_level,
                                    self.top_k.value()))
        self._paint_heatmap(grounded.grid, result.text)
        self._paint_boxes()
        if refine:
            self.runner.submit(_ground, self.analysis, result.text, self.top_k.value(), True, self._scale())
        level = "patch" if grounded.patch_level else "region"
        self._summary = (f"<b>{html.escape(result.text)}</b>: {html.escape(result.verdict())}<br>{level} level, "
                         f"grounded in {grounded.seconds * 1000:.0f} ms" + (" (patch level follows)" if refine else ""))
        self._show_status()
        self.heatmap_updated.emit(result.text, "patches" if grounded.patch_level else "regions")

    def _show_status(self, *args) -> None:
        """The result's verdict, level and grounding time, and with areas shown how many there are."""
        note = ""
        if self.box_kind_shown == "areas" and self.result is not None:
            value = "p" if self.result.calibrated else "score"
            count = f"{len(self.areas)} area{'s' * (len(self.areas) != 1)}" if self.areas else "no area"
            note = f"; {count} at {value} &ge; {self.threshold_value:.2f}"
        self.status.setText(self._summary + note)

    # ---------------------------------------------------------------------------------------------- heatmap layer
    def _add_heatmap(self, grid: ScoreGrid, text: str):
        scale, translate = grid_placement(grid, self.slide_layer)
        layer = self.viewer.add_image(grid.values, name=HEATMAP, scale=scale, translate=translate,
                                      colormap=heat_colormap(self.threshold_value), contrast_limits=(0.0, 1.0),
                                      opacity=self.opacity.value() / 100, blending="translucent",
                                      units=self.slide_layer.units,
                                      metadata={"pathflip_query": text})
        self.viewer.layers.selection.active = self.slide_layer
        return layer

    def _paint_heatmap(self, grid: ScoreGrid, text: str) -> None:
        if HEATMAP not in self.viewer.layers:
            self._add_heatmap(grid, text)
            return
        layer = self.viewer.layers[HEATMAP]
        scale, translate = grid_placement(grid, self.slide_layer)
        # placement first (only when the grid changed: each assignment refreshes the layer), then the data
        if not (np.allclose(layer.scale[-2:], scale) and np.allclose(layer.translate[-2:], translate)):
            layer.scale, layer.translate = scale, translate
        layer.data = grid.values
        layer.metadata["pathflip_query"] = text

    def _restyle(self, *args) -> None:
        """Opacity and colour scale of the heatmap layer (pinned layers keep the style they were pinned with) and
        the legend."""
        self.legend.show_scale(self.threshold_value, bool(self.calibrated), self.opacity.value() / 100)
        if HEATMAP in self.viewer.layers:
            layer = self.viewer.layers[HEATMAP]
            layer.opacity = self.opacity.value() / 100
            if layer.colormap.name != colormap_name(self.threshold_value):
                layer.colormap = heat_colormap(self.threshold_value)

    def _measure(self, calibrated: bool) -> None:
        """The slider measures what the result's values are: on a change of kind (the first result, other weights,
        another detail) it moves to heatmap.default_threshold of the new kind."""
        if calibrated == self.calibrated:
            return
        self.calibrated = calibrated
        self.threshold.blockSignals(True)
        self.threshold.setValue(round(default_threshold(calibrated) * 100))
        self.threshold.blockSignals(False)
        self._show_threshold()

    def _show_threshold(self) -> None:
        self.threshold_label.setText(f"{self.threshold_value:.2f}")
        self.threshold.setToolTip("Probabilities below this are transparent and outside the finding areas"
                                  if self.calibrated else
                                  "Scores below this fraction of the slide's range are transparent and outside the "
                                  "finding areas")
        self._restyle()

    def _threshold_moved(self, value: int) -> None:
        self._show_threshold()
        if self.result is not None:
            self._areas_timer.start()

    def _refresh_areas(self) -> None:
        """The finding areas at the threshold now shown, and their boxes."""
        if self.result is None or self.analysis is None:
            return
        self.areas = finding_areas(self.analysis, self.result, self.threshold_value, self.grid_patch_level,
                                   self.top_k.value())
        self._paint_boxes()
        self._show_status()

    # ------------------------------------------------------------------------------------------------ boxes layer
    def _box_rows(self) -> tuple[np.ndarray, list[str], list[str]]:
        """The boxes to show (level-0 x0, y0, x1, y1, best first), their labels (on the canvas and in the list) and
        the list's tooltips."""
        if self.result is None:
            return np.zeros((0, 4)), [], []
        if self.box_kind_shown == "areas":
            calibrated = bool(self.result.calibrated)
            boxes = np.array([area.box for area in self.areas], dtype=float).reshape(-1, 4)
            labels = [area_label(rank, area, calibrated) for rank, area in enumerate(self.areas, 1)]
            return boxes, labels, [area.describe(calibrated) for area in self.areas]
        top = self.result.top_boxes
        labels = [region_label(rank, score) for rank, score in enumerate(top[:, 4].tolist(), 1)]
        tips = [f"x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f} (level-0 px)" for x0, y0, x1, y1 in top[:, :4].tolist()]
        return top[:, :4].astype(float), labels, tips

    def _add_boxes(self):
        slide = self.slide_layer
        layer = self.viewer.add_shapes(
            [], shape_type="rectangle", name=BOXES, edge_color=BOX_COLOUR, face_color="transparent",
            edge_width=self._edge_width(), features={"label": np.array([], dtype=str)},
            text={"string": "{label}", "color": "white", "anchor": "upper_left", "size": 10},
            scale=slide.scale[-2:], translate=slide.translate[-2:], units=slide.units)
        self.viewer.layers.selection.active = slide
        return layer

    def _edge_width(self) -> float:
        return self.analysis.encoding.region_size_level0 * BOX_EDGE

    def _paint_boxes(self, *args) -> None:
        boxes, labels, tips = self._box_rows()
        self.boxes = boxes
        if self.analysis is None or self.slide_layer not in self.viewer.layers:
            return
        layer = self.viewer.layers[BOXES] if BOXES in self.viewer.layers else self._add_boxes()
        # level-0 pixel x covers [x - 0.5, x + 0.5) around its centre in the slide layer's data coordinates
        rectangles = [np.array([[y0, x0], [y1, x1]]) - 0.5 for x0, y0, x1, y1 in boxes]
        # updated in place: removing a layer costs a full garbage collection (hundreds of ms)
        if not (layer.nshapes == len(rectangles) and all(
                np.array_equal(old, new) for old, new in zip(layer.data, rectangles))):
            layer.data = [(r, "rectangle") for r in rectangles]
            layer.edge_width = self._edge_width()  # new shapes get napari's default width
        if list(layer.features["label"]) != labels:
            layer.features = {"label": np.array(labels, dtype=str)}
        self.boxes_list.blockSignals(True)
        self.boxes_list.clear()
        self.boxes_list.addItems(labels)
        for row, tip in enumerate(tips):
            self.boxes_list.item(row).setToolTip(tip)
        self.boxes_list.blockSignals(False)

    # ------------------------------------------------------------------------------------------------------ camera
    def selected_box(self) -> tuple[int, int, int, int] | None:
        """The level-0 box selected in the list (an area or a region, as shown), or None."""
        row = self.boxes_list.currentRow()
        return tuple(int(v) for v in self.boxes[row]) if 0 <= row < len(self.boxes) else None

    def zoom_to_box(self, index: int) -> None:
        zoom_to(self.viewer, self.slide_layer, self.boxes[index])

    def show_finding(self, query: str, box) -> None:
        """Show the heatmap of `query` and zoom to the level-0 `box` (a chat citation): at once when it is on
        screen, else once its heatmap is shown."""
        if self.result is not None and self.result.text == query and self.query.text().strip() == query:
            zoom_to(self.viewer, self.slide_layer, box)
            return

        def zoom(text: str, detail: str) -> None:
            if text == query:
                self.heatmap_updated.disconnect(zoom)
                zoom_to(self.viewer, self.slide_layer, box)

        self.heatmap_updated.connect(zoom)
        if self.query.text().strip() == query:  # typed already (its heatmap failed or is on its way): ask again
            self.request()
        else:
            self.query.setText(query)

    def zoom_to_region(self, index: int) -> None:
        """Zoom to the result's `index`-th best region, whichever boxes are shown."""
        zoom_to(self.viewer, self.slide_layer, self.result.top_boxes[index, :4])

    def box_at(self, world_yx) -> int | None:
        """Index of the best box shown that contains a world (y, x) point, or None."""
        if self.slide_layer is None or BOXES not in self.viewer.layers:
            return None
        for index, box in enumerate(self.boxes):
            low, high = box_world(self.slide_layer, box)
            if np.all(low <= world_yx) and np.all(world_yx < high):
                return index
        return None

    def _click_box(self, viewer, event):
        """A click (no drag) on a box zooms to it, unless the view is already inside that box."""
        if BOXES not in viewer.layers or not viewer.layers[BOXES].visible:
            return
        position = np.asarray(event.position[-2:], dtype=float)
        yield
        if event.type == "mouse_move":
            return  # a drag pans the slide as usual
        index = self.box_at(position)
        if index is None:
            return
        low, high = box_world(self.slide_layer, self.boxes[index])
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
        # the heatmap as shown: its grid, threshold and opacity, and the boxes shown
        threshold, opacity, patch_level = self.threshold_value, self.opacity.value() / 100, self.grid_patch_level
        regions = self.box_kind_shown == "regions"  # the finding areas always, the top regions when shown

        def work():
            current = result
            if suffix == ".npz" and current.patch_scores is None:  # the NPZ always carries patch scores
                with MODEL_LOCK:
                    current = analysis.ground(result.text, top_k=top_k, patch_level=True)
            return str(write_grounding(analysis, current, path, threshold, opacity, patch_level, regions=regions))

        return self._workers.keep(run_in_background(work, on_done=self._exported))

    def _exported(self, path: str) -> None:
        from napari.utils.notifications import show_info

        show_info(f"PathFLIP: wrote {path}")
        self.exported.emit(path)

    def close_down(self) -> None:
        self.runner.shutdown()
        if self._click_box in self.viewer.mouse_drag_callbacks:
            self.viewer.mouse_drag_callbacks.remove(self._click_box)
