"""The `pathflip` command: one module per verb group, the options they share declared once in `options.py`.

    extract             extract.py    patch features of slides into a feature store
    ground, classify    analysis.py   one slide: where is a finding, zero-shot classes (classify LIBRARY: library.py)
    chat, caption       chat.py       ask about a slide, describe it (streamed)
    report              report.py     one slide's findings: present or absent, where, how large, their boxes
    index, search       library.py    a slide library: index a cohort, search it, classify every slide
    evaluate-grounding  annotations.py  a query's heatmap scored against QuPath annotations
    verify              verify.py     is a weights folder, chat folder or library whole?
"""

from __future__ import annotations

import importlib
import sys

from ..errors import PathflipError

# command -> (module:function taking argv and returning an exit status, one-line help)
COMMANDS = {
    "extract": ("extract:extract_main", "extract patch features of slides into a feature store"),
    "ground": ("analysis:ground_main", "where on the slide is a finding (PNG / NPZ / GeoJSON)"),
    "classify": ("analysis:classify_main",
                 "zero-shot classification of a slide, or of every slide of a library, with text prompts"),
    "index": ("library:index_main", "index slides into a library (resumable, shardable)"),
    "search": ("library:search_main",
               "rank a library's slides by a text, by a slide (--like) or by a region (--region)"),
    "chat": ("chat:chat_main", "ask a question about a slide (streamed answer)"),
    "caption": ("chat:caption_main", "describe a slide (streamed)"),
    "report": ("report:report_main", "each finding of a slide: present or absent, where, how large, its boxes"),
    "evaluate-grounding": ("annotations:evaluate_grounding_main",
                           "score a query's heatmap against annotated areas (QuPath GeoJSON): AUROC, pointing game"),
    "verify": ("verify:verify_main", "check weights folders and slide libraries for damage (sha256, checksums)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: pathflip COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module, function = COMMANDS[argv[0]][0].split(":")
    try:
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)(argv[1:]) or 0
    except PathflipError as exc:
        print(f"pathflip {argv[0]}: {exc}", file=sys.stderr)
        return 2
