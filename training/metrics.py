"""Evaluation metrics of the paper's protocols (spec: "Evaluation protocols") plus grounding.

Plain functions over numpy arrays and strings, so training code can call them on model outputs directly and
`training.evaluate` can call them on files. Every function returns JSON-ready dicts of Python floats/ints.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
from rouge_score import rouge_scorer
from sklearn.metrics import f1_score

# AUROC and the pointing game live in the core: napari_pathflip.annotations scores a heatmap against annotations
from napari_pathflip.annotations import auroc, pointing_hit

# ----------------------------------------------------------------------------------------------- retrieval


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[A, d] x [B, d] -> [A, B] cosine similarities (rows L2-normalised; zero rows stay zero)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def _recall_at(similarity: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    # Query i's match is column i. Conservative ties: the match ranks behind every candidate scoring the same,
    # so a constant similarity matrix gets R@1 = 0 instead of a lucky 1.
    true = np.diagonal(similarity)[:, None]
    rank = (similarity >= true).sum(axis=1)  # 1 = the match strictly beats all others
    return {f"R@{k}": float(np.mean(rank <= k)) for k in ks}


def retrieval_recall(similarity: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k both ways from a square similarity matrix [slides, texts] where pair i matches i."""
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be square [S, S], got shape {similarity.shape}")
    if not np.isfinite(similarity).all():
        raise ValueError("similarity contains NaN or infinite values")
    return {"n": int(similarity.shape[0]),
            "slide_to_text": _recall_at(similarity, ks),
            "text_to_slide": _recall_at(similarity.T, ks)}


# ----------------------------------------------------------------------------------------------- zero-shot


def zero_shot_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, one-vs-rest macro AUROC and macro F1 from class scores [S, C] (probabilities or logits).

    AUROC per class is class-vs-rest on that class's score; classes absent from `labels` (AUROC undefined) are left
    out of the macro mean and listed. Macro F1 averages over the classes present in labels or predictions
    (scikit-learn's default), so a class nobody has or predicts does not add a zero.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(int)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"need scores [S, C] and labels [S], got {scores.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"labels must lie in 0..{scores.shape[1] - 1}")
    predicted = scores.argmax(axis=1)
    per_class = [auroc(labels == c, scores[:, c]) for c in range(scores.shape[1])]
    defined = [a for a in per_class if a is not None]
    return {
        "n": int(labels.size),
        "accuracy": float(np.mean(predicted == labels)),
        "auc_macro": float(np.mean(defined)) if defined else None,
        "auc_per_class": per_class,
        "f1_macro": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }


# ----------------------------------------------------------------------------------------------- VQA


def vqa_choice(response: str | None) -> str:
    """SlideBench's reading of a response: its text up to the first ".", whitespace stripped.

    "C" and "C. Because ..." read as "C"; "C) Because ..." reads as "C) Because ..." and "c." as "c", which do not
    match "C": the rule is an exact, case-sensitive comparison with the answer letter and nothing more lenient.
    """
    return "" if response is None else response.split(".", 1)[0].strip()


def vqa_accuracy(responses: Sequence[str | None], answers: Sequence[str],
                 categories: Sequence[str] | None = None) -> dict:
    """Accuracy overall and per category under the SlideBench rule; a None response (missing) is wrong.

    `category_mean` is the unweighted mean of the per-category accuracies (how averages over categories are
    usually reported); `accuracy` weights every question equally.
    """
    if len(responses) != len(answers) or (categories is not None and len(categories) != len(answers)):
        raise ValueError("responses, answers and categories must have the same length")
    correct = [vqa_choice(r) == a.strip() for r, a in zip(responses, answers)]
    result = {"n": len(correct), "correct": int(sum(correct)),
              "accuracy": float(np.mean(correct)) if correct else None}
    if categories is not None:
        groups: dict[str, list[bool]] = defaultdict(list)
        for category, ok in zip(categories, correct):
            groups[category].append(ok)
        result["by_category"] = {c: {"n": len(v), "correct": int(sum(v)), "accuracy": float(np.mean(v))}
                                 for c, v in sorted(groups.items())}
        result["category_mean"] = float(np.mean([g["accuracy"] for g in result["by_category"].values()])) \
            if groups else None
    return result


# ----------------------------------------------------------------------------------------------- captions

_TOKEN = re.compile(r"\w+(?:[.\-/]\w+)*")


def caption_tokens(text: str) -> list[str]:
    """Lower-case word tokens without punctuation ("3.5", "her-2/neu" and "pT2N0" stay whole).

    A regex and not nltk's word_tokenize, which needs downloaded Punkt data; dropping punctuation follows the
    COCO caption evaluation convention so a missing final period costs nothing.
    """
    return _TOKEN.findall(text.lower())


def caption_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    """Corpus BLEU-1..4 (nltk) and mean ROUGE-L F-measure (rouge_score) of predictions vs references.

    BLEU-n is cumulative with uniform weights over 1..n-grams, computed over the whole corpus. Smoothing is
    Chen & Cherry's method 1 (an order with zero matches counts 0.1 matches); at corpus level it only matters when
    some n-gram order never matches at all, where it gives a small number instead of nltk's 0 and a warning.
    ROUGE-L is the F-measure (beta 1) of the longest common subsequence on rouge_score's own tokenisation, no
    stemming; with several references per prediction the best one counts.
    """
    if len(predictions) != len(references):
        raise ValueError("predictions and references must have the same length")
    if not predictions:
        raise ValueError("no captions to score")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    bleu = corpus_bleu([[caption_tokens(r) for r in rs] for rs in refs],
                       [caption_tokens(p) for p in predictions],
                       weights=[(1.0,), (0.5, 0.5), (1 / 3,) * 3, (0.25,) * 4],
                       smoothing_function=SmoothingFunction().method1)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score_multi(rs, p)["rougeL"].fmeasure for rs, p in zip(refs, predictions)]
    return {"n": len(predictions), **{f"bleu_{n}": float(b) for n, b in enumerate(bleu, 1)},
            "rouge_l": float(np.mean(rouge))}


# ----------------------------------------------------------------------------------------------- grounding


@dataclass
class GroundingConfig:
    region_min_overlap: float = 0.1  # a region is "in the finding" when >= this fraction of it lies in the mask
    patch_min_overlap: float = 0.5  # same for a patch (more than half of it)


def box_mask_fraction(mask: np.ndarray, downsample: float, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each level-0 box [x, y, w, h] covered by a boolean mask stored at `downsample`.

    The mask pixel (i, j) covers level-0 [j, j+1) x [i, i+1) times `downsample`. Boxes are clipped to the mask's
    extent and the fraction is of the clipped area (a region at the slide border counts its part on the slide);
    a box entirely outside gets 0. Uses a summed-area table, so many boxes cost little.
    """
    mask = np.asarray(mask, dtype=bool)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / downsample
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = mask.cumsum(0).cumsum(1)
    x0 = np.clip(np.round(boxes[:, 0]), 0, mask.shape[1]).astype(int)
    y0 = np.clip(np.round(boxes[:, 1]), 0, mask.shape[0]).astype(int)
    x1 = np.clip(np.round(boxes[:, 0] + boxes[:, 2]), 0, mask.shape[1]).astype(int)
    y1 = np.clip(np.round(boxes[:, 1] + boxes[:, 3]), 0, mask.shape[0]).astype(int)
    inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    area = (x1 - x0) * (y1 - y0)
    return np.where(area > 0, inside / np.maximum(area, 1), 0.0)


def _grounding_level(scores: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> dict:
    scorable = [(s, t) for s, t in zip(scores, truth) if np.asarray(t, dtype=bool).any()]
    aurocs = [a for a in (auroc(t, s) for s, t in scorable) if a is not None]
    pooled = auroc(np.concatenate([t for _, t in scorable]), np.concatenate([s for s, _ in scorable])) \
        if scorable else None
    return {
        "n_queries": len(scores),
        "n_without_truth": len(scores) - len(scorable),  # no item in the finding: left out of every number
        "pointing_game": float(np.mean([pointing_hit(s, t) for s, t in scorable])) if scorable else None,
        "auroc_mean": float(np.mean(aurocs)) if aurocs else None,  # mean of per-query AUROCs
        "n_auroc": len(aurocs),
        "auroc_pooled": pooled,  # one AUROC over all queries' items together
    }


def grounding_metrics(region_scores: Sequence[np.ndarray] | None = None,
                      region_truth: Sequence[np.ndarray] | None = None,
                      patch_scores: Sequence[np.ndarray] | None = None,
                      patch_truth: Sequence[np.ndarray] | None = None) -> dict:
    """Pointing game and AUROC per level; each argument is one 1-D array per query (text query x slide)."""
    result = {}
    for level, scores, truth in (("region", region_scores, region_truth), ("patch", patch_scores, patch_truth)):
        if scores is None:
            continue
        if truth is None or len(truth) != len(scores) or any(
                np.shape(s) != np.shape(t) for s, t in zip(scores, truth)):
            raise ValueError(f"{level} scores and truth must be matching per-query arrays")
        result[level] = _grounding_level([np.asarray(s, dtype=np.float64).ravel() for s in scores],
                                         [np.asarray(t, dtype=bool).ravel() for t in truth])
    return result



# ----------------------------------------------------------------------------------------------- what is displayed


def displayed_area_metrics(shown: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> dict:
    """Precision and Dice of the area a heatmap paints (`shown`: the patches at or above its threshold) against
    the finding's patches, one boolean array per query on a slide that has the finding. "pooled": over every
    query's patches together; "mean": the mean of the per-query figures (a query that paints nothing has
    precision 0)."""
    shown = [np.asarray(s, dtype=bool).ravel() for s in shown]
    truth = [np.asarray(t, dtype=bool).ravel() for t in truth]
    if not shown:
        return {"n_queries": 0}
    tp = np.array([(s & t).sum() for s, t in zip(shown, truth)], dtype=np.float64)
    painted = np.array([s.sum() for s in shown], dtype=np.float64)
    real = np.array([t.sum() for t in truth], dtype=np.float64)
    return {"n_queries": len(shown),
            "precision_pooled": float(tp.sum() / max(painted.sum(), 1)),
            "dice_pooled": float(2 * tp.sum() / max(painted.sum() + real.sum(), 1)),
            "precision_mean": float(np.mean(tp / np.maximum(painted, 1))),
            "dice_mean": float(np.mean(2 * tp / np.maximum(painted + real, 1))),
            "painted_nothing": float(np.mean(painted == 0))}


def expected_calibration_error(probability: np.ndarray, outcome: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: the mean |accuracy - confidence| over `bins` equal-width probability bins,
    weighted by their share of the items."""
    p = np.asarray(probability, dtype=np.float64).ravel()
    y = np.asarray(outcome, dtype=np.float64).ravel()
    if p.shape != y.shape or p.size == 0:
        raise ValueError("expected_calibration_error needs matching, non-empty probabilities and outcomes")
    which = np.minimum((p * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, p, bins) - np.bincount(which, y, bins))
    return float(gap.sum() / p.size) if count.any() else 0.0
