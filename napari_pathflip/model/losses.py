"""PathFLIP losses: slide-level symmetric InfoNCE and the region-level LogSigmoid loss (paper eq. 6)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate `x` from every rank; only the local shard keeps its gradient (open_clip style).

    Returns (gathered, offset of the local rows). Every rank must pass the same number of rows.
    Without an initialised process group (or with one rank) this is the identity.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    rank = dist.get_rank()
    parts[rank] = x
    return torch.cat(parts), rank * x.shape[0]


def slide_contrastive_loss(slide_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float = 0.1,
                           label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE on cosine similarity: slide b matches caption b; negatives come from every rank.

    slide_emb, text_emb [B, d] (not necessarily normalised).
    """
    s = F.normalize(slide_emb, dim=-1)
    t = F.normalize(text_emb, dim=-1)
    s_all, offset = gather_with_grad(s)
    t_all, _ = gather_with_grad(t)
    labels = torch.arange(s.shape[0], device=s.device) + offset
    slide_to_text = s @ t_all.T / temperature
    text_to_slide = t @ s_all.T / temperature
    return 0.5 * (F.cross_entropy(slide_to_text, labels, label_smoothing=label_smoothing)
                  + F.cross_entropy(text_to_slide, labels, label_smoothing=label_smoothing))


def logit_scale(eta: torch.Tensor, mode: str, max_scale: float = 100.0) -> torch.Tensor:
    """eta as a multiplier ("linear", the paper code) or exp(eta) ("exp", CLIP/SigLIP), clamped to max_scale."""
    scale = eta.exp() if mode == "exp" else eta
    return scale.clamp(max=max_scale)


def region_sigmoid_loss(text_conditioned: torch.Tensor, text: torch.Tensor, labels: torch.Tensor,
                        eta: torch.Tensor, mode: str = "exp", max_scale: float = 100.0) -> torch.Tensor:
    """Paper eq. 6: mean over queries of -log sigmoid(y * scale(eta) * cos(v_tc, t)).

    text_conditioned [..., L, d]: text-region attention outputs; text [..., L, d]: the queries' text embeddings;
    labels [..., L]: +1 for the slide's own subcaptions, -1 for subcaptions of other slides, 0 for queries left
    out (another slide's subcaption that is true of this slide too).
    """
    cos = F.cosine_similarity(text_conditioned, text, dim=-1)
    logits = logit_scale(eta, mode, max_scale) * cos
    used = (labels != 0).to(logits.dtype)
    return (-F.logsigmoid(labels.to(logits.dtype) * logits) * used).sum() / used.sum().clamp(min=1)
