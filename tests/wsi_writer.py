"""Small slides for the tests: pyramidal JPEG-tiled TIFFs (tifffile, SubIFD pyramid), damaged files, and DICOM WSI
folders made from a TIFF's own JPEG tiles (wsidicom's writer)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image as PILImage
from pydicom.uid import JPEGBaseline8Bit, generate_uid
from wsidicom import WsiDicom, WsiInstance
from wsidicom.codec import Encoder
from wsidicom.geometry import Size, SizeMm
from wsidicom.instance import ImageData
from wsidicom.instance.dataset import ImageType
from wsidicom.metadata import (Equipment, Image, Label, OpticalPath, Patient, Pyramid, Series, Slide, SlideSample,
                               Study, WsiMetadata)
from wsidicom.metadata.schema.dicom import WsiMetadataDicomSchema
from wsidicom.source import Source


def write_pyramid(path: Path, image: np.ndarray, mpp: float | None, levels: int = 3, tile: int = 256,
                  dpi: float | None = None) -> Path:
    """RGB uint8 `image` as level 0 at `mpp` um/px plus 2x-decimated levels (tiffslide reads mpp from the tags).
    `dpi` instead of `mpp`: every level tagged with that many pixels per inch, as image editors write it."""
    options = dict(tile=(tile, tile), compression="jpeg", photometric="rgb",
                   resolutionunit="INCH" if dpi else "CENTIMETER")
    with tifffile.TiffWriter(path) as tif:
        for level in range(levels):
            scale = dpi or 1e4 / (mpp * 2**level)
            tags = dict(subifds=levels - 1) if level == 0 else dict(subfiletype=1)
            tif.write(np.ascontiguousarray(image[:: 2**level, :: 2**level]), resolution=(scale, scale), **tags,
                      **options)
    return path


def corrupt_tile(path: Path, level: int, x: int, y: int) -> None:
    """Overwrite the JPEG header of the tile holding level pixel (x, y), so decoding it fails."""
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[level].keyframe
        per_row = -(-page.imagewidth // page.tilewidth)
        index = (y // page.tilelength) * per_row + x // page.tilewidth
        offset = page.dataoffsets[index]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * 64)


def write_unknown_compression(path: Path) -> Path:
    """A small RGB TIFF whose Compression tag names a scheme no reader knows (52479): a header that parses, image
    data that cannot be decoded."""
    tifffile.imwrite(path, np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].tags["Compression"].valueoffset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write((52479).to_bytes(2, "little"))
    return path


def write_dicom(tiff_path: Path, out_dir: Path, mpp: float, label: np.ndarray | None = None) -> list[Path]:
    """The pyramid of a JPEG-tiled RGB TIFF as a DICOM WSI folder (one instance per level, written by wsidicom).
    Every frame is the TIFF's own JPEG tile (its tables merged in), never re-encoded, so the pixels are the TIFF's
    exactly. `label`: an RGB image stored as the slide's label instance."""
    metadata = WsiMetadata(
        study=Study(uid=generate_uid()), series=Series(uid=generate_uid()), patient=Patient(),
        equipment=Equipment(), frame_of_reference_uid=generate_uid(), dimension_organization_uids=[generate_uid()],
        slide=Slide(identifier="test slide", samples=[SlideSample(identifier="test sample", uid=generate_uid())]),
        pyramid=Pyramid(image=Image(), optical_paths=[OpticalPath()], uid=generate_uid()), label=Label(),
    )
    schema = WsiMetadataDicomSchema()
    with tifffile.TiffFile(tiff_path) as tif:
        pages = [level.keyframe for level in tif.series[0].levels]
        levels = [_JpegTiles(tif.filehandle, page, mpp * pages[0].imagewidth / page.imagewidth) for page in pages]
    # a fresh base dataset per instance: creating an instance writes its SOP Instance UID into the base
    instances = [WsiInstance.create_instance(data, schema.dump(metadata, ImageType.VOLUME, require_icc_profile=True),
                                             ImageType.VOLUME, index) for index, data in enumerate(levels)]
    labels = []
    if label is not None:
        label_base = schema.dump(metadata, ImageType.LABEL, require_icc_profile=True)
        labels = [WsiInstance.create_label(PILImage.fromarray(label), label_base)]
    with WsiDicom(_Instances(instances, labels)) as wsi:
        return [Path(str(path)) for path in wsi.save(out_dir)]


class _JpegTiles(ImageData):
    """One TIFF level's JPEG tiles as wsidicom image data."""

    def __init__(self, filehandle, page, mpp: float):
        if page.compression != 7 or page.photometric not in (2, 6) or not page.is_tiled:
            raise ValueError("write_dicom copies the JPEG tiles of RGB or YCbCr tiled TIFFs only")
        # DICOM names a chroma-subsampled YCbCr JPEG YBR_FULL_422 (whatever the subsampling)
        self._photometric = "RGB" if page.photometric == 2 else "YBR_FULL_422"
        tables = page.jpegtables
        self._frames = []
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            filehandle.seek(offset)
            data = filehandle.read(count)
            self._frames.append(data[:2] + tables[2:-2] + data[2:] if tables else data)
        self._size = Size(page.imagewidth, page.imagelength)
        self._tile = Size(page.tilewidth, page.tilelength)
        self._spacing = SizeMm(mpp / 1000, mpp / 1000)
        super().__init__(Encoder.create(JPEGBaseline8Bit, 8, self._photometric))

    transfer_syntax = property(lambda self: JPEGBaseline8Bit)
    image_size = property(lambda self: self._size)
    tile_size = property(lambda self: self._tile)
    pixel_spacing = property(lambda self: self._spacing)
    imaged_size = property(lambda self: None)
    samples_per_pixel = property(lambda self: 3)
    photometric_interpretation = property(lambda self: self._photometric)
    bits = property(lambda self: 8)
    image_coordinate_system = property(lambda self: None)
    thread_safe = property(lambda self: True)
    lossy_compression = property(lambda self: [])
    transcoder = property(lambda self: None)

    def get_encoded_tile(self, tile, z, path) -> bytes:
        return self._frames[tile.y * self.tiled_size.width + tile.x]

    def get_decoded_tile(self, tile_point, z, path, cache=True) -> np.ndarray:
        return np.asarray(PILImage.open(io.BytesIO(self.get_encoded_tile(tile_point, z, path))))


class _Instances(Source):
    """A wsidicom source of instances made in memory (what WsiDicom.save writes out)."""

    def __init__(self, levels: list, labels: list):
        super().__init__()
        self._levels, self._labels = levels, labels

    base_dataset = property(lambda self: self._levels[0].dataset)
    level_instances = property(lambda self: self._levels)
    label_instances = property(lambda self: self._labels)
    overview_instances = thumbnail_instances = annotation_instances = property(lambda self: [])

    def close(self) -> None:
        pass
