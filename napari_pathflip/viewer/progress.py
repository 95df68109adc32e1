"""Background work as a panel shows it: the workers a panel keeps until they finish, and a long task's progress
(a progress bar, napari's activity progress and Cancel)."""

from __future__ import annotations

import threading

from qtpy.QtWidgets import QProgressBar, QPushButton


class RunningWorkers:
    """A panel's running napari workers. A worker whose only reference is a local variable can be collected by
    Python before it finishes (and its results never arrive): `keep` holds it until its `finished` signal."""

    def __init__(self):
        self._workers = set()

    def keep(self, worker):
        """Hold `worker` until it finishes; returns it."""
        self._workers.add(worker)
        worker.finished.connect(lambda: self._workers.discard(worker))
        return worker


class TaskProgress:
    """The progress of a panel's long task (analysing a slide, indexing a library): `bar`, napari's progress in the
    activity dock and `cancel_button`, plus the event the worker polls to stop. The panel lays out the two widgets;
    `start_button` is disabled while the task runs."""

    def __init__(self, start_button: QPushButton):
        self.start_button = start_button
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.bar = QProgressBar()
        self.bar.setVisible(False)
        self.cancel_event: threading.Event | None = None
        self._napari = None

    @property
    def running(self) -> bool:
        return self.cancel_event is not None

    def start(self, total: int, description: str) -> threading.Event:
        """Show the task as started, with `total` steps (0: not known yet, a busy bar); returns the event that asks
        the worker to stop."""
        from napari.utils import progress

        self.cancel_event = threading.Event()
        self._napari = progress(total=total, desc=description)
        self.bar.setRange(0, max(total, 1) if total else 0)
        self.bar.setValue(0)
        self.bar.setVisible(True)
        self.start_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        return self.cancel_event

    def update(self, done: int, total: int | None = None) -> None:
        """`done` steps finished (of `total`, when it has become known or changed)."""
        if total is not None:
            self.bar.setRange(0, max(total, 1))
        self.bar.setValue(done)
        if self._napari is not None:
            if total is not None:
                self._napari.total = total
            self._napari.n = done
            self._napari.refresh()

    def cancel(self) -> None:
        if self.cancel_event is not None:
            self.cancel_event.set()

    def finish(self) -> None:
        """The task ended (done, failed or cancelled): the bar goes, the start button comes back."""
        self.cancel_event = None
        if self._napari is not None:
            self._napari.close()
            self._napari = None
        self.bar.setVisible(False)
        self.start_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
