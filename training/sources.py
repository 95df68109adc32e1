"""Caption and question-answer sources -> plain records.

Readers for the SlideBench CSVs (caption and multiple-choice VQA) and for LLaVA-style JSON as SlideInstruction
ships it. A record names its slide exactly as the source does (usually a feature-file path); `slide_key` turns
that into the bare slide name used to find features in our store or in a CLAM/TRIDENT folder.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

from napari_pathflip.errors import PathflipError

OPTION_LETTERS = "ABCD"
CAPTION_COLUMNS = ("ID", "Slide", "Tumor", "Question", "Caption")
VQA_COLUMNS = ("ID", "Slide", "Tumor", "Broad Category", "Narrow Category", "Question", *OPTION_LETTERS, "Answer")
# Extensions stripped from a slide reference to get its name (feature files and slide files).
_SLIDE_SUFFIXES = (".h5", ".hdf5", ".csv", ".pt", ".npz", ".npy", ".safetensors", ".zarr",
                   ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif")
_IMAGE_TOKEN = re.compile(r"\s*<image>\s*")
_OPTION_LINE = re.compile(r"^\s*\(?([A-D])[).:]\s", re.MULTILINE)
_ANSWER_LETTER = re.compile(r"^\s*\(?([A-D])(?:[).:]|\s|$)")


@dataclass(frozen=True)
class Record:
    """One slide with its conversation: `turns` are (question, answer) pairs, `task` is "caption" or "vqa"."""

    id: str
    slide: str  # the slide reference exactly as the source wrote it
    turns: tuple[tuple[str, str], ...]
    task: str
    tumor: str = ""
    category: str = ""  # SlideBench "Broad Category" (VQA)
    subcategory: str = ""  # SlideBench "Narrow Category" (VQA)
    options: tuple[str, ...] = ()  # option texts in letter order (VQA)
    answer: str = ""  # correct option letter (VQA), "" when unknown

    @property
    def slide_id(self) -> str:
        return slide_key(self.slide)


def slide_key(reference: str) -> str:
    """The slide name inside a reference: folder and a known feature/slide extension removed.

    "datasets/.../TCGA-DK-A3IS-01Z-00-DX1.31CABE32-....h5" -> "TCGA-DK-A3IS-01Z-00-DX1.31CABE32-..." (the dot in the
    TCGA name stays because only known extensions are stripped).
    """
    name = PurePosixPath(reference.strip().replace("\\", "/")).name
    for suffix in _SLIDE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def format_choice_question(question: str, options: Sequence[str]) -> str:
    """The multiple-choice prompt used for training, evaluation and chat.

    One line for the question, one "X) option" line per non-empty option, then the instruction. The expected
    answer starts with the letter, so SlideBench's rule (text up to the first "." equals the letter) applies.
    """
    lines = [question.strip()]
    lines += [f"{letter}) {text.strip()}" for letter, text in zip(OPTION_LETTERS, options) if text.strip()]
    lines.append("Answer with the option letter.")
    return "\n".join(lines)


def read_csv_rows(path: str | Path, required: Sequence[str]) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise PathflipError(f"CSV file not found: {path}. Check the path.")
    # utf-8-sig: SlideBench's caption CSV starts with a byte-order mark that would otherwise rename column "ID".
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in required if c not in columns]
        if missing:
            raise PathflipError(
                f"{path} lacks column(s) {', '.join(missing)} (found: {', '.join(columns) or 'none'}). "
                f"The file needs the columns {', '.join(required)}."
            )
        return [{k.strip(): (v or "") for k, v in row.items() if k is not None} for row in reader]


def read_caption_csv(path: str | Path) -> list[Record]:
    """SlideBench caption CSV (ID, Slide, Tumor, Question, Caption) -> one caption record per row."""
    records = []
    for row in read_csv_rows(path, CAPTION_COLUMNS):
        if not row["Caption"].strip():
            raise PathflipError(f"{path}: row ID {row['ID']} has an empty Caption. Fill it in or remove the row.")
        records.append(Record(id=row["ID"].strip(), slide=row["Slide"].strip(),
                              turns=((row["Question"].strip(), row["Caption"].strip()),),
                              task="caption", tumor=row["Tumor"].strip()))
    return records


def read_vqa_csv(path: str | Path) -> list[Record]:
    """SlideBench VQA CSV -> one multiple-choice record per row; the answer turn is the option letter."""
    records = []
    for row in read_csv_rows(path, VQA_COLUMNS):
        options = tuple(row[letter].strip() for letter in OPTION_LETTERS)
        present = [letter for letter, text in zip(OPTION_LETTERS, options) if text]
        answer = row["Answer"].strip()
        if answer not in present:
            raise PathflipError(f"{path}: row ID {row['ID']} has Answer {answer!r}, which is not one of its "
                                f"non-empty options {', '.join(present) or '(none)'}. Fix the row.")
        records.append(Record(id=row["ID"].strip(), slide=row["Slide"].strip(),
                              turns=((format_choice_question(row["Question"], options), answer),), task="vqa",
                              tumor=row["Tumor"].strip(), category=row["Broad Category"].strip(),
                              subcategory=row["Narrow Category"].strip(), options=options, answer=answer))
    return records


def _strip_image_token(text: str) -> str:
    # The visual tokens are spliced in by the model; text before and after the placeholder is kept.
    return _IMAGE_TOKEN.sub("\n", text).strip()


def _turns(conversation: Iterable[dict], where: str) -> tuple[tuple[str, str], ...]:
    turns, question = [], None
    for message in conversation:
        role, value = message.get("from"), message.get("value")
        if not isinstance(value, str):
            raise PathflipError(f"{where}: a message has no text 'value'.")
        if role in {"human", "user"}:
            if question is not None:
                raise PathflipError(f"{where}: two questions in a row; every human turn needs a gpt answer.")
            question = _strip_image_token(value)
        elif role in {"gpt", "assistant"}:
            if question is None:
                raise PathflipError(f"{where}: an answer without a question; conversations start with 'human'.")
            turns.append((question, value.strip()))
            question = None
        else:
            raise PathflipError(f"{where}: unknown speaker {role!r}; use 'human' and 'gpt'.")
    if not turns:
        raise PathflipError(f"{where}: the conversation has no question-answer pair.")
    return tuple(turns)


def read_llava_json(path: str | Path, task: str | None = None) -> list[Record]:
    """LLaVA-style JSON (SlideInstruction): a list of {"id", "image", "conversations"} -> records.

    `image` is one slide reference or a one-element list. `task` forces the kind; by default a conversation whose
    first question lists options "A) ..." and "B) ..." is "vqa" (its answer letter parsed when the reply starts
    with one), anything else "caption".
    """
    path = Path(path)
    if not path.is_file():
        raise PathflipError(f"JSON file not found: {path}. Check the path.")
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise PathflipError(f"{path} is not valid JSON ({exc}). Check the file.") from exc
    if not isinstance(items, list):
        raise PathflipError(f"{path}: expected a JSON list of conversations, found {type(items).__name__}.")
    if task not in {None, "caption", "vqa"}:
        raise PathflipError(f"Unknown task {task!r}; use 'caption' or 'vqa'.")
    records = []
    for index, item in enumerate(items):
        where = f"{path} item {index}"
        if not isinstance(item, dict) or "conversations" not in item:
            raise PathflipError(f"{where}: each item needs 'image' and 'conversations'.")
        images = item.get("image")
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str):
            raise PathflipError(f"{where}: 'image' must name exactly one slide (a path or a one-element list).")
        turns = _turns(item["conversations"], where)
        letters = set(_OPTION_LINE.findall(turns[0][0]))
        kind = task or ("vqa" if {"A", "B"} <= letters else "caption")
        answer = _ANSWER_LETTER.match(turns[0][1]) if kind == "vqa" else None
        records.append(Record(id=str(item.get("id", index)), slide=images[0].strip(), turns=turns, task=kind,
                              answer=answer.group(1) if answer else ""))
    return records


def read_records(path: str | Path) -> list[Record]:
    """Any supported source, chosen by extension (.json) or by the CSV's columns (Caption vs Answer)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return read_llava_json(path)
    if not path.is_file():
        raise PathflipError(f"Source file not found: {path}. Check the path.")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        columns = {c.strip() for c in next(csv.reader(handle), [])}
    if "Answer" in columns:
        return read_vqa_csv(path)
    if "Caption" in columns:
        return read_caption_csv(path)
    raise PathflipError(f"{path}: not a SlideBench caption CSV (column Caption) or VQA CSV (column Answer).")
