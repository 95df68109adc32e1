"""What PathFLIP keeps of a slide and what it answers about one: `SlideEncoding` (the cached encoding, one .npz
file, no pickle) and `GroundingResult` (the scores of one text)."""

from __future__ import annotations

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
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path, include_features: bool = True) -> "SlideEncoding":
        """Read a saved encoding. `include_features=False` skips the patch features (as large again as the rest,
        twice that for a 512-d encoder): enough for everything but patch-level attention grounding, which is what
        a library's search needs."""
        with np.load(path, allow_pickle=False) as data:
            a = {k: data[k] for k in data.files if include_features or k != "patch_features"}
        tensors = {k: torch.from_numpy(a.pop(k)) for k in TENSORS + OPTIONAL_TENSORS if k in a}
        sizes = a.pop("sizes")
        return cls(**tensors, **a, patch_size_level0=int(sizes[0]), region_size_level0=int(sizes[1]))


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

