"""PathFLIP model: regions from coordinates, masking, losses, gradients, checkpoints, and a short training run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_pathflip.errors import PathflipError
from napari_pathflip.model.patch_head import calibration_features
from napari_pathflip.model import (PathFLIP, PathFLIPConfig, SlideEncoding, SlideInput, default_bert_dir,
                                   group_regions, region_sigmoid_loss, slide_contrastive_loss)

PATCH = 256
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, patch_dim=16, vision_width=32,
            embed_dim=32, mixer_heads=4, mixer_ffn=64, text_region_heads=4, region_patches=4,
            max_patches_per_region=16, max_regions=6, dropout=0.0, attention_dropout=0.0, mixer_dropout=0.0,
            # a random tiny BERT with the usual 0.02 init maps every text and slide to nearly the same vector
            # (the query/[CLS] token dominates); a wider init lets a few hundred steps separate them
            initializer_range=0.2)


@pytest.fixture
def one_thread():
    """Small models run fastest on one thread; on a shared machine more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_bert_dir()), local_files_only=True)


def tiny_model(tokenizer, seed: int = 0, **overrides) -> PathFLIP:
    torch.manual_seed(seed)
    return PathFLIP(PathFLIPConfig(**{**TINY, **overrides}), tokenizer)


def grid_coords(cols: int, rows: int, keep: float = 1.0, seed: int = 0) -> np.ndarray:
    coords = np.stack(np.meshgrid(np.arange(cols) * PATCH, np.arange(rows) * PATCH), -1).reshape(-1, 2)
    return coords[np.random.default_rng(seed).random(len(coords)) < keep]


def random_slide(cols=12, rows=8, keep=0.8, seed=0, dim=16):
    coords = grid_coords(cols, rows, keep, seed)
    feats = np.random.default_rng(seed + 1).standard_normal((len(coords), dim)).astype(np.float32)
    return feats, coords


# ------------------------------------------------------------------------------------------------------ regions
def test_group_regions_from_coordinates():
    coords = np.array([[0, 0], [4096 + 256, 0], [256, 256], [0, 4096 * 2], [4095, 4095]])
    layout = group_regions(coords, patch_size_level0=256, region_patches=16)
    # row-major order: (col 0, row 0), (col 1, row 0), (col 0, row 2)
    np.testing.assert_array_equal(layout.grid, [[0, 0], [1, 0], [0, 2]])
    np.testing.assert_array_equal(layout.boxes, [[0, 0, 4096, 4096], [4096, 0, 8192, 4096], [0, 8192, 4096, 12288]])
    np.testing.assert_array_equal(layout.patch_region, [0, 1, 0, 2, 0])
    assert layout.index.shape == (3, 3)
    assert sorted(layout.index[0].tolist()) == [0, 2, 4]
    assert layout.index[1].tolist() == [1, -1, -1]
    # 40x slide: a 20x patch is 512 level-0 pixels, the region 8192
    assert group_regions(coords * 2, 512, 16).region_size_level0 == 8192
    with pytest.raises(PathflipError, match="patch_size_level0"):
        group_regions(grid_coords(20, 20), patch_size_level0=1024, region_patches=16, max_patches=256)


# ------------------------------------------------------------------------------------------------------ shapes
def test_inference_shapes(tokenizer):
    model = tiny_model(tokenizer).eval()
    feats, coords = random_slide()
    enc = model.encode_slide(torch.from_numpy(feats), torch.from_numpy(coords), PATCH)
    n = len(np.unique(coords // (PATCH * 4), axis=0))
    assert enc.slide_embedding.shape == (32,)
    assert enc.region_embeddings.shape == enc.region_keys.shape == (n, 32)
    assert enc.region_boxes.shape == (n, 4) and enc.patch_region.shape == (len(coords),)
    assert enc.mixer_inputs.shape == (2, n + 1, 32)
    text = model.encode_text(["tumour", "normal lung tissue", "mitosis"])
    assert text.shape == (3, 32)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    result = model.ground(enc, "tumour", top_k=3)
    assert result.region_scores.shape == (n,) and math.isclose(result.region_scores.sum(), 1.0, rel_tol=1e-5)
    assert result.top_boxes.shape == (3, 5)
    assert result.top_boxes[0, 4] == result.region_scores.max()
    assert result.patch_scores.shape == (len(coords),)
    explained = np.isin(enc.patch_region, result.explained_regions)
    assert np.isfinite(result.patch_scores[explained]).all() and np.isnan(result.patch_scores[~explained]).all()
    # the patch keys of explained regions are kept on the encoding; computed afresh they give the same scores
    assert set(enc.patch_keys) == set(result.explained_regions.tolist())
    again = model.ground(enc, "tumour", top_k=3)
    enc.patch_keys.clear()
    fresh = model.ground(enc, "tumour", top_k=3)
    np.testing.assert_allclose(again.patch_scores, fresh.patch_scores, atol=1e-6, equal_nan=True)
    probs = model.classify(enc, ["a", "b", "c"])
    assert probs.shape == (3,) and math.isclose(float(probs.sum()), 1.0, rel_tol=1e-5)
    assert model.classify(torch.stack([enc.slide_embedding] * 2), ["a", "b"]).shape == (2, 2)
    assert model.similarity(enc.slide_embedding, ["a", "b"]).shape == (1, 2)


# ----------------------------------------------------------------------------------------------------- masking
def _encode_batch(model, slides):
    feats = [torch.from_numpy(f) for f, _ in slides]
    layouts = [group_regions(c, PATCH, 4, 16) for _, c in slides]
    slide_tok, region_tok = model._visual_tokens(feats, [torch.from_numpy(lay.index) for lay in layouts])
    slide_emb, region_emb, valid, _ = model._mix(slide_tok, region_tok, [lay.positions for lay in layouts])
    return slide_emb, region_emb, valid


@pytest.mark.parametrize("positions", ["none", "fourier"])
def test_padding_and_row_order_change_nothing(tokenizer, positions):
    model = tiny_model(tokenizer, region_positions=positions).eval()
    small = random_slide(cols=8, rows=4, keep=0.6, seed=3)  # sparse: regions padded to the fullest one
    big = random_slide(cols=16, rows=12, keep=0.9, seed=5)  # more patches and regions: pads `small` in a batch
    with torch.no_grad():
        alone_slide, alone_regions, _ = _encode_batch(model, [small])
        batch_slide, batch_regions, valid = _encode_batch(model, [small, big])
    n = alone_regions.shape[1]
    assert valid[0].sum() == n < valid.shape[1]
    torch.testing.assert_close(batch_slide[0], alone_slide[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch_regions[0, :n], alone_regions[0], atol=1e-5, rtol=1e-5)

    # extra all-padding columns in the region index, in the training and the inference token layouts
    feats = torch.from_numpy(small[0])
    index = torch.from_numpy(group_regions(small[1], PATCH, 4, 16).index)
    padded = F.pad(index, (0, 7), value=-1)
    with torch.no_grad():
        ref_tok, ref_regions = model._visual_tokens([feats], [index])
        for slide_tok, region_tok in (model._visual_tokens([feats], [padded]), model._slide_tokens(feats, padded),
                                      model._slide_tokens(feats, index)):
            torch.testing.assert_close(region_tok[0], ref_regions[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(slide_tok, ref_tok, atol=1e-5, rtol=1e-5)

    # permuted patch rows: same regions, same embeddings, patch scores follow their rows
    enc = model.encode_slide(*small, PATCH)
    perm = np.random.default_rng(0).permutation(len(small[1]))
    enc_perm = model.encode_slide(small[0][perm], small[1][perm], PATCH)
    torch.testing.assert_close(enc_perm.region_embeddings, enc.region_embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc_perm.slide_embedding, enc.slide_embedding, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc.slide_embedding, alone_slide[0], atol=1e-5, rtol=1e-5)  # inference = training
    ground, ground_perm = model.ground(enc, "tumour"), model.ground(enc_perm, "tumour")
    np.testing.assert_allclose(ground_perm.region_scores, ground.region_scores, atol=1e-6)
    np.testing.assert_allclose(ground_perm.patch_scores, ground.patch_scores[perm], atol=1e-6, equal_nan=True)


def _projected_cross_attention(attention, x, tokens, valid):
    """The previous cross-attention, kept as the reference: every patch token projected to keys and values."""
    return attention(x, *attention.keys_values(tokens[..., :-1]), valid)


def _randomise(module: torch.nn.Module, std: float = 0.3) -> None:
    """Every weight and bias random: the biases start at zero, and the key and value biases are the terms the
    token-space attention has to get right."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(std=std)


@pytest.mark.parametrize("tokens_per_sequence", [40, 1])  # token space; short enough to project
def test_cross_attention_in_token_space_is_the_projected_maths(tokens_per_sequence):
    """Attention.attend_tokens against the projected keys/values: same outputs and same gradients (for the
    queries, the tokens and every weight; the key bias shifts all of a query's scores alike, so it never had a
    gradient but rounding noise and in token space has none), with padding; under attention dropout the ones
    column scales the value bias as the dropped weights do (all dropped: no bias, as before)."""
    from napari_pathflip.model.qformer import Attention

    torch.manual_seed(0)
    attention = Attention(48, 4, kv_width=20, eps=1e-12, dropout=0.0, attn_dropout=0.0).double()
    _randomise(attention)
    x = torch.randn(5, 8, 48, dtype=torch.float64, requires_grad=True)
    tokens = F.pad(torch.randn(5, tokens_per_sequence, 20, dtype=torch.float64), (0, 1), value=1.0).requires_grad_()
    valid = torch.rand(5, tokens_per_sequence) < 0.7
    valid[:, 0] = True
    grad_out = torch.randn(5, 8, 48, dtype=torch.float64)
    results = []
    for attend in (attention.attend_tokens, lambda *a: _projected_cross_attention(attention, *a)):
        attention.zero_grad()
        x.grad = tokens.grad = None
        out = attend(x, tokens, valid)
        out.backward(grad_out)
        results.append((out.detach(), x.grad, tokens.grad[..., :-1],
                        {name: p.grad.clone() for name, p in attention.named_parameters() if p.grad is not None}))
    (out, gx, gt, gp), (ref, rx, rt, rp) = results
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gt, rt, rtol=1e-10, atol=1e-10)
    assert set(rp) - set(gp) <= {"key.bias"} and float(rp["key.bias"].abs().max()) < 1e-12
    for name in gp:
        torch.testing.assert_close(gp[name], rp[name], rtol=1e-9, atol=1e-10, msg=name)

    attention.attn_dropout = 1.0
    attention.train()
    with torch.no_grad():
        torch.testing.assert_close(attention.attend_tokens(x, tokens, valid),
                                   _projected_cross_attention(attention, x, tokens, valid))


def test_slide_encoding_and_training_gradients_match_projected_cross_attention(tokenizer, monkeypatch):
    """The whole model in float32: encode_slide (region and slide embeddings) and the training layout's
    _visual_tokens with its gradients, against the previous cross-attention, on random weights and a slide with
    partly filled regions (padding)."""
    from napari_pathflip.model.qformer import Attention

    model = tiny_model(tokenizer)
    _randomise(model.qformer, std=0.1)
    feats, coords = random_slide(cols=16, rows=12, keep=0.6)
    slides = [torch.from_numpy(f) for f in (feats, random_slide(seed=3, keep=0.9)[0])]
    indices = [torch.from_numpy(group_regions(c, PATCH, 4, 16).index) for c in (coords, random_slide(seed=3)[1])]
    weights = [torch.randn(2, 32), torch.randn(group_regions(coords, PATCH, 4, 16).index.shape[0], 32)]

    def run():
        encoding = model.eval().encode_slide(feats, coords, PATCH)
        model.train().zero_grad()
        inputs = [f.clone().requires_grad_() for f in slides]
        slide_tok, region_tok = model._visual_tokens(inputs, indices)
        ((slide_tok * weights[0]).sum() + (region_tok[0] * weights[1]).sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return encoding, slide_tok.detach(), [f.grad for f in inputs], grads

    new, new_tok, new_feat_grads, new_grads = run()
    monkeypatch.setattr(Attention, "attend_tokens", _projected_cross_attention)
    ref, ref_tok, ref_feat_grads, ref_grads = run()
    for a, b in ((new.slide_embedding[None], ref.slide_embedding[None]), (new.region_embeddings, ref.region_embeddings),
                 (new_tok, ref_tok)):
        assert float((a - b).norm() / b.norm()) < 1e-5
        assert float(F.cosine_similarity(a, b, dim=-1).min()) > 1 - 1e-6
    assert {k for k in ref_grads.keys() - new_grads.keys() if not k.endswith("cross_attn.key.bias")} == set()
    for name in ref_grads:
        torch.testing.assert_close(new_grads.get(name, torch.zeros_like(ref_grads[name])), ref_grads[name],
                                   rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(new_feat_grads, ref_feat_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_demo_weights_encode_the_demo_slide_as_with_projected_cross_attention(tmp_path, monkeypatch):
    """The shipped demo weights on the demo slide's own features: the same slide and region embeddings."""
    from pathlib import Path

    from napari_pathflip.weights import WeightsFolder
    from napari_pathflip.extraction import extract_features
    from napari_pathflip.model.qformer import Attention

    model = PathFLIP.from_pretrained(WeightsFolder.resolve().path)
    demo = Path(__file__).resolve().parents[1] / "sample_data" / "demo_slide.tiff"
    features = extract_features(demo, tmp_path, "builtin", device="cpu")
    new = model.encode_slide(features.features, features.coords, features.patch_size_level0)
    monkeypatch.setattr(Attention, "attend_tokens", _projected_cross_attention)
    ref = model.encode_slide(features.features, features.coords, features.patch_size_level0)
    assert new.num_regions > 8
    for a, b in ((new.slide_embedding, ref.slide_embedding), (new.region_embeddings, ref.region_embeddings)):
        assert float((a - b).norm() / b.norm()) < 1e-5
        assert float(F.cosine_similarity(a, b, dim=-1).min()) > 1 - 1e-6


def test_mixer_own_path_reproduces_region_embeddings(tokenizer):
    """The patch attribution re-runs chosen mixer positions against cached context; at the cached inputs it must
    give back exactly the encoded region embeddings."""
    model = tiny_model(tokenizer).eval()
    enc = model.encode_slide(*random_slide(), PATCH)
    regions = torch.tensor([0, 3, enc.num_regions - 1])
    with torch.no_grad():
        h = enc.mixer_inputs[0].clone()[regions + 1]
        for layer, context in zip(model.mixer, enc.mixer_inputs.clone()):
            h = layer.forward_at(h, context, regions + 1)
        h = model.mixer_norm(h)
    torch.testing.assert_close(h, enc.region_embeddings[regions], atol=1e-5, rtol=1e-5)


def test_region_positions_tell_mirrored_slides_apart(tokenizer):
    """Without positions the mixer sees an unordered set of regions: a left-right mirrored slide (same regions,
    other places) encodes to the same slide embedding. With "fourier" positions it does not, and a region
    holding one patch gets that patch's one-patch-region key back exactly (the patch-level path adds its region's
    position too)."""
    feats, coords = random_slide(cols=12, rows=8, keep=1.0)
    mirrored = np.stack([11 * PATCH - coords[:, 0], coords[:, 1]], 1)
    lone = np.array([[16 * PATCH, 4 * PATCH]])  # region column 4: a region of one patch
    feats_lone = np.concatenate([feats, np.random.default_rng(9).standard_normal((1, feats.shape[1]))]).astype(
        np.float32)
    plain = tiny_model(tokenizer).eval()
    torch.testing.assert_close(plain.encode_slide(feats, mirrored, PATCH).slide_embedding,
                               plain.encode_slide(feats, coords, PATCH).slide_embedding, atol=1e-5, rtol=1e-5)
    model = tiny_model(tokenizer, region_positions="fourier").eval()
    with torch.no_grad():
        model.region_position.weight.normal_(std=0.5)  # as after training: positions matter
    a, b = (model.encode_slide(feats, c, PATCH).slide_embedding for c in (coords, mirrored))
    assert float(F.cosine_similarity(a, b, dim=0)) < 0.999
    enc = model.encode_slide(feats_lone, np.concatenate([coords, lone]), PATCH)
    region = int(enc.patch_region[-1])
    assert (enc.patch_region == region).sum() == 1
    model.ground(enc, "tumour", top_k=1, explain_regions=enc.num_regions)
    torch.testing.assert_close(enc.patch_keys[region][0], enc.region_keys[region], atol=1e-5, rtol=1e-5)
    with pytest.raises(PathflipError, match="region_positions"):
        PathFLIPConfig(region_positions="rope")


# ------------------------------------------------------------------------------------------------------- losses
def _ce(logits, target, smoothing=0.0):
    logp = [x - math.log(sum(math.exp(y) for y in logits)) for x in logits]
    return -(1 - smoothing) * logp[target] - smoothing * sum(logp) / len(logp)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_slide_loss_matches_hand_computation(smoothing):
    slide = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # cosine is scale-free: normalised to e_x, e_y
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # e_x, (e_x + e_y) / sqrt 2
    c = 1 / math.sqrt(2)
    sim = [[1.0, c], [0.0, c]]  # sim[i][j] = cos(slide_i, text_j)
    tau = 0.1
    rows = [_ce([sim[i][j] / tau for j in range(2)], i, smoothing) for i in range(2)]
    cols = [_ce([sim[i][j] / tau for i in range(2)], j, smoothing) for j in range(2)]
    expected = 0.5 * (sum(rows) / 2 + sum(cols) / 2)
    got = slide_contrastive_loss(slide, text, temperature=tau, label_smoothing=smoothing)
    assert math.isclose(got.item(), expected, rel_tol=1e-5)


@pytest.mark.parametrize("mode, scale", [("linear", math.log(1 / 0.07)), ("exp", 1 / 0.07)])
def test_region_loss_matches_hand_computation(mode, scale):
    conditioned = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]])
    text = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]]])
    labels = torch.tensor([[1.0, -1.0, -1.0]])
    cos = [1.0, 0.8, 0.0]
    expected = sum(math.log1p(math.exp(-y * scale * c)) for y, c in zip([1, -1, -1], cos)) / 3
    eta = torch.tensor(math.log(1 / 0.07))
    got = region_sigmoid_loss(conditioned, text, labels, eta, mode)
    assert math.isclose(got.item(), expected, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("positions", ["none", "fourier"])
def test_gradients_reach_every_parameter(tokenizer, positions):
    model = tiny_model(tokenizer, dropout=0.1, attention_dropout=0.1, mixer_dropout=0.1,
                       region_positions=positions).train()
    slides = [SlideInput(*random_slide(seed=s), PATCH) for s in range(3)]
    captions = ["tumour with necrosis.", "normal lung.", "lymphocytes and stroma."]
    subcaptions = [["tumour", "necrosis"], ["normal lung", "alveoli"], ["lymphocytes", "stroma"]]
    out = model(slides, captions, subcaptions, generator=torch.Generator().manual_seed(0))
    assert set(out) >= {"slide", "region", "total", "eta"}
    torch.testing.assert_close(out["total"], out["slide"] + out["region"])
    out["total"].backward()
    # a key bias adds the same score to all of a query's keys, which softmax ignores: cross-attention, computed in
    # the patch tokens' space, never uses it, so it is not trained (and DDP sees no parameter without a gradient)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("cross_attn.key.bias"))
    missing = [name for name, p in model.named_parameters() if p.requires_grad
               and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing


def test_training_samples_at_most_max_regions(tokenizer):
    model = tiny_model(tokenizer, max_regions=2).train()
    seen = []
    original = model._mix
    model._mix = lambda s, r, p: seen.append([t.shape[0] for t in r]) or original(s, r, p)
    slides = [SlideInput(*random_slide(seed=s), PATCH) for s in range(2)]
    model(slides, ["a", "b"], [["a"], ["b"]], generator=torch.Generator().manual_seed(0))
    assert seen == [[2, 2]]


# --------------------------------------------------------------------------------------------------- checkpoints
def test_save_load_round_trip(tokenizer, tmp_path):
    model = tiny_model(tokenizer).eval()
    feats, coords = random_slide()
    enc = model.encode_slide(feats, coords, PATCH)
    model.save_pretrained(tmp_path / "weights")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "weights").iterdir()}
    loaded = PathFLIP.from_pretrained(tmp_path / "weights")
    assert loaded.config == model.config
    enc2 = loaded.encode_slide(feats, coords, PATCH)
    torch.testing.assert_close(enc2.region_embeddings, enc.region_embeddings, atol=0, rtol=0)
    torch.testing.assert_close(loaded.encode_text(["necrosis"]), model.encode_text(["necrosis"]), atol=0, rtol=0)

    # a cached SlideEncoding grounds exactly like the fresh one
    enc.save(tmp_path / "slide.npz")
    cached = SlideEncoding.load(tmp_path / "slide.npz")
    a, b = model.ground(enc, "necrosis"), loaded.ground(cached, "necrosis")
    np.testing.assert_array_equal(a.region_scores, b.region_scores)
    np.testing.assert_allclose(a.patch_scores, b.patch_scores, equal_nan=True, atol=1e-7)


def test_a_mapped_encoding_reads_as_np_load_and_its_damage_is_detected(tokenizer, tmp_path):
    """What a library search maps (SlideEncoding.load(mapped=True)) is what np.load reads, grounds the same, and a
    flipped bit or a cut file is refused, not scored."""
    import dataclasses
    import zipfile

    from napari_pathflip.model import encoding as encoding_module

    model = tiny_model(tokenizer).eval()
    model.add_patch_head()
    feats, coords = random_slide()
    path = tmp_path / "slide.npz"
    model.encode_slide(feats, coords, PATCH).save(path)
    read = SlideEncoding.load(path, include_features=False)
    mapped = SlideEncoding.load(path, include_features=False, mapped=True)
    assert mapped.patch_features is None and mapped.patch_embeddings is not None
    for f in dataclasses.fields(SlideEncoding):
        if f.name != "patch_keys":
            np.testing.assert_array_equal(np.asarray(getattr(mapped, f.name)), np.asarray(getattr(read, f.name)))
    assert SlideEncoding.load(path, mapped=True).patch_features.shape == (len(coords), feats.shape[1])
    a, b = model.ground(read, "necrosis"), model.ground(mapped, "necrosis")
    np.testing.assert_array_equal(a.patch_scores, b.patch_scores)
    np.testing.assert_array_equal(a.region_scores, b.region_scores)
    assert mapped.patch_embeddings.data_ptr() % 64 == 0  # save_npz starts each array's data on 64 bytes
    with np.load(path) as data:  # a file np.savez wrote (data where the header ends) maps as well
        np.savez(tmp_path / "plain.npz", **dict(data.items()))
    plain = SlideEncoding.load(tmp_path / "plain.npz", include_features=False, mapped=True)
    assert torch.equal(plain.patch_embeddings, read.patch_embeddings)
    np.testing.assert_array_equal(plain.region_index, read.region_index)

    raw = path.read_bytes()
    flipped = bytearray(raw)
    flipped[raw.find(read.patch_embeddings.numpy().tobytes()[:256]) + 100] ^= 0x10
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="patch_embeddings is damaged"):
        SlideEncoding.load(tmp_path / "flipped.npz", include_features=False, mapped=True)
    (tmp_path / "cut.npz").write_bytes(raw[:len(raw) // 2])
    with pytest.raises((ValueError, zipfile.BadZipFile)):
        SlideEncoding.load(tmp_path / "cut.npz", include_features=False, mapped=True)
    assert str(path.resolve()) in {key[0] for key in encoding_module._CHECKED}  # checked once, trusted after


def test_patch_head_scores_every_patch_and_keeps_the_attention_path(tokenizer, tmp_path):
    model = tiny_model(tokenizer).eval()
    feats, coords = random_slide()
    plain = model.encode_slide(feats, coords, PATCH)
    attention = model.ground(plain, "necrosis", top_k=3)
    with pytest.raises(PathflipError, match="patch-head"):
        model.ground(plain, "necrosis", method="patch_head")

    torch.manual_seed(1)
    head = model.add_patch_head()
    with torch.no_grad():  # a head that is not the identity at init: random text map, nonzero feature statistics
        head.text.weight.normal_(std=0.3)
        head.feature_mean.normal_()
    enc = model.encode_slide(feats, coords, PATCH)
    assert enc.patch_embeddings.shape == (len(coords), 32)
    result = model.ground(enc, "necrosis", top_k=3)
    assert result.method == "patch_head" and attention.method == "attention"
    # every patch scored with a probability; a region's probability lies between its patches' mean and max
    assert np.isfinite(result.patch_scores).all() and ((result.patch_scores > 0) & (result.patch_scores < 1)).all()
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    for region in range(enc.num_regions):
        own = logit(result.patch_scores[enc.patch_region == region])
        assert own.mean() - 1e-6 <= logit(result.region_scores[region]) <= own.max() + 1e-6
    assert result.top_boxes[0, 4] == result.region_scores.max()
    # the paper's mechanism stays available and unchanged
    again = model.ground(enc, "necrosis", top_k=3, method="attention")
    np.testing.assert_array_equal(again.region_scores, attention.region_scores)

    # patch scores follow the patches when the rows are permuted (positions come from coordinates)
    perm = np.random.default_rng(0).permutation(len(coords))
    shuffled = model.ground(model.encode_slide(feats[perm], coords[perm], PATCH), "necrosis")
    np.testing.assert_allclose(shuffled.patch_scores, result.patch_scores[perm], rtol=1e-5)

    # saved and reloaded weights, and a cached encoding without patch features, ground the same
    model.save_pretrained(tmp_path / "weights")
    loaded = PathFLIP.from_pretrained(tmp_path / "weights")
    assert loaded.config.patch_head and loaded.patch_head is not None
    enc.save(tmp_path / "slide.npz", include_features=False)
    cached = SlideEncoding.load(tmp_path / "slide.npz")
    assert cached.patch_features is None
    b = loaded.ground(cached, "necrosis", top_k=3)
    np.testing.assert_allclose(b.patch_scores, result.patch_scores, rtol=1e-6)
    np.testing.assert_allclose(b.region_scores, result.region_scores, rtol=1e-6)
    assert not result.calibrated and result.presence is not None

    # calibrated weights: each patch's probability is presence x the calibrated map of its features, on every
    # slide alike (no per-slide normalisation); the presence is PathFLIP.presence's
    loaded.config.patch_calibration = [20.0, 10.0, 0.5, 5.0, -2.0]
    calibrated = loaded.ground(cached, "necrosis", top_k=3)
    assert calibrated.calibrated and calibrated.presence == pytest.approx(
        loaded.presence(cached, ["necrosis"])["necrosis"], rel=1e-5)
    with torch.inference_mode():
        s = loaded.patch_head.embed_text(loaded.encode_text(["necrosis"])[0]) @ cached.patch_embeddings.T
        features = calibration_features(s.double(), cached.patch_coords // PATCH).numpy()
    expected = calibrated.presence / (1 + np.exp(-(features @ [20.0, 10.0, 0.5, 5.0] - 2.0)))
    np.testing.assert_allclose(calibrated.patch_scores, expected, rtol=1e-6)
    assert calibrated.patch_scores.max() <= calibrated.presence
    np.testing.assert_array_equal(calibrated.region_scores, b.region_scores)  # regions rank as before
    with pytest.raises(PathflipError, match="patch_calibration"):
        PathFLIPConfig(patch_calibration=[1.0, float("nan"), 0.0, 0.0, 0.0])
    with pytest.raises(PathflipError, match="patch_calibration"):
        PathFLIPConfig(patch_calibration=[1.0, 0.0, 0.0, 0.0])


def test_calibration_features_by_hand():
    """Cosine, gap to the slide's best, z-score, and the best of the 8 neighbours' gap (no neighbour: the slide's
    lowest score), on a hand-made patch grid with a hole."""
    #  grid (column, row): a 3 x 2 block and a lone patch two columns away
    cells = np.array([[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1], [5, 1]]) + 10  # offsets do not matter
    s = torch.tensor([[0.1, 0.5, 0.2, 0.3, 0.9, 0.0, 0.8]], dtype=torch.float64)
    f = calibration_features(s, cells)[0].numpy()
    np.testing.assert_allclose(f[:, 0], s[0].numpy())
    np.testing.assert_allclose(f[:, 1], s[0].numpy() - 0.9)
    np.testing.assert_allclose(f[:, 2], (s[0].numpy() - s.mean().item()) / s.std().item())
    best_neighbour = np.array([0.9, 0.9, 0.9, 0.9, 0.5, 0.9, 0.0])  # the lone patch has none: the lowest, 0.0
    np.testing.assert_allclose(f[:, 3], best_neighbour - 0.9)


def test_half_precision_save_and_mean_text_pooling(tokenizer, tmp_path):
    """save_pretrained(dtype=float16) halves the file and reloads as float32 close to the original; text_pooling
    "mean" survives the config round trip and averages over real tokens only (padding changes nothing)."""
    model = tiny_model(tokenizer, text_pooling="mean").eval()
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    full, half = ((tmp_path / d / "model.safetensors").stat().st_size for d in ("full", "half"))
    assert half < 0.6 * full
    loaded = PathFLIP.from_pretrained(tmp_path / "half")
    assert loaded.config.text_pooling == "mean" and loaded.eta.dtype == torch.float32
    torch.testing.assert_close(loaded.encode_text(["necrosis"]), model.encode_text(["necrosis"]), atol=2e-3, rtol=0)
    alone = model.encode_text(["necrosis"])
    padded = model.encode_text(["necrosis", "a much longer caption that forces padding of the first one"])[:1]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)
    assert not torch.allclose(alone, tiny_model(tokenizer).eval().encode_text(["necrosis"]))
    with pytest.raises(PathflipError, match="text_pooling"):
        PathFLIPConfig(text_pooling="max")


def test_pickle_checkpoints_are_refused(tokenizer, tmp_path):
    model = tiny_model(tokenizer).eval()
    folder = tmp_path / "pickled"
    folder.mkdir()
    model.config.save(folder / "config.json")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(PathflipError, match="pickle"):
        PathFLIP.from_pretrained(folder)
    loaded = PathFLIP.from_pretrained(folder, allow_pickle=True)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(PathflipError, match="put a trained model folder there"):
        PathFLIP.from_pretrained(tmp_path / "missing")


def test_minilm_init_and_paper_config():
    """The real MiniLM initialisation reproduces Hugging Face BERT in text mode; the paper-scale config builds and
    encodes with random weights."""
    from transformers import BertModel

    model = PathFLIP.from_bert().eval()
    assert (model.config.hidden_size, model.config.num_layers, model.config.embed_dim) == (384, 6, 256)
    reference = BertModel.from_pretrained(str(default_bert_dir()), local_files_only=True).eval()
    tokens = model._tokens(["adenocarcinoma with lepidic growth", "benign"], 64)
    with torch.no_grad():
        ours = model.qformer.encode_text(**tokens)
        theirs = reference(**tokens).last_hidden_state
    mask = tokens["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-4, rtol=1e-4)
    layer = model.qformer.layers[0]
    assert torch.equal(layer.ffn.fc1.weight, layer.ffn_query.fc1.weight)

    torch.manual_seed(0)
    paper = PathFLIP(PathFLIPConfig.paper(), model.tokenizer).eval()
    assert (paper.config.hidden_size, paper.config.num_layers, paper.config.patch_dim) == (768, 12, 512)
    assert sum(layer.cross_attn is not None for layer in paper.qformer.layers) == 6
    feats, coords = random_slide(cols=20, rows=18, keep=0.7, dim=512)
    enc = paper.encode_slide(feats, coords, PATCH)
    assert enc.region_embeddings.shape == (len(np.unique(coords // 4096, axis=0)), 256)
    assert paper.encode_text(["tumour"]).shape == (1, 256)


# -------------------------------------------------------------------------------------------- short optimisation
CLASSES = ["necrosis", "mitosis", "lymphocytes", "adipose", "stroma", "mucin", "muscle", "hemorrhage"]


def synthetic_slide(rng, prototypes, classes, cols=3, rows=2):
    """A slide of cols x rows regions (4 x 4 patches, 15% background holes) filled with a background prototype;
    each named class fills 4 patches of its own region. Returns slide, caption, subcaptions, {class: (region,
    patch rows)} with regions in row-major order (the order group_regions uses)."""
    coords = grid_coords(cols * 4, rows * 4, keep=0.85, seed=int(rng.integers(1 << 31)))
    feats = prototypes[-1] + 0.5 * rng.standard_normal((len(coords), prototypes.shape[1])).astype(np.float32)
    region_of = (coords[:, 1] // (4 * PATCH)) * cols + coords[:, 0] // (4 * PATCH)
    truth = {}
    for c, region in zip(classes, rng.choice(cols * rows, len(classes), replace=False)):
        rows_in = rng.choice(np.flatnonzero(region_of == region), 4, replace=False)
        feats[rows_in] = prototypes[c] + 0.5 * rng.standard_normal((4, prototypes.shape[1]))
        truth[int(c)] = (int(region), rows_in)
    names = [CLASSES[c] for c in classes]
    caption = f"This slide shows {names[0]} and {names[1]}."
    return SlideInput(feats, coords, PATCH), caption, [f"region with {n}" for n in names], truth


def test_short_training_grounds_the_named_class(tokenizer, one_thread):
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    prototypes = np.random.default_rng(0).standard_normal((len(CLASSES) + 1, 16)).astype(np.float32) * 2
    model = tiny_model(tokenizer).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    history = []
    for _ in range(400):
        # 4 slides x 2 classes = the 8 classes once, so other slides' subcaptions are true negatives
        order = rng.permutation(len(CLASSES))
        batch = [synthetic_slide(rng, prototypes, order[2 * i:2 * i + 2]) for i in range(4)]
        out = model(*zip(*[b[:3] for b in batch]), generator=generator)
        optimiser.zero_grad()
        out["total"].backward()
        optimiser.step()
        history.append((out["slide"].item(), out["region"].item()))
    first, last = np.mean(history[:30], 0), np.mean(history[-30:], 0)
    assert last[0] < 0.5 * first[0] and last[1] < 0.5 * first[1], (first, last)

    model.eval()
    test_rng = np.random.default_rng(123)
    region_hits = patch_hits = total = 0
    for _ in range(10):
        slide, _, _, truth = synthetic_slide(test_rng, prototypes, test_rng.choice(len(CLASSES), 2, replace=False))
        enc = model.encode_slide(slide.features, slide.coords, PATCH)
        for c, (region, class_rows) in truth.items():
            result = model.ground(enc, f"region with {CLASSES[c]}", top_k=1, explain_regions=enc.num_regions)
            total += 1
            region_hits += result.top_regions[0] == region
            # within the named class's region, the patch that most supports the text is a class patch
            in_region = np.flatnonzero(enc.patch_region == region)
            patch_hits += in_region[np.argmax(result.patch_scores[in_region])] in class_rows
    assert region_hits / total >= 0.75, (region_hits, total)
    assert patch_hits / total >= 0.75, (patch_hits, total)
