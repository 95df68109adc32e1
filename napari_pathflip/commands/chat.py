"""`pathflip chat` and `pathflip caption`: ask about a slide, describe it; the answer streams to stdout."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..chat.config import ANSWER_MODES
from .options import add_slide_analysis, slide_analysis


def _add_chat(parser: argparse.ArgumentParser) -> None:
    add_slide_analysis(parser)
    parser.add_argument("--chat", help="chat folder (projector + LLM + adapter; default: beside the weights)")
    parser.add_argument("--llm", help="a local causal-LM folder (e.g. Qwen3-0.6B) replacing the chat folder's llm/")
    parser.add_argument("--answers", choices=ANSWER_MODES, help="grounded: from the slide's evidence where it "
                        "decides, with citations; visual: the paper's chat (default: the chat folder's)")
    parser.add_argument("--out", type=Path, help="write the answer with its cited evidence: .md, .json, or "
                        ".geojson (the cited boxes as QuPath annotations)")


def _conversation(args):
    from ..chat import ChatEngine

    analysis = slide_analysis(args)
    folder = Path(args.chat) if args.chat else analysis.weights.chat_dir
    engine = ChatEngine.load(folder, llm_dir=args.llm, device=args.device, merge=True)
    if args.answers:
        engine.config.answers = args.answers
    return engine, engine.conversation(analysis.prepare(), analysis)


def _print_stream(stream, question: str, out: Path | None) -> None:
    from ..chat import ranking_note

    for piece in stream:
        print(piece, end="", flush=True)
    print()
    answer = stream.result()
    if answer.notice:
        print(f"[{answer.notice}]")
    if answer.option_scores:
        print(f"[{ranking_note(answer.option_scores, ', ')}]")
    for line in evidence_lines(answer):
        print(line)
    if answer.report is not None:
        print()
        print(answer.report.to_markdown(), end="")
    if out is not None:
        print(f"written: {write_answer(out, question, answer)}")


def evidence_lines(answer) -> list[str]:
    """The findings an answer cites, each with its evidence and every box (level-0 px)."""
    from ..chat.grounded import cited_findings, evidence_line

    return [f"[{n}] {evidence_line(e)}" for n, e in enumerate(cited_findings(answer.citations), 1)]


def _check_out(out: Path | None) -> None:
    """--out names a file type this command writes (said before the models load, not after the answer)."""
    from ..errors import PathflipError

    if out is not None and out.suffix.lower() not in (".md", ".markdown", ".json", ".geojson"):
        raise PathflipError(f"--out {out}: use a .md, .json or .geojson file name")


def write_answer(out: Path, question: str, answer) -> Path:
    """The answer with its evidence as .md, .json or .geojson (cited boxes as QuPath annotations)."""
    import json

    from ..chat.grounded import cited_annotations
    from ..errors import PathflipError
    from ..heatmap import save_geojson

    suffix = out.suffix.lower()
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        data = {"question": question, "answer": answer.text, "citations": [c.to_json() for c in answer.citations],
                "report": answer.report.to_json() if answer.report is not None else None}
        out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    elif suffix == ".geojson":
        annotations = cited_annotations(answer.citations)
        if not annotations:
            raise PathflipError("the answer cites no finding with boxes, so there is nothing to write as GeoJSON; "
                                "ask where a finding is, or write .md / .json")
        save_geojson(out, annotations)
    elif suffix in (".md", ".markdown"):
        lines = [f"**Question:** {question}", "", f"**Answer:** {answer.text}", ""]
        lines += [f"- {line}" for line in evidence_lines(answer)]
        if answer.report is not None:
            lines += ["", answer.report.to_markdown()]
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        raise PathflipError(f"--out {out}: use a .md, .json or .geojson file name")
    return out


def chat_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pathflip chat", description="Ask a question about a slide; the answer "
                                     "streams. With --option (repeat, in A, B, C, D order) it is multiple choice.")
    _add_chat(parser)
    parser.add_argument("question")
    parser.add_argument("--option", action="append", help="a multiple-choice option; repeat per option")
    parser.add_argument("--region", nargs=4, type=int, metavar=("X0", "Y0", "X1", "Y1"),
                        help="ask about this level-0 box only (\"what is this?\", \"is there necrosis here?\"; "
                        "grounded answers)")
    args = parser.parse_args(argv)
    _check_out(args.out)
    if args.option and args.region:
        from ..errors import PathflipError

        raise PathflipError("--region and --option do not go together: ask about the region in words, e.g. "
                            "\"Is there necrosis here?\"")
    _, conversation = _conversation(args)
    if args.option:
        stream = conversation.stream_choice(args.question, args.option)
    elif args.region:
        if not hasattr(conversation, "evidence"):
            from ..errors import PathflipError

            raise PathflipError("--region needs grounded answers: drop --answers visual (or set \"answers\": "
                                "\"grounded\" in chat_config.json)")
        stream = conversation.stream(args.question, region=tuple(args.region))
    else:
        stream = conversation.stream(args.question)
    _print_stream(stream, args.question, args.out)
    return 0


def caption_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pathflip caption", description="Describe a slide (streamed); grounded "
                                     "answers add the structured report (each finding: present or absent, where, "
                                     "how large, its boxes) and check the description's places against it.")
    _add_chat(parser)
    args = parser.parse_args(argv)
    _check_out(args.out)
    engine, conversation = _conversation(args)
    _print_stream(conversation.stream(engine.config.caption_prompt), engine.config.caption_prompt, args.out)
    return 0
