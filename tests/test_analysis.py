"""`pathflip ground` / `pathflip classify` end to end on the real CMU slide with small random weights."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from napari_pathflip.cli import main
from napari_pathflip.encoders import BuiltinEncoder
from napari_pathflip.model import PathFLIP, PathFLIPConfig
from napari_pathflip.model.modeling import default_bert_dir

SMALL = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, embed_dim=32, vision_width=32,
             mixer_heads=4, mixer_ffn=64, text_region_heads=4)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small randomly initialised PathFLIP over built-in encoder features, saved and reloaded like real weights."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(default_bert_dir()), local_files_only=True)
    model = PathFLIP(PathFLIPConfig(patch_dim=BuiltinEncoder().dim, **SMALL), tokenizer)
    folder = tmp_path_factory.mktemp("weights")
    model.save_pretrained(folder)
    (folder / "encoder.json").write_text(json.dumps({"encoder": "builtin"}))
    return folder


def test_ground_writes_geojson_npz_png_from_one_cached_encoding(weights, wsi_dir, tmp_path, capsys):
    slide = str(wsi_dir / "CMU-1-Small-Region.svs")
    common = ["--weights", str(weights), "--cache", str(tmp_path / "cache"), "--device", "cpu"]
    assert main(["ground", slide, "squamous epithelium", *common, "--out", str(tmp_path / "r.geojson")]) == 0
    boxes = json.loads((tmp_path / "r.geojson").read_text())["features"]
    # the 2220 x 2967 px slide at 0.499 um/px fits in one 4096-px region
    assert len(boxes) == 1
    xs, ys = zip(*boxes[0]["geometry"]["coordinates"][0])
    assert (min(xs), min(ys), max(xs), max(ys)) == (0, 0, 4096, 4096)
    encodings = list((tmp_path / "cache").rglob("encoding-*.npz"))
    assert len(encodings) == 1
    stamp = encodings[0].stat().st_mtime_ns

    assert main(["ground", slide, "squamous epithelium", *common, "--out", str(tmp_path / "r.npz")]) == 0
    scores = np.load(tmp_path / "r.npz")
    assert scores["patch_coords"].shape[1] == 2 and int(scores["patch_size_level0"]) == 256
    assert len(scores["patch_scores"]) == len(scores["patch_coords"])
    assert np.isclose(scores["region_scores"].sum(), 1.0, atol=1e-4)
    assert encodings[0].stat().st_mtime_ns == stamp  # the second query reused the cached encoding

    assert main(["ground", slide, "keratin", *common, "--out", str(tmp_path / "r.png")]) == 0
    overlay = np.asarray(Image.open(tmp_path / "r.png"))
    assert overlay.shape[2] == 3 and overlay.shape[0] > overlay.shape[1]  # the CMU slide is portrait
    assert "wrote" in capsys.readouterr().out


def test_classify_prints_probabilities(weights, wsi_dir, tmp_path, capsys):
    args = ["classify", str(wsi_dir / "CMU-1-Small-Region.svs"), "--weights", str(weights),
            "--cache", str(tmp_path / "cache"), "--prompt", "skin", "--prompt", "lung adenocarcinoma"]
    assert main(args) == 0
    probabilities = json.loads(capsys.readouterr().out)
    assert set(probabilities) == {"skin", "lung adenocarcinoma"}
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-3)


def test_missing_weights_say_where_to_put_them(wsi_dir, tmp_path, capsys):
    code = main(["ground", str(wsi_dir / "small.svs"), "x", "--weights", str(tmp_path / "none"),
                 "--out", str(tmp_path / "o.png")])
    assert code == 2
    assert "no PathFLIP weights in" in capsys.readouterr().err


@pytest.fixture(scope="module")
def chat_folder(shared_data, tmp_path_factory):
    """A tiny random Qwen3-architecture chat model over 32-d slide/region embeddings, saved as a chat folder."""
    import csv

    from napari_pathflip.chat import ChatConfig, ChatEngine, GenerationSettings
    from training.tiny_llm import TinyLLMConfig, build_tiny_llm

    with open(shared_data / "slidebench" / "SlideBench-Caption-TCGA.csv", encoding="utf-8-sig", newline="") as f:
        captions = [row["Caption"] for row in csv.DictReader(f)]
    torch.manual_seed(0)
    small = TinyLLMConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=32, intermediate_size=128)
    model, tokenizer = build_tiny_llm(captions[:200], small)
    config = ChatConfig(visual_dim=SMALL["embed_dim"], generation=GenerationSettings(max_new_tokens=16))
    folder = tmp_path_factory.mktemp("chat")
    ChatEngine(model, tokenizer, config).save(folder)
    return folder


def test_chat_and_caption_stream_answers(weights, chat_folder, wsi_dir, tmp_path, capsys):
    common = [str(wsi_dir / "CMU-1-Small-Region.svs"), "--weights", str(weights), "--cache", str(tmp_path / "c"),
              "--chat", str(chat_folder)]
    assert main(["chat", *common, "Is there necrosis?"]) == 0
    free = capsys.readouterr().out
    assert main(["chat", *common, "Which tissue is this?", "--option", "skin", "--option", "lung"]) == 0
    choice = capsys.readouterr().out
    assert main(["caption", *common]) == 0
    caption = capsys.readouterr().out
    for answer in (free, choice, caption):
        assert len(answer) > 1 and answer.endswith("\n")  # random weights: some streamed text, then a newline
    missing = main(["chat", *common[:-2], "--chat", str(tmp_path / "nothing"), "hello"])
    assert missing == 2 and "chat" in capsys.readouterr().err.lower()
