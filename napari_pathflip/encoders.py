"""Patch encoders behind one interface: the built-in texture encoder, Hugging Face / timm vision models, CONCH.

Every encoder takes a batch of uint8 patches in NHWC layout (what the slide reader gives, transferred to the device
as bytes) and returns [B, D] float features. `preprocess` runs on the device: resizing a 256-px patch to 448 px on
a GPU is far cheaper than on CPU workers, and uint8 is a quarter of the bytes of float32 to move. An NHWC tensor
permuted to NCHW is already channels-last, so convolutions get that memory format for free.

`encoder_id` identifies the weights and code version; the feature store is keyed on it, so it must change
whenever the features would. Weights load lazily (`prepare`), so asking a cached store for its key never loads a
model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import PathflipError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Encoder:
    """Base class: subclasses set `name`, `dim`, `encoder_id` and implement `_load` and `forward`."""

    name: str = "encoder"
    dim: int = 0
    encoder_id: str = ""
    supports_amp = True  # bf16 autocast on CUDA; pure-statistics encoders opt out to keep float32 accuracy

    def __init__(self):
        self.device = torch.device("cpu")
        self._loaded = False
        self._model: torch.nn.Module | None = None  # weight-backed encoders set it in _load

    def prepare(self, device: str | torch.device = "cpu", channels_last: bool = False) -> Encoder:
        """Load weights (once) and move them to `device`, in eval mode."""
        self.device = torch.device(device)
        if not self._loaded:
            self._load()
            self._loaded = True
        module = self.module
        if module is not None:
            module.to(self.device).eval()
            if channels_last:
                module.to(memory_format=torch.channels_last)
        return self

    @property
    def module(self) -> torch.nn.Module | None:
        return self._model

    def _load(self) -> None:
        pass

    def preprocess(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> model input (float NCHW, channels-last memory)."""
        return patches.permute(0, 3, 1, 2).float().div_(255.0)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def encode(self, patches: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Convenience: uint8 patches [B, H, W, 3] (numpy or tensor) -> float32 features [B, D] on CPU."""
        if not self._loaded:
            self.prepare(self.device)
        patches = torch.as_tensor(np.asarray(patches) if not torch.is_tensor(patches) else patches)
        return self.forward(self.preprocess(patches.to(self.device))).float().cpu()


# ---------------------------------------------------------------------------------------------------------------
# built-in encoder


def _minus_coarse(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """fine minus the nearest-upsampled coarse map (coarse = block average of fine), without an upsampled copy."""
    b, c, h, w = fine.shape
    f = (h // coarse.shape[2], w // coarse.shape[3])
    diff = fine.view(b, c, coarse.shape[2], f[0], coarse.shape[3], f[1]) - coarse[:, :, :, None, :, None]
    return diff.view(b, c, h, w)


def _local_maxima(x: torch.Tensor) -> torch.Tensor:
    """Pixels not smaller than any of their 8 neighbours (max_pool2d on CPU is slow: it also computes indices)."""
    padded = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    h, w = x.shape[-2:]
    peak = torch.ones_like(x, dtype=torch.bool)
    for dy in range(3):
        for dx in range(3):
            if dy != 1 or dx != 1:
                peak &= x >= padded[..., dy : dy + h, dx : dx + w]
    return peak


def _lbp_histogram(x: torch.Tensor, margin: float = 0.02) -> torch.Tensor:
    """Rotation-invariant uniform LBP (8 neighbours, radius 1) histogram, 10 bins per channel, [B, C * 10]."""
    b, c, h, w = x.shape
    center = x[..., 1:-1, 1:-1] + margin  # margin: flat glass/noise must not produce random codes
    ring = [(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)]  # circular order
    bits = [x[..., 1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] >= center for dy, dx in ring]
    ones = sum(bit.to(torch.uint8) for bit in bits)
    transitions = sum((bits[i] != bits[i - 1]).to(torch.uint8) for i in range(8))
    code = torch.where(transitions <= 2, ones, torch.full_like(ones, 9)).long()
    flat = code.view(b * c, -1) + 10 * torch.arange(b * c, device=x.device).view(-1, 1)
    hist = torch.bincount(flat.view(-1), minlength=10 * b * c).view(b, c * 10).float()
    return hist / code[0, 0].numel()


class BuiltinEncoder(Encoder):
    """Deterministic, download-free H&E descriptor built from fixed torch ops (batched, CPU or GPU).

    Works at 1 um/px (2 x 2 average of a 0.5 um/px patch; nuclei of 6-10 um stay resolved) on optical density
    split into haematoxylin (H: nuclei), eosin (E: cytoplasm, stroma) and residual by colour deconvolution
    (skimage's `hed_from_rgb`), plus total optical density (T). Per patch (D = 105):
    - stain [20]: mean and spread of H, E, T, residual; coverage of H, E, T above three levels; H share; peak H, E.
    - multi-scale texture [41]: on H, E, T over a 5-level average pyramid (1-16 um/px): band energy per scale
      (what each 2 x 2 averaging removes, i.e. detail at that scale), gradient energy, structure-tensor coherence
      (aligned collagen fibres vs. isotropic cell sheets), and lag-1 autocorrelation of H and E per scale
      (smooth vs. grainy at 1, 2, 4, 8 um).
    - micro-texture [30]: rotation-invariant uniform local binary pattern histograms of H and E at 2 um/px and of
      H at 4 um/px (spots, edges, corners, flat: nuclear outlines, chromatin clumps, nuclear clusters).
    - nuclear proxies [10]: haematoxylin local maxima standing out from their surround at 2 and 4 um/px, counted
      above three strengths (a nuclear-density proxy), their mean strength and blob coverage.
    - colour-texture coupling [4]: eosin detail where haematoxylin is absent (stroma texture) and vice versa.
    Energies are log-scaled and the rest are fractions or optical densities, so values sit in about [0, 10].
    Speed (benchmarks/bench_extract.py, model-only, batch 64): 660-1,120 patches/s on 2 shared CPU cores.

    Limits: hand-designed, not learned. It describes how a patch looks (stain amounts, nuclear crowding and size,
    fibre alignment, graininess at several scales), not what it means; it cannot recognise atypia, mitoses or
    specific architectures the way CONCH or another pathology foundation model does. It is sensitive to stain
    intensity (no stain normalisation), assumes H&E at about 0.5 um/px, and works at 1 um/px, so chromatin
    detail finer than that is lost. It exists so the whole pipeline runs and learns without downloads; use
    `conch:` or a pathology ViT for real results.
    """

    name = "builtin"
    VERSION = "1"
    supports_amp = False  # statistics, not a network: bf16 would only lose precision

    def __init__(self):
        super().__init__()
        from skimage.color import hed_from_rgb

        hed = np.asarray(hed_from_rgb, dtype=np.float32)
        # optical density (rows: R, G, B) -> H, E, total optical density, residual in one product
        self._unmix = torch.from_numpy(np.stack([hed[:, 0], hed[:, 1], np.ones(3, np.float32), hed[:, 2]]))
        self.dim = self.forward(self.preprocess(torch.zeros(1, 256, 256, 3, dtype=torch.uint8))).shape[1]
        self.encoder_id = f"builtin-v{self.VERSION}-d{self.dim}"
        self._loaded = True

    def preprocess(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> stains [B, 4, H/2, W/2] (H, E, total optical density, residual) at 1 um/px."""
        b, h, w, _ = patches.shape
        # 2 x 2 sums in int16 first: everything after runs on a quarter of the pixels (the full-resolution float
        # conversion alone would cost as much as the whole descriptor)
        rows = patches[:, : h // 2 * 2].reshape(b, h // 2, 2, w, 3)
        rows = rows[:, :, 0].to(torch.int16) + rows[:, :, 1]
        cols = rows[:, :, : w // 2 * 2].reshape(b, h // 2, w // 2, 2, 3)
        quad = (cols[..., 0, :] + cols[..., 1, :]).float()
        od = torch.log(quad.add_(4.0).mul_(1.0 / 1024.0)).neg_()  # -log((mean + 1) / 256), NHWC
        # unmixing matrix times the transposed pixels: the product comes out channels-first without a copy
        stains = torch.matmul(self._unmix.to(od.device), od.view(b, -1, 3).transpose(1, 2))
        return stains.clamp_(min=0).view(b, 4, h // 2, w // 2)

    @torch.inference_mode()
    def forward(self, stains: torch.Tensor) -> torch.Tensor:
        stains = stains.float()
        b = stains.shape[0]
        mean = stains.mean((2, 3))
        std = ((stains * stains).mean((2, 3)) - mean * mean).clamp(min=0).sqrt()
        # texture over an average pyramid of H, E, T at 1, 2, 4, 8, 16 um/px (the residual rides along: slicing it
        # off first would cost a copy)
        pyramid = [stains]
        for _ in range(4):
            pyramid.append(F.avg_pool2d(pyramid[-1], 2))
        pyramid = [x[:, :3] for x in pyramid]
        levels = torch.tensor([0.05, 0.15, 0.4], device=stains.device).view(1, 1, 3, 1, 1)
        cover = (pyramid[1][:, :, None] > levels).float().mean((3, 4)).flatten(1)  # at 2 um/px: same, 4x cheaper
        h_share = mean[:, :1] / (mean[:, :1] + mean[:, 1:2] + 1e-3)
        feats = [mean, std, cover, h_share]
        feats.append(pyramid[1][:, :2].amax((2, 3)))  # peak H, E at 2 um/px (a nucleus, not a noisy pixel)
        power = [(x * x).mean((2, 3)) for x in pyramid]
        for s in range(4):
            x = pyramid[s]
            feats.append(torch.log1p(100 * (power[s] - power[s + 1]).clamp(min=0)))  # band energy at scale s
            gx = x[..., :-1, 1:] - x[..., :-1, :-1]
            gy = x[..., 1:, :-1] - x[..., :-1, :-1]
            feats.append(torch.log1p(100 * (gx * gx + gy * gy).mean((2, 3))))
            if s > 0:  # structure-tensor coherence in 4 x 4 windows (2-32 um): 1 = aligned fibres, 0 = isotropic
                jxx, jyy, jxy = (F.avg_pool2d(t, 4) for t in (gx * gx, gy * gy, gx * gy))
                coherence = torch.sqrt((jxx - jyy) ** 2 + 4 * jxy * jxy) / (jxx + jyy + 1e-4)
                feats.append(coherence.mean((2, 3)))
            centred = x[:, :2] - x[:, :2].mean((2, 3), keepdim=True)
            var = (centred * centred).mean((2, 3)) + 1e-4
            lag = (centred[..., :, 1:] * centred[..., :, :-1]).mean((2, 3))
            lag = lag + (centred[..., 1:, :] * centred[..., :-1, :]).mean((2, 3))
            feats.append(lag / (2 * var))

        feats.append(_lbp_histogram(pyramid[1][:, :2]))  # nuclear outlines, chromatin clumps at 2 um/px
        feats.append(_lbp_histogram(pyramid[2][:, :1]))  # nuclear clusters at 4 um/px

        # nuclear proxies: haematoxylin maxima that stand out from their 8-um (16-um) surround, at 2 (4) um/px
        for s in (1, 2):
            h = pyramid[s][:, :1]
            blob = _minus_coarse(h, pyramid[s + 2][:, :1])
            peaks = _local_maxima(h)
            for threshold in (0.03, 0.08, 0.15):
                feats.append(torch.log1p((peaks & (blob > threshold)).float().sum((2, 3))))
            strong = peaks & (blob > 0.03)
            feats.append(10 * (blob * strong).sum((2, 3)) / strong.sum((2, 3)).clamp(min=1))
            feats.append((blob > 0.08).float().mean((2, 3)))

        # colour-texture coupling: eosin detail where haematoxylin is absent (stroma) and vice versa
        band = _minus_coarse(pyramid[0][:, :2], pyramid[1][:, :2])
        no_h = (pyramid[0][:, :1] < 0.1).float()
        no_e = (pyramid[0][:, 1:2] < 0.1).float()
        feats.append(torch.log1p(100 * (band[:, 1:2] ** 2 * no_h).sum((2, 3)) / no_h.sum((2, 3)).clamp(min=1)))
        feats.append(torch.log1p(100 * (band[:, :1] ** 2 * no_e).sum((2, 3)) / no_e.sum((2, 3)).clamp(min=1)))
        feats += [no_h.mean((2, 3)), no_e.mean((2, 3))]
        return torch.cat([f.reshape(b, -1) for f in feats], 1)


# ---------------------------------------------------------------------------------------------------------------
# pretrained vision models from local files


def _file_digest(path: Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file (weights): the id must change whenever the weights do."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


def _resize_crop_normalize(x, size, crop, mean, std, mode="bicubic"):
    """Torch version of Resize(shortest edge) + CenterCrop + Normalize on float [0, 1] NCHW."""
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode=mode, antialias=size < x.shape[-1], align_corners=False)
        x = x.clamp_(0.0, 1.0)  # bicubic overshoots; PIL-based pipelines clip to the 8-bit range too
    if crop is not None and crop < x.shape[-1]:
        top = (x.shape[-2] - crop) // 2
        left = (x.shape[-1] - crop) // 2
        x = x[..., top : top + crop, left : left + crop]
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


class HFVisionEncoder(Encoder):
    """A Hugging Face vision model (e.g. ViTModel, Phikon) from a local folder: config.json + model.safetensors.

    Preprocessing follows the folder's preprocessor_config.json (size, mean, std) when present, else the
    config's image_size with ImageNet mean/std. `pooling`: "cls" (last_hidden_state[:, 0], what pathology ViTs
    such as Phikon publish), "pooler" (pooler_output) or "mean" (mean of patch tokens).
    """

    def __init__(self, folder: str | os.PathLike, pooling: str = "cls"):
        super().__init__()
        self.folder = Path(folder)
        weights = self.folder / "model.safetensors"
        if not (self.folder / "config.json").is_file() or not weights.is_file():
            raise PathflipError(
                f"{self.folder}: not a Hugging Face model folder (needs config.json and model.safetensors). "
                "Save the model with save_pretrained(..., safe_serialization=True)."
            )
        if pooling not in {"cls", "pooler", "mean"}:
            raise PathflipError(f"unknown pooling {pooling!r}; use cls, pooler or mean.")
        self.pooling = pooling
        config = json.loads((self.folder / "config.json").read_text())
        self.name = f"hf:{self.folder.name}"
        self.dim = int(config.get("hidden_size") or config.get("hidden_sizes", [0])[-1])
        image_size = config.get("image_size", 224)
        self.size, self.crop, self.mean, self.std = image_size, None, IMAGENET_MEAN, IMAGENET_STD
        pre = self.folder / "preprocessor_config.json"
        if pre.is_file():
            p = json.loads(pre.read_text())
            size = p.get("size", image_size)
            self.size = size.get("shortest_edge") or size.get("height") if isinstance(size, dict) else size
            crop = p.get("crop_size")
            self.crop = (crop.get("height") if isinstance(crop, dict) else crop) if p.get("do_center_crop") else None
            self.mean, self.std = tuple(p.get("image_mean", IMAGENET_MEAN)), tuple(p.get("image_std", IMAGENET_STD))
        digest = hashlib.sha256((self.folder / "config.json").read_bytes()).hexdigest()[:8]
        self.encoder_id = f"hf-{self.folder.name}-{digest}-{_file_digest(weights)}-{pooling}"

    def _load(self) -> None:
        from transformers import AutoModel

        try:
            self._model = AutoModel.from_pretrained(self.folder, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise PathflipError(f"cannot load the vision model in {self.folder}: {exc}") from exc

    def preprocess(self, patches):
        x = super().preprocess(patches)
        return _resize_crop_normalize(x, self.size, self.crop, self.mean, self.std)

    @torch.inference_mode()
    def forward(self, x):
        out = self._model(pixel_values=x)
        if self.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise PathflipError(f"{self.folder}: the model has no pooler output; use pooling 'cls'.")
            return out.pooler_output
        hidden = out.last_hidden_state
        return hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(1)


class TimmEncoder(Encoder):
    """A timm model from a local folder in timm's hub layout (config.json with `architecture` + model.safetensors).

    Built with `pretrained=False, num_classes=0` (pooled features) and the safetensors weights loaded by us; the
    data config (input size, crop, interpolation, mean, std) comes from timm's resolve_data_config.
    """

    def __init__(self, folder: str | os.PathLike):
        super().__init__()
        self.folder = Path(folder)
        config_path, weights = self.folder / "config.json", self.folder / "model.safetensors"
        if not config_path.is_file() or not weights.is_file():
            raise PathflipError(
                f"{self.folder}: not a timm model folder (needs config.json with 'architecture' and model.safetensors)."
            )
        self.config = json.loads(config_path.read_text())
        if "architecture" not in self.config:
            raise PathflipError(f"{config_path}: no 'architecture' entry; this is not a timm model folder.")
        self.name = f"timm:{self.config['architecture']}"
        self.dim = int(self.config.get("num_features", 0))  # exact value known after loading
        digest = hashlib.sha256(config_path.read_bytes()).hexdigest()[:8]
        self.encoder_id = f"timm-{self.config['architecture']}-{digest}-{_file_digest(weights)}"

    def _load(self) -> None:
        try:
            import timm
            from timm.data import resolve_data_config
        except ImportError as exc:
            raise PathflipError("timm encoders need the `timm` package: pip install timm") from exc
        from safetensors.torch import load_file

        kwargs = dict(self.config.get("model_args", {}))
        model = timm.create_model(self.config["architecture"], pretrained=False, num_classes=0, **kwargs)
        state = {k: v for k, v in load_file(self.folder / "model.safetensors").items() if not k.startswith("head.")}
        missing, _ = model.load_state_dict(state, strict=False)
        if [k for k in missing if not k.startswith("head")]:
            raise PathflipError(f"{self.folder}: weights do not match {self.config['architecture']} ({missing[:3]}...).")
        self._model = model
        self.dim = model.num_features
        data = resolve_data_config(self.config.get("pretrained_cfg", {}), model=model)
        self.crop = data["input_size"][-1]
        self.size = int(math.floor(self.crop / data.get("crop_pct", 1.0)))
        self.mode = "bicubic" if data.get("interpolation") == "bicubic" else "bilinear"
        self.mean, self.std = tuple(data["mean"]), tuple(data["std"])

    def preprocess(self, patches):
        x = super().preprocess(patches)
        return _resize_crop_normalize(x, self.size, self.crop, self.mean, self.std, self.mode)

    @torch.inference_mode()
    def forward(self, x):
        return self._model(x)


class ConchEncoder(Encoder):
    """CONCH ViT-B/16 image tower (the paper's encoder) from a local checkpoint; needs the `conch` package.

    448-px bicubic resize + centre crop, OpenAI-CLIP mean/std (CONCH's own transform; on square patches the
    crop is a no-op), and the 512-d pre-projection embedding `encode_image(x, proj_contrast=False,
    normalize=False)`. A `.safetensors` checkpoint is loaded without unpickling; the official `pytorch_model.bin`
    needs `allow_pickle=True` (CLI: --allow-pickle) because reading it runs torch.load.
    """

    name = "conch"
    dim = 512
    SIZE = 448

    def __init__(self, checkpoint: str | os.PathLike, allow_pickle: bool = False):
        super().__init__()
        self.checkpoint = Path(checkpoint)
        if not self.checkpoint.is_file():
            raise PathflipError(
                f"CONCH checkpoint {self.checkpoint} not found. Request access to MahmoodLab/conch on Hugging Face, "
                "download pytorch_model.bin yourself and pass its path: --encoder conch:/path/to/pytorch_model.bin"
            )
        if self.checkpoint.suffix != ".safetensors" and not allow_pickle:
            raise PathflipError(
                f"{self.checkpoint} is a pickle checkpoint; loading it runs torch.load. Convert it to safetensors, or "
                "allow it explicitly (--allow-pickle / allow_pickle=True) if you trust the file."
            )
        self.allow_pickle = allow_pickle
        self.encoder_id = f"conch-vitb16-{_file_digest(self.checkpoint)}"

    def _load(self) -> None:
        try:
            from conch.open_clip_custom import create_model_from_pretrained
            from conch.open_clip_custom import factory
        except ImportError as exc:
            raise PathflipError(
                "the CONCH encoder needs the `conch` package: pip install git+https://github.com/mahmoodlab/CONCH.git"
            ) from exc
        if self.checkpoint.suffix == ".safetensors":
            from safetensors.torch import load_file

            config = json.loads((factory.CFG_DIR / "conch_ViT-B-16.json").read_text())
            config.pop("custom_text", None)
            model = factory.CoCa(**config)
            missing, _ = model.load_state_dict(load_file(self.checkpoint), strict=False)
            if any(k.startswith("visual.") for k in missing):
                raise PathflipError(f"{self.checkpoint}: not a CONCH checkpoint (image-tower weights missing).")
        else:
            model = create_model_from_pretrained("conch_ViT-B-16", str(self.checkpoint), return_transform=False)
        self._model = model

    def preprocess(self, patches):
        x = super().preprocess(patches)
        return _resize_crop_normalize(x, self.SIZE, self.SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    @torch.inference_mode()
    def forward(self, x):
        return self._model.encode_image(x, proj_contrast=False, normalize=False)


ENCODER_HELP = (
    "builtin (default, no download) | hf:FOLDER (Hugging Face vision model) | timm:FOLDER (timm hub layout) | "
    "conch:CHECKPOINT (needs the conch package)"
)


def build_encoder(spec: str | Encoder | None = "builtin", allow_pickle: bool = False) -> Encoder:
    """An encoder from a spec string (see ENCODER_HELP) or an Encoder instance (returned as is)."""
    if isinstance(spec, Encoder):
        return spec
    spec = spec or "builtin"
    kind, _, arg = spec.partition(":")
    if kind == "builtin" and not arg:
        return BuiltinEncoder()
    if kind == "hf" and arg:
        return HFVisionEncoder(arg)
    if kind == "timm" and arg:
        return TimmEncoder(arg)
    if kind == "conch" and arg:
        return ConchEncoder(arg, allow_pickle=allow_pickle)
    if os.path.isdir(spec):
        return HFVisionEncoder(spec)
    raise PathflipError(f"unknown encoder {spec!r}; use {ENCODER_HELP}")
