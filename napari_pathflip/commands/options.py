"""Options the `pathflip` commands share, declared once; and the objects they resolve to."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from ..errors import PathflipError
from ..slide import SLIDE_SUFFIXES
from ..weights import DEVICES, WEIGHTS_ENV, WeightsFolder


# ------------------------------------------------------------------------------------------ value checks (type=)
def _number(text: str, kind: type, low: float, what: str):
    """argparse type body: `text` as `kind`, at least `low`; argparse names the option when it is not."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not low <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be {what} of at least {low:g}")
    return value


def positive_int(text: str) -> int:
    """A size or count: a whole number, 1 or more."""
    return _number(text, int, 1, "a whole number")


def non_negative_int(text: str) -> int:
    return _number(text, int, 0, "a whole number")


def positive_float(text: str) -> float:
    value = _number(text, float, 0, "a number")
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def fraction(text: str) -> float:
    value = _number(text, float, 0, "a number")
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} must lie between 0 and 1")
    return value


def existing_slide(path: str) -> str:
    """A slide path that exists (URLs are left to the reader): checked before any model loads."""
    if "://" not in path and not Path(path).exists():
        raise PathflipError(f"{path}: no such file or folder. Check the slide path.")
    return path


def slide_inputs(inputs: list[str]) -> list[str]:
    """The slides that files, folders and CSV lists name (extraction.collect_slides); a folder without slides is
    named on stderr, and no slide at all is a PathflipError (never a run that does nothing and exits 0)."""
    import sys

    from ..extraction import collect_slides

    found = {item: collect_slides([item]) for item in inputs}  # each folder walked once
    for item, slides in found.items():
        if Path(item).is_dir() and not slides:
            print(f"warning: no slides in the folder {item} (looked for {' '.join(SLIDE_SUFFIXES)} files and "
                  "DICOM folders)", file=sys.stderr)
    slides = list(dict.fromkeys(slide for item in inputs for slide in found[item]))  # collect_slides' order
    if not slides:
        raise PathflipError(f"no slides found in {' '.join(inputs)}: give slide files, folders holding slides or "
                            "CSV lists of slides.")
    return slides


def unexpected(exc: BaseException) -> str:
    """The failure line for an error no check foresaw (a bug): what it was, and to report it."""
    return f"unexpected error ({type(exc).__name__}: {exc}); the other slides go on. Please report this."


# ------------------------------------------------------------------------------------------------ shared options
def add_weights(parser: argparse.ArgumentParser, default: str = f"${WEIGHTS_ENV} or the bundled demo") -> None:
    parser.add_argument("--weights", help=f"PathFLIP weights folder (default: {default})")


def add_device(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default, choices=DEVICES)


def add_mpp(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mpp", type=positive_float, help="level-0 micrometres per pixel for slides that lack it")


def add_allow_pickle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading a pickle checkpoint you trust")


def add_encoder(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    from ..encoders import ENCODER_HELP

    what = f"default: {default}" if default else "default: the one recorded with the weights"
    parser.add_argument("--encoder", default=default, help=f"patch encoder ({what}). {ENCODER_HELP}")


def add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true")


def add_slide_analysis(parser: argparse.ArgumentParser) -> None:
    """One slide with its weights: what `pathflip ground|classify|chat|caption` take."""
    parser.add_argument("slide", help="slide file or fsspec URL")
    add_weights(parser)
    parser.add_argument("--cache", help="feature/encoding cache folder (default: $PATHFLIP_CACHE or ~/.cache/pathflip)")
    add_encoder(parser)
    add_device(parser)
    add_mpp(parser)
    add_allow_pickle(parser)


def slide_analysis(args: argparse.Namespace):
    """The `SlideAnalysis` the options of `add_slide_analysis` describe."""
    from ..analysis import SlideAnalysis

    existing_slide(args.slide)
    return SlideAnalysis(args.slide, WeightsFolder.resolve(args.weights), args.cache, args.encoder, args.device,
                         args.mpp, args.allow_pickle)


def write_csv(target, header: list[str], rows: list[list]) -> None:
    """`rows` under `header` to a file path or an open text stream (stdout)."""
    if hasattr(target, "write"):
        csv.writer(target).writerows([header, *rows])
        return
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    with open(Path(target), "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
