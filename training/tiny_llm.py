"""A tiny Qwen3-architecture causal LM with its own byte-level BPE tokenizer and a ChatML chat template.

Used for the demo chat model (weights trained later by the instruction-tuning stage) and for tests. The folder it
writes is an ordinary Hugging Face causal-LM folder (config.json, model.safetensors, generation_config.json,
tokenizer.json, tokenizer_config.json with the chat template), so `napari_pathflip.chat` loads it exactly like a
user's Qwen3-0.6B folder. `qwen3_0_6b_config` gives the paper-scale shape with random weights for benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from napari_pathflip.chat import IMAGE_TOKEN  # the chat engine's default placeholder (ChatConfig.image_token)

# ChatML special tokens, spelled as Qwen3 spells them so prompts look the same for the tiny and the real model.
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END, IMAGE_TOKEN]

# ChatML, the layout Qwen uses: every turn is "<|im_start|>ROLE\nCONTENT<|im_end|>\n".
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass
class TinyLLMConfig:
    """Sizes of the tiny model and its tokenizer (defaults: about 7 M parameters with a 4k vocabulary)."""
    vocab_size: int = 4096  # BPE target; the trainer may stop below it on a small corpus
    min_frequency: int = 2
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    max_position_embeddings: int = 4096  # room for ~1k visual tokens plus a long report
    rope_theta: float = 1_000_000.0
    seed: int = 0


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Byte-level BPE (as Qwen uses) trained on `texts`, with ChatML special tokens and the chat template."""
    bpe = Tokenizer(models.BPE())
    # Byte level: every string is encodable (no unknown token), and decoding restores it exactly.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator((t for t in texts if t), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,  # an answer ends with <|im_end|>, as in Qwen3's tokenizer
        pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START, IMAGE_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=TinyLLMConfig.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )


def qwen3_config(config: TinyLLMConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen3Config:
    """Qwen3 config of the tiny model, its vocabulary and special ids taken from `tokenizer`."""
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


def qwen3_0_6b_config(vocab_size: int = 151_936) -> Qwen3Config:
    """The shape of Qwen3-0.6B (random weights when built): for benchmarks only; about 0.6 B parameters."""
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40_960,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
    )


def build_tiny_llm(texts: Iterable[str], config: TinyLLMConfig | None = None
                   ) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    """Train the tokenizer on `texts` and build a randomly initialised tiny Qwen3 model that matches it."""
    config = config or TinyLLMConfig()
    tokenizer = train_tokenizer(texts, config.vocab_size, config.min_frequency)
    torch.manual_seed(config.seed)
    model = Qwen3ForCausalLM(qwen3_config(config, tokenizer))
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id)
    return model.eval(), tokenizer


def save_llm(folder: str | Path, model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast) -> Path:
    """Write an AutoModelForCausalLM / AutoTokenizer folder (safetensors weights, chat template included)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)  # safetensors is the transformers default
    tokenizer.save_pretrained(folder)
    return folder
