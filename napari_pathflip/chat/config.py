"""ChatConfig (chat_config.json): everything about a chat model that is not a weight, and its checks."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import PathflipError

IMAGE_TOKEN = "<image>"  # the default placeholder the visual tokens replace
POOLING_RULES = ("adaptive_avg", "top_norm")  # how a slide over the token cap is reduced (visual.cap_visual_tokens)
VISUAL_LAYOUTS = ("regions", "areas")  # which visual tokens a slide becomes (visual.visual_tensor)
CHOICE_RULES = ("rank", "generate")  # how a multiple-choice answer's letter is chosen (conversation.py)
ANSWER_MODES = ("grounded", "visual")  # answers from the slide's evidence where it decides, or the LLM's alone


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
    image_token: str = IMAGE_TOKEN  # placeholder in the first user turn that the visual tokens replace
    max_visual_tokens: int = 1025  # slide (+ area) tokens + at most this many minus those region tokens
    visual_layout: str = "regions"  # one of VISUAL_LAYOUTS (package docstring)
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
    # trained on single-turn conversations answers best from the slide and the question alone (0). The transcript
    # keeps them all.
    history_turns: int | None = None
    # one of ANSWER_MODES: "grounded" answers presence, where, how many, how large and what-is-here questions from
    # the slide's PathFLIP evidence and checks descriptions against it, with citations (grounded.py); "visual" is
    # the paper's chat, every answer from the visual tokens
    answers: str = "grounded"
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
        if self.answers not in ANSWER_MODES:
            raise PathflipError(f"chat config: answers must be one of {ANSWER_MODES}, not {self.answers!r}")
        if self.visual_layout not in VISUAL_LAYOUTS:
            raise PathflipError(f"chat config: visual_layout must be one of {VISUAL_LAYOUTS}, not "
                                f"{self.visual_layout!r}")
        if self.max_visual_tokens < self.leading_tokens + 1:
            raise PathflipError(f"chat config: max_visual_tokens must be at least {self.leading_tokens + 1} (the "
                                "slide token, the area tokens of the \"areas\" layout and one region)")

    @property
    def leading_tokens(self) -> int:
        """Visual tokens before the regions (never pooled): the slide token, and the area tokens."""
        from ..model.regions import AREA_NAMES  # here, not at the top: model/ loads transformers

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
