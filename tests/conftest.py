import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = Path(__file__).resolve().parent / "data"
# Optional extra data beside the project: the SlideBench CSVs (public, licence unclear, so not in this repository).
# Only the `shared_data` fixture looks there, and every test that uses it is marked `slidebench`; no other fixture
# behaves differently with or without it. PATHFLIP_NO_SHARED=1 runs the suite as a clone alone sees it (.ci/run).
SHARED_DATA = ROOT.parent / "shared" / "data"
NO_SHARED = os.environ.get("PATHFLIP_NO_SHARED", "") not in ("", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "slidebench: reads the SlideBench CSVs in ../shared/data (skipped without)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slidebench)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data with the SlideBench CSVs; the tests that read them skip when it is not beside the project."""
    if NO_SHARED or not (SHARED_DATA / "slidebench").is_dir():
        pytest.skip(f"needs the SlideBench CSVs in {SHARED_DATA / 'slidebench'} (not shipped with the repository: "
                    "their licence is unclear)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def wsi_dir(tmp_path_factory) -> Path:
    """The real slides of tests/data plus damaged files made from them at the start of the session (see
    tests/data/README.md): unreadable.svs (small.svs with its level-0 tile broken), unopenable.tiff (a compression
    nobody knows), broken.svs (not a TIFF), truncated.tiff (a TIFF header pointing past the end of the file)."""
    import shutil

    from wsi_writer import corrupt_tile, write_unknown_compression

    folder = tmp_path_factory.mktemp("wsi")
    for name in ("CMU-1-Small-Region.svs", "small.svs"):
        (folder / name).symlink_to(TEST_DATA / name)
    shutil.copyfile(TEST_DATA / "small.svs", folder / "unreadable.svs")
    corrupt_tile(folder / "unreadable.svs", level=0, x=0, y=0)
    write_unknown_compression(folder / "unopenable.tiff")
    (folder / "broken.svs").write_bytes(b"This is a text file renamed to .svs, not a slide.\n" * 20)
    (folder / "truncated.tiff").write_bytes(b"II*\x00" + (4096).to_bytes(4, "little"))
    return folder


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
    from napari_pathflip.model import default_bert_dir

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(default_bert_dir()), local_files_only=True)
    model = PathFLIP(PathFLIPConfig(patch_dim=BuiltinEncoder().dim, **SMALL), tokenizer)
    folder = tmp_path_factory.mktemp("weights") / "pathflip"
    model.save_pretrained(folder)
    (folder / "encoder.json").write_text(json.dumps({"encoder": "builtin"}))
    return folder


@pytest.fixture(scope="session")
def report_texts() -> list[str]:
    """Text to train the test LLMs' tokenizers on: synthetic captions (training.synthetic) with a few report
    sentences holding decimals and symbols. Never the SlideBench captions, even when ../shared is there: a tokenizer
    trained on other text changes token counts and what the tiny models learn, so the tests would pass in one place
    and fail in the other."""
    from training.synthetic import SyntheticConfig, make_slide_spec

    small = SyntheticConfig(width=4096, height=4096)
    reports = ["The tumour measures 3.5 cm in greatest dimension; margins are clear by 1.2 mm.",
               "Invasive ductal carcinoma, grade 2 (Nottingham score 6/9), pT2 N0.",
               "Ki-67 index is approximately 15 %; ER positive (Allred 8), HER2 negative."]
    return [make_slide_spec(seed, "train", small).caption for seed in range(120)] + reports * 10


@pytest.fixture(scope="session")
def chat_folder(weights, report_texts) -> Path:
    """A tiny random Qwen3-architecture chat model over the `weights` embeddings, in weights/../chat."""
    import torch

    from napari_pathflip.chat import ChatConfig, ChatEngine, GenerationSettings
    from training.tiny_llm import TinyLLMConfig, build_tiny_llm

    captions = report_texts
    torch.manual_seed(0)
    small = TinyLLMConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=32, intermediate_size=128)
    model, tokenizer = build_tiny_llm(captions[:200], small)
    config = ChatConfig(visual_dim=SMALL["embed_dim"], generation=GenerationSettings(max_new_tokens=16))
    folder = weights.parent / "chat"
    ChatEngine(model, tokenizer, config).save(folder)
    return folder
