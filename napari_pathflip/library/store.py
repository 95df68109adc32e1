"""The library's table: a Zarr v3 group, one row per slide, grown by appending rows under a lock.

A library folder:

    library.zarr/      the table, one row per slide (rows 0 .. count-1; `count` in its attributes):
        path, name, fingerprint, encoding          [S] string   slide file, file name, content fingerprint,
                                                                cached encoding (relative to the folder inside it)
        mpp [S, 2] float64 (NaN: unknown), size [S, 2] int64 level-0 (width, height), patches, regions [S] int64
        slide_embedding [S, d] float32                           the PathFLIP slide embedding
        region_start [S] int64 -> region_embeddings [R, d] float32, region_boxes [R, 4] int64 level-0 (x0, y0, x1, y1)
        prototypes [S, K, d] float16, prototype_share [S, K] float32, prototype_region [S, K] int64,
        prototype_patches [S, K] int64                           the first search stage (search.py)
        thumbnail [S, T, T, 3] uint8                             the slide on white, aspect kept
        attributes: format, count, region_rows, weights (folder) + weights_id, encoder, cache, prototypes, ...
    cache/             feature stores and cached encodings (analysis.py), unless --cache put them elsewhere
    pending/           finished slides not yet in the table: <fingerprint>.npz, appended by `commit`

Why zarr (v3) and not parquet: zarr is already a dependency (the slide reader uses it through tiffslide), parquet
would add pyarrow; the table grows by appending rows in place (a rerun adds the new slides without rewriting the
rest) and every chunk file is replaced atomically, with `count` committed last, so a killed run leaves the table
readable; the columns are N-d arrays (prototypes [S, K, d], thumbnails [S, T, T, 3]) that load straight into numpy
for search. Any Zarr v3 reader (zarr-python, xarray, tensorstore, zarrs, zarr.js) reads the numeric columns; the
string columns use Zarr's variable-length UTF-8 type (zarr-python >= 3).
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PathflipError
from ..files import atomic_write
from ..weights import WeightsFolder

FORMAT_VERSION = 1
TABLE = "library.zarr"
PENDING = "pending"
CACHE = "cache"
LOCK = ".lock"
# the table's per-slide columns; the region columns hold `regions` rows per slide from `region_start` on
ROW_STRINGS = ("path", "name", "fingerprint", "encoding")
REGION_COLUMNS = ("region_embeddings", "region_boxes")


@dataclass
class LibraryConfig:
    prototypes: int = 32  # k-means clusters of a slide's patch-head embeddings kept for the first search stage
    thumbnail: int = 128  # thumbnail side in pixels
    candidates: int = 40  # rows the first stage passes to exact scoring (at least twice the hits asked for)
    cached_encodings: int = 64  # encodings kept in memory between searches (the panel's queries share candidates)
    seed: int = 0  # k-means initialisation
    # what `like` compares slides by, beside their slide embeddings: the evidence for each of these findings
    like_terms: tuple[str, ...] = ("tumour", "necrosis", "lymphocytes", "lymphoid aggregate", "fat",
                                   "fibrous stroma", "normal glands", "mucin", "haemorrhage", "calcification",
                                   "inflammation", "keratin")


def is_library(path) -> bool:
    return (Path(path) / TABLE / "zarr.json").is_file()


def stored_path(folder: Path, path: Path) -> str:
    """How the table records a path: relative to the library folder when inside it (the folder can move)."""
    return str(path.relative_to(folder) if path.is_relative_to(folder) else path)


def resolve_stored(folder: Path, stored: str) -> Path:
    """The path a recorded one stands for (see stored_path)."""
    return folder / stored  # an absolute `stored` stays itself


@contextlib.contextmanager
def _locked(folder: Path):
    """Exclusive lock on the library (creating the table, appending rows): processes of a sharded run queue."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------------- writing
def prepare_table(folder: Path, weights: WeightsFolder, encoder: str, cache: Path, embed_dim: int,
                  config: LibraryConfig) -> None:
    """Create the empty table, or check that an existing one was built the same way (same weights, encoder and
    prototype count: rows made otherwise could not be compared)."""
    import zarr

    with _locked(folder):
        wanted = {"weights_id": weights.id, "encoder": encoder, "prototypes": config.prototypes,
                  "embed_dim": embed_dim}
        if is_library(folder):
            attrs = dict(zarr.open_group(folder / TABLE, mode="r").attrs)
            differs = {k: (attrs.get(k), v) for k, v in wanted.items() if attrs.get(k) != v}
            if differs:
                raise PathflipError(
                    f"{folder} was indexed with weights {attrs.get('weights')} (id {attrs.get('weights_id')}), "
                    f"encoder {attrs.get('encoder')} and {attrs.get('prototypes')} prototypes; this run differs in "
                    f"{', '.join(differs)}. Index into a new library (--out) or use the settings it was built with.")
            return
        group = zarr.open_group(folder / TABLE, mode="w")
        k, t = config.prototypes, config.thumbnail
        columns = {
            "mpp": ((2,), "f8", 4096), "size": ((2,), "i8", 4096), "patches": ((), "i8", 4096),
            "regions": ((), "i8", 4096), "region_start": ((), "i8", 4096),
            # float16 on disk (half the bytes; the bound needs no more), float32 in memory
            "slide_embedding": ((embed_dim,), "f4", 1024), "prototypes": ((k, embed_dim), "f2", 64),
            "prototype_share": ((k,), "f4", 1024), "prototype_region": ((k,), "i8", 1024),
            "prototype_patches": ((k,), "i8", 1024), "thumbnail": ((t, t, 3), "u1", 16),
            "region_embeddings": ((embed_dim,), "f4", 4096), "region_boxes": ((4,), "i8", 4096),
        }
        for name in ROW_STRINGS:
            group.create_array(name, shape=(0,), dtype=str, chunks=(4096,))
        for name, (shape, dtype, rows) in columns.items():
            group.create_array(name, shape=(0, *shape), dtype=dtype, chunks=(rows, *shape))
        group.attrs.update({**wanted, "format": FORMAT_VERSION, "count": 0, "region_rows": 0,
                            "weights": str(weights.path.resolve()), "cache": stored_path(folder, cache),
                            "thumbnail": t, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def recorded_weights(folder: Path) -> str | None:
    """The weights folder an existing library was indexed with."""
    import zarr

    return zarr.open_group(folder / TABLE, mode="r").attrs["weights"] if is_library(folder) else None


def _pending_dir(folder: Path) -> Path:
    return folder / PENDING


def write_pending(folder: Path, entry: dict[str, np.ndarray]) -> None:
    """Keep a finished slide's row (index.py makes it) until `commit` appends it to the table."""
    pending = _pending_dir(folder)
    pending.mkdir(parents=True, exist_ok=True)
    atomic_write(pending / f"{entry['fingerprint']}.npz", lambda tmp: np.savez(tmp, **entry), suffix=".npz")


def commit(folder, batch: int = 256) -> int:
    """Append the pending slides to the table (under the library lock) and remove them; returns the row count.

    Rows are appended, then `count` is stored, then the pending files go: a run killed in between leaves rows
    past `count` (cut off by the next commit) or pending files already in the table (dropped)."""
    import zarr

    folder = Path(folder)
    with _locked(folder):
        group = zarr.open_group(folder / TABLE, mode="r+")
        count, region_rows = int(group.attrs["count"]), int(group.attrs["region_rows"])
        known = set(group["fingerprint"][:count].tolist()) if count else set()
        # in the order they were finished (a single process: the order of its slides)
        files = sorted(_pending_dir(folder).glob("*.npz"), key=lambda p: p.stat().st_mtime_ns) \
            if _pending_dir(folder).is_dir() else []
        for start in range(0, len(files), batch):
            entries, done = [], []
            for file in files[start:start + batch]:
                with np.load(file, allow_pickle=False) as data:
                    entry = {k: data[k] for k in data.files}
                if str(entry["fingerprint"]) not in known:
                    known.add(str(entry["fingerprint"]))
                    entries.append(entry)
                done.append(file)
            if entries:
                count, region_rows = _append(group, count, region_rows, entries)
            for file in done:
                file.unlink()
        return count


def append_rows(folder, entries: list[dict[str, np.ndarray]]) -> int:
    """Append rows made elsewhere (each as index.py makes a slide's row) straight to the table, under the library
    lock; returns the row count. Indexing goes through `write_pending` + `commit` instead (resumable)."""
    import zarr

    folder = Path(folder)
    with _locked(folder):
        group = zarr.open_group(folder / TABLE, mode="r+")
        count, _ = _append(group, int(group.attrs["count"]), int(group.attrs["region_rows"]), entries)
        return count


def _append(group, count: int, region_rows: int, entries: list[dict]) -> tuple[int, int]:
    for name, array in group.arrays():
        committed = region_rows if name in REGION_COLUMNS else count
        if array.shape[0] != committed:  # rows of an append that never committed
            array.resize((committed, *array.shape[1:]))
    starts = region_rows + np.cumsum([0] + [len(e["region_boxes"]) for e in entries[:-1]])
    rows = {name: np.stack([e[name] for e in entries]) for name in entries[0] if name not in REGION_COLUMNS}
    rows["region_start"] = starts.astype(np.int64)
    for name in ROW_STRINGS:
        rows[name] = rows[name].astype(str).astype(object)
    for name, values in rows.items():
        group[name].append(values)
    for name in REGION_COLUMNS:
        group[name].append(np.concatenate([e[name] for e in entries]))
    count, region_rows = count + len(entries), region_rows + sum(len(e["region_boxes"]) for e in entries)
    group.attrs.update({"count": count, "region_rows": region_rows})
    return count, region_rows


def known_fingerprints(folder: Path) -> set[str]:
    """The slides in the table or waiting to be committed (by content fingerprint)."""
    import zarr

    group = zarr.open_group(folder / TABLE, mode="r")
    count = int(group.attrs["count"])
    known = set(group["fingerprint"][:count].tolist()) if count else set()
    if _pending_dir(folder).is_dir():
        known.update(p.stem for p in _pending_dir(folder).glob("*.npz"))
    return known


# ------------------------------------------------------------------------------------------------------- reading
class Table:
    """The committed rows of a library's table, read-only (rows past `count`: an append that never committed)."""

    def __init__(self, folder: Path):
        import zarr

        self.folder = Path(folder)
        if not is_library(self.folder):
            raise PathflipError(f"{self.folder} is not a slide library (no {TABLE} in it): build one with "
                                "`pathflip index SLIDES --out FOLDER`.")
        self._group = zarr.open_group(self.folder / TABLE, mode="r")
        self.attrs = dict(self._group.attrs)
        self.count = int(self.attrs["count"])

    def column(self, name: str) -> np.ndarray:
        return self._group[name][:self.count]

    def strings(self, name: str) -> np.ndarray:
        return np.array(self.column(name).tolist(), dtype=str)

    def thumbnail(self, row: int) -> np.ndarray:
        return self._group["thumbnail"][row]

    def regions(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [N, d], level-0 boxes [N, 4]) of the regions of one row."""
        start, n = int(self._group["region_start"][row]), int(self._group["regions"][row])
        return self._group["region_embeddings"][start:start + n], self._group["region_boxes"][start:start + n]
