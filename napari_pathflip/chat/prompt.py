"""The prompt: a conversation rendered with the LLM's own chat template, image positions spliced in, answers labelled;
and the multiple-choice text (the prompt that lists the options, the answer that restates one)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import PathflipError
from .config import ChatConfig

IGNORE_INDEX = -100  # label of every position that carries no loss (prompt, template, image, padding)
# Stand-in for an assistant answer while the chat template renders, so answers never pass through the template and
# can be tokenised and labelled on their own.
_ANSWER_MARK = "<<pathflip-answer-{}>>"
_ANSWER_RE = re.compile(r"<<pathflip-answer-(\d+)>>")
_ANY_ANSWER = r"<<pathflip-answer-\d+>>"
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


@dataclass
class TokenizedConversation:
    """Token ids and labels of one conversation; the visual tokens go to [image_start, image_start + visual_len)."""
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long, IGNORE_INDEX except on answer tokens and their EOS
    image_start: int
    visual_len: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]


# ------------------------------------------------------------------------------------------ multiple choice
def choice_options(options: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    """{letter: option} with empty options left out; a sequence is lettered A, B, C, ... in order."""
    if not isinstance(options, Mapping):
        options = {chr(ord("A") + i): text for i, text in enumerate(options)}
    return {letter: str(text).strip() for letter, text in options.items() if str(text).strip()}


def option_answer(letter: str, option: str) -> str:
    """"B. Option text." - a multiple-choice answer that restates its option (how the demo corpus writes them)."""
    return f"{letter}. {option.strip().rstrip('.')}."


def format_choice_prompt(question: str, options: Mapping[str, str] | Sequence[str], instruction: str) -> str:
    """Multiple-choice prompt: question, one "A. option" line per option, then the answer-format instruction."""
    options = choice_options(options)
    if not question.strip() or not options:
        raise PathflipError("a multiple-choice question needs a question and at least one non-empty option")
    lines = [question.strip()] + [f"{letter}. {text}" for letter, text in options.items()] + [instruction]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ rendering
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


def splice_visual(token_embeds: torch.Tensor, visual_embeds: Sequence[torch.Tensor],
                  image_starts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Copy of `token_embeds` [B, L, H] with rows image_start .. + T of each sample set to its visual tokens [T, H]
    (differentiable with respect to both, so training reaches the projector through it)."""
    out = token_embeds.clone()
    for row, (visual, start) in enumerate(zip(visual_embeds, image_starts)):
        start = int(start)
        out[row, start:start + visual.shape[0]] = visual.to(out.dtype)
    return out
