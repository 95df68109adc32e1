"""Chat engine: splice, training labels, folders with LoRA, decoding (greedy, streaming, cancel), caps, errors.

A tiny random Qwen3 model with a BPE tokenizer trained on report text (synthetic captions and report sentences,
conftest.report_texts) stands in for the LLM.
"""

import json
import re
import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from napari_pathflip.chat import (
    IGNORE_INDEX,
    ChatConfig,
    ChatEngine,
    GenerationSettings,
    cap_visual_tokens,
    format_choice_prompt,
    option_answer,
    option_shares,
    splice_visual,
    tokenize_conversation,
)
from napari_pathflip.errors import PathflipError
from training.collate import build_training_example, collate_training_examples
from training.metrics import vqa_choice
from training.tiny_llm import IMAGE_TOKEN, TinyLLMConfig, build_tiny_llm, save_llm

VISUAL_DIM = 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = TinyLLMConfig(vocab_size=2048, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, intermediate_size=384)


@pytest.fixture(scope="module")
def captions(report_texts):
    return report_texts


@pytest.fixture(scope="module")
def llm_dir(captions, tmp_path_factory):
    model, tokenizer = build_tiny_llm(captions, SMALL)
    return save_llm(tmp_path_factory.mktemp("tiny_llm"), model, tokenizer)


@pytest.fixture()
def llm(llm_dir):
    return AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True).eval()


@pytest.fixture(scope="module")
def tokenizer(llm_dir):
    return AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)


def make_engine(llm, tokenizer, fast=False, **config):
    torch.manual_seed(0)
    config = ChatConfig(visual_dim=VISUAL_DIM, **config)
    return ChatEngine(llm, tokenizer, config, fast=fast)


def visual(regions, seed=0):
    return torch.randn(1 + regions, VISUAL_DIM, generator=torch.Generator().manual_seed(seed))


GREEDY = GenerationSettings(max_new_tokens=12, min_new_tokens=12)  # random weights: fixed length, no early EOS


def test_tiny_llm_folder_loads_with_auto_classes(llm_dir, tokenizer, llm, captions):
    assert (llm_dir / "model.safetensors").is_file() and not list(llm_dir.glob("*.bin"))
    assert llm.config.model_type == "qwen3" and llm.config.tie_word_embeddings
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", IMAGE_TOKEN):
        assert len(tokenizer.encode(special, add_special_tokens=False)) == 1, special
    assert tokenizer.eos_token == "<|im_end|>"
    text = next(c for c in captions if re.search(r"\d\.\d", c)) + " µm ±"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text  # byte level: exact
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_splice_keeps_text_before_and_after_the_image(llm, tokenizer):
    engine = make_engine(llm, tokenizer)
    question = "Is there lymphovascular invasion in the resected specimen?"
    prompt = tokenize_conversation(tokenizer, 7, [{"role": "user", "content": question}], engine.config,
                                   add_generation_prompt=True)
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": engine.config.system_prompt},
         {"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}], tokenize=False, add_generation_prompt=True)
    before, after = rendered.split(IMAGE_TOKEN)
    ids = prompt.input_ids.tolist()
    start, end = prompt.image_start, prompt.image_start + 7
    assert ids[:start] == tokenizer.encode(before, add_special_tokens=False)
    assert ids[end:] == tokenizer.encode(after, add_special_tokens=False)
    assert engine.config.system_prompt in tokenizer.decode(ids[:start])
    assert tokenizer.decode(ids[end:]).endswith(f"{question}<|im_end|>\n<|im_start|>assistant\n")

    vis = engine.encode_visual(visual(6))
    token_embeds = engine.embed_tokens(prompt.input_ids[None])
    embeds = splice_visual(token_embeds, [vis.embeds], [prompt.image_start])[0]
    expected = engine.projector(visual(6))
    assert torch.allclose(embeds[start:end], expected)
    assert torch.equal(embeds[:start], token_embeds[0, :start]) and torch.equal(embeds[end:], token_embeds[0, end:])


def test_training_labels_cover_answers_with_eos_only(llm, tokenizer):
    config = ChatConfig(visual_dim=VISUAL_DIM)
    answers = ["The diagnosis is invasive ductal carcinoma, grade 2 of 3.", "No. Margins are free (3.5 cm)."]
    turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\nWhat is the diagnosis?"}, {"from": "gpt", "value": answers[0]},
             {"from": "human", "value": "Are margins involved?"}, {"from": "gpt", "value": answers[1]}]
    example = build_training_example(tokenizer, 5, turns, config)
    ids, labels = example.input_ids.tolist(), example.labels.tolist()
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    runs = []
    for i in supervised:  # contiguous runs of supervised positions
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    assert len(runs) == 2
    for run, answer in zip(runs, answers):
        assert [ids[i] for i in run] == [labels[i] for i in run]
        assert ids[run[-1]] == tokenizer.eos_token_id
        assert tokenizer.decode([ids[i] for i in run[:-1]]) == answer
        assert tokenizer.decode(ids[:run[0]]).endswith("<|im_start|>assistant\n")  # template header is masked
    # training and inference see the same tokens: each answer starts exactly where the generation prompt ends
    for run, upto in zip(runs, (1, 3)):
        prompt = tokenize_conversation(tokenizer, 5, turns[:upto], config, add_generation_prompt=True)
        assert ids[:run[0]] == prompt.input_ids.tolist()
    image = range(example.image_start, example.image_start + 5)
    assert all(labels[i] == IGNORE_INDEX for i in image)
    assert tokenizer.decode(ids).count("<|im_end|>") == 5  # system, 2 users, 2 answers: no doubled EOS

    short = build_training_example(tokenizer, 3, [{"role": "user", "content": "Grade?"},
                                                  {"role": "assistant", "content": "Grade 2."}], config)
    batch = collate_training_examples([example, short], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(example))
    assert batch["attention_mask"][1].sum() == len(short)
    assert (batch["labels"][1, len(short):] == IGNORE_INDEX).all()
    assert batch["image_starts"].tolist() == [example.image_start, short.image_start]
    assert batch["visual_lens"].tolist() == [5, 3]

    # the model's loss is the mean cross-entropy over exactly the answer tokens
    torch.manual_seed(0)
    projector = torch.nn.Linear(VISUAL_DIM, llm.config.hidden_size)
    embeds = splice_visual(llm.get_input_embeddings()(batch["input_ids"]),
                           [projector(torch.randn(n, VISUAL_DIM)) for n in (5, 3)], batch["image_starts"])
    out = llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
    logits, targets = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(out.loss, manual, atol=1e-5)


# A template in the manner of Qwen3 (written for this test): an empty think block opens the answer being generated
# and the last answer of a conversation, but not earlier answers.
THINK_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['role'] == 'assistant' and loop.last and enable_thinking is defined and not enable_thinking %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{{- m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def test_template_text_around_answers_is_masked(llm_dir):
    tokenizer = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    tokenizer.chat_template = THINK_TEMPLATE
    config = ChatConfig(visual_dim=VISUAL_DIM)
    turns = [{"role": "user", "content": "Diagnosis?"}, {"role": "assistant", "content": "Carcinoma."}]
    example = build_training_example(tokenizer, 4, turns, config)
    prompt = tokenize_conversation(tokenizer, 4, turns[:1], config, add_generation_prompt=True)
    assert tokenizer.decode(prompt.input_ids.tolist()).endswith("assistant\n<think>\n\n</think>\n\n")
    n = len(prompt)
    assert example.input_ids[:n].tolist() == prompt.input_ids.tolist()
    assert (example.labels[:n] == IGNORE_INDEX).all()
    answer = tokenizer.encode("Carcinoma.", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert example.labels[n:n + len(answer)].tolist() == answer
    assert (example.labels[n + len(answer):] == IGNORE_INDEX).all()


def test_image_placeholder_rules(tokenizer):
    config = ChatConfig(visual_dim=VISUAL_DIM)
    with pytest.raises(PathflipError, match="once"):
        tokenize_conversation(tokenizer, 2, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"},
                                             {"role": "user", "content": f"{IMAGE_TOKEN} again"}], config)
    with pytest.raises(PathflipError, match="answer"):
        build_training_example(tokenizer, 2, [{"role": "user", "content": "no answer"}], config)


def test_lora_folder_round_trip_merged_and_unmerged(llm, llm_dir, tokenizer, tmp_path):
    base_engine = make_engine(llm, tokenizer)
    base_answer = base_engine.generate(visual(4), [{"role": "user", "content": "Describe the slide."}], GREEDY)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS,
                      init_lora_weights=False)  # random B: the adapter really changes the model
    torch.manual_seed(1)
    peft_llm = get_peft_model(llm, lora).eval()
    engine = ChatEngine(peft_llm, tokenizer, base_engine.config, base_engine.projector)
    expected = engine.generate(visual(4), [{"role": "user", "content": "Describe the slide."}], GREEDY)
    engine.save(tmp_path / "chat")

    assert (tmp_path / "chat" / "adapter" / "adapter_model.safetensors").is_file()
    saved_base = AutoModelForCausalLM.from_pretrained(tmp_path / "chat" / "llm", local_files_only=True)
    reference = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True)
    for (name, a), (_, b) in zip(saved_base.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name  # the base weights are saved without LoRA

    answers = {}
    for merge in (False, True):
        loaded = ChatEngine.load(tmp_path / "chat", merge=merge, device="cpu")
        assert hasattr(loaded.llm, "peft_config") != merge
        answers[merge] = loaded.generate(visual(4), [{"role": "user", "content": "Describe the slide."}], GREEDY)
    assert answers[False].token_ids == answers[True].token_ids == expected.token_ids
    assert expected.token_ids != base_answer.token_ids  # the adapter was applied

    separate = ChatEngine.load(tmp_path / "chat", llm_dir=llm_dir, device="cpu", merge=True)
    assert separate.generate(visual(4), [{"role": "user", "content": "Describe the slide."}],
                             GREEDY).token_ids == expected.token_ids

    # float16 storage (the demo chat): half the bytes, and the loaded weights are the float16-rounded ones
    engine.save(tmp_path / "half", dtype=torch.float16)
    from safetensors.torch import load_file

    stored = {**load_file(tmp_path / "half" / "llm" / "model.safetensors"),
              **load_file(tmp_path / "half" / "adapter" / "adapter_model.safetensors")}
    assert {v.dtype for v in stored.values()} == {torch.float16}
    half = ChatEngine.load(tmp_path / "half", device="cpu")
    rounded = {k: v.half().float() for k, v in engine.llm.state_dict().items()}
    assert all(torch.equal(v, rounded[k]) for k, v in half.llm.state_dict().items() if v.is_floating_point())
    assert torch.equal(half.projector.weight, engine.projector.weight)  # the projector stays float32
    # peft keeps target_modules in a set; the saved list is sorted, so a rerun writes the same bytes
    targets = json.loads((tmp_path / "half" / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert len(targets) > 1 and targets == sorted(targets)


def test_greedy_is_deterministic_and_streaming_is_incremental(llm, tokenizer):
    engine = make_engine(llm, tokenizer)
    conversation = engine.conversation(visual(10))
    first = conversation.ask("What is the tumour grade?", GREEDY)
    conversation.reset()
    second = conversation.ask("What is the tumour grade?", GREEDY)
    assert first.token_ids == second.token_ids and len(first.token_ids) == 12
    assert first.finish_reason == "length" and first.first_token_s is not None

    conversation.reset()
    stream = conversation.stream("What is the tumour grade?", GREEDY)
    pieces, seen = [], []
    for piece in stream:
        pieces.append(piece)
        seen.append(len(stream.answer.token_ids) if stream.answer else None)  # answer only exists at the end
    assert len(pieces) >= 3 and all(pieces)
    assert "".join(pieces) == first.text == stream.answer.text
    assert seen[:-1] == [None] * (len(seen) - 1)  # pieces arrived before the answer was complete


def test_fast_static_cache_path_matches_plain_path(llm, tokenizer):
    plain = make_engine(llm, tokenizer, fast=False)
    fast = ChatEngine(llm, tokenizer, plain.config, plain.projector, fast=True)
    turns = [{"role": "user", "content": "What is the diagnosis?"}]
    expected = plain.generate(visual(20), turns, GREEDY).token_ids
    assert fast.generate(visual(20), turns, GREEDY).token_ids == expected
    assert fast.generate(visual(20), turns, GREEDY).token_ids == expected  # the static cache is reset per answer
    other = [{"role": "user", "content": "Is there necrosis?"}]
    assert fast.generate(visual(3), other, GREEDY).token_ids == plain.generate(visual(3), other, GREEDY).token_ids


def test_sampling_settings(llm, tokenizer):
    engine = make_engine(llm, tokenizer)
    turns = [{"role": "user", "content": "What is the diagnosis?"}]
    sample = GenerationSettings(max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95,
                                seed=3)
    a, b = (engine.generate(visual(2), turns, sample) for _ in range(2))
    assert a.token_ids == b.token_ids  # same seed, same sample
    others = {tuple(engine.generate(visual(2), turns, GenerationSettings(
        max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=1.5, seed=s)).token_ids) for s in range(4)}
    assert len(others) > 1


def test_cancel_stops_within_a_token(llm, tokenizer):
    engine = make_engine(llm, tokenizer)
    conversation = engine.conversation(visual(5))
    long = GenerationSettings(max_new_tokens=200, min_new_tokens=200)
    stream = conversation.stream("Describe everything.", long)
    for count, _ in enumerate(stream, 1):
        if count == 2:
            conversation.cancel()
    answer = stream.answer
    assert answer.finish_reason == "cancelled"
    assert len(answer.token_ids) <= 3
    assert conversation.history == []  # a cancelled answer is not part of the conversation

    # from another thread, while a consumer thread iterates
    stream = conversation.stream("Describe everything.", long)
    first_piece = threading.Event()

    def consume():
        for _ in stream:
            first_piece.set()

    worker = threading.Thread(target=consume)
    worker.start()
    assert first_piece.wait(30)
    stream.cancel()
    worker.join(30)
    assert not worker.is_alive() and stream.answer.finish_reason == "cancelled"
    assert len(stream.answer.token_ids) < 200
    # the engine is free again
    assert conversation.ask("Grade?", GREEDY).finish_reason == "length"


def test_multi_turn_history_is_carried(llm, tokenizer):
    engine = make_engine(llm, tokenizer)
    conversation = engine.conversation(visual(8))
    caption = conversation.describe(GREEDY)
    follow = conversation.ask("Is the margin involved?", GREEDY)
    assert [m["role"] for m in conversation.history] == ["user", "assistant"] * 2
    assert conversation.history[0]["content"] == engine.config.caption_prompt
    assert conversation.history[1]["content"] == caption.text
    # the second prompt holds the whole first exchange (and the image once)
    second_prompt = tokenize_conversation(tokenizer, 9, conversation.history[:2] + [conversation.history[2]],
                                          engine.config, add_generation_prompt=True)
    assert follow.prompt_tokens == len(second_prompt) > caption.prompt_tokens
    text = tokenizer.decode(second_prompt.input_ids.tolist())
    assert text.count(engine.config.caption_prompt) == 1 and "Is the margin involved?" in text
    assert caption.text.strip() in text  # (random weights: the caption itself may be only whitespace)
    assert (second_prompt.input_ids == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).sum() == 9

    # a history with a real answer goes into the prompt that is fed to the model, the image in its first turn
    conversation.history = [{"role": "user", "content": "Diagnosis?"},
                            {"role": "assistant", "content": "Invasive ductal carcinoma."}]
    stream = conversation.stream("Grade?", GREEDY)
    answer = stream.result()
    fed = tokenizer.decode(stream.prompt.input_ids.tolist())
    assert fed.endswith("user\n" + IMAGE_TOKEN * 9 + "\nDiagnosis?<|im_end|>\n<|im_start|>assistant\n"
                        "Invasive ductal carcinoma.<|im_end|>\n<|im_start|>user\nGrade?<|im_end|>\n"
                        "<|im_start|>assistant\n")
    assert answer.prompt_tokens == len(stream.prompt) and len(conversation.history) == 4


def test_history_turns_limits_the_context_not_the_history(llm, tokenizer):
    """config.history_turns: how many earlier exchanges the model is given; the history itself keeps everything."""
    exchanges = [("Diagnosis?", "Invasive ductal carcinoma."), ("Grade?", "Grade 2."), ("Margins?", "Clear.")]
    past = [{"role": role, "content": text} for q, a in exchanges for role, text in (("user", q), ("assistant", a))]
    for keep, expected in ((None, 3), (5, 3), (2, 2), (1, 1), (0, 0)):
        engine = make_engine(llm, tokenizer, history_turns=keep)
        conversation = engine.conversation(visual(4))
        conversation.history = list(past)
        stream = conversation.stream("Lymphovascular invasion?", GREEDY)
        stream.result()
        fed = tokenizer.decode(stream.prompt.input_ids.tolist())
        assert sum(q in fed for q, _ in exchanges) == expected, (keep, fed)
        assert fed.count(IMAGE_TOKEN) == 5 and "Lymphovascular invasion?" in fed  # the image always comes first
        assert len(conversation.history) == 8 and conversation.history[:6] == past
        if keep == 1:
            assert "Margins?" in fed and "Clear." in fed and "Grade?" not in fed
    with pytest.raises(PathflipError, match="history_turns"):
        ChatConfig(history_turns=-1)


def test_region_tokens_are_capped_and_reported(llm, tokenizer):
    rows = visual(2000)
    capped, pooled = cap_visual_tokens(rows, 1025, "adaptive_avg")
    assert pooled and capped.shape == (1025, VISUAL_DIM)
    assert torch.equal(capped[0], rows[0])  # the slide token is kept as is
    # adaptive pooling of 2000 rows into 1024: output i averages rows floor(i*2000/1024) .. ceil((i+1)*2000/1024)
    assert torch.allclose(capped[1], rows[1:3].mean(0), atol=1e-6)
    assert torch.allclose(capped[-1], rows[-2:].mean(0), atol=1e-6)
    top, _ = cap_visual_tokens(rows, 11, "top_norm")
    norms = rows[1:].norm(dim=1)
    assert set(top[1:].norm(dim=1).tolist()) == set(norms.topk(10).values.tolist())
    same, pooled = cap_visual_tokens(rows[:50], 1025)
    assert not pooled and torch.equal(same, rows[:50])

    engine = make_engine(llm, tokenizer, max_visual_tokens=65)
    answer = engine.generate(visual(300), [{"role": "user", "content": "Diagnosis?"}], GREEDY)
    assert answer.pooled and answer.visual_tokens == 65 and "300 regions" in answer.notice
    small = engine.generate(visual(30), [{"role": "user", "content": "Diagnosis?"}], GREEDY)
    assert not small.pooled and small.visual_tokens == 31 and small.notice is None

    class Encoding:  # duck-typed SlideEncoding
        slide_embedding = rows[0]
        region_embeddings = rows[1:31]

    assert torch.equal(engine.encode_visual(Encoding()).embeds, engine.encode_visual(rows[:31]).embeds)


def test_clear_errors(llm, tokenizer, llm_dir, tmp_path):
    question = [{"role": "user", "content": "Diagnosis?"}]
    # the context: the question's text tokens (as this tokenizer counts them) + 80, so 61 visual tokens leave 19
    text = len(tokenize_conversation(tokenizer, 1, question, ChatConfig(visual_dim=VISUAL_DIM),
                                     add_generation_prompt=True)) - 1
    engine = make_engine(llm, tokenizer, context_tokens=text + 80)
    conversation = engine.conversation(visual(4))
    for empty in ("", "   \n"):
        with pytest.raises(PathflipError, match="empty"):
            conversation.ask(empty)
    with pytest.raises(PathflipError, match="context"):
        engine.generate(visual(200), question)
    near = engine.generate(visual(60), question, GenerationSettings(max_new_tokens=500))
    assert near.prompt_tokens + len(near.token_ids) <= text + 80 and "tokens of context" in near.notice
    with pytest.raises(PathflipError, match="expects 32-d"):
        engine.generate(torch.zeros(3, 64), [{"role": "user", "content": "Diagnosis?"}])
    with pytest.raises(PathflipError, match="multiple-choice"):
        conversation.ask_choice("Which?", [])

    with pytest.raises(PathflipError, match="not found"):
        ChatEngine.load(tmp_path / "missing")
    folder = tmp_path / "chat"
    engine.save(folder, include_llm=False)
    with pytest.raises(PathflipError, match="LLM folder not found"):
        ChatEngine.load(folder)
    bad_llm = tmp_path / "pickled"
    bad_llm.mkdir()
    (bad_llm / "config.json").write_text((llm_dir / "config.json").read_text())
    (bad_llm / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(PathflipError, match="pickle"):
        ChatEngine.load(folder, llm_dir=bad_llm)
    (folder / "projector.safetensors").unlink()
    with pytest.raises(PathflipError, match="projector.safetensors"):
        ChatEngine.load(folder, llm_dir=llm_dir)


def test_choice_prompt_format():
    text = format_choice_prompt("Which grade?", ["Grade 1", "Grade 2", "", "Grade 3"], "Answer with the letter.")
    assert text.splitlines() == ["Which grade?", "A. Grade 1", "B. Grade 2", "D. Grade 3", "Answer with the letter."]


def test_projector_and_lora_learn_two_slides(llm, tokenizer):
    """A few dozen steps of projector + LoRA training map two slides to their own answers (VQA format)."""
    engine = make_engine(llm, tokenizer)
    config = engine.config
    torch.manual_seed(0)
    peft_llm = get_peft_model(llm, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS))
    projector = engine.projector.train()
    question, options = "What is the diagnosis?", ["Normal tissue", "Invasive carcinoma", "Lymphoma", "Necrosis"]
    prompt = format_choice_prompt(question, options, config.choice_instruction)
    slides = [visual(6, seed=10), visual(6, seed=11)]
    answers = ["B. Because the tumour invades the stroma.", "C. Because sheets of atypical lymphocytes."]
    examples = [build_training_example(tokenizer, 7, [{"role": "user", "content": prompt},
                                                      {"role": "assistant", "content": a}], config) for a in answers]
    batch = collate_training_examples(examples, tokenizer.pad_token_id)
    params = [p for p in peft_llm.parameters() if p.requires_grad] + list(projector.parameters())
    optimiser = torch.optim.AdamW(params, lr=3e-3)
    peft_llm.train()
    for _ in range(40):
        embeds = splice_visual(peft_llm.get_input_embeddings()(batch["input_ids"]),
                               [projector(s) for s in slides], batch["image_starts"])
        loss = peft_llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    trained = ChatEngine(peft_llm.eval(), tokenizer, config, projector.eval())
    turns = [{"role": "user", "content": prompt}]
    for own, (slide, answer) in enumerate(zip(slides, answers)):
        reply = trained.conversation(slide).ask_choice(question, options, GenerationSettings(max_new_tokens=40))
        assert reply.text == answer and reply.finish_reason == "eos" and reply.option_scores is None
        assert vqa_choice(reply.text) == answer[0]
    # each answer is likelier after its own slide than after the other one (an answer against itself: how many
    # tokens the tokenizer makes of it does not matter, as it would between two answers of a barely trained model)
    scores = [trained.score_answers(slide, turns, answers) for slide in slides]  # [slide][answer]
    for own in (0, 1):
        assert scores[own][own] > scores[1 - own][own], scores
    # "rank" scores each option's own words ("C. Lymphoma."), which a chat trained on free reasons never saw: the
    # answer starts with the best-scored option, whichever its tokenizer makes cheapest
    ranked = trained.conversation(slides[0]).ask_choice(question, options, rule="rank")
    best = max(ranked.option_scores, key=ranked.option_scores.get)
    assert set(ranked.option_scores) == set("ABCD") and vqa_choice(ranked.text) == best
    assert ranked.text.startswith(option_answer(best, options["ABCD".index(best)]))


def test_score_answers_equals_the_log_probability_of_each_answer(llm, tokenizer):
    """The batched, right-padded scoring equals each answer's own log-probability under the full forward pass."""
    engine = make_engine(llm, tokenizer)
    slide = visual(5, seed=3)
    turns = [{"role": "user", "content": "Which pattern is seen?"}]
    answers = ["A. Solid.", "B. Cribriform glands with central necrosis.", "C. Papillary."]
    scores = engine.score_answers(slide, turns, answers)
    vis = engine.encode_visual(slide)
    prompt = tokenize_conversation(tokenizer, len(vis), turns, engine.config, add_generation_prompt=True)
    for answer, score in zip(answers, scores):
        tail = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        ids = torch.cat([prompt.input_ids, torch.tensor(tail)])[None]
        with torch.no_grad():
            embeds = splice_visual(engine.embed_tokens(ids), [vis.embeds], [prompt.image_start])
            logp = llm(inputs_embeds=embeds).logits[0].float().log_softmax(-1)
        expected = sum(float(logp[len(prompt) - 1 + i, token]) for i, token in enumerate(tail))
        assert score == pytest.approx(expected, abs=1e-3)
    assert len(set(scores)) == 3 and all(s < 0 for s in scores)
    with pytest.raises(PathflipError, match="non-empty answer"):
        engine.score_answers(slide, turns, [])


def test_ranked_choice_starts_with_the_best_option_and_streams_it_first(llm, tokenizer):
    engine = make_engine(llm, tokenizer, choice_rule="rank")
    options = {"A": "Grade 1", "B": "Grade 2", "C": "", "D": "Grade 3."}
    conversation = engine.conversation(visual(8, seed=5))
    stream = conversation.stream_choice("What is the grade?", options, GenerationSettings(max_new_tokens=20))
    pieces = list(stream)
    answer = stream.answer
    assert set(answer.option_scores) == {"A", "B", "D"}  # the empty option is not offered
    best = max(answer.option_scores, key=answer.option_scores.get)
    assert pieces[0] == option_answer(best, options[best]) == answer.text[:len(pieces[0])]
    assert vqa_choice(answer.text) == best and "".join(pieces) == answer.text
    assert answer.first_token_s is not None
    shares = option_shares(answer.option_scores)
    assert sum(shares.values()) == pytest.approx(1.0) and max(shares, key=shares.get) == best
    # the answer joins the history like any other
    assert conversation.history[-1] == {"role": "assistant", "content": answer.text}
    assert conversation.history[-2]["content"] == conversation.choice_prompt("What is the grade?", options)
    # a token budget shorter than the option's answer keeps the forced start and stops there
    short = engine.conversation(visual(8, seed=5)).ask_choice("What is the grade?", options,
                                                               GenerationSettings(max_new_tokens=1))
    assert short.text == option_answer(best, options[best]) and short.finish_reason == "length"
    with pytest.raises(PathflipError, match="choice rule"):
        conversation.ask_choice("What is the grade?", options, rule="vote")
    with pytest.raises(PathflipError, match="choice_rule"):
        ChatConfig(choice_rule="vote")


def test_areas_layout_gives_each_part_of_the_section_a_slot_of_its_own(llm, tokenizer, tmp_path):
    """visual_layout "areas": [slide; 9 area tokens; regions], an area token the mean of the regions in one ninth of
    the tissue (upper left first, zeros where there is none), slot embeddings on the first 10 tokens, saved with the
    projector; a 5 x 4 region grid puts regions (0, 0), (1, 0) in the upper left, (4, 3) in the lower right."""
    from napari_pathflip.chat import VisualProjector, area_index, visual_tensor
    from napari_pathflip.model.regions import AREA_NAMES

    grid = torch.tensor([(c, r) for r in range(4) for c in range(5) if (c, r) not in ((2, 1), (2, 2))]).numpy()
    assert area_index(grid).tolist()[:5] == [0, 0, 1, 2, 2]
    rows = visual(len(grid))

    class Encoding:
        slide_embedding = rows[0]
        region_embeddings = rows[1:]
        region_grid = grid

    areas = visual_tensor(Encoding(), "areas")
    assert areas.shape == (1 + 9 + len(grid), VISUAL_DIM) and torch.equal(areas[0], rows[0])
    assert torch.equal(areas[10:], rows[1:])
    where = area_index(grid)
    for a in range(len(AREA_NAMES)):
        members = rows[1:][where == a]
        expected = members.mean(0) if len(members) else torch.zeros(VISUAL_DIM)
        assert torch.allclose(areas[1 + a], expected, atol=1e-6), AREA_NAMES[a]
    assert not (where == 4).any() and torch.equal(areas[5], torch.zeros(VISUAL_DIM))  # the gap: no central region
    with pytest.raises(PathflipError, match="region_grid"):
        visual_tensor(type("NoGrid", (), {"slide_embedding": rows[0], "region_embeddings": rows[1:]})(), "areas")

    engine = make_engine(llm, tokenizer, visual_layout="areas", max_visual_tokens=15)
    assert isinstance(engine.projector, VisualProjector) and engine.projector.slots.shape == (10, 128)
    with torch.no_grad():
        engine.projector.slots.normal_()
    tokens = engine.encode_visual(Encoding())
    assert len(tokens) == 15 and tokens.pooled and tokens.regions_in == len(grid)  # 10 kept + 5 pooled regions
    plain = engine.projector.weight @ areas[:10].T + engine.projector.bias[:, None]
    assert torch.allclose(tokens.embeds[:10], plain.T + engine.projector.slots, atol=1e-5)
    engine.save(tmp_path / "chat")
    again = ChatEngine.load(tmp_path / "chat", device="cpu")
    assert again.config.visual_layout == "areas" and torch.equal(again.encode_visual(Encoding()).embeds, tokens.embeds)
    with pytest.raises(PathflipError, match="slot embeddings"):
        ChatEngine(llm, tokenizer, ChatConfig(visual_dim=VISUAL_DIM), engine.projector)
