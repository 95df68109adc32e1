"""The subcaption sampler (spec: "Subcaptions") over the core's sentence splitter (napari_pathflip.text)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from napari_pathflip.errors import PathflipError
from napari_pathflip.text import join_sentences, split_sentences

__all__ = ["SubcaptionConfig", "join_sentences", "sample_subcaption_indices", "sample_subcaptions", "split_sentences"]


@dataclass
class SubcaptionConfig:
    k: int = 8  # subcaptions per caption
    max_merge: int = 3  # m ~ uniform{1, ..., max_merge}, capped at the sentence count
    p_consecutive: float = 0.5  # for m > 1: probability of a consecutive window instead of m random sentences


def sample_subcaption_indices(n_sentences: int, rng: np.random.Generator,
                              config: SubcaptionConfig | None = None) -> list[list[int]]:
    """Sentence indices (document order) of each of the K subcaptions; deterministic given `rng`."""
    config = config or SubcaptionConfig()
    if n_sentences < 1:
        raise PathflipError("Cannot draw subcaptions from an empty caption: give every slide a non-empty caption.")
    draws: list[list[int]] = []
    for _ in range(config.k):
        m = min(int(rng.integers(1, config.max_merge + 1)), n_sentences)
        if m == 1:
            draws.append([int(rng.integers(n_sentences))])
        elif rng.random() < config.p_consecutive:
            first = int(rng.integers(n_sentences - m + 1))  # every window start, the last one included
            draws.append(list(range(first, first + m)))
        else:
            draws.append(sorted(int(i) for i in rng.choice(n_sentences, size=m, replace=False)))
    return draws


def sample_subcaptions(caption: str | Sequence[str], rng: np.random.Generator,
                       config: SubcaptionConfig | None = None) -> list[str]:
    """K subcaptions of a caption (text, or its sentences already split), per the spec's sampler."""
    sentences = split_sentences(caption) if isinstance(caption, str) else list(caption)
    return [join_sentences([sentences[i] for i in draw])
            for draw in sample_subcaption_indices(len(sentences), rng, config)]


# British spellings and their American forms (both ways), for phrase_variants
SPELLINGS = {"tumour": "tumor", "centre": "center", "haemorrhage": "hemorrhage", "oedema": "edema", "fibre": "fiber",
             "haematoxylin": "hematoxylin", "oesophagus": "esophagus", "anaemia": "anemia", "leukaemia": "leukemia"}
# count nouns (singular -> plural) whose number a phrase may change; mass nouns ("fat", "necrosis") have none
PLURALS = {"tumour": "tumours", "tumor": "tumors", "gland": "glands", "lymphocyte": "lymphocytes", "nest": "nests",
           "aggregate": "aggregates", "lobule": "lobules", "cell": "cells", "focus": "foci"}


def phrase_variants(phrase: str) -> list[str]:
    """Ways a pathologist types the same finding: British/American spelling, singular/plural of its last count
    noun, with or without an article, and inside "areas of ...", "foci of ...", "presence of ...", "... is
    present". Training texts (the patch-head stage) are widened with these so that wording does not move a score;
    the words themselves stay the phrase's own (synonyms are the text encoder's business)."""
    head, sep, where = phrase.partition(" in the ")
    forms = {head}
    for gb, us in SPELLINGS.items():
        forms |= {f.replace(gb, us) for f in forms} | {f.replace(us, gb) for f in forms}
    words = {f: f.split() for f in forms}
    singular = {v: k for k, v in PLURALS.items()}
    for form, parts in list(words.items()):
        last = parts[-1]
        if last in PLURALS:
            forms.add(" ".join(parts[:-1] + [PLURALS[last]]))
        elif last in singular:
            forms.add(" ".join(parts[:-1] + [singular[last]]))
    out = set()
    for form in forms:
        count = form.split()[-1] in PLURALS
        out |= {form, f"the {form}", f"areas of {form}", f"foci of {form}", f"presence of {form}",
                f"{form} {'are' if form.split()[-1] in singular else 'is'} present"}
        if count:
            out.add(f"{'an' if form[0] in 'aeiou' else 'a'} {form}")
    return sorted(f"{o}{sep}{where}" for o in out if o != head)
