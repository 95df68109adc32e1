"""`pathflip ground` / `pathflip classify` end to end on the real CMU slide with small random weights."""

import json
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from napari_pathflip.analysis import SlideAnalysis
from napari_pathflip.commands import main

def test_ground_writes_geojson_npz_png_from_one_cached_encoding(weights, wsi_dir, tmp_path, capsys):
    slide = str(wsi_dir / "CMU-1-Small-Region.svs")
    common = ["--weights", str(weights), "--cache", str(tmp_path / "cache"), "--device", "cpu"]
    assert main(["ground", slide, "squamous epithelium", *common, "--out", str(tmp_path / "r.geojson"),
                 "--boxes", "both"]) == 0
    printed = capsys.readouterr().out.splitlines()
    # random weights: no presence probability, a map that only ranks; its best area holds the top of the range
    assert printed[0] == "squamous epithelium: ranked only (these weights give no presence probability)"
    assert printed[1].startswith("area #1: score 1.00 of the slide's range, ")
    assert any(line.startswith("region #1: x 0-4096, y 0-4096") for line in printed)
    features = json.loads((tmp_path / "r.geojson").read_text())["features"]
    kinds = [f["properties"]["pathflip"]["kind"] for f in features]
    # the finding areas first, then the top regions: the 2220 x 2967 px slide at 0.499 um/px fits in one region
    assert kinds[-1] == "region" and set(kinds[:-1]) == {"area"} and len(kinds) > 1
    xs, ys = zip(*features[-1]["geometry"]["coordinates"][0])
    assert (min(xs), min(ys), max(xs), max(ys)) == (0, 0, 4096, 4096)
    assert {f["properties"]["classification"]["name"] for f in features} == {"squamous epithelium"}
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


def test_ground_prints_the_verdict_and_areas_of_a_calibrated_result(weights, wsi_dir, tmp_path, capsys, monkeypatch):
    # the shipped weights are not calibrated yet: a calibrated result is made from the real one, the probabilities
    # 0.9 on a 2x2 block of patches and 0.05 elsewhere
    ground = SlideAnalysis.ground

    def calibrated(self, text, top_k=5, patch_level=True):
        result = ground(self, text, top_k, patch_level)
        presence = {"keratin": 0.97, "necrosis": 0.03}[text]
        coords = self.encoding.patch_coords
        chosen = np.all((coords >= coords[0]) & (coords < coords[0] + 512), axis=1)
        scores = np.where(chosen, 0.9, 0.05) if presence > 0.5 else np.full(len(coords), 0.01)
        return replace(result, patch_scores=scores.astype(np.float32), calibrated=True, presence=presence)

    monkeypatch.setattr(SlideAnalysis, "ground", calibrated)
    common = [str(wsi_dir / "CMU-1-Small-Region.svs"), "--weights", str(weights), "--cache", str(tmp_path / "c"),
              "--device", "cpu"]
    assert main(["ground", common[0], "keratin", *common[1:], "--out", str(tmp_path / "k.npz")]) == 0
    printed = capsys.readouterr().out.splitlines()
    saved = np.load(tmp_path / "k.npz")
    coords = saved["patch_coords"]
    chosen = np.all((coords >= coords[0]) & (coords < coords[0] + 512), axis=1)
    (x0, y0), (x1, y1) = coords[chosen].min(0), coords[chosen].max(0) + 256
    fraction = chosen.sum() / len(coords)
    assert printed[:2] == ["keratin: found: p = 0.97",
                           f"area #1: p = 0.90, {fraction:.1%} of tissue, x {x0}-{x1}, y {y0}-{y1} (level-0 px)"]
    assert len(printed) == 3 and printed[2].startswith("wrote")  # one area; no regions unless asked
    assert saved["threshold"] == 0.5 and saved["calibrated"] and saved["presence"] == pytest.approx(0.97)
    np.testing.assert_array_equal(saved["area_boxes"], [[x0, y0, x1, y1]])
    assert saved["area_probabilities"] == pytest.approx([0.9]) and saved["area_fractions"] == pytest.approx([fraction])

    assert main(["ground", common[0], "necrosis", *common[1:], "--out", str(tmp_path / "n.geojson")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == ["necrosis: not found on this slide: p = 0.03", "no area of the heatmap reaches the threshold"]
    assert json.loads((tmp_path / "n.geojson").read_text())["features"] == []
    # a finding the slide does not show paints nothing at any threshold
    assert main(["ground", common[0], "necrosis", *common[1:], "--out", str(tmp_path / "n.geojson"),
                 "--threshold", "0.01"]) == 0
    assert "no area of the heatmap reaches the threshold" in capsys.readouterr().out
    assert json.loads((tmp_path / "n.geojson").read_text())["features"] == []


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
