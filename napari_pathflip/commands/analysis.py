"""`pathflip ground` and `pathflip classify SLIDE`: one slide, its heatmap or its zero-shot classes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..text import query_text
from .options import add_slide_analysis, fraction, positive_int, slide_analysis


def ground_main(argv: list[str]) -> int:
    from ..analysis import finding_areas, write_grounding

    parser = argparse.ArgumentParser(prog="pathflip ground", description="Where on the slide is a finding?")
    add_slide_analysis(parser)
    parser.add_argument("text", help='the finding, e.g. "central necrosis"')
    parser.add_argument("--out", required=True, type=Path, help="result.png | result.npz | result.geojson")
    parser.add_argument("--top-k", type=positive_int, default=5, help="regions and areas to print (default: 5)")
    parser.add_argument("--boxes", choices=("areas", "regions", "both"), default="areas",
                        help="what to print and put in a .geojson: the finding areas (the heatmap's outlined parts "
                             "at or above the threshold), the top 4096-px regions, or both (default: areas)")
    parser.add_argument("--threshold", type=fraction,
                        help="heatmap value from which a patch is shown and outlined (default: 0.5 probability for "
                             "calibrated weights, else 0.2 of the slide's range)")
    args = parser.parse_args(argv)
    query_text(args.text)  # before the models load
    if args.out.suffix.lower() not in (".png", ".npz", ".geojson", ".json"):
        parser.error(f"--out {args.out}: use a .png, .npz or .geojson file name")
    analysis = slide_analysis(args)
    areas, regions = args.boxes in ("areas", "both"), args.boxes in ("regions", "both")
    # patch scores are what areas and the heatmap are made of; only a .geojson of regions does without
    patch_level = areas or args.out.suffix.lower() not in (".geojson", ".json")
    result = analysis.ground(args.text, top_k=args.top_k, patch_level=patch_level)
    print(f"{result.text}: {result.verdict()}")
    if areas:
        found = finding_areas(analysis, result, args.threshold, patch_level)
        for rank, area in enumerate(found[:args.top_k], 1):
            print(f"area #{rank}: {area.describe(result.calibrated)}")
        if len(found) > args.top_k:
            print(f"... and {len(found) - args.top_k} more areas (a .geojson or .npz --out holds them all)")
        if not found:
            print("no area of the heatmap reaches the threshold")
    if regions:
        for rank, (x0, y0, x1, y1, score) in enumerate(result.top_boxes.tolist(), 1):
            print(f"region #{rank}: x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f}: {score:.3f}")
    path = write_grounding(analysis, result, args.out, args.threshold, patch_level=patch_level, regions=regions,
                           areas=areas)
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
