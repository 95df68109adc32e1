"""The evaluation's held-out wordings are held out, and its display metrics count what a person sees."""

from __future__ import annotations

import numpy as np

from napari_pathflip.analysis import shown_patches
from napari_pathflip.model.encoding import GroundingResult
from training.patch_head import NEVER_SHOWN, SYNONYMS
from training.synth_eval import ABSENT_FINDINGS, PARAPHRASES, PHRASES, ZERO_SHOT
from training.synthetic import fact_phrases
from training.text import phrase_variants


def _training_texts() -> set[str]:
    phrases = set(fact_phrases()) | set(NEVER_SHOWN) | {w for words in SYNONYMS.values() for w in words}
    return phrases | {v for p in phrases for v in phrase_variants(p)}


def test_paraphrases_and_absent_findings_never_reach_training():
    trained = {t.lower() for t in _training_texts()}
    held_out = [p for wordings in PARAPHRASES.values() for p in wordings] + list(ABSENT_FINDINGS)
    assert not [t for t in held_out if t.lower() in trained]
    # the background class of training names no finding the corpus shows, nor any finding the evaluation asks
    asked = {t.lower() for t in [*PHRASES.values(), *ABSENT_FINDINGS, *(p for v in ZERO_SHOT.values() for p in v)]}
    corpus = {name.lower() for name in fact_phrases()}
    assert not {n.lower() for n in NEVER_SHOWN} & (asked | corpus)
    assert not [n for n in NEVER_SHOWN if any(a in n.lower() for a in ("calcif", "mitot", "granulom"))]


def _result(scores, calibrated, presence=None):
    return GroundingResult(text="x", region_scores=np.zeros(1), top_regions=np.zeros(1, int),
                           top_boxes=np.zeros((1, 5)), patch_scores=np.asarray(scores, dtype=np.float64),
                           presence=presence, calibrated=calibrated)


def test_shown_patches_follow_the_display_rule():
    scores = [0.1, 0.49, 0.5, 0.9, np.nan]
    # calibrated: probabilities as they are against 0.5; an absent finding's low probabilities paint nothing
    assert shown_patches(_result(scores, True)).tolist() == [False, False, True, True, False]
    assert not shown_patches(_result([0.01, 0.02, 0.03], True, presence=0.03)).any()
    # uncalibrated: relative to the slide's range, so the best patch always paints
    assert shown_patches(_result([0.01, 0.02, 0.03], False)).tolist() == [False, True, True]
    assert shown_patches(_result(scores, True), threshold=0.95).sum() == 0


def test_training_synonyms_are_not_the_held_out_wordings_in_other_clothes():
    """No training synonym shares its content words with a held-out paraphrase of the same finding."""
    from training.patch_head import TRUTH_OF_FACT

    def words(text):
        return {w.rstrip("s") for w in text.lower().replace("-", " ").split()} - {"a", "the", "of", "areas", "foci"}

    for fact, synonyms in SYNONYMS.items():
        held_out = PARAPHRASES[TRUTH_OF_FACT[fact]]
        assert not [(s, p) for s in synonyms for p in held_out if words(s) == words(p)], fact
