"""Patch-text head: `python -m training patch-head` on frozen weights, and what the shipped head does on new slides."""

from __future__ import annotations

import re

import numpy as np
import pytest
from safetensors.torch import load_file

from napari_pathflip.analysis import default_weights_dir
from napari_pathflip.model import PathFLIP
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
    assert final == pytest.approx(float(re.search(r"training slides (\S+)$", lines[-1])[1]), abs=1e-4)
    untrained = PathFLIP.from_pretrained(weights).add_patch_head()
    untrained.load_state_dict({k: v for k, v in model.patch_head.state_dict().items() if k.startswith("feature_")},
                              strict=False)
    assert patch_head._full_loss(untrained, texts, slides, ids, bags, config) > final + 0.01

    # the command line, in place, on a split folder
    assert patch_head.main(["--weights", str(out), "--split", str(small_split), "--steps", "2",
                            "--synonym-threshold", "1.5"]) == 0
    assert PathFLIP.from_pretrained(out).patch_head is not None


def test_shipped_head_grounds_findings_on_new_slides_better_than_attention(tmp_path):
    """Six synthetic slides the demo never rendered (test-split layouts, seeds after the demo's 64): the shipped
    weights' patch-text head must rank each finding's patches well and beat the paper's eq. 5 attention."""
    split = make_split(tmp_path, "test", 6, 64, 8192)
    result = evaluate_alignment(default_weights_dir(), split)
    for kind in ("sentence", "phrase"):
        head, attention = result[f"grounding_{kind}"], result[f"grounding_{kind}_attention"]
        assert head["patch"]["auroc_mean"] >= 0.75, (kind, head["patch"])
        assert head["patch"]["auroc_mean"] > attention["patch"]["auroc_mean"] + 0.05, kind
        assert head["region"]["pointing_game"] >= attention["region"]["pointing_game"], kind
    assert np.isfinite(result["grounding_phrase"]["patch"]["pointing_game"])
