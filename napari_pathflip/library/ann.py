"""The library's nearest-neighbour index: every slide's search prototypes in HNSW graphs (usearch) beside the table,
so that a text, a slide or a region is matched against a few hundred prototypes instead of every row.

    LIBRARY/ann/
        manifest.json                       the segments, the rows each covers and the fingerprint of its last row;
                                            written last and atomically: what it lists is the index
        rows-000000000-000010000.usearch    one HNSW graph per segment (rows [start, stop) of the table)

What is indexed: the prototypes of search.py's first stage (k-means means of a slide's patch-head embeddings, each
in its region), one vector per prototype with share > 0: [c, log(share)] with key row * K + slot. One inner product
serves every query (search.py): a text or a region vector u as [u, 1 / r] scores u.c + log(share) / r, the
first stage's bound of the region's pooled score (Jensen); [u, 0] scores u.c alone.

Why usearch (benchmarks/bench_library.py backends, 2 cores, README "Slide library"): of faiss-cpu, hnswlib and
usearch, usearch builds the graph fastest in float16 (half the memory and file of float32 graphs, no recall lost at
this dimension), opens a saved graph memory-mapped (a library opens in milliseconds, the OS pages in what a query
touches), adds vectors to a loaded graph, and ships wheels that need neither torch nor a compiler.

Growth: `update` (called by store.commit under the library lock, after the rows are committed) indexes the rows
past the last segment as a new segment; when the newest segment holds at least half as many vectors as the one
before it, the two merge: the older graph is loaded and the newer's vectors added to it (no graph is rebuilt), so a
library of S slides has O(log S) segments and every vector is re-inserted O(log S) times. A kill at any point
leaves the previous manifest and its files (segment files are written under a temporary name and renamed, then the
manifest, then unreferenced files are removed); the table's `count` is the truth: rows past the index are searched
exactly from the table until the next update, segments past `count` are ignored, and a segment whose last row no
longer holds the fingerprint it recorded (a table rebuilt) is dropped and indexed again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import atomic_write, atomic_write_json
from .store import LOCK, TABLE

ANN = "ann"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class AnnConfig:
    connectivity: int = 16  # HNSW neighbours per node (M)
    expansion_add: int = 128  # candidate list while inserting (efConstruction)
    expansion_search: int = 128  # candidate list while searching (efSearch); recall@10 >= 0.99 on 3.2 M vectors
    dtype: str = "f16"  # how vectors are stored: prototypes are float16 in the table already
    merge_ratio: float = 0.5  # merge the newest segment into the one before once it holds this share of its vectors
    rows_per_read: int = 4096  # table rows read at once while indexing
    threads: int = 0  # insertion threads (0: all cores)


def _index_class():
    from usearch.index import Index

    return Index


def index_folder(folder) -> Path:
    return Path(folder) / ANN


def _segment_name(start: int, stop: int) -> str:
    return f"rows-{start:09d}-{stop:09d}.usearch"


def prototype_vectors(prototypes: np.ndarray, share: np.ndarray, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys [n] uint64, vectors [n, d + 1] float32) of table rows first_row.. given their prototypes [S, K, d] and
    shares [S, K]; padding prototypes (share 0) are left out."""
    s, k, d = prototypes.shape
    keep = share.reshape(-1) > 0
    keys = (np.arange(first_row * k, (first_row + s) * k, dtype=np.uint64))[keep]
    vectors = np.empty((int(keep.sum()), d + 1), np.float32)
    vectors[:, :d] = prototypes.reshape(-1, d)[keep]
    vectors[:, d] = np.log(share.reshape(-1)[keep])
    return keys, vectors


# ------------------------------------------------------------------------------------------------------- manifest
def _group(folder: Path):
    import zarr

    return zarr.open_group(Path(folder) / TABLE, mode="r")


def _fingerprint(group, row: int) -> str:
    return str(group["fingerprint"][row])


def read_manifest(folder) -> dict | None:
    try:
        return json.loads((index_folder(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None  # none yet, or unreadable: indexed again


def valid_segments(folder, group, manifest: dict | None, count: int) -> list[dict]:
    """The manifest's segments that still describe the table: built for its weights and prototype count, in row
    order from row 0, their files there, and (for those inside `count`) their last row holding the recorded
    fingerprint. A segment reaching past `count` is kept for reading (its rows past count are ignored)."""
    if manifest is None or manifest.get("format") != FORMAT_VERSION:
        return []
    attrs = group.attrs
    if manifest.get("weights_id") != attrs.get("weights_id") or manifest.get("prototypes") != attrs.get("prototypes"):
        return []
    kept, start = [], 0
    for segment in manifest.get("segments", []):
        if segment["start"] != start or start >= count:
            break
        if not (index_folder(folder) / segment["file"]).is_file():
            break
        if segment["stop"] <= count and _fingerprint(group, segment["stop"] - 1) != segment["last"]:
            break
        kept.append(segment)
        start = segment["stop"]
    return kept


# --------------------------------------------------------------------------------------------------------- update
def update(folder, config: AnnConfig | None = None) -> int:
    """Index the table's rows past the last segment (the caller holds the library lock: store.commit does);
    returns the rows covered. Merges segments as the module doc says; never rebuilds a graph it can extend."""
    folder, config = Path(folder), config or AnnConfig()
    group = _group(folder)
    count = int(group.attrs["count"])
    manifest = read_manifest(folder)
    segments = [s for s in valid_segments(folder, group, manifest, count) if s["stop"] <= count]
    covered = segments[-1]["stop"] if segments else 0
    changed = manifest is None or segments != manifest.get("segments")
    if covered < count:
        segments.append(_write_segment(folder, group, covered, count, None, config))
        changed = True
    while len(segments) >= 2 and segments[-1]["vectors"] >= config.merge_ratio * segments[-2]["vectors"]:
        older, newer = segments[-2], segments.pop()
        segments[-1] = _write_segment(folder, group, newer["start"], newer["stop"], older, config)
        changed = True
    if changed:
        d = int(group["prototypes"].shape[-1])
        atomic_write_json(index_folder(folder) / MANIFEST, {
            "format": FORMAT_VERSION, "backend": "usearch", "version": _usearch_version(), "metric": "ip",
            "dtype": config.dtype, "dim": d + 1, "connectivity": config.connectivity,
            "prototypes": group.attrs["prototypes"], "weights_id": group.attrs["weights_id"], "segments": segments})
    _remove_unlisted(folder, segments)
    return segments[-1]["stop"] if segments else 0


def _usearch_version() -> str:
    import usearch

    return usearch.__version__


def _write_segment(folder: Path, group, start: int, stop: int, extend: dict | None, config: AnnConfig) -> dict:
    """Rows [start, stop) as a new segment file, or added to the graph of segment `extend` (which ends at start)."""
    d = int(group["prototypes"].shape[-1])
    if extend is None:
        index = _index_class()(ndim=d + 1, metric="ip", dtype=config.dtype, connectivity=config.connectivity,
                               expansion_add=config.expansion_add)
        first = start
    else:
        index = _index_class().restore(str(index_folder(folder) / extend["file"]), view=False)
        first = extend["start"]
    for begin in range(start, stop, config.rows_per_read):
        end = min(begin + config.rows_per_read, stop)
        keys, vectors = prototype_vectors(group["prototypes"][begin:end].astype(np.float32),
                                          group["prototype_share"][begin:end], begin)
        if len(keys):
            index.add(keys, vectors, threads=config.threads)
    name = _segment_name(first, stop)
    atomic_write(index_folder(folder) / name, lambda tmp: index.save(str(tmp)), suffix=".usearch")
    return {"file": name, "start": first, "stop": stop, "vectors": int(index.size),
            "last": _fingerprint(group, stop - 1)}


def _remove_unlisted(folder: Path, segments: list[dict]) -> None:
    """Segment files no manifest lists any more, and temporary files of killed writes (the lock is held)."""
    listed = {s["file"] for s in segments} | {MANIFEST}
    for path in index_folder(folder).glob("*"):
        if path.name not in listed and (path.suffix == ".usearch" or path.name.startswith(".")):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _try_lock(folder: Path):
    """The library lock if it is free now (yields True), else yields False at once (a commit is running)."""
    with open(folder / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def catch_up(folder, config: AnnConfig | None = None) -> bool:
    """Bring a lagging index up to the table when the lock is free and the folder writable (a reader's open);
    returns whether it ran. A busy lock means a commit is running, which updates the index itself."""
    folder = Path(folder)
    if not os.access(folder, os.W_OK):
        return False
    try:
        with _try_lock(folder) as locked:
            if locked:
                update(folder, config)
            return locked
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------- search
class PrototypeIndex:
    """The prototypes of rows [0, count) for search: the manifest's segments (memory-mapped) plus the rows past
    them read from the table and scored exactly, so a lagging index never hides a committed slide."""

    def __init__(self, folder, count: int, config: AnnConfig | None = None):
        self.folder, self.count, self.config = Path(folder), int(count), config or AnnConfig()
        group = _group(self.folder)
        self.prototypes = int(group.attrs["prototypes"])
        self.dim = int(group["prototypes"].shape[-1]) + 1
        for attempt in range(3):  # a concurrent update may remove a segment between the manifest and its file
            segments = valid_segments(self.folder, group, read_manifest(self.folder), self.count)
            try:
                self.segments = [_index_class().restore(str(index_folder(self.folder) / s["file"]), view=True)
                                 for s in segments]
                break
            except (OSError, RuntimeError, ValueError):
                if attempt == 2:
                    segments, self.segments = [], []
        for index in self.segments:
            index.expansion_search = self.config.expansion_search
        self.covered = min(segments[-1]["stop"], self.count) if segments else 0
        if self.covered < self.count:
            self.tail_keys, self.tail = prototype_vectors(
                group["prototypes"][self.covered:self.count].astype(np.float32),
                group["prototype_share"][self.covered:self.count], self.covered)
        else:
            self.tail_keys, self.tail = np.zeros(0, np.uint64), np.zeros((0, self.dim), np.float32)

    @property
    def lag(self) -> int:
        """Committed rows not in a segment yet (searched exactly)."""
        return self.count - self.covered

    def search(self, queries: np.ndarray, count: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The `count` best prototypes of rows < count for each query [Q, d + 1] by inner product: (keys [Q, n]
        int64, scores [Q, n] float32), best first (n <= count). `exact`: every vector scored (the reference)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        limit = self.count * self.prototypes
        keys, scores = [], []
        for index in self.segments:
            # rows past `count` in a segment are ignored: ask for as many more as it holds past the limit
            found = index.search(queries, count, threads=1 if len(queries) == 1 else 0, exact=exact)
            k, dist = np.atleast_2d(found.keys).astype(np.int64), np.atleast_2d(found.distances)
            valid = (k >= 0) & (k < limit) & (np.arange(k.shape[1])[None] < np.atleast_1d(found.counts)[:, None])
            keys.append(np.where(valid, k, -1))
            scores.append(np.where(valid, 1.0 - dist, -np.inf).astype(np.float32))
        if len(self.tail):
            tail = queries @ self.tail.T
            take = min(count, tail.shape[1])
            best = np.argpartition(-tail, take - 1, axis=1)[:, :take]
            keys.append(self.tail_keys[best].astype(np.int64))
            scores.append(np.take_along_axis(tail, best, 1))
        if not keys:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        keys, scores = np.concatenate(keys, 1), np.concatenate(scores, 1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :count]
        keys, scores = np.take_along_axis(keys, order, 1), np.take_along_axis(scores, order, 1)
        return keys, scores

    def vectors(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [len(rows), K, d + 1] float32, present [len(rows), K] bool) of every prototype of these rows
        (the stored float16 values; absent: padding), for scoring candidates exactly."""
        rows = np.asarray(rows, dtype=np.int64)
        k = self.prototypes
        keys = (rows[:, None] * k + np.arange(k)[None]).reshape(-1)
        out = np.zeros((len(keys), self.dim), np.float32)
        present = np.zeros(len(keys), bool)
        for index in self.segments:
            inside = ~present & index.contains(keys.astype(np.uint64))
            if inside.any():
                out[inside] = np.asarray(index.get(keys[inside].astype(np.uint64), dtype=np.float32))
                present |= inside
        if len(self.tail_keys):
            position = {int(key): i for i, key in enumerate(self.tail_keys)}
            for i, key in enumerate(keys):
                j = position.get(int(key))
                if j is not None:
                    out[i], present[i] = self.tail[j], True
        return out.reshape(len(rows), k, self.dim), present.reshape(len(rows), k)
