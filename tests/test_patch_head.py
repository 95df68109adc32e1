"""Patch-text head: `python -m training patch-head` on frozen weights, and what the shipped head does on new slides."""

from __future__ import annotations

import re

import numpy as np
import pytest
from safetensors.torch import load_file

from napari_pathflip.weights import WeightsFolder
from napari_pathflip.model import PathFLIP
from napari_pathflip.model.config import CALIBRATION_TERMS
from napari_pathflip.model.patch_head import patch_positions
from training import patch_head
from training.data import FeatureSlides, build_synthetic_corpus, slide_name, write_text_files
from training.sources import read_records
from training.synth_eval import evaluate_alignment
from training.synthetic import SyntheticConfig


def make_split(root, split: str, count: int, seed0: int, size: int):
    folder = build_synthetic_corpus(root, split, count, seed0=seed0, config=SyntheticConfig(width=size, height=size))
    write_text_files(folder, [slide_name(split, s) for s in range(seed0, seed0 + count)])
    return folder


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    return make_split(tmp_path_factory.mktemp("corpus"), "train", 4, 0, 4096)


def test_training_adds_only_the_head_and_lowers_its_objective(weights, small_split, tmp_path):
    lines = []
    # the small random model's text embeddings are all alike: no synonym masking (threshold above any cosine)
    config = patch_head.PatchHeadConfig(steps=30, batch_slides=3, log_every=10, synonym_threshold=1.5)
    out = patch_head.train_patch_head(weights, [small_split / "features"], [small_split / "captions.csv"],
                                      tmp_path / "with_head", config, log=lines.append)
    before, after = load_file(str(weights / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(after) - set(before) == {k for k in after if k.startswith("patch_head.")} != set()
    for key, value in before.items():  # every PathFLIP tensor written back bit for bit: chat tokens unchanged
        assert after[key].dtype == value.dtype and bool((after[key] == value).all()), key
    assert (out / "encoder.json").is_file() and (out / "tokenizer.json").is_file()

    # the pooling sharpens from r 1 to the model's r (10) over the first half of the steps
    pools = [float(m[1]) for m in map(re.compile(r"step \d+/30 loss \S+ \(pooling r (\S+),").search, lines) if m]
    assert pools == [pytest.approx(1 + 9 * 10 / 15, abs=0.05), 10.0, 10.0]
    model = PathFLIP.from_pretrained(out)
    assert model.patch_head.pool == model.config.patch_head_pool == 10.0

    # the saved head is the trained one (its loss over the training slides is the one logged), and training lowered
    # the objective: an untrained head with the same feature statistics scores worse
    slides = FeatureSlides([small_split / "features"])
    ids, bags, vocab = patch_head._bags(slides, read_records(small_split / "captions.csv"))
    texts = model.encode_text(vocab)
    final = patch_head._full_loss(model.patch_head, texts, slides, ids, bags, config)
    logged = next(m for m in map(re.compile(r"training slides (\S+)$").search, lines) if m)
    assert final == pytest.approx(float(logged[1]), abs=1e-4)
    # presence calibrated on the training slides: the logged threshold is the stored scale and bias
    assert model.config.presence_scale != 1.0 and f"bias {model.config.presence_bias:.3f}" in lines[-1]
    untrained = PathFLIP.from_pretrained(weights).add_patch_head()
    untrained.load_state_dict({k: v for k, v in model.patch_head.state_dict().items() if k.startswith("feature_")},
                              strict=False)
    assert patch_head._full_loss(untrained, texts, slides, ids, bags, config) > final + 0.01

    assert model.config.patch_calibration is None  # no patch truth given: the head's scores only rank

    # the command line, in place, on a split folder: its facts.json and truth/ masks give exact labels and a patch
    # calibration (a logistic map of the patch features, fitted where the finding is present)
    assert patch_head.main(["--weights", str(out), "--split", str(small_split), "--steps", "2",
                            "--synonym-threshold", "1.5"]) == 0
    model = PathFLIP.from_pretrained(out)
    assert model.patch_head is not None and len(model.config.patch_calibration) == CALIBRATION_TERMS
    slide = slides[ids[0]]
    result = model.ground(model.encode_slide(slide.features, slide.coords, slide.patch_size_level0), "necrosis")
    assert result.calibrated and (result.patch_scores <= result.presence + 1e-12).all()


def test_shipped_head_grounds_findings_on_new_slides_better_than_attention(tmp_path):
    """Six synthetic slides the demo never rendered (test-split layouts, seeds after the demo's 64): the shipped
    weights' patch-text head must rank each finding's patches well and beat the paper's eq. 5 attention."""
    split = make_split(tmp_path, "test", 6, 64, 8192)
    result = evaluate_alignment(WeightsFolder.resolve().path, split)
    for kind in ("sentence", "phrase"):
        head, attention = result[f"grounding_{kind}"], result[f"grounding_{kind}_attention"]
        assert head["patch"]["auroc_mean"] >= 0.75, (kind, head["patch"])
        assert head["patch"]["auroc_mean"] > attention["patch"]["auroc_mean"] + 0.05, kind
        assert head["region"]["pointing_game"] >= attention["region"]["pointing_game"], kind
    assert np.isfinite(result["grounding_phrase"]["patch"]["pointing_game"])


def test_facts_label_each_sentence_by_what_it_asserts(weights):
    """With facts (synthetic splits write facts.json) a sentence is true of a slide when its facts are among the
    slide's: "necrosis" is a positive for a slide with necrosis even if its caption words it otherwise, and "tumour in
    the lower right" a negative for a slide whose tumour lies upper left, however alike the two sentences read."""
    import torch
    import torch.nn.functional as F

    from napari_pathflip.model import SlideInput

    model = PathFLIP.from_pretrained(weights)
    head = model.add_patch_head()
    rng = np.random.default_rng(0)
    coords = np.stack(np.meshgrid(np.arange(5), np.arange(4)), -1).reshape(-1, 2) * 256
    slides = [SlideInput(torch.from_numpy(rng.normal(size=(20, model.config.patch_dim)).astype(np.float32)),
                         coords, 256) for _ in range(2)]
    texts = F.normalize(torch.randn(3, model.config.embed_dim), dim=-1)
    facts = patch_head.Facts([frozenset({"tumour@upper left"}), frozenset({"tumour@lower right"}),
                              frozenset({"necrosis"})],
                             [frozenset({"tumour@upper left", "necrosis"}), frozenset({"tumour@lower right"})], [])
    bags = [[0], [1]]
    # every sentence a synonym of every other: without facts all negatives are left out
    with torch.no_grad():
        exact = patch_head.bag_loss(head, texts, slides, bags, -2.0, facts=facts)
        masked = patch_head.bag_loss(head, texts, slides, bags, -2.0)
        where = torch.from_numpy(np.stack([patch_positions(coords, 256)] * 2))
        sim = head.embed_text(texts[:2]) @ head.embed_patches(torch.stack([s.features for s in slides]),
                                                               where).transpose(1, 2)
        valid = torch.ones(2, 1, 20, dtype=torch.bool)
        logits = head.logits(head.pooled(sim, valid)).T  # [2 used sentences, 2 slides]
        # used sentences are those of the bags (0 and 1): exact labels [[1, 0], [0, 1]], every pair counted
        expected = F.binary_cross_entropy_with_logits(logits, torch.eye(2))
        only_positives = F.binary_cross_entropy_with_logits(logits.diagonal(), torch.ones(2))
    assert float(exact) == pytest.approx(float(expected), rel=1e-5)
    assert float(masked) == pytest.approx(float(only_positives), rel=1e-5)
    assert facts.true(2, 0) and not facts.true(2, 1) and not facts.true(1, 0)
