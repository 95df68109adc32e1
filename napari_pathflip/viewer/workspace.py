"""The PathFLIP workspace dock (opened by `napari -w napari-pathflip`).

For now it holds the slide panel: open the demo slide, and see what the selected slide is (levels, mpp, source).
Localize and chat panels join it as their core parts land.
"""

from __future__ import annotations

from qtpy.QtWidgets import QLabel, QPushButton, QVBoxLayout, QWidget

from ..errors import PathflipError


class Workspace(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.setLayout(QVBoxLayout())
        title = QLabel("<b>PathFLIP workspace</b><br>Whole-slide viewer. Open a slide (File &gt; Open) or the demo.")
        title.setWordWrap(True)
        self.open_demo = QPushButton("Open demo slide")
        self.open_demo.clicked.connect(self.load_demo)
        self.status = QLabel()
        self.status.setWordWrap(True)
        for widget in (title, self.open_demo, self.status):
            self.layout().addWidget(widget)
        self.layout().addStretch()
        self.viewer.layers.selection.events.active.connect(self._show_active)
        self._show_active()

    def load_demo(self) -> None:
        from napari.utils.notifications import show_error

        try:
            self.viewer.open_sample("napari-pathflip", "demo_slide")
        except PathflipError as exc:
            show_error(str(exc))

    def _show_active(self, event=None) -> None:
        layer = self.viewer.layers.selection.active
        info = getattr(layer, "metadata", {}).get("pathflip_slide") if layer is not None else None
        if not info:
            self.status.setText("No slide selected.")
            return
        w, h = info["dimensions"]
        mpp = f"{info['mpp'][0]:.3f} um/px ({info['mpp_source']})" if info["mpp"] else "unknown: pixel units"
        power = f"{info['objective_power']:g}x" if info["objective_power"] else "not recorded in the file"
        self.status.setText(
            f"<b>{layer.name}</b><br>{w} x {h} px, {len(info['level_dimensions'])} levels "
            f"({info['native_levels']} in the file)<br>mpp: {mpp}<br>objective: {power}"
        )
