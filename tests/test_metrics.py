import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_pathflip.errors import PathflipError
from training import evaluate
from training.metrics import (box_mask_fraction, caption_metrics, caption_tokens, cosine_similarity,
                              grounding_metrics, pointing_hit, retrieval_recall, vqa_accuracy, vqa_choice,
                              zero_shot_metrics)
from training.sources import read_vqa_csv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vqa_csv(shared_data):
    return shared_data / "slidebench" / "SlideBench-VQA-TCGA.sample.csv"


def _write_predictions(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "response"])
        writer.writerows(rows)


# ---------------------------------------------------------------- retrieval


def test_retrieval_hand_checked():
    # slide->text ranks of the match: row 0 -> 1, row 1 -> 3 (0.9, 0.8 beat 0.5), row 2 -> 2
    similarity = np.array([[0.9, 0.1, 0.2],
                           [0.9, 0.5, 0.8],
                           [0.3, 0.7, 0.6]])
    result = retrieval_recall(similarity, ks=(1, 2, 3))
    assert result["slide_to_text"] == {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0}
    # text->slide (columns): col 0 -> rank 2 (its 0.9 ties another 0.9: ties count against it), cols 1, 2 -> 2
    assert result["text_to_slide"] == {"R@1": 0.0, "R@2": 1.0, "R@3": 1.0}
    flat = retrieval_recall(np.zeros((4, 4)), ks=(1, 4))  # every tie goes against the match
    assert flat["slide_to_text"] == {"R@1": 0.0, "R@4": 1.0}
    with pytest.raises(ValueError):
        retrieval_recall(np.zeros((2, 3)))


def test_cosine_similarity():
    sim = cosine_similarity(np.array([[3.0, 4.0], [0.0, 0.0]]), np.array([[6.0, 8.0], [-4.0, 3.0]]))
    np.testing.assert_allclose(sim, [[1.0, 0.0], [0.0, 0.0]], atol=1e-12)


# ---------------------------------------------------------------- zero-shot


def test_zero_shot_hand_checked():
    probs = np.array([[0.7, 0.2, 0.1],   # true 0, predicted 0
                      [0.5, 0.4, 0.1],   # true 1, predicted 0
                      [0.1, 0.8, 0.1],   # true 1, predicted 1
                      [0.2, 0.2, 0.6]])  # true 2, predicted 2
    result = zero_shot_metrics(probs, np.array([0, 1, 1, 2]))
    assert result["accuracy"] == 0.75
    # class 0: positive 0.7 vs negatives 0.5, 0.1, 0.2 -> 1; class 1: positives 0.4, 0.8 vs 0.2, 0.2 -> 1;
    # class 2: 0.6 vs 0.1, 0.1, 0.1 -> 1
    assert result["auc_per_class"] == [1.0, 1.0, 1.0] and result["auc_macro"] == 1.0
    # F1: class 0 P 1/2 R 1 -> 2/3; class 1 P 1 R 1/2 -> 2/3; class 2 -> 1
    assert result["f1_macro"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    mixed = zero_shot_metrics(np.array([[0.6, 0.4], [0.7, 0.3], [0.2, 0.8]]), np.array([0, 1, 1]))
    assert mixed["auc_per_class"] == [0.5, 0.5]  # class 0: its 0.6 beats 0.2, not 0.7; class 1 mirrors it
    absent = zero_shot_metrics(np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]]), np.array([0, 1]))
    assert absent["auc_per_class"][2] is None and absent["auc_macro"] == 1.0


# ---------------------------------------------------------------- VQA


@pytest.mark.parametrize("response, choice", [
    ("C", "C"), ("C.", "C"), (" C. Because the glands...", "C"),
    ("C) Papillary adenocarcinoma.", "C) Papillary adenocarcinoma"),
    ("B) because", "B) because"), ("c.", "c"), ("The answer is C.", "The answer is C"), ("", ""), (None, ""),
])
def test_vqa_rule(response, choice):
    assert vqa_choice(response) == choice


def test_vqa_rule_on_real_slidebench_rows(vqa_csv):
    questions = read_vqa_csv(vqa_csv)
    answers, categories = [q.answer for q in questions], [q.category for q in questions]
    perfect = vqa_accuracy([f"{a}. The slide shows it." for a in answers], answers, categories)
    assert perfect["accuracy"] == 1.0 and perfect["correct"] == 40
    assert {c: v["n"] for c, v in perfect["by_category"].items()} == {"Clinical": 2, "Diagnosis": 27,
                                                                       "Microscopy": 11}
    # always "C": 19 of 40 answers are C (Diagnosis 11/27, Microscopy 6/11, Clinical 2/2)
    always_c = vqa_accuracy(["C. It is C."] * 40, answers, categories)
    assert always_c["accuracy"] == 19 / 40
    assert {c: v["correct"] for c, v in always_c["by_category"].items()} == {"Clinical": 2, "Diagnosis": 11,
                                                                             "Microscopy": 6}
    assert always_c["category_mean"] == pytest.approx((1 + 11 / 27 + 6 / 11) / 3)
    # answers shifted by one row: 14 of the 40 neighbouring answers coincide
    shifted = vqa_accuracy([answers[i - 1] for i in range(40)], answers, categories)
    assert shifted["correct"] == 14
    # "B) because" is not "B" under the rule; nor is a missing response
    variants = vqa_accuracy([f"{a}) because" for a in answers], answers)
    assert variants["accuracy"] == 0.0 and "by_category" not in variants
    assert vqa_accuracy([None, answers[1]], answers[:2])["correct"] == 1


# ---------------------------------------------------------------- captions


def test_caption_metrics_hand_checked():
    assert caption_tokens("Tumor 3.5 cm, HER-2/neu negative.") == ["tumor", "3.5", "cm", "her-2/neu", "negative"]
    same = caption_metrics(["The tumor is large."], ["the tumor is large"])
    assert all(same[f"bleu_{n}"] == pytest.approx(1.0) for n in range(1, 5)) and same["rouge_l"] == 1.0
    # p1 3/4, p2 2/3, p3 1/2, p4 0/1 -> smoothed to 0.1/1; equal lengths so no brevity penalty
    result = caption_metrics(["the tumor is large"], ["the tumor is small"])
    assert result["bleu_1"] == pytest.approx(0.75)
    assert result["bleu_2"] == pytest.approx((0.75 * 2 / 3) ** 0.5)
    assert result["bleu_3"] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3))
    assert result["bleu_4"] == pytest.approx((0.75 * 2 / 3 * 0.5 * 0.1) ** 0.25)
    assert result["rouge_l"] == pytest.approx(0.75)  # LCS 3 of 4 both ways
    # several references: ROUGE-L takes the best one
    assert caption_metrics(["a b c"], [["x y z", "a b c"]])["rouge_l"] == 1.0


# ---------------------------------------------------------------- grounding


def test_box_mask_fraction():
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True  # level-0 [0, 20) x [0, 20) at downsample 10
    boxes = np.array([[0, 0, 20, 20], [0, 0, 40, 40], [10, 10, 20, 20], [30, 30, 20, 20], [50, 0, 10, 10]])
    np.testing.assert_allclose(box_mask_fraction(mask, 10, boxes), [1.0, 0.25, 0.25, 0.0, 0.0])
    # a box half off the slide counts only its on-slide part: [30, 50) x [0, 20) clipped to [30, 40)
    mask[:2, 3] = True
    np.testing.assert_allclose(box_mask_fraction(mask, 10, [[30, 0, 20, 20]]), [1.0])


def test_pointing_and_auroc_hand_checked():
    assert pointing_hit([0.1, 0.9, 0.3], [False, True, False])
    assert not pointing_hit([0.9, 0.9, 0.3], [False, True, False])  # tie with a miss: no credit
    result = grounding_metrics(
        region_scores=[np.array([0.1, 0.9, 0.3]), np.array([0.5, 0.2]), np.array([0.4, 0.6])],
        region_truth=[np.array([0, 1, 0]), np.array([0, 1]), np.array([0, 0])],  # third query: no truth
        patch_scores=[np.array([[0.2, 0.8], [0.6, 0.1]])], patch_truth=[np.array([[0, 1], [1, 0]])])
    region = result["region"]
    assert region["n_without_truth"] == 1 and region["pointing_game"] == 0.5
    assert region["auroc_mean"] == 0.5  # 1.0 and 0.0
    assert region["auroc_pooled"] == pytest.approx(4 / 6)  # 0.9 beats 0.1, 0.3, 0.5; 0.2 beats 0.1 only
    assert result["patch"]["pointing_game"] == 1.0 and result["patch"]["auroc_mean"] == 1.0


# ---------------------------------------------------------------- CLI


def test_cli_vqa_end_to_end(tmp_path, vqa_csv):
    answers = [q.answer for q in read_vqa_csv(vqa_csv)]
    predictions = tmp_path / "pred.csv"
    # rows 1-38 right with a reason, row 39 in the "B) because" style (wrong by the rule), row 40 missing
    rows = [[str(i + 1), f"{a}. Reason."] for i, a in enumerate(answers[:38])] + [["39", f"{answers[38]}) x"]]
    _write_predictions(predictions, rows + [["999", "A"]])
    done = subprocess.run([sys.executable, "-m", "training", "evaluate", "vqa", "--questions", str(vqa_csv),
                           "--predictions", str(predictions)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["task"] == "vqa" and result["n"] == 40 and result["correct"] == 38
    assert result["accuracy"] == 38 / 40
    assert result["missing_ids"] == ["40"] and result["unknown_ids"] == ["999"]
    assert sum(v["n"] for v in result["by_category"].values()) == 40

    (tmp_path / "bad.csv").write_text("ID,answer\n1,C\n")
    failed = subprocess.run([sys.executable, "-m", "training", "evaluate", "vqa", "--questions", str(vqa_csv),
                             "--predictions", str(tmp_path / "bad.csv")], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert failed.returncode == 2 and "needs the columns ID, response" in failed.stderr and not failed.stdout


def _run(capsys, *argv):
    assert evaluate.main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_other_tasks(tmp_path, capsys):
    rng = np.random.default_rng(0)
    slide = rng.normal(size=(20, 8))
    np.savez(tmp_path / "emb.npz", slide=slide, text=slide + 0.01 * rng.normal(size=slide.shape))
    result = _run(capsys, "retrieval", "--embeddings", str(tmp_path / "emb.npz"))
    assert result["slide_to_text"]["R@1"] == 1.0 and result["text_to_slide"]["R@10"] == 1.0

    np.savez(tmp_path / "zs.npz", probs=np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]), labels=np.array([0, 1, 1]))
    result = _run(capsys, "zeroshot", "--scores", str(tmp_path / "zs.npz"))
    assert result["accuracy"] == pytest.approx(2 / 3) and result["auc_macro"] == 1.0

    # float truth = overlap fraction: 0.05 is below the default region threshold 0.1
    np.savez(tmp_path / "g.npz", region_scores=np.array([0.1, 0.9, 0.3, 0.5, 0.2]),
             region_truth=np.array([0.0, 0.5, 0.0, 0.05, 0.3]), region_query=np.array([0, 0, 0, 1, 1]))
    result = _run(capsys, "grounding", "--scores", str(tmp_path / "g.npz"))
    assert result["region"]["pointing_game"] == 0.5 and "patch" not in result
    result = _run(capsys, "grounding", "--scores", str(tmp_path / "g.npz"), "--region-min-overlap", "0.4")
    assert result["region"]["n_without_truth"] == 1 and result["region"]["pointing_game"] == 1.0

    references = tmp_path / "refs.csv"
    references.write_text("ID,Caption\n1,The tumor is large.\n2,No tumor.\n")
    _write_predictions(tmp_path / "caps.csv", [["1", "the tumor is large"]])
    result = _run(capsys, "captions", "--references", str(references), "--predictions", str(tmp_path / "caps.csv"))
    assert result["missing_ids"] == ["2"] and result["rouge_l"] == 0.5

    with pytest.raises(PathflipError, match="lacks array"):
        evaluate.main(["zeroshot", "--scores", str(tmp_path / "emb.npz")])
    np.savez(tmp_path / "bad.npz", probs=np.ones((2, 2)), labels=np.array([0, 5]))
    with pytest.raises(PathflipError, match="labels must lie"):
        evaluate.main(["zeroshot", "--scores", str(tmp_path / "bad.npz")])


def test_displayed_area_and_calibration_hand_checked():
    from training.metrics import displayed_area_metrics, expected_calibration_error

    truth = [np.array([1, 1, 0, 0], bool), np.array([0, 1, 0, 0], bool)]
    shown = [np.array([1, 0, 1, 0], bool), np.array([0, 0, 0, 0], bool)]
    m = displayed_area_metrics(shown, truth)
    assert m["precision_pooled"] == 0.5  # 1 of the 2 painted patches is the finding
    assert m["dice_pooled"] == 2 * 1 / (2 + 3)
    assert m["precision_mean"] == (0.5 + 0.0) / 2 and m["painted_nothing"] == 0.5
    assert m["dice_mean"] == (2 * 1 / 4 + 0.0) / 2
    # ECE: two bins; 0.2-bin holds 0.2, 0.2 with outcomes 0, 1 (gap 0.3), 0.9-bin holds 0.9 with outcome 1 (gap 0.1)
    p, y = np.array([0.2, 0.2, 0.9]), np.array([0, 1, 1])
    assert np.isclose(expected_calibration_error(p, y, bins=10), (2 * 0.3 + 0.1) / 3)
    assert expected_calibration_error(np.array([0.0, 1.0]), np.array([0, 1])) == 0.0
