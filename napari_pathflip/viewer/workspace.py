"""The PathFLIP workspace (opened by `napari -w napari-pathflip`, the manifest's first widget).

It holds the slide panel (which slide, weights, encoder, device, Analyze) above Localize (type a finding, see the
heatmap), and brings up the chat dock beside itself: napari opens only the first manifest widget, so the workspace
adds the rest. One SlideAnalysis, made by the slide panel, feeds both Localize and the chat.
"""

from __future__ import annotations

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QDockWidget, QFrame, QLabel, QScrollArea, QVBoxLayout, QWidget

from .chat_dock import ChatDock
from .localize import LocalizePanel
from .slide_panel import SlidePanel

CHAT_DOCK = "PathFLIP chat"


class Workspace(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.slide = SlidePanel(napari_viewer)
        self.localize = LocalizePanel(napari_viewer)
        self.chat = ChatDock(napari_viewer)
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

        self.slide.analysis_changed.connect(self._analysis_changed)
        self._chat_dock = None
        # napari docks this widget only after constructing it: add the chat once the workspace's own dock exists,
        # so that it can join it as a tab
        QTimer.singleShot(0, self._add_chat_dock)

    # kept for callers of the session-1 widget
    @property
    def status(self):
        return self.slide.info

    @property
    def open_demo(self):
        return self.slide.open_demo

    def _add_chat_dock(self) -> None:
        window = getattr(self.viewer, "window", None)
        if window is None or not hasattr(window, "add_dock_widget") or CHAT_DOCK in window.dock_widgets:
            return  # a headless ViewerModel (the chat widget still exists, undocked), or already docked
        own_dock = self.parentWidget()
        while own_dock is not None and not isinstance(own_dock, QDockWidget):
            own_dock = own_dock.parentWidget()
        # a tab beside the workspace: each gets the full height of the right-hand side
        self._chat_dock = window.add_dock_widget(self.chat, name=CHAT_DOCK, area="right", tabify=True)
        if own_dock is not None:
            # the workspace tab in front (analysing comes first), once Qt has built the tab bar
            QTimer.singleShot(0, own_dock.raise_)

    def _analysis_changed(self, analysis) -> None:
        self.localize.set_analysis(analysis, self.slide.analysed_layer)
        self.chat.set_analysis(analysis)
