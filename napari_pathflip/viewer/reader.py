"""napari reader contribution: whole-slide images (files, and folders of DICOM instances) through `open_slide`."""

from __future__ import annotations

from ..errors import PathflipError
from ..slide import is_slide_path, open_slide
from .layers import slide_layer_data


def napari_get_reader(path):
    """The reader for one slide path, or None to let another plugin try (napari's protocol): a slide file by its
    name, a folder only when it holds DICOM files."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, str) or not is_slide_path(path):
        return None
    return read_slide


def read_slide(path) -> list[tuple]:
    """Open the slide lazily. Problems become a napari notification with what to do, not a traceback."""
    path = path[0] if isinstance(path, list) else path
    try:
        return [slide_layer_data(open_slide(path))]
    except PathflipError as exc:
        from napari.utils.notifications import show_error

        show_error(str(exc))
        return [(None,)]
