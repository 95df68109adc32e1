"""`pathflip chat` and `pathflip caption`: ask about a slide, describe it; the answer streams to stdout."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_slide_analysis, slide_analysis


def _add_chat(parser: argparse.ArgumentParser) -> None:
    add_slide_analysis(parser)
    parser.add_argument("--chat", help="chat folder (projector + LLM + adapter; default: beside the weights)")
    parser.add_argument("--llm", help="a local causal-LM folder (e.g. Qwen3-0.6B) replacing the chat folder's llm/")


def _conversation(args):
    from ..chat import ChatEngine

    analysis = slide_analysis(args)
    folder = Path(args.chat) if args.chat else analysis.weights.chat_dir
    engine = ChatEngine.load(folder, llm_dir=args.llm, device=args.device, merge=True)
    return engine, engine.conversation(analysis.prepare())


def _print_stream(stream) -> None:
    from ..chat import ranking_note

    for piece in stream:
        print(piece, end="", flush=True)
    print()
    answer = stream.result()
    if answer.notice:
        print(f"[{answer.notice}]")
    if answer.option_scores:
        print(f"[{ranking_note(answer.option_scores, ', ')}]")


def chat_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pathflip chat", description="Ask a question about a slide; the answer "
                                     "streams. With --option (repeat, in A, B, C, D order) it is multiple choice.")
    _add_chat(parser)
    parser.add_argument("question")
    parser.add_argument("--option", action="append", help="a multiple-choice option; repeat per option")
    args = parser.parse_args(argv)
    _, conversation = _conversation(args)
    if args.option:
        _print_stream(conversation.stream_choice(args.question, args.option))
    else:
        _print_stream(conversation.stream(args.question))
    return 0


def caption_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pathflip caption", description="Describe a slide (streamed).")
    _add_chat(parser)
    args = parser.parse_args(argv)
    engine, conversation = _conversation(args)
    _print_stream(conversation.stream(engine.config.caption_prompt))
    return 0
