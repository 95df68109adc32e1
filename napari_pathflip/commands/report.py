"""`pathflip report SLIDE`: each finding present or absent with its probability, place, size and boxes."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import PathflipError
from .library import parse_prompt
from .options import add_slide_analysis, slide_analysis


def finding(text: str) -> tuple[str, list[str]]:
    """argparse type of --finding: "necrosis=necrosis|necrotic debris" -> ("necrosis", [two wordings])."""
    try:
        return parse_prompt(text)
    except PathflipError:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=QUERY or NAME=QUERY|QUERY|...") from None


def report_main(argv: list[str]) -> int:
    from ..files import atomic_write_json, atomic_write_text
    from ..report import FINDINGS, slide_report

    parser = argparse.ArgumentParser(prog="pathflip report", description="The structured report of a slide: each "
                                     "finding present or absent with its probability, the area of the section it "
                                     "lies in, its size (fraction of tissue) and its boxes (level-0 px). Prints "
                                     "Markdown.")
    add_slide_analysis(parser)
    parser.add_argument("--out", type=Path, help="report.md | report.json")
    parser.add_argument("--finding", action="append", type=finding, metavar="NAME=QUERY",
                        help="a finding to report: NAME=QUERY, or NAME=QUERY|QUERY|... (the best supported wording "
                             "is kept); repeat per finding (default: " + ", ".join(FINDINGS) + ")")
    args = parser.parse_args(argv)
    if args.out and args.out.suffix.lower() not in (".md", ".json"):
        parser.error(f"--out {args.out}: use a .md or .json file name")
    findings = None
    if args.finding:
        findings = {}
        for name, queries in args.finding:
            findings.setdefault(name, []).extend(queries)
    report = slide_report(slide_analysis(args), findings)
    print(report.to_markdown(), end="")
    if args.out:
        if args.out.suffix.lower() == ".json":
            atomic_write_json(args.out, report.to_json())
        else:
            atomic_write_text(args.out, report.to_markdown())
        print(f"wrote {args.out}")
    return 0
