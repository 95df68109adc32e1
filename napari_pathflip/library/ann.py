"""The library's nearest-neighbour index: every slide's search prototypes in HNSW graphs (faiss) beside the table,
so that a text, a slide or a region is matched against a few hundred prototypes instead of every row.

    LIBRARY/ann/
        manifest.json                       the segments, the rows each covers and the fingerprint of its last row;
                                            written last and atomically: what it lists is the index
        rows-000000000-000010000.faiss      one HNSW graph per segment (rows [start, stop) of the table)

What is indexed: the prototypes of search.py's first stage (k-means means of a slide's patch-head embeddings, each
in its region), one vector per prototype with share > 0: [c, a log(share)] with key row * K + slot. One inner
product serves every query (search.py): a text or a region vector u as [u, 1 / (a r)] scores u.c + log(share) / r,
the first stage's bound of the region's pooled score (Jensen). a = SHARE_SCALE keeps every vector's norm near 1:
with log(share) itself as the last coordinate (norms 1 to 3) the graph's recall@10 fell to 0.4-0.6 (inner-product
graphs favour long vectors); with a = 0.1 it is 1.0 at efSearch 128 on the same vectors.

Connectivity: prototypes gather around the tissue types a cohort holds, and with 16 neighbours per node the graph
of bench_library.py's 320,000 clustered prototypes left whole clusters unreachable: recall@10 0.82 at efSearch 128,
0.86 at 384, some queries landing in the wrong cluster at any efSearch (the same vectors in an L2 graph after the
usual inner-product-to-L2 transform: 0.91-0.92). With 32 neighbours: 0.970 at efSearch 128, 0.978 at 256, 0.980 at
512 (0.8-1.8 ms a query), built in 133 s against 81-113 s with 16 (2 cores, under load; 50 texts).

Why faiss (measured on 2 cores, 320,000 prototype-like vectors of 257 dimensions; README "Slide library"): its HNSW
reaches recall@10 0.99 at efSearch 128 in 0.31 ms (p50) like hnswlib's (0.25 ms) and builds in 140 s against
hnswlib's 99 s and usearch's 417 s (float32); faiss ships
wheels (hnswlib 0.8.0, of 2023, compiles from source), is maintained, opens saved indexes memory-mapped, adds to a
loaded graph, and offers IVF for a cohort whose graph would take too long to build.

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
TERMS = "terms.npz"  # the `like` vocabulary in the head's text space (search.py writes it: it has the model)
PROFILES = "profiles.npy"  # [rows, terms] each slide's exact evidence for the `like` vocabulary
FORMAT_VERSION = 2  # 2: segments record their rows' patch totals (patch_totals); older indexes are built again
SHARE_SCALE = 0.1  # a of the module doc


@dataclass
class AnnConfig:
    connectivity: int = 32  # HNSW neighbours per node (M): see the module doc
    expansion_add: int = 128  # candidate list while inserting (efConstruction)
    expansion_search: int = 256  # candidate list while searching (efSearch): see the module doc
    merge_ratio: float = 0.5  # merge the newest segment into the one before once it holds this share of its vectors
    rows_per_read: int = 4096  # table rows read at once while indexing


def _faiss():
    import faiss

    return faiss


def index_folder(folder) -> Path:
    return Path(folder) / ANN


def _segment_name(start: int, stop: int) -> str:
    return f"rows-{start:09d}-{stop:09d}.faiss"


def prototype_vectors(prototypes: np.ndarray, share: np.ndarray, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys [n] int64, vectors [n, d + 1] float32) of table rows first_row.. given their prototypes [S, K, d] and
    shares [S, K]; padding prototypes (share 0) are left out."""
    s, k, d = prototypes.shape
    keep = share.reshape(-1) > 0
    keys = (np.arange(first_row * k, (first_row + s) * k, dtype=np.int64))[keep]
    vectors = np.empty((int(keep.sum()), d + 1), np.float32)
    vectors[:, :d] = prototypes.reshape(-1, d)[keep]
    vectors[:, d] = SHARE_SCALE * np.log(share.reshape(-1)[keep])
    return keys, vectors


def patch_totals(prototypes: np.ndarray, patches: np.ndarray) -> tuple[np.ndarray, int]:
    """(sum of each prototype times its patch count [d] float64, the patch count) over table rows given their
    prototypes [S, K, d] and prototype_patches [S, K]: over a library, its mean patch embedding (prototypes are
    means of their patches; the one region search centres on, search.py)."""
    counts = np.asarray(patches, dtype=np.float64)
    return np.einsum("skd,sk->d", np.asarray(prototypes, dtype=np.float64), counts), int(counts.sum())


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
        path = index_folder(folder) / segment["file"]
        # a file cut short is not a segment: mapped (IO_FLAG_MMAP_IFC), a cut inside its last page would read
        # as a graph with wrong ids (segments written before sizes were recorded: not checked)
        if not path.is_file() or segment.get("bytes", path.stat().st_size) != path.stat().st_size:
            break
        if segment["stop"] <= count and _fingerprint(group, segment["stop"] - 1) != segment["last"]:
            break
        kept.append(segment)
        start = segment["stop"]
    return kept


# --------------------------------------------------------------------------------------------------------- update
def update(folder, config: AnnConfig | None = None) -> int:
    """Index the table's rows past the last segment (the caller holds the library lock: store.commit does);
    returns the rows covered. Merges segments as the module doc says; never rebuilds a graph it can extend; adds
    the new rows' `like` profiles when the vocabulary is there. A failure (disk full) is a warning: the rows are
    committed, searched exactly until the next update catches up."""
    import warnings

    try:
        return _update(Path(folder), config or AnnConfig())
    except (OSError, RuntimeError, MemoryError) as exc:
        warnings.warn(f"the search index of {folder} was not updated ({exc}); the next index run or search "
                      "catches up", RuntimeWarning, stacklevel=2)
        return 0


def _update(folder: Path, config: AnnConfig) -> int:
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
    profiles = _update_profiles(folder, group, count, (manifest or {}).get("profiles"))
    if changed or profiles != (manifest or {}).get("profiles"):
        d = int(group["prototypes"].shape[-1])
        atomic_write_json(index_folder(folder) / MANIFEST, {
            "format": FORMAT_VERSION, "backend": "faiss", "version": _faiss().__version__, "metric": "ip",
            "index": "IDMap2,HNSW%d,Flat" % config.connectivity, "dim": d + 1,
            "prototypes": group.attrs["prototypes"], "weights_id": group.attrs["weights_id"], "segments": segments,
            "profiles": profiles})
    _remove_unlisted(folder, segments)
    return segments[-1]["stop"] if segments else 0


# ------------------------------------------------------------------------------------------------ like profiles
def read_terms(folder) -> dict | None:
    """The `like` vocabulary search.py stored: terms, their head text embeddings u [T, d], the head's pool r,
    logit scale and bias, evidence regions k and weights id; None when absent or unreadable."""
    try:
        with np.load(index_folder(folder) / TERMS, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError):
        return None


def terms_id(terms: dict) -> str:
    import hashlib

    return hashlib.sha256(b"".join(np.ascontiguousarray(terms[k]).tobytes()
                                   for k in sorted(terms))).hexdigest()[:16]


def evidence_profile(encoding_path, terms: dict) -> np.ndarray:
    """[T] the slide's evidence for each term from a cached encoding file (see profile_of)."""
    with np.load(encoding_path, allow_pickle=False) as data:
        return profile_of(data["patch_embeddings"], data["region_index"], terms)


def profile_of(embeddings: np.ndarray, index: np.ndarray, terms: dict) -> np.ndarray:
    """[T] the evidence for each term as PathFLIP.evidence computes it with a patch-text head (the mean of the k best
    region logits of the head's pooled patch similarity), from patch embeddings [P, d] and region_index [N, M]."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    similarity = terms["u"].astype(np.float32) @ embeddings.T  # [T, P]
    valid = index >= 0
    r = float(terms["pool"])
    scaled = np.where(valid[None], r * similarity[:, np.maximum(index, 0)], -np.inf)  # [T, N, M]
    top = scaled.max(-1, keepdims=True)
    pooled = (np.log(np.exp(scaled - top).sum(-1)) + top[..., 0] - np.log(valid.sum(-1).clip(min=1))) / r
    logits = pooled * float(terms["scale"]) + float(terms["bias"])  # [T, N]
    k = min(int(terms["k"]), logits.shape[1])
    return np.sort(logits, axis=1)[:, -k:].mean(1)


def _update_profiles(folder: Path, group, count: int, recorded: dict | None) -> dict | None:
    """Extend profiles.npy to every committed row (reading each new row's encoding once) when terms.npz is there
    and belongs to the table's weights; returns the manifest's record of it."""
    from .store import resolve_stored

    terms = read_terms(folder)
    if terms is None or str(terms["weights_id"]) != group.attrs["weights_id"]:
        return None
    wanted = terms_id(terms)
    have = np.zeros((0, len(terms["u"])), np.float32)
    if recorded and recorded.get("terms") == wanted:
        try:
            have = np.load(index_folder(folder) / PROFILES)[:min(int(recorded["rows"]), count)]
        except (OSError, ValueError):
            pass
    if len(have) == count:
        return {"rows": count, "terms": wanted}
    encodings = group["encoding"][len(have):count]
    done: dict[str, np.ndarray] = {}  # rows sharing an encoding file (a benchmark's) read it once
    new = np.full((count - len(have), len(terms["u"])), np.nan, np.float32)
    for i, stored in enumerate(encodings):
        path = str(resolve_stored(folder, str(stored)))
        if path not in done:
            try:
                done[path] = evidence_profile(path, terms)
            except (OSError, KeyError, ValueError):
                done[path] = np.full(len(terms["u"]), np.nan, np.float32)  # unreadable: like leaves it out
        new[i] = done[path]
    profiles = np.concatenate([have, new])
    atomic_write(index_folder(folder) / PROFILES, lambda tmp: np.save(tmp, profiles), suffix=".npy")
    return {"rows": count, "terms": wanted}


def read_profiles(folder, count: int) -> np.ndarray | None:
    """[rows <= count, T] the stored profiles of the first rows (None: none stored for the current terms)."""
    manifest, terms = read_manifest(folder), read_terms(folder)
    record = (manifest or {}).get("profiles")
    if terms is None or not record or record.get("terms") != terms_id(terms):
        return None
    try:
        return np.load(index_folder(folder) / PROFILES, mmap_mode="r")[:min(int(record["rows"]), count)]
    except (OSError, ValueError):
        return None


def _write_segment(folder: Path, group, start: int, stop: int, extend: dict | None, config: AnnConfig) -> dict:
    """Rows [start, stop) as a new segment file, or added to the graph of segment `extend` (which ends at start)."""
    faiss = _faiss()
    d = int(group["prototypes"].shape[-1])
    if extend is None:
        graph = faiss.IndexHNSWFlat(d + 1, config.connectivity, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = config.expansion_add
        index, first = faiss.IndexIDMap2(graph), start
        total, patches = np.zeros(d), 0
    else:
        index, first = faiss.read_index(str(index_folder(folder) / extend["file"])), extend["start"]
        total, patches = np.asarray(extend["patch_sum"], dtype=np.float64), int(extend["patches"])
    for begin in range(start, stop, config.rows_per_read):
        end = min(begin + config.rows_per_read, stop)
        prototypes = group["prototypes"][begin:end].astype(np.float32)
        keys, vectors = prototype_vectors(prototypes, group["prototype_share"][begin:end], begin)
        if len(keys):
            index.add_with_ids(vectors, keys)
        more, count = patch_totals(prototypes, group["prototype_patches"][begin:end])
        total, patches = total + more, patches + count
    name = _segment_name(first, stop)
    atomic_write(index_folder(folder) / name, lambda tmp: faiss.write_index(index, str(tmp)), suffix=".faiss")
    return {"file": name, "start": first, "stop": stop, "vectors": int(index.ntotal),
            "last": _fingerprint(group, stop - 1), "patch_sum": total.tolist(), "patches": patches,
            "bytes": (index_folder(folder) / name).stat().st_size}


def _remove_unlisted(folder: Path, segments: list[dict]) -> None:
    """Segment files no manifest lists any more, and temporary files of killed writes (the lock is held)."""
    listed = {s["file"] for s in segments} | {MANIFEST, TERMS, PROFILES}
    for path in index_folder(folder).glob("*"):
        if path.name not in listed and (path.suffix == ".faiss" or path.name.startswith(".")):
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


def catch_up(folder, terms: dict | None = None, config: AnnConfig | None = None) -> bool:
    """Bring a lagging index up to the table when the lock is free and the folder writable (a reader's open),
    storing the `like` vocabulary `terms` first when it differs; returns whether it ran. A busy lock means a
    commit is running, which updates the index itself."""
    folder = Path(folder)
    if not os.access(folder, os.W_OK):
        return False
    try:
        with _try_lock(folder) as locked:
            if locked:
                stored = read_terms(folder)
                if terms is not None and (stored is None or terms_id(stored) != terms_id(terms)):
                    atomic_write(index_folder(folder) / TERMS, lambda tmp: np.savez(tmp, **terms), suffix=".npz")
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
                # IO_FLAG_MMAP_IFC: the graph and the vectors stay in the mapped file (IO_FLAG_MMAP copies an
                # HNSW index into memory: 23 s for the 4 GB of 100,000 slides, 0.1 s for 10,000 mapped)
                self.segments = [_faiss().read_index(str(index_folder(self.folder) / s["file"]),
                                                     _faiss().IO_FLAG_MMAP_IFC) for s in segments]
                break
            except (OSError, RuntimeError, ValueError):
                if attempt == 2:
                    segments, self.segments = [], []
        # each segment's keys (ascending: rows are added in order), to tell which prototypes it holds
        self._keys = [_faiss().vector_to_array(index.id_map) for index in self.segments]
        self._stored: dict[int, np.ndarray] = {}
        for index in self.segments:
            _faiss().downcast_index(index.index).hnsw.efSearch = self.config.expansion_search
        self.covered = min(segments[-1]["stop"], self.count) if segments else 0
        # the library's patch totals (patch_totals): the segments' (a segment reaching past `count`, left by a
        # killed update, counts its extra rows until the next update) and the rows past them
        total = sum((np.asarray(s["patch_sum"]) for s in segments), np.zeros(self.dim - 1))
        patches = sum(int(s["patches"]) for s in segments)
        if self.covered < self.count:
            tail = group["prototypes"][self.covered:self.count].astype(np.float32)
            self.tail_keys, self.tail = prototype_vectors(tail, group["prototype_share"][self.covered:self.count],
                                                          self.covered)
            more, count = patch_totals(tail, group["prototype_patches"][self.covered:self.count])
            total, patches = total + more, patches + count
        else:
            self.tail_keys, self.tail = np.zeros(0, np.uint64), np.zeros((0, self.dim), np.float32)
        self.patch_totals = total, patches

    @property
    def lag(self) -> int:
        """Committed rows not in a segment yet (searched exactly)."""
        return self.count - self.covered

    def search(self, queries: np.ndarray, count: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The `count` best prototypes of rows < count for each query [Q, d + 1] by inner product: (keys [Q, n]
        int64, scores [Q, n] float32), best first (n <= count; key -1: none). `exact`: every stored vector scored
        (the reference the approximate search is measured against)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        limit = self.count * self.prototypes
        keys, scores = [], []
        for i, (index, held) in enumerate(zip(self.segments, self._keys)):
            if exact:
                if i not in self._stored:  # kept: the exhaustive reference is asked for many queries
                    self._stored[i] = index.index.reconstruct_n(0, index.ntotal)
                vectors = self._stored[i]
                similarity = queries @ vectors.T
                take = min(count, similarity.shape[1])
                best = np.argpartition(-similarity, take - 1, axis=1)[:, :take]
                s, k = np.take_along_axis(similarity, best, 1), held[best]
            else:
                inner = _faiss().downcast_index(index.index)
                inner.hnsw.efSearch = max(self.config.expansion_search, count)
                s, k = index.search(queries, count)
            valid = (k >= 0) & (k < limit)  # rows past `count` in a segment are ignored
            keys.append(np.where(valid, k, -1))
            scores.append(np.where(valid, s, -np.inf).astype(np.float32))
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
        for index, held in zip(self.segments, self._keys):
            at = np.minimum(np.searchsorted(held, keys), max(len(held) - 1, 0))  # held is ascending
            inside = ~present & (held[at] == keys) if len(held) else np.zeros(len(keys), bool)
            if inside.any():
                out[inside] = index.reconstruct_batch(keys[inside])
                present |= inside
        if len(self.tail_keys):
            position = {int(key): i for i, key in enumerate(self.tail_keys)}
            for i, key in enumerate(keys):
                j = position.get(int(key))
                if j is not None:
                    out[i], present[i] = self.tail[j], True
        return out.reshape(len(rows), k, self.dim), present.reshape(len(rows), k)
