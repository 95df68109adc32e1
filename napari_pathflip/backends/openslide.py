"""OpenSlide: the formats tiffslide does not read (MIRAX .mrxs, Hamamatsu .vms/.vmu, Sakura .svslide, ...), local
files only. Needs the `openslide-python` package and the library itself (`openslide-bin`)."""

from __future__ import annotations

import os

import numpy as np

from ..errors import PathflipError
from . import (OPENSLIDE_SUFFIXES, SUPPORTED, NativeLevel, OpenSlideLikeBackend, Unrecognised, content_digest,
               format_name)

INSTALL = "pip install openslide-bin openslide-python"
COMPANIONS = ("Check that the files that come with it are complete beside it (an .mrxs needs its folder of the same "
              "name, a .vms or .vmu its image files), or export the slide again from the scanner software.")


def openslide_available() -> bool:
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):  # OSError: the Python package is there, the library is not
        return False
    return True


class OpenSlideLevel(NativeLevel):
    def __init__(self, handle, index: int, properties: dict):
        self.handle, self.index = handle, index
        width, height = handle.level_dimensions[index]
        self.shape = (int(height), int(width))
        self.downsample = float(handle.level_downsamples[index])
        tile_h = properties.get(f"openslide.level[{index}].tile-height")
        tile_w = properties.get(f"openslide.level[{index}].tile-width")
        self.tile = (int(tile_h), int(tile_w)) if tile_h and tile_w else (512, 512)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        location = (int(round(x0 * self.downsample)), int(round(y0 * self.downsample)))  # OpenSlide takes level 0
        rgba = np.asarray(self.handle.read_region(location, self.index, (x1 - x0, y1 - y0)))
        alpha = rgba[..., 3:]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        # unscanned parts are transparent: white, like the padding outside a slide
        rgb = rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha.astype(np.uint16))
        return ((rgb + 127) // 255).astype(np.uint8)


class OpenSlideBackend(OpenSlideLikeBackend):
    name = "openslide"

    def __init__(self, path: str, storage_options: dict | None = None):
        self.path = path
        what = format_name(path)
        if "://" in path:
            raise PathflipError(
                f"cannot open {path}: {what} files are read with OpenSlide, which reads local files only. Copy the "
                "slide (with the files beside it) to a local disk and open it there."
            )
        try:
            import openslide
        except (ImportError, OSError) as exc:
            raise PathflipError(
                f"cannot open {path}: {what} files are read with OpenSlide, which is not installed here "
                f"({type(exc).__name__}: {exc}). Install it: {INSTALL}"
            ) from exc
        try:
            self._handle = openslide.OpenSlide(path)
        except openslide.OpenSlideUnsupportedFormatError as exc:
            if path.lower().endswith(OPENSLIDE_SUFFIXES):
                message = f"cannot open {path}: OpenSlide does not recognise it as a {what} slide. {COMPANIONS}"
                raise PathflipError(message) from exc
            raise Unrecognised(
                f"cannot open {path}: not a readable whole-slide image (OpenSlide does not recognise it either). "
                f"{SUPPORTED}"
            ) from exc
        except (openslide.OpenSlideError, OSError) as exc:
            raise PathflipError(
                f"cannot open {path}: OpenSlide cannot read this {what} ({type(exc).__name__}: {exc}). {COMPANIONS}"
            ) from exc
        handle = self._handle
        self.properties = dict(handle.properties)
        props = self.properties
        self.levels = [OpenSlideLevel(handle, index, props) for index in range(handle.level_count)]
        self.downsamples = [float(d) for d in handle.level_downsamples]
        self.vendor = props.get("openslide.vendor")
        mpp_x, mpp_y = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
        self.mpp = (float(mpp_x), float(mpp_y)) if mpp_x and mpp_y else None
        self.mpp_from_tag = self.vendor == "generic-tiff"  # OpenSlide takes it from the resolution tags there
        self.mpp_origin = "the TIFF resolution tag" if self.mpp_from_tag else f"the {self.vendor} metadata"
        power = props.get("openslide.objective-power")
        self.objective_power = float(power) if power else None
        self.fingerprint = _fingerprint(path, handle, props)


def _fingerprint(path: str, handle, props: dict) -> str:
    """The named file's size, head and tail, plus OpenSlide's quickhash-1 where it has one: formats such as MIRAX
    keep their pixels in other files, which the quickhash covers."""
    with open(path, "rb") as fh:
        digest = content_digest([(os.fstat(fh.fileno()).st_size, fh)], handle.level_dimensions)
    quickhash = props.get("openslide.quickhash-1")
    if not quickhash:
        return digest
    import hashlib

    return hashlib.sha256(f"{digest}:{quickhash}".encode()).hexdigest()[:16]
