"""Slide backends: the libraries that read slide files, one file each, behind the one `Slide` of slide.py.

A backend turns a path into a `Backend`: the file's levels as `NativeLevel`s (a read decodes only the tiles it
touches), their downsamples, what the file says about pixel size, objective power and vendor, its associated images
and a content fingerprint. `Slide` adds the rest once for all of them (computed coarser levels, white padding,
errors naming the damaged tile, whether a stated pixel size is believable), so a backend stays a thin adapter.

One file per backend, as in napari-wsi, rather than all of it in slide.py: each wraps a different library with its
own import failures, error types and metadata names, and kept apart slide.py stays about the pyramid. Only
tiffslide is imported on the common path; wsidicom and OpenSlide are imported when a file needs them.

Which backend reads a path (`open_backend`):
- a folder: wsidicom (a DICOM whole-slide image is a folder of instance files, one or more per level);
- a TIFF-family name (.svs, .tif, .ndpi, ...): tiffslide. When it refuses the file, a DICOM file goes to wsidicom
  and anything else to OpenSlide; when OpenSlide refuses it too, tiffslide's reason is reported;
- a DICOM file (.dcm, or the "DICM" marker at byte 128): wsidicom;
- anything else (.mrxs, .vms, .vmu, .svslide, ...): a TIFF by content goes to tiffslide, the rest to OpenSlide.
Every refusal is a PathflipError that names the format and says what to do.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..errors import PathflipError

TIFF_MARKERS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
TIFF_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".ome.tif", ".ome.tiff", ".btf", ".tf8")
DICOM_SUFFIXES = (".dcm",)
OPENSLIDE_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide")
SLIDE_SUFFIXES = TIFF_SUFFIXES + DICOM_SUFFIXES + OPENSLIDE_SUFFIXES
SUPPORTED = ("Supported: SVS, tiled TIFF/BigTIFF, NDPI, SCN, BIF, OME-TIFF, DICOM WSI (a folder or a .dcm file), "
             "and through OpenSlide MRXS, VMS/VMU and SVSLIDE.")
FORMAT_NAMES = {".mrxs": "MIRAX (.mrxs)", ".vms": "Hamamatsu VMS", ".vmu": "Hamamatsu VMU",
                ".svslide": "Sakura SVSlide", ".scn": "Leica SCN", ".bif": "Ventana BIF", ".ndpi": "Hamamatsu NDPI",
                ".svs": "Aperio SVS", ".dcm": "DICOM"}


class Unrecognised(PathflipError):
    """The backend's library does not recognise the file as a format it reads (another backend may)."""


class NativeLevel(ABC):
    """One level stored in the file: (height, width) pixels in `tile`-sized tiles (the file's own)."""

    shape: tuple[int, int]
    tile: tuple[int, int]  # (tile height, tile width)

    @abstractmethod
    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] (inside the level) as RGB uint8. May raise anything where the file is damaged:
        Slide turns that into a PathflipError naming the tile."""


class Backend(ABC):
    """A slide file opened by one library. Attributes are set by the subclass's constructor."""

    name: str  # "tiffslide", "wsidicom" or "openslide"
    path: str
    levels: list[NativeLevel]  # level 0 first
    downsamples: list[float]  # per level, relative to level 0
    properties: dict
    mpp: tuple[float, float] | None  # level-0 um/px as the file states it
    mpp_origin: str  # where `mpp` comes from, for messages ("the aperio metadata", "the TIFF resolution tag")
    mpp_from_tag: bool  # `mpp` comes from a TIFF resolution tag (often a screen dpi, not a microscope's)
    objective_power: float | None
    vendor: str | None
    fingerprint: str

    @property
    @abstractmethod
    def associated_names(self) -> list[str]:
        """Names of the thumbnail, label and macro images the file holds."""

    @abstractmethod
    def associated_image(self, name: str) -> np.ndarray | None:
        """That image as RGB uint8, or None when the file has none of that name."""

    @abstractmethod
    def close(self) -> None: ...


class OpenSlideLikeBackend(Backend):
    """A backend whose `_handle` follows OpenSlide's API (tiffslide copies it): associated images as PIL images."""

    _handle: object

    @property
    def associated_names(self) -> list[str]:
        return list(self._handle.associated_images.keys())

    def associated_image(self, name: str) -> np.ndarray | None:
        images = self._handle.associated_images
        if name not in images:
            return None
        return np.asarray(images[name].convert("RGB"))

    def close(self) -> None:
        self._handle.close()


def open_backend(path: str, storage_options: dict | None = None, backend: str | None = None) -> Backend:
    """Open `path` (a local path or an fsspec URL) with the backend that reads it, or the one named in `backend`.

    Raises PathflipError when no backend reads it, naming the format and what to do.
    """
    from .openslide import OpenSlideBackend
    from .tiffslide import TiffSlideBackend
    from .wsidicom import WsiDicomBackend

    if backend is not None:
        classes = {"tiffslide": TiffSlideBackend, "wsidicom": WsiDicomBackend, "openslide": OpenSlideBackend}
        if backend not in classes:
            raise PathflipError(f"unknown slide backend {backend!r}: use one of {', '.join(classes)}.")
        return classes[backend](path, storage_options)
    if "://" not in path and os.path.isdir(path):
        return WsiDicomBackend(path, storage_options)
    tiff_named = path.lower().endswith(TIFF_SUFFIXES)
    head = b"" if tiff_named else _head(path, storage_options)  # a TIFF name needs no look inside (one open)
    if path.lower().endswith(DICOM_SUFFIXES) or is_dicom_bytes(head):
        return WsiDicomBackend(path, storage_options)
    if tiff_named or head.startswith(TIFF_MARKERS):
        try:
            return TiffSlideBackend(path, storage_options)
        except Unrecognised as refused:
            if tiff_named and is_dicom_bytes(_head(path, storage_options)):
                return WsiDicomBackend(path, storage_options)
            return _openslide_or(path, storage_options, refused)
    return OpenSlideBackend(path, storage_options)


def _openslide_or(path: str, storage_options: dict | None, refused: Unrecognised) -> Backend:
    """OpenSlide's reading of a TIFF file tiffslide refused; tiffslide's reason when OpenSlide cannot read it."""
    from .openslide import OpenSlideBackend, openslide_available

    if "://" in path or not openslide_available():
        raise refused
    try:
        return OpenSlideBackend(path, storage_options)
    except PathflipError:
        raise refused from None


def _head(path: str, storage_options: dict | None, size: int = 132) -> bytes:
    """The first bytes of a file (enough for the TIFF and DICOM markers); empty when it cannot be read."""
    try:
        if "://" in path:
            import fsspec

            with fsspec.open(path, "rb", **(storage_options or {})) as f:
                return f.read(size)
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.read(fd, size)
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return b""


def is_dicom_bytes(head: bytes) -> bool:
    """Whether a file starting with `head` is DICOM (Part 10: a 128-byte preamble, then "DICM")."""
    return head[128:132] == b"DICM"


def is_dicom_folder(path: str | os.PathLike, probe: int = 16) -> bool:
    """Whether a local folder holds DICOM files (a .dcm name, or the DICOM marker in one of its first `probe`
    files): what a DICOM whole-slide image is stored as."""
    try:
        entries = sorted(entry for entry in Path(path).iterdir() if entry.is_file())
    except OSError:
        return False
    if any(entry.name.lower().endswith(DICOM_SUFFIXES) for entry in entries):
        return True
    return any(is_dicom_bytes(_head(str(entry), None)) for entry in entries[:probe])


def format_name(path: str) -> str:
    """A name for the slide format, from the file name ("MIRAX (.mrxs)"), for messages."""
    suffix = Path(path.rstrip("/")).suffix.lower()
    return FORMAT_NAMES.get(suffix, f"{suffix} slide" if suffix else "slide")


FINGERPRINT_SAMPLES = 64  # blocks read across each file for its fingerprint (content_digest)
FINGERPRINT_BLOCK = 1 << 12  # bytes per sampled block
FINGERPRINT_ENDS = 1 << 16  # bytes of head and tail (headers, directories)


def content_digest(files, level_dimensions) -> str:
    """Identity of a slide's content without reading it all: each file's size, head and tail (64 KiB each), 64
    blocks of 4 KiB evenly spaced over the whole file, and the level geometry. A slide rewritten anywhere a block
    falls (re-scanned, re-compressed, edited tiles) gets a new fingerprint, so no cache or library serves the old
    one's results; a change small enough to fall between two blocks (under 1/63 of the file) can go unseen.
    `files`: (size, open binary file) pairs. Several files (a DICOM folder) are combined in an order that does not
    depend on their names, so a copied or renamed folder keeps its fingerprint."""
    parts = []
    for size, fh in files:
        spaced = [(size - FINGERPRINT_BLOCK) * i // (FINGERPRINT_SAMPLES - 1) for i in range(FINGERPRINT_SAMPLES)] \
            if size > FINGERPRINT_BLOCK else []
        ends = [(0, FINGERPRINT_ENDS), (max(0, size - FINGERPRINT_ENDS), FINGERPRINT_ENDS)]
        blocks = _read_blocks(fh, ends + [(offset, FINGERPRINT_BLOCK) for offset in spaced])
        parts.append(b"".join([str(size).encode(), *blocks]))
    if len(parts) > 1:
        parts = sorted(hashlib.sha256(part).digest() for part in parts)
    digest = hashlib.sha256(b"".join(parts))
    digest.update(repr(tuple(tuple(int(v) for v in dims) for dims in level_dimensions)).encode())
    return digest.hexdigest()[:16]


def _read_blocks(fh, spans: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of each (offset, length) span of an open file. An fsspec file (a remote slide) is asked for all
    spans in one batch: read one by one, its read-ahead cache would fetch megabytes per span."""
    raw = getattr(fh, "_fh", fh)  # tifffile's FileHandle wraps the file it reads
    fs, path = getattr(raw, "fs", None), getattr(raw, "path", None)
    if fs is not None and isinstance(path, str) and hasattr(fs, "cat_ranges"):
        return list(fs.cat_ranges([path] * len(spans), [o for o, _ in spans], [o + n for o, n in spans]))
    blocks = []
    for offset, length in spans:
        fh.seek(offset)
        blocks.append(fh.read(length))
    return blocks
