import json

import pytest

from napari_pathflip.errors import PathflipError
from training.sources import (format_choice_question, read_caption_csv, read_llava_json, read_records,
                              read_vqa_csv, slide_key)


@pytest.fixture(scope="module")
def slidebench(shared_data):
    return shared_data / "slidebench"


def test_caption_csv_with_bom_and_newlines(slidebench):
    records = read_caption_csv(slidebench / "SlideBench-Caption-TCGA.csv")
    assert len(records) == 732 and len({r.id for r in records}) == 732
    first = records[0]
    assert first.id == "1" and first.task == "caption" and first.tumor == "BLCA"  # "ID" found despite the BOM
    assert first.slide_id == "TCGA-DK-A3IS-01Z-00-DX1.31CABE32-36D7-4920-BF5A-9C9D8B54320F"
    assert first.turns[0][0].startswith("Please generate") and first.turns[0][1].startswith("The essential")
    assert sum("\n" in r.turns[0][1] for r in records) == 3
    assert read_records(slidebench / "SlideBench-Caption-TCGA.csv") == records


def test_vqa_csv_records_and_prompt(slidebench):
    records = read_vqa_csv(slidebench / "SlideBench-VQA-TCGA.sample.csv")
    assert len(records) == 40
    first = records[0]
    assert (first.task, first.answer, first.category, first.subcategory) == (
        "vqa", "C", "Diagnosis", "Disease Classification")
    assert first.options[2] == "Papillary adenocarcinoma"
    prompt, answer = first.turns[0]
    assert answer == "C"
    assert prompt.splitlines()[1:] == ["A) Squamous cell carcinoma", "B) Small cell lung carcinoma",
                                       "C) Papillary adenocarcinoma", "D) Alveolar adenoma",
                                       "Answer with the option letter."]
    assert "".join(r.answer for r in records) == "CCCCBCBACCCCBABADCCADCCADCBAACBBBCCCAACB"
    assert read_records(slidebench / "SlideBench-VQA-TCGA.sample.csv") == records


def test_choice_prompt_skips_empty_options():
    prompt = format_choice_question(" Which? ", ["x", "y", "", ""])
    assert prompt == "Which?\nA) x\nB) y\nAnswer with the option letter."


def test_slide_key():
    assert slide_key("a/b/TCGA-05-4244-01Z-00-DX1.d4ff32cd.h5") == "TCGA-05-4244-01Z-00-DX1.d4ff32cd"
    assert slide_key("feat\\slide_7.csv") == "slide_7"
    assert slide_key("TCGA-XX.uuid") == "TCGA-XX.uuid"  # unknown extension: nothing stripped


def test_llava_json(tmp_path):
    items = [
        {"id": "cap1", "image": ["feat/TCGA-A.csv"],
         "conversations": [{"from": "human", "value": "<image>\nDescribe the slide."},
                           {"from": "gpt", "value": "Tumor present."}]},
        {"id": "q1", "image": "feat/TCGA-B.csv",
         "conversations": [{"from": "human", "value": "Context first.\n<image>\nWhich?\nA) x\nB) y\nC) z"},
                           {"from": "gpt", "value": "B) y"},
                           {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "Because."}]},
    ]
    path = tmp_path / "instruct.json"
    path.write_text(json.dumps(items))
    caption, vqa = read_llava_json(path)
    assert (caption.task, caption.slide_id, caption.turns) == ("caption", "TCGA-A", (("Describe the slide.",
                                                                                     "Tumor present."),))
    assert vqa.task == "vqa" and vqa.answer == "B" and len(vqa.turns) == 2
    assert vqa.turns[0][0].startswith("Context first.\nWhich?")  # text before the image token is kept
    assert read_llava_json(path, task="caption")[1].task == "caption"
    assert read_records(path) == [caption, vqa]


@pytest.mark.parametrize("items, message", [
    ([{"image": ["a", "b"], "conversations": []}], "exactly one slide"),
    ([{"image": "a", "conversations": [{"from": "gpt", "value": "x"}]}], "without a question"),
    ([{"image": "a", "conversations": [{"from": "human", "value": "x"}]}], "no question-answer"),
    ({"not": "a list"}, "JSON list"),
])
def test_llava_json_errors(tmp_path, items, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(items))
    with pytest.raises(PathflipError, match=message):
        read_llava_json(path)


def test_csv_errors(tmp_path, slidebench):
    with pytest.raises(PathflipError, match="not found"):
        read_vqa_csv(tmp_path / "missing.csv")
    with pytest.raises(PathflipError, match="lacks column"):
        read_vqa_csv(slidebench / "SlideBench-Caption-TCGA.csv")
    bad = tmp_path / "bad.csv"
    lines = (slidebench / "SlideBench-VQA-TCGA.sample.csv").read_text(encoding="utf-8").splitlines()
    bad.write_text("\n".join([lines[0], lines[1].rsplit(",", 1)[0] + ",E"]), encoding="utf-8")
    with pytest.raises(PathflipError, match="Answer 'E'"):
        read_vqa_csv(bad)
    with pytest.raises(PathflipError, match="not a SlideBench"):
        (tmp_path / "other.csv").write_text("a,b\n1,2\n")
        read_records(tmp_path / "other.csv")
