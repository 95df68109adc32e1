"""The synthetic slide generator: determinism, files tiffslide reads, masks that match pixels, captions, questions,
splits, and textures that colour alone cannot tell apart."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from training import synthetic as S

ROOT = Path(__file__).resolve().parents[1]
SMALL = S.SyntheticConfig(width=4096, height=4096)
MEDIUM = S.SyntheticConfig(width=8192, height=6144)


@pytest.fixture(scope="module")
def test_specs():
    return [S.make_slide_spec(seed, "test", SMALL) for seed in range(64)]


def _cell_of(mask: np.ndarray) -> int:
    rows, cols = np.nonzero(mask)
    return min(2, int(3 * rows.mean() / mask.shape[0])) * 3 + min(2, int(3 * cols.mean() / mask.shape[1]))


def test_spec_and_pixels_are_deterministic():
    a, b = S.make_slide_spec(5, "train", MEDIUM), S.make_slide_spec(5, "train", MEDIUM)
    assert a.caption == b.caption and a.layout == b.layout and a.stain == b.stain
    assert np.array_equal(a.fine_labels, b.fine_labels) and np.array_equal(a.offsets, b.offsets)
    assert [q.__dict__ for q in a.questions] == [q.__dict__ for q in b.questions]
    box = (*a.findings[0].bbox[:2], 700, 500)
    assert np.array_equal(S.render_region(a, *box), S.render_region(b, *box))
    other = S.make_slide_spec(6, "train", MEDIUM)
    assert other.caption != a.caption and not np.array_equal(other.fine_labels, a.fine_labels)


def test_render_region_is_the_same_however_the_slide_is_cut():
    spec = S.make_slide_spec(1, "val", MEDIUM)
    # a window across tissue boundaries and off the slide's top-left corner
    x, y, w, h = -300, -200, 2900, 2300
    whole = S.render_region(spec, x, y, w, h)
    assert whole.shape == (h, w, 3) and whole.dtype == np.uint8
    assert (whole[:200, :300] > 200).all()  # off the slide: glass
    for cx, cy, cw, ch in [(0, 0, 257, 311), (1001, 77, 999, 1400), (2500, 2000, 400, 300), (123, 1999, 2777, 301)]:
        assert np.array_equal(S.render_region(spec, x + cx, y + cy, cw, ch), whole[cy : cy + ch, cx : cx + cw])
    coords = np.array([[100, 300], [1024, 768], [2000, 1500]])
    patches = S.render_patches(spec, coords, 256)
    for patch, (px, py) in zip(patches, coords):
        assert np.array_equal(patch, whole[py - y : py - y + 256, px - x : px - x + 256])


def test_written_slide_opens_in_tiffslide_with_mpp_levels_and_pixels(tmp_path):
    import tiffslide

    spec = S.make_slide_spec(2, "train", MEDIUM)
    path = S.write_slide(spec, tmp_path, "slide")
    slide = tiffslide.TiffSlide(path)
    assert slide.properties["tiffslide.mpp-x"] == pytest.approx(0.5)
    assert slide.properties["tiffslide.mpp-y"] == pytest.approx(0.5)
    assert slide.level_dimensions == ((8192, 6144), (2048, 1536), (512, 384))
    assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
    assert slide.properties["tiffslide.level[0].tile-width"] == 256
    x, y = spec.findings[0].bbox[:2]
    read = np.asarray(slide.read_region((x, y), 0, (512, 512)).convert("RGB")).astype(int)
    rendered = S.render_region(spec, x, y, 512, 512).astype(int)
    assert np.abs(read - rendered).mean() < 8  # JPEG, RGB decoded back correctly (not swapped or YCbCr)
    assert np.abs(read.mean((0, 1)) - rendered.mean((0, 1))).max() < 3
    # coarse levels show the same tissue (rendered from box-filtered textures, up to a sub-pixel shift)
    low = np.asarray(slide.read_region((x, y), 1, (128, 128)).convert("RGB")).astype(float)
    low_blocks = low.reshape(16, 8, 16, 8, 3).mean((1, 3))
    assert np.abs(low_blocks - rendered.reshape(16, 32, 16, 32, 3).mean((1, 3))).mean() < 6
    meta = json.loads((tmp_path / "slide.json").read_text())
    assert meta["caption"] == spec.caption and meta["mpp"] == 0.5 and meta["classes"] == list(S.CLASSES)
    assert [f["sentence"] for f in meta["findings"]] == [f.sentence for f in spec.findings]
    mask = np.asarray(Image.open(tmp_path / "slide_mask.png"))
    assert np.array_equal(mask, spec.labels) and mask.shape == (24, 32)
    for f_json, f in zip(meta["findings"], spec.findings):
        restored = np.zeros_like(f.mask)
        restored[tuple(np.array(f_json["patches"]).T)] = True
        assert np.array_equal(restored, f.mask)


def _texture_features(patches: np.ndarray) -> np.ndarray:
    """Colour-blind texture statistics of grey patches: contrast, band-pass energies at three scales, and the
    number and size of dark blobs (nuclei)."""
    feats = []
    for grey in patches.astype(np.float32).mean(-1) / 255.0:
        row = [grey.std(), *np.quantile(grey, [0.05, 0.5, 0.95])]
        row += [np.abs(ndimage.gaussian_filter(grey, s) - ndimage.gaussian_filter(grey, 2 * s)).mean()
                for s in (1, 3, 8)]
        dark = grey < np.quantile(grey, 0.05) + 0.08
        _, count = ndimage.label(dark)
        row += [count / 100.0, dark.mean() / (count + 1) * 100.0]
        feats.append(row)
    return np.array(feats)


def _labelled_patches(spec: S.SlideSpec, per_class: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Tissue patches at least 90 % covered by one class, up to per_class of each, with their mask labels."""
    per = spec.config.patch_size // spec.config.cell
    coords, labels = [], []
    for cls in range(1, len(S.CLASSES)):
        rows, cols = np.nonzero(S._coverage(spec.fine_labels, per, [cls]) >= 0.9 * per * per)
        pick = rng.permutation(len(rows))[:per_class]
        coords += [(cols[i] * spec.config.patch_size, rows[i] * spec.config.patch_size) for i in pick]
        labels += [cls] * len(pick)
    return S.render_patches(spec, coords), np.array(labels)


def test_masks_match_pixels_and_colour_alone_does_not_separate_classes():
    rng = np.random.default_rng(0)
    config = S.SyntheticConfig(width=8192, height=8192)
    sets = [_labelled_patches(S.make_slide_spec(seed, "train", config), 10, rng) for seed in range(12)]
    train_x, train_y = np.concatenate([s[0] for s in sets[:6]]), np.concatenate([s[1] for s in sets[:6]])
    test_x, test_y = np.concatenate([s[0] for s in sets[6:]]), np.concatenate([s[1] for s in sets[6:]])
    assert set(np.unique(test_y)) == set(range(1, len(S.CLASSES)))

    def accuracy(features) -> float:
        model = make_pipeline(StandardScaler(), NearestCentroid()).fit(features(train_x), train_y)
        return float((model.predict(features(test_x)) == test_y).mean())

    colour = accuracy(lambda p: p.reshape(len(p), -1, 3).mean(1))
    texture = accuracy(_texture_features)
    # the mask label of unseen slides' patches is predictable from their pixels: masks and pixels agree
    assert texture >= 0.9, texture
    # per-slide stain jitter makes mean colour an unreliable cue: tumour vs lymphocytes, stroma vs necrosis/glands
    assert colour <= 0.85, colour
    assert texture - colour >= 0.1


def test_fat_carries_colour_for_saturation_based_tissue_detection():
    seed = next(seed for seed in range(20) if S.layout_for(seed, "train").fat >= 0)
    spec = S.make_slide_spec(seed, "train", S.SyntheticConfig(width=8192, height=8192))
    coords, labels = spec.tissue_patches()
    rng = np.random.default_rng(1)
    glass = S.render_patches(spec, [[0, 0], [256, 0], [0, 256]])

    def saturation(patches):
        rgb = patches.reshape(len(patches), -1, 3).astype(float)
        return ((rgb.max(-1) - rgb.min(-1)) / np.maximum(rgb.max(-1), 1)).mean(1)

    fat = coords[labels == S.FAT]
    assert len(fat), f"layout of train seed {seed} has fat"
    fat_sat = saturation(S.render_patches(spec, fat[rng.permutation(len(fat))[:10]]))
    assert fat_sat.min() > 0.08 > 2 * saturation(glass).max()


def test_test_captions_are_distinct_and_describe_the_masks(test_specs):
    captions = [spec.caption for spec in test_specs]
    assert len(set(captions)) == 64
    names = {f.name for spec in test_specs for f in spec.findings}
    assert {"tumour", "necrosis", "lymphocytes", "stroma", "fat", "normal_glands"} <= names
    for spec in test_specs:
        for sentence in spec.sentences:
            assert sentence[0].isupper() and sentence.endswith(".") and sentence.count(".") == 1
        negative = ("No ", "There is no")
        assert [f.sentence for f in spec.findings] == [s for s in spec.sentences if not s.startswith(negative)]
        for finding in spec.findings:
            assert finding.mask.shape == spec.labels.shape and finding.mask.any()
            per = spec.config.patch_size // spec.config.cell  # masked patches show the finding's tissue
            in_mask = np.kron(finding.mask, np.ones((per, per), bool))
            in_mask = in_mask[: spec.fine_labels.shape[0], : spec.fine_labels.shape[1]]
            assert np.isin(spec.fine_labels[in_mask], finding.labels).mean() > 0.2
            places = [p for p, name in enumerate(S.POSITIONS) if f"the {name} part" in finding.sentence.lower()]
            if len(places) == 1 and "two" not in finding.sentence.lower():  # the place named is where it is
                assert _cell_of(np.isin(spec.fine_labels, finding.labels)) == places[0]
        if spec.layout.necrosis:  # necrosis sits inside the tumour nest
            necrosis = ndimage.binary_dilation(spec.fine_labels == S.NECROSIS, iterations=2)
            ring = necrosis & (spec.fine_labels != S.NECROSIS) & (spec.fine_labels != S.BACKGROUND)
            assert (spec.fine_labels[ring] == S.TUMOUR).mean() > 0.8  # (a nest may be cut by the section edge)


def test_questions_are_well_formed_and_answered_by_the_layout(test_specs):
    for spec in test_specs:
        assert 3 <= len(spec.questions) <= 5
        for q in spec.questions:
            assert list(q.options) == ["A", "B", "C", "D"] and len(set(q.options.values())) == 4
            assert q.answer in q.options and q.question.endswith("?")
            correct = q.options[q.answer]
            if q.question.startswith("How many tumour nests"):
                assert correct == ["None", "One", "Two"][len(spec.layout.tumour)]
            if q.question == "Where is the tumour nest located?":
                assert correct == f"In the {S.POSITIONS[spec.layout.tumour[0]]} part"
            if q.question.startswith("What is seen in the centre"):
                assert (correct == "Necrosis") == spec.layout.necrosis


def test_splits_never_share_a_layout():
    layouts = {split: [S.layout_for(seed, split) for seed in range(n)]
               for split, n in (("train", 400), ("val", 100), ("test", 150))}
    for split, items in layouts.items():
        assert all(layout.split() == split for layout in items)
    train, val, test = (set(layouts[s]) for s in S.SPLITS)
    assert not train & test and not train & val and not val & test
    assert len(test) > 100  # many different test layouts, not a handful repeated
    assert S.make_slide_spec(3, "test", SMALL).caption != S.make_slide_spec(3, "train", SMALL).caption
    with pytest.raises(ValueError):
        S.make_slide_spec(0, "holdout", SMALL)


def test_demo_slide_is_regenerated_bit_for_bit(tmp_path):
    bundled = ROOT / "sample_data"
    names = ["demo_slide.tiff", "demo_slide.json", "demo_slide_mask.png"]
    assert sum((bundled / n).stat().st_size for n in names) < 25e6
    S.write_demo_slide(tmp_path)
    for name in names:
        assert (tmp_path / name).read_bytes() == (bundled / name).read_bytes(), name
    meta = json.loads((bundled / "demo_slide.json").read_text())
    assert {f["name"] for f in meta["findings"]} >= {"tumour", "necrosis", "lymphocytes", "stroma", "fat",
                                                       "normal_glands"}
    assert re.search(r"necro", meta["caption"], re.I) and re.search(r"lymphocytes", meta["caption"], re.I)
    assert meta["width"] >= 2 * 4096 and meta["height"] >= 2 * 4096  # 4 regions of 4,096 px at least


def test_cli_writes_slides(tmp_path):
    assert S.main(["--out", str(tmp_path), "--count", "2", "--seed", "3", "--split", "val", "--size", "4096"]) == 0
    for seed in (3, 4):
        meta = json.loads((tmp_path / f"val_{seed:05d}.json").read_text())
        assert meta["split"] == "val" and meta["seed"] == seed and (tmp_path / f"val_{seed:05d}.tiff").is_file()
        assert meta["caption"] == S.make_slide_spec(seed, "val", S.SyntheticConfig(width=4096, height=4096)).caption
