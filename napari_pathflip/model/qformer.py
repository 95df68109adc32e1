"""A compact BLIP-2 style Q-Former whose BERT weights also encode text.

Layout per layer (post-LayerNorm, as BERT): self-attention -> [cross-attention to patch tokens every
`cross_attention_freq` layers, queries only] -> feed-forward. Text and queries share the self-attention weights;
queries get their own feed-forward copy (`ffn_query`, initialised from the text one), as in BLIP-2.

Parameter names mirror BERT's through `bert_key_map`, so any local BERT checkpoint initialises the shared part.
Cross-attention to patch tokens runs in the tokens' own space (`Attention.attend_tokens`): the queries are mapped
through the key weights instead of every patch token through the key and value weights, the same maths with about
half the multiplications at PathFLIP's sizes (region and slide pass together). All groups read one token table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .config import PathFLIPConfig


class Attention(nn.Module):
    """Multi-head attention + output projection + residual LayerNorm (BERT's BertAttention, post-LN)."""

    def __init__(self, hidden: int, heads: int, kv_width: int, eps: float, dropout: float, attn_dropout: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)
        self.attn_dropout = attn_dropout

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[..., L, hidden] -> [..., L, heads, head_dim]."""
        return x.unflatten(-1, (self.heads, -1))

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.key(tokens)), self.split(self.value(tokens))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, hidden]; k, v [B, S, heads, head_dim]; mask [B, S] bool, True = attend (None = all)."""
        q = self.split(self.query(x)).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None, None, :]
        ctx = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        return self.norm(x + self.drop(self.out(ctx.transpose(1, 2).flatten(2))))

    def attend_tokens(self, x: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The maths of `forward(x, *keys_values(t), valid)` for input tokens t, computed in the tokens' space.

        x [B, L, hidden]; tokens [B, S, kv_width + 1] = t with a last column of ones; valid [B, S] bool.
        Head h's score of token j for query i is (q_ih W_kh) . t_j / sqrt(d) plus q_ih . b_kh / sqrt(d), which is
        the same for every token and so leaves the softmax unchanged; its output is W_vh (sum_j p_ij t_j) plus b_vh
        times sum_j p_ij, which the ones column carries (1, or less under attention dropout). So the L * heads
        query rows meet the kv_width-wide tokens in one single-head attention: 2 * L * heads multiply-adds per token
        width and pass instead of the 2 * hidden of projecting every token to keys and values once (PathFLIP: 2 x 96
        for its region and slide passes vs 768). The key bias drops out of the maths, so it gets no gradient.
        Sequences so short that projecting their tokens costs less (one-patch regions in patch-level grounding)
        take the projected way.
        """
        heads, width, rows = self.heads, tokens.shape[-1] - 1, x.shape[1] * self.heads
        hidden = x.shape[-1]
        # multiply-adds per sequence: keys and values 2 S width hidden; token space 2 rows (width + 1) (S + d)
        if tokens.shape[1] * width * hidden < rows * (width + 1) * (tokens.shape[1] + hidden // heads):
            return self(x, *self.keys_values(tokens[..., :-1]), valid)
        q = self.split(self.query(x))  # [B, L, heads, d]
        # per head, weights over [t, 1]: the key's ignores the ones column, the value's is the value bias there
        key = F.pad(self.key.weight.view(heads, -1, width), (0, 1))
        value = torch.cat((self.value.weight.view(heads, -1, width), self.value.bias.view(heads, -1, 1)), -1)
        q_tokens = torch.einsum("blhd,hdk->blhk", q, key).flatten(1, 2)[:, None]  # [B, 1, L * heads, width + 1]
        ctx = F.scaled_dot_product_attention(q_tokens, tokens[:, None], tokens[:, None],
                                             attn_mask=valid[:, None, None, :], scale=q.shape[-1] ** -0.5,
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        values = torch.einsum("blhk,hdk->blhd", ctx[:, 0].unflatten(1, (x.shape[1], heads)), value)
        return self.norm(x + self.drop(self.out(values.flatten(2))))


class FeedForward(nn.Module):
    def __init__(self, hidden: int, inner: int, act: str, eps: float, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)
        self.act = ACT2FN[act]
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop(self.fc2(self.act(self.fc1(x)))))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: PathFLIPConfig, has_cross: bool):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.self_attn = Attention(h, cfg.num_heads, h, eps, cfg.dropout, cfg.attention_dropout)
        self.cross_attn = (Attention(h, cfg.num_heads, cfg.vision_width, eps, cfg.dropout, cfg.attention_dropout)
                           if has_cross else None)
        if has_cross:  # it shifts all of a query's scores alike, which softmax ignores: nothing to learn
            self.cross_attn.key.bias.requires_grad_(False)
        self.ffn = FeedForward(h, cfg.intermediate_size, cfg.hidden_act, eps, cfg.dropout)
        self.ffn_query = FeedForward(h, cfg.intermediate_size, cfg.hidden_act, eps, cfg.dropout)

    def self_attend(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        k, v = self.self_attn.keys_values(x)
        return self.self_attn(x, k, v, mask)


class Embeddings(nn.Module):
    """BERT embeddings (word + position + token type, LayerNorm). Query tokens only get the LayerNorm."""

    def __init__(self, cfg: PathFLIPConfig):
        super().__init__()
        h = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, h)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.drop(self.LayerNorm(x))

    def queries(self, query_tokens: torch.Tensor) -> torch.Tensor:
        return self.drop(self.LayerNorm(query_tokens))


@dataclass
class PatchGroup:
    """G sequences of S patch tokens for cross-attention, `valid` [G, S] (False = padding, masked out).

    Either rows `index` [G, S] of the token table (gathered per cross-attention layer), or, when index is None, the
    table rows start .. start + G*S in order: a view, no copy (inference lays tokens out region by region).
    """
    valid: torch.Tensor
    index: torch.Tensor | None = None
    start: int = 0

    @classmethod
    def rows(cls, index: torch.Tensor) -> "PatchGroup":
        return cls(valid=index >= 0, index=index)

    def __len__(self) -> int:
        return self.valid.shape[0]

    def take(self, table: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Sequences lo:hi of this group from `table` [T, ...] -> [hi - lo, S, ...]."""
        if self.index is None:
            width = self.valid.shape[1]
            return table[self.start + lo * width:self.start + hi * width].unflatten(0, (hi - lo, width))
        return table[self.index[lo:hi].clamp(min=0)]


class QFormer(nn.Module):
    def __init__(self, cfg: PathFLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_query_tokens, cfg.hidden_size) * 0.02)
        self.layers = nn.ModuleList(QFormerLayer(cfg, i % cfg.cross_attention_freq == 0)
                                    for i in range(cfg.num_layers))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only mode (plain BERT): token states [T, L, hidden]."""
        x = self.embeddings(input_ids)
        mask = attention_mask.bool()
        for layer in self.layers:
            x = layer.ffn(layer.self_attend(x, mask))
        return x

    def encode_queries(self, patch_tokens: torch.Tensor, groups: Sequence[PatchGroup],
                       chunk: int = 256) -> list[torch.Tensor]:
        """Run the learned queries once per sequence of patches.

        patch_tokens [T, vision_width]: projected patch features; groups: PatchGroups over its rows, attended in
        chunks of `chunk` sequences (bounds memory on large slides).
        Returns one [G_i, num_query_tokens, hidden] tensor per group.
        """
        sizes = [len(g) for g in groups]
        table = torch.cat((patch_tokens, patch_tokens.new_ones(len(patch_tokens), 1)), 1)  # see attend_tokens
        x = self.embeddings.queries(self.query_tokens).expand(sum(sizes), -1, -1)
        for layer in self.layers:
            x = layer.self_attend(x)
            if layer.cross_attn is not None:
                outs = []
                for xs, group in zip(x.split(sizes), groups):
                    for lo in range(0, len(group), chunk):
                        hi = min(lo + chunk, len(group))
                        outs.append(layer.cross_attn.attend_tokens(xs[lo:hi], group.take(table, lo, hi),
                                                                   group.valid[lo:hi]))
                x = torch.cat(outs)
            x = layer.ffn_query(x)
        return list(x.split(sizes))


def bert_key_map(bert_keys: Sequence[str], num_layers: int) -> dict[str, list[str]]:
    """BERT checkpoint key -> our QFormer keys (a list: the text FFN also initialises the query FFN)."""
    sub = {"attention.self.query": ["self_attn.query"], "attention.self.key": ["self_attn.key"],
           "attention.self.value": ["self_attn.value"], "attention.output.dense": ["self_attn.out"],
           "attention.output.LayerNorm": ["self_attn.norm"], "intermediate.dense": ["ffn.fc1", "ffn_query.fc1"],
           "output.dense": ["ffn.fc2", "ffn_query.fc2"], "output.LayerNorm": ["ffn.norm", "ffn_query.norm"]}
    mapping: dict[str, list[str]] = {}
    for key in bert_keys:
        name = key.removeprefix("bert.")
        if name.startswith("embeddings.") and not name.endswith("position_ids"):
            mapping[key] = [name]
        elif name.startswith("encoder.layer."):
            _, _, idx, rest = name.split(".", 3)
            if int(idx) >= num_layers:
                continue
            module, param = rest.rsplit(".", 1)
            for ours in sub.get(module, []):
                mapping[key] = mapping.get(key, []) + [f"layers.{idx}.{ours}.{param}"]
    return mapping
