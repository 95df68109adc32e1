"""Indexing: every slide through SlideAnalysis (the resumable feature store, then the cached PathFLIP encoding),
then one compact row per slide: embeddings, the first search stage's prototypes, a thumbnail."""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..analysis import SlideAnalysis, load_model
from ..errors import PathflipError
from ..weights import WeightsFolder
from . import ann
from .store import (
    CACHE,
    LibraryConfig,
    Repair,
    commit,
    indexing,
    is_library,
    known_fingerprints,
    prepare_table,
    recorded_weights,
    repair_table,
    stored_path,
    write_pending,
)


@dataclass
class IndexSummary:
    indexed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the library
    failed: list[tuple[str, str]] = field(default_factory=list)  # (slide, what went wrong)
    cancelled: bool = False
    count: int = 0  # rows in the library afterwards
    repair: Repair | None = None  # what --repair did (repair=True)


# (slide number, slides, slide name, patches done, patches of the slide) -> False to cancel
IndexProgress = Callable[[int, int, str, int, int], "bool | None"]


def indexing_weights(library, weights=None) -> WeightsFolder:
    """The weights a library is indexed with: `weights` (a WeightsFolder or its path) when given, else those it
    was indexed with before, else $PATHFLIP_WEIGHTS or the bundled demo weights."""
    if isinstance(weights, WeightsFolder):
        return weights
    return WeightsFolder.resolve(weights, recorded_weights(Path(library).resolve()))


def index_slides(slides: Sequence[str], library, *, weights=None, cache_dir=None, encoder: str | None = None,
                 device: str = "auto", mpp: float | None = None, config: LibraryConfig | None = None,
                 progress: IndexProgress | None = None, cancel: threading.Event | None = None,
                 allow_pickle: bool = False, model=None, repair: bool = False,
                 on_wait: Callable[[str], None] | None = None) -> IndexSummary:
    """Add `slides` to the library folder `library` (created on first use): features (resumable store), encoding
    (cached), the compact row; slides already in the library are skipped, a slide that cannot be read is recorded
    in the summary and the others go on. Finished slides are committed to the table at the end, also when
    cancelled (`cancel` set or `progress` returning False): the next run continues with the rest.

    `weights`: see indexing_weights; `model`: the PathFLIP already loaded from them (the viewer shares one).
    `repair`: first rewrite a damaged table from its readable rows (store.repair_table) and index the slides of the
    dropped rows again (from the feature cache). A second run into the same library waits for the first
    (store.indexing; `on_wait` is told once)."""
    from ..commands.options import unexpected
    from ..extraction import ExtractionCancelled
    from ..slide import open_slide

    # absolute: the table records where encodings are, relative to the library when they are inside it
    folder, config = Path(library).resolve(), config or LibraryConfig()
    weights = indexing_weights(folder, weights)
    model = model if model is not None else load_model(weights, allow_pickle, device)
    encoder = encoder or weights.encoder
    cache = Path(cache_dir).resolve() if cache_dir else folder / CACHE
    summary = IndexSummary()
    with indexing(folder, on_wait):
        if repair and is_library(folder):
            summary.repair = repair_table(folder)
            slides = list(dict.fromkeys([*slides, *(path for path, _ in summary.repair.dropped if path)]))
        prepare_table(folder, weights, encoder, cache, model.config.embed_dim, config)
        known = known_fingerprints(folder)
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
                write_pending(folder, entry)
                known.add(slide.fingerprint)
                summary.indexed.append(str(path))
            except ExtractionCancelled:
                summary.cancelled = True
                break
            except (PathflipError, OSError) as exc:
                summary.failed.append((str(path), str(exc)))
            except Exception as exc:  # a bug on one slide must not cost the cohort its other slides
                summary.failed.append((str(path), unexpected(exc)))
        if progress:
            progress(len(slides), len(slides), "", 0, 0)
        summary.count = commit(folder, then=ann.update)
    return summary


# ---------------------------------------------------------------------------------------------------- one slide
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
    return {
        "path": np.array(os.path.abspath(analysis.slide_path) if "://" not in analysis.slide_path
                         else analysis.slide_path),
        "name": np.array(slide.name),
        "fingerprint": np.array(slide.fingerprint),
        "encoding": np.array(stored_path(folder, analysis.encoding_path)),
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
