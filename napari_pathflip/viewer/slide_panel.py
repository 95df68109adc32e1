"""The slide panel: which slide is analysed, with which weights/encoder/device, and the Analyze step.

Analyze = `SlideAnalysis.prepare` (patch features, then the slide encoding, both cached on disk) in a napari
thread_worker, with napari progress and Cancel, its steps and their counts in the status line; `analysis_changed`
carries the ready SlideAnalysis (or None when the analysed slide layer goes away) to Localize and the chat dock.
The weights load ahead of Analyze: the model's code is imported in a background thread when the panel is made, and
as soon as a slide is open (and again when the weights folder or device changes) that thread loads the PathFLIP and
runs its text tower once, so that Analyze usually finds it ready.
"""

from __future__ import annotations

import html
import os
import time
from concurrent.futures import Future
from pathlib import Path

from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit,
                            QPushButton, QVBoxLayout)

from ..analysis import SlideAnalysis, load_model
from ..encoders import ENCODER_HELP
from ..errors import PathflipError
from ..weights import DEVICES, WeightsFolder, default_cache_dir
from .fields import FolderField
from .progress import TaskProgress
from .tasks import ahead_of_need, notify_error, run_in_background

# what Analyze does, in order; the status line says which step runs ("step 2 of 4") with its count and time
ANALYZE_STEPS = ("loading the weights", "finding the tissue", "extracting patch features", "encoding the slide")
PRELOAD_DELAY_MS = 500  # the weights load once the folder field has rested this long (not on every keystroke)
WARM_UP_TEXT = "tissue"  # run through the text tower once after loading: its first call pays for lazy set-up


def slide_info(layer) -> dict | None:
    """The slide description viewer/layers.py stores on a slide layer, or None for other layers."""
    return getattr(layer, "metadata", {}).get("pathflip_slide") if layer is not None else None


def describe_slide(name: str, info: dict) -> str:
    w, h = info["dimensions"]
    if info["mpp"]:
        mpp = f"{info['mpp'][0]:.3f} um/px ({info['mpp_source']})"
    else:
        mpp = "unknown: pixel units" + (f" ({html.escape(info['mpp_note'])})" if info.get("mpp_note") else "")
    power = f"{info['objective_power']:g}x" if info["objective_power"] else "not recorded in the file"
    reader = f", read with {info['backend']}" if info.get("backend") else ""
    return (f"<b>{html.escape(name)}</b><br>{w} x {h} px, {len(info['level_dimensions'])} levels "
            f"({info['native_levels']} in the file{reader})<br>mpp: {mpp}<br>objective: {power}")


def _import_model() -> None:
    """Background body when the panel is made: the model's code, with transformers (1-2 s of imports that hold the
    interpreter lock, so the GUI thread stutters while they run), before any slide is open; a preload then only
    reads weights."""
    from .. import model  # noqa: F401


def _load_model(weights: str | None, device: str):
    """Preload body: the weights' PathFLIP on `device`, its text tower run once."""
    import torch

    model = load_model(WeightsFolder.resolve(weights), device=device)
    with torch.no_grad():
        model.encode_text([WARM_UP_TEXT])
    return model


def _weights_key(weights: str | None, device: str) -> tuple:
    """What a loaded model stands for: the folder, the device and the version of each file in the folder (weights
    written again in place load again)."""
    folder = WeightsFolder.resolve(weights).path
    try:
        files = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder)
                             if e.is_file()))
    except OSError:
        files = ()
    return str(folder.resolve()), device, files


def _analyse(slide_path, weights, cache_dir, encoder, device, model: Future, step, progress, cancel) -> SlideAnalysis:
    """Worker body: wait for the weights' model (`model`, loading in the preload thread or loaded), then extract +
    encode (or read both caches). `step(i)` says that ANALYZE_STEPS[i] begins; extraction counts go to `progress`,
    and its last count (all patches) begins the encoding."""
    step(0)
    analysis = SlideAnalysis(slide_path, weights, cache_dir, encoder or None, device, model=model.result())
    step(1)
    analysis.prepare(progress=progress, cancel=cancel)
    return analysis


class SlidePanel(QGroupBox):
    """Signals: `analysis_changed(SlideAnalysis | None)`; `_progressed(done, total)` is internal (worker -> GUI)."""

    analysis_changed = Signal(object)
    _progressed = Signal(int, int)
    _stepped = Signal(int)

    def __init__(self, viewer, parent=None):
        super().__init__("Slide", parent)
        self.viewer = viewer
        self.analysis: SlideAnalysis | None = None
        self.analysed_layer = None
        self.cache_dir: Path = default_cache_dir()
        self.worker = None
        self._extracted_now = False
        self._model: tuple[tuple, Future] | None = None  # (key, the model loading or loaded for it)
        self._step: tuple[int, str, float] | None = None  # Analyze's step now: (index, count, started)
        self._step_clock = QTimer(self, interval=500)  # the step's time in the status line
        self._step_clock.timeout.connect(self._show_step)
        self._preload_timer = QTimer(self, singleShot=True, interval=PRELOAD_DELAY_MS)
        self._preload_timer.timeout.connect(self.preload)

        self.open_demo = QPushButton("Open demo slide")
        self.open_demo.setToolTip("The synthetic demo slide bundled with the plugin (also in File > Open Sample)")
        self.open_demo.clicked.connect(self.load_demo)
        self.layer_box = QComboBox()
        self.layer_box.setToolTip("The slide layer to analyse; follows the selected slide layer")
        self.info = QLabel()
        self.info.setWordWrap(True)
        self.info.setTextFormat(Qt.TextFormat.RichText)  # always: a text without tags would show "&gt;" as is
        weights_field = FolderField("PathFLIP weights folder", "Choose the weights folder",
                                    str(WeightsFolder.resolve()))
        self.weights_edit = weights_field.edit
        self.weights_edit.setToolTip("PathFLIP weights folder (config.json + model.safetensors)")
        self.weights_edit.textChanged.connect(self._update_encoder_hint)
        self.weights_edit.textChanged.connect(self._preload_timer.start)
        self.encoder_edit = QLineEdit()
        self.encoder_edit.setToolTip("Patch encoder; empty = the one recorded with the weights.\n" + ENCODER_HELP)
        self.device_box = QComboBox()
        self.device_box.addItems(DEVICES)
        self.device_box.currentIndexChanged.connect(self._preload_timer.start)
        self.analyze_button = QPushButton("Analyze")
        self.analyze_button.setToolTip("Extract patch features and encode the slide (cached: instant next time)")
        self.analyze_button.clicked.connect(self.analyze)
        self.progress = TaskProgress(self.analyze_button)
        self.status = QLabel()
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Slide layer", self.layer_box)
        form.addRow("Weights", weights_field)
        form.addRow("Encoder", self.encoder_edit)
        form.addRow("Device", self.device_box)
        buttons = QHBoxLayout()
        buttons.addWidget(self.analyze_button)
        buttons.addWidget(self.progress.cancel_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.open_demo)
        layout.addWidget(self.info)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress.bar)
        layout.addWidget(self.status)

        self._progressed.connect(self._show_progress)
        self._stepped.connect(self._begin_step)
        self.layer_box.currentIndexChanged.connect(self._show_layer)
        viewer.layers.events.inserted.connect(self._refresh_layers)
        viewer.layers.events.removed.connect(self._layer_removed)
        viewer.layers.events.renamed.connect(self._refresh_layers)
        viewer.layers.selection.events.active.connect(self._follow_selection)
        self._update_encoder_hint()
        ahead_of_need(_import_model)
        self._refresh_layers()
        self._set_status()

    # ------------------------------------------------------------------------------------------------ slide layers
    def slide_layers(self) -> list:
        return [layer for layer in self.viewer.layers if slide_info(layer)]

    @property
    def current_layer(self):
        name = self.layer_box.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _refresh_layers(self, event=None) -> None:
        current = self.layer_box.currentText()
        names = [layer.name for layer in self.slide_layers()]
        self.layer_box.blockSignals(True)
        self.layer_box.clear()
        self.layer_box.addItems(names)
        active = self.viewer.layers.selection.active
        preferred = active.name if slide_info(active) else current
        if preferred in names:
            self.layer_box.setCurrentText(preferred)
        self.layer_box.blockSignals(False)
        self._show_layer()

    def _follow_selection(self, event=None) -> None:
        active = self.viewer.layers.selection.active
        if slide_info(active) and active.name != self.layer_box.currentText():
            self.layer_box.setCurrentText(active.name)

    def _layer_removed(self, event) -> None:
        if self.analysed_layer is not None and event.value == self.analysed_layer:  # layers may be proxies
            self.cancel()
            self.analysis, self.analysed_layer = None, None
            self.analysis_changed.emit(None)
            self._set_status()
        self._refresh_layers()

    def _show_layer(self, index=None) -> None:
        layer = self.current_layer
        self.info.setText(describe_slide(layer.name, slide_info(layer)) if layer else
                          "No slide open. Open one (File &gt; Open) or the demo slide.")
        self._set_status()
        if layer is not None:
            self._preload_timer.start()

    def load_demo(self) -> None:
        try:
            self.viewer.open_sample("napari-pathflip", "demo_slide")
        except PathflipError as exc:
            notify_error(exc)

    # ---------------------------------------------------------------------------------------------- weights, device
    def _update_encoder_hint(self, text=None) -> None:
        try:
            name = WeightsFolder(Path(self.weights_edit.text())).encoder
        except PathflipError as exc:
            name = f"unreadable ({exc})"
        self.encoder_edit.setPlaceholderText(f"from the weights: {name}")

    def preload(self) -> Future | None:
        """The model of the weights and device chosen, loading in the background (started now unless it is loaded,
        loading, or its load failed for an unchanged folder); None when no slide is open (nothing to analyse yet).
        Analyze waits for it; a failed load raises there, as a notification."""
        self._preload_timer.stop()
        if self.current_layer is None:
            return None
        weights, device = self.weights_edit.text() or None, self.device_box.currentText()
        key = _weights_key(weights, device)
        if self._model is None or self._model[0] != key or (
                self._model[1].done() and self._model[1].exception() is not None):
            self._model = key, ahead_of_need(_load_model, weights, device)
        return self._model[1]

    # ------------------------------------------------------------------------------------------------------ analyze
    @property
    def running(self) -> bool:
        return self.worker is not None

    def analyze(self) -> None:
        from napari.utils.notifications import show_warning

        layer = self.current_layer
        if layer is None:
            show_warning("Open a slide first (File > Open, or 'Open demo slide'), then press Analyze.")
            return
        if self.running:
            return
        model = self.preload()
        cancel = self.progress.start(0, f"PathFLIP: analysing {layer.name}")
        self._extracted_now = False
        self._started = time.perf_counter()
        self._begin_step(0)
        self._step_clock.start()

        def report(done: int, total: int) -> None:  # extraction thread; the signal queues it to the GUI thread
            self._progressed.emit(done, total)

        self.worker = run_in_background(
            _analyse, slide_info(layer)["path"], self.weights_edit.text() or None, self.cache_dir,
            self.encoder_edit.text().strip(), self.device_box.currentText(), model, self._stepped.emit, report,
            cancel, on_done=lambda analysis, layer=layer: self._ready(analysis, layer), on_error=self._failed,
            on_finished=self._finished)

    def cancel(self) -> None:
        self.progress.cancel()

    def _begin_step(self, index: int, count: str = "") -> None:
        if index == 0 and self._model is not None:
            key, model = self._model
            count = ("loaded in the background" if model.done() else
                     f"{sum(size for _, size, _ in key[2]) / 2**20:.0f} MB")
        if self._step is None or self._step[0] != index:
            self._step = index, count, time.perf_counter()
        else:
            self._step = index, count, self._step[2]
        self._show_step()

    def _show_step(self) -> None:
        if self._step is None or not self.running:
            return
        index, count, started = self._step
        layer = self.current_layer
        self.status.setText(f"Analysing <b>{html.escape(layer.name if layer else '')}</b>, step {index + 1} of "
                            f"{len(ANALYZE_STEPS)}: {ANALYZE_STEPS[index]}{', ' + count if count else ''}, "
                            f"{time.perf_counter() - started:.0f} s...")

    def _show_progress(self, done: int, total: int) -> None:
        if done < total:
            self._extracted_now = True
        self.progress.update(done, total)
        if done < total:
            self._begin_step(2, f"{done} / {total} patches")
        else:  # the features are complete (extracted or from the cache): the slide's encoding follows
            self._begin_step(3, f"{total} patches")

    def _ready(self, analysis: SlideAnalysis, layer) -> None:
        self._step = None
        if layer not in self.viewer.layers:  # the slide was closed while it was being analysed
            return
        self.analysis, self.analysed_layer = analysis, layer
        self._set_status(time.perf_counter() - self._started)
        self.analysis_changed.emit(analysis)

    def adopt(self, analysis: SlideAnalysis, layer) -> None:
        """Make an analysis prepared elsewhere (the Library panel opens hits from its cache) the analysed slide."""
        self.cancel()
        self.layer_box.setCurrentText(layer.name)
        self.weights_edit.setText(str(analysis.weights))
        self._extracted_now = False
        self.analysis, self.analysed_layer = analysis, layer
        self._set_status()
        self.analysis_changed.emit(analysis)

    def _failed(self, exc: BaseException) -> None:
        self._step = None
        notify_error(exc)
        self.status.setText(f"Analysis stopped: {exc}")

    def _finished(self) -> None:
        self.worker = None
        self._step = None
        self._step_clock.stop()
        self.progress.finish()

    def _set_status(self, seconds: float | None = None) -> None:
        analysis = self.analysis
        if analysis is None:
            self.status.setText("Not analysed yet. <b>Analyze</b> extracts patch features and encodes the slide "
                                f"once; both are cached in {self.cache_dir}.")
            return
        encoding = analysis.encoding
        source = "extracted now" if self._extracted_now else "read from the cache"
        took = f" in {seconds:.1f} s" if seconds is not None else ""
        self.status.setText(
            f"<b>Analysed: {self.analysed_layer.name}</b><br>features {source}{took} "
            f"({len(encoding.patch_coords)} patches, {encoding.num_regions} regions)<br>"
            f"model: {analysis.weights.path.name} ({analysis.weights}), encoder {analysis.encoder}<br>"
            f"device: {analysis.model.device}")
