"""`pathflip index`, `pathflip search` and `pathflip classify LIBRARY`: a slide library from the command line."""

from __future__ import annotations

import argparse
import sys

from ..errors import PathflipError
from ..text import query_text
from .options import (add_allow_pickle, add_device, add_encoder, add_mpp, add_progress, add_weights, existing_slide,
                      positive_int, slide_inputs, write_csv)


def index_main(argv: list[str]) -> int:
    from ..extraction import shard
    from ..library import LibraryConfig, index_slides, is_library

    parser = argparse.ArgumentParser(prog="pathflip index", description="Index slides into a library (resumable: "
                                     "a rerun adds only new slides). Under torchrun rank r of w takes every w-th.")
    parser.add_argument("inputs", nargs="*", metavar="FOLDER_OR_CSV",
                        help="slide files, folders or CSV files (none: only commit what an interrupted run left "
                             "pending, and --repair)")
    parser.add_argument("--out", required=True, help="library folder (created on first use)")
    parser.add_argument("--repair", action="store_true",
                        help="first rewrite a damaged library from its readable rows and index the slides of the "
                             "damaged ones again (from the feature cache); `pathflip verify LIBRARY` shows the damage")
    add_weights(parser, default="those of the library, else $PATHFLIP_WEIGHTS or the bundled demo")
    parser.add_argument("--cache", help="feature/encoding cache (default: LIBRARY/cache)")
    add_encoder(parser)
    add_device(parser)
    add_mpp(parser)
    parser.add_argument("--prototypes", type=positive_int, default=LibraryConfig.prototypes,
                        help="k-means prototypes per slide for the first search stage")
    add_allow_pickle(parser)
    add_progress(parser)
    args = parser.parse_args(argv)

    if not args.inputs and not is_library(args.out):
        raise PathflipError(f"{args.out} is not a library yet: give the slides to index (files, folders or CSV "
                            "lists).")
    slides, rank, world = shard(slide_inputs(args.inputs) if args.inputs else [])
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    print(f"{prefix}{len(slides)} slide(s) -> {args.out}", flush=True)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(slides), unit="slide", file=sys.stderr)

    def progress(number: int, total: int, name: str, done: int, patches: int) -> None:
        if bar is not None:
            bar.n = number
            bar.set_postfix_str(f"{name} {done}/{patches} patches" if patches else name, refresh=True)

    try:
        summary = index_slides(slides, args.out, weights=args.weights, cache_dir=args.cache, encoder=args.encoder,
                               device=args.device, mpp=args.mpp, config=LibraryConfig(prototypes=args.prototypes),
                               progress=progress, allow_pickle=args.allow_pickle, repair=args.repair,
                               on_wait=lambda message: print(f"{prefix}{message}", flush=True))
    finally:
        if bar is not None:
            bar.close()
    if summary.repair is not None:
        repair = summary.repair
        what = (f"kept {repair.kept} row(s), dropped {len(repair.dropped)} damaged one(s)" if repair.rewritten
                else "nothing was damaged")
        print(f"{prefix}repair: {what}")
        for path, why in repair.dropped:
            print(f"  dropped  {path or 'a slide the library no longer names (index it again)'}: {why}")
    print(f"{prefix}summary: {len(summary.indexed)} indexed, {len(summary.skipped)} skipped (already in the "
          f"library), {len(summary.failed)} failed; the library holds {summary.count} slide(s)")
    for path, reason in summary.failed:
        print(f"  FAILED  {path}: {reason}")
    return 1 if summary.failed else 0


def _add_library(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("library", help="library folder (pathflip index ... --out LIBRARY)")
    add_weights(parser, default="the folder the library was indexed with")
    add_device(parser, default="cpu")
    parser.add_argument("--csv", help="write the table to this CSV file")


def _library(args):
    """The library (or the shards of one), with a note on stderr when finished slides still wait in pending/ (an
    interrupted index); a library that holds only such slides is an error that says how to add them."""
    from ..library import Table, is_library, open_library

    if is_library(args.library):
        table = Table(args.library)  # a damaged library or pending slides are told before the model loads
        waiting = table.pending
        if waiting and not table.count:
            raise PathflipError(f"{args.library} holds no slides yet: {waiting} finished slide(s) wait in its "
                                f"pending/ folder (an interrupted index). Run `pathflip index --out {args.library}` "
                                "to add them.")
        if waiting:
            print(f"note: {waiting} finished slide(s) in {args.library}/pending are not in the library yet (an "
                  f"interrupted index): run `pathflip index --out {args.library}` to add them.", file=sys.stderr)
    return open_library(args.library, weights=args.weights, device=args.device)


def search_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pathflip search", description="Rank the slides of a library (or of a "
                                     "folder of library shards) by a text (with each slide's best region), by their "
                                     "likeness to a slide (--like) or by a region of a slide (--region).")
    _add_library(parser)
    parser.add_argument("text", nargs="?", help='what to find, e.g. "central necrosis"')
    parser.add_argument("--like", metavar="SLIDE", help="rank by likeness to this slide instead of a text")
    parser.add_argument("--region", nargs=5, metavar=("SLIDE", "X0", "Y0", "X1", "Y1"),
                        help="rank places like this level-0 box of a slide (in the library or not)")
    parser.add_argument("--top", type=positive_int, default=20)
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.text, args.like, args.region)) != 1:
        parser.error("give a text, --like SLIDE or --region SLIDE X0 Y0 X1 Y1 (one of them)")
    box = None
    if args.region:
        existing_slide(args.region[0])
        try:
            box = tuple(int(v) for v in args.region[1:])
        except ValueError:
            parser.error("--region: X0 Y0 X1 Y1 are whole level-0 pixel coordinates")
        if box[2] <= box[0] or box[3] <= box[1]:
            parser.error("--region: the box needs X1 > X0 and Y1 > Y0")
    elif args.like:
        existing_slide(args.like)
    else:
        args.text = query_text(args.text)
    library = _library(args)
    if args.region:
        hits = library.search_region(args.region[0], box, args.top)
        what = f"like region {box} of {args.region[0]}"
    elif args.like:
        hits, what = library.like(args.like, args.top), f"like {args.like}"
    else:
        hits, what = library.search(args.text, args.top), repr(args.text)
    header = ["rank", "slide", "score", "region_x0", "region_y0", "region_x1", "region_y1", "region_score", "path"]
    rows = [[rank, hit.name, f"{hit.score:.4f}", *(hit.box or ("",) * 4),
             "" if hit.region_score is None else f"{hit.region_score:.4f}", hit.path]
            for rank, hit in enumerate(hits, 1)]
    print(f"{len(hits)} of {len(library)} slides, {what}:")
    for rank, hit in enumerate(hits, 1):
        where = (f"   {'place' if args.region else 'best region'} x {hit.box[0]}-{hit.box[2]}, "
                 f"y {hit.box[1]}-{hit.box[3]}: {hit.region_score:.3f}" if hit.box else "")
        print(f"{rank:>4}  {hit.score:8.3f}  {hit.name}{where}")
    if args.csv:
        write_csv(args.csv, header, rows)
        print(f"wrote {args.csv}")
    return 0


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    """"necrosis=necrosis|necrotic debris" -> ("necrosis", [two phrasings]); a plain prompt names its class."""
    name, _, phrases = prompt.partition("=") if "=" in prompt else (prompt, "", prompt)
    phrases = [p.strip() for p in phrases.split("|") if p.strip()]
    if not name.strip() or not phrases:
        raise PathflipError(f"--prompt {prompt!r}: give a prompt, or CLASS=PROMPT|PROMPT|... for an ensemble")
    return name.strip(), phrases


def classify_library_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pathflip classify LIBRARY", description="Zero-shot classification of "
                                     "every slide of a library: one CSV row per slide (to stdout or --csv).")
    _add_library(parser)
    parser.add_argument("--prompt", action="append", required=True,
                        help="one class: a prompt, or CLASS=PROMPT|PROMPT|... (a prompt ensemble); repeat per class")
    args = parser.parse_args(argv)
    classes = dict(parse_prompt(p) for p in args.prompt)
    library = _library(args)
    header = ["slide", "predicted", *(f"p[{c}]" for c in classes), *(f"present[{c}]" for c in classes), "path"]
    rows = []
    for row, probabilities, presence in library.classify(classes):
        best = max(probabilities, key=probabilities.get)
        rows.append([library.names[row], best, *(f"{probabilities[c]:.4f}" for c in classes),
                     *(f"{presence[c]:.4f}" for c in classes), library.paths[row]])
    if args.csv:
        write_csv(args.csv, header, rows)
        print(f"wrote {args.csv}: {len(rows)} slide(s)")
    else:
        write_csv(sys.stdout, header, rows)
    return 0
