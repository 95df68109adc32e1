"""`pathflip ground` and `pathflip classify SLIDE`: one slide, its heatmap or its zero-shot classes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..text import query_text
from .options import add_slide_analysis, positive_int, slide_analysis


def ground_main(argv: list[str]) -> int:
    from ..analysis import write_grounding

    parser = argparse.ArgumentParser(prog="pathflip ground", description="Where on the slide is a finding?")
    add_slide_analysis(parser)
    parser.add_argument("text", help='the finding, e.g. "central necrosis"')
    parser.add_argument("--out", required=True, type=Path, help="result.png | result.npz | result.geojson")
    parser.add_argument("--top-k", type=positive_int, default=5)
    args = parser.parse_args(argv)
    query_text(args.text)  # before the models load
    if args.out.suffix.lower() not in (".png", ".npz", ".geojson", ".json"):
        parser.error(f"--out {args.out}: use a .png, .npz or .geojson file name")
    analysis = slide_analysis(args)
    result = analysis.ground(args.text, top_k=args.top_k, patch_level=args.out.suffix.lower() != ".geojson")
    path = write_grounding(analysis, result, args.out)
    for rank, (x0, y0, x1, y1, score) in enumerate(result.top_boxes.tolist(), 1):
        print(f"#{rank} region x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f}: {score:.3f}")
    print(f"wrote {path}")
    return 0


def classify_main(argv: list[str]) -> int:
    from ..library import is_library

    if argv and is_library(argv[0]):  # `pathflip classify LIBRARY ...`: one CSV row per slide of the library
        from .library import classify_library_main

        return classify_library_main(argv)
    parser = argparse.ArgumentParser(prog="pathflip classify", description="Zero-shot classification of a slide.")
    add_slide_analysis(parser)
    parser.add_argument("--prompt", action="append", required=True, help="one class prompt; repeat per class")
    args = parser.parse_args(argv)
    probabilities = slide_analysis(args).classify(args.prompt)
    print(json.dumps({prompt: round(float(p), 4) for prompt, p in zip(args.prompt, probabilities)}, indent=1))
    return 0
