"""The learning-rate schedule of every training stage: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, total: int, warmup: int, start: float, floor: float) -> float:
    """Linear warmup from `start` to `peak` over `warmup` steps, then cosine from `peak` to `floor` at `total`."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
