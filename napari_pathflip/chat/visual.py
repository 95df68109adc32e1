"""Visual tokens: a slide's PathFLIP embeddings laid out as rows, capped, and projected to the LLM's width."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PathflipError
from .config import POOLING_RULES, ChatConfig


@dataclass
class VisualTokens:
    """Projected visual tokens of one slide, ready to splice, and what the token cap did to them."""
    embeds: torch.Tensor  # [T, hidden] in the LLM's dtype, slide token first
    regions_in: int  # regions the slide had
    pooled: bool
    notice: str | None  # user-facing sentence when the cap changed the input

    def __len__(self) -> int:
        return self.embeds.shape[0]


def area_index(region_grid) -> torch.Tensor:
    """[N] long: the area (model.regions.AREA_NAMES, row-major 3 x 3 over the extent of the slide's regions) of each
    region."""
    from ..model.regions import area_of, region_positions  # here, not at the top: model/ loads transformers

    return torch.from_numpy(area_of(region_positions(region_grid)))


def area_means(regions: torch.Tensor, region_grid) -> torch.Tensor:
    """[9, d] the mean of the region rows in each area (zeros where an area holds no region)."""
    from ..model.regions import AREA_NAMES

    where = area_index(region_grid)
    sums = torch.zeros(len(AREA_NAMES), regions.shape[1]).index_add_(0, where, regions)
    counts = torch.bincount(where, minlength=len(AREA_NAMES)).clamp(min=1)[:, None]
    return sums / counts


def visual_tensor(visual, layout: str = "regions") -> torch.Tensor:
    """[T, d] float rows in `layout` (package docstring) from a SlideEncoding-like object, or a tensor/array taken
    as rows already in that layout (slide row first)."""
    if hasattr(visual, "slide_embedding") and hasattr(visual, "region_embeddings"):
        slide = torch.as_tensor(visual.slide_embedding).reshape(1, -1).float()
        regions = torch.as_tensor(visual.region_embeddings).reshape(-1, slide.shape[1]).float()
        parts = [slide, regions]
        if layout == "areas":
            if getattr(visual, "region_grid", None) is None:
                raise PathflipError("the \"areas\" visual layout needs each region's place (region_grid)")
            parts.insert(1, area_means(regions, visual.region_grid))
        visual = torch.cat(parts)
    visual = torch.as_tensor(visual)
    if visual.ndim != 2 or visual.shape[0] < 1:
        raise PathflipError(f"visual input must be [1 + regions, dim] (slide first), got shape {tuple(visual.shape)}")
    if not torch.isfinite(visual).all():
        raise PathflipError("the slide embeddings contain NaN or infinite values; re-encode the slide")
    return visual.float()


def cap_visual_tokens(visual: torch.Tensor, max_tokens: int, rule: str = "adaptive_avg",
                      leading: int = 1) -> tuple[torch.Tensor, bool]:
    """Keep the `leading` rows (slide, areas) and at most `max_tokens - leading` region rows (package docstring);
    returns (rows, pooled)."""
    slide, regions = visual[:leading], visual[leading:]
    keep = max_tokens - leading
    if regions.shape[0] <= keep:
        return visual, False
    if rule == "adaptive_avg":
        # adaptive pooling splits the row-major region sequence into `keep` nearly equal runs and averages each
        regions = F.adaptive_avg_pool1d(regions.T.unsqueeze(0), keep)[0].T
    elif rule == "top_norm":
        regions = regions[regions.norm(dim=1).topk(keep).indices.sort().values]
    else:
        raise PathflipError(f"unknown pooling rule {rule!r}; use one of {POOLING_RULES}")
    return torch.cat([slide, regions]), True


class VisualProjector(nn.Linear):
    """sigma of the paper: Linear(visual_dim -> LLM hidden), plus a learned embedding added to each of the first
    `slots` tokens (the slide and area tokens of the "areas" layout; none for "regions")."""

    def __init__(self, visual_dim: int, hidden: int, slots: int = 0):
        super().__init__(visual_dim, hidden)
        self.slots = nn.Parameter(torch.zeros(slots, hidden)) if slots else None

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        out = super().forward(rows)
        if self.slots is None:
            return out
        k = min(len(self.slots), out.shape[-2])
        return torch.cat([out[..., :k, :] + self.slots[:k].to(out.dtype), out[..., k:, :]], dim=-2)


def projector_slots(config: ChatConfig) -> int:
    return config.leading_tokens if config.visual_layout == "areas" else 0
