"""What PathFLIP keeps of a slide and what it answers about one: `SlideEncoding` (the cached encoding, one .npz
file, no pickle) and `GroundingResult` (the scores of one text)."""

from __future__ import annotations

import functools
import io
import mmap
import os
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# the float tensors of an encoding; the rest are numpy arrays, plus the two sizes
TENSORS = ("slide_embedding", "region_embeddings", "region_keys", "mixer_inputs")
OPTIONAL_TENSORS = ("patch_features", "patch_embeddings")


@dataclass
class SlideEncoding:
    """Everything `ground` needs for a slide, so a new text costs only the text side."""
    slide_embedding: torch.Tensor  # [d] mixer output 0 (not normalised)
    region_embeddings: torch.Tensor  # [N, d] mixer outputs 1..N
    region_keys: torch.Tensor  # [N, d] W_k of eq. 5 applied to the region embeddings
    mixer_inputs: torch.Tensor  # [mixer_layers, N + 1, d] input of each mixer layer (patch-level attribution)
    region_boxes: np.ndarray  # [N, 4] level-0 (x0, y0, x1, y1)
    region_grid: np.ndarray  # [N, 2] (column, row) on the region grid
    region_index: np.ndarray  # [N, M] patch rows of each region, -1 = padding
    patch_region: np.ndarray  # [P] region of each patch row
    patch_coords: np.ndarray  # [P, 2] level-0 (x, y) top-left
    patch_size_level0: int
    region_size_level0: int
    patch_features: torch.Tensor | None = None  # [P, D_in]; needed for patch-level grounding only
    # {region: eq. 5 keys [patches of the region, d] of its patches as one-patch regions}: text-independent, filled
    # by ground on first use of a region, so later texts cost one product (not saved)
    patch_keys: dict = field(default_factory=dict, repr=False, compare=False)
    # [P, d] normalised patch embeddings of the patch-text head (models that have one)
    patch_embeddings: torch.Tensor | None = None

    @property
    def num_regions(self) -> int:
        return self.region_embeddings.shape[0]

    def save(self, path: str | Path, include_features: bool = True) -> None:
        """Write an .npz (no pickle). Features make the file large; leave them out to keep region grounding only."""
        arrays = {k: getattr(self, k).detach().float().cpu().numpy() for k in TENSORS}
        arrays.update(region_boxes=self.region_boxes, region_grid=self.region_grid, region_index=self.region_index,
                      patch_region=self.patch_region, patch_coords=self.patch_coords,
                      sizes=np.array([self.patch_size_level0, self.region_size_level0], dtype=np.int64))
        if include_features and self.patch_features is not None:
            arrays["patch_features"] = self.patch_features.detach().float().cpu().numpy()
        if self.patch_embeddings is not None:
            arrays["patch_embeddings"] = self.patch_embeddings.detach().float().cpu().numpy()
        save_npz(path, arrays)

    @classmethod
    def load(cls, path: str | Path, include_features: bool = True, mapped: bool = False) -> "SlideEncoding":
        """Read a saved encoding. `include_features=False` skips the patch features (as large again as the rest,
        twice that for a 512-d encoder): enough for everything but patch-level attention grounding, which is what
        a library's search needs. `mapped`: the arrays are views of a memory map of the file (`mapped_npz`), read
        as used: a search that scores a few hundred of a slide's patch embeddings, or all of them once, does not
        copy 10 MB first."""
        if mapped:
            a = mapped_npz(path, skip=() if include_features else ("patch_features",))
        else:
            with np.load(path, allow_pickle=False) as data:
                a = {k: data[k] for k in data.files if include_features or k != "patch_features"}
        tensors = {k: torch.from_numpy(a.pop(k)) for k in TENSORS + OPTIONAL_TENSORS if k in a}
        sizes = a.pop("sizes")
        return cls(**tensors, **a, patch_size_level0=int(sizes[0]), region_size_level0=int(sizes[1]))


ALIGN = 64  # where save_npz starts each array's data in the file (np.save pads its header to 64 bytes as well)
_PADDING = 0xD935  # the zip extra-field id that pads a local header (as zipalign does); readers skip it


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """What np.savez writes (an uncompressed .npz that np.load reads), with each array's data starting at a
    multiple of ALIGN bytes in the file: mapped_npz's views are then aligned, as numpy's BLAS products and SIMD loops
    want (unaligned views are copied when mapped)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member.compress_type = zipfile.ZIP_STORED
            pad = -(archive.start_dir + 30 + len(member.filename.encode())) % ALIGN
            pad += ALIGN if 0 < pad < 4 else 0  # an extra-field record is at least 4 bytes
            member.extra = struct.pack("<HH", _PADDING, pad - 4) + bytes(pad - 4) if pad else b""
            archive.writestr(member, buffer.getbuffer())


# files mapped_npz has checked in this process, by (path, device, inode, size, modification and change times,
# members skipped) -> where each array lies, {name: (offset, dtype, shape, Fortran order)}: mapped again from that,
# without a check; the CHECKED_FILES most recent are kept (a few KB each)
_CHECKED: OrderedDict[tuple, dict[str, tuple]] = OrderedDict()
CHECKED_FILES = 4096


def mapped_npz(path: str | Path, skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The arrays of an uncompressed .npz (`save_npz`, `np.savez`; no pickle) but those named in `skip`, as
    copy-on-write views of one memory map of the file: nothing is copied (but arrays whose data is not aligned for
    their type, as np.savez leaves them), pages are read when used, and the map lives as long as its arrays.
    The first time a process maps a file each array's CRC is checked, as np.load checks it (a cached file damaged on
    disk is detected, not scored); the same file (inode, size, times, as the open file reports them) is then trusted
    and mapped from the layout found. Files are replaced, never rewritten in place (atomic_write), so a mapped file
    does not change under its map. Raises ValueError (or zipfile.BadZipFile, OSError) for a file that is not such an
    archive or is damaged."""
    _allow_open_files()
    with open(path, "rb") as file:
        stat = os.fstat(file.fileno())
        key = (str(Path(path).resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns,
               tuple(skip))
        view = memoryview(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY, **_UNTRACKED))
        layout = _CHECKED.get(key)
        if layout is None:
            layout = _checked_layout(file, view, skip)
            _CHECKED[key] = layout
            while len(_CHECKED) > CHECKED_FILES:
                _CHECKED.popitem(last=False)
        else:
            _CHECKED.move_to_end(key)
    arrays = {}
    for name, (offset, dtype, shape, fortran) in layout.items():
        array = np.frombuffer(view, dtype, int(np.prod(shape)), offset).reshape(shape, order="F" if fortran else "C")
        arrays[name] = array if offset % max(dtype.alignment, 1) == 0 else array.copy()  # files np.savez wrote
    return arrays


# Python 3.13+ maps without keeping a duplicate of the file's descriptor; before, each live map holds one
_UNTRACKED = {"trackfd": False} if sys.version_info >= (3, 13) else {}


@functools.cache
def _allow_open_files(wanted: int = 8192) -> None:
    """Raise the soft limit on open files towards the hard one, once: each mapped encoding held in a library's
    cache holds a descriptor before Python 3.13 (64 a library, one library per shard; macOS starts at 256)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def _crc32(file, start: int, end: int, chunk: int = 4 << 20) -> int:
    """CRC-32 of bytes [start, end) of an open file, read in large pieces: from a disk, as fast as np.load reads (a
    pass over the map would fault its pages in a small read at a time), and the pages are then in the system's cache
    for the map."""
    crc, buffer = 0, bytearray(min(chunk, max(end - start, 1)))
    file.seek(start)
    while start < end:
        got = file.readinto(memoryview(buffer)[:min(len(buffer), end - start)])
        if not got:
            raise ValueError("the file is cut short")
        crc, start = zlib.crc32(memoryview(buffer)[:got], crc), start + got
    return crc


def _checked_layout(file, view: memoryview, skip: tuple[str, ...]) -> dict[str, tuple]:
    """Where each array but those in `skip` lies in the .npz open as `file` and mapped as `view`, each member's
    name, CRC and sizes checked."""
    layout = {}
    with zipfile.ZipFile(file) as archive:  # a file object: left open
        members = [m for m in archive.infolist() if m.filename.removesuffix(".npy") not in skip]
    for member in members:
        name = member.filename.removesuffix(".npy")
        start = member.header_offset
        if member.compress_type != zipfile.ZIP_STORED or bytes(view[start:start + 4]) != b"PK\x03\x04":
            raise ValueError(f"{name} is compressed or its entry is damaged")
        lengths = struct.unpack("<HH", view[start + 26:start + 30])
        if bytes(view[start + 30:start + 30 + lengths[0]]) != member.filename.encode():
            raise zipfile.BadZipFile(f"{name}: the names in the directory and in the entry differ")
        start += 30 + sum(lengths)  # local header, name, extra field
        end = start + member.file_size
        if end > len(view):
            raise ValueError(f"{name} is cut short ({len(view)} of {end} bytes)")
        if _crc32(file, start, end) != member.CRC:
            raise ValueError(f"{name} is damaged (its CRC does not match)")
        header = io.BytesIO(view[start:min(end, start + 65_546)])
        version = np.lib.format.read_magic(header)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"{name}: .npy format {version} is not read here")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(header)
        offset = start + header.tell()
        if dtype.hasobject or offset + int(np.prod(shape)) * dtype.itemsize != end:
            raise ValueError(f"{name} holds objects or its size does not match its header")
        layout[name] = (offset, dtype, shape, fortran)
    return layout


# presence probability below which a text is "not found" on a slide, and below which it is "uncertain"
PRESENCE_BANDS = {"not found": 0.5, "uncertain": 0.8}


@dataclass
class GroundingResult:
    """Scores of one text on one slide. method "attention": region_scores are the head-averaged eq. 5 attention of
    the text over regions (they sum to 1) and patch_scores the head-averaged eq. 5 logit of each patch of the
    explained regions taken as a one-patch region in its region's place, NaN for the other patches. method
    "patch_head": both are probabilities that the region / the patch shows the text (patch-text head), every patch
    scored."""
    text: str
    region_scores: np.ndarray  # [N]
    top_regions: np.ndarray  # [k] region indices, best first
    top_boxes: np.ndarray  # [k, 5] level-0 (x0, y0, x1, y1, score)
    patch_scores: np.ndarray | None = None  # [P] aligned with encoding.patch_coords
    explained_regions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    method: str = "attention"
    # P(the slide shows the text) (PathFLIP.presence; weights with a patch-text head), None without one
    presence: float | None = None
    # True for weights whose head was calibrated on patch labels: patch_scores (when asked for) are calibrated
    # probabilities that each patch shows the text, gated by `presence`, and the heatmap shows them (or each
    # region's probability times the presence) as they are, on a fixed scale. False: scores only rank (the paper's
    # attention, uncalibrated heads), shown relative to the slide's range.
    calibrated: bool = False

    @property
    def status(self) -> str:
        """"found", "uncertain" or "not found" from `presence` (PRESENCE_BANDS); "ranked only" when there is none
        (weights without a patch-text head say where a text fits best, not whether the slide shows it)."""
        if self.presence is None:
            return "ranked only"
        if self.presence >= PRESENCE_BANDS["uncertain"]:
            return "found"
        return "uncertain" if self.presence >= PRESENCE_BANDS["not found"] else "not found"

    def verdict(self) -> str:
        """What a person reads about the text on this slide, e.g. "not found on this slide: p = 0.03"."""
        if self.presence is None:
            return "ranked only (these weights give no presence probability)"
        words = {"found": "found", "uncertain": "uncertain", "not found": "not found on this slide"}[self.status]
        return f"{words}: p = {self.presence:.2f}"

