"""`python -m training demo`: rebuild sample_data/weights/ (demo PathFLIP + demo chat) and score them.

Stages, each resumable (a rerun skips finished slides and reuses the run folder):
  1. corpus: synthetic train and test splits (training.data), built by two processes (one per core);
  2. align: PathFLIP from all-MiniLM-L6-v2 over built-in encoder features (configs/align_demo.toml);
  2b. patch-head: the patch-text grounding head on the frozen aligned weights (training/patch_head.py);
  3. instruct: the tiny Qwen3-architecture chat LLM, projector + LoRA (configs/instruct_demo.toml);
  4. evaluate on the test split (layouts never seen in training): retrieval among all test slides, zero-shot,
     grounding (pointing game, AUROC), VQA with the SlideBench rule, caption BLEU/ROUGE.
Writes OUT/pathflip (+ encoder.json), OUT/chat and OUT/metrics.json (metrics, settings, seconds per stage).
`--quick` is the shortened version the test suite runs end to end (tiny slides, a few steps: wiring, not quality).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from napari_pathflip.errors import PathflipError
from napari_pathflip.weights import WeightsFolder, write_encoder

CONFIGS = Path(__file__).resolve().parent / "configs"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run (the full one reproduces the shipped weights)."""
    train_slides: int = 128
    test_slides: int = 64  # the retrieval target is R@1 among 64 slides
    # level-0 px; each slide's width and height are drawn from these (8192: 32 x 32 patches of 256 px; the bundled
    # demo slide is 8,192)
    slide_sizes: tuple[int, ...] = (8192,)
    align_steps: int = 500
    # the chat's full-parameter phase: on the demo corpus, test VQA 0.28 after 700 steps (+150 LoRA), 0.46 after
    # 1200 (+10 LoRA); the LLM learns to read the visual tokens late, so the chat's time goes there
    pretrain_steps: int = 1100
    lora_steps: int = 30
    patch_head_steps: int = 600
    eval_slides: int | None = None  # None: the whole test split


QUICK = DemoPlan(train_slides=8, test_slides=4, slide_sizes=(3072,), align_steps=3, pretrain_steps=4,
                 lora_steps=3, patch_head_steps=3)
# `--full`: the shipped weights. Three times the slides, in four sizes and shapes (the demo slide's 8,192 px among
# them), twice the alignment, 2.5 times the patch-head steps, more chat steps over multi-turn dialogues (its time:
# metrics.json "seconds" and the README)
FULL = DemoPlan(train_slides=384, test_slides=64, slide_sizes=(6144, 8192, 10240, 12288), align_steps=1000,
                pretrain_steps=1500, lora_steps=30, patch_head_steps=1500)
RECIPES = {"demo": DemoPlan(), "full": FULL, "quick": QUICK}


def _corpus_job(args) -> None:
    from training.data import build_synthetic_corpus

    out, split, seed0, count, sizes = args
    build_synthetic_corpus(out, split, count, seed0=seed0, sizes=sizes)


def build_corpus(work: Path, plan: DemoPlan, processes: int = 2) -> None:
    """Train and test splits under work/corpus, the slides shared out over `processes` single-threaded workers."""
    from training.data import slide_name, write_text_files

    jobs = []
    for split, count in (("train", plan.train_slides), ("test", plan.test_slides)):
        step = -(-count // processes)
        jobs += [(work / "corpus", split, s, min(step, count - s), plan.slide_sizes) for s in range(0, count, step)]
    # one BLAS/OpenMP thread per worker: two processes of two threads each on two cores run 3x slower
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    os.environ.update({k: "1" for k in saved})
    try:
        import multiprocessing

        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_corpus_job, jobs))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    for split, count in (("train", plan.train_slides), ("test", plan.test_slides)):
        write_text_files(work / "corpus" / split, [slide_name(split, s) for s in range(count)])


def chat_headline(chat: dict) -> dict:
    """The chat figures of one answer mode (evaluate_chat's result["modes"][mode], or its top level)."""
    out = {"vqa_accuracy": chat["vqa"]["accuracy"] if "vqa" in chat else None}
    if "vqa_generate" in chat:  # the letter from greedy decoding instead of ranking the options
        out["vqa_accuracy_generate"] = chat["vqa_generate"]["accuracy"]
    out.update({f"caption_{k}": v for k, v in chat.get("captions", {}).items() if k.startswith(("bleu", "rouge"))})
    if "Location" in chat.get("vqa_by_type", {}):
        out["vqa_where_accuracy"] = chat["vqa_by_type"]["Location"]["accuracy"]
    if "Location" in chat.get("vqa_generate_by_type", {}):
        out["vqa_where_accuracy_generate"] = chat["vqa_generate_by_type"]["Location"]["accuracy"]
    if chat.get("vqa_by_type"):
        out["vqa_type_min_accuracy"] = min(v["accuracy"] for v in chat["vqa_by_type"].values())
    if "caption_places" in chat:
        out["caption_place_recall"] = chat["caption_places"]["recall"]
        out["caption_place_precision"] = chat["caption_places"]["precision"]
    for key, figure, name in (("free_text", "accuracy", "free_text_accuracy"),
                              ("regions", "named_first", "region_named_first"),
                              ("presence_agreement", "agreement", "presence_agreement"),
                              ("cited_in_mask", "share", "cited_in_mask")):
        if key in chat:
            out[name] = chat[key][figure]
    return out


def headline(alignment: dict, chat_metrics: dict) -> dict:
    """The figures the README's table reports: alignment summary, then the chat's in the chat folder's answer mode
    (VQA accuracy, caption BLEU/ROUGE-L and places, free-text, region and citation figures) and, with a "_visual"
    suffix, the same figures of the paper's visual-token chat when it was scored beside it."""
    from training.synth_eval import summary

    out = summary(alignment)
    out.update(chat_headline(chat_metrics))
    if chat_metrics.get("answers") == "grounded" and "visual" in chat_metrics.get("modes", {}):
        out.update({f"{k}_visual": v for k, v in chat_headline(chat_metrics["modes"]["visual"]).items()})
    return out


def run_demo(out: str | Path, work: str | Path, plan: DemoPlan = DemoPlan(), device: str = "cpu",
             log=print) -> dict:
    """Run every stage; returns (and writes to out/metrics.json) the metrics with the settings and timings."""
    import torch

    from napari_pathflip.model import PathFLIP
    from training import align, instruct
    from training.patch_head import PatchHeadConfig, train_patch_head
    from training.synth_eval import evaluate_alignment

    out, work = Path(out).resolve(), Path(work).resolve()
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def stage(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = round(now - sum(seconds.values()) - started, 1)
        log(f"demo: {name} done in {seconds[name]:.0f} s")

    log(f"demo: corpus ({plan.train_slides} train + {plan.test_slides} test slides of {plan.slide_sizes} px)")
    build_corpus(work, plan)
    stage("corpus")

    corpus = work / "corpus"
    config = align.load_config(CONFIGS / "align_demo.toml", [
        f'features = ["{corpus / "train" / "features"}"]', f'captions = ["{corpus / "train" / "captions.csv"}"]',
        f'out_dir = "{work / "align"}"', f"max_steps = {plan.align_steps}", f'device = "{device}"',
        f"checkpoint_every = {max(plan.align_steps // 3, 1)}",
        f"warmup_steps = {min(30, max(plan.align_steps // 5, 1))}"])
    final = align.train(config, resume=True)
    pathflip = out / "pathflip"
    if pathflip.exists():
        shutil.rmtree(pathflip)
    # shipped in float16 (half the bytes in the repository); everything below is measured on this copy
    PathFLIP.from_pretrained(final).save_pretrained(pathflip, dtype=torch.float16)
    write_encoder(pathflip, WeightsFolder(final).encoder)
    stage("align")

    # in place: the head is added, every other tensor is written back unchanged (float16 -> float16)
    train_patch_head(pathflip, [corpus / "train" / "features"], [corpus / "train" / "captions.csv"],
                     config=PatchHeadConfig(steps=plan.patch_head_steps, device=device),
                     facts=[corpus / "train" / "facts.json"], truth=[corpus / "train" / "truth"], log=log)
    stage("patch_head")

    cfg = instruct.load_config(
        CONFIGS / "instruct_demo.toml", weights=str(pathflip), features=str(corpus / "train" / "features"),
        records=[str(corpus / "train" / "instruct.json")], out=str(work / "instruct"), chat_out=str(out / "chat"),
        evaluate="", pretrain_steps=plan.pretrain_steps, steps=plan.lora_steps, device=device,
        checkpoint_every=max(plan.lora_steps // 2, 1))
    # a new PathFLIP means new visual tokens: never resume the chat from a run over other weights
    if (work / "instruct").exists():
        shutil.rmtree(work / "instruct")
    chat = instruct.train(cfg)
    stage("instruct")

    alignment = evaluate_alignment(pathflip, corpus / "test", device=device, max_slides=plan.eval_slides)
    chat_metrics = instruct.evaluate_chat(chat, pathflip, corpus / "test", out_dir=work / "eval", device=device,
                                          max_slides=plan.eval_slides)
    stage("evaluate")
    recipe = next((name for name, known in RECIPES.items() if known == plan), "custom")
    flag = {"demo": "", "full": " --full", "quick": " --quick"}.get(recipe, " (custom plan)")
    result = {"headline": headline(alignment, chat_metrics), "recipe": recipe, "plan": asdict(plan),
              "command": f"python -m training demo{flag}", "device": device, "seconds": seconds,
              "total_minutes": round(sum(seconds.values()) / 60, 1), "alignment": alignment,
              "chat": {k: v for k, v in chat_metrics.items() if not k.endswith("_predictions")}}
    (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "sample_data" / "weights"),
                        help="where pathflip/, chat/ and metrics.json go (default: the bundled sample_data/weights)")
    parser.add_argument("--work", default=str(REPO / "runs" / "demo"), help="corpus, checkpoints and logs")
    recipe = parser.add_mutually_exclusive_group()
    recipe.add_argument("--full", action="store_true",
                        help="the shipped weights: 384 slides of four sizes, longer training (about 90 min on 2 cores)")
    recipe.add_argument("--quick", action="store_true", help="tiny slides and a few steps (the test suite's run)")
    parser.add_argument("--device", default="cpu", help="cpu (the documented run) or cuda")
    args = parser.parse_args(argv)
    if Path(args.out).resolve() == Path(args.work).resolve():
        raise PathflipError("--out and --work must be different folders")
    plan = RECIPES["quick" if args.quick else "full" if args.full else "demo"]
    result = run_demo(args.out, args.work, plan, args.device)
    json.dump({"headline": result["headline"], "seconds": result["seconds"],
               "total_minutes": result["total_minutes"]}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0
