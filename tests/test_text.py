import re
from collections import Counter

import numpy as np
import pytest

from napari_pathflip.errors import PathflipError
from training.sources import read_caption_csv
from training.text import (SubcaptionConfig, join_sentences, sample_subcaption_indices, sample_subcaptions,
                           split_sentences)

DECIMAL = re.compile(r"\d+\.\d+")


@pytest.fixture(scope="module")
def captions(shared_data):
    return [r.turns[0][1] for r in read_caption_csv(shared_data / "slidebench" / "SlideBench-Caption-TCGA.csv")]


def _normalised(text):
    return re.sub(r"\s+", " ", text).strip()


def test_every_slidebench_caption_with_a_decimal_keeps_its_numbers_whole(captions):
    with_decimals = [c for c in captions if DECIMAL.search(c)]
    assert len(with_decimals) == 185  # the README's count: this is every one of them
    for caption in with_decimals:
        sentences = split_sentences(caption)
        assert " ".join(sentences) == _normalised(caption)  # nothing lost, nothing reordered
        assert Counter(d for s in sentences for d in DECIMAL.findall(s)) == Counter(DECIMAL.findall(caption))
        for left, right in zip(sentences, sentences[1:]):
            assert not (re.search(r"\d\.$", left) and right[0].isdigit()), (left, right)
        # the splitter only breaks where the original text did (before a capital), never inside a sentence
        assert all(s[0].isupper() for s in sentences)
        assert len(sentences) >= 2


def test_all_captions_split_where_a_reader_would(captions):
    joined_after = Counter()
    for caption in captions:
        sentences = split_sentences(caption)
        assert " ".join(sentences) == _normalised(caption)
        assert all(re.search(r"[.?!][\"')]*$", s) for s in sentences)  # every caption sentence is terminated
        for s in sentences:  # a period + space + word that was NOT split: must be one of the known abbreviations
            joined_after.update(m.group(1) for m in re.finditer(r"(\S+)\.\s", s))
    assert set(joined_after) == {"N.S.A.B.P", "No", "(No"}
    # the blank lines in three captions are paragraph breaks
    newline_captions = [c for c in captions if "\n" in c]
    assert len(newline_captions) == 3
    for caption in newline_captions:
        assert all("\n" not in s for s in split_sentences(caption))
    real = next(c for c in captions if "blunt duct." in c)
    assert any(s.endswith('"blunt duct."') for s in split_sentences(real))


@pytest.mark.parametrize("text, expected", [
    ("The tumor measures 3.5 x 2.0 x 1.5 cm. Margins are clear.",
     ["The tumor measures 3.5 x 2.0 x 1.5 cm.", "Margins are clear."]),
    ("Stains (e.g. CK7) and markers, i.e. TTF-1, were done. Dr. Smith agreed. Type A vs. B. Approx. 3 cm. "
     "Cf. Fig. 2 and St. Mary. As Smith et al. Noted before.",
     ["Stains (e.g. CK7) and markers, i.e. TTF-1, were done.", "Dr. Smith agreed.", "Type A vs. B.",
      "Approx. 3 cm.", "Cf. Fig. 2 and St. Mary.", "As Smith et al. Noted before."]),
    ("Lymph node (No. 5) is positive. Is there invasion? No. The margins are clear!",
     ["Lymph node (No. 5) is positive.", "Is there invasion?", "No.", "The margins are clear!"]),
    ("Diagnosis: 1. Carcinoma of breast. 2. Margins clear. Grades range from 3 to 4. Gross exam done.",
     ["Diagnosis: 1. Carcinoma of breast.", "2. Margins clear.", "Grades range from 3 to 4.", "Gross exam done."]),
    ("Diagnosis\n1. Invasive carcinoma\n2. DCIS present\n\nThis paragraph wraps\nover lines. Ends here",
     ["Diagnosis", "1. Invasive carcinoma", "2. DCIS present", "This paragraph wraps over lines.", "Ends here"]),
    ("Grade I. The tumor is pT2 N0. KRAS (p.G12V), G.3 and .5 cm. Done.",
     ["Grade I.", "The tumor is pT2 N0.", "KRAS (p.G12V), G.3 and .5 cm.", "Done."]),
    ("Staged as T2. pN0 was found. ypT1 after therapy. e.g. pT2 stays.",
     ["Staged as T2.", "pN0 was found.", "ypT1 after therapy. e.g. pT2 stays."]),
    ("", []),
])
def test_split_sentences_rules(text, expected):
    assert split_sentences(text) == expected


def test_join_never_doubles_periods():
    assert join_sentences(["A b.", "C d", 'E "f."', "G?"]) == 'A b. C d. E "f." G?'
    assert join_sentences(["One", "two"]) == "One. two."


def test_subcaptions_are_deterministic_and_in_document_order(captions):
    sentences = split_sentences(captions[0])
    first = sample_subcaptions(captions[0], np.random.default_rng(7))
    assert first == sample_subcaptions(sentences, np.random.default_rng(7))
    assert len(first) == 8 and first != sample_subcaptions(captions[0], np.random.default_rng(8))
    for draw in sample_subcaption_indices(len(sentences), np.random.default_rng(7)):
        assert draw == sorted(set(draw)) and 1 <= len(draw) <= 3
    for caption in captions:  # made of whole sentences of the caption, no doubled period anywhere
        whole = split_sentences(caption)
        for sub in sample_subcaptions(whole, np.random.default_rng(0)):
            assert ".." not in sub and set(split_sentences(sub)) <= set(whole)


def test_merge_sizes_and_last_window_are_drawn_as_specified():
    rng, draws = np.random.default_rng(0), []
    for _ in range(4000):
        draws += sample_subcaption_indices(5, rng)  # 32,000 subcaptions of a 5-sentence caption
    sizes = Counter(len(d) for d in draws)
    for m in (1, 2, 3):
        assert abs(sizes[m] / len(draws) - 1 / 3) < 0.015
    # P(indices == [2, 3, 4]) = P(m=3) * (P(consecutive) / 3 window starts + P(random) / C(5,3) subsets)
    expected = (1 / 3) * (0.5 / 3 + 0.5 / 10)
    assert abs(sum(d == [2, 3, 4] for d in draws) / len(draws) - expected) < 0.006
    first_windows = sum(d == [0, 1, 2] for d in draws) / len(draws)
    assert abs(first_windows - expected) < 0.006  # first and last windows equally likely
    # among m = 3 draws, contiguous ones: consecutive branch (1/2) + random subsets that happen to be (3/10 * 1/2)
    triples = [d for d in draws if len(d) == 3]
    contiguous = sum(d[2] - d[0] == 2 for d in triples) / len(triples)
    assert abs(contiguous - (0.5 + 0.5 * 3 / 10)) < 0.02


def test_merge_size_is_capped_at_the_sentence_count():
    rng = np.random.default_rng(1)
    assert sample_subcaptions(["Only one."], rng) == ["Only one."] * 8
    draws = sample_subcaption_indices(2, rng, SubcaptionConfig(k=3000))
    sizes = Counter(len(d) for d in draws)
    assert set(sizes) == {1, 2} and abs(sizes[2] / 3000 - 2 / 3) < 0.04  # m in {2, 3} both become 2
    assert Counter(tuple(d) for d in draws if len(d) == 1).keys() == {(0,), (1,)}
    with pytest.raises(PathflipError, match="empty caption"):
        sample_subcaptions("   ", rng)
