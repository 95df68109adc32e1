"""Training batches for instruction tuning: conversations as labelled examples (loss on the answers only), padded
into batches. The examples are built by the chat engine's own prompt builder
(`napari_pathflip.chat.tokenize_conversation`), so training prompts equal inference prompts token for token."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from napari_pathflip.chat import IGNORE_INDEX, ChatConfig, TokenizedConversation, tokenize_conversation
from napari_pathflip.errors import PathflipError


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
