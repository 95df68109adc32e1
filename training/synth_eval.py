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


# findings that no synthetic slide shows (and that training never names: training.patch_head.NEVER_SHOWN is
# disjoint): asked of every test slide, they must paint nothing and be reported as not found
ABSENT_FINDINGS = ("calcification", "mitotic figures", "granuloma")


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


def patch_truth(encoding, truth: Truth, mask: np.ndarray) -> np.ndarray:
    """[P] bool: the encoding's patches inside a finding mask of the truth's patch grid."""
    cells = encoding.patch_coords // truth.patch_size
    inside = (cells[:, 1] < mask.shape[0]) & (cells[:, 0] < mask.shape[1])
    shown = np.zeros(len(cells), bool)
    shown[inside] = mask[cells[inside, 1], cells[inside, 0]]
    return shown


def _grounding_rows(model, encoding, truth: Truth, text: str, mask: np.ndarray, method: str = "auto"):
    """Region and patch scores of one query with their truth (region: >= min overlap of the mask), and the
    result."""
    result = model.ground(encoding, text, top_k=1, patch_level=True, explain_regions=encoding.num_regions,
                          method=method)
    boxes = encoding.region_boxes.astype(np.float64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    region_truth = metrics.box_mask_fraction(mask, truth.patch_size, xywh) >= metrics.GroundingConfig().region_min_overlap
    return result.region_scores, region_truth, result.patch_scores, patch_truth(encoding, truth, mask), result


def displayed_metrics(model, encodings, truths) -> dict:
    """What a person sees at the default threshold (analysis.shown_patches), per finding and query kind: precision
    and Dice of the painted area (phrases and held-out paraphrases); for findings a slide does not show (the
    other synthetic findings' phrases, and ABSENT_FINDINGS on every slide) the fraction of the tissue painted and
    how often the result says "not found"; and the expected calibration error of the patch probabilities over
    every query's patches, and over those of the queries on slides that show the finding."""
    from napari_pathflip.analysis import shown_patches

    present = {f"{kind}:{name}": ([], []) for kind in ("phrase", "paraphrase") for name in PHRASES}
    absent = {"other_finding": [], "never_shown": []}
    called_absent = {key: [] for key in present}
    probability, outcome, shown_probability, shown_outcome = [], [], [], []
    for encoding, truth in zip(encodings, truths):
        masks = {}
        for name, mask in zip(truth.names, truth.masks):
            masks[name] = masks.get(name, False) | patch_truth(encoding, truth, mask)
        asked = [(name, kind, text) for name in PHRASES for kind, texts in
                 (("phrase", [PHRASES[name]]), ("paraphrase", PARAPHRASES[name])) for text in texts]
        asked += [(None, "never_shown", text) for text in ABSENT_FINDINGS]
        for name, kind, text in asked:
            result = model.ground(encoding, text, top_k=1, patch_level=True)
            shown = shown_patches(result)
            real = masks.get(name, np.zeros(len(shown), bool))
            probability.append(np.nan_to_num(result.patch_scores, nan=0.0))
            outcome.append(real)
            if name in masks:
                present[f"{kind}:{name}"][0].append(shown)
                present[f"{kind}:{name}"][1].append(real)
                called_absent[f"{kind}:{name}"].append(result.status == "not found")
                shown_probability.append(probability[-1])
                shown_outcome.append(real)
            else:  # every wording of a finding the slide does not show, and the findings no slide shows
                absent["other_finding" if name else "never_shown"].append(
                    {"painted": float(shown.mean()), "not_found": result.status == "not found"})
    out = {"calibrated": bool(model.config.patch_calibration is not None and model.patch_head is not None),
           "area": {key: {**metrics.displayed_area_metrics(*rows),
                          "called_absent": float(np.mean(called_absent[key])) if called_absent[key] else None}
                    for key, rows in present.items()},
           "absent": {key: {"n_queries": len(rows),
                            "painted_mean": float(np.mean([r["painted"] for r in rows])) if rows else None,
                            "painted_at_most_2pct": float(np.mean([r["painted"] <= 0.02 for r in rows]))
                            if rows else None,
                            "not_found": float(np.mean([r["not_found"] for r in rows])) if rows else None}
                      for key, rows in absent.items()},
           "ece": metrics.expected_calibration_error(np.concatenate(probability), np.concatenate(outcome)),
           # the same over the queries on slides that show the finding (where the probabilities are not all ~0)
           "ece_present": metrics.expected_calibration_error(np.concatenate(shown_probability),
                                                             np.concatenate(shown_outcome))}
    return out


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
                        r, rt, p, pt, _ = _grounding_rows(model, encoding, truth, text, mask, method)
                        for key, value in zip(rows, (r, rt, p, pt)):
                            rows[key].append(value)
            out[f"grounding_{kind}{suffix}"] = metrics.grounding_metrics(**rows)
    out["displayed"] = displayed_metrics(model, encodings, truths)
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
    shown = result.get("displayed")
    if shown:
        for kind in ("phrase", "paraphrase"):
            areas = [a for key, a in shown["area"].items() if key.startswith(kind + ":") and a["n_queries"]]
            line[f"displayed_precision_min_{kind}"] = min(a["precision_pooled"] for a in areas)
            line[f"displayed_dice_min_{kind}"] = min(a["dice_pooled"] for a in areas)
        for key, a in shown["absent"].items():
            line[f"absent_{key}_painted"] = a["painted_mean"]
            line[f"absent_{key}_not_found"] = a["not_found"]
        line["patch_ece"] = shown["ece"]
        line["patch_ece_present"] = shown["ece_present"]
    for task, z in result.get("zero_shot", {}).items():
        line[f"zero_shot_{task}_accuracy"] = z["accuracy"]
        line[f"zero_shot_{task}_auroc"] = z["auc_macro"]
    return line
