"""Whether and how well a slide shows a text: PathFLIP's evidence, presence, zero-shot classification and retrieval.

With a patch-text head the evidence for a text is the mean of its best region logits of the head (the scores
`ground` ranks regions by), so "fat in the lower left" is scored where the slide shows fat rather than against a
summary of every region; without one (the paper's model) it is the slide-embedding cosine / zero_shot_temperature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PathflipError
from ..text import split_sentences
from .encoding import SlideEncoding


class ScoringMixin:
    """Slide-level scores for PathFLIP (mixed into it: uses its text encoder, patch-text head and config)."""

    def similarity(self, slide_embeddings, texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity [S, T] between slide embeddings [S, d] (or [d]) and texts."""
        s = F.normalize(self._as_tensor(slide_embeddings).reshape(-1, self.config.embed_dim), dim=-1)
        return s @ self.encode_text(texts).T

    @torch.inference_mode()
    def evidence(self, encoding: SlideEncoding, texts: Sequence[str]) -> torch.Tensor:
        """[T] logits that the slide shows each text (config.evidence_regions): with a patch-text head the mean of
        the k best region logits of the head; without one (the paper's model) the slide-embedding cosine divided by
        zero_shot_temperature."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.evidence_from_text(encoding, self.encode_text(texts))

    @torch.inference_mode()
    def evidence_from_text(self, encoding: SlideEncoding, text: torch.Tensor) -> torch.Tensor:
        """`evidence` for texts already encoded (encode_text rows [T, d])."""
        text = text.to(self.device)
        if self.patch_head is None or encoding.patch_embeddings is None:
            slide = F.normalize(encoding.slide_embedding.to(self.device).float(), dim=-1)
            return text @ slide / self.config.zero_shot_temperature
        head = self.patch_head
        similarity = head.embed_text(text) @ encoding.patch_embeddings.to(self.device).T  # [T, P]
        index = torch.from_numpy(encoding.region_index).to(self.device)
        regions = head.logits(head.pooled(similarity[:, index.clamp(min=0)], (index >= 0)[None]))  # [T, N]
        k = min(self.config.evidence_regions, regions.shape[1])
        return regions.topk(k, dim=1).values.mean(1).float()

    def _class_evidence(self, encoding: SlideEncoding, classes) -> tuple[list[str], torch.Tensor]:
        """(class names, [C] evidence): a list gives one prompt per class, a mapping {class: [prompts]} a prompt
        ensemble per class (its mean evidence over the phrasings)."""
        if isinstance(classes, str):
            classes = [classes]
        groups = {c: [c] for c in classes} if not isinstance(classes, Mapping) else \
            {name: [prompts] if isinstance(prompts, str) else list(prompts) for name, prompts in classes.items()}
        if not groups or not all(groups.values()):
            raise PathflipError("zero-shot classification needs at least one class, each with at least one prompt")
        flat = [p for prompts in groups.values() for p in prompts]
        scores = self.evidence(encoding, flat).split([len(p) for p in groups.values()])
        return list(groups), torch.stack([s.mean() for s in scores])

    def presence(self, encoding: SlideEncoding, classes) -> dict[str, float]:
        """{class: P(the slide shows it)} for one prompt or prompt ensemble per finding (see _class_evidence):
        the calibrated evidence (presence_scale/bias, fitted on the training split; >= 0.5 = present)."""
        names, evidence = self._class_evidence(encoding, classes)
        return dict(zip(names, self.presence_probability(evidence).tolist()))

    def presence_probability(self, evidence: torch.Tensor) -> torch.Tensor:
        """P(the slide shows a text) from its evidence: the Platt calibration presence_scale/bias of the config, in
        float64 (the one place it is applied: `presence`, and `ground` for its verdict and gating)."""
        cfg = self.config
        return torch.sigmoid(cfg.presence_scale * evidence.double() + cfg.presence_bias)

    def classify(self, slide, prompts) -> torch.Tensor:
        """Zero-shot class probabilities [C] (softmax over classes).

        `slide`: a SlideEncoding (scored by evidence, so a prompt ensemble per class can be given as a mapping
        {class: [prompts]}, see _class_evidence), or slide embeddings [d] / [S, d] (the paper's rule: softmax of
        cosine / zero_shot_temperature, one prompt per class; [S, d] -> [S, C])."""
        if isinstance(slide, SlideEncoding):
            return self._class_evidence(slide, prompts)[1].softmax(-1)
        emb = self._as_tensor(slide)
        probs = (self.similarity(emb, prompts) / self.config.zero_shot_temperature).softmax(-1)
        return probs[0] if emb.ndim == 1 else probs

    def retrieval_scores(self, encodings: Sequence[SlideEncoding], texts: Sequence[str]) -> np.ndarray:
        """[T, S] how well each description matches each slide (higher = better; rank slides by a column of
        texts or texts by a slide's row): the mean evidence of the description's sentences, plus
        retrieval_global_weight x the paper's slide-embedding cosine / zero_shot_temperature. Fine-grained:
        "fat in the lower left" is scored where the slide shows fat, not against a summary of every region."""
        slides = self._as_tensor(torch.stack([e.slide_embedding for e in encodings]))
        unit = F.normalize(slides.reshape(-1, self.config.embed_dim), dim=-1)
        if self.patch_head is None or any(e.patch_embeddings is None for e in encodings):
            return self.retrieval_scores_from(unit, texts)

        def evidence(sentences: list[str]) -> np.ndarray:
            encoded = self.encode_text(sentences)  # once for all slides
            return torch.stack([self.evidence_from_text(e, encoded) for e in encodings], 1).cpu().numpy()

        return self.retrieval_scores_from(unit, texts, evidence)

    def retrieval_scores_from(self, unit_slides: torch.Tensor, texts: Sequence[str],
                              sentence_evidence: Callable[[list[str]], np.ndarray] | None = None) -> np.ndarray:
        """The rule of `retrieval_scores` for slides given as L2-normalised slide embeddings [S, d], with the
        evidence of distinct sentences [V, S] from `sentence_evidence(sentences)` (None: the slide-embedding term
        alone, as without a patch-text head). A slide library's first search stage passes a bound of the evidence
        computed from its table (library/search.py)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        text = self.encode_text(texts).to(unit_slides.device)
        glob = (unit_slides @ text.T).T.cpu().numpy() / self.config.zero_shot_temperature  # [T, S]
        if sentence_evidence is None:
            return glob
        sentences = [split_sentences(t) or [t] for t in texts]
        vocab = list(dict.fromkeys(s for group in sentences for s in group))
        where = {s: i for i, s in enumerate(vocab)}
        evidence = sentence_evidence(vocab)  # [V, S]
        fine = np.stack([evidence[[where[s] for s in group]].mean(0) for group in sentences])
        return fine + self.config.retrieval_global_weight * glob
