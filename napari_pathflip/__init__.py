"""napari-pathflip: PathFLIP whole-slide grounding and chat, as a Qt-free core plus a thin napari plugin."""

from .errors import PathflipError
from .slide import Slide, open_slide

__all__ = ["PathFLIP", "PathflipError", "Slide", "open_slide"]


def __getattr__(name):
    # torch and transformers load only when the model is asked for (the napari reader must stay light)
    if name == "PathFLIP":
        from .model import PathFLIP

        return PathFLIP
    raise AttributeError(f"module 'napari_pathflip' has no attribute {name!r}")
__version__ = "0.1.0"
