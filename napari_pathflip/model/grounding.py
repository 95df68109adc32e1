"""Where on a slide a text is: PathFLIP's `ground`, the scores a heatmap shows.

Two methods. "patch_head" (weights with a patch-text head): every patch gets the head's probability that it shows
the text, each region the probability from its patches' pooled score; one product with the cached patch embeddings.
"attention" (the paper's model): regions by the text-region attention of eq. 5, patches of the best regions by the
same logit with each patch taken alone as a one-patch region in its region's place.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import PathflipError
from .encoding import GroundingResult, SlideEncoding
from .patch_head import calibrated_logits
from .qformer import PatchGroup
from .regions import region_positions


class GroundingMixin:
    """`ground` for PathFLIP (mixed into it: uses its text encoder, patch-text head, Q-Former, mixer and eq. 5)."""

    def ground(self, encoding: SlideEncoding, text: str, top_k: int = 5, patch_level: bool = True,
               explain_regions: int | None = None, method: str = "auto",
               text_embedding: torch.Tensor | None = None) -> GroundingResult:
        """Where on the slide is `text`?

        method "patch_head" (what "auto" picks when the encoding has patch-text head embeddings): every patch gets
        the head's probability that it shows the text, each region the probability from its patches' pooled score;
        one product with the cached patch embeddings. method "attention" (the paper's mechanism, "auto" otherwise):
        Region scores: head-averaged eq. 5 attention of the text over the slide's regions (paper Fig. 4); costs one
        text encoding plus a [heads, N] softmax against the cached keys.
        Patch scores (patch_level=True): in each of the `explain_regions` (default top_k) best regions, every patch
        is run through the region pass of the Q-Former alone, as if the region held only that patch, then through the
        mixer in its region's place with the other mixer tokens at their cached values, and scored by the same
        head-averaged eq. 5 logit as the regions: "would this patch alone make its region match the text?". One
        batched forward pass, no gradient. (Gradient x input through the region pass, tried first, scored patches
        near chance on the synthetic test split.)
        Patches of regions not explained get NaN.
        """
        if method not in ("auto", "attention", "patch_head"):
            raise PathflipError(f"grounding method must be auto, attention or patch_head, not {method!r}")
        has_head = self.patch_head is not None and encoding.patch_embeddings is not None
        if method == "patch_head" and not has_head:
            raise PathflipError("patch_head grounding needs weights with a patch-text head (train one with "
                                "`python -m training patch-head`) and a slide encoded with them")
        t = self.encode_text([text])[0] if text_embedding is None else text_embedding  # [d], encode_text's row
        if method != "attention" and has_head:
            return self._ground_with_head(encoding, text, t, top_k, patch_level)
        with torch.inference_mode():
            logits = self.text_region.logits(t[None].to(self.device), encoding.region_keys.to(self.device))
            scores = logits[:, 0].softmax(-1).mean(0).float().cpu().numpy()
        result = _ranked(encoding, text, scores, top_k)
        if patch_level and encoding.patch_features is not None:
            explain = np.argsort(-scores, kind="stable")[:min(explain_regions or top_k, len(scores))]
            result.patch_scores = self._patch_attribution(encoding, t, explain)
            result.explained_regions = explain
        return result

    @torch.inference_mode()
    def _ground_with_head(self, encoding: SlideEncoding, text: str, t: torch.Tensor, top_k: int,
                          patch_level: bool) -> GroundingResult:
        head, cfg = self.patch_head, self.config
        similarity = encoding.patch_embeddings.to(self.device) @ head.embed_text(t.to(self.device))  # [P]
        index = torch.from_numpy(encoding.region_index).to(self.device)
        pooled = head.pooled(similarity[index.clamp(min=0)], index >= 0)
        # float64 probabilities: in float32 sigmoid rounds confident scores to exactly 1 and ties the top items
        region_logits = head.logits(pooled).double()
        result = _ranked(encoding, text, torch.sigmoid(region_logits).cpu().numpy(), top_k)
        result.method = "patch_head"
        # presence as PathFLIP.presence computes it: the mean of the best evidence_regions region logits, calibrated
        evidence = region_logits.topk(min(cfg.evidence_regions, len(region_logits))).values.mean()
        presence = self.presence_probability(evidence)
        result.presence = float(presence)
        # calibrated weights: probabilities at every detail (heatmap_grid shows regions times the presence)
        result.calibrated = cfg.patch_calibration is not None
        if patch_level:
            if result.calibrated:
                # P(patch shows the text) = P(slide shows it) * P(patch shows it | slide shows it)
                cells = encoding.patch_coords // encoding.patch_size_level0
                scores = presence * torch.sigmoid(calibrated_logits(similarity, cells, cfg.patch_calibration))
            else:
                scores = torch.sigmoid(head.logits(similarity).double())
            result.patch_scores = scores.cpu().numpy()
            result.explained_regions = np.arange(encoding.num_regions)
        return result

    @torch.inference_mode()
    def _patch_attribution(self, encoding: SlideEncoding, text: torch.Tensor, regions: np.ndarray) -> np.ndarray:
        """Each patch of `regions` as a one-patch region in its region's place: its text logit (see ground)."""
        missing = [int(r) for r in regions if int(r) not in encoding.patch_keys]
        if missing:
            encoding.patch_keys.update(zip(missing, self._patch_keys(encoding, np.asarray(missing))))
        keys = torch.cat([encoding.patch_keys[int(r)] for r in regions])
        logits = self.text_region.logits(text.to(self.device)[None], keys.to(self.device))  # [heads, 1, patches]
        index = encoding.region_index[regions]
        scores = np.full(len(encoding.patch_coords), np.nan, dtype=np.float32)
        scores[index[index >= 0]] = logits[:, 0].mean(0).float().cpu().numpy()  # head-averaged
        return scores

    def _patch_keys(self, encoding: SlideEncoding, regions: np.ndarray) -> list[torch.Tensor]:
        """Eq. 5 keys of every patch of `regions` run alone through the region pass and the mixer (in its region's
        place, the other mixer tokens at their cached values); one tensor per region, its patches in row order."""
        feats = encoding.patch_features.to(self.device).float()
        index = torch.from_numpy(encoding.region_index[regions]).to(self.device)  # [k, M], -1 = padding
        valid = index >= 0
        rows = index[valid]
        parent = torch.arange(len(regions), device=self.device)[:, None].expand_as(index)[valid]
        single = PatchGroup(valid=torch.ones(len(rows), 1, dtype=torch.bool, device=self.device))
        q = self.qformer.encode_queries(self.patch_proj(feats[rows]), [single], self.config.region_batch)[0]
        h = self.vision_proj(q.mean(1))
        where = self._position_embedding(region_positions(encoding.region_grid)[regions])
        if where is not None:
            h = h + where[parent]
        positions = torch.from_numpy(regions + 1).to(self.device)[parent]  # position 0 is the slide token
        for layer, context in zip(self.mixer, encoding.mixer_inputs.to(self.device)):
            h = layer.forward_at(h, context, positions)
        keys = self.text_region.key(self.mixer_norm(h))
        return list(keys.split(valid.sum(1).tolist()))


def _ranked(encoding: SlideEncoding, text: str, scores: np.ndarray, top_k: int) -> GroundingResult:
    """A grounding result from region scores: the top_k regions, best first, with their boxes."""
    top = np.argsort(-scores, kind="stable")[:min(top_k, len(scores))]
    boxes = np.concatenate([encoding.region_boxes[top].astype(np.float64), scores[top, None]], axis=1)
    return GroundingResult(text=text, region_scores=scores, top_regions=top, top_boxes=boxes)
