"""Background work for the workspace: the model never runs on the GUI thread.

`LatestRunner` serves typing: one worker thread, at most one job waiting, and only the newest request's result is
delivered, so a burst of keystrokes costs one or two model calls and a slow old query never paints over a new one.
`run_in_background` wraps napari's thread_worker for one-off jobs (analysis, classification, export, loading the chat
model) and for generators whose values stream to the GUI (a chat answer).
`ahead_of_need` runs work that is only worth having before someone asks (a model loading before Analyze, imports a
panel will need) in one background thread.
`user_message` turns any failure into a notification text that says what to do.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from qtpy.QtCore import QObject, Signal

from ..errors import PathflipError
from ..extraction import ExtractionCancelled

log = logging.getLogger(__name__)

# One PathFLIP model is shared by grounding, classification and export threads; its patch attribution toggles
# autograd, so calls into it are serialised.
MODEL_LOCK = threading.RLock()
# one job at a time: work done ahead of need never competes with itself for the cores
_AHEAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pathflip-ahead")


def ahead_of_need(fn, *args) -> Future:
    """`fn(*args)` in the background thread for work done ahead of need (after the jobs queued before it)."""
    return _AHEAD.submit(fn, *args)


class LatestRunner(QObject):
    """Runs `fn(*args)` off the GUI thread; `finished(result, seq)` / `failed(exc, seq)` fire on the GUI thread,
    only for the most recent submission."""

    finished = Signal(object, int)
    failed = Signal(object, int)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pathflip-latest")
        self._lock = threading.Lock()
        self._seq = 0
        self._running = False
        self._pending = None  # (seq, fn, args): replaced by every newer submission

    @property
    def latest(self) -> int:
        return self._seq

    def submit(self, fn, *args) -> int:
        with self._lock:
            self._seq += 1
            job = (self._seq, fn, args)
            if self._running:
                self._pending = job
                return self._seq
            self._running = True
        self._pool.submit(self._run, job)
        return job[0]

    def invalidate(self) -> None:
        """Drop whatever is queued or running (e.g. the analysis changed)."""
        with self._lock:
            self._seq += 1
            self._pending = None

    def _run(self, job) -> None:
        while job is not None:
            seq, fn, args = job
            try:
                result, error = fn(*args), None
            except Exception as exc:  # delivered to the GUI as a notification
                result, error = None, exc
            with self._lock:
                current = seq == self._seq
                job, self._pending = self._pending, None
                self._running = job is not None
            if current:
                if error is None:
                    self.finished.emit(result, seq)
                else:
                    self.failed.emit(error, seq)

    def shutdown(self) -> None:
        self.invalidate()
        self._pool.shutdown(wait=False)


class _GeneratorFailed(Exception):
    """A RuntimeError raised in a generator worker, carried out under another type: superqt takes a RuntimeError
    there for a deleted worker and drops it, with neither `errored` nor `finished` (torch raises RuntimeErrors)."""


def _raising(generator_fn):
    """`generator_fn` with its RuntimeErrors raised as _GeneratorFailed."""
    @functools.wraps(generator_fn)
    def run(*args, **kwargs):
        try:
            return (yield from generator_fn(*args, **kwargs))
        except RuntimeError as exc:
            raise _GeneratorFailed() from exc
    return run


def run_in_background(fn, *args, on_done=None, on_error=None, on_finished=None, on_yielded=None, **kwargs):
    """Start `fn(*args, **kwargs)` in a napari thread_worker; the callbacks run on the GUI thread (connected before
    the thread starts, so a fast job cannot finish unheard). Returns the worker. A generator's values go to
    `on_yielded` and its return value to `on_done`. Errors go to `on_error` (default: a notification), never back
    into the event loop as a traceback; `on_finished` runs last, also after an error or a cancel from napari's task
    list. Other keywords (e.g. `_progress`) go to napari's create_worker."""
    from napari.qt.threading import create_worker

    failed = on_error or notify_error
    connect = {"errored": lambda exc: failed(exc.__cause__ if isinstance(exc, _GeneratorFailed) else exc)}
    if inspect.isgeneratorfunction(fn):
        fn = _raising(fn)
    for signal, slot in (("returned", on_done), ("finished", on_finished), ("yielded", on_yielded)):
        if slot is not None:
            connect[signal] = slot
    return create_worker(fn, *args, _connect=connect, _start_thread=True, **kwargs)


def user_message(exc: BaseException) -> str:
    """What went wrong and what to do about it, for a notification."""
    import torch

    if isinstance(exc, ExtractionCancelled):
        return f"{exc}"
    if isinstance(exc, PathflipError):
        return str(exc)
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower():
        return ("Out of memory. Pick device 'cpu' (or a smaller batch or model), close other programs using the GPU, "
                f"then try again. ({type(exc).__name__}: {exc})")
    if isinstance(exc, OSError):
        return f"Cannot read a file: {exc}. Check that the slide and weights folders exist and are readable."
    log.error("unexpected error in a background task", exc_info=exc)  # the notification shows only the message
    return f"{type(exc).__name__}: {exc}"


def notify_error(exc: BaseException) -> None:
    from napari.utils.notifications import show_error, show_info

    if isinstance(exc, ExtractionCancelled):
        show_info(user_message(exc))
    else:
        show_error(user_message(exc))
