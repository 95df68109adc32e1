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
    # not found paints nothing, calibrated or not, at any threshold
    assert not shown_patches(_result([0.01, 0.02, 0.03], False, presence=0.1), threshold=0.0).any()


def test_heatmap_grid_gates_every_detail_by_the_presence_call():
    """A finding the slide does not show paints nothing at patch or region detail; calibrated region maps are the
    region probabilities times the presence, on the fixed scale; uncalibrated ones are relative to the slide."""
    from types import SimpleNamespace

    from napari_pathflip.analysis import heatmap_grid

    encoding = SimpleNamespace(region_boxes=np.array([[0, 0, 512, 512], [512, 0, 1024, 512]]),
                               region_size_level0=512, patch_size_level0=256,
                               patch_coords=np.array([[0, 0], [256, 0], [512, 0], [768, 0]]))
    regions = np.array([0.9, 0.3])

    def result(calibrated, presence):
        return GroundingResult(text="x", region_scores=regions, top_regions=np.array([0, 1]),
                               top_boxes=np.zeros((2, 5)), patch_scores=np.array([0.9, 0.8, 0.2, 0.1]),
                               presence=presence, calibrated=calibrated)

    for calibrated in (True, False):
        for patch_level in (True, False):
            assert not heatmap_grid(encoding, result(calibrated, 0.1), patch_level).values.any()
    np.testing.assert_allclose(heatmap_grid(encoding, result(True, 0.9), False).values, [[0.81, 0.27]])
    np.testing.assert_allclose(heatmap_grid(encoding, result(False, 0.9), False).values, [[1.0, 0.0]])
    np.testing.assert_allclose(heatmap_grid(encoding, result(True, 0.9), True).values,
                               [[0.9, 0.8, 0.2, 0.1], [0, 0, 0, 0]])  # the row below has no patches


def test_training_synonyms_are_not_the_held_out_wordings_in_other_clothes():
    """No training synonym, in any form training makes of it (phrase_variants), stands inside a held-out wording
    of the evaluation or has one inside it (spelling aside), and none shares a word with one of the same finding
    other than the finding's own names."""
    from training.patch_head import TRUTH_OF_FACT
    from training.synthetic import FINDING_NAMES

    def norm(text):
        return " " + text.lower().replace("tumor", "tumour").replace("fibers", "fibres").replace("-", " ") + " "

    held_out = [norm(p) for wordings in PARAPHRASES.values() for p in wordings] + [norm(a) for a in ABSENT_FINDINGS]
    trained = {norm(v) for words in SYNONYMS.values() for w in words for v in (w, *phrase_variants(w))}
    assert not [(t, h) for t in trained for h in held_out if t in h or h in t]

    def words(text):
        return {w.rstrip("s") for w in norm(text).split()} - {"a", "the", "of", "area", "foci", "cell", "tissue"}

    for fact, synonyms in SYNONYMS.items():
        # the corpus's own names for the finding (FINDING_NAMES) are training words anyway
        own = set().union(*map(words, FINDING_NAMES.get(fact, ()) + (fact,))) | {
            "necrotic", "lymphocytic", "lymphocyte", "lymphoid", "glandular", "fatty"}
        for synonym in synonyms:
            shared = {(synonym, p) for p in PARAPHRASES[TRUTH_OF_FACT[fact]] if (words(synonym) & words(p)) - own}
            assert not shared, shared
