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

Integrity (format 2): every chunk ends in a crc32c checksum (zarr's own codec, checked on every read) and every chunk
is written, empty ones too, so a missing chunk file is damage rather than zeros. Opening a table checks that every
chunk covering the committed rows is there and that every row's encoding file exists; a checksum that fails on
read is a PathflipError naming the library. `check_table` decodes everything (`pathflip verify`), `repair_table`
rewrites the table from its readable rows (`pathflip index --repair` then indexes the dropped slides again from the
feature cache). Format-1 tables (before checksums) still open and append; damage in them cannot be detected.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import PathflipError
from ..files import atomic_write
from ..weights import WeightsFolder

FORMAT_VERSION = 2  # 2: crc32c on every chunk, empty chunks written; 1: neither (still read and appended)
CHECKSUMMED = 2  # the first format whose chunks carry checksums
TABLE = "library.zarr"
REBUILT = ".rebuilt"  # suffix of the table repair_table writes before it replaces TABLE
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
    candidates: int = 40  # rows region search scans for places (at least twice the hits asked for)
    cached_encodings: int = 64  # encodings kept in memory between searches (the panel's queries share candidates)
    seed: int = 0  # k-means initialisation
    # what `like` compares slides by, beside their slide embeddings: the evidence for each of these findings
    like_terms: tuple[str, ...] = ("tumour", "necrosis", "lymphocytes", "lymphoid aggregate", "fat",
                                   "fibrous stroma", "normal glands", "mucin", "haemorrhage", "calcification",
                                   "inflammation", "keratin")


def is_library(path) -> bool:
    # a table repair_table rebuilt counts too: the next lock puts it in place (a run killed between two renames)
    return any((Path(path) / name / "zarr.json").is_file() for name in (TABLE, TABLE + REBUILT))


def repair_hint(folder: Path) -> str:
    return (f"Run `pathflip index --repair --out {folder}` (it keeps the readable rows and indexes the damaged "
            f"slides again from the feature cache); `pathflip verify {folder}` lists the damage")


class LibraryDamaged(PathflipError):
    """The table of a library is damaged: missing or corrupt chunks, missing encoding files."""


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
            _finish_rebuild(folder)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def indexing(folder: Path, on_wait: Callable[[str], None] | None = None):
    """Held by an `index` run from before it reads which slides the library holds until its last commit: a second
    run into the same library waits for the first (`on_wait` is told once) and then skips what the first added.
    One lock per torchrun rank, so the ranks of a sharded run go on side by side."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".index-rank{os.environ.get('RANK', '0')}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(f"another `pathflip index` is writing to {folder}: waiting for it to finish")
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
    with _locked(folder):
        wanted = {"weights_id": weights.id, "encoder": encoder, "prototypes": config.prototypes,
                  "embed_dim": embed_dim}
        if is_library(folder):
            attrs = dict(_open(folder).attrs)
            differs = {k: (attrs.get(k), v) for k, v in wanted.items() if attrs.get(k) != v}
            if differs:
                raise PathflipError(
                    f"{folder} was indexed with weights {attrs.get('weights')} (id {attrs.get('weights_id')}), "
                    f"encoder {attrs.get('encoder')} and {attrs.get('prototypes')} prototypes; this run differs in "
                    f"{', '.join(differs)}. Index into a new library (--out) or use the settings it was built with.")
            return
        attrs = {**wanted, "weights": str(weights.path.resolve()), "cache": stored_path(folder, cache),
                 "thumbnail": config.thumbnail, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _create_table(folder / TABLE, attrs)


def _columns(prototypes: int, thumbnail: int, embed_dim: int) -> dict[str, tuple[tuple, str, int]]:
    """name -> (row shape, dtype, rows per chunk) of every column; strings are ROW_STRINGS."""
    k, t = prototypes, thumbnail
    return {
        "mpp": ((2,), "f8", 4096), "size": ((2,), "i8", 4096), "patches": ((), "i8", 4096),
        "regions": ((), "i8", 4096), "region_start": ((), "i8", 4096),
        # float16 on disk (half the bytes; the bound needs no more), float32 in memory
        "slide_embedding": ((embed_dim,), "f4", 1024), "prototypes": ((k, embed_dim), "f2", 64),
        "prototype_share": ((k,), "f4", 1024), "prototype_region": ((k,), "i8", 1024),
        "prototype_patches": ((k,), "i8", 1024), "thumbnail": ((t, t, 3), "u1", 16),
        "region_embeddings": ((embed_dim,), "f4", 4096), "region_boxes": ((4,), "i8", 4096),
    }


def _create_table(path: Path, attrs: dict):
    """An empty table at `path` (format FORMAT_VERSION, checksummed) with `attrs` (weights, encoder, prototypes,
    embed_dim, thumbnail, ...)."""
    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec

    group = zarr.open_group(path, mode="w")
    codecs = [ZstdCodec(level=0), Crc32cCodec()]  # the checksum covers the compressed bytes as stored
    for name in ROW_STRINGS:
        group.create_array(name, shape=(0,), dtype=str, chunks=(4096,), compressors=codecs)
    for name, (shape, dtype, rows) in _columns(attrs["prototypes"], attrs["thumbnail"], attrs["embed_dim"]).items():
        group.create_array(name, shape=(0, *shape), dtype=dtype, chunks=(rows, *shape), compressors=codecs)
    group.attrs.update({**attrs, "format": FORMAT_VERSION, "count": 0, "region_rows": 0})
    return group


def recorded_weights(folder: Path) -> str | None:
    """The weights folder an existing library was indexed with."""
    return _open(folder).attrs["weights"] if is_library(folder) else None


def _open(folder: Path, mode: str = "r"):
    """The table's zarr group; unreadable metadata is a LibraryDamaged error (never a traceback)."""
    import zarr

    if not (folder / TABLE).is_dir() and (folder / (TABLE + REBUILT)).is_dir():
        with _locked(folder):  # a repair killed between its two renames: taking the lock finishes it
            pass
    try:
        group = zarr.open_group(folder / TABLE, mode=mode)
        int(group.attrs["count"]), int(group.attrs["region_rows"])
        return group
    except Exception as exc:  # zarr.json missing fields, invalid JSON, ...
        raise LibraryDamaged(f"the table of the library {folder} cannot be opened ({type(exc).__name__}: {exc}): its "
                             f"metadata ({TABLE}/zarr.json) is damaged. Index the slides into a new library "
                             "(the feature cache makes that quick).") from exc


def _pending_dir(folder: Path) -> Path:
    return folder / PENDING


def pending_files(folder: Path) -> list[Path]:
    """Finished slides waiting for `commit`, oldest first (temporary files of a write in progress left out)."""
    pending = _pending_dir(Path(folder))
    if not pending.is_dir():
        return []
    return sorted((p for p in pending.glob("*.npz") if not p.name.startswith(".")),
                  key=lambda p: p.stat().st_mtime_ns)


def write_pending(folder: Path, entry: dict[str, np.ndarray]) -> None:
    """Keep a finished slide's row (index.py makes it) until `commit` appends it to the table. Written under the
    library lock, so a temporary file in pending/ that `commit` finds belongs to a killed run."""
    pending = _pending_dir(folder)
    pending.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        atomic_write(pending / f"{entry['fingerprint']}.npz", lambda tmp: np.savez(tmp, **entry), suffix=".npz")


@contextlib.contextmanager
def _writing():
    """Every chunk written, empty ones too: a missing chunk file is then damage (format 2, module docstring)."""
    import zarr

    with zarr.config.set({"array.write_empty_chunks": True}):
        yield


def commit(folder, batch: int = 256, then: Callable[[Path], object] | None = None) -> int:
    """Append the pending slides to the table (under the library lock) and remove them; returns the row count.
    `then(folder)` runs after the rows are in, still under the lock.

    Rows are appended, then `count` is stored, then the pending files go: a run killed in between leaves rows
    past `count` (cut off by the next commit) or pending files already in the table (dropped). A damaged table is
    a LibraryDamaged error before anything is appended (rows read as fill values would let slides in twice)."""
    folder = Path(folder)
    with _locked(folder), _writing():
        group = _open(folder, mode="r+")
        count, region_rows = int(group.attrs["count"]), int(group.attrs["region_rows"])
        _raise_damage(folder, group)
        known = set(_read(folder, group, "fingerprint", slice(0, count)).tolist()) if count else set()
        _remove_leftovers(folder)
        # in the order they were finished (a single process: the order of its slides)
        files = pending_files(folder)
        for start in range(0, len(files), batch):
            entries, done = [], []
            for file in files[start:start + batch]:
                entry = _read_pending(file)
                if entry is not None and str(entry["fingerprint"]) not in known:
                    known.add(str(entry["fingerprint"]))
                    entries.append(entry)
                done.append(file)
            if entries:
                count, region_rows = _append(group, count, region_rows, entries)
            for file in done:
                file.unlink()
        if then is not None:  # e.g. ann.update: the search index follows the committed rows, under the same lock
            then(folder)
        return count


def _read_pending(file: Path) -> dict[str, np.ndarray] | None:
    """A pending row; None for a damaged file (its slide is indexed again by the next run: not in the table)."""
    try:
        with np.load(file, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def _remove_leftovers(folder: Path) -> None:
    """Temporary files of killed writers: in pending/ (write_pending writes under the lock this runs under) and the
    `.partial` chunk files zarr writes before renaming them (the table is written under the same lock)."""
    pending = _pending_dir(folder)
    leftovers = list(pending.glob(".*")) if pending.is_dir() else []
    for leftover in leftovers + list((folder / TABLE).rglob("*.partial")):
        leftover.unlink(missing_ok=True)


def append_rows(folder, entries: list[dict[str, np.ndarray]]) -> int:
    """Append rows made elsewhere (each as index.py makes a slide's row) straight to the table, under the library
    lock; returns the row count. Indexing goes through `write_pending` + `commit` instead (resumable)."""
    folder = Path(folder)
    with _locked(folder), _writing():
        group = _open(folder, mode="r+")
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
    """The slides in the table or waiting to be committed (by content fingerprint). A damaged table is a
    LibraryDamaged error: a fingerprint read as a fill value would let its slide in a second time."""
    table = Table(folder)
    known = set(table.strings("fingerprint").tolist()) if table.count else set()
    known.update(p.stem for p in pending_files(folder))
    return known


# ------------------------------------------------------------------------------------------------------ integrity
def _chunks(group, name: str, rows: int):
    """(start, stop, chunk file, its key in the table) of each chunk of column `name` that holds some of its first
    `rows` rows."""
    array = group[name]
    step = array.chunks[0]
    folder = Path(str(group.store.root)) / group.path / name if group.path else Path(str(group.store.root)) / name
    for index, start in enumerate(range(0, rows, step)):
        key = array.metadata.encode_chunk_key((index, *(0,) * (array.ndim - 1)))
        yield start, min(start + step, rows), folder / key, f"{name}/{key}"


def _limits(group) -> dict[str, int]:
    """Committed rows of every column (`region_rows` for the region columns, `count` for the others)."""
    count, region_rows = int(group.attrs["count"]), int(group.attrs["region_rows"])
    return {name: region_rows if name in REGION_COLUMNS else count for name, _ in group.arrays()}


def _missing(group) -> dict[str, list[tuple[int, int, str]]]:
    """Column -> (start, stop, why) of chunks that cannot hold the committed rows: a column shorter than them, or
    (checksummed tables, where every chunk is written) a chunk file that is not there."""
    missing: dict[str, list[tuple[int, int, str]]] = {}
    checksummed = int(group.attrs.get("format", 1)) >= CHECKSUMMED
    for name, rows in _limits(group).items():
        if group[name].shape[0] < rows:
            missing.setdefault(name, []).append((group[name].shape[0], rows, "rows missing (the column is short)"))
            rows = group[name].shape[0]
        if checksummed:
            for start, stop, path, key in _chunks(group, name, rows):
                if not path.is_file():
                    missing.setdefault(name, []).append((start, stop, f"chunk {key} missing"))
    return missing


def _raise_damage(folder: Path, group) -> None:
    """LibraryDamaged naming the first missing chunks, when there are any (the cheap check: no decoding)."""
    missing = _missing(group)
    if missing:
        parts = [f"rows {start}-{stop - 1} ({why})" for name, spans in missing.items()
                 for start, stop, why in spans]
        raise LibraryDamaged(f"the library {folder} is damaged: {'; '.join(parts[:3])}"
                             f"{f' and {len(parts) - 3} more' if len(parts) > 3 else ''}. {repair_hint(folder)}.")


def _read(folder: Path, group, name: str, rows):
    """group[name][rows]; a chunk that fails its checksum or does not decode is a LibraryDamaged error."""
    try:
        return group[name][rows]
    except Exception as exc:  # zarr raises ValueError (checksum), RuntimeError (zstd), ... for damaged chunks
        raise LibraryDamaged(f"the library {folder} is damaged: a chunk of {name} {_decode_failure(exc)}. "
                             f"{repair_hint(folder)}.") from exc


def _decode_failure(exc: Exception) -> str:
    if "checksum" in str(exc).lower():
        return "fails its checksum (changed on disk)"
    return f"does not decode ({type(exc).__name__}: {exc}; truncated or garbled)"


@dataclass
class TableCheck:
    """What `check_table` found: rows that cannot be read back whole, each with why, and notes."""

    count: int = 0
    pending: int = 0
    damaged: dict[int, str] = field(default_factory=dict)  # row -> why
    notes: list[str] = field(default_factory=list)
    checksummed: bool = True


def check_table(folder) -> TableCheck:
    """Decode every chunk of the committed rows (checksums checked) and test every row's encoding file: which rows
    are damaged and why. The slow, thorough check of `pathflip verify` and `repair_table`."""
    folder = Path(folder)
    group = _open(folder)
    check = TableCheck(count=int(group.attrs["count"]), pending=len(pending_files(folder)),
                       checksummed=int(group.attrs.get("format", 1)) >= CHECKSUMMED)
    if not check.checksummed:
        check.notes.append(f"format {group.attrs.get('format', 1)} table, written before checksums: a damaged chunk "
                           f"may go unnoticed; `pathflip index --repair --out {folder}` rewrites it with checksums")
    bad: dict[str, list[tuple[int, int, str]]] = _missing(group)
    for name, rows in _limits(group).items():
        known = {(a, b) for a, b, _ in bad.get(name, [])}
        for start, stop, _, key in _chunks(group, name, min(rows, group[name].shape[0])):
            if (start, stop) in known:
                continue
            try:
                group[name][start:stop]
            except Exception as exc:
                bad.setdefault(name, []).append((start, stop, f"chunk {key} {_decode_failure(exc)}"))

    def mark(rows, why):
        for row in rows:
            check.damaged.setdefault(int(row), why)

    for name, spans in bad.items():
        if name not in REGION_COLUMNS:
            for start, stop, why in spans:
                mark(range(start, stop), f"{name}: {why}")
    # region rows belong to the slides whose [region_start, region_start + regions) overlaps them
    readable = [r for r in range(check.count) if r not in check.damaged]
    if any(name in bad for name in REGION_COLUMNS) and readable:
        starts = group["region_start"].oindex[np.array(readable)]
        counts = group["regions"].oindex[np.array(readable)]
        for name in REGION_COLUMNS:
            for start, stop, why in bad.get(name, []):
                hit = (starts < stop) & (starts + counts > start)
                mark(np.array(readable)[hit], f"{name}: {why}")
    # every row's encoding file: there, and a whole zip (each member carries a CRC-32)
    names = _strings_or_none(group, "encoding", check.count)
    if names is not None:
        for row, stored in enumerate(names):
            if row in check.damaged:
                continue
            path = resolve_stored(folder, stored)
            try:
                with zipfile.ZipFile(path) as archive:
                    broken = archive.testzip()
                if broken is not None:
                    mark([row], f"encoding file {path} is damaged ({broken} fails its CRC)")
            except FileNotFoundError:
                mark([row], f"encoding file {path} is missing")
            except (OSError, zipfile.BadZipFile) as exc:
                mark([row], f"encoding file {path} cannot be read ({exc})")
    return check


def _strings_or_none(group, name: str, count: int) -> list[str] | None:
    try:
        return [str(v) for v in group[name][:count].tolist()]
    except Exception:  # damaged: reported per chunk already
        return None


# ------------------------------------------------------------------------------------------------------- repair
@dataclass
class Repair:
    """What `repair_table` did: rows kept, and the dropped ones as (slide path or None when unknown, why)."""

    kept: int = 0
    dropped: list[tuple[str | None, str]] = field(default_factory=list)
    rewritten: bool = False  # False: nothing was damaged and the table already had checksums


def repair_table(folder, batch: int = 256) -> Repair:
    """Rewrite the table from its readable rows (under the library lock), checksummed; the damaged rows are dropped
    and returned with the slide they belong to where the table or the feature cache still says it (index.py
    indexes those slides again, from the feature cache). The new table replaces the old one by renaming, and a run
    killed in between finishes the swap on the next open."""
    import shutil

    folder = Path(folder)
    with _locked(folder), _writing():
        if not is_library(folder):
            raise PathflipError(f"{folder} is not a slide library (no {TABLE} in it): nothing to repair.")
        check = check_table(folder)
        group = _open(folder)
        repair = Repair(kept=check.count - len(check.damaged))
        if not check.damaged and check.checksummed:
            return repair
        paths = _strings_or_none(group, "path", check.count)
        encodings = _strings_or_none(group, "encoding", check.count)
        for row, why in sorted(check.damaged.items()):
            path = paths[row] if paths is not None and paths[row] else None
            if path is None and encodings is not None and encodings[row]:
                path = _slide_of_store(resolve_stored(folder, encodings[row]).parent)
            repair.dropped.append((path, why))
        rebuilt = folder / (TABLE + REBUILT)
        shutil.rmtree(rebuilt, ignore_errors=True)
        attrs = {k: v for k, v in group.attrs.items() if k not in ("count", "region_rows", "format")}
        new = _create_table(rebuilt, {**attrs, "repaired": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        keep = [r for r in range(check.count) if r not in check.damaged]
        count = region_rows = 0
        row_names = [name for name, _ in group.arrays() if name not in REGION_COLUMNS and name != "region_start"]
        for start in range(0, len(keep), batch):
            rows = np.array(keep[start:start + batch])
            columns = {name: group[name].oindex[rows] for name in row_names}
            firsts, sizes = group["region_start"].oindex[rows], group["regions"].oindex[rows]
            entries = []
            for i in range(len(rows)):
                entry = {name: columns[name][i] for name in row_names}
                for name in REGION_COLUMNS:
                    entry[name] = group[name][int(firsts[i]):int(firsts[i]) + int(sizes[i])]
                entries.append(entry)
            if entries:
                count, region_rows = _append(new, count, region_rows, entries)
        new.attrs["complete"] = True  # the swap below may now finish, also in a later run
        _finish_rebuild(folder)
        repair.rewritten = True
        return repair


def _finish_rebuild(folder: Path) -> None:
    """Put a complete rebuilt table (repair_table) in place of the old one; drop an incomplete one."""
    import json
    import shutil

    rebuilt, old = folder / (TABLE + REBUILT), folder / (TABLE + ".old")
    if not rebuilt.is_dir():
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        return
    try:
        complete = json.loads((rebuilt / "zarr.json").read_text())["attributes"].get("complete", False)
    except (OSError, ValueError, KeyError):
        complete = False
    if not complete:
        if (folder / TABLE).is_dir():  # a repair killed while writing: the old table is still in place
            shutil.rmtree(rebuilt, ignore_errors=True)
        return
    if (folder / TABLE).is_dir():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder / TABLE, old)
    os.replace(rebuilt, folder / TABLE)
    shutil.rmtree(old, ignore_errors=True)


def _slide_of_store(store: Path) -> str | None:
    """The slide a feature store folder was made from (its plan.json), or None."""
    import json

    try:
        return str(json.loads((store / "plan.json").read_text())["slide"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------------------------- reading
class Table:
    """The committed rows of a library's table, read-only (rows past `count`: an append that never committed).

    Opening it checks that every chunk of the committed rows and every row's encoding file is there (format 2);
    a chunk that fails its checksum when read is a LibraryDamaged error that says how to repair the library."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not is_library(self.folder):
            raise PathflipError(f"{self.folder} is not a slide library (no {TABLE} in it): build one with "
                                "`pathflip index SLIDES --out FOLDER`.")
        self._group = _open(self.folder)
        self.attrs = dict(self._group.attrs)
        self.count = int(self.attrs["count"])
        _raise_damage(self.folder, self._group)
        # os.path for 100,000 rows: pathlib took 1.6 s of a 4.5 s open
        missing = [resolve_stored(self.folder, stored) for stored in sorted(set(self.strings("encoding")))
                   if not os.path.isfile(os.path.join(self.folder, stored))]
        if missing:
            raise LibraryDamaged(f"the library {self.folder} is damaged: {len(missing)} encoding file(s) are missing "
                                 f"(e.g. {missing[0]}). {repair_hint(self.folder)}.")

    @property
    def pending(self) -> int:
        """Finished slides not yet in the table (an interrupted `index`; the next index or commit adds them)."""
        return len(pending_files(self.folder))

    def column(self, name: str) -> np.ndarray:
        return _read(self.folder, self._group, name, slice(0, self.count))

    def strings(self, name: str) -> np.ndarray:
        return np.array(self.column(name).tolist(), dtype=str)

    def thumbnail(self, row: int) -> np.ndarray:
        return _read(self.folder, self._group, "thumbnail", row)

    def regions(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [N, d], level-0 boxes [N, 4]) of the regions of one row."""
        start = int(_read(self.folder, self._group, "region_start", row))
        n = int(_read(self.folder, self._group, "regions", row))
        return (_read(self.folder, self._group, "region_embeddings", slice(start, start + n)),
                _read(self.folder, self._group, "region_boxes", slice(start, start + n)))
