"""A slide library: a cohort indexed once, then searched by text or by example and classified zero-shot.

`index_slides` runs every slide through SlideAnalysis (the resumable feature store, then the cached PathFLIP
encoding) and keeps a compact row per slide; `Library` answers `search` (text), `like` (a slide) and `classify`;
`pathflip index / search / classify LIBRARY` are the command line. Qt-free: the napari Library panel calls this.

A library folder:

    library.zarr/      the table, one row per slide (rows 0 .. count-1; `count` in its attributes):
        path, name, fingerprint, encoding          [S] string   slide file, file name, content fingerprint,
                                                                cached encoding (relative to the folder inside it)
        mpp [S, 2] float64 (NaN: unknown), size [S, 2] int64 level-0 (width, height), patches, regions [S] int64
        slide_embedding [S, d] float32                           the PathFLIP slide embedding
        region_start [S] int64 -> region_embeddings [R, d] float32, region_boxes [R, 4] int64 level-0 (x0, y0, x1, y1)
        prototypes [S, K, d] float16, prototype_share [S, K] float32, prototype_region [S, K] int64,
        prototype_patches [S, K] int64                           the first search stage (see below)
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

Search scores slides as `PathFLIP.retrieval_scores` does, in two stages, so that a query over thousands of slides
reads only a few encodings. The evidence that a slide shows a sentence is the head's logit of the best
region's pooled patch similarity, pooled = log(mean_p exp(r s_p)) / r over the region's patches p (s_p = cosine of
the patch and text embeddings of the patch-text head). Indexing clusters each slide's patch embeddings (k-means,
`prototypes` clusters) and keeps, per cluster, the mean embedding c of its patches inside the region where the
cluster is most concentrated and their share q of that region. s_p is linear in the patch embedding, so by Jensen's
inequality pooled >= u.c + log(q) / r for text embedding u: stage 1 scores every row with this bound (best
prototype) in place of the evidence, the slide-embedding term exact; stage 2 re-scores the `candidates` best rows
with the model's own retrieval_scores from their cached encodings: the hits carry those exact scores, in their
order (the ranking is exact when the best rows are among the candidates: see benchmarks/bench_library.py quality).
The bound keeps the pooling's sharpness: a region's mean head embedding, the simpler index, ranks findings badly
(necrosis AUROC 0.48 against 0.97 for the pooled score).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import os
import sys
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from .analysis import (SlideAnalysis, default_weights_dir, load_model, recorded_encoder, weights_id,
                       WEIGHTS_ENV)
from .errors import PathflipError

if TYPE_CHECKING:
    from .model import SlideEncoding

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


@dataclass
class Hit:
    """One search result: table row, exact score (retrieval_scores' scale), best region (level-0 box) and its
    score from `PathFLIP.ground` (a probability with a patch-text head); no box for `like`."""

    row: int
    name: str
    path: str
    score: float
    box: tuple[int, int, int, int] | None = None
    region_score: float | None = None


@dataclass
class IndexSummary:
    indexed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the library
    failed: list[tuple[str, str]] = field(default_factory=list)  # (slide, what went wrong)
    cancelled: bool = False
    count: int = 0  # rows in the library afterwards


# (slide number, slides, slide name, patches done, patches of the slide) -> False to cancel
IndexProgress = Callable[[int, int, str, int, int], "bool | None"]


def is_library(path) -> bool:
    return (Path(path) / TABLE / "zarr.json").is_file()


# ---------------------------------------------------------------------------------------------------- one slide
def slide_prototypes(patch_embeddings: np.ndarray, patch_region: np.ndarray, count: int, seed: int = 0):
    """The first-stage index of one slide: (vectors [count, d], share [count], region [count], patches [count]).

    k-means over the patch embeddings; for each cluster, the region holding the largest share of its patches
    there, the mean embedding of the cluster's patches in that region and that share (rows beyond the number of
    patches have share 0 and never score)."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    embeddings = np.asarray(patch_embeddings, dtype=np.float32)
    regions = np.asarray(patch_region, dtype=np.int64)
    k = min(count, len(embeddings))
    # one thread: OpenMP threads of a problem this small only wait for each other, badly when another process
    # shares the cores (568 patches: 12 ms on one thread, 260 ms on two beside a busy process, measured)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")  # fewer distinct patches than clusters: k-means says so, fine
        labels = KMeans(k, n_init=1, random_state=seed).fit_predict(embeddings)
    per_region = np.bincount(regions)
    members = np.zeros((k, len(per_region)), dtype=np.int64)
    np.add.at(members, (labels, regions), 1)
    share = members / per_region[None]
    best = share.argmax(1)
    vectors = np.zeros((count, embeddings.shape[1]), dtype=np.float32)
    out_share = np.zeros(count, np.float32)
    out_region, out_patches = np.zeros(count, np.int64), np.zeros(count, np.int64)
    for j in range(k):
        inside = (labels == j) & (regions == best[j])
        vectors[j] = embeddings[inside].mean(0)
        out_share[j], out_region[j], out_patches[j] = share[j, best[j]], best[j], inside.sum()
    return vectors, out_share, out_region, out_patches


def slide_thumbnail(slide, size: int) -> np.ndarray:
    """[size, size, 3] uint8: the slide's coarsest level fitted inside, centred on white."""
    from PIL import Image

    level = len(slide.levels) - 1
    image = Image.fromarray(slide.read_region((0, 0), level, slide.level_dimensions[level]))
    image.thumbnail((size, size), Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return np.asarray(canvas)


def load_encoding(path) -> SlideEncoding:
    """A cached SlideEncoding without its patch features: search needs the head's patch embeddings, and the
    features (as large again, twice that for a 512-d encoder) are only read when the slide is opened."""
    import torch

    from .model import SlideEncoding

    with np.load(path, allow_pickle=False) as data:
        a = {k: data[k] for k in data.files if k != "patch_features"}
    names = ("slide_embedding", "region_embeddings", "region_keys", "mixer_inputs", "patch_embeddings")
    tensors = {k: torch.from_numpy(a.pop(k)) for k in names if k in a}
    sizes = a.pop("sizes")
    return SlideEncoding(**tensors, **a, patch_size_level0=int(sizes[0]), region_size_level0=int(sizes[1]))


def _entry(analysis: SlideAnalysis, slide, folder: Path, config: LibraryConfig) -> dict[str, np.ndarray]:
    """The table row of an analysed slide (plus its region rows), as plain arrays."""
    encoding = analysis.encoding
    array = lambda t: t.detach().float().cpu().numpy()  # noqa: E731  (on the model's device when just encoded)
    d = encoding.slide_embedding.shape[-1]
    if encoding.patch_embeddings is not None and config.prototypes:
        vectors, share, region, patches = slide_prototypes(array(encoding.patch_embeddings), encoding.patch_region,
                                                           config.prototypes, config.seed)
    else:  # no patch-text head: retrieval is the slide-embedding cosine, which stage 1 computes exactly
        vectors, share = np.zeros((config.prototypes, d), np.float32), np.zeros(config.prototypes, np.float32)
        region = patches = np.zeros(config.prototypes, np.int64)
    where = analysis.encoding_path
    return {
        "path": np.array(os.path.abspath(analysis.slide_path) if "://" not in analysis.slide_path
                         else analysis.slide_path),
        "name": np.array(slide.name),
        "fingerprint": np.array(slide.fingerprint),
        "encoding": np.array(str(where.relative_to(folder) if where.is_relative_to(folder) else where)),
        "mpp": np.array(slide.mpp if slide.mpp else (np.nan, np.nan), dtype=np.float64),
        "size": np.array(slide.dimensions, dtype=np.int64),
        "patches": np.array(len(encoding.patch_coords), dtype=np.int64),
        "regions": np.array(encoding.num_regions, dtype=np.int64),
        "slide_embedding": array(encoding.slide_embedding),
        "region_embeddings": array(encoding.region_embeddings),
        "region_boxes": encoding.region_boxes.astype(np.int64),
        "prototypes": vectors.astype(np.float16), "prototype_share": share, "prototype_region": region,
        "prototype_patches": patches,
        "thumbnail": slide_thumbnail(slide, config.thumbnail),
    }


# -------------------------------------------------------------------------------------------------- the table
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


def _prepare_table(folder: Path, weights: Path, encoder: str, cache: Path, embed_dim: int,
                   config: LibraryConfig) -> None:
    """Create the empty table, or check that an existing one was built the same way (same weights, encoder and
    prototype count: rows made otherwise could not be compared)."""
    import zarr

    with _locked(folder):
        wanted = {"weights_id": weights_id(weights), "encoder": encoder, "prototypes": config.prototypes,
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
        cache_attr = str(cache.relative_to(folder) if cache.is_relative_to(folder) else cache)
        group.attrs.update({**wanted, "format": FORMAT_VERSION, "count": 0, "region_rows": 0,
                            "weights": str(weights.resolve()), "cache": cache_attr,
                            "thumbnail": t, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _recorded_weights(folder: Path) -> Path | None:
    """The weights folder an existing library was indexed with."""
    import zarr

    return Path(zarr.open_group(folder / TABLE, mode="r").attrs["weights"]) if is_library(folder) else None


def _pending_dir(folder: Path) -> Path:
    return folder / PENDING


def _write_pending(folder: Path, entry: dict[str, np.ndarray]) -> None:
    pending = _pending_dir(folder)
    pending.mkdir(parents=True, exist_ok=True)
    final = pending / f"{entry['fingerprint']}.npz"
    tmp = pending / f".{final.stem}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **entry)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


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


def _known_fingerprints(folder: Path) -> set[str]:
    import zarr

    group = zarr.open_group(folder / TABLE, mode="r")
    count = int(group.attrs["count"])
    known = set(group["fingerprint"][:count].tolist()) if count else set()
    if _pending_dir(folder).is_dir():
        known.update(p.stem for p in _pending_dir(folder).glob("*.npz"))
    return known


# ----------------------------------------------------------------------------------------------------- indexing
def index_slides(slides: Sequence[str], library, *, weights=None, cache_dir=None, encoder: str | None = None,
                 device: str = "auto", mpp: float | None = None, config: LibraryConfig | None = None,
                 progress: IndexProgress | None = None, cancel: threading.Event | None = None,
                 allow_pickle: bool = False) -> IndexSummary:
    """Add `slides` to the library folder `library` (created on first use): features (resumable store), encoding
    (cached), the compact row; slides already in the library are skipped, a slide that cannot be read is recorded
    in the summary and the others go on. Finished slides are committed to the table at the end, also when
    cancelled (`cancel` set or `progress` returning False): the next run continues with the rest."""
    from .extraction import ExtractionCancelled, resolve_device
    from .slide import open_slide

    # absolute: the table records where encodings are, relative to the library when they are inside it
    folder, config = Path(library).resolve(), config or LibraryConfig()
    weights = Path(weights) if weights else _recorded_weights(folder) or default_weights_dir()
    model = load_model(weights, allow_pickle).to(resolve_device(device))
    encoder = encoder or recorded_encoder(weights)
    cache = Path(cache_dir).resolve() if cache_dir else folder / CACHE
    _prepare_table(folder, weights, encoder, cache, model.config.embed_dim, config)
    known = _known_fingerprints(folder)
    summary = IndexSummary()
    for number, path in enumerate(slides):
        name = Path(str(path).rstrip("/")).name

        def patches(done: int, total: int, number=number, name=name):
            return progress(number, len(slides), name, done, total) if progress else None

        if (cancel is not None and cancel.is_set()) or patches(0, 0) is False:
            summary.cancelled = True
            break
        try:
            with open_slide(path, mpp=mpp) as slide:
                if slide.fingerprint in known:
                    summary.skipped.append(str(path))
                    continue
                analysis = SlideAnalysis(path, weights, cache, encoder, device, mpp, allow_pickle, model=model)
                analysis.prepare(progress=patches, cancel=cancel)
                entry = _entry(analysis, slide, folder, config)
            _write_pending(folder, entry)
            known.add(slide.fingerprint)
            summary.indexed.append(str(path))
        except ExtractionCancelled:
            summary.cancelled = True
            break
        except (PathflipError, OSError) as exc:
            summary.failed.append((str(path), str(exc)))
    if progress:
        progress(len(slides), len(slides), "", 0, 0)
    summary.count = commit(folder)
    return summary


# ------------------------------------------------------------------------------------------------------- search
class Library:
    """An indexed library, loaded for search: the table's compact columns in memory, encodings read on demand."""

    def __init__(self, folder, *, weights=None, device: str = "cpu", config: LibraryConfig | None = None,
                 model=None, allow_pickle: bool = False):
        """`weights`: the folder the library was indexed with (default: the one it records); `model`: that
        PathFLIP already loaded (the viewer shares one)."""
        import torch
        import zarr

        self.folder = Path(folder)
        if not is_library(self.folder):
            raise PathflipError(f"{self.folder} is not a slide library (no {TABLE} in it): build one with "
                                "`pathflip index SLIDES --out FOLDER`.")
        self.config = config or LibraryConfig()
        group = zarr.open_group(self.folder / TABLE, mode="r")
        self.attrs = dict(group.attrs)
        self.weights = Path(weights) if weights else _recorded_weights(self.folder)
        if not (self.weights / "config.json").is_file():
            raise PathflipError(f"{self.folder} was indexed with the weights in {self.attrs['weights']}, which are "
                                f"not there any more: pass --weights with that folder (or set ${WEIGHTS_ENV}).")
        if weights_id(self.weights) != self.attrs["weights_id"]:
            raise PathflipError(f"the weights in {self.weights} are not those {self.folder} was indexed with "
                                f"({self.attrs['weights']}): use those, or index the slides again with these.")
        if model is None:
            from .extraction import resolve_device

            model = load_model(self.weights, allow_pickle).to(resolve_device(device))
        self.model = model
        n = self.count = int(self.attrs["count"])
        self._group = group
        read = lambda name: group[name][:n]  # noqa: E731  (rows past `count`: an append that never committed)
        self.paths, self.names, self.fingerprints, self._encodings = (np.array(read(k).tolist(), dtype=str)
                                                                      for k in ROW_STRINGS)
        self.sizes, self.mpp = read("size"), read("mpp")
        self.slide_embeddings = torch.from_numpy(read("slide_embedding"))
        self._unit = torch.nn.functional.normalize(self.slide_embeddings, dim=-1)
        self._prototypes = torch.from_numpy(read("prototypes").astype(np.float32))
        with np.errstate(divide="ignore"):  # share 0 (padding) -> -inf: never the best prototype
            self._log_share = torch.from_numpy(np.log(read("prototype_share")))
        self._cache: OrderedDict[int, object] = OrderedDict()

    def __len__(self) -> int:
        return self.count

    @property
    def cache_dir(self) -> Path:
        return self.folder / self.attrs["cache"]

    def row_of(self, fingerprint: str) -> int | None:
        rows = np.flatnonzero(self.fingerprints == fingerprint)
        return int(rows[0]) if len(rows) else None

    def thumbnail(self, row: int) -> np.ndarray:
        return self._group["thumbnail"][row]

    def region_embeddings(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [N, d], level-0 boxes [N, 4]) of the regions of one row."""
        start, n = int(self._group["region_start"][row]), int(self._group["regions"][row])
        return self._group["region_embeddings"][start:start + n], self._group["region_boxes"][start:start + n]

    def encoding(self, row: int):
        """The row's SlideEncoding (without patch features), from memory when used lately."""
        if row in self._cache:
            self._cache.move_to_end(row)
            return self._cache[row]
        path = self._resolve(row)
        try:
            encoding = load_encoding(path)
        except OSError as exc:
            raise PathflipError(f"the encoding of {self.names[row]} ({path}) cannot be read: {exc}. Run `pathflip "
                                f"index` on the slide again with --out {self.folder}.") from exc
        self._cache[row] = encoding
        while len(self._cache) > self.config.cached_encodings:
            self._cache.popitem(last=False)
        return encoding

    def analysis(self, row: int) -> SlideAnalysis:
        """A SlideAnalysis of the row's slide with the library's model and cache (prepare() reads both caches)."""
        return SlideAnalysis(self.paths[row], self.weights, self.cache_dir, self.attrs["encoder"], model=self.model)

    @contextlib.contextmanager
    def _text_cache(self):
        """Each distinct text through the text tower once per search (stage 1, stage 2 and grounding share it)."""
        previous, self.model.text_cache = self.model.text_cache, {}
        try:
            yield
        finally:
            self.model.text_cache = previous

    @property
    def has_prototypes(self) -> bool:
        return self.model.patch_head is not None and self.count > 0 and self._prototypes.shape[1] > 0

    def evidence_bound(self, texts: Sequence[str], prototypes=None, log_share=None) -> np.ndarray:
        """[S, T] the prototype bound of each row's evidence for each text (module doc), or of the rows given as
        `prototypes` [S', K, d] with `log_share` [S', K]."""
        import torch

        head = self.model.patch_head
        prototypes = self._prototypes if prototypes is None else prototypes
        log_share = self._log_share if log_share is None else log_share
        with torch.inference_mode():
            u = head.embed_text(self.model.encode_text(list(texts))).cpu()  # [T, d]
            bound = prototypes @ u.T + log_share[..., None] / head.pool  # [S, K, T]
            k = min(self.model.config.evidence_regions, bound.shape[1])
            # k > 1: the k best prototypes, which may share a region (stage 2 is exact)
            return head.logits(bound.topk(k, dim=1).values.mean(1)).numpy()

    def first_stage(self, texts: Sequence[str]) -> np.ndarray:
        """[T, S] retrieval_scores with each sentence's evidence replaced by its prototype bound (module doc)."""
        from .text import split_sentences

        model, texts = self.model, list(texts)
        glob = (self._unit @ model.encode_text(texts).cpu().T).T.numpy() / model.config.zero_shot_temperature
        if not self.has_prototypes:  # retrieval_scores is the slide-embedding term alone: exact already
            return glob
        sentences = [split_sentences(t) or [t] for t in texts]
        vocab = list(dict.fromkeys(s for group in sentences for s in group))
        evidence = self.evidence_bound(vocab).T  # [V, S]
        where = {s: i for i, s in enumerate(vocab)}
        fine = np.stack([evidence[[where[s] for s in group]].mean(0) for group in sentences])
        return fine + model.config.retrieval_global_weight * glob

    def search(self, text: str, top: int = 20) -> list[Hit]:
        """The `top` slides that best match `text`, best first, with exact retrieval_scores and best regions."""
        text = text.strip()
        if not text:
            raise PathflipError("type what to search for, e.g. \"central necrosis\"")
        if not self.count:
            return []
        with self._text_cache():
            first = self.first_stage([text])[0]
            rows = np.argsort(-first, kind="stable")[:max(2 * top, self.config.candidates)]
            encodings = [self.encoding(int(r)) for r in rows]
            exact = self.model.retrieval_scores(encodings, [text])[0]
            hits = []
            for i in np.argsort(-exact, kind="stable")[:top]:
                best = self.model.ground(encodings[i], text, top_k=1, patch_level=False)
                x0, y0, x1, y1, score = best.top_boxes[0]
                hits.append(Hit(int(rows[i]), self.names[rows[i]], self.paths[rows[i]], float(exact[i]),
                                (int(x0), int(y0), int(x1), int(y1)), float(score)))
        return hits

    def like(self, query, top: int = 20) -> list[Hit]:
        """The `top` slides most like `query` (a table row, or a slide file: read from the library when it is in
        it, else analysed into the library's cache without being added), the query itself left out.

        Score: the z-scored cosine of the slides' evidence profiles (the prototype bound of the evidence for each
        of `config.like_terms`, centred on the library's mean profile) plus the z-scored cosine of the slide
        embeddings; without a patch-text head, the slide-embedding cosine alone. Measured on the 64 synthetic
        test slides (README): the profile adds what the slide embedding misses about which findings are there."""
        import torch

        row = query if isinstance(query, (int, np.integer)) else None
        if row is None:
            from .slide import open_slide

            with open_slide(query) as slide:
                row = self.row_of(slide.fingerprint)
        if row is not None:
            unit, prototypes, log_share = self._unit[row], self._prototypes[row], self._log_share[row]
        else:
            analysis = SlideAnalysis(query, self.weights, self.cache_dir, self.attrs["encoder"], model=self.model)
            encoding = analysis.prepare()
            unit = torch.nn.functional.normalize(encoding.slide_embedding.cpu(), dim=-1)
            prototypes = log_share = None
            if self.has_prototypes:
                vectors, share, _, _ = slide_prototypes(encoding.patch_embeddings.cpu().numpy(),
                                                        encoding.patch_region, self._prototypes.shape[1],
                                                        self.config.seed)
                with np.errstate(divide="ignore"):
                    prototypes, log_share = torch.from_numpy(vectors), torch.from_numpy(np.log(share))
        score = _standardised((self._unit @ unit).numpy())
        if self.has_prototypes:
            with self._text_cache():
                profiles = self.evidence_bound(self.config.like_terms)
                own = profiles[row] if row is not None else \
                    self.evidence_bound(self.config.like_terms, prototypes[None], log_share[None])[0]
            mean = profiles.mean(0)
            centred = profiles - mean
            centred /= np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)
            own = (own - mean) / max(float(np.linalg.norm(own - mean)), 1e-12)
            score = score + _standardised(centred @ own)
        if row is not None:
            score[row] = -np.inf
        order = [int(i) for i in np.argsort(-score, kind="stable")[:top] if np.isfinite(score[i])]
        return [Hit(i, self.names[i], self.paths[i], float(score[i])) for i in order]

    def classify(self, classes) -> Iterator[tuple[int, dict, dict]]:
        """For each row: (row, {class: probability} (softmax of ensemble evidence, PathFLIP.classify),
        {class: P(present)} (calibrated, PathFLIP.presence)). `classes`: {class: [prompts]} or one prompt per class."""
        with self._text_cache():
            for row in range(self.count):
                encoding = load_encoding(self._resolve(row))  # not kept: a cohort does not fit in memory
                probabilities = self.model.classify(encoding, classes).tolist()
                presence = self.model.presence(encoding, classes)
                yield row, dict(zip(presence, probabilities)), presence

    def _resolve(self, row: int) -> Path:
        path = Path(self._encodings[row])
        return path if path.is_absolute() else self.folder / path


def _standardised(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / max(float(values.std()), 1e-12)


# ------------------------------------------------------------------------------------------------ command line
def index_main(argv: list[str]) -> int:
    from .encoders import ENCODER_HELP
    from .extraction import collect_slides, shard

    parser = argparse.ArgumentParser(prog="pathflip index", description="Index slides into a library (resumable: "
                                     "a rerun adds only new slides). Under torchrun rank r of w takes every w-th.")
    parser.add_argument("inputs", nargs="+", metavar="FOLDER_OR_CSV", help="slide files, folders or CSV files")
    parser.add_argument("--out", required=True, help="library folder (created on first use)")
    parser.add_argument("--weights", help="PathFLIP weights folder (default: those of the library, else "
                        f"${WEIGHTS_ENV} or the bundled demo)")
    parser.add_argument("--cache", help="feature/encoding cache (default: LIBRARY/cache)")
    parser.add_argument("--encoder", help="patch encoder (default: the one recorded with the weights). " + ENCODER_HELP)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--mpp", type=float, help="level-0 micrometres per pixel for slides that lack it")
    parser.add_argument("--prototypes", type=int, default=LibraryConfig.prototypes,
                        help="k-means prototypes per slide for the first search stage")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading a pickle checkpoint you trust")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    slides, rank, world = shard(collect_slides(args.inputs))
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    print(f"{prefix}{len(slides)} slide(s) -> {args.out}", flush=True)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(slides), unit="slide", file=sys.stderr)

    def progress(number: int, total: int, name: str, done: int, patches: int) -> None:
        if bar is not None:
            bar.n = number
            bar.set_postfix_str(f"{name} {done}/{patches} patches" if patches else name, refresh=True)

    try:
        summary = index_slides(slides, args.out, weights=args.weights, cache_dir=args.cache, encoder=args.encoder,
                               device=args.device, mpp=args.mpp, config=LibraryConfig(prototypes=args.prototypes),
                               progress=progress, allow_pickle=args.allow_pickle)
    finally:
        if bar is not None:
            bar.close()
    print(f"{prefix}summary: {len(summary.indexed)} indexed, {len(summary.skipped)} skipped (already in the "
          f"library), {len(summary.failed)} failed; the library holds {summary.count} slide(s)")
    for path, reason in summary.failed:
        print(f"  FAILED  {path}: {reason}")
    return 1 if summary.failed else 0


def _library_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("library", help="library folder (pathflip index ... --out LIBRARY)")
    parser.add_argument("--weights", help="the weights folder the library was indexed with (default: as recorded)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--csv", type=Path, help="write the table to this CSV file")


def search_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pathflip search", description="Rank the slides of a library by a text "
                                     "(with each slide's best region) or by their likeness to a slide (--like).")
    _library_arguments(parser)
    parser.add_argument("text", nargs="?", help='what to find, e.g. "central necrosis"')
    parser.add_argument("--like", metavar="SLIDE", help="rank by likeness to this slide instead of a text")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    if (args.text is None) == (args.like is None):
        parser.error("give a text or --like SLIDE (one of them)")
    library = Library(args.library, weights=args.weights, device=args.device)
    hits = library.like(args.like, args.top) if args.like else library.search(args.text, args.top)
    header = ["rank", "slide", "score", "region_x0", "region_y0", "region_x1", "region_y1", "region_score", "path"]
    rows = [[rank, hit.name, f"{hit.score:.4f}", *(hit.box or ("",) * 4),
             "" if hit.region_score is None else f"{hit.region_score:.4f}", hit.path]
            for rank, hit in enumerate(hits, 1)]
    what = f"like {args.like}" if args.like else repr(args.text)
    print(f"{len(hits)} of {len(library)} slides, {what}:")
    for rank, hit in enumerate(hits, 1):
        where = (f"   best region x {hit.box[0]}-{hit.box[2]}, y {hit.box[1]}-{hit.box[3]}: {hit.region_score:.3f}"
                 if hit.box else "")
        print(f"{rank:>4}  {hit.score:8.3f}  {hit.name}{where}")
    if args.csv:
        _write_csv(args.csv, header, rows)
        print(f"wrote {args.csv}")
    return 0


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    """"necrosis=necrosis|necrotic debris" -> ("necrosis", [two phrasings]); a plain prompt names its class."""
    name, _, phrases = prompt.partition("=") if "=" in prompt else (prompt, "", prompt)
    phrases = [p.strip() for p in phrases.split("|") if p.strip()]
    if not name.strip() or not phrases:
        raise PathflipError(f"--prompt {prompt!r}: give a prompt, or CLASS=PROMPT|PROMPT|... for an ensemble")
    return name.strip(), phrases


def classify_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pathflip classify LIBRARY", description="Zero-shot classification of "
                                     "every slide of a library: one CSV row per slide (to stdout or --csv).")
    _library_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True,
                        help="one class: a prompt, or CLASS=PROMPT|PROMPT|... (a prompt ensemble); repeat per class")
    args = parser.parse_args(argv)
    classes = dict(parse_prompt(p) for p in args.prompt)
    library = Library(args.library, weights=args.weights, device=args.device)
    header = ["slide", "predicted", *(f"p[{c}]" for c in classes), *(f"present[{c}]" for c in classes), "path"]
    rows = []
    for row, probabilities, presence in library.classify(classes):
        best = max(probabilities, key=probabilities.get)
        rows.append([library.names[row], best, *(f"{probabilities[c]:.4f}" for c in classes),
                     *(f"{presence[c]:.4f}" for c in classes), library.paths[row]])
    if args.csv:
        _write_csv(args.csv, header, rows)
        print(f"wrote {args.csv}: {len(rows)} slide(s)")
    else:
        _write_csv(sys.stdout, header, rows)
    return 0


def _write_csv(target, header: list[str], rows: list[list]) -> None:
    if hasattr(target, "write"):
        csv.writer(target).writerows([header, *rows])
        return
    with open(target, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
