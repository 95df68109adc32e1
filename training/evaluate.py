"""`python -m training evaluate TASK ...`: score saved outputs and print the metrics as JSON on stdout.

Tasks and their inputs:
  vqa        --questions Q.csv (SlideBench VQA CSV) --predictions P.csv (columns ID,response)
  captions   --references R.csv (columns ID,Caption) --predictions P.csv (columns ID,response)
  retrieval  --embeddings E.npz: `slide` [S, d] and `text` [S, d], row i of one matches row i of the other
  zeroshot   --scores S.npz: `probs` [S, C] (probabilities or logits) and `labels` [S] (class index)
  grounding  --scores G.npz, one row per scored item (region or patch) of every query, flat:
               region_scores [R] float, region_truth [R] bool or float, region_query [R] int;
               patch_scores  [P] float, patch_truth  [P] bool or float, patch_query  [P] int.
             `*_query` says which query (text x slide) a row belongs to. A float truth is the fraction of the item
             inside the finding's mask and is thresholded with --region-min-overlap / --patch-min-overlap.
             Either level may be absent.
  alignment  --weights DIR --split DIR: runs the PathFLIP weights on a split folder (`python -m training corpus`)
             and reports retrieval among its slides, zero-shot presence and grounding (see training.synth_eval).
A missing prediction counts as wrong (VQA) or as an empty caption (captions); the IDs are listed in the output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from napari_pathflip.errors import PathflipError
from training import metrics
from training.sources import read_csv_rows, read_vqa_csv


def _read_table(path: str, key: str, value: str) -> dict[str, str]:
    """Two columns of a CSV as {key: value}; duplicate keys are an error (which one would count?)."""
    table: dict[str, str] = {}
    for row in read_csv_rows(path, (key, value)):
        ident = row[key].strip()
        if ident in table:
            raise PathflipError(f"{path}: {key} {ident!r} appears twice. Keep one row per {key}.")
        table[ident] = row[value]
    return table


def _load_npz(path: str, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    path_ = Path(path)
    if not path_.is_file():
        raise PathflipError(f"NPZ file not found: {path_}. Check the path.")
    try:
        with np.load(path_, allow_pickle=False) as data:  # never unpickle a results file
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError) as exc:
        raise PathflipError(f"{path_} is not a readable .npz of plain arrays ({exc}).") from exc
    missing = [k for k in required if k not in arrays]
    if missing:
        raise PathflipError(f"{path_} lacks array(s) {', '.join(missing)} (found: {', '.join(arrays) or 'none'}).")
    return arrays


def _vqa(args) -> dict:
    questions = read_vqa_csv(args.questions)
    if len({q.id for q in questions}) != len(questions):
        raise PathflipError(f"{args.questions}: IDs repeat, so predictions cannot be matched. Make IDs unique.")
    responses = _read_table(args.predictions, "ID", "response")
    result = metrics.vqa_accuracy([responses.get(q.id) for q in questions], [q.answer for q in questions],
                                  [q.category for q in questions])
    known = {q.id for q in questions}
    result["missing_ids"] = [q.id for q in questions if q.id not in responses]
    result["unknown_ids"] = [i for i in responses if i not in known]
    return result


def _captions(args) -> dict:
    references = _read_table(args.references, "ID", "Caption")
    responses = _read_table(args.predictions, "ID", "response")
    ids = list(references)
    result = metrics.caption_metrics([responses.get(i, "") for i in ids], [references[i] for i in ids])
    result["missing_ids"] = [i for i in ids if i not in responses]
    result["unknown_ids"] = [i for i in responses if i not in references]
    return result


def _retrieval(args) -> dict:
    arrays = _load_npz(args.embeddings, ("slide", "text"))
    if arrays["slide"].ndim != 2 or arrays["slide"].shape != arrays["text"].shape:
        raise PathflipError(f"{args.embeddings}: `slide` and `text` must both be [S, d], got "
                            f"{arrays['slide'].shape} and {arrays['text'].shape}.")
    return metrics.retrieval_recall(metrics.cosine_similarity(arrays["slide"], arrays["text"]), tuple(args.k))


def _zeroshot(args) -> dict:
    arrays = _load_npz(args.scores, ("probs", "labels"))
    return metrics.zero_shot_metrics(arrays["probs"], arrays["labels"])


def _per_query(arrays: dict[str, np.ndarray], level: str, min_overlap: float):
    scores, truth, query = (np.ravel(arrays[f"{level}_{k}"]) for k in ("scores", "truth", "query"))
    if not (scores.shape == truth.shape == query.shape):
        raise PathflipError(f"{level}_scores, {level}_truth and {level}_query must have the same length.")
    truth = truth if truth.dtype == bool else truth >= min_overlap
    groups = [np.flatnonzero(query == q) for q in np.unique(query)]
    return [scores[g] for g in groups], [truth[g] for g in groups]


def _grounding(args) -> dict:
    arrays = _load_npz(args.scores)
    levels = {}
    for level, min_overlap in (("region", args.region_min_overlap), ("patch", args.patch_min_overlap)):
        keys = [f"{level}_{k}" for k in ("scores", "truth", "query")]
        present = [k in arrays for k in keys]
        if any(present) and not all(present):
            raise PathflipError(f"{args.scores}: give all of {', '.join(keys)} or none of them.")
        if all(present):
            scores, truth = _per_query(arrays, level, min_overlap)
            levels[f"{level}_scores"], levels[f"{level}_truth"] = scores, truth
    if not levels:
        raise PathflipError(f"{args.scores} holds neither region_* nor patch_* arrays; see "
                            "`python -m training evaluate --help` for the layout.")
    return metrics.grounding_metrics(**levels)


def _alignment(args) -> dict:
    from training.synth_eval import evaluate_alignment

    return evaluate_alignment(args.weights, args.split, device=args.device, max_slides=args.max_slides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True)
    vqa = tasks.add_parser("vqa", help="SlideBench multiple-choice accuracy, overall and per Broad Category")
    vqa.add_argument("--questions", required=True, help="SlideBench VQA CSV")
    vqa.add_argument("--predictions", required=True, help="CSV with columns ID,response")
    vqa.set_defaults(run=_vqa)
    captions = tasks.add_parser("captions", help="BLEU-1..4 and ROUGE-L")
    captions.add_argument("--references", required=True, help="CSV with columns ID,Caption")
    captions.add_argument("--predictions", required=True, help="CSV with columns ID,response")
    captions.set_defaults(run=_captions)
    retrieval = tasks.add_parser("retrieval", help="Recall@k slide->text and text->slide")
    retrieval.add_argument("--embeddings", required=True, help="NPZ with arrays slide [S,d] and text [S,d]")
    retrieval.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], help="recall cut-offs")
    retrieval.set_defaults(run=_retrieval)
    zeroshot = tasks.add_parser("zeroshot", help="accuracy, macro AUROC, macro F1")
    zeroshot.add_argument("--scores", required=True, help="NPZ with arrays probs [S,C] and labels [S]")
    zeroshot.set_defaults(run=_zeroshot)
    grounding = tasks.add_parser("grounding", help="pointing game and AUROC of region and patch scores")
    grounding.add_argument("--scores", required=True, help="NPZ in the layout described above")
    defaults = metrics.GroundingConfig()
    grounding.add_argument("--region-min-overlap", type=float, default=defaults.region_min_overlap)
    grounding.add_argument("--patch-min-overlap", type=float, default=defaults.patch_min_overlap)
    grounding.set_defaults(run=_grounding)
    alignment = tasks.add_parser("alignment", help="retrieval, zero-shot and grounding of PathFLIP weights on a split")
    alignment.add_argument("--weights", required=True, help="PathFLIP weights folder")
    alignment.add_argument("--split", required=True, help="split folder: features/, captions.csv, truth/")
    alignment.add_argument("--device", default="cpu")
    alignment.add_argument("--max-slides", type=int, help="evaluate only the first N slides")
    alignment.set_defaults(run=_alignment)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except ValueError as exc:  # metric input checks: bad shapes or values in the user's files
        raise PathflipError(f"evaluate {args.task}: {exc}. Check the input files.") from exc
    json.dump({"task": args.task, **result}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
