"""The Library panel: search a slide library (napari_pathflip/library/) and open a hit in the viewer.

Choose a library folder (loaded in a worker), type a query: the search runs in a `LatestRunner` (the newest query
wins) and the ranked slides appear with thumbnails, scores and best regions. Double-clicking a hit prepares its
analysis from the library's cache in a worker, opens the slide and emits `opened(analysis, layer, query)`: the
workspace makes it the analysed slide, so Localize shows the query's heatmap, and zooms to the best region.
"Index slides..." adds a folder of slides to the library in a napari thread_worker with napari's progress bar and
Cancel (a cancelled run continues where it stopped). Loading and indexing use the workspace's PathFLIP when it was
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

from ..errors import PathflipError
from ..library import IndexSummary, Library, Table, index_slides, indexing_weights, is_library
from ..weights import WeightsFolder
from .fields import FolderField, QueryField
from .progress import RunningWorkers, TaskProgress
from .tasks import MODEL_LOCK, LatestRunner, notify_error, run_in_background

PLUGIN = "napari-pathflip"
DEBOUNCE_MS = 300  # a search reads encodings from disk: wait for a pause in the typing
ICON = 96


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

    def __init__(self, viewer, weights: Callable[[], str] | None = None, parent=None):
        """`weights`: the weights folder a new library is indexed with (the workspace passes the slide panel's)."""
        super().__init__("Library", parent)
        self.viewer = viewer
        self.weights = weights or (lambda: str(WeightsFolder.resolve()))
        self.analysis = None  # the workspace's SlideAnalysis: its PathFLIP is shared when the weights match
        self.library: Library | None = None
        self.query_text = ""
        self.hits: list = []
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
        self.status = QLabel()
        self.status.setWordWrap(True)

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
        layout.addWidget(self.similar_button)
        layout.addWidget(self.status)
        self._progressed.connect(self._show_progress)
        self._enable_search(False)

    # ------------------------------------------------------------------------------------------------------ library
    def set_analysis(self, analysis) -> None:
        """The workspace's analysed slide (or None): libraries loaded or indexed from now on use its PathFLIP when
        they were indexed with the same weights."""
        self.analysis = analysis

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
        for widget in (self.query, self.results, self.similar_button):
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

    def _show_results(self, payload, seq: int) -> None:
        query, hits, thumbnails = payload
        self.query_text, self.hits = query, hits
        self.results.clear()
        for rank, (hit, thumbnail) in enumerate(zip(hits, thumbnails), 1):
            where = (f"\nregion x {hit.box[0]}-{hit.box[2]}, y {hit.box[1]}-{hit.box[3]}: {hit.region_score:.3f}"
                     if hit.box else "")
            item = QListWidgetItem(_icon(thumbnail), f"#{rank}  {hit.score:.3f}  {hit.name}{where}")
            item.setToolTip(hit.path)
            self.results.addItem(item)
        self.status.setText(f"{len(hits)} of {len(self.library)} slides, {query}. Double-click one to open it.")
        self.results_shown.emit(query, hits)

    def _search_failed(self, exc: BaseException) -> None:
        notify_error(exc)
        self.status.setText(f"Search failed: {exc}")

    # --------------------------------------------------------------------------------------------------------- open
    def open_hit(self, index: int) -> None:
        """Open hit `index` of the list: its analysis from the library's cache (worker), then the slide layer."""
        hit, query = self.hits[index], self.query_text
        self.status.setText(f"Opening {hit.name}...")
        self._workers.keep(run_in_background(_prepare, self.library, hit.row,
                                             on_done=lambda analysis: self._show_hit(analysis, hit, query)))

    def _show_hit(self, analysis, hit, query: str) -> None:
        layer = next((layer for layer in self.viewer.layers
                      if layer.metadata.get("pathflip_slide", {}).get("path") == hit.path), None)
        if layer is None:
            try:
                layer = self.viewer.open(hit.path, plugin=PLUGIN)[0]
            except PathflipError as exc:
                notify_error(exc)
                return
        self.viewer.layers.selection.active = layer
        self.status.setText(f"Opened <b>{hit.name}</b>" + (f", showing <b>{query}</b>" if hit.box else ""))
        self.opened.emit(analysis, layer, query if hit.box else "")

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

        self._workers.keep(run_in_background(_index, slides, library, weights, self.analysis, device="cpu",
                                             progress=report, cancel=cancel, on_done=self._indexed,
                                             on_error=self._index_failed, on_finished=self._index_finished))

    def cancel(self) -> None:
        self.progress.cancel()

    def _show_progress(self, number: int, total: int, name: str, done: int, patches: int) -> None:
        self.progress.update(number)
        if name:
            detail = f": {done} / {patches} patches" if patches else ""
            self.status.setText(f"Indexing slide {number + 1} of {total}, {name}{detail}")

    def _indexed(self, summary) -> None:
        failed = "".join(f"<br>failed: {Path(path).name}: {reason}" for path, reason in summary.failed)
        state = "cancelled (run it again to continue)" if summary.cancelled else "done"
        self.status.setText(f"Indexing {state}: {len(summary.indexed)} indexed, {len(summary.skipped)} already "
                            f"there, {len(summary.failed)} failed; {summary.count} slides in the library{failed}")
        self.indexed.emit(summary)
        self.load()

    def _index_failed(self, exc: BaseException) -> None:
        notify_error(exc)
        self.status.setText(f"Indexing stopped: {exc}")

    def _index_finished(self) -> None:
        self.progress.finish()
