"""A conversation about one slide, and multiple-choice answers by the chat folder's `choice_rule`.

"generate" (the default) leaves the letter to greedy decoding. "rank" (the demo chat's) scores every option's answer
"<letter>. <option>." (+ EOS) under the model, given the prompt and the image (`ChatEngine.score_answers`: the prompt
runs once, the options as one batch on its KV cache; summed log-probability), starts the answer with the best option's
answer and lets the model add a reason. Why the whole option answer rather than the letter alone: a small model often
knows an option's words better than its letter, and forced to start with the letter only it may go on with another
option's words. Ranking suits a chat trained to restate the option after its letter; for one trained on free reasons
the summed score favours short options (tests/test_chat.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import PathflipError
from .config import CHOICE_RULES, GenerationSettings
from .decoding import AnswerStream, ChatAnswer
from .prompt import choice_options, format_choice_prompt, option_answer


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


class Conversation:
    """A multi-turn chat about one slide with a ChatEngine (`engine.conversation(visual)`): the image is given once,
    in the first user turn; answered turns are kept in `history` (cancelled answers are not)."""

    def __init__(self, engine, visual):
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
        self._current = self.engine.stream(self.visual, turns, settings, on_done=self._remember(question),
                                           prefix=prefix, option_scores=option_scores)
        return self._current

    def _remember(self, question: str):
        """on_done of an answer to `question`: keep the exchange in the history unless it was cancelled."""
        def remember(answer: ChatAnswer) -> None:
            if answer.finish_reason != "cancelled":
                self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer.text}]
        return remember

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
