"""wsidicom: DICOM whole-slide images (VL Whole Slide Microscopy Image instances), a folder of them or one file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import PathflipError
from . import Backend, NativeLevel, content_digest


class DicomLevel(NativeLevel):
    """One pyramid level of the DICOM slide (one or more instances), read through wsidicom."""

    def __init__(self, wsi, level):
        self.wsi, self.index = wsi, level.level  # wsidicom names a level by its log2 scale
        self.shape = (int(level.size.height), int(level.size.width))
        self.tile = (int(level.tile_size.height), int(level.tile_size.width))

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        region = self.wsi.read_region((x0, y0), self.index, (x1 - x0, y1 - y0), as_array=True, threads=1)
        return np.asarray(region)[..., :3]


class WsiDicomBackend(Backend):
    name = "wsidicom"

    def __init__(self, path: str, storage_options: dict | None = None):
        self.path = path
        try:
            from wsidicom import WsiDicom
        except ImportError as exc:
            raise PathflipError(
                f"cannot open {path}: DICOM slides are read with wsidicom, which is not installed here. "
                "Install it: pip install wsidicom"
            ) from exc
        try:
            self._wsi = _open(WsiDicom, path, storage_options)
            pyramid = list(self._wsi.levels)
            base = pyramid[0]
            image_data = base.default_instance.image_data
            if image_data.samples_per_pixel != 3 or image_data.bits != 8:
                raise PathflipError(
                    f"cannot open {path}: the DICOM slide has {image_data.samples_per_pixel} sample(s) of "
                    f"{image_data.bits} bits per pixel; only RGB 8-bit brightfield slides are supported."
                )
            self.levels = [DicomLevel(self._wsi, level) for level in pyramid]
            self.fingerprint = content_digest_of(self._wsi.files, [level.shape[::-1] for level in self.levels])
            mpp = base.mpp  # from PixelSpacing, in um/px
        except PathflipError:
            self.close()
            raise
        except Exception as exc:  # wsidicom and pydicom raise many types for files they cannot use
            self.close()
            raise PathflipError(dicom_refused(path, exc)) from exc
        height0, width0 = self.levels[0].shape
        self.downsamples = [(width0 / level.shape[1] + height0 / level.shape[0]) / 2 for level in self.levels]
        self.mpp = (float(mpp.width), float(mpp.height)) if mpp else None
        self.mpp_origin, self.mpp_from_tag = "the DICOM pixel spacing", False
        self.objective_power = self._objective_power()
        self.vendor = "dicom"
        self.properties = {"dicom.files": len(self._wsi.files), "dicom.levels": len(self.levels)}

    def _objective_power(self) -> float | None:
        try:  # optional metadata; any gap in it means "not stated"
            power = self._wsi.metadata.pyramid.optical_paths[0].objective.objective_power
        except Exception:
            return None
        return float(power) if power else None

    @property
    def associated_names(self) -> list[str]:
        return [name for name, images in (("label", self._wsi.labels), ("macro", self._wsi.overviews)) if images]

    def associated_image(self, name: str) -> np.ndarray | None:
        if name not in self.associated_names:
            return None
        image = self._wsi.read_label() if name == "label" else self._wsi.read_overview()
        return np.asarray(image.convert("RGB"))

    def close(self) -> None:
        if getattr(self, "_wsi", None) is not None:
            self._wsi.close()


def dicom_refused(path: str, exc: Exception) -> str:
    # never a TIFF reader's words here: the file was recognised as DICOM
    return (
        f"cannot open {path}: not a readable DICOM whole-slide image ({type(exc).__name__}: {exc}). A DICOM slide "
        "is a set of VL Whole Slide Microscopy Image instances: open the folder that holds all of them, or export "
        "the slide again from the scanner or PACS."
    )


def _open(wsidicom_class, path: str, storage_options: dict | None):
    """A folder as it is; a single local file with the instances beside it that belong to the same slide, so
    dropping one file of a multi-file pyramid opens the whole pyramid (the file alone when it is not among them)."""
    if "://" in path or os.path.isdir(path):
        return wsidicom_class.open(path, file_options=storage_options)
    try:
        folder = wsidicom_class.open(str(Path(path).parent))
    except Exception:  # the folder as a whole is not one slide: the file alone decides
        return wsidicom_class.open(path)
    if any(os.path.samefile(path, file) for file in folder.files):
        return folder
    folder.close()
    return wsidicom_class.open(path)


def content_digest_of(files, level_dimensions) -> str:
    """The fingerprint over every instance file the slide was read from (local paths or fsspec UPaths)."""
    handles = []
    try:
        for file in files:
            handles.append((file.stat().st_size, file.open("rb")))
        return content_digest(handles, level_dimensions)
    finally:
        for _, fh in handles:
            fh.close()
