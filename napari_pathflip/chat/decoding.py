"""Decoding: one token at a time on a KV cache (plain or static + compiled), greedy or sampled, streamed as text.

Plain path (CPU default): Hugging Face DynamicCache, eager. Fast path (CUDA default): a StaticCache allocated once per
engine and the one-token decode step compiled with torch.compile(mode="reduce-overhead") (CUDA graphs); the prefill
stays eager. Tokens are yielded one by one, so streaming is a plain iterator and a cancel request is seen before the
next token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import PathflipError
from .config import GenerationSettings
from .prompt import TokenizedConversation, splice_visual
from .visual import VisualTokens

log = logging.getLogger(__name__)


class PlainDecoder:
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


class StaticDecoder:
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
    # grounded answers (chat.grounded): the findings the text names with their evidence (Citation), whether the
    # text was written or checked from the slide's evidence, and a description's structured report (SlideReport)
    citations: list = field(default_factory=list)
    grounded: bool = False
    report: object | None = None


class AnswerStream:
    """Iterator over the text pieces of one answer as they are decoded; `cancel()` stops it before the next token
    (safe from another thread). After iteration, `answer` holds the ChatAnswer; `result()` drains and returns it.
    `engine` is the ChatEngine that answers (its LLM, tokenizer, decoder and answer lock)."""

    def __init__(self, engine, prompt: TokenizedConversation, visual: VisualTokens,
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
        if not engine.answer_lock.acquire(blocking=False):
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
                decoder = engine.decoder()
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
            engine.answer_lock.release()
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
