"""Evaluate PathFLIP weights on a split folder: retrieval, zero-shot and grounding, computed from the model.

A split folder is what `python -m training corpus` writes (and what a user can assemble for real data):
  features/<slide_id>.h5   CLAM/TRIDENT patch features with level-0 coordinates
  captions.csv             SlideBench caption CSV (ID, Slide, Tumor, Question, Caption)
  truth/<slide_id>.npz     optional, synthetic slides only: finding masks on the patch grid (grounding, zero-shot)

`python -m training evaluate alignment --weights DIR --split DIR [--out metrics.json]` prints the JSON.
Grounding queries every finding of every slide twice: with its caption sentence ("Central necrosis is present
within the tumour nest.") and with the short phrase a pathologist would type ("necrosis").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from napari_pathflip.errors import PathflipError
from training import metrics
from training.sources import read_caption_csv

# the phrase typed in the viewer for each synthetic finding
PHRASES = {"tumour": "tumour", "necrosis": "necrosis", "lymphocytes": "lymphocytes", "stroma": "fibrous stroma",
           "fat": "fat", "normal_glands": "normal glands"}
# Other wordings of each finding, held out from training: none of them is a caption sentence, a fact phrase or
# one of its variants (training.synthetic.fact_phrases, training.text.phrase_variants; tests/test_synth_eval.py
# checks). Synonyms, spelling, number, articles and "areas/foci of" combined in ways training never saw.
PARAPHRASES = {
    "tumour": ["islands of tumor", "a nest of tumor cells", "neoplastic cells", "malignant epithelium", "cancer cells"],
    "necrosis": ["areas of necrotic tissue", "tumour necrosis", "foci of tumor necrosis", "necrotic areas",
                 "dead tumour cells"],
    "lymphocytes": ["lymphoid cells", "a lymphocytic infiltrate", "small lymphocytes", "lymphocyte infiltration"],
    "fat": ["adipocytes", "fatty tissue", "mature fat cells", "fat cells", "lipomatous tissue"],
    "normal_glands": ["non-neoplastic glands", "normal glandular tissue", "a benign gland structure",
                      "unremarkable glands"],
    "stroma": ["fibrous tissue", "desmoplastic stroma", "connective tissue", "collagen fibres"],
}
# zero-shot presence of each finding: a prompt ensemble (several phrasings) per finding, scored by
# PathFLIP.presence (calibrated evidence; >= 0.5 = present)
ZERO_SHOT = {
    "tumour": ["tumour", "tumour nest", "nest of tumour cells", "carcinoma"],
    "necrosis": ["necrosis", "central necrosis", "necrotic debris"],
    "fat": ["fat", "adipose tissue", "fat lobules"],
    "lymphocytes": ["lymphocytes", "lymphoid aggregate", "band of lymphocytes"],
    "normal_glands": ["normal glands", "benign glands"],
    "stroma": ["fibrous stroma", "collagenous stroma"],
}


@dataclass
class Truth:
    """Findings of one synthetic slide on its patch grid (cell = `patch_size` level-0 pixels)."""
    names: list[str]
    sentences: list[str]
    masks: np.ndarray  # [F, rows, cols] bool
    patch_size: int

    @classmethod
    def load(cls, path: Path) -> "Truth":
        with np.load(path, allow_pickle=False) as data:
            return cls([str(n) for n in data["finding_names"]], [str(s) for s in data["finding_sentences"]],
                       data["finding_masks"].astype(bool), int(data["patch_size"]))


def load_split(split_dir: str | Path):
    """(slide ids, captions, feature sets, truths or None) of a split folder, in captions.csv order."""
    from napari_pathflip.features import read_h5

    split_dir = Path(split_dir)
    captions_file = split_dir / "captions.csv"
    if not captions_file.is_file():
        raise PathflipError(f"{split_dir} has no captions.csv: make a split with `python -m training corpus`")
    records = read_caption_csv(captions_file)
    ids, captions, feats, truths = [], [], [], []
    for record in records:
        h5 = split_dir / "features" / f"{record.slide_id}.h5"
        if not h5.is_file():
            raise PathflipError(f"{h5} is missing: rebuild the split's features (`python -m training corpus`)")
        ids.append(record.slide_id)
        captions.append(record.turns[0][1])
        feats.append(read_h5(h5))
        truth = split_dir / "truth" / f"{record.slide_id}.npz"
        truths.append(Truth.load(truth) if truth.is_file() else None)
    return ids, captions, feats, truths


def _grounding_rows(model, encoding, truth: Truth, text: str, mask: np.ndarray, method: str = "auto"):
    """Region and patch scores of one query with their truth (region: >= min overlap of the mask)."""
    result = model.ground(encoding, text, top_k=1, patch_level=True, explain_regions=encoding.num_regions,
                          method=method)
    boxes = encoding.region_boxes.astype(np.float64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    region_truth = metrics.box_mask_fraction(mask, truth.patch_size, xywh) >= metrics.GroundingConfig().region_min_overlap
    cells = encoding.patch_coords // truth.patch_size
    inside = (cells[:, 1] < mask.shape[0]) & (cells[:, 0] < mask.shape[1])
    patch_truth = np.zeros(len(cells), bool)
    patch_truth[inside] = mask[cells[inside, 1], cells[inside, 0]]
    return result.region_scores, region_truth, result.patch_scores, patch_truth


def evaluate_alignment(weights: str | Path, split_dir: str | Path, device: str = "cpu",
                       max_slides: int | None = None) -> dict:
    """Retrieval (caption <-> slide among all slides of the split), zero-shot presence and grounding."""
    from napari_pathflip.model import PathFLIP

    model = PathFLIP.from_pretrained(weights).to(device).eval()
    ids, captions, feature_sets, truths = load_split(split_dir)
    if max_slides:
        ids, captions, feature_sets, truths = (x[:max_slides] for x in (ids, captions, feature_sets, truths))
    torch.manual_seed(0)
    encodings = [model.encode_slide(fs.features, fs.coords, fs.patch_size_level0) for fs in feature_sets]
    slides = torch.stack([e.slide_embedding for e in encodings]).numpy()
    with torch.inference_mode():
        texts = model.encode_text(captions).cpu().numpy()
    # retrieval as the product ranks (PathFLIP.retrieval_scores: sentence evidence + global), and the paper's
    # slide-embedding cosine alone for comparison
    out = {"weights": str(weights), "split": str(split_dir), "n_slides": len(ids),
           "retrieval": metrics.retrieval_recall(model.retrieval_scores(encodings, captions).T),
           "retrieval_global": metrics.retrieval_recall(metrics.cosine_similarity(slides, texts))}
    if not all(t is not None for t in truths):
        return out

    zero_shot = {}
    for finding, prompts in ZERO_SHOT.items():
        labels = np.array([int(finding in t.names) for t in truths])
        present = np.array([model.presence(e, {finding: prompts})[finding] for e in encodings])
        zero_shot[finding] = {"prompts": prompts, "positives": int(labels.sum()),
                              **metrics.zero_shot_metrics(np.stack([1 - present, present], 1), labels)}
    out["zero_shot"] = zero_shot

    # grounding as the viewer does it (the patch-text head when the weights have one), and with the paper's eq. 5
    # attention alone for comparison
    # attention alone for comparison; the held-out paraphrases as the viewer grounds them
    methods = {"": "auto", "_attention": "attention"} if model.patch_head is not None else {"": "auto"}
    queries = {"sentence": lambda name, sentence: [sentence], "phrase": lambda name, sentence: [PHRASES[name]],
               "paraphrase": lambda name, sentence: PARAPHRASES[name]}
    for suffix, method in methods.items():
        for kind, texts_of in queries.items():
            if kind == "paraphrase" and suffix:
                continue
            rows = {"region_scores": [], "region_truth": [], "patch_scores": [], "patch_truth": []}
            for encoding, truth in zip(encodings, truths):
                for name, sentence, mask in zip(truth.names, truth.sentences, truth.masks):
                    for text in texts_of(name, sentence):
                        r, rt, p, pt = _grounding_rows(model, encoding, truth, text, mask, method)
                        for key, value in zip(rows, (r, rt, p, pt)):
                            rows[key].append(value)
            out[f"grounding_{kind}{suffix}"] = metrics.grounding_metrics(**rows)
    return out


def summary(result: dict) -> dict:
    """The headline numbers of `evaluate_alignment` (the README table and the demo's targets)."""
    line = {"retrieval_text_to_slide_R@1": result["retrieval"]["text_to_slide"]["R@1"],
            "retrieval_slide_to_text_R@1": result["retrieval"]["slide_to_text"]["R@1"]}
    if "retrieval_global" in result:
        line["retrieval_text_to_slide_R@1_global"] = result["retrieval_global"]["text_to_slide"]["R@1"]
    for suffix in ("", "_attention"):
        for kind in ("sentence", "phrase", "paraphrase"):
            g = result.get(f"grounding_{kind}{suffix}")
            if g:
                line[f"region_pointing_{kind}{suffix}"] = g["region"]["pointing_game"]
                line[f"region_auroc_{kind}{suffix}"] = g["region"]["auroc_mean"]
                line[f"patch_pointing_{kind}{suffix}"] = g["patch"]["pointing_game"]
                line[f"patch_auroc_{kind}{suffix}"] = g["patch"]["auroc_mean"]
    for task, z in result.get("zero_shot", {}).items():
        line[f"zero_shot_{task}_accuracy"] = z["accuracy"]
        line[f"zero_shot_{task}_auroc"] = z["auc_macro"]
    return line
