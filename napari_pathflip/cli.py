"""`pathflip` command line: one sub-command per workflow step, each implemented in the module that owns it."""

from __future__ import annotations

import importlib
import sys

from .errors import PathflipError

# command -> ("module" with a `main(argv) -> int`, or "module:function"; one-line help)
COMMANDS = {
    "extract": ("napari_pathflip.extraction", "extract patch features of slides into a feature store"),
    "ground": ("napari_pathflip.analysis:ground_main", "where on the slide is a finding (PNG / NPZ / GeoJSON)"),
    "classify": ("napari_pathflip.analysis:classify_main",
                 "zero-shot classification of a slide, or of every slide of a library, with text prompts"),
    "index": ("napari_pathflip.library:index_main", "index slides into a library (resumable, shardable)"),
    "search": ("napari_pathflip.library:search_main", "rank a library's slides by a text or by a slide (--like)"),
    "chat": ("napari_pathflip.analysis:chat_main", "ask a question about a slide (streamed answer)"),
    "caption": ("napari_pathflip.analysis:caption_main", "describe a slide (streamed)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: pathflip COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module_name, _, function = COMMANDS[argv[0]][0].partition(":")
    try:
        return getattr(importlib.import_module(module_name), function or "main")(argv[1:]) or 0
    except PathflipError as exc:
        print(f"pathflip {argv[0]}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
