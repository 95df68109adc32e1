"""`python -m training protocol TASK CSV --root DIR --out DIR`: the paper's evaluation protocols (spec: "Evaluation
protocols") on patch features you already have, one command each. Every slide is a CLAM/TRIDENT h5 file named by the
CSV relative to --root; it is encoded by the PathFLIP weights (--weights) and, for VQA and captions, answered by the
chat folder beside them (--chat). Each task writes its predictions to --out as the file `python -m training
evaluate` scores, scores that file with the same code, and prints the metrics as JSON (also written to
<out>/<task>_metrics.json).

  zeroshot   CSV columns slide_id, label, conch_feature (--feature-column); one prompt or several per class from
             --classes FILE (JSON or TOML: {"LUAD": ["prompt", ...], ...}) and/or --class NAME=prompt|prompt, the
             names being the CSV's labels. Softmax over the classes (PathFLIP.classify) -> accuracy, balanced
             accuracy, macro F1, per-class and macro AUROC (one-vs-rest). Writes zeroshot_predictions.csv and
             zeroshot_scores.npz (`evaluate zeroshot --scores`).
  vqa        a SlideBench VQA CSV (ID, Slide, Tumor, Broad Category, Narrow Category, Question, A-D, Answer) ->
             vqa_predictions.csv (ID,response; `evaluate vqa --questions CSV --predictions`), the chat's
             multiple-choice answers (its choice_rule, or --choice-rule), greedy.
  captions   a SlideBench caption CSV (ID, Slide, Tumor, Question, Caption) -> caption_predictions.csv (ID,response;
             `evaluate captions --references CSV --predictions`), the chat's answer to each row's Question, greedy.
  retrieval  a caption CSV with one caption per slide -> Recall@1/5/10 text->slide and slide->text as PathFLIP ranks
             (PathFLIP.retrieval_scores), and the paper's slide-embedding cosine alone ("retrieval_global", scored
             from retrieval_embeddings.npz by `evaluate retrieval --embeddings`).

CLAM files carry no patch size: pass --patch-size-level0 (256 for 20x patches on a 20x slide, 512 on a 40x slide).
A missing h5 file stops the run before anything is computed, with the files named.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tomllib
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from napari_pathflip.errors import PathflipError
from napari_pathflip.files import atomic_write, atomic_write_json, atomic_write_text
from napari_pathflip.weights import DEVICES, WeightsFolder
from training import evaluate, metrics
from training.sources import read_caption_csv, read_csv_rows, read_vqa_csv

ZERO_SHOT_COLUMNS = ("slide_id", "label")
DEFAULT_FEATURE_COLUMN = "conch_feature"
MAX_NEW_TOKENS = {"vqa": 64, "captions": 256}  # the answer lengths `training.instruct` evaluates with


class SlideFeatures:
    """The slides a CSV names: h5 paths relative to `root`, encoded by `model` on demand (the last one is kept, so
    consecutive rows of one slide encode it once)."""

    def __init__(self, model, root: str | Path, patch_size_level0: int | None = None):
        self.model, self.root, self.patch_size_level0 = model, Path(root), patch_size_level0
        self._last: tuple[str, object] | None = None

    def encode(self, reference: str):
        """The SlideEncoding of one h5 file (no patch features kept: no patch-level attention grounding needed)."""
        from napari_pathflip.features import read_h5

        if self._last is not None and self._last[0] == reference:
            return self._last[1]
        path = self.root / reference.strip()
        features = read_h5(path, region_patches=self.model.config.region_patches,
                           patch_size_level0=self.patch_size_level0)
        try:
            encoding = self.model.encode_slide(features.features, features.coords, features.patch_size_level0,
                                               keep_features=False)
        except PathflipError as exc:
            raise PathflipError(f"{path}: {exc}") from exc
        self._last = (reference, encoding)
        return encoding


def slide_references(task: str, csv_path: str | Path, feature_column: str = DEFAULT_FEATURE_COLUMN) -> list[str]:
    """The h5 paths a task's CSV names, row by row."""
    if task == "zeroshot":
        return [row[feature_column] for row in read_csv_rows(csv_path, (*ZERO_SHOT_COLUMNS, feature_column))]
    return [record.slide for record in (read_vqa_csv if task == "vqa" else read_caption_csv)(csv_path)]


def check_features(root: str | Path, references: list[str], csv_path: str | Path) -> None:
    """A PathflipError naming every h5 file of `references` missing under `root` (before any model is loaded)."""
    paths = [Path(root) / r.strip() for r in references]
    missing = list(dict.fromkeys(str(path) for path in paths if not path.is_file()))
    if missing:
        shown = "\n  ".join(missing[:10]) + (f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise PathflipError(f"{len(missing)} feature file(s) named by {csv_path} are missing under --root {root}:"
                            f"\n  {shown}\nCheck --root (the CSV's paths are relative to it).")


# --------------------------------------------------------------------------------------------------- zero-shot


def read_classes(classes_file: str | Path | None, pairs: list[str] | None) -> dict[str, list[str]]:
    """{class name: prompts} from a JSON/TOML file ({"NAME": "prompt" or ["prompt", ...]}) and NAME=prompt|prompt
    pairs (which add to or replace the file's classes), in that order."""
    classes: dict[str, list[str]] = {}
    if classes_file:
        path = Path(classes_file)
        if not path.is_file():
            raise PathflipError(f"--classes {path}: no such file.")
        try:
            data = tomllib.loads(path.read_text()) if path.suffix.lower() == ".toml" else json.loads(path.read_text())
        except ValueError as exc:
            raise PathflipError(f"--classes {path} is not valid {path.suffix[1:].upper() or 'JSON'} ({exc}).") from exc
        if not isinstance(data, dict) or not all(isinstance(v, (str, list)) for v in data.values()):
            raise PathflipError(f"--classes {path}: write one entry per class, {{\"NAME\": [\"prompt\", ...]}}.")
        classes.update({str(k): [v] if isinstance(v, str) else [str(p) for p in v] for k, v in data.items()})
    for pair in pairs or []:
        name, sep, prompts = pair.partition("=")
        if not sep or not name.strip():
            raise PathflipError(f"--class {pair!r}: write NAME=prompt, or NAME=prompt|prompt for several.")
        classes[name.strip()] = [p.strip() for p in prompts.split("|")]
    empty = [name for name, prompts in classes.items() if not prompts or not all(prompts)]
    if empty:
        raise PathflipError(f"class(es) {', '.join(map(repr, empty))} have an empty prompt: give each class at least "
                            "one prompt (--class NAME=prompt|prompt).")
    if len(classes) < 2:
        raise PathflipError("zero-shot needs at least two classes: --classes FILE or --class NAME=prompt (repeat "
                            "per class).")
    return classes


def zeroshot(model, csv_path: str | Path, features: SlideFeatures, classes: dict[str, list[str]], out_dir: Path,
             feature_column: str = DEFAULT_FEATURE_COLUMN) -> dict:
    rows = read_csv_rows(csv_path, (*ZERO_SHOT_COLUMNS, feature_column))
    names = list(classes)
    unknown = sorted({row["label"].strip() for row in rows} - set(names))
    if unknown:
        raise PathflipError(f"{csv_path}: label(s) {', '.join(map(repr, unknown))} have no prompts; the classes are "
                            f"{', '.join(map(repr, names))}. Name the classes as the CSV's labels.")
    probabilities = np.stack([model.classify(features.encode(row[feature_column]), classes).cpu().numpy()
                              for row in _progress(rows, "zero-shot")])
    labels = np.array([names.index(row["label"].strip()) for row in rows])
    predicted = probabilities.argmax(1)
    table = [[row["slide_id"], row["label"].strip(), names[p], *(f"{v:.6f}" for v in probs)]
             for row, p, probs in zip(rows, predicted, probabilities)]
    predictions = _write_csv(out_dir / "zeroshot_predictions.csv",
                             ["slide_id", "label", "predicted", *(f"p_{name}" for name in names)], table)
    scores = out_dir / "zeroshot_scores.npz"
    atomic_write(scores, lambda tmp: np.savez(tmp, probs=probabilities, labels=labels), suffix=".npz")
    result = _evaluate("zeroshot", "--scores", scores)
    result["balanced_accuracy"] = float(balanced_accuracy_score(labels, predicted))
    result["auc_per_class"] = dict(zip(names, result["auc_per_class"]))
    return {**result, "classes": classes, "predictions": str(predictions), "scores": str(scores)}


# --------------------------------------------------------------------------------------------- chat protocols


def vqa(engine, csv_path: str | Path, features: SlideFeatures, out_dir: Path, max_new_tokens: int,
        choice_rule: str | None = None) -> dict:
    from training.instruct import choice_parts

    questions = read_vqa_csv(csv_path)
    settings = _greedy(engine, max_new_tokens)
    rows = []
    for question in _progress(questions, "VQA"):
        stem, options = choice_parts(question.turns[0][0])
        answer = engine.conversation(features.encode(question.slide)).ask_choice(stem, options, settings,
                                                                                 rule=choice_rule)
        rows.append([question.id, answer.text])
    predictions = _write_csv(out_dir / "vqa_predictions.csv", ["ID", "response"], rows)
    return {**_evaluate("vqa", "--questions", csv_path, "--predictions", predictions),
            "choice_rule": choice_rule or engine.config.choice_rule, "predictions": str(predictions)}


def captions(engine, csv_path: str | Path, features: SlideFeatures, out_dir: Path, max_new_tokens: int) -> dict:
    records = read_caption_csv(csv_path)
    settings = _greedy(engine, max_new_tokens)
    rows = [[r.id, engine.conversation(features.encode(r.slide)).ask(r.turns[0][0], settings).text]
            for r in _progress(records, "captions")]
    predictions = _write_csv(out_dir / "caption_predictions.csv", ["ID", "response"], rows)
    return {**_evaluate("captions", "--references", csv_path, "--predictions", predictions),
            "predictions": str(predictions)}


def _greedy(engine, max_new_tokens: int):
    from napari_pathflip.chat import GenerationSettings

    return GenerationSettings(**{**asdict(engine.config.generation), "do_sample": False,
                                 "max_new_tokens": max_new_tokens})


# --------------------------------------------------------------------------------------------------- retrieval


def retrieval(model, csv_path: str | Path, features: SlideFeatures, out_dir: Path) -> dict:
    import torch

    records = read_caption_csv(csv_path)
    repeated = sorted(slide for slide, count in Counter(r.slide for r in records).items() if count > 1)
    if repeated:
        raise PathflipError(f"{csv_path}: retrieval pairs each slide with one caption, but {len(repeated)} slide(s) "
                            f"have several (e.g. {repeated[0]}). Keep one row per slide.")
    encodings = [features.encode(r.slide) for r in _progress(records, "retrieval")]
    texts = [r.turns[0][1] for r in records]
    ranked = metrics.retrieval_recall(model.retrieval_scores(encodings, texts).T)  # [slides, texts]
    with torch.inference_mode():
        text = model.encode_text(texts).cpu().numpy()
    slide = torch.stack([e.slide_embedding for e in encodings]).cpu().numpy()
    embeddings = out_dir / "retrieval_embeddings.npz"
    atomic_write(embeddings, lambda tmp: np.savez(tmp, slide=slide, text=text), suffix=".npz")
    return {"retrieval": ranked, "retrieval_global": _evaluate("retrieval", "--embeddings", embeddings),
            "embeddings": str(embeddings)}


# ----------------------------------------------------------------------------------------------------- helpers


def _evaluate(task: str, *argv) -> dict:
    """The metrics `python -m training evaluate TASK ...` prints for these files."""
    args = evaluate.build_parser().parse_args([task, *map(str, argv)])
    try:
        return args.run(args)
    except ValueError as exc:
        raise PathflipError(f"evaluate {task}: {exc}") from exc


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    text = io.StringIO(newline="")
    csv.writer(text).writerows([header, *rows])
    return atomic_write_text(path, text.getvalue())


def _progress(items, what: str):
    from tqdm import tqdm

    return tqdm(items, desc=what, unit="row", disable=None, file=sys.stderr)


# --------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training protocol", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True)
    helps = {"zeroshot": "zero-shot classification from a slide_id,label,conch_feature CSV",
             "vqa": "chat answers to a SlideBench VQA CSV, scored by the SlideBench rule",
             "captions": "chat captions for a SlideBench caption CSV: BLEU-1..4, ROUGE-L",
             "retrieval": "text->slide and slide->text Recall@1/5/10 over a caption CSV"}
    csv_helps = {"zeroshot": "CSV with columns slide_id, label and the h5 path (--feature-column)",
                 "vqa": "SlideBench VQA CSV: ID, Slide (h5 path), Tumor, Broad Category, Narrow Category, Question, "
                        "A, B, C, D, Answer",
                 "captions": "SlideBench caption CSV: ID, Slide (h5 path), Tumor, Question, Caption",
                 "retrieval": "caption CSV (ID, Slide, Tumor, Question, Caption), one row per slide"}
    for task, help_ in helps.items():
        sub = tasks.add_parser(task, help=help_, description=f"{help_}. See `python -m training protocol -h`.")
        sub.add_argument("csv", help=csv_helps[task])
        sub.add_argument("--root", required=True, help="folder the CSV's h5 paths are relative to")
        sub.add_argument("--out", required=True, type=Path, help="folder for the predictions and metrics")
        sub.add_argument("--weights", help="PathFLIP weights folder (default: $PATHFLIP_WEIGHTS or the demo's)")
        sub.add_argument("--device", default="auto", choices=DEVICES)
        sub.add_argument("--patch-size-level0", type=int,
                         help="patch side at level 0 for CLAM files that do not record it (256 at 20x, 512 at 40x)")
        if task == "zeroshot":
            sub.add_argument("--classes", help='JSON or TOML file: {"NAME": ["prompt", ...], ...}')
            sub.add_argument("--class", dest="pairs", action="append", metavar="NAME=PROMPT[|PROMPT...]",
                             help="a class and its prompt(s); repeat per class")
            sub.add_argument("--feature-column", default=DEFAULT_FEATURE_COLUMN,
                             help="the CSV column holding the h5 paths")
        if task in MAX_NEW_TOKENS:
            sub.add_argument("--chat", help="chat folder (default: the one beside the weights)")
            sub.add_argument("--llm", help="a local causal-LM folder replacing the chat folder's llm/")
            sub.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS[task])
        if task == "vqa":
            sub.add_argument("--choice-rule", choices=("rank", "generate"),
                             help="how the option letter is chosen (default: the chat folder's choice_rule)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from napari_pathflip.analysis import load_model

    args = build_parser().parse_args(argv)
    classes = read_classes(args.classes, args.pairs) if args.task == "zeroshot" else None
    check_features(args.root, slide_references(args.task, args.csv, getattr(args, "feature_column",
                                                                             DEFAULT_FEATURE_COLUMN)), args.csv)
    weights = WeightsFolder.resolve(args.weights).check()
    model = load_model(weights, device=args.device)
    features = SlideFeatures(model, args.root, args.patch_size_level0)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.task == "zeroshot":
        result = zeroshot(model, args.csv, features, classes, args.out, args.feature_column)
    elif args.task == "retrieval":
        result = retrieval(model, args.csv, features, args.out)
    else:
        from napari_pathflip.chat import ChatEngine

        engine = ChatEngine.load(Path(args.chat) if args.chat else weights.chat_dir, llm_dir=args.llm,
                                 device=args.device, merge=True)
        result = vqa(engine, args.csv, features, args.out, args.max_new_tokens, args.choice_rule) \
            if args.task == "vqa" else captions(engine, args.csv, features, args.out, args.max_new_tokens)
    result = {"task": args.task, "csv": str(args.csv), "root": str(args.root), "weights": str(weights), **result}
    atomic_write_json(args.out / f"{args.task}_metrics.json", result)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
