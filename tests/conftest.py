import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"shared test data must sit beside the project: {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="session")
def wsi_dir(shared_data) -> Path:
    return shared_data / "wsi"


# Small randomly initialised weights, saved and reloaded exactly like real ones, laid out like sample_data/weights:
# <root>/pathflip (PathFLIP over built-in encoder features) and <root>/chat (projector + tiny Qwen3 LLM).
SMALL = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, embed_dim=32, vision_width=32,
             mixer_heads=4, mixer_ffn=64, text_region_heads=4)


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    """A small random PathFLIP folder (config.json, model.safetensors, tokenizer, encoder.json = builtin)."""
    import json

    import torch
    from transformers import AutoTokenizer

    from napari_pathflip.encoders import BuiltinEncoder
    from napari_pathflip.model import PathFLIP, PathFLIPConfig
    from napari_pathflip.model.modeling import default_bert_dir

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(default_bert_dir()), local_files_only=True)
    model = PathFLIP(PathFLIPConfig(patch_dim=BuiltinEncoder().dim, **SMALL), tokenizer)
    folder = tmp_path_factory.mktemp("weights") / "pathflip"
    model.save_pretrained(folder)
    (folder / "encoder.json").write_text(json.dumps({"encoder": "builtin"}))
    return folder


@pytest.fixture(scope="session")
def chat_folder(weights, shared_data) -> Path:
    """A tiny random Qwen3-architecture chat model over the `weights` embeddings, in weights/../chat."""
    import csv

    import torch

    from napari_pathflip.chat import ChatConfig, ChatEngine, GenerationSettings
    from training.tiny_llm import TinyLLMConfig, build_tiny_llm

    with open(shared_data / "slidebench" / "SlideBench-Caption-TCGA.csv", encoding="utf-8-sig", newline="") as f:
        captions = [row["Caption"] for row in csv.DictReader(f)]
    torch.manual_seed(0)
    small = TinyLLMConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=32, intermediate_size=128)
    model, tokenizer = build_tiny_llm(captions[:200], small)
    config = ChatConfig(visual_dim=SMALL["embed_dim"], generation=GenerationSettings(max_new_tokens=16))
    folder = weights.parent / "chat"
    ChatEngine(model, tokenizer, config).save(folder)
    return folder
