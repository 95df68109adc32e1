"""Layer data for slides, what napari needs to show an open Slide, and where level-0 things sit over a slide layer
(score grids, boxes, the camera on a box)."""

from __future__ import annotations

import threading
import time

import numpy as np

from ..errors import PathflipError
from ..heatmap import ScoreGrid
from ..slide import Slide

VISPY_METRIC_GLYPHS = "ÅÉÑŐjgpqy"  # vispy's TextVisual lays out every text against these


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


def grid_placement(grid: ScoreGrid, layer) -> tuple[tuple, tuple]:
    """(scale, translate) of a score grid over a slide layer, in that layer's own world units."""
    sy, sx = (float(v) for v in layer.scale[-2:])
    scale, translate = grid.placement((sx, sy))
    offset = np.asarray(layer.translate[-2:], dtype=float)
    return scale, tuple(np.asarray(translate) + offset)


def box_world(layer, box) -> tuple[np.ndarray, np.ndarray]:
    """World (y, x) corners of a level-0 box (x0, y0, x1, y1) over a slide layer (pixel x covers [x - 0.5,
    x + 0.5) around its centre in the layer's data coordinates)."""
    x0, y0, x1, y1 = box
    scale = np.asarray(layer.scale[-2:], dtype=float)
    offset = np.asarray(layer.translate[-2:], dtype=float)
    return (np.array([y0, x0]) - 0.5) * scale + offset, (np.array([y1, x1]) - 0.5) * scale + offset


def zoom_to(viewer, layer, box) -> None:
    """Centre the camera on a level-0 box of a slide layer and zoom so that it fills 90 % of the canvas."""
    low, high = box_world(layer, box)
    camera = viewer.scene.camera
    camera.center = tuple((low + high) / 2)
    camera.zoom = 0.9 * float(np.min(np.asarray(viewer.canvas.size) / (high - low)))


def glyph_loaders(viewer, text: str) -> list:
    """One callable per character of `text` (and of the characters vispy measures every text against); each renders
    that character into the font the canvas draws layer text with. vispy renders a glyph's distance field in Python
    the first time a character is drawn (5-15 ms each), so a layer's first labels would stall the GUI thread for all
    their characters at once; called one per event-loop turn beforehand, they cost nothing noticeable. Empty when
    the viewer has no canvas (a headless ViewerModel) or napari keeps its canvas elsewhere (napari has no public way
    to it: this reaches it through the viewer a plugin's proxy wraps)."""
    try:
        info = getattr(viewer, "__wrapped__", viewer).window._qt_viewer.canvas.font_info()
        font = info.font_manager.get_font(info.face)  # the regular face napari's Text visuals use
    except AttributeError:
        return []
    return [lambda char=char: font[char] for char in dict.fromkeys(text + VISPY_METRIC_GLYPHS)]


def drawn_region(viewer, slide_layer, localize=None):
    """The region a person points at on a slide layer, in level-0 px: the selected rectangle (a box (x0, y0, x1,
    y1)) or polygon (its (x, y) vertices) of the active Shapes layer (else of any Shapes layer with a selection),
    else the box selected in Localize (`localize`); None when there is neither. What "Find similar regions" searches
    and what the chat's "here" questions are about."""
    from napari.layers import Shapes

    if slide_layer is None or slide_layer not in viewer.layers:
        return None
    active = viewer.layers.selection.active
    layers = [active] if isinstance(active, Shapes) else []
    layers += [layer for layer in viewer.layers if isinstance(layer, Shapes) and layer is not active]
    for layer in layers:
        if layer.selected_data:
            index = min(layer.selected_data)
            # layer data -> world -> slide data (y, x); a level-0 pixel (x, y) sits at data (y - 0.5, x - 0.5)
            vertices = np.array([slide_layer.world_to_data(layer.data_to_world(v))[-2:] for v in layer.data[index]],
                                dtype=np.float64)
            xy = vertices[:, ::-1] + 0.5
            if layer.shape_type[index] == "rectangle":
                (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
                return (int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1)))
            return [tuple(v) for v in xy.tolist()]
    return localize.selected_box() if localize is not None else None
