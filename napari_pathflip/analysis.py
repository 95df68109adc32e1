"""One slide, end to end: features (cached store) -> PathFLIP encoding (cached) -> grounding / zero-shot.

The napari workspace, `pathflip ground|classify|chat|caption` and the slide library all go through
`SlideAnalysis`, so nothing is computed twice.
"""

from __future__ import annotations

import os
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .errors import PathflipError
from .files import atomic_write
from .heatmap import (FindingArea, ScoreGrid, area_annotations, box_annotations, default_threshold, normalise,
                      overlay_png, save_geojson, save_scores_npz, score_grid)
from .heatmap import finding_areas as grid_areas
from .text import query_text
from .weights import WeightsFolder, default_cache_dir

TEXT_CACHE = 64  # text embeddings a SlideAnalysis keeps (a few KB each)


def load_model(weights: WeightsFolder, allow_pickle: bool = False, device: str = "cpu"):
    """The PathFLIP in a weights folder, in eval mode on `device`; a PathflipError saying what to do when there is
    none. The one place the product loads a PathFLIP."""
    from .model import PathFLIP
    from .weights import resolve_device

    return PathFLIP.from_pretrained(weights.path, allow_pickle=allow_pickle, device=resolve_device(device))


class SlideAnalysis:
    """A slide with its PathFLIP weights: extracts and encodes once, then answers text queries from the cache."""

    def __init__(self, slide_path: str | os.PathLike, weights: WeightsFolder | str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, encoder: str | None = None, device: str = "auto",
                 mpp: float | None = None, allow_pickle: bool = False, model=None):
        """`weights`: a WeightsFolder or its path (default: WeightsFolder.resolve()); `model`: the PathFLIP already
        loaded from it (the workspace's panels and a slide library share one)."""
        self.slide_path = str(slide_path)
        self.weights = weights if isinstance(weights, WeightsFolder) else WeightsFolder.resolve(weights)
        self.model = model if model is not None else load_model(self.weights, allow_pickle)
        self.encoder = encoder or self.weights.encoder
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.device, self.mpp = device, mpp
        self.features = None
        self.encoding = None
        self.encoding_path: Path | None = None  # the cached encoding file, once prepared
        self._texts: OrderedDict = OrderedDict()  # recent query -> text embedding: each text through the tower once

    def prepare(self, progress=None, cancel=None):
        """Features (from the store when complete) and the slide encoding (from its cache file when present)."""
        from .extraction import extract_features
        from .model import SlideEncoding

        if self.encoding is not None:
            return self.encoding
        self.features = extract_features(self.slide_path, self.cache_dir / "features", self.encoder,
                                         device=self.device, mpp=self.mpp, progress=progress, cancel=cancel)
        if self.features.features.shape[1] != self.model.config.patch_dim:
            raise PathflipError(
                f"the weights in {self.weights} expect {self.model.config.patch_dim}-d patch features but encoder "
                f"{self.encoder!r} gives {self.features.features.shape[1]}-d; pick the encoder they were trained on."
            )
        store = self.features.path.parent if self.features.path else self.cache_dir
        cached = self.encoding_path = store / f"encoding-{self.weights.id}.npz"
        if cached.is_file():
            try:
                self.encoding = SlideEncoding.load(cached)
            except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
                cached.unlink(missing_ok=True)  # a damaged cache file: computed again below
        if self.encoding is None:
            self.encoding = self.model.encode_slide(self.features.features, self.features.coords,
                                                    self.features.patch_size_level0)
            atomic_write(cached, self.encoding.save, suffix=".npz")
        return self.encoding

    def ground(self, text: str, top_k: int = 5, patch_level: bool = True):
        if top_k < 1:
            raise PathflipError(f"top_k = {top_k}: ask for at least one box.")
        text = query_text(text)
        encoding = self.prepare()
        return self.model.ground(encoding, text, top_k=top_k, patch_level=patch_level,
                                 text_embedding=self.text_embedding(text))

    def text_embedding(self, text: str):
        """The model's embedding of `text` (encode_text), kept for the last TEXT_CACHE queries: Localize asks
        for the region and then the patch heatmap of the same text."""
        import torch

        if text in self._texts:
            self._texts.move_to_end(text)
        else:
            with torch.no_grad():
                self._texts[text] = self.model.encode_text([text])[0]
            while len(self._texts) > TEXT_CACHE:
                self._texts.popitem(last=False)
        return self._texts[text]

    def classify(self, prompts: list[str]) -> np.ndarray:
        return self.model.classify(self.prepare(), prompts).detach().cpu().numpy()


def heatmap_grid(encoding, result, patch_level: bool) -> ScoreGrid:
    """What the heatmap shows for a grounding result, 0 where there is no score. A text the slide does not show
    ("not found") shows nothing at any detail. Calibrated results show probabilities as they are, so a colour means
    the same on every slide: the patch probabilities (gated by the slide's presence), or each region's probability
    times the presence; otherwise the scores only rank and are normalised to [0, 1] over the slide. The Localize
    layer, every export and the evaluation (shown_patches) use this rule."""
    patches = patch_level and result.patch_scores is not None
    scores = result.patch_scores if patches else result.region_scores
    if result.status == "not found":  # zeros, not rescaled to the slide's (empty) range
        return score_heatmap(encoding, np.zeros_like(scores), patches=patches, relative=False)
    if result.calibrated and not patches:
        scores = scores * result.presence
    return score_heatmap(encoding, scores, patches=patches, relative=not result.calibrated)


def patch_values(encoding, result) -> np.ndarray:
    """[P] what the patch heatmap of `result` (heatmap_grid) shows at each of the encoding's patches, 0 where none:
    the probabilities the chat's evidence and the report read."""
    grid = heatmap_grid(encoding, result, patch_level=True)
    cells = np.asarray(encoding.patch_coords, dtype=np.int64) // grid.cell
    return np.nan_to_num(grid.values[cells[:, 1], cells[:, 0]], nan=0.0)


def shown_patches(result, threshold: float | None = None) -> np.ndarray:
    """[P] bool: the patches the patch heatmap of `result` paints at `threshold` (None: default_threshold), by
    heatmap_grid's rule (and heatmap.finding_areas': a value of 0 is never painted); what the evaluation scores as
    the displayed area."""
    threshold = default_threshold(result.calibrated) if threshold is None else threshold
    scores = np.asarray(result.patch_scores, dtype=np.float32)
    if result.status == "not found":
        return np.zeros(len(scores), bool)
    values = np.nan_to_num(np.clip(scores, 0.0, 1.0) if result.calibrated else normalise(scores), nan=0.0)
    return (values >= threshold) & (values > 0)


def score_heatmap(encoding, scores, patches: bool = True, relative: bool = True) -> ScoreGrid:
    """Scores of the encoding's patches (or regions) on their grid, 0 where there is none; `relative`: normalised to
    [0, 1] over the slide (scores that only rank, a region's similarity), else kept (probabilities)."""
    # the region grid covers every patch, so its far corner bounds the scored part of the slide
    dimensions = int(encoding.region_boxes[:, 2].max()), int(encoding.region_boxes[:, 3].max())
    if patches:
        grid = score_grid(encoding.patch_coords, encoding.patch_size_level0, scores, dimensions)
    else:
        grid = score_grid(encoding.region_boxes[:, :2], encoding.region_size_level0, scores, dimensions)
    values = normalise(grid.values) if relative else np.clip(grid.values, 0.0, 1.0)
    return ScoreGrid(np.nan_to_num(values, nan=0.0), grid.cell)


def finding_areas(source, result, threshold: float | None = None, patch_level: bool = True,
                  top_k: int | None = None) -> list[FindingArea]:
    """The areas of the heatmap of `result` (heatmap_grid) at or above `threshold` (None: default_threshold of the
    result), best first; `source`: a SlideAnalysis or its SlideEncoding. Each area's fraction is of the slide's
    tissue patches (of its regions on a region grid). What `pathflip ground`, the exports and the viewer list."""
    encoding = source.prepare() if isinstance(source, SlideAnalysis) else source
    grid = heatmap_grid(encoding, result, patch_level)
    # heatmap_grid falls back to regions when the result has no patch scores: count the cells the grid has
    tissue = len(encoding.patch_coords) if grid.cell == encoding.patch_size_level0 else len(encoding.region_boxes)
    threshold = default_threshold(result.calibrated) if threshold is None else threshold
    return grid_areas(grid, threshold, tissue, top_k)


def write_grounding(analysis: SlideAnalysis, result, out: Path, threshold: float | None = None, opacity: float = 0.7,
                    patch_level: bool | None = None, regions: bool = False, areas: bool = True) -> Path:
    """The result as a file, by its suffix: .png (the slide's smallest level with the heatmap grid blended on top
    as the Localize layer shows it at this threshold and opacity, and a legend: colour bar, threshold, verdict), .npz
    (scores with level-0 coordinates, the heatmap grid, threshold, presence and the finding areas) or .geojson
    (QuPath annotations: the finding areas' outlines when `areas`, the top region boxes when `regions`).
    `threshold`: None = default_threshold(result.calibrated). `patch_level`: which grid the heatmap shows (default:
    patches when the result has them)."""
    from .slide import open_slide

    encoding = analysis.prepare()
    suffix = out.suffix.lower()
    if suffix not in (".npz", ".geojson", ".json", ".png"):
        raise PathflipError(f"--out {out}: use a .png, .npz or .geojson file name")
    if patch_level is None:
        patch_level = result.patch_scores is not None and np.isfinite(result.patch_scores).any()
    threshold = default_threshold(result.calibrated) if threshold is None else threshold
    grid = heatmap_grid(encoding, result, patch_level)
    found = finding_areas(encoding, result, threshold, patch_level)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npz":
        return save_scores_npz(out, text=np.array(result.text), region_scores=result.region_scores,
                               region_boxes=encoding.region_boxes, patch_scores=result.patch_scores,
                               patch_coords=encoding.patch_coords, patch_size_level0=encoding.patch_size_level0,
                               top_boxes=result.top_boxes, heatmap=grid.values, heatmap_cell=grid.cell,
                               threshold=threshold, calibrated=result.calibrated,
                               presence=np.nan if result.presence is None else result.presence,
                               area_boxes=np.array([a.box for a in found], dtype=np.int64).reshape(-1, 4),
                               area_probabilities=np.array([a.probability for a in found], dtype=np.float32),
                               area_fractions=np.array([a.fraction for a in found], dtype=np.float32))
    if suffix in (".geojson", ".json"):
        return save_geojson(out, (area_annotations(found, result.text, result.calibrated) if areas else []) +
                            (box_annotations(result.top_boxes[:, :4], result.top_boxes[:, 4], result.text)
                             if regions else []))
    with open_slide(analysis.slide_path, mpp=analysis.mpp) as slide:
        level = len(slide.levels) - 1
        width, height = slide.level_dimensions[level]
        thumbnail = slide.read_region((0, 0), level, (width, height))
        return overlay_png(out, thumbnail, grid, slide.downsamples[level], opacity, threshold, result.text,
                           result.calibrated, result.verdict())
