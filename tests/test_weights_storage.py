"""Weights folders that refer to their frozen text tower instead of storing a copy (PathFLIPConfig.text_tower)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from napari_pathflip.errors import PathflipError
from napari_pathflip.model import PathFLIP, PathFLIPConfig, default_bert_dir
from napari_pathflip.model import TEXT_TOWER_PACKAGE
from napari_pathflip.weights import MODEL_FILE
from napari_pathflip.viewer.sample_data import sample_data_dir

TEXTS = ["necrosis", "A large tumour nest occupies the upper left part of the section.", "a 3.5 cm tumour, grade 2"]


def _aligned_model(tower: str) -> PathFLIP:
    """A model as alignment with a frozen text tower leaves it: the tower is MiniLM's, the rest trained (random)."""
    torch.manual_seed(0)
    model = PathFLIP.from_bert(config=PathFLIPConfig(patch_dim=24, region_patches=4, max_patches_per_region=16,
                                                     text_pooling="mean"))
    model.config.text_tower = tower
    return model.eval()


def _outputs(model: PathFLIP):
    rng = np.random.default_rng(0)
    coords = np.stack(np.meshgrid(np.arange(12), np.arange(10)), -1).reshape(-1, 2) * 256
    encoding = model.encode_slide(rng.normal(size=(len(coords), 24)).astype(np.float32), coords, 256)
    return encoding.slide_embedding, encoding.region_embeddings, model.encode_text(TEXTS)


def test_frozen_text_tower_is_referenced_not_stored_and_reloads_bit_for_bit(tmp_path):
    full, referenced = tmp_path / "full", tmp_path / "referenced"
    _aligned_model("").save_pretrained(full, dtype=torch.float16)
    model = _aligned_model(TEXT_TOWER_PACKAGE)
    model.save_pretrained(referenced, dtype=torch.float16)

    stored = load_file(str(referenced / MODEL_FILE))
    assert not set(model.text_tower_keys()) & set(stored)  # no copy of the tower
    assert any(k.endswith("ffn_query.fc1.weight") for k in stored)  # the query feed-forwards train: stored
    assert not (referenced / "tokenizer.json").exists() and (full / "tokenizer.json").exists()
    assert (referenced / MODEL_FILE).stat().st_size < 0.5 * (full / MODEL_FILE).stat().st_size

    a, b = PathFLIP.from_pretrained(full), PathFLIP.from_pretrained(referenced)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    for x, y in zip(_outputs(a), _outputs(b)):
        assert torch.equal(x, y)
    assert b.tokenizer(TEXTS)["input_ids"] == a.tokenizer(TEXTS)["input_ids"]


def test_a_different_text_tower_is_refused(tmp_path):
    tower = tmp_path / "bert"
    shutil.copytree(default_bert_dir(), tower)
    model = _aligned_model(str(tower))
    model.save_pretrained(tmp_path / "weights")
    assert PathFLIP.from_pretrained(tmp_path / "weights").config.text_tower == str(tower)

    state = load_file(str(tower / MODEL_FILE))
    key = next(k for k in state if k.endswith("attention.self.query.weight"))
    state[key] = state[key] + 1e-3  # someone else's fine-tuned copy in the same place
    save_file(state, str(tower / MODEL_FILE))
    with pytest.raises(PathflipError, match="not the one these weights were trained with"):
        PathFLIP.from_pretrained(tmp_path / "weights")


def test_shipped_demo_weights_store_only_what_was_trained():
    folder = sample_data_dir() / "weights" / "pathflip"
    model = PathFLIP.from_pretrained(folder)
    assert model.config.text_tower == TEXT_TOWER_PACKAGE
    assert not set(model.text_tower_keys()) & set(load_file(str(folder / MODEL_FILE)))


def test_a_weights_folder_named_by_a_string_is_the_same_folder():
    from napari_pathflip.weights import WeightsFolder

    folder = sample_data_dir() / "weights" / "pathflip"
    by_text, by_path = WeightsFolder(str(folder)), WeightsFolder(folder)
    assert by_text == by_path and isinstance(by_text.path, Path) and by_text.id == by_path.id
