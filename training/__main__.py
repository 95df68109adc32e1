"""`python -m training COMMAND ...`: one module per stage, each with a `main(argv) -> int`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "synthetic": ("training.synthetic", "generate synthetic whole-slide images with masks, captions and questions"),
    "instruct": ("training.instruct", "instruction-tune projector + LoRA LLM into a chat folder; `instruct eval`"),
    "corpus": ("training.data", "build a synthetic split: features, captions, VQA, instructions, truth"),
    "align": ("training.align", "alignment pretraining of PathFLIP (slide and region losses)"),
    "patch-head": ("training.patch_head", "train the patch-text grounding head on frozen PathFLIP weights"),
    "demo": ("training.demo", "rebuild sample_data/weights (corpus, align, instruct, evaluate) in one command"),
    "evaluate": ("training.evaluate", "evaluate retrieval, zero-shot, VQA, captions, grounding"),
    "protocol": ("training.protocols", "the paper's protocols on h5 features: zeroshot, vqa, captions, retrieval"),
}


def main(argv: list[str] | None = None) -> int:
    from napari_pathflip.errors import PathflipError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: python -m training COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    try:
        return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:]) or 0
    except PathflipError as exc:
        print(f"training {argv[0]}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
