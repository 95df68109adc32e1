"""The Library panel: search a slide library (napari_pathflip/library/) and open a hit in the viewer.

Choose a library folder (loaded in a worker), type a query: the search runs in a `LatestRunner` (the newest query
wins) and the ranked slides appear with thumbnails, scores and best regions. Double-clicking a hit prepares its
analysis from the library's cache in a worker, opens the slide and emits `opened(analysis, layer, query)`: the
workspace makes it the analysed slide, so Localize shows the query's heatmap, and zooms to the best region.
"Find similar regions" searches the library for the region drawn on a Shapes layer over the analysed slide (the
selected rectangle or polygon) or for the selected Localize box (`Library.search_region`, in a worker): the hits list
each place with a thumbnail of it, and double-clicking one opens its slide zoomed to the place, with the cosine of
each patch to the query as the "PathFLIP region similarity" layer. An opened hit reuses the slide's layer when it is
open and sits below the heatmap, boxes and similarity layers.
"Index slides..." adds a folder of slides to the library in a napari thread_worker with napari's progress bar and
Cancel (a cancelled run continues where it stopped); each slide that fails is a notification and stays listed under
"Not indexed" with what to do in the panels. Loading and indexing use the workspace's PathFLIP when it was
loaded from the library's weights (`set_analysis`), else the panel loads those weights itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from qtpy.QtCore import QSize, Signal
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import (QFileDialog, QGroupBox, QHBoxLayout, QLabel, QListWidget, QListWidgetItem,
                            QPushButton, QSpinBox, QVBoxLayout)

from ..analysis import score_heatmap
from ..errors import PathflipError
from ..library import IndexSummary, Library, Table, index_slides, indexing_weights, is_library
from ..weights import WeightsFolder
from .fields import FolderField, QueryField
from .layers import drawn_region, grid_placement, zoom_to
from .progress import RunningWorkers, TaskProgress
from .tasks import MODEL_LOCK, LatestRunner, notify_error, run_in_background

PLUGIN = "napari-pathflip"
DEBOUNCE_MS = 300  # a search reads encodings from disk: wait for a pause in the typing
ICON = 96
REGION_ICON = 64  # pixels of a region hit's thumbnail side
REGION_SIMILARITY = "PathFLIP region similarity"
OVERLAYS = ("PathFLIP heatmap", "PathFLIP boxes", REGION_SIMILARITY)  # kept above an opened slide layer


def _shared_model(analysis, weights_id: str):
    """The workspace's PathFLIP when it was loaded from weights with this content id, else None."""
    return analysis.model if analysis is not None and analysis.weights.id == weights_id else None


def _open(folder: str, analysis) -> Library:
    """Worker body: the library, on the workspace's PathFLIP (and its weights folder) when the library was indexed
    with the same weights."""
    model = _shared_model(analysis, Table(Path(folder)).attrs["weights_id"])
    return Library(folder, weights=None if model is None else analysis.weights.path, model=model)


def _index(slides: list[str], library: str, weights: str | None, analysis, **kwargs) -> IndexSummary:
    """Worker body: index_slides, on the workspace's PathFLIP when it was loaded from the weights the library is
    indexed with. No MODEL_LOCK: encoding slides only reads the model, so searches and Localize go on."""
    weights = indexing_weights(library, weights)
    return index_slides(slides, library, weights=weights, model=_shared_model(analysis, weights.id), **kwargs)


def _search(library: Library, text: str, top: int):
    """Worker body: the hits and their thumbnails."""
    with MODEL_LOCK:
        hits = library.search(text, top)
    return text, hits, [library.thumbnail(hit.row) for hit in hits]


def _similar(library: Library, row: int, top: int):
    with MODEL_LOCK:
        hits = library.like(row, top)
    return f"like {library.names[row]}", hits, [library.thumbnail(hit.row) for hit in hits]


def _region_thumbnail(path: str, box, side: int = REGION_ICON) -> np.ndarray:
    """The level-0 box of a slide as a `side`-px RGB icon, read at the coarsest level that still has the pixels."""
    from ..slide import open_slide

    x0, y0, x1, y1 = box
    with open_slide(path) as slide:
        level = slide.best_level_for_downsample(max(x1 - x0, y1 - y0) / side)
        ds = slide.downsamples[level]
        pixels = slide.read_region((x0, y0), level, (max(1, round((x1 - x0) / ds)), max(1, round((y1 - y0) / ds))))
    from skimage.transform import resize

    return (resize(pixels, (side, side), preserve_range=True, anti_aliasing=True)).astype(np.uint8)


def _regions(library: Library, query, shape, top: int):
    """Worker body: the region hits of `shape` on slide `query` (a SlideAnalysis on the library's weights, or its
    path), their thumbnails and the RegionQuery (an opened hit's heatmap is its similarity)."""
    with MODEL_LOCK:
        region = library.region_query(query, shape)
        hits = library.similar_regions(region, top)
    x0, y0, x1, y1 = region.box
    return (f"regions like x {x0}-{x1}, y {y0}-{y1}", hits, [_region_thumbnail(h.path, h.box) for h in hits],
            region)


def _advice(reason: str) -> str:
    """What to do about a slide that failed to index, in terms of the panels' own controls: the core's message
    without its command-line flags (the panel has none), plus the step that fixes it here."""
    sentences = [part for part in reason.replace("\n", " ").split(". ") if "--" not in part]
    text = ". ".join(sentences).strip().rstrip(".")
    lowered = reason.lower()
    if "weights" in lowered:
        step = "set the weights folder in the Slide panel, then index again"
    elif "memory" in lowered:
        step = "pick device 'cpu' in the Slide panel or close other programs, then index again"
    elif "patch" in lowered or "small" in lowered:
        step = "the slide is too small for the weights' patches: choose a different slides folder without it"
    else:
        step = "check that the file opens (File > Open), or choose a different slides folder without it"
    return f"{text}. What to do: {step}."


def _prepare(library: Library, row: int):
    analysis = library.analysis(row)
    with MODEL_LOCK:
        analysis.prepare()
    return analysis


def _icon(thumbnail: np.ndarray) -> QIcon:
    height, width = thumbnail.shape[:2]
    image = QImage(np.ascontiguousarray(thumbnail).data, width, height, 3 * width, QImage.Format.Format_RGB888)
    return QIcon(QPixmap.fromImage(image.copy()))  # copy: the array's memory is not Qt's


class LibraryPanel(QGroupBox):
    """Signals: `loaded(Library)`, `results_shown(query, hits)`, `opened(SlideAnalysis, layer, query)`,
    `indexed(IndexSummary)`; `_progressed` is internal (worker -> GUI)."""

    loaded = Signal(object)
    results_shown = Signal(str, list)
    opened = Signal(object, object, str)
    indexed = Signal(object)
    _progressed = Signal(int, int, str, int, int)
    _waiting = Signal(str)

    def __init__(self, viewer, weights: Callable[[], str] | None = None, localize=None, parent=None):
        """`weights`: the weights folder a new library is indexed with (the workspace passes the slide panel's);
        `localize`: the Localize panel, whose selected box is a region query when no shape is selected."""
        super().__init__("Library", parent)
        self.viewer = viewer
        self.weights = weights or (lambda: str(WeightsFolder.resolve()))
        self.localize = localize
        self.analysis = None  # the workspace's SlideAnalysis: its PathFLIP is shared when the weights match
        self.slide_layer = None  # the layer of the analysed slide (region queries are drawn over it)
        self.library: Library | None = None
        self.query_text = ""
        self.hits: list = []
        self.region = None  # the RegionQuery of the listed hits, when they are region hits
        self.runner = LatestRunner(self)
        self.runner.finished.connect(self._show_results)
        self.runner.failed.connect(lambda exc, seq: self._search_failed(exc))
        self._workers = RunningWorkers()

        folder = FolderField("Slide library folder", "Choose the library folder")
        folder.chosen.connect(lambda _: self.load())
        self.folder_edit = folder.edit
        self.folder_edit.setPlaceholderText("library folder (pathflip index ... --out FOLDER)")
        self.folder_edit.returnPressed.connect(self.load)
        self.load_button = QPushButton("Load")
        self.load_button.clicked.connect(self.load)
        self.info = QLabel("No library loaded. Choose a folder made by <b>pathflip index</b>, or index slides.")
        self.info.setWordWrap(True)
        self.index_button = QPushButton("Index slides...")
        self.index_button.setToolTip("Add a folder of slides to this library folder (only new slides are processed)")
        self.index_button.clicked.connect(lambda: self.index())
        self.progress = TaskProgress(self.index_button)
        self.query = QueryField("Search the slides, e.g. central necrosis", DEBOUNCE_MS)
        self.query.paused.connect(self.search)
        self.query.returnPressed.connect(self.search)
        self.top = QSpinBox(minimum=1, maximum=500, value=20)
        self.top.setToolTip("How many slides to list")
        self.results = QListWidget()
        self.results.setIconSize(QSize(ICON, ICON))
        self.results.setWordWrap(True)
        self.results.setMinimumHeight(3 * ICON)
        self.results.setToolTip("Double-click a slide to open it with the query's heatmap, zoomed to its best region")
        self.results.itemDoubleClicked.connect(lambda item: self.open_hit(self.results.row(item)))
        self.similar_button = QPushButton("Similar slides")
        self.similar_button.setToolTip("List the slides most like the selected one")
        self.similar_button.clicked.connect(self.similar)
        self.regions_button = QPushButton("Find similar regions")
        self.regions_button.setToolTip("Draw a rectangle or polygon on a Shapes layer over the analysed slide and "
                                       "select it (or select a Localize box): list the places most like it")
        self.regions_button.clicked.connect(self.find_regions)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.failures = QListWidget()
        self.failures.setWordWrap(True)
        self.failures.setMaximumHeight(90)
        self.failures.setToolTip("Slides the last indexing could not add, with what to do")
        self.failures_label = QLabel("<b>Not indexed</b>")
        for widget in (self.failures, self.failures_label):
            widget.setVisible(False)

        folder_row = QHBoxLayout()
        folder_row.addWidget(folder)
        folder_row.addWidget(self.load_button)
        index_row = QHBoxLayout()
        index_row.addWidget(self.index_button)
        index_row.addWidget(self.progress.cancel_button)
        query_row = QHBoxLayout()
        query_row.addWidget(self.query)
        query_row.addWidget(QLabel("top"))
        query_row.addWidget(self.top)
        layout = QVBoxLayout(self)
        layout.addLayout(folder_row)
        layout.addWidget(self.info)
        layout.addLayout(index_row)
        layout.addWidget(self.progress.bar)
        layout.addLayout(query_row)
        layout.addWidget(self.results)
        buttons = QHBoxLayout()
        buttons.addWidget(self.similar_button)
        buttons.addWidget(self.regions_button)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.failures_label)
        layout.addWidget(self.failures)
        self._progressed.connect(self._show_progress)
        self._waiting.connect(self.status.setText)
        self._enable_search(False)

    # ------------------------------------------------------------------------------------------------------ library
    def set_analysis(self, analysis, slide_layer=None) -> None:
        """The workspace's analysed slide (or None) and its layer: libraries loaded or indexed from now on use its
        PathFLIP when they were indexed with the same weights; region queries are drawn over the layer."""
        self.analysis, self.slide_layer = analysis, slide_layer

    def load(self) -> None:
        """Load the library in the folder field (the model and its table) in a worker."""
        folder = self.folder_edit.text().strip()
        if not folder:
            return
        self.info.setText(f"Loading {folder}...")
        self._workers.keep(run_in_background(_open, folder, self.analysis, on_done=self._loaded,
                                             on_error=self._load_failed))

    def _loaded(self, library: Library) -> None:
        self.runner.invalidate()
        self.library, self.hits = library, []
        self.results.clear()
        self.info.setText(f"<b>{library.folder.name}</b>: {len(library)} slides, weights {library.weights.path.name} "
                          f"({library.attrs['weights_id']}), encoder {library.attrs['encoder']}")
        self._enable_search(len(library) > 0)
        self.loaded.emit(library)
        if self.query.text().strip():
            self.search()

    def _load_failed(self, exc: BaseException) -> None:
        notify_error(exc)
        self.info.setText(f"Not loaded: {exc}")

    def _enable_search(self, on: bool) -> None:
        for widget in (self.query, self.results, self.similar_button, self.regions_button):
            widget.setEnabled(on)

    # ------------------------------------------------------------------------------------------------------- search
    def search(self, *args) -> None:
        text = self.query.text().strip()
        if not text or self.library is None:
            self.runner.invalidate()
            return
        self.status.setText(f"Searching {len(self.library)} slides for <b>{text}</b>...")
        self.runner.submit(_search, self.library, text, self.top.value())

    def similar(self) -> None:
        row = self.results.currentRow()
        if self.library is None or row < 0:
            from napari.utils.notifications import show_warning

            show_warning("Select a slide in the list first: Similar slides lists the ones most like it.")
            return
        self.runner.submit(_similar, self.library, self.hits[row].row, self.top.value())

    def find_regions(self) -> None:
        """Search the library for the query region (query_shape) of the analysed slide, in the LatestRunner."""
        from napari.utils.notifications import show_warning

        if self.library is None:
            show_warning("Load a library first: Find similar regions searches its slides.")
            return
        shape = self.query_shape()
        if shape is None:
            show_warning("Analyze a slide, draw a rectangle or polygon over it on a Shapes layer and select it (or "
                         "select a Localize box), then press Find similar regions.")
            return
        # the analysis itself when its weights are the library's (its encoding is ready), else the slide file,
        # which the library reads from its table or encodes with its own weights
        same = _shared_model(self.analysis, self.library.attrs["weights_id"]) is not None
        query = self.analysis if same else self.analysis.slide_path
        self.status.setText(f"Searching {len(self.library)} slides for regions like the one drawn...")
        self.runner.submit(_regions, self.library, query, shape, self.top.value())

    def query_shape(self):
        """The query region in level-0 px of the analysed slide (layers.drawn_region: the selected rectangle or
        polygon of a Shapes layer, else the selected Localize box); None when there is neither."""
        if self.analysis is None:
            return None
        return drawn_region(self.viewer, self.slide_layer, self.localize)

    def _show_results(self, payload, seq: int) -> None:
        query, hits, thumbnails, *region = payload
        self.query_text, self.hits, self.region = query, hits, (region[0] if region else None)
        self.results.clear()
        self.results.setIconSize(QSize(REGION_ICON, REGION_ICON) if region else QSize(ICON, ICON))
        for rank, (hit, thumbnail) in enumerate(zip(hits, thumbnails), 1):
            where = (f"\nregion x {hit.box[0]}-{hit.box[2]}, y {hit.box[1]}-{hit.box[3]}: {hit.region_score:.3f}"
                     if hit.box and not region else
                     f"\nx {hit.box[0]}-{hit.box[2]}, y {hit.box[1]}-{hit.box[3]}" if hit.box else "")
            item = QListWidgetItem(_icon(thumbnail), f"#{rank}  {hit.score:.3f}  {hit.name}{where}")
            item.setToolTip(hit.path)
            self.results.addItem(item)
        what = "places" if region else "slides"
        self.status.setText(f"{len(hits)} {what} of {len(self.library)} slides, {query}. Double-click one to open "
                            "it.")
        self.results_shown.emit(query, hits)

    def _search_failed(self, exc: BaseException) -> None:
        notify_error(exc)
        self.status.setText(f"Search failed: {exc}")

    # --------------------------------------------------------------------------------------------------------- open
    def open_hit(self, index: int) -> None:
        """Open hit `index` of the list: its analysis from the library's cache (worker), then the slide layer."""
        hit, query, region = self.hits[index], self.query_text, self.region
        self.status.setText(f"Opening {hit.name}...")
        self._workers.keep(run_in_background(_prepare, self.library, hit.row,
                                             on_done=lambda analysis: self._show_hit(analysis, hit, query, region)))

    def slide_layer_of(self, path: str, fingerprint: str | None):
        """The open layer of a slide (same content fingerprint, or same path), or None."""
        for layer in self.viewer.layers:
            info = layer.metadata.get("pathflip_slide") or {}
            if info and ((fingerprint and info.get("fingerprint") == fingerprint) or info.get("path") == path):
                return layer
        return None

    def _below_overlays(self, layer) -> None:
        """Move the slide layer just below the lowest heatmap / boxes / similarity layer, so they show over it."""
        layers = self.viewer.layers
        overlays = [layers.index(name) for name in OVERLAYS if name in layers]
        at = layers.index(layer)
        if overlays and at > min(overlays):
            layers.move(at, min(overlays))

    def _show_hit(self, analysis, hit, query: str, region=None) -> None:
        fingerprint = self.library.fingerprints[hit.row] if self.library is not None else None
        layer = self.slide_layer_of(hit.path, fingerprint)
        if layer is None:
            try:
                layer = self.viewer.open(hit.path, plugin=PLUGIN)[0]
            except PathflipError as exc:
                notify_error(exc)
                return
        self._below_overlays(layer)
        self.viewer.layers.selection.active = layer
        if region is not None:
            self.status.setText(f"Opened <b>{hit.name}</b> at the place like the query ({hit.score:.3f})")
            self.opened.emit(analysis, layer, "")
            self._paint_similarity(analysis, layer, hit, region)
            zoom_to(self.viewer, layer, hit.box)
            return
        self.status.setText(f"Opened <b>{hit.name}</b>" + (f", showing <b>{query}</b>" if hit.box else ""))
        self.opened.emit(analysis, layer, query if hit.box else "")

    def _paint_similarity(self, analysis, layer, hit, region) -> None:
        """The cosine of each patch of the hit's slide to the query region, as an Image layer over the slide layer
        (placed as Localize places its heatmap)."""
        from .localize import heat_colormap

        grid = score_heatmap(analysis.encoding, self.library.region_similarity(hit.row, region))
        values = grid.values
        scale, translate = grid_placement(grid, layer)
        if REGION_SIMILARITY in self.viewer.layers:
            heat = self.viewer.layers[REGION_SIMILARITY]
            heat.scale, heat.translate, heat.data = scale, translate, values
        else:
            heat = self.viewer.add_image(values, name=REGION_SIMILARITY, scale=scale, translate=translate,
                                         colormap=heat_colormap(), blending="translucent", opacity=0.6,
                                         contrast_limits=(0.2, 1.0), units=layer.units)
        heat.metadata["pathflip_region"] = {"slide": hit.path, "box": hit.box, "query": region.box}
        self._below_overlays(layer)
        self.viewer.layers.selection.active = layer


    # -------------------------------------------------------------------------------------------------------- index
    @property
    def indexing(self) -> bool:
        return self.progress.running

    def index(self, slides_folder: str | None = None) -> None:
        """Index the slides of a folder (asks which when None) into the library folder, in a worker."""
        from napari.utils.notifications import show_warning

        from ..extraction import collect_slides

        library = self.folder_edit.text().strip()
        if not library:
            show_warning("Type or choose the library folder first (a new folder makes a new library).")
            return
        if self.indexing:
            return
        if slides_folder is None:
            slides_folder = QFileDialog.getExistingDirectory(self, "Folder of slides to index")
            if not slides_folder:
                return
        slides = collect_slides([slides_folder])
        weights = None if is_library(library) else self.weights()  # an existing library: the weights it records
        cancel = self.progress.start(len(slides), f"PathFLIP: indexing {len(slides)} slides")
        self.status.setText(f"Indexing {len(slides)} slides into {library}...")

        def report(number: int, total: int, name: str, done: int, patches: int) -> None:  # worker thread
            self._progressed.emit(number, total, name, done, patches)

        def waiting(message: str) -> None:  # worker thread
            self._waiting.emit(f"Waiting: {message}")

        self.failures.clear()
        self._workers.keep(run_in_background(_index, slides, library, weights, self.analysis, device="cpu",
                                             progress=report, cancel=cancel, on_wait=waiting, on_done=self._indexed,
                                             on_error=self._index_failed, on_finished=self._index_finished))

    def cancel(self) -> None:
        self.progress.cancel()

    def _show_progress(self, number: int, total: int, name: str, done: int, patches: int) -> None:
        self.progress.update(number)
        if name:
            detail = f": {done} / {patches} patches" if patches else ""
            self.status.setText(f"Indexing slide {number + 1} of {total}, {name}{detail}")

    def _indexed(self, summary) -> None:
        from napari.utils.notifications import show_warning

        for path, reason in summary.failed:
            text = f"{Path(path).name}: {_advice(reason)}"
            show_warning(f"PathFLIP could not index {text}")
            item = QListWidgetItem(text)
            item.setToolTip(f"{path}\n{reason}")
            self.failures.addItem(item)
        for widget in (self.failures, self.failures_label):
            widget.setVisible(self.failures.count() > 0)
        failed = ", ".join(Path(path).name for path, _ in summary.failed)
        state = "cancelled (run it again to continue)" if summary.cancelled else "done"
        self.status.setText(f"Indexing {state}: {len(summary.indexed)} indexed, {len(summary.skipped)} already "
                            f"there, {len(summary.failed)} failed; {summary.count} slides in the library"
                            + (f" (not indexed: {failed}, listed below)" if failed else ""))
        self.indexed.emit(summary)
        self.load()

    def _index_failed(self, exc: BaseException) -> None:
        notify_error(exc)
        self.status.setText(f"Indexing stopped: {exc}")

    def _index_finished(self) -> None:
        self.progress.finish()
