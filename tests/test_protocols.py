"""`python -m training protocol zeroshot|vqa|captions|retrieval`: the paper's protocols end to end on small synthetic
h5 files in the CLAM/TRIDENT layout, with the small random PathFLIP and the tiny chat of conftest.py. The outputs have
the columns `python -m training evaluate` reads, their metrics are what it computes from them, and planted perfect
answers score 1.0."""

import csv
import json
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from napari_pathflip.chat import Conversation
from napari_pathflip.encoders import BuiltinEncoder
from napari_pathflip.errors import PathflipError
from napari_pathflip.features import FeatureSet, read_h5, write_h5
from napari_pathflip.tiling import region_ids
from training.__main__ import main
from training.metrics import vqa_choice

SLIDES = 6
PATCH = 256


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """<root>/features/TCGA/<n>/slide_<i>.h5: TRIDENT files (features.write_h5), the last a bare CLAM file
    (`features` [1, N, D] and `coords` only, no patch size: the runs pass --patch-size-level0)."""
    root = tmp_path_factory.mktemp("protocol-root")
    rng = np.random.default_rng(0)
    dim = BuiltinEncoder().dim
    for i in range(SLIDES):
        side = 5 + i % 3
        coords = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2).astype(np.int64) * PATCH
        features = (rng.normal(size=dim) + rng.normal(scale=0.3, size=(len(coords), dim))).astype(np.float32)
        path = root / _slide(i)
        if i == SLIDES - 1:
            path.parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(path, "w") as f:
                f.create_dataset("features", data=features[None])
                f.create_dataset("coords", data=coords[None])
            continue
        ids, origins = region_ids(coords, PATCH * 16)
        write_h5(FeatureSet(features, coords, ids, origins, {"patch_size_level0": PATCH}), path)
    return root


def _slide(i: int) -> str:
    return f"features/TCGA/{i % 2}/slide_{i}.h5"


def _write(path, rows: list[dict]):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _read(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _run(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["protocol", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out)


def _evaluate(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["evaluate", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out)


def test_zeroshot_from_the_papers_csv(root, weights, tmp_path, capsys):
    table = _write(tmp_path / "zeroshot.csv", [{"slide_id": f"slide_{i}", "label": "LUAD" if i % 2 else "LUSC",
                                                "conch_feature": _slide(i)} for i in range(SLIDES)])
    classes = tmp_path / "classes.toml"
    classes.write_text('LUAD = ["lung adenocarcinoma", "adenocarcinoma of the lung"]\nLUSC = "lung squamous"\n')
    common = ["--root", root, "--weights", weights, "--device", "cpu", "--patch-size-level0", PATCH,
              "--classes", classes, "--class", "LUSC=squamous cell carcinoma|lung squamous cell carcinoma"]
    result = _run(capsys, "zeroshot", table, "--out", tmp_path / "a", *common)
    assert result["classes"] == {"LUAD": ["lung adenocarcinoma", "adenocarcinoma of the lung"],
                                 "LUSC": ["squamous cell carcinoma", "lung squamous cell carcinoma"]}
    rows = _read(result["predictions"])
    assert list(rows[0]) == ["slide_id", "label", "predicted", "p_LUAD", "p_LUSC"] and len(rows) == SLIDES
    probs = np.array([[float(r["p_LUAD"]), float(r["p_LUSC"])] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    # the metrics are what `evaluate zeroshot` computes from the scores file the run wrote
    scored = _evaluate(capsys, "zeroshot", "--scores", result["scores"])
    assert {k: result[k] for k in ("n", "accuracy", "auc_macro", "f1_macro")} == \
        {k: scored[k] for k in ("n", "accuracy", "auc_macro", "f1_macro")}
    assert list(result["auc_per_class"].values()) == scored["auc_per_class"]
    assert json.loads((tmp_path / "a" / "zeroshot_metrics.json").read_text()) == result

    # planted: labels that the LUAD probability ranks perfectly -> AUROC 1.0 for both classes; accuracy and balanced
    # accuracy as the predictions give them
    median = np.median(probs[:, 0])
    planted = [{"slide_id": r["slide_id"], "label": "LUAD" if p >= median else "LUSC", "conch_feature": _slide(i)}
               for i, (r, p) in enumerate(zip(rows, probs[:, 0]))]
    result = _run(capsys, "zeroshot", _write(tmp_path / "planted.csv", planted), "--out", tmp_path / "b", *common)
    assert result["auc_per_class"] == {"LUAD": 1.0, "LUSC": 1.0} and result["auc_macro"] == 1.0
    predicted = [r["predicted"] for r in _read(result["predictions"])]
    labels = [r["label"] for r in planted]
    assert result["accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(predicted, labels)]))
    recalls = [np.mean([p == c for p, t in zip(predicted, labels) if t == c]) for c in ("LUAD", "LUSC")]
    assert result["balanced_accuracy"] == pytest.approx(np.mean(recalls))

    # labels without prompts, one class only: a message, status 2
    assert main(["protocol", "zeroshot", str(table), "--out", str(tmp_path / "c"), "--root", str(root),
                 "--weights", str(weights), "--class", "LUAD=adenocarcinoma", "--class", "X=other"]) == 2
    assert "label(s) 'LUSC' have no prompts" in capsys.readouterr().err
    assert main(["protocol", "zeroshot", str(table), "--out", str(tmp_path / "c"), "--root", str(root),
                 "--class", "LUAD=adenocarcinoma"]) == 2
    assert "at least two classes" in capsys.readouterr().err


def test_a_missing_h5_is_named_as_missing(root, weights, tmp_path, capsys):
    rows = [{"slide_id": "a", "label": "A", "conch_feature": _slide(0)},
            {"slide_id": "b", "label": "B", "conch_feature": "features/TCGA/0/absent.h5"}]
    assert main(["protocol", "zeroshot", str(_write(tmp_path / "z.csv", rows)), "--out", str(tmp_path / "o"),
                 "--root", str(root), "--weights", str(weights), "--class", "A=a", "--class", "B=b"]) == 2
    err = capsys.readouterr().err
    assert "1 feature file(s)" in err and "are missing under --root" in err
    assert str(root / "features/TCGA/0/absent.h5") in err
    assert not (tmp_path / "o" / "zeroshot_predictions.csv").exists()  # stopped before anything was computed
    with pytest.raises(PathflipError, match="the feature file is missing"):
        read_h5(root / "features" / "absent.h5")


def _vqa_rows(answers=None) -> list[dict]:
    rows = []
    for k in range(8):
        options = {"A": "Adenocarcinoma", "B": "Squamous cell carcinoma", "C": "Necrosis", "D": "" if k % 4 else "Fat"}
        rows.append({"ID": str(k + 1), "Slide": _slide(k % 3), "Tumor": "LUAD",
                     "Broad Category": "Diagnosis" if k % 2 else "Microscopy", "Narrow Category": "Disease",
                     "Question": f"Question {k}: what does the slide show?", **options,
                     "Answer": answers[k] if answers else "ABC"[k % 3]})
    return rows


def test_vqa_predictions_are_what_evaluate_vqa_scores(root, weights, chat_folder, tmp_path, capsys):
    questions = _write(tmp_path / "vqa.csv", _vqa_rows())
    common = ["--root", root, "--weights", weights, "--chat", chat_folder, "--device", "cpu",
              "--patch-size-level0", PATCH, "--choice-rule", "rank"]
    result = _run(capsys, "vqa", questions, "--out", tmp_path / "a", *common)
    rows = _read(result["predictions"])
    assert list(rows[0]) == ["ID", "response"] and [r["ID"] for r in rows] == [str(k + 1) for k in range(8)]
    assert result["n"] == 8 and set(result["by_category"]) == {"Diagnosis", "Microscopy"}
    assert result["choice_rule"] == "rank" and result["missing_ids"] == []
    scored = _evaluate(capsys, "vqa", "--questions", questions, "--predictions", result["predictions"])
    assert {k: result[k] for k in scored if k != "task"} == {k: v for k, v in scored.items() if k != "task"}
    # the ranked answers start with a letter of the row's options ("B. Squamous cell carcinoma."); planted as the
    # answers they score 1.0, overall and per category
    letters = [vqa_choice(r["response"]) for r in rows]
    assert all(letter in "ABCD" and letter for letter in letters)
    planted = _write(tmp_path / "planted.csv", _vqa_rows(letters))
    result = _run(capsys, "vqa", planted, "--out", tmp_path / "b", *common)
    assert result["accuracy"] == 1.0 and result["category_mean"] == 1.0


def test_captions_and_retrieval_over_a_caption_csv(root, weights, chat_folder, tmp_path, capsys, monkeypatch):
    rows = [{"ID": f"c{i}", "Slide": _slide(i), "Tumor": "LUAD", "Question": f"Describe slide {i}.",
             "Caption": f"Invasive adenocarcinoma with necrosis in area {i}. Margins are clear."}
            for i in range(SLIDES)]
    table = _write(tmp_path / "captions.csv", rows)
    common = ["--root", root, "--weights", weights, "--device", "cpu", "--patch-size-level0", PATCH]
    chat = ["--chat", chat_folder, "--max-new-tokens", 12]
    result = _run(capsys, "captions", table, "--out", tmp_path / "a", *common, *chat)
    predictions = _read(result["predictions"])
    assert list(predictions[0]) == ["ID", "response"] and [r["ID"] for r in predictions] == [r["ID"] for r in rows]
    assert result["n"] == SLIDES and {"bleu_1", "bleu_4", "rouge_l"} <= set(result)
    scored = _evaluate(capsys, "captions", "--references", table, "--predictions", result["predictions"])
    assert {k: result[k] for k in scored if k != "task"} == {k: v for k, v in scored.items() if k != "task"}
    # planted: a chat whose answer to each row's question is the row's caption -> BLEU and ROUGE-L 1.0 (the random
    # tiny chat writes mostly whitespace)
    answers = {row["Question"]: SimpleNamespace(text=row["Caption"]) for row in rows}
    monkeypatch.setattr(Conversation, "ask", lambda self, question, settings=None: answers[question])
    result = _run(capsys, "captions", table, "--out", tmp_path / "b", *common, *chat)
    assert result["bleu_1"] == pytest.approx(1.0) and result["bleu_4"] == pytest.approx(1.0)
    assert result["rouge_l"] == pytest.approx(1.0)
    assert [r["response"] for r in _read(result["predictions"])] == [row["Caption"] for row in rows]

    result = _run(capsys, "retrieval", table, "--out", tmp_path / "r", *common)
    for ranking in (result["retrieval"], result["retrieval_global"]):
        assert ranking["n"] == SLIDES
        for direction in ("slide_to_text", "text_to_slide"):
            recall = ranking[direction]
            assert 0 <= recall["R@1"] <= recall["R@5"] <= recall["R@10"] == 1.0  # 6 slides: the match is in the top 10
    with np.load(result["embeddings"]) as embeddings:
        assert embeddings["slide"].shape == embeddings["text"].shape and embeddings["slide"].shape[0] == SLIDES
    assert _evaluate(capsys, "retrieval", "--embeddings", result["embeddings"])["text_to_slide"] == \
        result["retrieval_global"]["text_to_slide"]
    # retrieval pairs a slide with one caption
    twice = _write(tmp_path / "twice.csv", [*rows, {**rows[0], "ID": "again"}])
    assert main(["protocol", "retrieval", str(twice), "--out", str(tmp_path / "t"), *map(str, common)]) == 2
    assert "Keep one row per slide" in capsys.readouterr().err
