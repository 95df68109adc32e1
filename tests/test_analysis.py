"""`pathflip ground` / `pathflip classify` end to end on the real CMU slide with small random weights."""

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from napari_pathflip.commands import main

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

    # a chat folder that ranks the options: the answer starts with one of them and the shares follow it
    ranked = shutil.copytree(chat_folder, tmp_path / "ranked_chat")
    config = json.loads((ranked / "chat_config.json").read_text())
    (ranked / "chat_config.json").write_text(json.dumps({**config, "choice_rule": "rank"}))
    assert main(["chat", *common[:-2], "--chat", str(ranked), "Which tissue?", "--option", "skin", "--option",
                 "lung"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(("A. skin.", "B. lung.")), lines
    assert re.fullmatch(r"\[options as the model ranks them: [AB] \d+%, [AB] \d+%\]", lines[-1]), lines
