"""Alignment training: config loading, schedule, pickle-free checkpoints, bit-exact resume, DDP under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_pathflip.errors import PathflipError
from napari_pathflip.model import PathFLIP
from training.align import (AlignConfig, build_dataset, build_model, build_optimizer, checkpoint_dirs, from_bert,
                            load_config, lr_factor, train)
from training.data import build_synthetic_corpus
from training.synthetic import SyntheticConfig

ROOT = Path(__file__).resolve().parents[1]
# a tiny random model; 4 x 4-patch regions so a 4096-px slide has 16 regions and max_regions = 6 samples them
TINY_MODEL = """
[model]
hidden_size = 32
num_layers = 2
num_heads = 2
intermediate_size = 64
embed_dim = 32
vision_width = 32
mixer_heads = 4
mixer_ffn = 64
text_region_heads = 4
region_patches = 4
max_patches_per_region = 16
"""


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    return build_synthetic_corpus(tmp_path_factory.mktemp("corpus"), "train", 4,
                                  config=SyntheticConfig(width=4096, height=4096))


def write_config(folder: Path, split: Path, **values) -> Path:
    settings = {"features": [str(split / "features")], "captions": [str(split / "captions.csv")],
                "init": "random", "batch_size": 2, "max_steps": 6, "warmup_steps": 2, "max_regions": 6,
                "log_every": 1, "checkpoint_every": 3, "keep_checkpoints": 5, "threads": 1, "out_dir": "run",
                **values}
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path = folder / "align.toml"
    path.write_text("\n".join(lines) + "\n" + TINY_MODEL)
    return path


def log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_config_paths_overrides_and_errors(tmp_path):
    path = tmp_path / "cfg" / "a.toml"
    path.parent.mkdir()
    path.write_text('features = ["feats"]\ncaptions = ["c.csv"]\nlr = 3e-4\n[model]\nregion_patches = 8\n')
    config = load_config(path, ["batch_size = 4", "model.num_layers = 3", 'out_dir = "/abs/run"'])
    assert config.features == [str(path.parent / "feats")] and config.captions == [str(path.parent / "c.csv")]
    assert config.lr == 3e-4 and config.batch_size == 4 and config.out_dir == "/abs/run"
    assert config.model == {"region_patches": 8, "num_layers": 3}
    assert AlignConfig().max_regions == 24 and AlignConfig().subcaptions == 8
    with pytest.raises(PathflipError, match="unknown align config key"):
        load_config(path, ["learning_rate = 1.0"])
    with pytest.raises(PathflipError, match="init must be one of"):
        AlignConfig(init="imagenet")


def test_schedule_warms_up_then_decays_to_min_lr():
    config = AlignConfig(lr=1e-4, warmup_start_lr=1e-6, min_lr=5e-6, warmup_steps=10)
    lrs = [config.lr * lr_factor(s, config, 100) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[10] == pytest.approx(1e-4) and lrs[100] == pytest.approx(5e-6)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_patch_projection_starts_standardized_and_new_parts_get_their_own_rate(split, tmp_path):
    """standardize_patches: the training patches leave patch_proj with zero mean and unit scale per output;
    new_lr_scale multiplies the learning rate of everything not initialised from BERT."""
    config = load_config(write_config(tmp_path, split))
    dataset = build_dataset(config)
    model = build_model(config, 105, dataset.slides)
    x = torch.cat([dataset.slides[s].features for s in dataset.slides])
    with torch.no_grad():
        tokens = model.patch_proj(x)
    assert tokens.mean(0).abs().max() < 1e-3
    assert 0.5 < float(tokens.std(0).mean()) < 2.0
    plain = build_model(load_config(write_config(tmp_path, split, standardize_patches=False)), 105, dataset.slides)
    assert not torch.allclose(plain.patch_proj.bias, model.patch_proj.bias)

    assert from_bert("qformer.layers.0.self_attn.query.weight") and from_bert("qformer.embeddings.LayerNorm.bias")
    assert not any(map(from_bert, ["qformer.layers.0.cross_attn.query.weight", "qformer.query_tokens",
                                   "patch_proj.weight", "mixer.0.qkv.weight", "eta"]))
    config.init, config.new_lr_scale = "bert", 10.0
    optimizer, _ = build_optimizer(model, config, 10)
    rates = {round(g["initial_lr"] / config.lr, 6) for g in optimizer.param_groups}
    assert rates == {1.0, 10.0}
    # every trainable parameter is optimised; the cross-attention key biases (softmax ignores them) are not trained
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    crossing = [layer for layer in model.qformer.layers if layer.cross_attn is not None]
    assert len(frozen) == len(crossing) > 0 and all(n.endswith("cross_attn.key.bias") for n in frozen)


def test_resume_is_bit_exact_and_checkpoints_hold_no_pickle(split, tmp_path):
    config = load_config(write_config(tmp_path, split, grad_accum=2))
    straight = train(config)
    losses = log(Path(config.out_dir))
    assert [r["step"] for r in losses] == list(range(1, 7))
    assert all(np.isfinite([r["slide"], r["region"], r["lr"], r["eta"]]).all() for r in losses)
    weights = {k: v.clone() for k, v in PathFLIP.from_pretrained(straight).state_dict().items()}
    assert json.loads((straight / "encoder.json").read_text()) == {"encoder": "builtin"}

    checkpoint = checkpoint_dirs(Path(config.out_dir))[0]
    assert checkpoint.name == "step-0000003"
    assert {p.suffix for p in checkpoint.iterdir()} <= {".json", ".safetensors"}  # no pickle anywhere
    # as if killed after the step-3 checkpoint: later checkpoints, final weights and log lines are lost
    for later in checkpoint_dirs(Path(config.out_dir))[1:]:
        shutil.rmtree(later)
    shutil.rmtree(straight)
    resumed = train(config, resume=True)
    again = log(Path(config.out_dir))
    assert [r["step"] for r in again] == list(range(1, 7))
    for a, b in zip(losses, again):
        assert (a["slide"], a["region"], a["lr"]) == (b["slide"], b["region"], b["lr"])
    for key, value in PathFLIP.from_pretrained(resumed).state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_torchrun_two_cpu_processes(split, tmp_path):
    config = write_config(tmp_path, split, batch_size=1, max_steps=3, checkpoint_every=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "training", "align", "--config", str(config)]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:  # say where the two processes were, not only that they took too long
        pytest.fail(f"torchrun did not finish in 300 s:\n{(exc.stdout or b'')[-3000:]!r}\n{(exc.stderr or b'')[-3000:]!r}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "run"
    assert "2 process(es)" in done.stdout and [r["step"] for r in log(out)] == [1, 2, 3]
    assert [p.name for p in checkpoint_dirs(out)] == ["step-0000002"]
    assert {p.name for p in checkpoint_dirs(out)[0].glob("rng-rank*.safetensors")} == {
        "rng-rank0.safetensors", "rng-rank1.safetensors"}
    model = PathFLIP.from_pretrained(out / "final")
    assert model.config.region_patches == 4 and model.config.patch_dim == 105


def test_frozen_text_tower_trains_the_rest_and_encodes_each_text_once(split, tmp_path):
    """freeze_text: the text path of the Q-Former keeps its BERT weights, cached texts give the tower's own
    (dropout-free) output, and the vision side, text_proj and the query feed-forwards still learn."""
    config = load_config(write_config(tmp_path, split, freeze_text=True, max_steps=3))
    model = build_model(config, 105, build_dataset(config).slides)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "qformer.layers.0.self_attn.query.weight" in frozen and "qformer.embeddings.word_embeddings.weight" in frozen
    assert not frozen & {"qformer.layers.0.cross_attn.query.weight", "qformer.layers.0.ffn_query.fc1.weight",
                         "text_proj.weight", "patch_proj.weight", "qformer.query_tokens"}
    texts = ["Central necrosis is present.", "Adipose tissue at the lower right.", "Central necrosis is present."]
    cached = model.text_features(texts)  # model is in training mode: the tower still runs without dropout
    assert len(model.text_cache) == 2
    model.text_cache, plain = None, model.eval().text_features(texts)
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-4)

    out = train(config)
    trained = PathFLIP.from_pretrained(out).state_dict()
    start = build_model(config, 105, build_dataset(config).slides).state_dict()
    for name in frozen:
        assert torch.equal(trained[name], start[name]), name
    assert not torch.equal(trained["text_proj.weight"], start["text_proj.weight"])
    assert not torch.equal(trained["qformer.layers.0.cross_attn.query.weight"],
                           start["qformer.layers.0.cross_attn.query.weight"])


def test_hard_negative_batches_put_caption_neighbours_together():
    """similar_in_batch: a batch starts at the next unused slide of a seeded shuffle and takes its nearest unused
    caption neighbours; every slide is used once per epoch and the epochs differ."""
    from training.align import similar_batches

    rng = np.random.default_rng(0)
    points = rng.normal(size=(40, 2))
    order = np.argsort(((points[:, None] - points[None]) ** 2).sum(-1), axis=1)[:, 1:]  # nearest first
    batches = similar_batches(order[:, :6], size=8, similar=4, seed=3, epoch=0)
    assert len(batches) == 40 // 8 and all(len(b) == len(set(b)) == 8 for b in batches)
    assert len({i for b in batches for i in b}) == 40
    first = batches[0]
    assert first[1:4] == order[first[0], :3].tolist()  # the first batch's neighbours are all still unused
    assert similar_batches(order[:, :6], 8, 4, 3, 0) == batches != similar_batches(order[:, :6], 8, 4, 3, 1)


def test_region_loss_leaves_out_another_slides_subcaption_that_is_true_here(monkeypatch):
    """Slide 0's negatives are one subcaption of each other slide; "Fibrous stroma surrounds the tumour nest." of
    slide 1 also ends slide 0's caption, so it is left out (label 0) instead of pushed away."""
    from napari_pathflip.model import SlideInput, modeling

    seen = []
    real = modeling.region_sigmoid_loss
    monkeypatch.setattr(modeling, "region_sigmoid_loss", lambda *a, **k: seen.append(a[2]) or real(*a, **k))
    torch.manual_seed(0)
    model = build_model(AlignConfig(init="bert", model={"region_patches": 4, "max_patches_per_region": 16}), 8)
    coords = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2) * 256
    slides = [SlideInput(torch.randn(len(coords), 8), coords, 256) for _ in range(3)]
    shared = "Fibrous stroma surrounds the tumour nest."
    captions = [f"Necrosis is present. {shared}", f"A tumour nest occupies the left part. {shared}",
                "Fat lobules occupy the lower left part."]
    subcaptions = [[shared], [shared], ["Fat lobules occupy the lower left part."]]
    losses = model(slides, captions, subcaptions)
    assert torch.isfinite(losses["region"])
    labels = seen[0]
    assert labels[0].tolist() == [1.0, 0.0, -1.0]  # slide 0: own, slide 1's shared sentence, slide 2's fat
    assert labels[2].tolist() == [1.0, -1.0, -1.0]  # slide 2's caption does not have the stroma sentence
    loss = real(torch.ones(1, 2, 4), torch.ones(1, 2, 4), torch.tensor([[1.0, 0.0]]), torch.tensor(1.0))
    assert loss == pytest.approx(float(real(torch.ones(1, 1, 4), torch.ones(1, 1, 4), torch.tensor([[1.0]]),
                                            torch.tensor(1.0))))


def test_a_frozen_minilm_tower_is_referenced_by_the_saved_weights(tmp_path):
    """freeze_text from all-MiniLM-L6-v2: the weights folder names the installed package instead of holding a copy;
    a tower that trains is saved with the rest."""
    from napari_pathflip.model import TEXT_TOWER_PACKAGE
    from napari_pathflip.weights import MODEL_FILE

    small = {"region_patches": 4, "max_patches_per_region": 16}
    frozen = build_model(AlignConfig(init="bert", freeze_text=True, model=small), 8)
    assert frozen.config.text_tower == TEXT_TOWER_PACKAGE
    frozen.save_pretrained(tmp_path / "frozen")
    trained = build_model(AlignConfig(init="bert", freeze_text=False, model=small), 8)
    assert trained.config.text_tower == ""
    trained.save_pretrained(tmp_path / "trained")
    size = {name: (tmp_path / name / MODEL_FILE).stat().st_size for name in ("frozen", "trained")}
    assert size["frozen"] < 0.5 * size["trained"]
    reloaded = PathFLIP.from_pretrained(tmp_path / "frozen")
    assert all(torch.equal(v, frozen.state_dict()[k]) for k, v in reloaded.state_dict().items())
