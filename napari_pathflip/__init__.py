"""napari-pathflip: PathFLIP whole-slide grounding and chat, as a Qt-free core plus a thin napari plugin."""

from .errors import PathflipError
from .slide import Slide, open_slide

__all__ = ["PathflipError", "Slide", "open_slide"]
__version__ = "0.1.0"
