"""The PathFLIP workspace (opened by `napari -w napari-pathflip`, the manifest's first widget).

It holds the slide panel (which slide, weights, encoder, device, Analyze) above Localize (type a finding, see the
heatmap), and brings up the chat and library docks beside itself: napari opens only the first manifest widget, so
the workspace adds the rest. One SlideAnalysis, made by the slide panel (or opened from the library), feeds both
Localize and the chat. The chat dock gets a new analysis once Localize has shown a heatmap and then nothing new
for CHAT_AFTER_MS, or at once when its tab is shown: loading the chat model imports and reads for seconds, and doing
that while the first query is typed stalled the viewer (the loading thread takes the interpreter lock and the cores
the GUI thread needs).
"""

from __future__ import annotations

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QDockWidget, QFrame, QLabel, QScrollArea, QVBoxLayout, QWidget

from .chat_dock import ChatDock
from .library_panel import LibraryPanel
from .localize import LocalizePanel
from .slide_panel import SlidePanel

CHAT_DOCK = "PathFLIP chat"
CHAT_AFTER_MS = 2000
LIBRARY_DOCK = "PathFLIP library"


class Workspace(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.slide = SlidePanel(napari_viewer)
        self.localize = LocalizePanel(napari_viewer)
        self.chat = ChatDock(napari_viewer)
        self.library = LibraryPanel(napari_viewer, weights=self.slide.weights_edit.text, localize=self.localize)
        title = QLabel("<b>PathFLIP</b>: open a slide, press Analyze, then type a finding to see where it is.")
        title.setWordWrap(True)

        body = QWidget()
        column = QVBoxLayout(body)
        column.setContentsMargins(0, 0, 0, 0)
        for widget in (title, self.slide, self.localize):
            column.addWidget(widget)
        column.addStretch()
        # the panels are taller than a small screen: scroll rather than squeeze
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(body)
        QVBoxLayout(self).addWidget(scroll)
        self.layout().setContentsMargins(0, 0, 0, 0)

        self._chat_pending = False  # the chat dock has yet to get the analysed slide (see _give_chat)
        self._chat_timer = QTimer(self, singleShot=True, interval=CHAT_AFTER_MS)
        self._chat_timer.timeout.connect(self._give_chat)
        self.slide.analysis_changed.connect(self._analysis_changed)
        self.localize.heatmap_updated.connect(self._chat_timer.start)
        self.library.opened.connect(self._library_opened)
        # napari docks this widget only after constructing it: add the chat and the library once the workspace's
        # own dock exists, so that they can join it as tabs
        QTimer.singleShot(0, self._add_docks)

    def _add_docks(self) -> None:
        window = getattr(self.viewer, "window", None)
        if window is None or not hasattr(window, "add_dock_widget") or CHAT_DOCK in window.dock_widgets:
            return  # a headless ViewerModel (the widgets still exist, undocked), or already docked
        own_dock = self.parentWidget()
        while own_dock is not None and not isinstance(own_dock, QDockWidget):
            own_dock = own_dock.parentWidget()
        # tabs beside the workspace: each gets the full height of the right-hand side
        for name, widget in ((CHAT_DOCK, self.chat), (LIBRARY_DOCK, self.library)):
            dock = window.add_dock_widget(widget, name=name, area="right", tabify=True)
            if widget is self.chat:
                dock.visibilityChanged.connect(lambda shown: shown and self._give_chat())
        if own_dock is not None:
            # the workspace tab in front (analysing comes first), once Qt has built the tab bar
            QTimer.singleShot(0, own_dock.raise_)

    def _library_opened(self, analysis, layer, query: str) -> None:
        """A library hit: the analysed slide; Localize shows the query's heatmap and zooms to its best region."""
        if query:
            def zoom(text: str, detail: str) -> None:
                if text == query:
                    self.localize.heatmap_updated.disconnect(zoom)
                    self.localize.zoom_to_region(0)  # the hit's best region

            self.localize.heatmap_updated.connect(zoom)
            self.localize.query.setText(query)
        self.slide.adopt(analysis, layer)

    def _analysis_changed(self, analysis) -> None:
        self.localize.set_analysis(analysis, self.slide.analysed_layer)
        # the library shares the loaded model when the weights are the same, and takes region queries over the layer
        self.library.set_analysis(analysis, self.slide.analysed_layer)
        self._chat_pending = True
        # shown now (isVisible() is True for a tab behind others too)
        if analysis is None or not self.chat.visibleRegion().isEmpty():
            self._give_chat()

    def _give_chat(self, *args) -> None:
        """The chat dock gets the analysed slide when it has yet to (its model loads then)."""
        if self._chat_pending:
            self._chat_pending = False
            self.chat.set_analysis(self.slide.analysis)
