"""Chat with a slide: PathFLIP visual tokens spliced into a local causal LM's chat prompt (paper eq. 11).

A chat model folder holds:

    chat_config.json        ChatConfig (visual dim, image placeholder, token cap and pooling rule, prompts,
                            generation defaults, system prompt)
    projector.safetensors   sigma of the paper: Linear(visual_dim -> LLM hidden), tensors "weight" and "bias"
                            (+ "slots" [10, hidden] for the "areas" visual layout)
    llm/                    a Hugging Face causal-LM folder (config.json, *.safetensors, tokenizer files with a chat
                            template); may instead be given separately (`llm_dir`, the CLI's --llm DIR)
    adapter/                optional peft LoRA folder (adapter_config.json + adapter_model.safetensors)

Visual input: any object with `slide_embedding` [d], `region_embeddings` [N, d] and `region_grid` [N, 2] (the
PathFLIP model's SlideEncoding), or rows already laid out as a [T, d] tensor. Layout (ChatConfig.visual_layout):
"regions" is the paper's [slide; region_1..region_N]; "areas" is [slide; 9 area tokens; regions], an area token being
the mean of the region embeddings in one ninth of the tissue (3 x 3 over the extent of the slide's regions, upper left
first, zeros where a ninth holds no tissue), and the projector adds a learned slot embedding to each of the first 10
tokens. Why: a pathologist asks *where* ("upper left", "lower right part"); in the paper's layout that is only the
order of a variable number of region tokens, which the demo chat never learned to read ("where" questions at
chance), while a slot of its own for each part of the section is the same for every slide.

Splice: the conversation is rendered as text with the tokenizer's own chat template; the image placeholder in the
first user turn is replaced by 1 + N positions whose input embeddings are the projected visual tokens. The text
before and after the placeholder is tokenised and kept (the public code dropped the text before it). Training uses
the same builder (`build_training_example`), so prompts at training and inference time are identical token for
token; labels are -100 everywhere except on answer tokens, and every answer ends with EOS.

Token cap: a slide with more regions than `max_visual_tokens` minus the slide (and area) tokens is reduced to exactly
that many region tokens by
`pooling` ("adaptive_avg": adaptive average pooling over the regions in their grid (row-major) order, so every
region still contributes; "top_norm": keep the regions with the largest embedding norm, in grid order). The slide
token is never pooled. Answers report it (`ChatAnswer.pooled`, `.notice`).

Decoding: one small loop for both paths. Plain path (CPU default): Hugging Face DynamicCache, eager. Fast path
(CUDA default): a StaticCache allocated once per engine and the one-token decode step compiled with
torch.compile(mode="reduce-overhead") (CUDA graphs); the prefill stays eager. Tokens are yielded one by one, so
streaming is a plain iterator and a cancel request is seen before the next token.

Multiple choice (`Conversation.stream_choice`, config `choice_rule`): "generate" (the default) leaves the letter
to greedy decoding. "rank" (the demo chat's) scores every option's answer "<letter>. <option>." (+ EOS) under the
model, given the prompt and the image (`ChatEngine.score_answers`: the prompt runs once, the options as one batch on
its KV cache; summed log-probability), starts the answer with the best option's answer and lets the model add a
reason. Why: a small model often knows an option's words better than its letter (the demo chat wrote "D. Fat." where
D read "One"; forced to start with "B." it went on with another option's words, hence the whole option answer as the
start). With the demo chat on the synthetic test split: 0.48 greedy, 0.62 ranked (another training run of the same
recipe: 0.38 -> 0.60; mean instead of summed log-probability: 0.61). Ranking suits a chat trained to restate the
option after its letter; for one trained on free reasons the summed score favours short options (tests/test_chat.py).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PathflipError

log = logging.getLogger(__name__)

CONFIG_NAME = "chat_config.json"
PROJECTOR_NAME = "projector.safetensors"
LLM_DIR = "llm"
ADAPTER_DIR = "adapter"
IGNORE_INDEX = -100  # label of every position that carries no loss (prompt, template, image, padding)
POOLING_RULES = ("adaptive_avg", "top_norm")
VISUAL_LAYOUTS = ("regions", "areas")
# the areas of the "areas" layout, in token order: how captions name the parts of a section
AREA_NAMES = ("upper left", "upper central", "upper right", "left", "central", "right", "lower left", "lower central",
              "lower right")
CHOICE_RULES = ("rank", "generate")  # how a multiple-choice answer's letter is chosen (module docstring)
# Stand-in for an assistant answer while the chat template renders, so answers never pass through the template and
# can be tokenised and labelled on their own.
_ANSWER_MARK = "<<pathflip-answer-{}>>"
_ANSWER_RE = re.compile(r"<<pathflip-answer-(\d+)>>")
_ANY_ANSWER = r"<<pathflip-answer-\d+>>"
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class GenerationSettings:
    """How an answer is decoded. Greedy by default (deterministic); sampling with temperature and nucleus top_p."""
    max_new_tokens: int = 256
    min_new_tokens: int = 0  # EOS is suppressed before this many tokens (benchmarks use it for fixed lengths)
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None  # fixes sampling; unused when greedy


@dataclass
class ChatConfig:
    """Everything about the chat model that is not a weight. Stored as chat_config.json."""
    visual_dim: int = 256  # d of the PathFLIP slide/region embeddings
    image_token: str = "<image>"  # placeholder in the first user turn that the visual tokens replace
    max_visual_tokens: int = 1025  # slide (+ area) tokens + at most this many minus those region tokens
    visual_layout: str = "regions"  # one of VISUAL_LAYOUTS (module docstring)
    pooling: str = "adaptive_avg"  # rule for slides over the cap, one of POOLING_RULES
    context_tokens: int = 4096  # budget for prompt + answer (also capped by the LLM's max_position_embeddings)
    system_prompt: str = ("You are PathFLIP, an assistant for pathologists. You are given an H&E whole-slide image "
                          "and answer questions about it concisely.")
    caption_prompt: str = "Describe this slide: give the diagnosis and the key pathological findings."
    choice_instruction: str = ("Answer with the letter of the correct option first, then a period, then a short "
                               "reason, for example: \"B. Because ...\".")
    # one of CHOICE_RULES. "rank" assumes the chat was trained to answer "<letter>. <option>." (the demo corpus;
    # training.instruct does so when a source gives no reason); a chat trained on free reasons should "generate"
    choice_rule: str = "generate"
    template_kwargs: dict = field(default_factory=lambda: {"enable_thinking": False})  # Qwen3: no <think> output
    # earlier question-answer pairs of a conversation the model is given with a new question (None: all). A chat
    # trained on single-turn conversations answers best from the slide and the question alone (0): the demo chat's
    # test VQA fell from 0.62 to 0.40 when its caption and earlier answers came first. The transcript keeps them all.
    history_turns: int | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def __post_init__(self):
        if isinstance(self.generation, Mapping):
            self.generation = GenerationSettings(**self.generation)
        if self.pooling not in POOLING_RULES:
            raise PathflipError(f"chat config: pooling must be one of {POOLING_RULES}, not {self.pooling!r}")
        if self.history_turns is not None and self.history_turns < 0:
            raise PathflipError("chat config: history_turns must be None (all) or >= 0")
        if self.choice_rule not in CHOICE_RULES:
            raise PathflipError(f"chat config: choice_rule must be one of {CHOICE_RULES}, not {self.choice_rule!r}")
        if self.visual_layout not in VISUAL_LAYOUTS:
            raise PathflipError(f"chat config: visual_layout must be one of {VISUAL_LAYOUTS}, not "
                                f"{self.visual_layout!r}")
        if self.max_visual_tokens < self.leading_tokens + 1:
            raise PathflipError(f"chat config: max_visual_tokens must be at least {self.leading_tokens + 1} (the "
                                "slide token, the area tokens of the \"areas\" layout and one region)")

    @property
    def leading_tokens(self) -> int:
        """Visual tokens before the regions (never pooled): the slide token, and the area tokens."""
        return 1 + len(AREA_NAMES) * (self.visual_layout == "areas")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ChatConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PathflipError(f"cannot read the chat config {path}: {exc}; "
                                "write it with ChatConfig().save()") from exc
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PathflipError(f"{path}: unknown chat config keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**data)


# ----------------------------------------------------------------------------------------------- visual tokens
@dataclass
class VisualTokens:
    """Projected visual tokens of one slide, ready to splice, and what the token cap did to them."""
    embeds: torch.Tensor  # [T, hidden] in the LLM's dtype, slide token first
    regions_in: int  # regions the slide had
    pooled: bool
    notice: str | None  # user-facing sentence when the cap changed the input

    def __len__(self) -> int:
        return self.embeds.shape[0]


def area_index(region_grid) -> torch.Tensor:
    """[N] long: the area (AREA_NAMES, row-major 3 x 3 over the extent of the slide's regions) of each region."""
    from .model.regions import region_positions

    cell = torch.from_numpy(region_positions(region_grid)).mul(3).long().clamp(max=2)  # (column, row)
    return cell[:, 1] * 3 + cell[:, 0]


def visual_tensor(visual, layout: str = "regions") -> torch.Tensor:
    """[T, d] float rows in `layout` (module docstring) from a SlideEncoding-like object, or a tensor/array taken
    as rows already in that layout (slide row first)."""
    if hasattr(visual, "slide_embedding") and hasattr(visual, "region_embeddings"):
        slide = torch.as_tensor(visual.slide_embedding).reshape(1, -1).float()
        regions = torch.as_tensor(visual.region_embeddings).reshape(-1, slide.shape[1]).float()
        parts = [slide, regions]
        if layout == "areas":
            if getattr(visual, "region_grid", None) is None:
                raise PathflipError("the \"areas\" visual layout needs each region's place (region_grid)")
            where = area_index(visual.region_grid)
            sums = torch.zeros(len(AREA_NAMES), regions.shape[1]).index_add_(0, where, regions)
            counts = torch.bincount(where, minlength=len(AREA_NAMES)).clamp(min=1)[:, None]
            parts.insert(1, sums / counts)
        visual = torch.cat(parts)
    visual = torch.as_tensor(visual)
    if visual.ndim != 2 or visual.shape[0] < 1:
        raise PathflipError(f"visual input must be [1 + regions, dim] (slide first), got shape {tuple(visual.shape)}")
    if not torch.isfinite(visual).all():
        raise PathflipError("the slide embeddings contain NaN or infinite values; re-encode the slide")
    return visual.float()


def cap_visual_tokens(visual: torch.Tensor, max_tokens: int, rule: str = "adaptive_avg",
                      leading: int = 1) -> tuple[torch.Tensor, bool]:
    """Keep the `leading` rows (slide, areas) and at most `max_tokens - leading` region rows (module docstring);
    returns (rows, pooled)."""
    slide, regions = visual[:leading], visual[leading:]
    keep = max_tokens - leading
    if regions.shape[0] <= keep:
        return visual, False
    if rule == "adaptive_avg":
        # adaptive pooling splits the row-major region sequence into `keep` nearly equal runs and averages each
        regions = F.adaptive_avg_pool1d(regions.T.unsqueeze(0), keep)[0].T
    elif rule == "top_norm":
        regions = regions[regions.norm(dim=1).topk(keep).indices.sort().values]
    else:
        raise PathflipError(f"unknown pooling rule {rule!r}; use one of {POOLING_RULES}")
    return torch.cat([slide, regions]), True


class VisualProjector(nn.Linear):
    """sigma of the paper: Linear(visual_dim -> LLM hidden), plus a learned embedding added to each of the first
    `slots` tokens (the slide and area tokens of the "areas" layout; none for "regions")."""

    def __init__(self, visual_dim: int, hidden: int, slots: int = 0):
        super().__init__(visual_dim, hidden)
        self.slots = nn.Parameter(torch.zeros(slots, hidden)) if slots else None

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        out = super().forward(rows)
        if self.slots is None:
            return out
        k = min(len(self.slots), out.shape[-2])
        return torch.cat([out[..., :k, :] + self.slots[:k].to(out.dtype), out[..., k:, :]], dim=-2)


def projector_slots(config: ChatConfig) -> int:
    return config.leading_tokens if config.visual_layout == "areas" else 0


# ------------------------------------------------------------------------------------------- prompt building
@dataclass
class TokenizedConversation:
    """Token ids and labels of one conversation; the visual tokens go to [image_start, image_start + visual_len)."""
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long, IGNORE_INDEX except on answer tokens and their EOS
    image_start: int
    visual_len: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def choice_options(options: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    """{letter: option} with empty options left out; a sequence is lettered A, B, C, ... in order."""
    if not isinstance(options, Mapping):
        options = {chr(ord("A") + i): text for i, text in enumerate(options)}
    return {letter: str(text).strip() for letter, text in options.items() if str(text).strip()}


def option_answer(letter: str, option: str) -> str:
    """"B. Option text." - a multiple-choice answer that restates its option (how the demo corpus writes them)."""
    return f"{letter}. {option.strip().rstrip('.')}."


def option_shares(scores: Mapping[str, float]) -> dict[str, float]:
    """Each option's share of the probability the model gives the options' answers (softmax of the summed
    log-probabilities in ChatAnswer.option_scores): how sure the ranking is, not a calibrated probability."""
    values = torch.softmax(torch.tensor(list(scores.values()), dtype=torch.float64), 0)
    return dict(zip(scores, values.tolist()))


def ranking_note(scores: Mapping[str, float], separator: str = " · ") -> str:
    """"options as the model ranks them: B 94% · D 6% ..." - the shares of `option_shares`, largest first (what the
    dock shows under a ranked answer and the CLI prints after it)."""
    shares = sorted(option_shares(scores).items(), key=lambda item: -item[1])
    return "options as the model ranks them: " + separator.join(f"{k} {v:.0%}" for k, v in shares)


def format_choice_prompt(question: str, options: Mapping[str, str] | Sequence[str], instruction: str) -> str:
    """Multiple-choice prompt: question, one "A. option" line per option, then the answer-format instruction."""
    options = choice_options(options)
    if not question.strip() or not options:
        raise PathflipError("a multiple-choice question needs a question and at least one non-empty option")
    lines = [question.strip()] + [f"{letter}. {text}" for letter, text in options.items()] + [instruction]
    return "\n".join(lines)


def _normalise_turns(turns: Sequence[Mapping], config: ChatConfig) -> list[dict]:
    """role/content dicts (LLaVA's from/value accepted), system prompt first, image placeholder in user turn 1."""
    messages = []
    for turn in turns:
        role = _ROLES.get(str(turn.get("role", turn.get("from", ""))).lower())
        content = turn.get("content", turn.get("value"))
        if role is None or not isinstance(content, str):
            raise PathflipError(f"a conversation turn needs a role (user/assistant/system) and text content: {turn!r}")
        messages.append({"role": role, "content": content})
    if config.system_prompt and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": config.system_prompt})
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise PathflipError("the conversation has no user turn")
    placeholders = sum(m["content"].count(config.image_token) for m in messages)
    if placeholders == 0:  # the image comes once, at the start of the first user turn
        users[0]["content"] = f"{config.image_token}\n{users[0]['content']}"
    elif placeholders > 1 or config.image_token not in users[0]["content"]:
        raise PathflipError(f"the image placeholder {config.image_token!r} may appear once, in the first user turn")
    return messages


def _image_filler_id(tokenizer, image_token: str) -> int:
    """Id stored at image positions (their embeddings are replaced, so it only keeps input_ids readable): the
    placeholder's own id when it is one token of the vocabulary, else the pad (or EOS) id."""
    own = tokenizer.convert_tokens_to_ids(image_token)
    if isinstance(own, int) and own != tokenizer.unk_token_id:
        return own
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)


def tokenize_conversation(tokenizer, visual_len: int, turns: Sequence[Mapping], config: ChatConfig | None = None,
                          add_generation_prompt: bool = False) -> TokenizedConversation:
    """Render `turns` with the chat template, splice `visual_len` image positions, label the answers.

    Assistant contents are replaced by markers before rendering, so the template's text (role headers, Qwen3's empty
    think block, ...) is kept exactly and masked, while each answer is tokenised on its own, supervised, and ends
    with EOS: the template's EOS right after the answer is taken as the answer's EOS, otherwise EOS is appended.
    """
    config = config or ChatConfig()
    if getattr(tokenizer, "chat_template", None) is None:
        raise PathflipError("the LLM's tokenizer has no chat template: put one in the llm folder "
                            "(tokenizer_config.json 'chat_template' or chat_template.jinja)")
    if tokenizer.eos_token_id is None:
        raise PathflipError("the LLM's tokenizer has no EOS token; set eos_token in tokenizer_config.json")
    messages = _normalise_turns(turns, config)
    answers = []
    for message in messages:
        if message["role"] == "assistant":
            answers.append(message["content"].strip())
            message["content"] = _ANSWER_MARK.format(len(answers) - 1)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **config.template_kwargs)
    filler = _image_filler_id(tokenizer, config.image_token)
    eos_text, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    image_start, after_answer = None, False
    for part in re.split(f"({re.escape(config.image_token)}|{_ANY_ANSWER})", text):
        if part == config.image_token:
            image_start = len(ids)
            ids += [filler] * visual_len
            labels += [IGNORE_INDEX] * visual_len
            after_answer = False
        elif mark := _ANSWER_RE.fullmatch(part):
            answer = tokenizer.encode(answers[int(mark[1])], add_special_tokens=False)
            answer.append(eos_id)
            ids += answer
            labels += answer
            after_answer = True
        else:
            if after_answer and part.startswith(eos_text):
                part = part[len(eos_text):]  # already added as the answer's supervised EOS
            after_answer = False
            if part:
                piece = tokenizer.encode(part, add_special_tokens=False)
                ids += piece
                labels += [IGNORE_INDEX] * len(piece)
    if image_start is None:
        raise PathflipError(f"the chat template dropped the image placeholder {config.image_token!r}")
    return TokenizedConversation(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                                 image_start, visual_len)


def build_training_example(tokenizer, visual_len: int, turns: Sequence[Mapping],
                           config: ChatConfig | None = None) -> TokenizedConversation:
    """One instruction-tuning example: loss only on the answer tokens (each ending with EOS)."""
    example = tokenize_conversation(tokenizer, visual_len, turns, config, add_generation_prompt=False)
    if not (example.labels != IGNORE_INDEX).any():
        raise PathflipError("a training conversation needs at least one assistant answer")
    return example


def collate_training_examples(examples: Sequence[TokenizedConversation], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, labels (IGNORE_INDEX on padding), attention_mask, image_starts, visual_lens."""
    length = max(len(e) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), length), pad_token_id, dtype=torch.long),
        "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
    }
    for row, example in enumerate(examples):
        batch["input_ids"][row, :len(example)] = example.input_ids
        batch["labels"][row, :len(example)] = example.labels
        batch["attention_mask"][row, :len(example)] = 1
    batch["image_starts"] = torch.tensor([e.image_start for e in examples], dtype=torch.long)
    batch["visual_lens"] = torch.tensor([e.visual_len for e in examples], dtype=torch.long)
    return batch


def splice_visual(token_embeds: torch.Tensor, visual_embeds: Sequence[torch.Tensor],
                  image_starts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Copy of `token_embeds` [B, L, H] with rows image_start .. + T of each sample set to its visual tokens [T, H]
    (differentiable with respect to both, so training reaches the projector through it)."""
    out = token_embeds.clone()
    for row, (visual, start) in enumerate(zip(visual_embeds, image_starts)):
        start = int(start)
        out[row, start:start + visual.shape[0]] = visual.to(out.dtype)
    return out


# ------------------------------------------------------------------------------------------------- decoding
class _PlainDecoder:
    """Eager decoding with a DynamicCache (the CPU path, and the reference for the fast path)."""

    def __init__(self, llm):
        self.llm = llm

    def prefill(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.llm.config)
        return self.llm(inputs_embeds=inputs_embeds, past_key_values=self.cache, use_cache=True,
                        logits_to_keep=1).logits[:, -1]

    def step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        return self.llm(input_ids=token.view(1, 1), past_key_values=self.cache, use_cache=True).logits[:, -1]


class _StaticDecoder:
    """Fast path: one StaticCache of `max_len` tokens for the engine's lifetime (fixed addresses, as CUDA graphs
    need); the one-token step is compiled with mode="reduce-overhead" when `compile` (CUDA). Without `compile` it is
    the same loop in eager mode, which is how it is tested on CPU."""

    def __init__(self, llm, max_len: int, compile: bool):
        from transformers import StaticCache

        self.llm = llm
        self.cache = StaticCache(config=llm.config, max_cache_len=max_len)
        self.compiled = compile
        self._step = torch.compile(self._forward, mode="reduce-overhead", fullgraph=True) if compile else self._forward

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.llm(input_ids=input_ids, position_ids=position_ids, past_key_values=self.cache,
                        use_cache=True).logits[:, -1]

    def prefill(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        self.cache.reset()
        return self.llm(inputs_embeds=inputs_embeds, past_key_values=self.cache, use_cache=True,
                        logits_to_keep=1).logits[:, -1]

    def step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        position_ids = torch.full((1, 1), position, dtype=torch.long, device=token.device)
        if not self.compiled:
            return self._forward(token.view(1, 1), position_ids)
        torch.compiler.cudagraph_mark_step_begin()
        try:
            return self._step(token.view(1, 1), position_ids).clone()
        except Exception as exc:  # e.g. no triton/compiler on this machine: keep answering, just slower
            log.warning("compiled decode step failed (%s); continuing with the eager static-cache step", exc)
            self.compiled = False
            return self._forward(token.view(1, 1), position_ids)


def _next_token(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax, or a sample after temperature and top-p (the transformers logits warpers)."""
    if not settings.do_sample:
        return logits.argmax(-1)
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(max(settings.temperature, 1e-5))(None, logits.float())
    if settings.top_p < 1.0:
        scores = TopPLogitsWarper(settings.top_p)(None, scores)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]


@dataclass
class ChatAnswer:
    """One finished (or cancelled) answer."""
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "length" (max_new_tokens or context full) or "cancelled"
    prompt_tokens: int
    visual_tokens: int
    pooled: bool  # the token cap pooled the slide's regions
    notice: str | None  # user-facing note (pooling, answer cut by the context)
    first_token_s: float | None  # seconds from the start of generation (after any option scoring) to the first piece
    decode_tokens_per_s: float | None  # tokens after the first one per second
    # multiple choice ranked (choice_rule "rank"): summed log-probability of each option's answer, by letter
    option_scores: dict[str, float] | None = None


class AnswerStream:
    """Iterator over the text pieces of one answer as they are decoded; `cancel()` stops it before the next token
    (safe from another thread). After iteration, `answer` holds the ChatAnswer; `result()` drains and returns it."""

    def __init__(self, engine: ChatEngine, prompt: TokenizedConversation, visual: VisualTokens,
                 settings: GenerationSettings, max_new_tokens: int, notice: str | None,
                 cancel: threading.Event | None = None, on_done: Callable[[ChatAnswer], None] | None = None,
                 prefix_ids: Sequence[int] = (), option_scores: dict[str, float] | None = None):
        self.engine, self.prompt, self.visual, self.settings = engine, prompt, visual, settings
        self.max_new_tokens, self.notice, self.on_done = max_new_tokens, notice, on_done
        # the answer's forced start (a ranked choice's "B. Necrosis."): part of the prefill, the first piece
        self.prefix_ids, self.option_scores = list(prefix_ids), option_scores
        self.cancel_event = cancel or threading.Event()
        self.answer: ChatAnswer | None = None
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def cancel(self) -> None:
        self.cancel_event.set()

    def result(self) -> ChatAnswer:
        for _ in self:
            pass
        return self.answer

    def _run(self) -> Iterator[str]:
        engine, settings = self.engine, self.settings
        if not engine._busy.acquire(blocking=False):
            raise PathflipError("another answer is still being generated: cancel it or wait for it to finish")
        started = time.perf_counter()
        ids, forced = list(self.prefix_ids), len(self.prefix_ids)
        text, finish, first_at, last_at = "", "length", None, None
        try:
            # no_grad around each model call, never across a yield: grad mode is thread-wide state and would leak
            # into the consumer's code between pieces. (no_grad rather than inference_mode: it is what the
            # compiled static-cache path of transformers is exercised with.)
            prompt_ids = torch.cat([self.prompt.input_ids, torch.tensor(ids, dtype=torch.long)])
            with torch.no_grad():
                embeds = splice_visual(engine.embed_tokens(prompt_ids.to(engine.device)[None]),
                                       [self.visual.embeds], [self.prompt.image_start])
                decoder = engine._decoder()
                logits = decoder.prefill(embeds)
            if ids:
                text = engine.tokenizer.decode(ids, skip_special_tokens=True)
                first_at = time.perf_counter()
                yield text
            generator = None
            if settings.do_sample and settings.seed is not None:
                generator = torch.Generator(device=engine.device).manual_seed(settings.seed)
            position = len(prompt_ids)
            for step in range(self.max_new_tokens - forced):
                if self.cancel_event.is_set():
                    finish = "cancelled"
                    break
                with torch.no_grad():
                    if step < settings.min_new_tokens:
                        logits[:, engine.eos_ids] = float("-inf")
                    token = _next_token(logits, settings, generator)
                token_id = int(token)
                last_at = time.perf_counter()
                first_at = first_at or last_at
                if token_id in engine.eos_ids:
                    finish = "eos"
                    break
                ids.append(token_id)
                # Yield only complete characters: a byte-level token can end inside a UTF-8 sequence.
                decoded = engine.tokenizer.decode(ids, skip_special_tokens=True)
                if len(decoded) > len(text) and decoded.startswith(text) and not decoded.endswith("\ufffd"):
                    piece, text = decoded[len(text):], decoded
                    yield piece
                if step + 1 < self.max_new_tokens - forced:
                    with torch.no_grad():
                        logits = decoder.step(token, position)
                    position += 1
            decoded = engine.tokenizer.decode(ids, skip_special_tokens=True)
            if len(decoded) > len(text) and decoded.startswith(text):
                piece, text = decoded[len(text):], decoded
                yield piece
        finally:
            engine._busy.release()
            # forced tokens come with the prefill: the rate counts decoded tokens after the first piece
            eos = finish == "eos"
            decoded_after_first = len(ids) - forced + eos if forced else len(ids) - (not eos)
            self.answer = ChatAnswer(
                text=text, token_ids=ids, finish_reason=finish, prompt_tokens=len(self.prompt),
                visual_tokens=len(self.visual), pooled=self.visual.pooled, notice=self.notice,
                first_token_s=None if first_at is None else first_at - started,
                decode_tokens_per_s=(decoded_after_first / (last_at - first_at)
                                     if first_at and last_at and last_at > first_at and decoded_after_first > 0
                                     else None),
                option_scores=self.option_scores)
        if self.on_done is not None:
            self.on_done(self.answer)


# ----------------------------------------------------------------------------------------------------- engine
def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_llm_dir(llm_dir: Path) -> None:
    what = (f"{llm_dir} must be a Hugging Face causal-LM folder: config.json, model.safetensors (or a sharded "
            "model.safetensors.index.json), tokenizer.json/tokenizer_config.json with a chat template")
    if not llm_dir.is_dir():
        raise PathflipError(f"LLM folder not found. {what}; give it with --llm DIR or put it in the chat folder "
                            "as llm/")
    if not (llm_dir / "config.json").is_file():
        raise PathflipError(f"config.json missing. {what}")
    if not any(llm_dir.glob("*.safetensors")):
        pickles = [p.name for p in llm_dir.glob("*.bin")]
        hint = (f" (found pickle weights {pickles}: convert them to safetensors; pickles are never loaded)"
                if pickles else "")
        raise PathflipError(f"no .safetensors weights{hint}. {what}")
    if not ((llm_dir / "tokenizer.json").is_file() or (llm_dir / "tokenizer_config.json").is_file()):
        raise PathflipError(f"tokenizer files missing. {what}")


class ChatEngine:
    """Projector + causal LM + tokenizer + ChatConfig: turns a slide's visual tokens and a conversation into answers.

    `fast=None` picks the fast path (static cache + compiled decode step) on CUDA and the plain path elsewhere;
    `fast=True` on CPU runs the static-cache loop without compiling. One answer is generated at a time per engine.
    """

    def __init__(self, llm, tokenizer, config: ChatConfig | None = None, projector: VisualProjector | None = None,
                 fast: bool | None = None):
        self.config = config or ChatConfig()
        self.llm = llm.eval()
        self.tokenizer = tokenizer
        hidden = llm.get_input_embeddings().embedding_dim
        param = next(llm.parameters())
        self.device, self.dtype = param.device, param.dtype
        if projector is None:
            projector = VisualProjector(self.config.visual_dim, hidden, projector_slots(self.config))
        slots = 0 if getattr(projector, "slots", None) is None else len(projector.slots)
        if slots != projector_slots(self.config):
            raise PathflipError(f"the projector has {slots} slot embeddings but the visual layout "
                                f"{self.config.visual_layout!r} needs {projector_slots(self.config)}: "
                                "projector.safetensors and chat_config.json belong to different chat models")
        if (projector.in_features, projector.out_features) != (self.config.visual_dim, hidden):
            raise PathflipError(
                f"the projector maps {projector.in_features} -> {projector.out_features} but the visual dim is "
                f"{self.config.visual_dim} and the LLM's hidden size {hidden}: the projector belongs to another "
                "PathFLIP model or LLM; use the matching chat folder or --llm")
        self.projector = projector.to(self.device, self.dtype).eval()
        self.fast = self.device.type == "cuda" if fast is None else bool(fast)
        self.context_tokens = min(self.config.context_tokens,
                                  getattr(llm.config, "max_position_embeddings", None) or self.config.context_tokens)
        eos = {tokenizer.eos_token_id}
        generation_eos = getattr(getattr(llm, "generation_config", None), "eos_token_id", None)
        eos.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        self.eos_ids = sorted(i for i in eos if i is not None)
        self._busy = threading.Lock()
        self._static: _StaticDecoder | None = None

    # -------------------------------------------------------------------------------------------- folders
    @classmethod
    def load(cls, folder: str | Path, *, llm_dir: str | Path | None = None, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None, merge: bool = False, fast: bool | None = None) -> ChatEngine:
        """Load a chat model folder (see the module docstring); `llm_dir` overrides folder/llm; `merge` folds the
        LoRA adapter into the weights (faster inference, same answers)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder)
        layout = (f"a chat model folder holds {CONFIG_NAME}, {PROJECTOR_NAME}, {LLM_DIR}/ (a Hugging Face causal-LM "
                  f"folder, or give it with --llm DIR) and optionally {ADAPTER_DIR}/ (a peft LoRA folder)")
        if not folder.is_dir():
            raise PathflipError(f"chat model folder {folder} not found: {layout}")
        for name in (CONFIG_NAME, PROJECTOR_NAME):
            if not (folder / name).is_file():
                raise PathflipError(f"{folder} has no {name}: {layout}")
        config = ChatConfig.load(folder / CONFIG_NAME)
        llm_dir = Path(llm_dir) if llm_dir is not None else folder / LLM_DIR
        _check_llm_dir(llm_dir)
        device = torch.device(device) if device is not None else _default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        try:
            tokenizer = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True, trust_remote_code=False)
            llm = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True, trust_remote_code=False,
                                                       use_safetensors=True, dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise PathflipError(f"cannot load the LLM from {llm_dir}: {exc}") from exc
        adapter = folder / ADAPTER_DIR
        if adapter.is_dir():
            from peft import PeftModel

            if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
                raise PathflipError(f"{adapter} must hold adapter_config.json and adapter_model.safetensors "
                                    "(a peft LoRA folder saved with save_pretrained); remove it to run without LoRA")
            llm = PeftModel.from_pretrained(llm, adapter, is_trainable=False)
            if merge:
                llm = llm.merge_and_unload()
        state = load_file(folder / PROJECTOR_NAME)
        if not {"weight", "bias"} <= set(state) <= {"weight", "bias", "slots"}:
            raise PathflipError(f"{folder / PROJECTOR_NAME} must hold the tensors 'weight' and 'bias' (and 'slots' "
                                "for the \"areas\" visual layout)")
        projector = VisualProjector(state["weight"].shape[1], state["weight"].shape[0],
                                    len(state["slots"]) if "slots" in state else 0)
        projector.load_state_dict(state)
        return cls(llm.to(device), tokenizer, config, projector, fast=fast)

    def save(self, folder: str | Path, include_llm: bool = True, dtype: torch.dtype | None = None) -> Path:
        """Write the chat model folder. A peft-wrapped LLM is saved as base weights in llm/ plus adapter/. `dtype`
        (e.g. torch.float16) stores the LLM's and the adapter's floating-point weights in that type (half the bytes;
        loading casts them to the engine's dtype); the projector stays float32."""
        from safetensors.torch import load_file, save_file

        cast = (lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder / CONFIG_NAME)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.projector.state_dict().items()},
                  folder / PROJECTOR_NAME)
        base = self.llm
        if hasattr(self.llm, "peft_config"):
            self.llm.save_pretrained(folder / ADAPTER_DIR)
            # peft writes target_modules in set order (it changes with PYTHONHASHSEED): sort it, so a rerun writes
            # the same bytes
            config = folder / ADAPTER_DIR / "adapter_config.json"
            data = json.loads(config.read_text())
            if isinstance(data.get("target_modules"), list):
                data["target_modules"] = sorted(data["target_modules"])
                config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            if dtype is not None:
                adapter = folder / ADAPTER_DIR / "adapter_model.safetensors"
                save_file({k: cast(v).contiguous() for k, v in load_file(adapter).items()}, adapter)
            base = self.llm.get_base_model()
        # the base model may still carry the LoRA wrappers: save the original weights under their original names
        base_state = {k.replace(".base_layer.", "."): cast(v.detach()) for k, v in base.state_dict().items()
                      if "lora_" not in k}
        if include_llm:
            base.save_pretrained(folder / LLM_DIR, state_dict=base_state)
            self.tokenizer.save_pretrained(folder / LLM_DIR)
        return folder

    # ------------------------------------------------------------------------------------------ building
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(input_ids)

    def encode_visual(self, visual) -> VisualTokens:
        """Validate, cap (config.max_visual_tokens, config.pooling) and project a slide's [slide; regions] rows."""
        if isinstance(visual, VisualTokens):
            return visual
        rows = visual_tensor(visual, self.config.visual_layout)
        if rows.shape[1] != self.config.visual_dim:
            raise PathflipError(f"the slide embeddings are {rows.shape[1]}-d but this chat model expects "
                                f"{self.config.visual_dim}-d: use the chat weights trained with this PathFLIP model")
        leading = self.config.leading_tokens
        capped, pooled = cap_visual_tokens(rows, self.config.max_visual_tokens, self.config.pooling, leading)
        notice = None
        if pooled:
            notice = (f"This slide has {rows.shape[0] - leading:,} regions; they were pooled to "
                      f"{capped.shape[0] - leading:,} region tokens ({self.config.pooling}) to fit the chat model.")
        with torch.no_grad():
            embeds = self.projector(capped.to(self.device, self.dtype))
        return VisualTokens(embeds, rows.shape[0] - leading, pooled, notice)

    def _decoder(self):
        if not self.fast:
            return _PlainDecoder(self.llm)
        if self._static is None:
            self._static = _StaticDecoder(self.llm, self.context_tokens, compile=self.device.type == "cuda")
        return self._static

    # ---------------------------------------------------------------------------------------- answering
    def _prompt(self, visual, turns: Sequence[Mapping]) -> tuple[VisualTokens, TokenizedConversation]:
        """(visual tokens, generation prompt) for answering the last (user) turn of `turns`."""
        if not turns or str(turns[-1].get("role", turns[-1].get("from", ""))).lower() not in ("user", "human"):
            raise PathflipError("the conversation must end with a user turn to answer")
        last = turns[-1].get("content", turns[-1].get("value", ""))
        if not isinstance(last, str) or not last.strip():
            raise PathflipError("the question is empty: type a question about the slide")
        visual = self.encode_visual(visual)
        prompt = tokenize_conversation(self.tokenizer, len(visual), turns, self.config, add_generation_prompt=True)
        if len(prompt) >= self.context_tokens:
            raise PathflipError(
                f"the input needs {len(prompt):,} tokens ({len(visual):,} visual + {len(prompt) - len(visual):,} "
                f"text) but the chat model's context holds {self.context_tokens:,}: shorten the question, start a "
                f"new conversation, or lower max_visual_tokens in {CONFIG_NAME}")
        return visual, prompt

    def stream(self, visual, turns: Sequence[Mapping], settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None, on_done: Callable[[ChatAnswer], None] | None = None,
               prefix: str = "", option_scores: dict[str, float] | None = None) -> AnswerStream:
        """Answer the last (user) turn of `turns` about `visual`; iterate the result for text pieces. `prefix`: the
        answer's forced start (counted in max_new_tokens), e.g. a ranked choice's "B. Necrosis."."""
        settings = settings or self.config.generation
        visual, prompt = self._prompt(visual, turns)
        room = self.context_tokens - len(prompt)
        notice = visual.notice
        max_new = settings.max_new_tokens
        if room < max_new:
            max_new = room
            notice = " ".join(filter(None, [notice, f"Only {room} tokens of context are left for the answer."]))
        prefix_ids = self.tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
        return AnswerStream(self, prompt, visual, settings, max_new, notice, cancel, on_done, prefix_ids,
                            option_scores)

    def score_answers(self, visual, turns: Sequence[Mapping], answers: Sequence[str]) -> list[float]:
        """Summed log-probability of each of `answers` (its tokens, then EOS) as the reply to the last user turn of
        `turns`, after the prompt exactly as `stream` builds it. The prompt is run once; its KV cache is repeated
        for the answers, which run as one right-padded batch (causal attention needs no mask for end padding)."""
        visual, prompt = self._prompt(visual, turns)
        eos = self.tokenizer.eos_token_id  # the EOS every trained answer ends with (tokenize_conversation)
        tails = [self.tokenizer.encode(a.strip(), add_special_tokens=False) + [eos] for a in answers]
        if not answers or min(map(len, tails)) < 2:
            raise PathflipError("give at least one non-empty answer to score")
        longest = max(map(len, tails))
        if len(prompt) + longest > self.context_tokens:
            raise PathflipError(f"the question and its longest option need {len(prompt) + longest:,} tokens but the "
                                f"chat model's context holds {self.context_tokens:,}: shorten the options or start a "
                                "new conversation")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        ids = torch.full((len(tails), longest), pad, dtype=torch.long)
        for row, tail in enumerate(tails):
            ids[row, :len(tail)] = torch.tensor(tail)
        if not self._busy.acquire(blocking=False):
            raise PathflipError("another answer is still being generated: cancel it or wait for it to finish")
        try:
            with torch.no_grad():
                embeds = splice_visual(self.embed_tokens(prompt.input_ids.to(self.device)[None]), [visual.embeds],
                                       [prompt.image_start])
                decoder = _PlainDecoder(self.llm)
                first = decoder.prefill(embeds)[:, None]  # predicts each answer's first token
                decoder.cache.batch_repeat_interleave(len(tails))
                rest = self.llm(input_ids=ids[:, :-1].to(self.device), past_key_values=decoder.cache,
                                use_cache=True).logits
                logits = torch.cat([first.expand(len(tails), -1, -1), rest], 1).float()
        finally:
            self._busy.release()
        logp = logits.log_softmax(-1).cpu()
        return [float(logp[row, torch.arange(len(tail)), torch.tensor(tail)].sum()) for row, tail in enumerate(tails)]

    def generate(self, visual, turns: Sequence[Mapping], settings: GenerationSettings | None = None,
                 cancel: threading.Event | None = None) -> ChatAnswer:
        return self.stream(visual, turns, settings, cancel).result()

    def conversation(self, visual) -> Conversation:
        return Conversation(self, visual)

    def warmup(self, visual_len: int = 64, new_tokens: int = 8) -> None:
        """Run one short answer so the fast path compiles and captures its CUDA graph before the user asks."""
        visual = torch.zeros(visual_len, self.config.visual_dim)
        settings = GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        self.generate(visual, [{"role": "user", "content": "warm up"}], settings)


class Conversation:
    """A multi-turn chat about one slide: the image is given once, in the first user turn; answered turns are kept
    in `history` (cancelled answers are not)."""

    def __init__(self, engine: ChatEngine, visual):
        self.engine = engine
        self.visual = engine.encode_visual(visual)
        self.history: list[dict] = []
        self._current: AnswerStream | None = None

    @property
    def notice(self) -> str | None:
        return self.visual.notice

    def context(self) -> list[dict]:
        """The earlier turns a new question is asked with: the last config.history_turns exchanges of `history`."""
        keep = self.engine.config.history_turns
        if keep is None:
            return list(self.history)
        return self.history[-2 * keep:] if keep else []

    def stream(self, question: str, settings: GenerationSettings | None = None, *, prefix: str = "",
               option_scores: dict[str, float] | None = None) -> AnswerStream:
        question = (question or "").strip()
        if not question:
            raise PathflipError("the question is empty: type a question about the slide")
        turns = self.context() + [{"role": "user", "content": question}]

        def remember(answer: ChatAnswer) -> None:
            if answer.finish_reason != "cancelled":
                self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer.text}]

        self._current = self.engine.stream(self.visual, turns, settings, on_done=remember, prefix=prefix,
                                           option_scores=option_scores)
        return self._current

    def ask(self, question: str, settings: GenerationSettings | None = None) -> ChatAnswer:
        return self.stream(question, settings).result()

    def describe(self, settings: GenerationSettings | None = None) -> ChatAnswer:
        """Caption the slide (config.caption_prompt)."""
        return self.ask(self.engine.config.caption_prompt, settings)

    def choice_prompt(self, question: str, options: Mapping[str, str] | Sequence[str]) -> str:
        return format_choice_prompt(question, options, self.engine.config.choice_instruction)

    def stream_choice(self, question: str, options: Mapping[str, str] | Sequence[str],
                      settings: GenerationSettings | None = None, rule: str | None = None) -> AnswerStream:
        """Multiple-choice VQA, streamed: the answer starts with the option letter and a period ("B. ..."). With
        config.choice_rule "rank" the answer starts with `option_answer(letter, option)` of the option the model
        scores highest (module docstring; the scores land in ChatAnswer.option_scores) and the model may add a
        reason after it; with "generate" the model writes the letter and the rest itself. `rule` overrides the
        config's choice_rule."""
        rule = rule or self.engine.config.choice_rule
        if rule not in CHOICE_RULES:
            raise PathflipError(f"choice rule must be one of {CHOICE_RULES}, not {rule!r}")
        prompt = self.choice_prompt(question, options)
        if rule == "generate":
            return self.stream(prompt, settings)
        options = choice_options(options)
        turns = self.context() + [{"role": "user", "content": prompt}]
        scores = self.engine.score_answers(self.visual, turns, [option_answer(k, v) for k, v in options.items()])
        ranked = dict(zip(options, scores))
        best = max(ranked, key=ranked.get)
        return self.stream(prompt, settings, prefix=option_answer(best, options[best]), option_scores=ranked)

    def ask_choice(self, question: str, options: Mapping[str, str] | Sequence[str],
                   settings: GenerationSettings | None = None, rule: str | None = None) -> ChatAnswer:
        """`stream_choice`, drained."""
        return self.stream_choice(question, options, settings, rule).result()

    def cancel(self) -> None:
        if self._current is not None:
            self._current.cancel()

    def reset(self) -> None:
        self.history.clear()
