"""Layer data for slides: what napari needs to show an open Slide."""

from __future__ import annotations

import threading
import time

from ..errors import PathflipError
from ..slide import Slide


class _TileErrorNotifier:
    """Shows a damaged-tile error as a napari notification, at most once every `interval` seconds per slide."""

    def __init__(self, interval: float = 10.0):
        self.interval, self._last, self._lock = interval, 0.0, threading.Lock()

    def __call__(self, error: PathflipError) -> None:
        from napari.utils.notifications import show_error

        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval:
                return
            self._last = now
        show_error(f"{error} Damaged tiles are shown grey.")


def slide_layer_data(slide: Slide, name: str | None = None) -> tuple:
    """A napari LayerData tuple for the slide's multiscale pyramid, in micrometres when the mpp is known.

    The levels are plain array-likes, not dask arrays: napari's dask cache (which grows while panning a gigapixel
    slide) never holds them, and nothing imports dask.array on the way to the first frame."""
    kwargs = {
        "name": name or slide.name,
        "multiscale": True,
        "rgb": True,
        "contrast_limits": (0, 255),
        "metadata": {"pathflip_slide": slide.metadata()},
    }
    if slide.mpp is not None:
        kwargs["scale"] = (slide.mpp[1], slide.mpp[0])
        kwargs["units"] = ("um", "um")
    return (slide.display_levels(_TileErrorNotifier()), kwargs, "image")
