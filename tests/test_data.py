"""Synthetic corpus builder and the alignment datasets, on small synthetic slides."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from napari_pathflip.encoders import build_encoder
from napari_pathflip.errors import PathflipError
from napari_pathflip.features import read_h5
from training.data import (AlignmentDataset, FeatureSlides, build_synthetic_corpus, collate_alignment,
                           jpeg_round_trip, main)
from training.sources import Record, read_caption_csv, read_llava_json, read_vqa_csv
from training.synthetic import POSITIONS, SyntheticConfig, make_slide_spec, render_patches, write_slide
from training.text import split_sentences

SMALL_SLIDE = SyntheticConfig(width=4096, height=4096)  # 16 x 16 patches, ~170 of them tissue


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    calls = []
    split_dir = build_synthetic_corpus(root, "test", 3, seed0=5, config=SMALL_SLIDE,
                                       progress=lambda *a: calls.append(a))
    assert calls[-1] == (3, 3, "synth-test-0007")
    return split_dir


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A small synthetic slide written as a JPEG-tiled TIFF and its features extracted by the plugin's code."""
    from napari_pathflip.extraction import ExtractionConfig, extract_features

    root = tmp_path_factory.mktemp("extracted")
    spec = make_slide_spec(2, "val", SMALL_SLIDE)
    tiff = write_slide(spec, root / "slides", "val2")
    feature_set = extract_features(tiff, root / "store", "builtin", device="cpu",
                                   config=ExtractionConfig(num_workers=0))
    return spec, root / "store", feature_set


def test_corpus_files_read_back_with_the_source_readers(corpus):
    ids = [f"synth-test-{s:04d}" for s in (5, 6, 7)]
    specs = [make_slide_spec(s, "test", SMALL_SLIDE) for s in (5, 6, 7)]
    captions = read_caption_csv(corpus / "captions.csv")
    assert [r.slide_id for r in captions] == ids
    assert [r.slide for r in captions] == [f"features/{i}.h5" for i in ids]
    assert [r.turns[0][1] for r in captions] == [s.caption for s in specs]

    vqa = read_vqa_csv(corpus / "vqa.csv")
    expected = [(i, q) for i, s in zip(ids, specs) for q in s.questions]
    assert len(vqa) == len(expected)
    for record, (slide_id, q) in zip(vqa, expected):
        assert record.slide_id == slide_id and record.answer == q.answer
        assert record.options == tuple(q.options[letter] for letter in "ABCD")

    conversations = read_llava_json(corpus / "instruct.json")
    dialogues = [r for r in conversations if r.id.endswith("-dialogue")]
    conversations = [r for r in conversations if not r.id.endswith("-dialogue")]
    assert [r.task for r in conversations].count("caption") == 3
    assert [r.task for r in conversations].count("vqa") == len(expected)
    # each slide's caption and questions once more as one multi-turn conversation, in that order
    for dialogue, slide_id, spec in zip(dialogues, ids, specs):
        assert dialogue.slide_id == slide_id and dialogue.turns[0][1] == spec.caption
        assert [answer for _, answer in dialogue.turns[1:]] == [f"{q.answer}. {q.options[q.answer].rstrip('.')}."
                                                               for q in spec.questions]
    for record, (_, q) in zip([r for r in conversations if r.task == "vqa"], expected):
        assert record.answer == q.answer  # "X. reason" parses to the letter
        assert record.turns[0][1] == f"{q.answer}. {q.options[q.answer].rstrip('.')}."
    raw = json.loads((corpus / "instruct.json").read_text())
    assert all(item["conversations"][0]["value"].startswith("<image>\n") for item in raw)

    # facts.json: every caption sentence is true of its own slide; a tumour's place is a fact of the slide
    facts = json.loads((corpus / "facts.json").read_text())
    for slide_id, spec in zip(ids, specs):
        true = set(facts["slides"][slide_id])
        assert all(set(facts["sentences"][sentence]) <= true for sentence in spec.sentences)
        assert ("tumour" in true) == bool(spec.layout.tumour)
        assert {f"tumour@{POSITIONS[p]}" for p in spec.layout.tumour} <= true
    assert facts["phrases"]["fat in the lower left part"] == ["fat@lower left"]


def test_features_and_truth_describe_the_slide(corpus):
    spec = make_slide_spec(6, "test", SMALL_SLIDE)
    feature_set = read_h5(corpus / "features" / "synth-test-0006.h5")
    coords, _ = spec.tissue_patches()
    np.testing.assert_array_equal(feature_set.coords, coords)
    assert feature_set.patch_size_level0 == 256 and feature_set.features.shape == (len(coords), 105)
    encoder = build_encoder("builtin")
    some = [0, len(coords) // 2, len(coords) - 1]
    expected = encoder.encode(jpeg_round_trip(render_patches(spec, coords[some]), SMALL_SLIDE.jpeg_quality))
    np.testing.assert_allclose(feature_set.features[some], expected.numpy(), rtol=1e-5, atol=1e-5)

    with np.load(corpus / "truth" / "synth-test-0006.npz", allow_pickle=False) as truth:
        assert list(truth["finding_names"]) == [f.name for f in spec.findings]
        assert list(truth["finding_sentences"]) == [f.sentence for f in spec.findings]
        np.testing.assert_array_equal(truth["finding_masks"], np.stack([f.mask for f in spec.findings]))
        np.testing.assert_array_equal(truth["labels"], spec.labels)
        assert int(truth["patch_size"]) == 256


def test_resume_skips_finished_slides_and_extends(corpus, tmp_path):
    import shutil

    split = tmp_path / "test"
    shutil.copytree(corpus, split)
    kept = (split / "features" / "synth-test-0005.h5").stat().st_mtime_ns
    (split / "truth" / "synth-test-0006.npz").unlink()  # as if killed between the features and the truth
    (split / "features" / "synth-test-0006.h5").write_bytes(b"half a file")
    assert main(["--split", "test", "--count", "4", "--seed0", "5", "--out", str(tmp_path), "--size", "4096"]) == 0
    assert (split / "features" / "synth-test-0005.h5").stat().st_mtime_ns == kept
    rebuilt = read_h5(split / "features" / "synth-test-0006.h5")
    np.testing.assert_array_equal(rebuilt.features, read_h5(corpus / "features" / "synth-test-0006.h5").features)
    assert [r.slide_id for r in read_caption_csv(split / "captions.csv")][-1] == "synth-test-0008"
    assert not list(split.rglob(".*.tmp"))


def test_jpeg_round_trip_reproduces_features_extracted_from_the_tiff(extracted):
    """The builder's features equal what the plugin extracts from the written (JPEG-tiled) slide."""
    spec, _, extracted = extracted
    coords, _ = spec.tissue_patches()
    rows = {tuple(c): i for i, c in enumerate(coords.tolist())}
    common = [(i, rows[tuple(c)]) for i, c in enumerate(extracted.coords.tolist()) if tuple(c) in rows]
    assert len(common) > 0.9 * len(coords)  # the tissue masks differ only at a few border patches
    pick = np.array(common[:: max(1, len(common) // 24)])
    encoder = build_encoder("builtin")
    patches = render_patches(spec, coords[pick[:, 1]])
    with_jpeg = encoder.encode(jpeg_round_trip(patches, SMALL_SLIDE.jpeg_quality)).numpy()
    without = encoder.encode(patches).numpy()
    np.testing.assert_allclose(with_jpeg, extracted.features[pick[:, 0]], rtol=1e-4, atol=1e-4)
    assert np.abs(without - extracted.features[pick[:, 0]]).max() > 1e-2  # JPEG does matter


def test_feature_slides_over_folders_stores_and_clam_files(corpus, extracted, tmp_path):
    slides = FeatureSlides(corpus / "features")
    assert sorted(slides) == ["synth-test-0005", "synth-test-0006", "synth-test-0007"]
    item = slides["synth-test-0005"]
    assert item.features.dtype == torch.float32 and item.patch_size_level0 == 256
    assert len(item.coords) == len(item.features)

    # a feature store root is keyed by the slide name in each manifest
    _, store_root, feature_set = extracted
    store = FeatureSlides(store_root)
    assert list(store) == ["val2"]
    np.testing.assert_array_equal(store["val2"].features.numpy(), feature_set.features)
    assert list(FeatureSlides(store_root, encoder_id=feature_set.encoder_id)) == ["val2"]
    with pytest.raises(PathflipError, match="no feature files"):
        FeatureSlides(store_root, encoder_id="conch-v1")

    # CLAM files carry no patch size: it must be given
    clam = tmp_path / "clam"
    clam.mkdir()
    with h5py.File(clam / "TCGA-XX-0001-01Z-00-DX1.ABC.h5", "w") as f:
        f["features"] = np.ones((3, 8), np.float32)
        f["coords"] = np.array([[0, 0], [512, 0], [0, 512]])
    with pytest.raises(PathflipError, match="patch_size_level0"):
        FeatureSlides(clam)["TCGA-XX-0001-01Z-00-DX1.ABC"]
    assert FeatureSlides(clam, patch_size_level0=512)["TCGA-XX-0001-01Z-00-DX1.ABC"].patch_size_level0 == 512


def test_alignment_dataset_draws_subcaptions_per_the_spec(corpus):
    slides = FeatureSlides(corpus / "features", cache=True)
    records = read_caption_csv(corpus / "captions.csv")
    vqa = read_vqa_csv(corpus / "vqa.csv")
    dataset = AlignmentDataset(slides, records + vqa, seed=3)
    assert len(dataset) == 3  # question records carry no description
    slide, caption, subcaptions = dataset[1]
    assert slide is slides["synth-test-0006"] and caption == records[1].turns[0][1]
    sentences = split_sentences(caption)
    assert len(subcaptions) == 8
    for sub in subcaptions:
        parts = split_sentences(sub)
        assert 1 <= len(parts) <= 3 and set(parts) <= set(sentences)
    assert dataset[1][2] == subcaptions  # the same item reads the same wherever it is read
    draws = []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        draws.append(dataset[1][2])
    assert len({tuple(d) for d in draws}) > 1  # ... and changes with the epoch

    batch = collate_alignment([dataset[0], dataset[2]])
    assert [len(s.features) for s in batch["slides"]] == [len(slides["synth-test-0005"].features),
                                                         len(slides["synth-test-0007"].features)]
    assert len(batch["captions"]) == 2 and all(len(s) == 8 for s in batch["subcaptions"])


def test_missing_feature_files_are_named(corpus):
    slides = FeatureSlides(corpus / "features")
    records = read_caption_csv(corpus / "captions.csv")
    extra = [Record(id=f"x{i}", slide=f"features/absent-{i}.h5", turns=(("q", "A caption."),), task="caption")
             for i in range(7)]
    with pytest.raises(PathflipError, match=r"7 of 10 caption records .*absent-0, absent-1, .*\.\.\."):
        AlignmentDataset(slides, records + extra)
