"""Where patch features are cached: a per-slide feature store that survives kill -9, plus CLAM/TRIDENT HDF5 I/O.

Layout of one store (a folder under the store root, named `<slide stem>-<key>`; the key hashes the slide
fingerprint, encoder id, tiling config, pixel size and storage dtype, so any change gives a new folder):

    plan.json        what is being computed: key parts, patch count N, chunk size, feature dim, attributes
    grid.npz         coords [N, 2] int64 (level-0 x, y), region ids [N], region origins [R, 2]
    chunks/000012.npy  features of patches [12 C, 13 C) while extracting; each written to a temporary name,
                     then renamed, so a chunk file is either whole or absent
    features.h5      the finished features in CLAM/TRIDENT layout (`features`, `coords` + TRIDENT attributes)
                     plus `region_ids`, `region_origins` and all attributes as JSON
    manifest.json    the completion mark, renamed into place last: sha256 and size of features.h5, N, D

A store is complete exactly when manifest.json exists and features.h5 matches it; anything else is work in
progress (resumed chunk by chunk) or damage (detected by checksum or shape and rebuilt). What a killed run leaves
behind (temporary files, the chunks of a store it had just finished) is removed by the next run that takes the lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import PathflipError
from .files import atomic_write, atomic_write_json, sha256_of
from .tiling import region_ids as compute_region_ids

FORMAT_VERSION = 1
STALE_SECONDS = 600  # a temporary encoding file this old belongs to a killed run (writing one takes seconds)
_VERIFIED: dict[str, tuple[int, int]] = {}  # features.h5 path -> (size, mtime_ns) already checksummed here


@dataclass
class FeatureSet:
    """Patch features of one slide with their level-0 coordinates and regions."""

    features: np.ndarray  # [N, D] float32 (or float16)
    coords: np.ndarray  # [N, 2] int64 level-0 (x, y) top-left
    region_ids: np.ndarray  # [N] int64, 0..R-1, regions ordered row-major
    region_origins: np.ndarray  # [R, 2] int64 level-0 (x, y) top-left of each region
    attrs: dict = field(default_factory=dict)
    path: Path | None = None  # the features.h5 it was read from, if any
    from_cache: bool = False  # True when a finished store answered the request (nothing was computed)

    @property
    def patch_size_level0(self) -> int:
        return int(self.attrs["patch_size_level0"])

    @property
    def region_size_level0(self) -> int:
        return int(self.attrs["region_size_level0"])

    @property
    def encoder_id(self) -> str:
        return str(self.attrs.get("encoder_id", ""))

    @property
    def num_regions(self) -> int:
        return len(self.region_origins)

    def __len__(self) -> int:
        return len(self.coords)


# ---------------------------------------------------------------------------------------------------------------
# manifests


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data, sort_keys=True, default=_jsonable)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    return str(value)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("inf")  # gone already


# ---------------------------------------------------------------------------------------------------------------
# HDF5 (CLAM / TRIDENT layout)


def write_h5(feature_set: FeatureSet, path: str | os.PathLike) -> Path:
    """Write `features`, `coords` (with TRIDENT's attributes) and our region datasets to an HDF5 file, atomically."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    attrs = feature_set.attrs

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=feature_set.features)
            coords = f.create_dataset("coords", data=np.asarray(feature_set.coords, dtype=np.int64))
            coords.attrs["patch_size"] = int(attrs.get("patch_size", 256))
            coords.attrs["patch_size_level0"] = int(attrs["patch_size_level0"])
            coords.attrs["level0_magnification"] = float(attrs.get("level0_magnification", 20.0))
            coords.attrs["target_magnification"] = float(attrs.get("target_magnification", 20.0))
            coords.attrs["overlap"] = int(attrs.get("overlap", 0))
            coords.attrs["name"] = str(attrs.get("slide_name", path.stem))
            f.create_dataset("region_ids", data=feature_set.region_ids)
            f.create_dataset("region_origins", data=feature_set.region_origins)
            f.attrs["pathflip"] = json.dumps(attrs, sort_keys=True, default=_jsonable)

    atomic_write(path, write)
    return path


def read_h5(path: str | os.PathLike, *, region_patches: int = 16, patch_size_level0: int | None = None) -> FeatureSet:
    """Read a CLAM/TRIDENT (or our own) HDF5 feature file.

    TRIDENT files carry `patch_size_level0` on `coords`; CLAM files do not, so pass `patch_size_level0` for them
    (256 for 20x patches on a 20x slide, 512 on a 40x slide). Regions are derived from coordinates.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise PathflipError(f"{path}: the feature file is missing (no such file). Check the path and the folder it "
                            "is relative to.")
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                raise PathflipError(f"{path}: not a feature file (needs `features` and `coords` datasets).")
            features = f["features"][()]
            coords = np.asarray(f["coords"][()])
            coord_attrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
            own = json.loads(f.attrs["pathflip"]) if "pathflip" in f.attrs else {}
            stored_regions = (f["region_ids"][()], f["region_origins"][()]) if "region_ids" in f else None
    except OSError as exc:
        raise PathflipError(f"{path}: cannot read the HDF5 file ({exc}); it is damaged or not HDF5.") from exc
    if features.ndim == 3 and features.shape[0] == 1:  # CLAM's pt-style [1, N, D]
        features = features[0]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if features.ndim != 2 or coords.shape != (len(features), 2):
        raise PathflipError(f"{path}: features {features.shape} and coords {coords.shape} do not match ([N, D], [N, 2]).")
    attrs = {**coord_attrs, **own}
    size0 = patch_size_level0 or attrs.get("patch_size_level0")
    if size0 is None:
        raise PathflipError(
            f"{path}: no `patch_size_level0` attribute on `coords` (a CLAM file). Pass the patch size at level 0 "
            "(256 for 20x patches on a 20x slide, 512 on a 40x slide)."
        )
    attrs["patch_size_level0"] = int(size0)
    attrs.setdefault("region_patches", region_patches)
    attrs.setdefault("region_size_level0", int(size0) * int(attrs["region_patches"]))
    coords = coords.astype(np.int64)
    if stored_regions is not None and len(stored_regions[0]) == len(coords):
        ids, origins = (np.asarray(a, dtype=np.int64) for a in stored_regions)
    else:
        ids, origins = compute_region_ids(coords, attrs["region_size_level0"])
    return FeatureSet(features=features, coords=coords, region_ids=ids, region_origins=origins, attrs=attrs, path=path)


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------------------------
# the store


def store_key(fingerprint: str, encoder_id: str, tiling: dict, mpp, dtype: str) -> str:
    """16-hex key of everything that decides the stored features."""
    parts = {"fingerprint": fingerprint, "encoder_id": encoder_id, "tiling": tiling, "mpp": mpp, "dtype": dtype,
             "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=_jsonable).encode()).hexdigest()[:16]


class SlideStore:
    """The store folder of one (slide, encoder, grid) key. See the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike, slide_name: str, key: str):
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(slide_name).stem)[:80] or "slide"
        self.key = key
        self.dir = Path(root) / f"{stem}-{key}"
        self.h5 = self.dir / "features.h5"
        self.manifest = self.dir / "manifest.json"
        self.plan_path = self.dir / "plan.json"
        self.grid_path = self.dir / "grid.npz"
        self.chunks = self.dir / "chunks"
        self._lock_fd = None

    # -- completion ------------------------------------------------------------------------------------------
    def load_complete(self) -> FeatureSet | None:
        """The finished features, or None when the store is missing, unfinished or damaged (damage is removed)."""
        if not self.manifest.exists():
            return None
        try:
            manifest = json.loads(self.manifest.read_text())
            stat = self.h5.stat()
            if stat.st_size != manifest["size"]:
                raise ValueError(f"features.h5 is {stat.st_size} bytes, manifest says {manifest['size']}")
            stamp = (stat.st_size, stat.st_mtime_ns)
            if _VERIFIED.get(str(self.h5)) != stamp:
                if sha256_of(self.h5) != manifest["sha256"]:
                    raise ValueError("features.h5 checksum differs from the manifest")
                _VERIFIED[str(self.h5)] = stamp
            feature_set = read_h5(self.h5)
            feature_set.from_cache = True
            if feature_set.features.shape != (manifest["num_patches"], manifest["dim"]):
                raise ValueError(f"features {feature_set.features.shape} differ from the manifest")
        except (OSError, ValueError, KeyError, PathflipError) as exc:
            self.discard_complete(reason=str(exc))
            return None
        self._remove_finished_leftovers()
        return feature_set

    def discard_complete(self, reason: str = "") -> None:
        """Forget a damaged finished store (the manifest goes first, so a crash here leaves it unfinished)."""
        self.last_damage = reason
        self.manifest.unlink(missing_ok=True)
        self.h5.unlink(missing_ok=True)
        _VERIFIED.pop(str(self.h5), None)

    def finish(self, feature_set: FeatureSet) -> FeatureSet:
        """Write features.h5, then the manifest (the atomic completion mark), then drop the chunks."""
        write_h5(feature_set, self.h5)
        manifest = {
            "complete": True,
            "format": FORMAT_VERSION,
            "key": self.key,
            "num_patches": int(feature_set.features.shape[0]),
            "dim": int(feature_set.features.shape[1]),
            "dtype": str(feature_set.features.dtype),
            "size": self.h5.stat().st_size,
            "sha256": sha256_of(self.h5),
            "encoder_id": feature_set.attrs.get("encoder_id"),
            "slide_fingerprint": feature_set.attrs.get("slide_fingerprint"),
            "slide_name": feature_set.attrs.get("slide_name"),
        }
        _write_json(self.manifest, manifest)
        stat = self.h5.stat()
        _VERIFIED[str(self.h5)] = (stat.st_size, stat.st_mtime_ns)
        shutil.rmtree(self.chunks, ignore_errors=True)
        feature_set.path = self.h5
        return feature_set

    # -- work in progress ----------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold an exclusive lock on this store (released by the OS if the process dies, even by kill -9).

        POSIX record locks (lockf) belong to the process, so forked DataLoader workers that outlive a killed
        parent for a moment do not keep the store locked.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.dir / ".lock", os.O_CREAT | os.O_RDWR)
        try:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:  # EAGAIN / EACCES: held by another process
            os.close(self._lock_fd)
            self._lock_fd = None
            raise PathflipError(
                f"{self.dir} is being written by another process; wait for it or stop it, then run again."
            ) from exc
        self._remove_leftovers()

    def _leftovers(self) -> list[Path]:
        """Temporary files of killed writers (atomic_write names them `.<name>.<random><suffix>`): those of the
        store's own files and chunks (written only under its lock), and cached encodings' (written without it, so
        only once they are STALE_SECONDS old)."""
        found = [p for p in self.dir.glob(".*") if p.name != ".lock"]
        found += list(self.chunks.glob(".*")) if self.chunks.is_dir() else []
        now = time.time()
        return [p for p in found if not p.name.startswith(".encoding-") or now - _mtime(p) > STALE_SECONDS]

    def _remove_leftovers(self) -> None:
        """Under the store lock: temporary files of killed writers, and the chunks of a finished store."""
        for path in self._leftovers():
            path.unlink(missing_ok=True)
        if self.manifest.exists():
            shutil.rmtree(self.chunks, ignore_errors=True)

    def _remove_finished_leftovers(self) -> None:
        """Without the lock, in a finished store: the chunks a run killed after the manifest left (nobody writes a
        finished store's chunks) and stale temporary encodings. Temporary files of the store's own writes can only
        be met under the lock (`lock` removes them)."""
        shutil.rmtree(self.chunks, ignore_errors=True)
        now = time.time()
        for path in self.dir.glob(".encoding-*"):
            if now - _mtime(path) > STALE_SECONDS:
                path.unlink(missing_ok=True)

    def unlock(self) -> None:
        """Release the lock; a folder where nothing was started (the slide failed before its grid) is removed."""
        if self._lock_fd is not None:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        if not self.plan_path.exists() and not self.manifest.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    def start(self, plan: dict, coords: np.ndarray, region_ids: np.ndarray, region_origins: np.ndarray) -> dict:
        """Begin or resume: keep an existing plan and grid when they match `plan`, else start over."""
        self.dir.mkdir(parents=True, exist_ok=True)
        existing = self._read_plan()
        if existing is not None and self._same_plan(existing, plan) and self._grid_ok(existing):
            return existing
        shutil.rmtree(self.chunks, ignore_errors=True)
        self.manifest.unlink(missing_ok=True)
        self.h5.unlink(missing_ok=True)

        def write_grid(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, coords=coords, region_ids=region_ids, region_origins=region_origins)

        atomic_write(self.grid_path, write_grid)
        _write_json(self.plan_path, plan)
        return plan

    def _read_plan(self) -> dict | None:
        try:
            return json.loads(self.plan_path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _same_plan(a: dict, b: dict) -> bool:
        fields = ("key", "num_patches", "dim", "chunk_size", "dtype")
        return all(a.get(k) == b.get(k) for k in fields)

    def _grid_ok(self, plan: dict) -> bool:
        try:
            coords, _, _ = self.load_grid()
            return coords.shape == (plan["num_patches"], 2)
        except (OSError, ValueError, KeyError):
            return False

    def load_grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with np.load(self.grid_path) as grid:
            return grid["coords"], grid["region_ids"], grid["region_origins"]

    def chunk_path(self, index: int) -> Path:
        return self.chunks / f"{index:06d}.npy"

    def done_chunks(self, plan: dict) -> set[int]:
        """Chunks already written whole (a file that does not load as the expected shape is deleted)."""
        done = set()
        if not self.chunks.is_dir():
            return done
        for path in self.chunks.glob("*.npy"):
            index = int(path.stem)
            try:
                array = np.load(path, mmap_mode="r")
                ok = array.shape == (self.chunk_length(plan, index), plan["dim"]) and str(array.dtype) == plan["dtype"]
            except (ValueError, OSError):
                ok = False
            if ok:
                done.add(index)
            else:
                path.unlink(missing_ok=True)
        return done

    @staticmethod
    def chunk_length(plan: dict, index: int) -> int:
        return min(plan["chunk_size"], plan["num_patches"] - index * plan["chunk_size"])

    def write_chunk(self, index: int, features: np.ndarray) -> None:
        self.chunks.mkdir(parents=True, exist_ok=True)
        atomic_write(self.chunk_path(index), lambda tmp: np.save(open(tmp, "wb"), features))

    def gather(self, plan: dict) -> np.ndarray:
        n_chunks = -(-plan["num_patches"] // plan["chunk_size"])
        if n_chunks == 0:
            return np.zeros((0, plan["dim"]), dtype=plan["dtype"])
        return np.concatenate([np.load(self.chunk_path(i)) for i in range(n_chunks)])


def import_h5(
    h5_path: str | os.PathLike,
    store_root: str | os.PathLike,
    slide,
    *,
    encoder_id: str | None = None,
    patch_size_level0: int | None = None,
) -> FeatureSet:
    """Bring features computed elsewhere (CLAM/TRIDENT HDF5) into the store for `slide` (a Slide).

    They are stored under encoder id `imported:<encoder_id or file name>` and returned; later requests for the
    same slide and encoder id find them like any finished extraction.
    """
    feature_set = read_h5(h5_path, patch_size_level0=patch_size_level0)
    coords = feature_set.coords
    width, height = slide.dimensions
    if len(coords) and (coords.min() < 0 or coords[:, 0].max() >= width or coords[:, 1].max() >= height):
        raise PathflipError(
            f"{h5_path}: coordinates reach ({coords[:, 0].max()}, {coords[:, 1].max()}) but {slide.path} is "
            f"{width} x {height} px at level 0; these features belong to another slide."
        )
    encoder_id = f"imported:{encoder_id or feature_set.attrs.get('encoder_id') or Path(h5_path).stem}"
    attrs = {**feature_set.attrs, "encoder_id": encoder_id, "slide_fingerprint": slide.fingerprint,
             "slide_path": slide.path, "slide_name": slide.name, "imported_from": str(h5_path)}
    key = store_key(slide.fingerprint, encoder_id, {"imported": int(attrs["patch_size_level0"])}, None,
                    str(feature_set.features.dtype))
    store = SlideStore(store_root, slide.name, key)
    store.dir.mkdir(parents=True, exist_ok=True)
    feature_set.attrs = attrs
    return store.finish(feature_set)


def export_h5(feature_set: FeatureSet, path: str | os.PathLike) -> Path:
    """Write a FeatureSet as a CLAM/TRIDENT HDF5 file (`features`, `coords` + TRIDENT attributes)."""
    return write_h5(feature_set, path)


def find_feature_sets(store_root: str | os.PathLike, fingerprint: str) -> list[tuple[str, Path]]:
    """(encoder id, features.h5) of every finished store of the slide with `fingerprint` under `store_root`."""
    found = []
    for manifest in sorted(Path(store_root).glob("*/manifest.json")):
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if data.get("slide_fingerprint") == fingerprint:
            found.append((data.get("encoder_id"), manifest.parent / "features.h5"))
    return found
