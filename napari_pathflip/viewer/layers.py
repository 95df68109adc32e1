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


# napari keeps decoded chunks in an opportunistic dask cache (a fraction of RAM by default); for gigapixel slides
# that cache is what grows while panning, so the plugin bounds it.
DASK_CACHE_BYTES = 128 * 2**20


def slide_layer_data(slide: Slide, name: str | None = None) -> tuple:
    """A napari LayerData tuple for the slide's multiscale pyramid, in micrometres when the mpp is known."""
    from napari.utils import resize_dask_cache

    resize_dask_cache(DASK_CACHE_BYTES)
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
