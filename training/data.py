"""Training data: the synthetic corpus builder and the datasets that join patch features to captions.

A split folder (what `python -m training corpus` writes, and what a user can assemble for real data):

    features/<slide_id>.h5   CLAM/TRIDENT HDF5: `features` [N, D], level-0 `coords` [N, 2] (+ patch_size_level0)
    captions.csv             SlideBench caption CSV (ID, Slide, Tumor, Question, Caption); Slide = features/<id>.h5
    vqa.csv                  SlideBench VQA CSV (ID, Slide, Tumor, Broad/Narrow Category, Question, A-D, Answer)
    instruct.json            LLaVA-style conversations (SlideInstruction layout): one caption and the
                             multiple-choice questions of every slide, and all of them as one multi-turn dialogue
    facts.json               synthetic only: what each caption sentence (and each short phrase named after a fact)
                             asserts and what is true of each slide (training.synthetic.sentence_facts), for exact
                             labels in the patch-head stage
    truth/<slide_id>.npz     synthetic ground truth: patch-grid labels, every finding's name, sentence and patch
                             mask, plus the caption and questions the text files are rebuilt from

Synthetic features must look exactly like those the plugin computes at run time from the JPEG-compressed TIFF
(`napari_pathflip.extraction.extract_features`). The generator renders the same pixels as the TIFF before
compression, and a 256-px patch on the 256-px grid is exactly one JPEG tile, so compressing each rendered patch
with Pillow at the slide's quality reproduces the decoded tile: on the demo slide the features of such patches
equal the extracted ones (cosine 1.0000 on every common patch), while uncompressed renders differ by up to 3
feature standard deviations on texture dimensions. Patches are the slide's
tissue patches on the label grid; the extractor's tissue mask differs from it only at a few border patches.

A slide is finished when its truth file exists: it is written (atomically, like every file here) after the
features, so an interrupted build resumes at the first unfinished slide. The text files are rebuilt from the truth
files at the end of every run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from napari_pathflip.chat import option_answer
from napari_pathflip.errors import PathflipError
from napari_pathflip.features import FeatureSet, read_h5, write_h5
from napari_pathflip.files import atomic_write, atomic_write_text
from napari_pathflip.model import SlideInput
from training.sources import (CAPTION_COLUMNS, OPTION_LETTERS, VQA_COLUMNS, Record, format_choice_question,
                              slide_key)
from training.text import SubcaptionConfig, sample_subcaptions, split_sentences

CAPTION_PROMPT = "Describe the tissue in this whole-slide image: what is present and where."
TUMOR_NAME = "synthetic"  # SlideBench's Tumor column (the cancer type) for synthetic slides
ProgressFn = Callable[[int, int, str], None]  # (slides done, total, slide id)


def slide_name(split: str, seed: int) -> str:
    return f"synth-{split}-{seed:04d}"


# -------------------------------------------------------------------------------------------- synthetic corpus


def jpeg_round_trip(patches: np.ndarray, quality: int) -> np.ndarray:
    """Compress and decode each uint8 patch [N, p, p, 3] as a baseline JPEG (the TIFF tiles' codec)."""
    from PIL import Image

    out = np.empty_like(patches)
    for i, patch in enumerate(patches):
        buffer = io.BytesIO()
        Image.fromarray(patch).save(buffer, format="JPEG", quality=int(quality))
        buffer.seek(0)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


def synthetic_features(spec, encoder, batch_size: int = 128, jpeg: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D] float32, coords [N, 2]) of a SlideSpec's tissue patches, as the extractor would see them."""
    from training.synthetic import render_patches

    coords, _ = spec.tissue_patches()
    parts = []
    for start in range(0, len(coords), batch_size):
        patches = render_patches(spec, coords[start:start + batch_size])
        if jpeg:
            patches = jpeg_round_trip(patches, spec.config.jpeg_quality)
        parts.append(encoder.encode(patches).numpy().astype(np.float32))
    dim = int(encoder.dim)
    return (np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)), coords


def _truth_arrays(spec) -> dict[str, np.ndarray]:
    masks = np.stack([f.mask for f in spec.findings]) if spec.findings else np.zeros((0, *spec.labels.shape), bool)
    questions = [{"question": q.question, "options": q.options, "answer": q.answer} for q in spec.questions]
    return {
        "labels": spec.labels,
        "patch_size": np.int64(spec.config.patch_size),
        "finding_names": np.array([f.name for f in spec.findings], dtype=str),
        "finding_sentences": np.array([f.sentence for f in spec.findings], dtype=str),
        "finding_masks": masks.astype(bool),
        "caption": np.array(spec.caption),
        "sentences": np.array(spec.sentences, dtype=str),
        "questions": np.array(json.dumps(questions)),
        "layout": np.array(spec.layout.key()),
        "seed": np.int64(spec.seed),
        "split": np.array(spec.split),
    }


def _write_npz(path: Path, arrays: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)


def build_slide(spec, out_dir: str | Path, slide_id: str, encoder, *, batch_size: int = 128,
                jpeg: bool = True) -> None:
    """Write features/<slide_id>.h5 then truth/<slide_id>.npz (the completion mark) for one SlideSpec."""
    from napari_pathflip.tiling import region_ids

    out_dir = Path(out_dir)
    cfg = spec.config
    features, coords = synthetic_features(spec, encoder, batch_size, jpeg)
    region_patches = 16  # informational (the model regroups patches with its own region size)
    ids, origins = region_ids(coords, cfg.patch_size * region_patches)
    attrs = {
        "slide_name": slide_id, "patch_size": cfg.patch_size, "patch_size_level0": cfg.patch_size,
        "region_patches": region_patches, "region_size_level0": cfg.patch_size * region_patches,
        "level0_magnification": round(10.0 / cfg.mpp, 3), "target_magnification": round(10.0 / cfg.mpp, 3),
        "mpp": [cfg.mpp, cfg.mpp], "encoder_id": encoder.encoder_id, "encoder_name": encoder.name,
        "dim": int(encoder.dim), "dtype": "float32", "synthetic_seed": spec.seed, "synthetic_split": spec.split,
        "jpeg_quality": cfg.jpeg_quality if jpeg else None, "width": cfg.width, "height": cfg.height,
    }
    write_h5(FeatureSet(features, coords, ids, origins, attrs), out_dir / "features" / f"{slide_id}.h5")
    _write_npz(out_dir / "truth" / f"{slide_id}.npz", _truth_arrays(spec))


def _narrow_category(question: str) -> str:
    q = question.lower()
    if q.startswith("how many"):
        return "Counting"
    if q.startswith("where"):
        return "Location"
    if "present" in q or "absent" in q:
        return "Presence"
    return "Morphology"


def write_text_files(split_dir: str | Path, slide_ids: Sequence[str]) -> None:
    """captions.csv, vqa.csv and instruct.json of a split folder from its truth files, in `slide_ids` order."""
    split_dir = Path(split_dir)
    from training.synthetic import Layout, fact_phrases, sentence_facts, slide_facts

    captions, vqa, conversations, dialogues = [], [], [], []
    facts = {"sentences": {}, "slides": {}, "phrases": fact_phrases()}
    for slide_id in slide_ids:
        with np.load(split_dir / "truth" / f"{slide_id}.npz", allow_pickle=False) as truth:
            caption = str(truth["caption"])
            questions = json.loads(str(truth["questions"]))
            layout = Layout.from_key(str(truth["layout"]))
            named = dict(zip(map(str, truth["finding_sentences"]), map(str, truth["finding_names"])))
            names = [named.get(str(sentence), "no_tumour") for sentence in truth["sentences"]]  # the one unnamed
            for sentence, name in zip(map(str, truth["sentences"]), names):
                facts["sentences"][sentence] = sentence_facts(layout, name)
            facts["slides"][slide_id] = slide_facts(layout, names)
        reference = f"features/{slide_id}.h5"
        captions.append({"ID": str(len(captions) + 1), "Slide": reference, "Tumor": TUMOR_NAME,
                         "Question": CAPTION_PROMPT, "Caption": caption})
        conversations.append({"id": f"{slide_id}-caption", "image": [reference], "conversations": [
            {"from": "human", "value": "<image>\n" + CAPTION_PROMPT}, {"from": "gpt", "value": caption}]})
        # the same turns as one multi-turn conversation: the chat learns to answer after its own description
        dialogue = list(conversations[-1]["conversations"])
        for k, q in enumerate(questions):
            options = [q["options"].get(letter, "") for letter in OPTION_LETTERS]
            vqa.append({"ID": str(len(vqa) + 1), "Slide": reference, "Tumor": TUMOR_NAME,
                        "Broad Category": "Microscopy", "Narrow Category": _narrow_category(q["question"]),
                        "Question": q["question"], **dict(zip(OPTION_LETTERS, options)), "Answer": q["answer"]})
            answer = option_answer(q["answer"], q["options"][q["answer"]])
            conversations.append({"id": f"{slide_id}-q{k}", "image": [reference], "conversations": [
                {"from": "human", "value": "<image>\n" + format_choice_question(q["question"], options)},
                {"from": "gpt", "value": answer}]})
            dialogue += [{"from": "human", "value": format_choice_question(q["question"], options)},
                         {"from": "gpt", "value": answer}]
        dialogues.append({"id": f"{slide_id}-dialogue", "image": [reference], "conversations": dialogue})

    def csv_text(columns, rows) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    atomic_write_text(split_dir / "captions.csv", csv_text(CAPTION_COLUMNS, captions))
    atomic_write_text(split_dir / "vqa.csv", csv_text(VQA_COLUMNS, vqa))
    atomic_write_text(split_dir / "instruct.json", json.dumps(conversations + dialogues, indent=1) + "\n")
    atomic_write_text(split_dir / "facts.json", json.dumps(facts, indent=1, sort_keys=True) + "\n")


def slide_config(config, split: str, seed: int, sizes: Sequence[int] | None):
    """The geometry of one corpus slide: `config` (default SyntheticConfig()), its width and height each drawn
    from `sizes` by (split, seed) when sizes are given (slides of several sizes and shapes)."""
    import dataclasses

    from training.synthetic import SPLITS, SyntheticConfig

    config = config or SyntheticConfig()
    if not sizes:
        return config
    width, height = np.random.default_rng([SPLITS.index(split), seed, 7]).choice(np.asarray(sizes), 2)
    return dataclasses.replace(config, width=int(width), height=int(height))


def build_synthetic_corpus(out_dir: str | Path, split: str, count: int, *, seed0: int = 0,
                           encoder="builtin", config=None, sizes: Sequence[int] | None = None,
                           batch_size: int = 128, jpeg: bool = True, progress: ProgressFn | None = None) -> Path:
    """Build (or finish) the split folder out_dir/<split> with `count` synthetic slides, seeds seed0.. .

    `config` (a training.synthetic.SyntheticConfig) changes the slide geometry, e.g. smaller slides for tests;
    `sizes` draws each slide's width and height from these (slide_config); `jpeg=False` skips the JPEG round trip
    (features of the uncompressed pixels). Returns the split folder.
    """
    from napari_pathflip.encoders import build_encoder
    from training.synthetic import SPLITS, make_slide_spec

    if split not in SPLITS:
        raise PathflipError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if count < 1:
        raise PathflipError("--count must be at least 1")
    split_dir = Path(out_dir) / split
    encoder = build_encoder(encoder)
    ids = [slide_name(split, seed) for seed in range(seed0, seed0 + count)]
    for done, (seed, slide_id) in enumerate(zip(range(seed0, seed0 + count), ids)):
        finished = (split_dir / "truth" / f"{slide_id}.npz").is_file() and \
            (split_dir / "features" / f"{slide_id}.h5").is_file()
        if not finished:
            build_slide(make_slide_spec(seed, split, slide_config(config, split, seed, sizes)), split_dir,
                        slide_id, encoder, batch_size=batch_size, jpeg=jpeg)
        if progress:
            progress(done + 1, count, slide_id)
    write_text_files(split_dir, ids)
    return split_dir


# ---------------------------------------------------------------------------------------------------- datasets


class FeatureSlides(Mapping):
    """Patch-feature files keyed by slide id, from folders of CLAM/TRIDENT .h5 files and/or feature store roots.

    A store root (napari_pathflip.features.SlideStore folders, each with manifest.json) is keyed by the slide name
    in its manifest; any other .h5 file under a folder by its file name (slide_key). `encoder_id` keeps only the
    store entries of one encoder (a store may hold several per slide). `patch_size_level0` is needed for CLAM
    files, which do not record it. `cache=True` keeps every slide read in memory (small corpora, many epochs).
    """

    def __init__(self, roots: str | Path | Iterable[str | Path], *, encoder_id: str | None = None,
                 patch_size_level0: int | None = None, cache: bool = False):
        roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
        self.patch_size_level0 = patch_size_level0
        self.cache = cache
        self._memory: dict[str, SlideInput] = {}
        self.paths: dict[str, Path] = {}
        for root in map(Path, roots):
            if not root.is_dir():
                raise PathflipError(f"feature folder not found: {root}. Check the path.")
            self._index(root, encoder_id)
        if not self.paths:
            raise PathflipError(f"no feature files (.h5) under {', '.join(map(str, roots))}: extract features "
                                "first (`pathflip extract`) or point at a CLAM/TRIDENT h5 folder.")

    def _add(self, key: str, path: Path) -> None:
        if key in self.paths and self.paths[key] != path:
            raise PathflipError(f"slide {key} has two feature files: {self.paths[key]} and {path}. Keep one, or "
                                "pass encoder_id to choose between store entries.")
        self.paths[key] = path

    def _index(self, root: Path, encoder_id: str | None) -> None:
        stores = set()
        for manifest in sorted(root.rglob("manifest.json")):
            try:
                data = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            stores.add(manifest.parent)
            if data.get("complete") and (encoder_id is None or data.get("encoder_id") == encoder_id):
                self._add(slide_key(str(data.get("slide_name") or manifest.parent.name)),
                          manifest.parent / "features.h5")
        for pattern in ("*.h5", "*.hdf5"):
            for path in sorted(root.rglob(pattern)):
                if path.parent not in stores and not path.name.startswith("."):
                    self._add(slide_key(path.name), path)

    def __getitem__(self, slide_id: str) -> SlideInput:
        if slide_id in self._memory:
            return self._memory[slide_id]
        feature_set = read_h5(self.paths[slide_id], patch_size_level0=self.patch_size_level0)
        slide = SlideInput(torch.from_numpy(np.asarray(feature_set.features, np.float32)),
                           torch.from_numpy(feature_set.coords), feature_set.patch_size_level0)
        if self.cache:
            self._memory[slide_id] = slide
        return slide

    def __iter__(self):
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def feature_dim(self) -> int:
        import h5py

        with h5py.File(next(iter(self.paths.values())), "r") as f:
            return int(f["features"].shape[-1])


def missing_slides_error(missing: Sequence[str], total: int, where: str) -> PathflipError:
    shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    return PathflipError(f"{len(missing)} of {total} caption records have no feature file in {where} "
                         f"(first: {shown}). Extract their features or remove the records.")


class AlignmentDataset(torch.utils.data.Dataset):
    """Caption records joined to their slides' features. Item i = (SlideInput, caption, K subcaptions).

    Only caption records are used (VQA records carry no description). Subcaptions are drawn by the spec's sampler
    from a generator seeded by (seed, epoch, i), so an item is the same whenever and wherever it is read (a
    resumed or distributed run sees exactly the data an uninterrupted one does); call `set_epoch` every epoch.
    """

    def __init__(self, slides: Mapping[str, SlideInput], records: Sequence[Record],
                 subcaption_config: SubcaptionConfig | None = None, seed: int = 0):
        self.slides = slides
        self.records = [r for r in records if r.task == "caption"]
        if not self.records:
            raise PathflipError("no caption records: alignment needs slide descriptions (a SlideBench caption CSV "
                                "or LLaVA JSON with caption conversations).")
        missing = list(dict.fromkeys(r.slide_id for r in self.records if r.slide_id not in slides))
        if missing:
            where = getattr(slides, "paths", None)
            where = "the feature folders" if where is None else f"{len(slides)} indexed feature files"
            raise missing_slides_error(missing, len(self.records), where)
        self.sentences = [split_sentences(r.turns[0][1]) for r in self.records]
        self.subcaption_config = subcaption_config or SubcaptionConfig()
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        subcaptions = sample_subcaptions(self.sentences[index], rng, self.subcaption_config)
        return self.slides[record.slide_id], record.turns[0][1], subcaptions


def collate_alignment(batch) -> dict:
    """Variable-size slides stay a list: {"slides": [SlideInput], "captions": [str], "subcaptions": [[str]]}."""
    slides, captions, subcaptions = zip(*batch)
    return {"slides": list(slides), "captions": list(captions), "subcaptions": [list(s) for s in subcaptions]}


# --------------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    from training.synthetic import SPLITS

    parser = argparse.ArgumentParser(prog="python -m training corpus",
                                     description="Build a synthetic split folder: CLAM/TRIDENT feature files, "
                                                 "SlideBench captions/VQA CSVs, LLaVA JSON and truth masks.")
    parser.add_argument("--split", choices=SPLITS, required=True)
    parser.add_argument("--count", type=int, required=True, help="number of slides")
    parser.add_argument("--out", required=True, help="corpus folder (the split goes to OUT/SPLIT)")
    parser.add_argument("--seed0", type=int, default=0, help="first slide seed")
    parser.add_argument("--encoder", default="builtin", help="patch encoder (default builtin)")
    parser.add_argument("--size", type=int, default=None, help="slide width and height in px (default 12288)")
    parser.add_argument("--sizes", type=int, nargs="+", help="draw each slide's width and height from these px sizes")
    parser.add_argument("--no-jpeg", action="store_true", help="encode uncompressed renders (not like the TIFF)")
    args = parser.parse_args(argv)
    from training.synthetic import SyntheticConfig

    config = SyntheticConfig(width=args.size, height=args.size) if args.size else None
    start = time.perf_counter()

    def progress(done: int, total: int, slide_id: str) -> None:
        elapsed = time.perf_counter() - start
        print(f"[{done}/{total}] {slide_id}  {elapsed:.0f} s", file=sys.stderr, flush=True)

    split_dir = build_synthetic_corpus(args.out, args.split, args.count, seed0=args.seed0, encoder=args.encoder,
                                       config=config, sizes=args.sizes, jpeg=not args.no_jpeg, progress=progress)
    print(split_dir)
    return 0
