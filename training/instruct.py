"""Instruction tuning (paper eq. 11): PathFLIP visual tokens -> linear projector -> causal LM with LoRA.

`python -m training instruct --config FILE.toml` trains; `python -m training instruct eval --chat DIR --weights DIR
--split DIR` scores a chat folder on a split (SlideBench VQA rule and caption BLEU/ROUGE-L).

Data flow. Every slide named by the records is encoded once by the frozen PathFLIP model exactly as the plugin does
(`encode_slide` on the slide's CLAM/TRIDENT .h5 features), and its visual rows [slide; regions] are cached
(run folder, visual_tokens.safetensors). Records (LLaVA-style JSON and/or SlideBench CSVs) become chat conversations
built by `training.collate.build_training_example`, so training prompts equal inference prompts token for token;
the loss is on answer tokens (+ EOS) only. Multiple-choice turns are re-rendered with the chat engine's own choice
prompt and their targets rewritten to "<letter>. <short reason>" (the option text when the source gives no reason),
so the SlideBench rule (text up to the first "." equals the letter) scores the answers the model learns to give.
Caption and VQA conversations are mixed in one shuffled stream.

Phases.
  pretrain (optional, `pretrain = "text" | "full"`): a randomly initialised tiny LLM cannot learn language through
    LoRA alone (its frozen base would stay random), so the demo first trains it fully. "text" trains all LLM weights
    on the same conversations without the image (the answer language and formats, conditioned on the questions);
    "full" is full-parameter instruction tuning with the projector and the visual tokens. The demo uses "full" (with
    "text" the LoRA phase's loss stayed near the text-only floor: answers nearly independent of the slide); the
    second phase is then exactly the paper's recipe.
  lora: projector + peft LoRA (paper: r 16, alpha 32, dropout 0.05 on q/k/v/o/gate/up/down_proj), base frozen.
Both: AdamW, linear warmup from `warmup_start_lr` then cosine to `min_lr`, gradient accumulation, bf16 autocast on
CUDA, losses logged to stdout and <run>/log.jsonl, checkpoints (<run>/checkpoints/<phase>/step-N: trainable tensors and
AdamW moments as safetensors, step/RNG/param groups as JSON; no pickle) resumed when present.

Run folder: <out>/log.jsonl, checkpoints/, visual_tokens.safetensors, and the chat folder (<out>/chat unless
`chat_out` is set) that `napari_pathflip.chat.ChatEngine.load` reads: chat_config.json, projector.safetensors,
llm/ (the base LLM: the pretrained tiny model, or a copy of `llm` unless save_llm = false) and adapter/ (peft).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from napari_pathflip.chat import (
    ChatConfig,
    ChatEngine,
    GenerationSettings,
    TokenizedConversation,
    VisualProjector,
    cap_visual_tokens,
    format_choice_prompt,
    projector_slots,
    splice_visual,
    visual_tensor,
)
from napari_pathflip.errors import PathflipError
from napari_pathflip.weights import WeightsFolder, resolve_device
from training import metrics
from training.collate import build_training_example, collate_training_examples
from training.schedule import lr_at
from training.sources import Record, read_records

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRETRAIN_MODES = ("none", "text", "full")
VISUAL_CACHE = "visual_tokens.safetensors"
_OPTION = re.compile(r"^\s*\(?([A-D])[).:]\s+(.*\S)\s*$")
_LETTER = re.compile(r"^\s*\(?([A-D])(?:[).:]|\s|$)\s*(.*)$", re.DOTALL)


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class InstructConfig:
    """Every input, size and setting of the instruction-tuning stage. Paths are relative to the config file."""
    # --- inputs
    weights: str = ""  # PathFLIP weights folder (config.json + model.safetensors), kept frozen
    features: str = ""  # folder of <slide_id>.h5 (CLAM/TRIDENT or our own)
    records: list[str] = field(default_factory=list)  # LLaVA JSON and/or SlideBench caption/VQA CSV files
    patch_size_level0: int = 0  # for CLAM files without the attribute (0: read it from each file)
    llm: str = ""  # local causal-LM folder (e.g. Qwen3-0.6B); "" builds a tiny Qwen3 with a corpus tokenizer
    tiny_llm: dict = field(default_factory=dict)  # training.tiny_llm.TinyLLMConfig overrides for llm = ""
    chat: dict = field(default_factory=dict)  # napari_pathflip.chat.ChatConfig overrides (prompts, generation...)
    # --- outputs
    out: str = "instruct_run"
    chat_out: str = ""  # chat folder ("" = <out>/chat)
    save_llm: bool = True  # copy the base LLM into chat/llm (false: load with --llm DIR)
    save_dtype: str = "float32"  # "float16" halves the saved LLM and adapter (the demo chat; evaluation loads it)
    # --- optional first phase (tiny LLM only)
    pretrain: str = "none"  # one of PRETRAIN_MODES (module docstring)
    pretrain_steps: int = 0
    pretrain_lr: float = 1e-3
    # --- LoRA + projector phase
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    steps: int = 1000  # optimiser steps
    # extra copies of every multiple-choice conversation with its options in a new random order (letters
    # reassigned): the answer letter must then be read off the prompt, not remembered per question
    choice_shuffles: int = 0
    batch_size: int = 8  # conversations per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 200
    warmup_start_lr: float = 1e-6
    min_lr: float = 5e-6
    max_grad_norm: float = 1.0
    # "standardize": the projector starts as per-dimension standardisation of the training set's visual rows followed
    # by a random map at the LLM's word-embedding scale (still one Linear, so the chat engine loads it unchanged).
    # Why: the rows of an untrained or lightly trained PathFLIP share one dominant direction (synthetic corpus with
    # MiniLM init: cosine 0.9998 between slides, per-dimension spread 0.2 % of the row norm), which the default
    # init passes on nearly constant, and the LLM then ignores the image. "default": nn.Linear's own init.
    projector_init: str = "standardize"
    # --- run
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2  # newest checkpoints kept per phase
    resume: bool = True
    evaluate: str = ""  # split folder to evaluate the chat folder on after training ("" = none)
    base_dir: str = ""  # set by load_config: the folder relative paths are taken from

    def __post_init__(self):
        if self.pretrain not in PRETRAIN_MODES:
            raise PathflipError(f"instruct config: pretrain must be one of {PRETRAIN_MODES}, not {self.pretrain!r}")
        if self.pretrain != "none" and self.llm:
            raise PathflipError("instruct config: the full-parameter pretrain phase is for the tiny demo LLM only "
                                "(llm = \"\"); a real LLM is tuned with LoRA alone")
        if self.save_dtype not in ("float32", "float16", "bfloat16"):
            raise PathflipError("instruct config: save_dtype must be float32, float16 or bfloat16")
        if self.projector_init not in ("standardize", "default"):
            raise PathflipError("instruct config: projector_init must be \"standardize\" or \"default\"")
        if min(self.steps, self.batch_size, self.grad_accum) < 1 or self.pretrain_steps < 0:
            raise PathflipError("instruct config: steps, batch_size and grad_accum must be >= 1")
        if isinstance(self.records, str):
            self.records = [self.records]

    def path(self, value: str) -> Path:
        return (Path(self.base_dir) / value).resolve() if value else Path()

    @property
    def run_dir(self) -> Path:
        return self.path(self.out)

    @property
    def chat_dir(self) -> Path:
        return self.path(self.chat_out) if self.chat_out else self.run_dir / "chat"


def load_config(path: str | Path, **overrides) -> InstructConfig:
    """InstructConfig from a TOML file (unknown keys are an error); keyword overrides win."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PathflipError(f"cannot read the instruct config {path}: {exc}") from exc
    known = {f.name for f in fields(InstructConfig)} - {"base_dir"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PathflipError(f"{path}: unknown keys {unknown}; known keys: {sorted(known)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return InstructConfig(**data, base_dir=str(path.resolve().parent))


# ------------------------------------------------------------------------------------------ visual tokens
def encode_slides(model, features_dir: str | Path, slide_ids, patch_size_level0: int = 0,
                  cache: str | Path | None = None, cache_key: str = "",
                  layout: str = "regions") -> dict[str, torch.Tensor]:
    """[T, d] float32 visual rows of every slide in the chat's `layout` (napari_pathflip.chat.visual_tensor), from
    `features_dir/<slide_id>.h5` through `model.encode_slide`; `cache` (a safetensors file) keeps them between runs
    and is reused only when it was written for the same `cache_key` and layout."""
    cache_key = f"{cache_key}:{layout}"
    from safetensors import safe_open
    from safetensors.torch import save_file

    from napari_pathflip.features import read_h5

    features_dir, wanted = Path(features_dir), sorted(set(slide_ids))
    rows: dict[str, torch.Tensor] = {}
    if cache is not None and Path(cache).is_file():
        with safe_open(str(cache), "pt") as handle:
            if (handle.metadata() or {}).get("key") == cache_key:
                rows = {k: handle.get_tensor(k) for k in handle.keys() if k in wanted}
    missing = [s for s in wanted if s not in rows]
    absent = [s for s in missing if not (features_dir / f"{s}.h5").is_file()]
    if absent:
        raise PathflipError(f"{len(absent)} slide(s) named by the records have no features in {features_dir} "
                            f"(e.g. {absent[0]}.h5): extract them (pathflip extract) or fix the records")
    for slide_id in missing:
        fs = read_h5(features_dir / f"{slide_id}.h5", region_patches=model.config.region_patches,
                     patch_size_level0=patch_size_level0 or None)
        encoding = model.encode_slide(fs.features, fs.coords, fs.patch_size_level0, keep_features=False)
        rows[slide_id] = visual_tensor(encoding, layout).cpu()
    if cache is not None and missing:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in rows.items()}, str(cache), metadata={"key": cache_key})
    return rows


# -------------------------------------------------------------------------------------------- conversations
def choice_parts(question: str) -> tuple[str, dict[str, str]] | None:
    """(question, {letter: option}) of a multiple-choice prompt ("A) ..." / "A. ..." lines), else None.
    Lines after the options (an answer-format instruction) are dropped: the chat engine adds its own."""
    lines = question.strip().splitlines()
    found = [(i, m) for i, line in enumerate(lines) if (m := _OPTION.match(line))]
    if len(found) < 2:
        return None
    first = found[0][0]
    return "\n".join(lines[:first]).strip(), {m[1]: m[2] for _, m in found}


def choice_answer(answer: str, options: dict[str, str]) -> str:
    """"<letter>. <reason>": the source's own text after the letter, or the option text when it gives none."""
    match = _LETTER.match(answer)
    if match is None or match[1] not in options:
        raise PathflipError(f"multiple-choice answer {answer!r} does not start with one of the option letters "
                            f"{sorted(options)}")
    letter, reason = match[1], match[2].strip().lstrip(".):").strip()
    reason = reason or options[letter]
    return f"{letter}. {reason}" if reason.endswith(".") else f"{letter}. {reason}."


def record_turns(record: Record, chat: ChatConfig, rng: np.random.Generator | None = None) -> list[dict]:
    """A record as chat turns; multiple-choice turns re-rendered with the engine's prompt (module docstring).
    With `rng`, the options of each multiple-choice turn are shuffled (letters reassigned, the answer follows)."""
    turns = []
    for question, answer in record.turns:
        parts = choice_parts(question)
        if parts is not None:
            stem, options = parts
            target = choice_answer(answer, options)
            if rng is not None:
                letters, texts = list(options), list(options.values())
                order = [int(i) for i in rng.permutation(len(texts))]  # new position i shows old option order[i]
                options = {letter: texts[old] for letter, old in zip(letters, order)}
                new_letter = letters[order.index(letters.index(target[0]))]
                target = new_letter + target[1:]
            question, answer = format_choice_prompt(stem, options, chat.choice_instruction), target
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return turns


def has_choice(record: Record) -> bool:
    return any(choice_parts(question) is not None for question, _ in record.turns)


def read_all_records(paths) -> list[Record]:
    records = [r for p in paths for r in read_records(p)]
    if not records:
        raise PathflipError("the instruct config names no records: set records = [\"instruct.json\", ...]")
    return records


# --------------------------------------------------------------------------------------------- optimisation
def batch_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions start .. start + count of an endless stream of shuffled epochs over n examples; each epoch's
    order depends only on (seed, epoch), so a resumed run sees exactly the batches a straight run sees."""
    out = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[offset]))
    return out


@dataclass
class Phase:
    name: str  # "pretrain" or "lora"
    steps: int
    lr: float
    visual: bool  # splice the visual tokens (False: text-only conversations)


def _trainable(llm: nn.Module, projector: nn.Module) -> dict[str, nn.Parameter]:
    named = [(f"llm.{k}", p) for k, p in llm.named_parameters()] + \
            [(f"projector.{k}", p) for k, p in projector.named_parameters()]
    return {k: p for k, p in named if p.requires_grad}


def save_checkpoint(folder: Path, step: int, params: dict[str, nn.Parameter], optimiser, keep: int = 2) -> Path:
    """<folder>/step-NNNNNN: trainable tensors + AdamW moments (safetensors) and step, RNG, param groups (JSON).
    Written to a temporary name and renamed, so a crash never leaves a half checkpoint; the newest `keep` stay."""
    import shutil

    from safetensors.torch import save_file

    target = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: p.detach().cpu().contiguous() for k, p in params.items()}, str(tmp / "trainable.safetensors"))
    index = {id(p): k for k, p in params.items()}
    state = optimiser.state_dict()
    names = [index[id(p)] for g in optimiser.param_groups for p in g["params"]]
    moments = {f"{names[i]}::{key}": value.detach().cpu().contiguous()
               for i, entry in state["state"].items() for key, value in entry.items()}
    save_file(moments, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        rng["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    (tmp / "state.json").write_text(json.dumps({"step": step, "param_groups": groups, "rng": rng}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for old in checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return target


def checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoints of a phase, oldest first."""
    return sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file()) if folder.is_dir() else []


def load_checkpoint(folder: Path, params: dict[str, nn.Parameter], optimiser) -> int:
    """Restore what `save_checkpoint` wrote; returns the step to continue from."""
    from safetensors.torch import load_file

    state = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "trainable.safetensors"))
    if set(tensors) != set(params):
        raise PathflipError(f"the checkpoint {folder} does not match this run's trainable weights (another config?): "
                            "delete it or set resume = false")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])
    moments = load_file(str(folder / "optimizer.safetensors"))
    names = [k for g in optimiser.param_groups for k in [_name_of(p, params) for p in g["params"]]]
    restored = {"state": {}, "param_groups": []}
    for i, name in enumerate(names):
        entry = {key.split("::", 1)[1]: v for key, v in moments.items() if key.split("::", 1)[0] == name}
        if entry:
            restored["state"][i] = entry
    position = 0
    for group, saved in zip(optimiser.param_groups, state["param_groups"]):
        restored["param_groups"].append({**saved, "params": list(range(position, position + len(group["params"])))})
        position += len(group["params"])
    optimiser.load_state_dict(restored)
    torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["rng"]["cuda"]])
    return int(state["step"])


def _name_of(param, params: dict[str, nn.Parameter]) -> str:
    return next(k for k, p in params.items() if p is param)


class _Log:
    """One JSON line per record in <run>/log.jsonl and a short line on stdout."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = path.open("a", encoding="utf-8")

    def __call__(self, **entry) -> None:
        self.handle.write(json.dumps(entry) + "\n")
        self.handle.flush()
        if "loss" in entry:
            print(f"instruct {entry['phase']} step {entry['step']}/{entry['steps']} loss {entry['loss']:.4f} "
                  f"lr {entry['lr']:.2e} {entry['elapsed_s']:.0f}s", flush=True)
        else:
            print("instruct " + " ".join(f"{k} {v}" for k, v in entry.items()), flush=True)


def _batch_loss(llm, projector, examples: list[TokenizedConversation], visuals: list[torch.Tensor],
                pad_id: int, device: torch.device, autocast: bool) -> torch.Tensor:
    batch = collate_training_examples(examples, pad_id)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        embeds = llm.get_input_embeddings()(batch["input_ids"].to(device))
        projected = [projector(v.to(device)) for v in visuals]
        embeds = splice_visual(embeds, projected, batch["image_starts"])
        return llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(device),
                   labels=batch["labels"].to(device)).loss


def run_phase(phase: Phase, llm, projector, tokenizer, examples: list[TokenizedConversation],
              visuals: list[torch.Tensor], cfg: InstructConfig, device: torch.device, log: _Log) -> None:
    """Train the parameters that require grad in `llm` and `projector` for `phase.steps` optimiser steps,
    resuming from <run>/checkpoints/<phase> when present."""
    params = _trainable(llm, projector)
    decay = [p for k, p in params.items() if p.ndim >= 2]
    no_decay = [p for k, p in params.items() if p.ndim < 2]  # biases and norms: no weight decay
    optimiser = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=phase.lr)
    folder = cfg.run_dir / "checkpoints" / phase.name
    step = 0
    if cfg.resume and checkpoints(folder):
        step = load_checkpoint(checkpoints(folder)[-1], params, optimiser)
        log(phase=phase.name, resumed_at=step)
    autocast = device.type == "cuda" and cfg.bf16
    warmup = min(cfg.warmup_steps, phase.steps // 10) if phase.name == "pretrain" else cfg.warmup_steps
    per_step = cfg.batch_size * cfg.grad_accum
    seed = cfg.seed * 1000 + (0 if phase.name == "pretrain" else 1)
    started = time.perf_counter()
    llm.train()
    projector.train()
    while step < phase.steps:
        lr = lr_at(step, phase.lr, phase.steps, warmup, cfg.warmup_start_lr, cfg.min_lr)
        for group in optimiser.param_groups:
            group["lr"] = lr
        optimiser.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            chosen = batch_indices(len(examples), seed, step * per_step + micro * cfg.batch_size, cfg.batch_size)
            loss = _batch_loss(llm, projector, [examples[i] for i in chosen], [visuals[i] for i in chosen],
                               tokenizer.pad_token_id, device, autocast) / cfg.grad_accum
            loss.backward()
            total += float(loss.detach())
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        optimiser.step()
        step += 1
        if step % cfg.log_every == 0 or step == phase.steps:
            log(phase=phase.name, step=step, steps=phase.steps, loss=total, lr=lr,
                elapsed_s=round(time.perf_counter() - started, 2))
        if step % cfg.checkpoint_every == 0 or step == phase.steps:
            save_checkpoint(folder, step, params, optimiser, cfg.keep_checkpoints)
    llm.eval()
    projector.eval()


# ---------------------------------------------------------------------------------------------------- train
def standardized_projector(rows: torch.Tensor, hidden: int, scale: float, slots: int = 0) -> VisualProjector:
    """Linear(d -> hidden) = random map (entries N(0, scale^2 / d)) of the per-dimension standardised rows [R, d];
    slot embeddings (if any) N(0, scale^2), so the slots are told apart from the first step."""
    mean, std = rows.mean(0), rows.std(0).clamp(min=1e-6)
    projector = VisualProjector(rows.shape[1], hidden, slots)
    with torch.no_grad():
        weight = torch.randn(hidden, rows.shape[1]) * (scale / math.sqrt(rows.shape[1])) / std
        projector.weight.copy_(weight)
        projector.bias.copy_(-weight @ mean)
        if slots:
            projector.slots.copy_(torch.randn(slots, hidden) * scale)
    return projector


def _load_llm(cfg: InstructConfig, records: list[Record], chat: ChatConfig):
    """(llm, tokenizer): a local folder (never remote code), or the tiny Qwen3 whose tokenizer learns the corpus."""
    if cfg.llm:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = cfg.path(cfg.llm)
        if not (folder / "config.json").is_file():
            raise PathflipError(f"llm = {folder} is not a Hugging Face causal-LM folder (config.json, "
                                "*.safetensors, tokenizer files with a chat template)")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        llm = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                   use_safetensors=True, dtype=torch.float32)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return llm, tokenizer
    from training.tiny_llm import TinyLLMConfig, build_tiny_llm

    texts = [chat.system_prompt, chat.caption_prompt, chat.choice_instruction]
    for record in records:
        for turn in record_turns(record, chat):
            texts.append(turn["content"])
    return build_tiny_llm(texts, TinyLLMConfig(**{"seed": cfg.seed, **cfg.tiny_llm}))


def train(cfg: InstructConfig) -> Path:
    """Run the configured phases and write the chat folder; returns its path."""
    from peft import LoraConfig, get_peft_model

    from napari_pathflip.model import PathFLIP

    device = resolve_device(cfg.device)
    log = _Log(cfg.run_dir / "log.jsonl")
    weights = cfg.path(cfg.weights)
    if not cfg.weights or not weights.is_dir():
        raise PathflipError(f"instruct config: weights = {weights} must be a PathFLIP weights folder")
    records = read_all_records([cfg.path(p) for p in cfg.records])
    pathflip = PathFLIP.from_pretrained(weights, device=device)
    chat = ChatConfig(**{**cfg.chat, "visual_dim": pathflip.config.embed_dim})
    started = time.perf_counter()
    rows = encode_slides(pathflip, cfg.path(cfg.features), [r.slide_id for r in records], cfg.patch_size_level0,
                         cfg.run_dir / VISUAL_CACHE, f"{WeightsFolder(weights).id}:{cfg.path(cfg.features)}",
                         chat.visual_layout)
    del pathflip
    log(event="encoded", slides=len(rows), seconds=round(time.perf_counter() - started, 1))
    visual = {k: cap_visual_tokens(v, chat.max_visual_tokens, chat.pooling, chat.leading_tokens)[0]
              for k, v in rows.items()}

    torch.manual_seed(cfg.seed)
    llm, tokenizer = _load_llm(cfg, records, chat)
    llm.to(device)
    embedding = llm.get_input_embeddings()
    if cfg.projector_init == "standardize":
        projector = standardized_projector(torch.cat(list(visual.values())), embedding.embedding_dim,
                                           float(embedding.weight.detach().float().std()), projector_slots(chat))
    else:
        projector = VisualProjector(chat.visual_dim, embedding.embedding_dim, projector_slots(chat))
    projector.to(device)
    conversations = [record_turns(r, chat) for r in records]
    visuals = [visual[r.slide_id] for r in records]
    rng = np.random.default_rng(cfg.seed)
    for record in [r for r in records if has_choice(r)] * cfg.choice_shuffles:
        conversations.append(record_turns(record, chat, rng))
        visuals.append(visual[record.slide_id])
    examples = [build_training_example(tokenizer, len(v), c, chat) for c, v in zip(conversations, visuals)]
    log(event="examples", conversations=len(examples), captions=sum(r.task == "caption" for r in records),
        vqa=sum(r.task == "vqa" for r in records), tokens_max=max(len(e) for e in examples))

    if cfg.pretrain != "none" and cfg.pretrain_steps:
        if cfg.pretrain == "text":
            text_examples = [build_training_example(tokenizer, 0, c, chat) for c in conversations]
            empty = [torch.zeros(0, chat.visual_dim)] * len(text_examples)
            projector.requires_grad_(False)
            run_phase(Phase("pretrain", cfg.pretrain_steps, cfg.pretrain_lr, False), llm, projector, tokenizer,
                      text_examples, empty, cfg, device, log)
            projector.requires_grad_(True)
        else:
            run_phase(Phase("pretrain", cfg.pretrain_steps, cfg.pretrain_lr, True), llm, projector, tokenizer,
                      examples, visuals, cfg, device, log)

    torch.manual_seed(cfg.seed + 1)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
    peft_llm = get_peft_model(llm, lora)
    run_phase(Phase("lora", cfg.steps, cfg.lr, True), peft_llm, projector, tokenizer, examples, visuals, cfg,
              device, log)
    folder = ChatEngine(peft_llm.eval(), tokenizer, chat, projector.eval()).save(
        cfg.chat_dir, include_llm=cfg.save_llm, dtype=getattr(torch, cfg.save_dtype))
    log(event="saved", chat=str(folder), seconds=round(time.perf_counter() - started, 1))
    return folder


# ------------------------------------------------------------------------------------------------ evaluation
def _write_predictions(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "response"])
        writer.writerows(rows)
    return path


def evaluate_chat(chat_dir: str | Path, weights_dir: str | Path, split_dir: str | Path, *,
                  features_dir: str | Path | None = None, out_dir: str | Path | None = None,
                  llm_dir: str | Path | None = None, max_slides: int | None = None, patch_size_level0: int = 0,
                  caption_tokens: int = 256, device: str = "auto", modes: tuple[str, ...] | None = None) -> dict:
    """Score a chat folder on a split folder (vqa.csv, captions.csv, features/<slide_id>.h5), greedy decoding, in
    each answer mode of `modes` (default: "visual" and "grounded", chat.ANSWER_MODES) side by side.

    Per mode (result["modes"][mode]; the top level repeats the chat config's own mode): VQA: `metrics.vqa_accuracy`
    (SlideBench rule, overall and per Broad Category, "vqa_by_type" per Narrow Category) on answers to the engine's
    own choice prompt with the chat config's choice_rule; when that is "rank", also "vqa_generate": the letter left
    to greedy decoding where the LLM answers; captions: `metrics.caption_metrics` (BLEU-1..4, ROUGE-L) of the answer
    to each caption row's question, and with truth/ the places they name (caption_place_metrics); with truth/ also
    the free-text, region, presence-agreement and citation figures of training.grounded_eval. Writes
    <out_dir>/vqa_predictions.csv and caption_predictions.csv of the config's mode (ID,response; the first is what
    `python -m training evaluate vqa --questions <split>/vqa.csv --predictions ...` scores), <mode>-... for the
    other. `max_slides` keeps the first slides of the split (quick checks). Returns a JSON-ready dict.
    """
    from napari_pathflip.chat import ANSWER_MODES, SlideEvidence, visual_tensor
    from napari_pathflip.features import read_h5
    from napari_pathflip.model import PathFLIP
    from napari_pathflip.report import EncodedSlide
    from training.grounded_eval import evaluate_free
    from training.sources import read_caption_csv, read_vqa_csv

    split_dir = Path(split_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(chat_dir) / "eval" / split_dir.name
    engine = ChatEngine.load(chat_dir, llm_dir=llm_dir, device=device, merge=True)
    own = engine.config.answers
    modes = tuple(modes or ANSWER_MODES)
    questions = read_vqa_csv(split_dir / "vqa.csv") if (split_dir / "vqa.csv").is_file() else []
    captions = read_caption_csv(split_dir / "captions.csv") if (split_dir / "captions.csv").is_file() else []
    if not questions and not captions:
        raise PathflipError(f"{split_dir} holds neither vqa.csv nor captions.csv")
    slides = list(dict.fromkeys(r.slide_id for r in [*questions, *captions]))[:max_slides]
    keep = set(slides)
    questions = [q for q in questions if q.slide_id in keep]
    captions = [c for c in captions if c.slide_id in keep]
    pathflip = PathFLIP.from_pretrained(weights_dir, device=resolve_device(device))
    started = time.perf_counter()
    features_dir = Path(features_dir or split_dir / "features")
    encodings = {}
    for slide_id in slides:
        fs = read_h5(features_dir / f"{slide_id}.h5", region_patches=pathflip.config.region_patches,
                     patch_size_level0=patch_size_level0 or None)
        encodings[slide_id] = pathflip.encode_slide(fs.features, fs.coords, fs.patch_size_level0, keep_features=False)
    rows = {k: visual_tensor(e, engine.config.visual_layout).cpu() for k, e in encodings.items()}
    result = {"split": str(split_dir), "slides": len(slides), "encode_s": round(time.perf_counter() - started, 1),
              "answers": own, "modes": {}}
    caption_settings = GenerationSettings(**{**asdict(engine.config.generation), "do_sample": False,
                                             "max_new_tokens": caption_tokens})
    choice_settings = GenerationSettings(**{**asdict(engine.config.generation), "do_sample": False,
                                            "max_new_tokens": 64})
    truth = [split_dir / "truth" / f"{c.slide_id}.npz" for c in captions]
    for mode in modes:
        engine.config.answers = mode
        evidence = ({k: SlideEvidence(EncodedSlide(pathflip, e)) for k, e in encodings.items()}
                    if mode == "grounded" else dict.fromkeys(encodings))
        started = time.perf_counter()
        vqa_rows, caption_rows, generated = [], [], []
        for q in questions:
            stem, options = choice_parts(q.turns[0][0])
            conversation = engine.conversation(rows[q.slide_id], evidence[q.slide_id])
            vqa_rows.append((q.id, conversation.ask_choice(stem, options, choice_settings).text))
            if engine.config.choice_rule == "rank":  # for comparison: the letter as greedy decoding writes it
                conversation = engine.conversation(rows[q.slide_id], evidence[q.slide_id])
                generated.append(conversation.ask_choice(stem, options, choice_settings, rule="generate").text)
        for c in captions:
            answer = engine.conversation(rows[c.slide_id], evidence[c.slide_id]).ask(c.turns[0][0], caption_settings)
            caption_rows.append((c.id, answer.text))
        scored = {"generate_s": round(time.perf_counter() - started, 1)}
        prefix = "" if mode == own else f"{mode}-"
        if questions:
            responses = dict(vqa_rows)
            answers, truths = [responses[q.id] for q in questions], [q.answer for q in questions]
            scored["vqa"] = metrics.vqa_accuracy(answers, truths, [q.category for q in questions])
            # by question type (SlideBench's Narrow Category; the synthetic "where is ..." questions are "Location")
            scored["vqa_by_type"] = metrics.vqa_accuracy(answers, truths,
                                                         [q.subcategory for q in questions])["by_category"]
            scored["vqa_predictions"] = str(_write_predictions(out_dir / f"{prefix}vqa_predictions.csv", vqa_rows))
            if generated:
                scored["vqa_generate"] = metrics.vqa_accuracy(generated, truths, [q.category for q in questions])
                scored["vqa_generate_by_type"] = metrics.vqa_accuracy(
                    generated, truths, [q.subcategory for q in questions])["by_category"]
        if captions:
            scored["captions"] = metrics.caption_metrics([t for _, t in caption_rows],
                                                         [c.turns[0][1] for c in captions])
            if all(t.is_file() for t in truth):
                scored["caption_places"] = caption_place_metrics([t for _, t in caption_rows], truth)
            scored["caption_predictions"] = str(_write_predictions(out_dir / f"{prefix}caption_predictions.csv",
                                                                   caption_rows))
        if (split_dir / "truth").is_dir():
            scored.update(evaluate_free(engine, pathflip, encodings, rows, split_dir, mode,
                                        evidence=evidence if mode == "grounded" else None, settings=choice_settings))
        result["modes"][mode] = scored
    engine.config.answers = own
    result.update(result["modes"].get(own, {}))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def caption_place_metrics(predictions: list[str], truth_files: list[Path]) -> dict:
    """Synthetic slides: how many of the places of their tumour nests, fat lobules, glands and lymphoid aggregates
    the generated captions name (training.synthetic.caption_places), and how many places they name wrongly."""
    from training.synthetic import Layout, caption_places, layout_places

    wanted = named = wrong = 0
    for text, path in zip(predictions, truth_files):
        with np.load(path, allow_pickle=False) as truth:
            places = layout_places(Layout.from_key(str(truth["layout"])))
        stated = caption_places(text)
        wanted, named, wrong = wanted + len(places), named + len(places & stated), wrong + len(stated - places)
    return {"places": wanted, "named": named, "recall": named / wanted if wanted else None, "wrong": wrong,
            "precision": named / (named + wrong) if named + wrong else None}


# -------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        parser = argparse.ArgumentParser(prog="python -m training instruct eval",
                                         description="score a chat folder on a split (VQA accuracy, captions)")
        parser.add_argument("--chat", required=True, help="chat folder (chat_config.json, projector, llm/, adapter/)")
        parser.add_argument("--weights", required=True, help="PathFLIP weights folder the chat was trained on")
        parser.add_argument("--split", required=True, help="split folder: vqa.csv, captions.csv, features/")
        parser.add_argument("--features", help="feature folder (default: SPLIT/features)")
        parser.add_argument("--llm", help="LLM folder when the chat folder has no llm/")
        parser.add_argument("--out", help="where the predictions CSVs go (default: CHAT/eval/<split name>)")
        parser.add_argument("--max-slides", type=int)
        parser.add_argument("--patch-size-level0", type=int, default=0)
        parser.add_argument("--device", default="auto")
        args = parser.parse_args(argv[1:])
        result = evaluate_chat(args.chat, args.weights, args.split, features_dir=args.features, out_dir=args.out,
                               llm_dir=args.llm, max_slides=args.max_slides,
                               patch_size_level0=args.patch_size_level0, device=args.device)
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    parser = argparse.ArgumentParser(prog="python -m training instruct", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="TOML file with InstructConfig keys")
    parser.add_argument("--out", help="run folder (overrides the config)")
    parser.add_argument("--steps", type=int, help="LoRA phase optimiser steps (overrides the config)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (overrides the config)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, out=args.out, steps=args.steps, device=args.device)
    if args.out:
        cfg.out = str(Path(args.out).resolve())
    folder = train(cfg)
    print(f"chat folder: {folder}")
    if cfg.evaluate:
        result = evaluate_chat(folder, cfg.path(cfg.weights), cfg.path(cfg.evaluate), device=cfg.device,
                               llm_dir=None if cfg.save_llm else cfg.path(cfg.llm))
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0
