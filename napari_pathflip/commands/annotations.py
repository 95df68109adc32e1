"""`pathflip evaluate-grounding`: how well a query's heatmap matches what a pathologist annotated (QuPath GeoJSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import PathflipError
from .options import add_slide_analysis, slide_analysis


def evaluate_grounding_main(argv: list[str]) -> int:
    from ..annotations import evaluate_grounding, read_geojson

    parser = argparse.ArgumentParser(
        prog="pathflip evaluate-grounding",
        description="Score the patch heatmap of a query against annotated areas of the slide: patch AUROC "
                    "(annotated patches vs the rest; a patch is annotated when its centre lies in a polygon of the "
                    "class) and pointing game (the best patch is annotated). Prints JSON.")
    add_slide_analysis(parser)
    parser.add_argument("annotations", type=Path,
                        help="QuPath GeoJSON (File > Export objects as GeoJSON) in the slide's level-0 pixels")
    parser.add_argument("query", help='the finding, e.g. "tumour nest"')
    parser.add_argument("--class", dest="class_name",
                        help="the annotation class to score against (default: the file's only class)")
    args = parser.parse_args(argv)
    annotations = read_geojson(args.annotations)
    class_name = args.class_name
    if class_name is None:
        classes = list(annotations.classes())
        if len(classes) > 1:
            raise PathflipError(f"{args.annotations} holds the classes {annotations.class_list()}: choose one with "
                                "--class NAME.")
        class_name = classes[0] if classes else None
    result = evaluate_grounding(slide_analysis(args), annotations, class_name, args.query)
    print(json.dumps({"slide": args.slide, "annotations": str(args.annotations), **result,
                      "skipped_features": annotations.skipped}, indent=1))
    return 0
