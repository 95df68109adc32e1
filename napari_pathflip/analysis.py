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
from .heatmap import (ScoreGrid, boxes_geojson, normalise, overlay_png, save_geojson, save_scores_npz,
                      score_grid)
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
    """What the heatmap shows for a grounding result: its patch (or region) scores on their grid, normalised to
    [0, 1] over the slide, 0 where there is no score. The Localize layer and every export use this one grid."""
    if patch_level and result.patch_scores is not None:
        return score_heatmap(encoding, result.patch_scores)
    return score_heatmap(encoding, result.region_scores, patches=False)


def score_heatmap(encoding, scores, patches: bool = True) -> ScoreGrid:
    """Scores of the encoding's patches (or regions) on their grid, normalised to [0, 1] over the slide, 0 where
    there is none: how every heatmap of a slide is shown (a query's, a region's similarity)."""
    # the region grid covers every patch, so its far corner bounds the scored part of the slide
    dimensions = int(encoding.region_boxes[:, 2].max()), int(encoding.region_boxes[:, 3].max())
    if patches:
        grid = score_grid(encoding.patch_coords, encoding.patch_size_level0, scores, dimensions)
    else:
        grid = score_grid(encoding.region_boxes[:, :2], encoding.region_size_level0, scores, dimensions)
    return ScoreGrid(np.nan_to_num(normalise(grid.values), nan=0.0), grid.cell)


def write_grounding(analysis: SlideAnalysis, result, out: Path, threshold: float = 0.0,
                    opacity: float = 0.7, patch_level: bool | None = None) -> Path:
    """The result as a file, by its suffix: .png (the slide's smallest level with the heatmap grid blended on top
    as the Localize layer shows it at this threshold and opacity), .npz (scores with level-0 coordinates, and the
    heatmap grid) or .geojson (the top regions). `patch_level`: which grid the heatmap shows (default: patches when
    the result has them)."""
    from .slide import open_slide

    encoding = analysis.encoding
    suffix = out.suffix.lower()
    if suffix not in (".npz", ".geojson", ".json", ".png"):
        raise PathflipError(f"--out {out}: use a .png, .npz or .geojson file name")
    if patch_level is None:
        patch_level = result.patch_scores is not None and np.isfinite(result.patch_scores).any()
    grid = heatmap_grid(encoding, result, patch_level)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npz":
        return save_scores_npz(out, text=np.array(result.text), region_scores=result.region_scores,
                               region_boxes=encoding.region_boxes, patch_scores=result.patch_scores,
                               patch_coords=encoding.patch_coords, patch_size_level0=encoding.patch_size_level0,
                               top_boxes=result.top_boxes, heatmap=grid.values, heatmap_cell=grid.cell,
                               threshold=threshold)
    if suffix in (".geojson", ".json"):
        return save_geojson(out, boxes_geojson(result.top_boxes[:, :4], result.top_boxes[:, 4], result.text))
    with open_slide(analysis.slide_path, mpp=analysis.mpp) as slide:
        level = len(slide.levels) - 1
        width, height = slide.level_dimensions[level]
        thumbnail = slide.read_region((0, 0), level, (width, height))
        return overlay_png(out, thumbnail, grid, slide.downsamples[level], opacity, threshold)
