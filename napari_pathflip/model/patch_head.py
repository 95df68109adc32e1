"""Patch-text head: a patch-level grounding score trained on top of frozen PathFLIP weights.

Data flow:
    patch features [P, D_in] --standardise--> Linear --+--> normalise --> patch embeddings e_p [P, d]
    patch centre within the tissue extent --Fourier--> Linear --+
    PathFLIP text embedding t [d] (frozen) --Linear (identity at init)--> normalise --> u [d]
    patch score s_p = cos(e_p, u); region/slide score = exp(a) * LSE_r(s_p over its patches) + b  (a logit).

Training (training/patch_head.py) treats each slide as a bag of patches: the slide's pooled score for a sentence
must be high when the sentence is in the slide's caption and low otherwise, so only patches that show the finding
can carry it. Everything else in PathFLIP stays frozen: slide and region embeddings, and with them the chat's
visual tokens, do not change.

Patch probabilities: the pooled logits are calibrated for slides and regions, not for single patches (a patch's
own logit is 0 or 1 almost everywhere). `calibration_features` describe each patch's score against the rest of
the slide (its cosine, its gap to the slide's best patch, its z-score over the slide's patches, its best neighbour's
gap) and a logistic map
fitted on patch labels of training slides where the text is present (config.patch_calibration,
training/patch_head.calibrate_patches) turns them into P(this patch shows the text | the slide shows it); `ground`
multiplies that by the slide's presence probability.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .regions import region_positions


def patch_positions(coords: np.ndarray, patch_size_level0: int) -> np.ndarray:
    """[P, 2] float32 (x, y) centre of each patch within the extent of the slide's patches, each axis in (0, 1):
    regions.region_positions on the patch grid."""
    return region_positions(np.floor_divide(np.asarray(coords, dtype=np.int64), int(patch_size_level0)))


class PatchTextHead(nn.Module):
    def __init__(self, patch_dim: int, embed_dim: int, frequencies: int, pool: float):
        super().__init__()
        self.frequencies = frequencies
        self.pool = pool
        # feature standardisation, set from the training features (the head's input scale is the encoder's)
        self.register_buffer("feature_mean", torch.zeros(patch_dim))
        self.register_buffer("feature_std", torch.ones(patch_dim))
        self.features = nn.Linear(patch_dim, embed_dim)
        self.position = nn.Linear(2 + 4 * frequencies, embed_dim)
        self.text = nn.Linear(embed_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-5.0))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in (self.features, self.position):
            layer.reset_parameters()
        nn.init.eye_(self.text.weight)  # starts as PathFLIP's own text embedding
        nn.init.zeros_(self.text.bias)
        with torch.no_grad():
            self.logit_scale.fill_(math.log(10.0))
            self.logit_bias.fill_(-5.0)

    def position_features(self, positions: torch.Tensor) -> torch.Tensor:
        """[P, 2] positions in (0, 1) -> [P, 2 + 4F]: the positions and their sines/cosines at octaves of pi."""
        angles = positions[:, :, None] * (math.pi * 2.0 ** torch.arange(self.frequencies, device=positions.device,
                                                                        dtype=positions.dtype))
        return torch.cat([positions, angles.sin().flatten(1), angles.cos().flatten(1)], dim=1)

    def embed_patches(self, features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """L2-normalised patch embeddings [..., P, d] from features [..., P, D_in] and positions [..., P, 2]."""
        x = (features - self.feature_mean) / self.feature_std
        where = self.position_features(positions.reshape(-1, 2)).reshape(*positions.shape[:-1], -1)
        return F.normalize(self.features(x) + self.position(where), dim=-1)

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """[..., d] PathFLIP text embeddings -> the head's normalised text embeddings."""
        return F.normalize(self.text(text), dim=-1)

    def pooled(self, similarity: torch.Tensor, valid: torch.Tensor, sharpness: float | None = None) -> torch.Tensor:
        """Log-sum-exp mean over the last axis (the patches of a bag), masked by `valid`: between the mean (r -> 0)
        and the max (r -> inf). r is the model's `pool` unless `sharpness` is given (the training schedule)."""
        r = self.pool if sharpness is None else sharpness
        scaled = (r * similarity).masked_fill(~valid, float("-inf"))
        return (torch.logsumexp(scaled, -1) - valid.sum(-1).clamp(min=1).to(similarity.dtype).log()) / r

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled * self.logit_scale.exp() + self.logit_bias


def calibration_features(similarity: torch.Tensor, cells: np.ndarray) -> torch.Tensor:
    """[..., P] patch cosines of one text over a slide, and the patches' (column, row) on the patch grid [P, 2] ->
    [..., P, 4]: the cosine, its gap to the slide's best patch, its z-score over the slide's patches, and the gap of
    its best neighbour (8-neighbourhood) to the slide's best patch: a lone patch that looks like the finding among
    patches that do not is mostly noise, a patch of a band or a nest has neighbours that agree (what
    config.patch_calibration weighs)."""
    best = similarity.max(-1, keepdim=True).values
    mean, std = similarity.mean(-1, keepdim=True), similarity.std(-1, keepdim=True).clamp(min=1e-6)
    cells = torch.as_tensor(np.asarray(cells, dtype=np.int64), device=similarity.device)
    cells = cells - cells.min(0).values
    rows, cols = int(cells[:, 1].max()) + 1, int(cells[:, 0].max()) + 1
    low = similarity.min(-1, keepdim=True).values
    grid = low[..., None].expand(*similarity.shape[:-1], rows + 2, cols + 2).clone()  # a border of the lowest score
    grid[..., cells[:, 1] + 1, cells[:, 0] + 1] = similarity
    neighbours = torch.stack([grid[..., cells[:, 1] + 1 + dy, cells[:, 0] + 1 + dx]
                              for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]).amax(0)
    return torch.stack([similarity, similarity - best, (similarity - mean) / std, neighbours - best], -1)


def calibrated_logits(similarity: torch.Tensor, cells: np.ndarray, coefficients) -> torch.Tensor:
    """Logits of P(patch shows the text | the slide shows it): coefficients (one weight per calibration_features
    column, then the bias)."""
    w = torch.as_tensor(coefficients, dtype=torch.float64, device=similarity.device)
    return calibration_features(similarity.double(), cells) @ w[:-1] + w[-1]
