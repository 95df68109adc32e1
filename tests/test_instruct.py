"""Instruction tuning: TOML run -> chat folder, answer-only labels with EOS, resume == straight run, evaluation.

Slides are real synthetic layouts (training.synthetic) written as CLAM/TRIDENT .h5 files; to keep the test fast their
patch features are the patch tissue labels through a fixed random projection plus noise instead of rendered pixels
through the built-in encoder (the stage only sees features, so nothing else changes).
"""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from napari_pathflip.chat import IGNORE_INDEX, ChatConfig, ChatEngine, format_choice_prompt
from napari_pathflip.encoders import BuiltinEncoder
from napari_pathflip.features import FeatureSet, write_h5
from napari_pathflip.tiling import region_ids
from training import evaluate as evaluate_cli
from training.collate import build_training_example
from training.instruct import (
    InstructConfig,
    choice_answer,
    choice_parts,
    evaluate_chat,
    load_config,
    main,
    record_turns,
)
from training.schedule import lr_at
from training.sources import format_choice_question, read_llava_json, read_vqa_csv
from training.synthetic import make_slide_spec
from training.tiny_llm import TinyLLMConfig, build_tiny_llm

CAPTION_PROMPT = ChatConfig().caption_prompt


def write_corpus(root, split: str, seeds, dim: int = BuiltinEncoder().dim):
    """<root>/<split>/{features/<id>.h5, captions.csv, vqa.csv, instruct.json} for synthetic slides `seeds`."""
    folder = root / split
    (folder / "features").mkdir(parents=True, exist_ok=True)
    projection = np.random.default_rng(0).normal(size=(16, dim)).astype(np.float32)
    captions, vqa, instruct = [], [], []
    for seed in seeds:
        spec = make_slide_spec(seed, split)
        name = f"{split}-{seed:04d}"
        coords, labels = spec.tissue_patches()
        noise = np.random.default_rng(seed).normal(scale=0.1, size=(len(coords), dim)).astype(np.float32)
        size = spec.config.patch_size
        ids, origins = region_ids(coords, size * 16)
        write_h5(FeatureSet(projection[labels] + noise, coords, ids, origins,
                            {"patch_size_level0": size, "region_size_level0": size * 16, "slide_name": name}),
                 folder / "features" / f"{name}.h5")
        slide = f"features/{name}.h5"
        captions.append({"ID": f"{name}-c", "Slide": slide, "Tumor": "SYN", "Question": CAPTION_PROMPT,
                         "Caption": spec.caption})
        instruct.append({"id": f"{name}-c", "image": slide, "conversations": [
            {"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"}, {"from": "gpt", "value": spec.caption}]})
        for k, q in enumerate(spec.questions):
            options = [q.options[letter] for letter in "ABCD"]
            vqa.append({"ID": f"{name}-q{k}", "Slide": slide, "Tumor": "SYN", "Broad Category": "Microscopy",
                        "Narrow Category": "Layout", "Question": q.question, **q.options, "Answer": q.answer})
            instruct.append({"id": f"{name}-q{k}", "image": slide, "conversations": [
                {"from": "human", "value": "<image>\n" + format_choice_question(q.question, options)},
                {"from": "gpt", "value": q.answer}]})
    for name, rows in (("captions.csv", captions), ("vqa.csv", vqa)):
        with open(folder / name, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (folder / "instruct.json").write_text(json.dumps(instruct))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return write_corpus(root, "train", range(4)), write_corpus(root, "test", range(2))


TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            head_dim=32, intermediate_size=128)


def write_config(folder, weights, train_dir, **extra):
    """A TOML run config: absolute inputs, the run folder relative to the config file (so a copied folder resumes
    in place)."""
    lines = [f'weights = "{weights}"', f'features = "{train_dir / "features"}"',
             f'records = ["{train_dir / "instruct.json"}"]', 'out = "run"', 'pretrain = "text"',
             "pretrain_steps = 4", "pretrain_lr = 3e-3", "steps = 6", "batch_size = 4", "lr = 3e-3",
             "warmup_steps = 2", "log_every = 1", "checkpoint_every = 3", "keep_checkpoints = 5"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    lines += ["[tiny_llm]"] + [f"{k} = {v}" for k, v in TINY.items()]
    lines += ["[chat.generation]", "max_new_tokens = 24"]
    path = folder / "instruct.toml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def run(corpus, weights, tmp_path_factory):
    """One short run from a TOML file through the CLI: 4 text-pretrain steps, then 6 LoRA + projector steps."""
    folder = tmp_path_factory.mktemp("instruct")
    config = write_config(folder, weights, corpus[0])
    assert main(["--config", str(config)]) == 0
    return folder / "run"


def test_multiple_choice_turns_use_the_chat_prompt_and_letter_first_answers(shared_data):
    record = read_vqa_csv(shared_data / "slidebench" / "SlideBench-VQA-TCGA.sample.csv")[0]
    stem, options = choice_parts(record.turns[0][0])
    assert options == dict(zip("ABCD", record.options)) and stem.startswith("Based on the histological")
    turns = record_turns(record, ChatConfig())
    assert turns[0]["content"] == format_choice_prompt(stem, options, ChatConfig().choice_instruction)
    assert turns[1]["content"] == "C. Papillary adenocarcinoma."
    assert choice_answer("B) Because the nest is central", options) == "B. Because the nest is central."
    assert choice_answer("D", options) == "D. Alveolar adenoma."
    with pytest.raises(Exception, match="option letters"):
        choice_answer("E. nothing", options)
    assert choice_parts("Describe the slide.") is None


def test_shuffled_options_keep_the_answer_on_the_right_text(shared_data):
    """choice_shuffles: every shuffled copy's answer letter names the same option text as the original's."""
    rng = np.random.default_rng(0)
    letters_seen = set()
    for record in read_vqa_csv(shared_data / "slidebench" / "SlideBench-VQA-TCGA.sample.csv")[:20]:
        right = dict(zip("ABCD", record.options))[record.answer]
        for _ in range(3):
            question, answer = (t["content"] for t in record_turns(record, ChatConfig(), rng))
            _, options = choice_parts(question)
            assert sorted(options.values()) == sorted(record.options)
            assert options[answer[0]] == right and answer[1:] == record_turns(record, ChatConfig())[1]["content"][1:]
            letters_seen.add(answer[0])
    assert letters_seen == set("ABCD")


def test_labels_cover_only_answers_and_eos(corpus):
    records = read_llava_json(corpus[0] / "instruct.json")
    chat = ChatConfig()
    conversations = [record_turns(r, chat) for r in records]
    _, tokenizer = build_tiny_llm([t["content"] for c in conversations for t in c], TinyLLMConfig(**TINY))
    for conversation in conversations[:6]:
        example = build_training_example(tokenizer, 10, conversation, chat)
        supervised = example.labels != IGNORE_INDEX
        answer = conversation[1]["content"]
        assert tokenizer.decode(example.labels[supervised][:-1]) == answer
        assert example.labels[supervised][-1] == tokenizer.eos_token_id
        visual = slice(example.image_start, example.image_start + 10)
        assert not supervised[visual].any() and supervised.sum() == len(tokenizer.encode(answer)) + 1
    assert any(c[1]["content"][:3] in {"A. ", "B. ", "C. ", "D. "} for c in conversations)


def test_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 1e-4, 100, 10, 1e-6, 5e-6) for s in range(101)]
    assert lrs[0] == 1e-6 and lrs[10] == pytest.approx(1e-4) and lrs[100] == pytest.approx(5e-6)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_run_writes_a_chat_folder_that_answers(run, corpus, weights):
    chat = run / "chat"
    for name in ("chat_config.json", "projector.safetensors", "llm/config.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (chat / name).is_file(), name
    adapter = json.loads((chat / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (16, 32, 0.05)
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = {phase: [e["loss"] for e in log if e.get("phase") == phase and "loss" in e]
              for phase in ("pretrain", "lora")}
    assert len(losses["pretrain"]) == 4 and len(losses["lora"]) == 6
    assert all(np.isfinite(v) for v in losses["pretrain"] + losses["lora"])
    assert losses["pretrain"][-1] < losses["pretrain"][0]  # the tiny LLM learns the corpus language

    from napari_pathflip.model import PathFLIP
    from training.instruct import encode_slides

    engine = ChatEngine.load(chat, device="cpu")
    assert hasattr(engine.llm, "peft_config")
    rows = encode_slides(PathFLIP.from_pretrained(weights), corpus[1] / "features", ["test-0000"])
    answer = engine.conversation(rows["test-0000"]).describe()
    assert answer.text and answer.visual_tokens == rows["test-0000"].shape[0]
    # the run cached the visual tokens it trained on: the plugin's own encoding of each slide
    cached = load_file(str(run / "visual_tokens.safetensors"))
    assert torch.allclose(cached["train-0000"], encode_slides(PathFLIP.from_pretrained(weights),
                                                              corpus[0] / "features", ["train-0000"])["train-0000"])


def test_resume_equals_straight_run(run, tmp_path):
    copy = tmp_path / "instruct"
    shutil.copytree(run.parent, copy)
    shutil.rmtree(copy / "run" / "chat")
    shutil.rmtree(copy / "run" / "checkpoints" / "lora" / "step-000006")  # as if killed after step 3
    assert main(["--config", str(copy / "instruct.toml")]) == 0
    log = [json.loads(line) for line in (copy / "run" / "log.jsonl").read_text().splitlines()]
    assert {"phase": "lora", "resumed_at": 3} in log
    for name in ("projector.safetensors", "adapter/adapter_model.safetensors"):
        straight, resumed = load_file(str(run / "chat" / name)), load_file(str(copy / "run" / "chat" / name))
        assert set(straight) == set(resumed)
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), (name, key)


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('wieghts = "x"\n')
    with pytest.raises(Exception, match="unknown keys"):
        load_config(bad)
    with pytest.raises(Exception, match="pretrain"):
        InstructConfig(pretrain="lm")


def test_evaluate_chat_and_predictions_scored_by_the_evaluate_cli(run, corpus, weights, tmp_path, capsys):
    result = evaluate_chat(run / "chat", weights, corpus[1], out_dir=tmp_path, caption_tokens=24, device="cpu")
    questions = read_vqa_csv(corpus[1] / "vqa.csv")
    assert result["slides"] == 2 and result["vqa"]["n"] == len(questions)
    assert set(result["vqa"]["by_category"]) == {"Microscopy"} and 0 <= result["vqa"]["accuracy"] <= 1
    assert result["captions"]["n"] == 2 and {"bleu_1", "bleu_4", "rouge_l"} <= set(result["captions"])
    with open(result["vqa_predictions"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["ID"] for r in rows] == [q.id for q in questions]
    capsys.readouterr()
    assert evaluate_cli.main(["vqa", "--questions", str(corpus[1] / "vqa.csv"),
                              "--predictions", result["vqa_predictions"]]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["accuracy"] == result["vqa"]["accuracy"] and scored["missing_ids"] == []
    assert json.loads((tmp_path / "metrics.json").read_text())["vqa"] == result["vqa"]
