"""The PathFLIP workspace (opened by `napari -w napari-pathflip`, the manifest's first widget).

It holds the slide panel (which slide, weights, encoder, device, Analyze) above Localize (type a finding, see the
heatmap), and brings up the chat and library docks beside itself: napari opens only the first manifest widget, so
the workspace adds the rest. The chat sits beside the workspace (its own column, so an answer is read beside the
heatmap it cites); the library is a tab behind the workspace. One SlideAnalysis, made by the slide panel (or opened
from the library), feeds both Localize and the chat. The chat dock gets a new analysis CHAT_AFTER_MS after the
analysis or the last heatmap, whichever is later: loading the chat model imports and reads for seconds, and doing
that while the first query is typed stalled the viewer (the loading thread takes the interpreter lock and the cores
the GUI thread needs). A citation clicked in the chat shows its finding's heatmap in Localize and zooms to its best
box; "here" questions are about the shape drawn or the Localize box selected (layers.drawn_region).
"""

from __future__ import annotations

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QDockWidget, QFrame, QLabel, QScrollArea, QVBoxLayout, QWidget

from .chat_dock import ChatDock
from .layers import drawn_region
from .library_panel import LibraryPanel
from .localize import LocalizePanel
from .slide_panel import SlidePanel

CHAT_DOCK = "PathFLIP chat"
CHAT_AFTER_MS = 2000
LIBRARY_DOCK = "PathFLIP library"
DOCK_WIDTH, CHAT_WIDTH = 390, 360  # px of the workspace and of the chat column beside it: the canvas keeps the rest


def _dock_of(widget: QWidget) -> QDockWidget | None:
    """The Qt dock widget holding `widget` (napari hands out proxies of its own)."""
    while widget is not None and not isinstance(widget, QDockWidget):
        widget = widget.parentWidget()
    return widget


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
        self.chat.cited.connect(self._show_cited)
        self.chat.region_source = lambda: drawn_region(self.viewer, self.slide.analysed_layer, self.localize)
        # napari docks this widget only after constructing it: add the chat and the library once the workspace's
        # own dock exists, so that they can join it as tabs
        QTimer.singleShot(0, self._add_docks)

    def _add_docks(self) -> None:
        window = getattr(self.viewer, "window", None)
        if window is None or not hasattr(window, "add_dock_widget") or CHAT_DOCK in window.dock_widgets:
            return  # a headless ViewerModel (the widgets still exist, undocked), or already docked
        own_dock = _dock_of(self)
        window.add_dock_widget(self.chat, name=CHAT_DOCK, area="right", tabify=False)
        window.add_dock_widget(self.library, name=LIBRARY_DOCK, area="right", tabify=False)
        chat, library = _dock_of(self.chat), _dock_of(self.library)
        if own_dock is not None and chat is not None and library is not None:
            # the chat in a column of its own beside the workspace (not a tab behind it), the library a tab behind
            # the workspace, which stays in front once Qt has built the tab bar
            main = own_dock.parentWidget()
            main.splitDockWidget(own_dock, chat, Qt.Orientation.Horizontal)
            main.tabifyDockWidget(own_dock, library)
            QTimer.singleShot(0, own_dock.raise_)
            # once the window has its size: widths before then are overridden by the first layout
            QTimer.singleShot(0, lambda: main.resizeDocks([own_dock, chat], [DOCK_WIDTH, CHAT_WIDTH],
                                                          Qt.Orientation.Horizontal))

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
        if analysis is None:
            self._give_chat()
        else:
            self._chat_timer.start()

    def _show_cited(self, evidence) -> None:
        """A citation clicked in the chat: its finding's heatmap, zoomed to its best box."""
        if evidence.boxes:
            self.localize.show_finding(evidence.query, evidence.boxes[0].box)
        else:
            self.localize.query.setText(evidence.query)

    def _give_chat(self, *args) -> None:
        """The chat dock gets the analysed slide when it has yet to (its model loads then)."""
        if self._chat_pending:
            self._chat_pending = False
            self.chat.set_analysis(self.slide.analysis)
