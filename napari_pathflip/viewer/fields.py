"""Input fields the panels share: a query that runs as the user types, and a folder typed or chosen."""

from __future__ import annotations

from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QLineEdit, QPushButton, QWidget


class QueryField(QLineEdit):
    """A line edit whose `paused` signal fires once typing has stopped for `delay_ms`: a burst of keystrokes asks
    once. Enter is `returnPressed`, as for any line edit."""

    paused = Signal()

    def __init__(self, placeholder: str, delay_ms: int, parent=None):
        super().__init__(parent)
        self.setPlaceholderText(placeholder)
        self.setClearButtonEnabled(True)
        self._pause = QTimer(self, singleShot=True, interval=delay_ms)
        self._pause.timeout.connect(self.paused)
        self.textChanged.connect(self._pause.start)


class FolderField(QWidget):
    """A folder path in `edit`, typed or chosen with the "..." button (`tooltip`; a folder dialog titled `title`);
    `chosen` fires with the folder once the dialog has put it in the field."""

    chosen = Signal(str)

    def __init__(self, title: str, tooltip: str, text: str = "", parent=None):
        super().__init__(parent)
        self.title = title
        self.edit = QLineEdit(text)
        browse = QPushButton("...")
        browse.setMaximumWidth(32)
        browse.setToolTip(tooltip)
        browse.clicked.connect(self.browse)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.edit)
        row.addWidget(browse)

    def browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, self.title, self.edit.text())
        if folder:
            self.edit.setText(folder)
            self.chosen.emit(folder)
