"""Sentence splitting for captions, reports and typed descriptions (grounding, retrieval, training).

Why a small rule-based splitter and not nltk's Punkt: Punkt's English model is downloaded data (not available
offline), and an untrained ``PunktSentenceTokenizer`` with custom abbreviations still breaks a sentence after any
non-abbreviation followed by a capital ("1. Carcinoma", "N.S.A.B.P. Grading") and cannot make "No." an
abbreviation only before a number ("node No. 5" vs "... invasion? No. The margins ..."). Pathology reports need
exactly those decisions, so the rules are spelled out here, each with its reason:

- A sentence ends at ".", "?" or "!" (plus closing quotes/brackets) that is followed by whitespace and then by a
  character that can start a sentence (capital letter, digit, opening quote or bracket, or a TNM stage such as
  "pT2"), or by the end of the text.
  A period inside a token ("3.5", "p.G12V", "G.3") is never followed by whitespace, so decimals never split.
- A period after a known abbreviation ("e.g.", "Dr.", "vs.", "approx.", "et al.") never ends a sentence; "No.",
  "Fig." and friends do not end one when a number follows.
- A bare list number ("1.", "2.") at the start of a sentence or after ":"/";" is an enumerator, not a sentence.
- A blank line always ends a sentence; a line that starts with a list marker starts one; other line breaks are
  soft wraps and read as spaces.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import PathflipError

# Lower-case, without the final period. These never end a sentence.
ABBREVIATIONS = frozenset(
    {
        "e.g", "i.e", "eg", "ie", "cf", "vs", "viz", "approx", "ca", "al",
        "dr", "drs", "mr", "mrs", "ms", "prof", "st", "sr", "jr", "mt",
        "resp", "incl", "excl", "max", "min", "avg", "est", "dept", "univ", "ref", "refs", "ed", "eds",
        "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
    }
)
# These are abbreviations only when a number follows ("No. 5", "Fig. 2"); "No." alone can be an answer.
NUMBER_ABBREVIATIONS = frozenset({"no", "nos", "fig", "figs", "vol", "p", "pp", "ch", "sec", "tab", "nr"})

_TERMINAL = re.compile(r"[.?!]+[\"'\u201d\u2019)\]]*")
# A capital, digit, opening quote/bracket, or a TNM stage ("pT2 N0 ..."), which starts with a small letter.
_SENTENCE_START = re.compile(r"[A-Z0-9\"'\u201c\u2018(\[]|y?p[TNM][0-9xXi]")
_LIST_MARKER = re.compile(r"\s*(?:[-*\u2022]|\(?\d{1,2}[.)]|\(?[a-zA-Z][.)])\s")
_ENUMERATOR = re.compile(r"\d{1,2}|[a-z]")
_ENDS = re.compile(r"[.?!][\"'\u201d\u2019)\]]*$")
_PARAGRAPH = re.compile(r"\n\s*\n")
_SPACES = re.compile(r"\s+")


def _blocks(text: str) -> list[str]:
    """Paragraphs and list items, each with its soft line wraps turned into spaces."""
    blocks: list[str] = []
    for paragraph in _PARAGRAPH.split(text.replace("\r\n", "\n").replace("\r", "\n")):
        current: list[str] = []
        for line in paragraph.split("\n"):
            if _LIST_MARKER.match(line) and current:
                blocks.append(" ".join(current))
                current = []
            current.append(line.strip())
        blocks.append(" ".join(current))
    return [b for b in (_SPACES.sub(" ", b).strip() for b in blocks) if b]


def _is_boundary(block: str, start: int, match: re.Match) -> bool:
    """Whether the terminal punctuation `match` ends the sentence that began at `start`."""
    rest = block[match.end():]
    if not rest:
        return True
    if not rest[0].isspace() or not _SENTENCE_START.match(rest.lstrip()):
        return False
    if not match.group().startswith(".") or match.group().startswith(".."):
        return True  # "?", "!" and ellipses end a sentence before a capital
    head = block[start:match.start()]
    last = head.rsplit(" ", 1)[-1]
    word = last.lstrip("(\"'[\u201c\u2018").lower()
    if word in ABBREVIATIONS:  # "et al." ends in "al"
        return False
    if word in NUMBER_ABBREVIATIONS and rest.lstrip()[0].isdigit():
        return False
    before = head[: len(head) - len(last)].rstrip()
    if _ENUMERATOR.fullmatch(word) and (not before or before.endswith((":", ";"))):
        return False
    return True


def split_sentences(text: str) -> list[str]:
    """Split a report/caption into sentences (rules in the module docstring); whitespace is normalised."""
    sentences: list[str] = []
    for block in _blocks(text):
        start = 0
        for match in _TERMINAL.finditer(block):
            if _is_boundary(block, start, match):
                sentences.append(block[start:match.end()].strip())
                start = match.end()
        if block[start:].strip():
            sentences.append(block[start:].strip())
    return sentences


def join_sentences(sentences: Sequence[str]) -> str:
    """Join sentences as the spec's `". ".join` does, without doubling a period a sentence already has."""
    return " ".join(s if _ENDS.search(s) else s + "." for s in sentences)


def query_text(text: str) -> str:
    """A typed finding, stripped; a PathflipError when it holds no word (empty, punctuation or emoji only), which
    the text tower would still map somewhere on the slide with a confident score."""
    text = (text or "").strip()
    if not any(character.isalnum() for character in text):
        what = "an empty query" if not text else f"{text!r} holds no words the model knows"
        raise PathflipError(f"{what}: type a finding in words, e.g. \"necrosis\" or \"tumour nest\".")
    return text
