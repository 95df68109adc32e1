"""The chat scored as a pathologist reads it, on synthetic test slides with truth, both answer modes side by side.

Free-text questions (`free_text_questions`, 100+ per split): presence, where, how many and what-is-at questions asked
in wordings the models never trained on (training.synth_eval.PARAPHRASES, plus words a pathologist types: "dead
tissue", "immune cells") and scored by content (`score_free_text`): yes/no first for presence, exactly the true place
for where, the true number first for how many, the finding named for what-is-at; an option letter or a description
instead of an answer scores wrong. Region questions: "What is this?" about a box drawn inside one finding, right when
the answer names that finding first. Presence agreement: the yes/no of presence answers against the slide's presence
calls. Citations: the cited box's best patch inside the true mask of the finding cited.

The judge's words for findings are the synthetic captions' (training.synthetic), not the chat's (chat/grounded.py),
so the chat is not scored by its own vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from training.synth_eval import ABSENT_FINDINGS, PARAPHRASES, Truth, patch_truth
from training.synthetic import CLASSES, POSITIONS, Layout

# typed words for findings, never trained (the examples and synth_eval.PARAPHRASES)
TYPED = {"fat": ["adipocytes", "fatty tissue", "fat cells"], "necrosis": ["dead tissue", "necrotic areas"],
         "lymphocytes": ["immune cells", "lymphoid cells"], "tumour": ["cancer cells", "neoplastic cells"],
         "normal_glands": ["non-neoplastic glands", "unremarkable glands"]}
PRESENCE_TEMPLATES = ("Is there {w}?", "Are there any {w} on this slide?", "Does the slide show {w}?",
                      "Do you see {w}?")
WHERE_TEMPLATES = ("Where is the {w}?", "Where are the {w} located?", "In which part of the slide is the {w}?")
COUNT_QUESTIONS = ("How many tumour nests are there?", "How many islands of tumor are present?",
                   "How many nests of cancer cells can you see?")
WHAT_AT_TEMPLATES = ("What is in the {p} part of the section?", "What lies in the {p} part?")
# the judge's words for a finding named in an answer (the synthetic captions' own vocabulary)
JUDGE_WORDS = {"tumour": ("tumour", "tumor", "carcinoma"), "necrosis": ("necrosis", "necrotic"),
               "lymphocytes": ("lymphocyte", "lymphoid"), "fat": ("fat", "adipose"),
               "normal_glands": ("gland",), "stroma": ("stroma",)}


@dataclass
class FreeQuestion:
    slide: str
    question: str
    kind: str  # presence, where, count, what_at
    finding: str  # CLASSES name ("" for count: tumour)
    truth: object  # bool (presence), place (where), int (count), finding (what_at)


def present(layout: Layout, finding: str) -> bool:
    return {"tumour": bool(layout.tumour), "necrosis": layout.necrosis, "lymphocytes": layout.lymphocytes != "none",
            "fat": layout.fat >= 0 or layout.tissue == "fat", "normal_glands": layout.glands >= 0}.get(finding, False)


def free_text_questions(slide: str, layout: Layout, rng: np.random.Generator) -> list[FreeQuestion]:
    """About 4-6 free-text questions of one slide (module docstring), drawn by `rng`."""
    def pick(options):
        return options[int(rng.integers(len(options)))]

    out = []
    finding = pick(sorted(TYPED))
    words = PARAPHRASES.get(finding, []) + TYPED[finding]
    out.append(FreeQuestion(slide, pick(PRESENCE_TEMPLATES).format(w=pick(words)), "presence", finding,
                            present(layout, finding)))
    absent = pick(list(ABSENT_FINDINGS))
    out.append(FreeQuestion(slide, pick(PRESENCE_TEMPLATES).format(w=absent), "presence", absent, False))
    placed = {"tumour": layout.tumour[0] if len(layout.tumour) == 1 else -1, "fat": layout.fat,
              "normal_glands": layout.glands}
    for name, p in placed.items():
        if p >= 0:
            words = PARAPHRASES[name][:3] + TYPED[name][:1]
            out.append(FreeQuestion(slide, pick(WHERE_TEMPLATES).format(w=pick(words)), "where", name, POSITIONS[p]))
    out.append(FreeQuestion(slide, pick(COUNT_QUESTIONS), "count", "tumour", len(layout.tumour)))
    away = {p: name for name, p in (("fat", layout.fat), ("normal_glands", layout.glands)) if p >= 0}
    away = {p: name for p, name in away.items() if p not in layout.tumour}
    if away:
        p = pick(sorted(away))
        out.append(FreeQuestion(slide, pick(WHAT_AT_TEMPLATES).format(p=POSITIONS[p]), "what_at", away[p], away[p]))
    return out


def _places(text: str) -> list[str]:
    text = " " + re.sub(r"[^a-z ]", " ", text.lower()) + " "
    found = []
    for name in sorted(POSITIONS, key=len, reverse=True):
        found += [name] * text.count(f" {name} ")
        text = text.replace(f" {name} ", " ")
    return found


def _first_number(text: str) -> int | None:
    words = ("none", "one", "two", "three", "four", "five")
    for token in re.findall(r"[a-z]+|\d+", text.lower()):
        if token.isdigit():
            return int(token)
        if token in words or token in ("no", "zero"):
            return words.index(token) if token in words else 0
    return None


def names(text: str, finding: str) -> bool:
    return any(w in text.lower() for w in JUDGE_WORDS.get(finding, (finding,)))


def yes_no(text: str) -> bool | None:
    first = re.findall(r"[a-z]+", text.lower())[:1]
    return {"yes": True, "no": False}.get(first[0]) if first else None


def score_free_text(answer: str, q: FreeQuestion) -> bool:
    """Whether `answer` answers `q` right, by content (module docstring)."""
    if re.match(r"^\s*[A-D][.)]", answer):  # an option letter: not an answer to a free-text question
        return False
    if q.kind == "presence":
        return yes_no(answer) is q.truth
    if q.kind == "where":
        return set(_places(answer)) == {q.truth}
    if q.kind == "count":
        return _first_number(answer) == q.truth
    return names(answer, q.truth)


def region_boxes(truth: Truth, labels: np.ndarray) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(finding, level-0 box) of a box drawn inside each finding of the slide: the square of up to 5 x 5 patches
    around the point deepest inside the finding's class on the patch grid."""
    from scipy import ndimage

    out = []
    for name in ("tumour", "necrosis", "lymphocytes", "fat", "normal_glands"):
        mask = labels == CLASSES.index(name)
        if mask.sum() < 4:
            continue
        depth = ndimage.distance_transform_edt(mask)
        row, col = np.unravel_index(int(depth.argmax()), depth.shape)
        r = int(min(2, max(0, depth.max() - 1)))
        s = truth.patch_size
        out.append((name, ((col - r) * s, (row - r) * s, (col + r + 1) * s, (row + r + 1) * s)))
    return out


def first_named(text: str) -> str | None:
    hits = [(text.lower().find(w), name) for name, words in JUDGE_WORDS.items() for w in words if w in text.lower()]
    return min(hits)[1] if hits else None


# the class of the truth each finding of report.FINDINGS is
CLASS_OF = {"tumour": "tumour", "necrosis": "necrosis", "lymphoid aggregate": "lymphocytes",
            "lymphocytes": "lymphocytes", "stroma": "stroma", "fat": "fat", "normal glands": "normal_glands"}


def cited_inside(answer, evidence, truth: Truth, finding: str | None = None) -> list[bool]:
    """For each citation of `answer` to a finding the evidence shows (present, with boxes): does the best patch of
    its best box lie inside the true mask of that finding (`finding`, else CLASS_OF its name)? Citations of
    findings the truth has no mask for are left out."""
    encoding = evidence.encoding
    out = []
    for citation in answer.citations:
        cited = citation.evidence
        name = finding or CLASS_OF.get(cited.name)
        if not cited.present or not cited.boxes or name not in truth.names:
            continue
        mask = patch_truth(encoding, truth, truth.masks[truth.names.index(name)])
        x0, y0, x1, y1 = cited.boxes[0].box
        coords = encoding.patch_coords
        inside = (coords[:, 0] >= x0) & (coords[:, 0] < x1) & (coords[:, 1] >= y0) & (coords[:, 1] < y1)
        values = np.where(inside, evidence.probabilities(cited.query), -1.0)
        out.append(bool(mask[int(values.argmax())]))
    return out


def _share(hits: list[bool]) -> float | None:
    return round(float(np.mean(hits)), 4) if hits else None


def evaluate_free(engine, model, encodings: dict, rows: dict, split_dir, mode: str, seed: int = 0,
                  evidence: dict | None = None, settings=None) -> dict:
    """Free-text, region and presence-agreement figures of one answer mode ("visual" or "grounded") on the slides
    of `encodings` (slide id -> SlideEncoding; `rows`: their visual rows) with truth in split_dir/truth;
    `evidence`: slide id -> SlideEvidence already made (its groundings are reused); `settings`: the
    GenerationSettings of the answers the LLM writes."""
    from pathlib import Path

    from napari_pathflip.chat import SlideEvidence
    from napari_pathflip.report import EncodedSlide

    rng = np.random.default_rng(seed)
    evidence_of = evidence
    by_kind: dict[str, list[bool]] = {}
    agree, cited, regions, examples = [], [], [], []
    for slide, encoding in encodings.items():
        path = Path(split_dir) / "truth" / f"{slide}.npz"
        if not path.is_file():
            continue
        truth = Truth.load(path)
        with np.load(path, allow_pickle=False) as data:
            layout, labels = Layout.from_key(str(data["layout"])), data["labels"]
        evidence = (evidence_of or {}).get(slide) or SlideEvidence(EncodedSlide(model, encoding))
        source = evidence if mode == "grounded" else None
        for q in free_text_questions(slide, layout, rng):
            answer = engine.conversation(rows[slide], source).ask(q.question, settings)
            right = score_free_text(answer.text, q)
            by_kind.setdefault(q.kind, []).append(right)
            if len(examples) < 12 or not right and len(examples) < 24:
                examples.append({"slide": slide, "question": q.question, "answer": answer.text, "right": right})
            if q.kind == "presence":
                call = evidence.finding(_subject_of(q)).status
                if call in ("found", "not found"):
                    agree.append(yes_no(answer.text) is (call == "found"))
            if mode == "grounded" and q.kind in ("presence", "where") and q.finding in truth.names:
                cited += cited_inside(answer, evidence, truth, q.finding)
        for name, box in region_boxes(truth, labels):
            conversation = engine.conversation(rows[slide], source)
            answer = (conversation.ask("What is this?", settings, region=box) if mode == "grounded"
                      else conversation.ask("What is this region?", settings))
            regions.append(first_named(answer.text) == name)
    every = [r for hits in by_kind.values() for r in hits]
    return {"free_text": {"n": len(every), "accuracy": _share(every),
                          "by_kind": {k: {"n": len(v), "accuracy": _share(v)} for k, v in sorted(by_kind.items())}},
            "presence_agreement": {"n": len(agree), "agreement": _share(agree)},
            "regions": {"n": len(regions), "named_first": _share(regions)},
            "cited_in_mask": {"n": len(cited), "share": _share(cited)},
            "examples": examples}


def _subject_of(q: FreeQuestion) -> str:
    """The words of a presence question's finding (what the evidence grounds)."""
    from napari_pathflip.chat import read_question

    return read_question(q.question).subject or q.finding
