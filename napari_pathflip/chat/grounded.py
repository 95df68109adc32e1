"""Grounded answers: the chat answers from the slide's PathFLIP evidence and points to it.

The paper's chat (and SlideChat, WSI-LLaVA) answers from visual tokens alone: on the demo corpus it names the right
place of a finding for a fifth of them, while the grounding beside it ranks the right patches first 99 % of the time.
Here the question kinds the evidence decides are answered from it, the rest by the LLM:

    question            read_question -> Intent(kind, subject, place / relation)
    presence, where,    SlideEvidence.finding(subject): the calibrated patch-text heatmap of the typed words
    how many, how large (report.evidence_from: presence and status, finding areas at the default threshold, their
                        places among the nine areas of the section, size as a share of the tissue); the answer is
                        written from it (yes/no first, a place, a number, a share) with a citation on the finding
    what is at a place, evidence of every finding of report.FINDINGS restricted to the place's (or region's) patches
    in a drawn region
    multiple choice     the option the evidence picks (place, number, present/absent, what lies at the centre or
                        edge of a finding) when the stem is of those kinds, else the LLM's ranking (choice_rule)
    describe            the LLM writes the caption; each sentence is checked against the evidence: a place it
                        names wrongly is replaced by the evidence's, a finding the slide does not show is dropped,
                        a placed finding it leaves out is added; plus the structured report (report.py)
    anything else       the LLM, from the visual tokens (the paper's path)

`ChatConfig.answers` picks "grounded" (this module) or "visual" (the paper's chat only); both are scored side by
side (training/instruct.py evaluate_chat). Every finding an answer names carries a Citation (its character span and
FindingEvidence: boxes in level-0 px): the dock shows it as a link that opens its heatmap and zooms to its best box,
the CLI prints the boxes, the exports carry them.

The answer text of an evidence-decided question is written here from the evidence, not by the LLM: a sentence the
model would write could again say something the evidence does not (measured in training/instruct.py).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import PathflipError
from ..model.regions import AREA_NAMES
from ..report import FINDINGS, FindingEvidence, SlideReport, evidence_for, evidence_from
from ..text import split_sentences
from .config import GenerationSettings
from .conversation import Conversation
from .decoding import ChatAnswer
from .prompt import choice_options, option_answer

# the words that name each finding of report.FINDINGS in a sentence (longer names first where they overlap; the
# first finding of FINDINGS that matches a stretch of text takes it)
FINDING_WORDS: dict[str, tuple[str, ...]] = {
    "tumour": ("tumour", "tumor", "carcinoma", "neoplastic", "cancer", "malignant"),
    "necrosis": ("necrosis", "necrotic", "dead tissue"),
    "lymphoid aggregate": ("lymphoid aggregate", "aggregate", "cluster of lymphocytes"),
    "lymphocytes": ("lymphocyte", "lymphoid", "immune cells", "inflammatory"),
    "stroma": ("stroma", "fibrous", "collagen", "connective tissue"),
    "fat": ("adipose", "adipocyte", "fat"),
    "normal glands": ("gland",),
}
# findings a description places (report.FINDINGS names; the others are true of the whole section, or of a
# tumour's centre or edge)
PLACED = ("tumour", "fat", "normal glands", "lymphoid aggregate")
BACKGROUND = ("stroma",)  # findings that make up the section around the others: named in a place only by share
NUMBERS = ("none", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SHOWN_SHARE = 0.25  # a finding is named in a place or region when it paints at least this share of its tissue
LONGEST_SENTENCE = 400  # characters of a description held back at most while its sentence is checked
RIM_SHARE = 0.15  # a finding named at a finding's edge paints at least this share of the rim (relation_scores)
RIM_ABSENT = 0.1  # "X without Y" at an edge: Y paints less than this share of the rim
REGION_KINDS = ("presence", "size", "count", "what_at")  # kinds a question about a drawn region is answered for
KINDS = ("presence", "where", "count", "size", "what_at", "relation", "which_present", "which_absent", "describe",
         "other")


# ------------------------------------------------------------------------------------------------ questions
@dataclass(frozen=True)
class Intent:
    kind: str  # one of KINDS
    subject: str = ""  # the finding asked about, as typed ("dead tissue")
    place: str | None = None  # AREA_NAMES entry (what_at)
    relation: str | None = None  # "centre" or "edge" (relation: of the subject)
    here: bool = False  # asked of a drawn region ("is there necrosis here?")


def _clean(text: str) -> str:
    text = re.sub(r"\s+", " ", text.lower()).strip(" ?.!")
    return text


# a place of the section in words: "upper left", "top right", "lower centre", "centre", "left", ... but not a
# place of a finding ("the centre of the tumour nest": followed by "of")
_VERTICAL = {"upper": "upper", "top": "upper", "lower": "lower", "bottom": "lower"}
_HORIZONTAL = {"left": "left", "right": "right", "central": "central", "centre": "central", "center": "central",
               "middle": "central"}
_PLACE_RE = re.compile(rf"\b(?:(?P<v>{'|'.join(_VERTICAL)})(?:\s+(?P<h>{'|'.join(_HORIZONTAL)}))?"
                       rf"|(?P<h2>{'|'.join(_HORIZONTAL)}))\b(?!\s+of\b)", re.IGNORECASE)


def place_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, AREA_NAMES entry) of each place of the section a text names, in order: "the top left and the
    centre" -> upper left, central. The one reader of places in text (questions, options, descriptions)."""
    out = []
    for match in _PLACE_RE.finditer(text):
        vertical = _VERTICAL.get((match["v"] or "").lower())
        horizontal = _HORIZONTAL.get((match["h"] or match["h2"] or "").lower())
        area = f"{vertical} {horizontal or 'central'}" if vertical else horizontal
        out.append((match.start(), match.end(), area))
    return out


def find_places(text: str) -> list[str]:
    """The AREA_NAMES a text names, in order (place_spans)."""
    return [area for _, _, area in place_spans(text)]


def named_findings(text: str) -> list[str]:
    """The findings of report.FINDINGS a text names (FINDING_WORDS), in the order it names them."""
    text = text.lower()
    found, taken = [], []
    for name, words in FINDING_WORDS.items():
        for word in words:
            start = text.find(word)
            if start >= 0 and not any(a <= start < b for a, b in taken):
                found.append((start, name))
                taken.append((start, start + len(word)))
                break
    return [name for _, name in sorted(found)]


_SUBJECT_TAIL = re.compile(r"( (is|are))?( (located|found|seen|present|visible|identified|there))?( (on|in|within) "
                           r"(the|this) (slide|section|tissue|image|region|area|box|selection))?( here)?$")
_LEAD = re.compile(r"^(the|a|an|any|some) ")
_HERE = re.compile(r"\b(here|this region|this area|the region|the selection|this box|inside it|in it)\b")
_PATTERNS = [
    ("count", re.compile(r"^how many (?P<x>.+?)( (are|is|can|do|does|were|could|would)\b.*)?$")),
    ("size", re.compile(r"^(how (large|big|extensive|much)( is| are)? (?P<x>.+)|what (fraction|proportion|share|"
                        r"percentage|part) of the (tissue|slide|section) (is|are) (?P<y>.+)|how much of the "
                        r"(tissue|slide|section) (is|are) (?P<z>.+))$")),
    ("where", re.compile(r"^(where (is|are|do|does|can)( we| i)?( find| see)? (?P<x>.+)|in which (part|area|region) "
                         r"(of the (slide|section) )?(is|are) (?P<y>.+)|(locate|show me|point to|find) (?P<z>.+))$")),
    ("presence", re.compile(r"^((is|are) there (?P<x>.+)|(does|do) (the|this) (slide|section|tissue|region|image|"
                            r"area) (show|contain|have|include) (?P<y>.+)|(is|are) (?P<z>.+?) (present|seen|visible|"
                            r"there|found)( here| in (this|the) (region|area|box|selection))?|any (?P<w>.+)|"
                            r"do you see (?P<v>.+))$")),
]
_RELATION = re.compile(r"^what (is|lies|is seen|is found|is present|can be seen|do you see) (in|at|around|along) the "
                       r"(?P<r>centre|center|middle|core|edge|border|rim|periphery|margin) of the (?P<x>.+)$")
_WHAT_AT = re.compile(r"^what (is|lies|is seen|is found|is present|can be seen|do you see|does it show|is in|is at)"
                      r"( in| at)?(?P<rest>.*)$")
_WHICH = re.compile(r"^which (of the following|finding|one)( is| are)? (?P<w>present|absent|missing|seen|not seen)")
_DESCRIBE = re.compile(r"^(describe|summari[sz]e|caption|give (a|the) (description|summary|caption|report))")


def _subject(match: re.Match) -> str:
    text = next(v for k, v in match.groupdict().items() if v and k != "r")
    text = _SUBJECT_TAIL.sub("", text.strip())
    text = _LEAD.sub("", text)
    return text.strip()


def read_question(question: str, caption_prompt: str = "") -> Intent:
    """What a typed question asks (module docstring); "other" when none of the evidence's kinds matches."""
    text = _clean(question)
    if not text:
        raise PathflipError("the question is empty: type a question about the slide")
    if caption_prompt and text == _clean(caption_prompt) or _DESCRIBE.match(text):
        return Intent("describe")
    here = bool(_HERE.search(text))
    if match := _WHICH.match(text):
        return Intent("which_absent" if match["w"] in ("absent", "missing", "not seen") else "which_present")
    if match := _RELATION.match(text):
        relation = "centre" if match["r"] in ("centre", "center", "middle", "core") else "edge"
        return Intent("relation", _subject(match), relation=relation)
    for kind, pattern in _PATTERNS:
        if match := pattern.match(text):
            subject = _subject(match)
            subject = _HERE.sub("", subject).strip()
            if subject and subject not in ("this", "it", "that"):
                return Intent(kind, subject, here=here)
    if match := _WHAT_AT.match(text):
        rest = _HERE.sub("", match["rest"])
        places = find_places(rest)
        filler = _PLACE_RE.sub(" ", rest)
        filler = re.sub(r"\b(the|of|in|at|on|part|area|region|corner|side|section|slide|this|that|it|there)\b", " ",
                        filler).strip()
        if places and not filler:
            return Intent("what_at", place=places[0])
        if not filler and not places:
            return Intent("what_at", here=True)
    if text in ("what is this", "what is that", "what are these", "what do you see"):
        return Intent("what_at", here=True)
    return Intent("other")


# ------------------------------------------------------------------------------------------------ evidence
class SlideEvidence:
    """A slide's evidence, each text grounded once: `source` is a SlideAnalysis or report.EncodedSlide (`ground`,
    `prepare`). `SlideEvidence.of(source)` gives the one kept for a source while it lives, so every conversation
    about a slide (a new chat, a slide opened again) reuses what was grounded before."""

    _kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, source):
        self.source = source
        self._results: dict[str, object] = {}
        self._findings: dict[str, FindingEvidence] = {}
        # held while the model grounds a text: the viewer sets its MODEL_LOCK, as Localize grounds on the same model
        self.lock = contextlib.nullcontext()

    @classmethod
    def of(cls, source) -> SlideEvidence:
        if isinstance(source, SlideEvidence):
            return source
        if source not in cls._kept:  # held through a proxy: the kept evidence must not keep its slide alive
            cls._kept[source] = cls(weakref.proxy(source))
        return cls._kept[source]

    @property
    def encoding(self):
        return self.source.prepare()

    def result(self, text: str):
        if text not in self._results:
            with self.lock:
                self._results[text] = self.source.ground(text)
        return self._results[text]

    @property
    def calls_presence(self) -> bool:
        """Whether the weights say if a slide shows a text (a calibrated patch-text head); without, the evidence only
        ranks places, and only where-type answers are written from it (as "the best match")."""
        return self.known(next(iter(FINDINGS))).presence is not None

    def finding(self, text: str, name: str | None = None) -> FindingEvidence:
        """The FindingEvidence of `text` (named `name`, default the text)."""
        key = f"{name}\0{text}"
        if key not in self._findings:
            self._findings[key] = evidence_from(self.encoding, self.result(text), name or text)
        return self._findings[key]

    def known(self, name: str) -> FindingEvidence:
        """The evidence of a finding of report.FINDINGS (several wordings: the best supported, evidence_for)."""
        key = f"{name}\0"
        if key not in self._findings:
            self._findings[key] = evidence_for(self, FINDINGS[name], name)
        return self._findings[key]

    # what evidence_for needs of a slide
    def prepare(self):
        return self.encoding

    def ground(self, text: str):
        return self.result(text)

    def report(self) -> SlideReport:
        """The structured report: every finding of report.FINDINGS."""
        weights = getattr(getattr(self.source, "weights", None), "id", "")
        return SlideReport(getattr(self.source, "slide_path", ""), weights, [self.known(n) for n in FINDINGS])

    def probabilities(self, text: str) -> np.ndarray:
        """[P] what the heatmap of `text` shows for each patch (analysis.patch_values), 0..1."""
        from ..analysis import patch_values

        return patch_values(self.encoding, self.result(text))

    def painted(self, text: str) -> np.ndarray:
        """[P] bool: the patches the heatmap of `text` paints at its default threshold (analysis.shown_patches)."""
        from ..analysis import shown_patches

        return shown_patches(self.result(text))

    def patches_in(self, shape) -> np.ndarray:
        """[P] bool: the patches whose centre lies inside `shape` (level-0: a shapely geometry, a GeoJSON geometry
        mapping, an (x0, y0, x1, y1) box or polygon vertices [(x, y), ...])."""
        from shapely import contains_xy
        from shapely.geometry import Polygon
        from shapely.geometry import box as make_box
        from shapely.geometry import shape as make_shape

        if isinstance(shape, Mapping):
            shape = make_shape(shape)
        elif isinstance(shape, (tuple, list, np.ndarray)):
            points = np.asarray(shape, dtype=np.float64)
            if points.ndim == 2 and len(points) >= 3:  # polygon vertices (x, y)
                shape = Polygon(points)
            elif points.shape == (4,):
                x0, y0, x1, y1 = points
                shape = make_box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
            else:
                raise PathflipError("a region is a box (x0, y0, x1, y1) or at least 3 polygon vertices (x, y) in "
                                    "level-0 px; draw a rectangle or polygon")
        encoding = self.encoding
        centres = np.asarray(encoding.patch_coords, dtype=np.float64) + encoding.patch_size_level0 / 2
        return contains_xy(shape, centres[:, 0], centres[:, 1])

    def place_patches(self, place: str) -> np.ndarray:
        """[P] bool: the patches in one of the nine areas of the section."""
        from ..model.patch_head import patch_positions
        from ..model.regions import area_of

        encoding = self.encoding
        positions = patch_positions(encoding.patch_coords, encoding.patch_size_level0)
        return area_of(positions) == AREA_NAMES.index(place)

    def shares(self, patches: np.ndarray) -> list[tuple[str, float, float]]:
        """(finding, share of `patches` its heatmap paints, its best probability there) of every finding of
        report.FINDINGS the slide shows, largest share first."""
        if not patches.any():
            return []
        out = []
        for name in FINDINGS:
            evidence = self.known(name)
            if not evidence.present:
                continue
            values = self.probabilities(evidence.query)[patches]
            out.append((name, float(self.painted(evidence.query)[patches].mean()), float(values.max())))
        return sorted(out, key=lambda item: -item[1])


# ------------------------------------------------------------------------------------------------ answers
@dataclass(frozen=True)
class Citation:
    """A finding named in an answer: characters [start, end) of the answer's text, and its evidence."""
    start: int
    end: int
    evidence: FindingEvidence

    def to_json(self) -> dict:
        return {"start": self.start, "end": self.end, "evidence": self.evidence.to_json()}


def cited_findings(citations: Iterable[Citation]) -> list[FindingEvidence]:
    """The evidence of each finding cited, once, in the order first cited."""
    out = {}
    for citation in citations:
        out.setdefault((citation.evidence.name, citation.evidence.query), citation.evidence)
    return list(out.values())


def evidence_line(evidence: FindingEvidence, boxes: int | None = None) -> str:
    """"fat ('fat'): found, p = 0.98, lower left, ...; boxes (level-0 px x0, y0, x1, y1): (1024, 5376, 2048, 7168)"
    with the first `boxes` boxes (None: all): what the CLI prints and the transcript exports under an answer."""
    listed = " ".join(f"({', '.join(map(str, b.box))})" for b in evidence.boxes[:boxes]) or "none"
    return f"{evidence.name} ({evidence.query!r}): {evidence.summary()}; boxes (level-0 px x0, y0, x1, y1): {listed}"


def cited_annotations(citations: Iterable[Citation]) -> list:
    """The boxes of the findings cited as QuPath annotations (classification: the finding's name)."""
    from ..heatmap import box_annotations

    return [annotation for e in cited_findings(citations) if e.boxes
            for annotation in box_annotations([b.box for b in e.boxes], [b.probability for b in e.boxes], e.name,
                                              kind="cited area")]


@dataclass
class Written:
    """An answer being written from evidence: text with citations. `raw`: a piece of the LLM's text, joined as it
    is (parts written here are joined to the text before them with a space)."""
    text: str = ""
    citations: list[Citation] = field(default_factory=list)
    raw: bool = False

    def add(self, text: str, evidence: FindingEvidence | None = None) -> Written:
        start = len(self.text)
        self.text += text
        if evidence is not None:
            self.citations.append(Citation(start, len(self.text), evidence))
        return self


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _is(name: str, singular: str = "is", plural: str = "are") -> str:
    """The verb for a finding's name: "necrosis is", "immune cells are"."""
    last = name.split()[-1] if name.split() else name
    many = last.endswith("s") and not last.endswith(("sis", "ss", "us"))
    return plural if many else singular


def _places_phrase(places: Sequence[str]) -> str:
    parts = [f"the {p}" for p in places]
    joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{joined} part{'s' * (len(parts) > 1)} of the section"


def _p(evidence: FindingEvidence) -> str:
    return "no presence call" if evidence.presence is None else f"p = {evidence.presence:.2f}"


def _ranked_only(evidence: FindingEvidence) -> Written:
    """Weights without a presence call (no patch-text head): the best match's place, said to be only that."""
    out = Written("These weights rank places but give no presence call; the best match for ")
    out.add(evidence.name, evidence)
    return out.add(f" is in {_places_phrase([evidence.place])}." if evidence.place else " shows no area.")


def answer_presence(evidence: FindingEvidence) -> Written:
    out = Written()
    if evidence.status == "not found":
        out.add("No. ").add(_capital(evidence.name), evidence)
        out.add(f" {_is(evidence.name)} not found on this slide ({_p(evidence)}).")
        return out
    if evidence.status == "ranked only":
        return _ranked_only(evidence)
    # uncertain (PRESENCE_BANDS): more likely present than not, so yes, but said to be uncertain
    first = "Yes. " if evidence.status == "found" else "Yes, but uncertain. "
    out.add(first).add(_capital(evidence.name), evidence).add(f" {_is(evidence.name)} present ({_p(evidence)})")
    if evidence.place:
        out.add(f", in {_places_phrase(evidence.area_places)}, {evidence.size:.1%} of the tissue")
    return out.add(".")


def _unplaceable(evidence: FindingEvidence, lead: str, tail: str = "") -> Written | None:
    """The answer of a where / how many / how large question when the evidence has no area to answer it from:
    weights without a presence call (the best match only), a finding called present that paints nothing, or one the
    slide does not show ("<lead>No X is found on this slide (p = ...)<tail>."); None when it has areas."""
    if evidence.status == "ranked only":
        return _ranked_only(evidence)
    if evidence.present and not evidence.boxes:
        out = Written().add(_capital(evidence.name), evidence)
        return out.add(f" {_is(evidence.name)} called present ({_p(evidence)}) but no patch reaches the heatmap's "
                       "threshold, so there is no area to place, count or measure.")
    if not evidence.present:
        out = Written(f"{lead}No ").add(evidence.name, evidence)
        return out.add(f" {_is(evidence.name)} found on this slide ({_p(evidence)}){tail}.")
    return None


def answer_where(evidence: FindingEvidence) -> Written:
    if (out := _unplaceable(evidence, "", ", so there is no place to name")) is not None:
        return out
    out = Written().add(_capital(evidence.name), evidence)
    places = evidence.area_places
    if len(evidence.counted) > 1:
        out.add(f" {_is(evidence.name)} in {len(evidence.counted)} areas, in {_places_phrase(places)}")
    else:
        out.add(f" {_is(evidence.name)} in {_places_phrase(places)}")
    note = "uncertain, " if evidence.status == "uncertain" else ""
    return out.add(f" ({note}{_p(evidence)}, {evidence.size:.1%} of the tissue).")


def answer_count(evidence: FindingEvidence) -> Written:
    if (out := _unplaceable(evidence, "0. ")) is not None:
        return out
    n = evidence.count
    word = NUMBERS[n] if n < len(NUMBERS) else str(n)
    out = Written().add(f"{n}. ").add(_capital(evidence.name), evidence)
    out.add(f" {_is(evidence.name, 'forms', 'form')} {word} separate area{'s' * (n > 1)}, in "
            f"{_places_phrase(evidence.area_places)}")
    return out.add(f" ({_p(evidence)}).")


def answer_size(evidence: FindingEvidence) -> Written:
    if (out := _unplaceable(evidence, "None. ")) is not None:
        return out
    out = Written().add(f"About {evidence.size:.1%} of the tissue. ").add(_capital(evidence.name), evidence)
    n = len(evidence.boxes)
    return out.add(f" {_is(evidence.name, 'covers', 'cover')} {evidence.size:.1%} of the tissue in {n} painted "
                   f"area{'s' * (n > 1)}, the most probable in the {evidence.place} part ({_p(evidence)}).")


def answer_contents(evidence: SlideEvidence, patches: np.ndarray, where: str, place: str | None = None) -> Written:
    """What `patches` (a place of the section, `place`, or a drawn region) show: the findings whose areas lie there
    (a place) and those painting SHOWN_SHARE of its tissue or more, most first."""
    if not patches.any():
        return Written(f"{_capital(where)} holds no tissue patches: draw it over tissue.")
    shares = evidence.shares(patches)
    located = [s for s in shares if place is not None and place in evidence.known(s[0]).area_places
               and s[0] not in BACKGROUND]
    wide = [s for s in shares if s[1] >= SHOWN_SHARE and s not in located]
    shown = located + wide or shares[:1]
    if not shown or shown[0][1] == 0:
        return Written(f"None of the findings I know is painted in {where}.")
    out = Written(f"{_capital(where)} shows ")
    for i, (name, share, best) in enumerate(shown):
        if i:
            out.add(" and " if i == len(shown) - 1 else ", ")
        out.add(name, evidence.known(name)).add(f" ({share:.0%} of its tissue, p up to {best:.2f})")
    return out.add(".")


def answer_here(evidence: SlideEvidence, subject: str, patches: np.ndarray) -> Written:
    """Is `subject` in the drawn region: the share of the region's patches its heatmap paints."""
    found = evidence.finding(subject)
    if not patches.any():
        return Written("The region holds no tissue patches: draw it over tissue.")
    values = evidence.probabilities(found.query)[patches]
    painted = float(evidence.painted(found.query)[patches].mean())
    if not found.present or painted == 0:
        out = Written("No. ").add(_capital(found.name), found)
        return out.add(f" {_is(found.name)} not painted in this region (p up to {values.max():.2f} there; slide "
                       f"{_p(found)}).")
    out = Written("Yes. " if painted >= SHOWN_SHARE else "A little. ").add(_capital(found.name), found)
    return out.add(f" {_is(found.name, 'covers', 'cover')} {painted:.0%} of the region's tissue (p up to "
                   f"{values.max():.2f}).")


def _within(evidence: SlideEvidence, reference: FindingEvidence) -> np.ndarray:
    """[P] bool: the patches inside the boxes of the reference finding's counted areas."""
    coords = np.asarray(evidence.encoding.patch_coords, dtype=np.int64)
    inside = np.zeros(len(coords), bool)
    for b in reference.counted:
        x0, y0, x1, y1 = b.box
        inside |= (coords[:, 0] >= x0) & (coords[:, 0] < x1) & (coords[:, 1] >= y0) & (coords[:, 1] < y1)
    return inside


def _rim(evidence: SlideEvidence, reference: FindingEvidence) -> np.ndarray:
    """[P] bool: a ring around the border of the reference's counted areas, its outer two patches and its own
    outermost one (holes filled: a nest with a necrotic centre is still the nest)."""
    from scipy import ndimage

    encoding = evidence.encoding
    cells = np.asarray(encoding.patch_coords, dtype=np.int64) // encoding.patch_size_level0
    shown = _within(evidence, reference) & evidence.painted(reference.query)
    mask = np.zeros(cells.max(0)[::-1] + 1, bool)
    mask[cells[shown, 1], cells[shown, 0]] = True
    filled = ndimage.binary_fill_holes(mask)
    ring = ndimage.binary_dilation(filled, iterations=2) & ~ndimage.binary_erosion(filled, iterations=1)
    return ring[cells[:, 1], cells[:, 0]]


def relation_scores(evidence: SlideEvidence, subject: str, relation: str,
                    candidates: Sequence[str]) -> dict[str, float] | None:
    """How well each candidate text is what lies at the centre or the edge of `subject`; None when the subject is
    not found. Centre: the share of the candidate's painted patches inside the boxes of the subject's areas (a candidate
    naming the subject itself, "viable tumour cells", scores 0.5: what the centre is when nothing else is there).
    Edge: the share of a ring around the areas' border (_rim) that the candidate's heatmap paints; "X
    without Y" scores X's share when Y paints less than RIM_ABSENT of the ring, else 0 (on the 64 test slides a band
    of lymphocytes at a tumour's edge paints 0.17-0.46 of the ring, none paints 0.00 where there is no band)."""
    reference = evidence.finding(subject)
    if not reference.counted:
        return None
    own = set(named_findings(subject)) or {subject}
    scores = {}
    if relation == "centre":
        inside = _within(evidence, reference)
        for text in candidates:
            if own & set(named_findings(text)):
                scores[text] = 0.5
                continue
            shown = evidence.painted(text)
            scores[text] = float((shown & inside).sum() / shown.sum()) if shown.any() else 0.0
        return scores
    ring = _rim(evidence, reference)
    if not ring.any():
        return None
    def share(text: str) -> float:  # of the rim's patches the text's heatmap paints
        return float(evidence.painted(text.strip())[ring].mean())

    for text in candidates:
        positive, _, negative = text.partition(" without ")
        scores[text] = share(positive) if not negative.strip() or share(negative) < RIM_ABSENT else 0.0
    return scores


def answer_relation(evidence: SlideEvidence, subject: str, relation: str) -> Written:
    reference = evidence.finding(subject)
    names = [n for n in FINDINGS if not set(named_findings(subject)) & {n}]
    scores = relation_scores(evidence, subject, relation, [evidence.known(n).query for n in names])
    if scores is None:  # no counted area of the reference to look around
        return _unplaceable(reference, "") or Written(f"No area of {reference.name} to look around.")
    ranked = sorted(zip(names, scores.values()), key=lambda item: -item[1])
    least = 0.5 if relation == "centre" else RIM_SHARE
    shown = [(n, v) for n, v in ranked if v >= least and evidence.known(n).present]
    out = Written(f"At the {relation} of the ").add(reference.name, reference).add(": ")
    if not shown:
        own = "its own tissue" if relation == "centre" else "nothing I know"
        return out.add(f"{own}; no other finding is painted there.")
    for i, (name, value) in enumerate(shown[:2]):
        out.add(" and " if i else "").add(name, evidence.known(name))
        out.add(f" ({value:.0%} of it inside)" if relation == "centre" else f" ({value:.0%} of the rim)")
    return out.add(".")


# ------------------------------------------------------------------------------------------- multiple choice
def _number(text: str) -> int | None:
    words = _clean(text).split()
    for word in words:
        if word.isdigit():
            return int(word)
        if word in NUMBERS:
            return NUMBERS.index(word)
        if word in ("no", "zero"):
            return 0
    return None


def choose(evidence: SlideEvidence, intent: Intent, options: Mapping[str, str]) -> dict[str, float] | None:
    """A score per option letter from the evidence when the stem's kind decides it (highest wins), else None."""
    if intent.kind == "where":
        found = evidence.finding(intent.subject)
        if not found.present or not found.place or not evidence.calls_presence:
            return None
        scores = {}
        for letter, text in options.items():
            places = find_places(text)
            if not places:
                return None
            # the place answer_where names first (the best area's), then the other counted areas', then the share
            scores[letter] = (2.0 * (places[0] == found.area_places[0]) + (places[0] in found.area_places)
                              + found.places.get(places[0], 0.0))
        return _decided(scores)
    if intent.kind == "count":
        if not evidence.calls_presence:
            return None
        n = evidence.finding(intent.subject).count
        numbers = {letter: _number(text) for letter, text in options.items()}
        if any(v is None for v in numbers.values()):
            return None
        return _decided({letter: -abs(v - n) for letter, v in numbers.items()})
    if intent.kind in ("which_present", "which_absent"):
        if not evidence.calls_presence:
            return None
        sign = 1.0 if intent.kind == "which_present" else -1.0
        scores = {letter: sign * evidence.finding(text).presence for letter, text in options.items()}
    elif intent.kind == "relation":
        scores = relation_scores(evidence, intent.subject, intent.relation, list(options.values()))
        scores = None if scores is None else dict(zip(options, scores.values()))
    elif intent.kind == "presence":
        found = evidence.finding(intent.subject)
        answers = {letter: yes_no(text) for letter, text in options.items()}
        if found.presence is None or None in answers.values():
            return None
        scores = {letter: float(said == found.present) for letter, said in answers.items()}  # uncertain: yes
    else:
        return None
    return _decided(scores)


def _decided(scores: dict[str, float] | None) -> dict[str, float] | None:
    """`scores` when one option is best, None (left to the LLM) on a tie."""
    if not scores:
        return None
    best = sorted(scores.values(), reverse=True)
    return scores if len(best) == 1 or best[0] > best[1] else None


def yes_no(text: str) -> bool | None:
    """True / False for an answer or option that starts with yes / no, else None."""
    first = re.findall(r"[a-z]+", text.lower())[:1]
    return {"yes": True, "no": False}.get(first[0]) if first else None


# ----------------------------------------------------------------------------------------------- descriptions
# how a description names a placed finding it adds: (one, several) - several with the number in words
PLACED_NAMES = {"tumour": ("A tumour nest", "{n} tumour nests"), "fat": ("Fat lobules", "Fat lobules"),
                "normal glands": ("Normal glands", "Normal glands"),
                "lymphoid aggregate": ("A lymphoid aggregate", "{n} lymphoid aggregates")}


def _sentence_for(evidence: FindingEvidence) -> Written:
    """A sentence placing a finding the description left out, e.g. "Fat lobules lie in the lower left part of the
    section." (the finding cited)."""
    places = evidence.area_places
    one, several = PLACED_NAMES.get(evidence.name, (_capital(evidence.name), _capital(evidence.name)))
    n = max(len(evidence.counted), 1)
    name = one if n == 1 else several.format(n=_capital(NUMBERS[min(n, len(NUMBERS) - 1)]))
    verb = "lies" if name.startswith("A ") else "lie"
    return Written().add(name, evidence).add(f" {verb} in {_places_phrase(places)}.")


class DescriptionCheck:
    """A caption checked against the evidence sentence by sentence (module docstring): `sentence` returns what to
    show of each: the places the evidence gives instead of those it names, nothing for a sentence about a finding
    the slide does not show (or a place with no finding to check it by); `finish` a sentence for each placed finding
    the caption did not place."""

    def __init__(self, evidence: SlideEvidence):
        self.evidence = evidence
        self.placed: set[str] = set()  # findings a shown sentence has placed

    def sentence(self, sentence: str) -> Written:
        sentence = re.sub(r"^[A-D]\.\s+", "", sentence.strip())  # a stray option letter of a multiple-choice habit
        findings = named_findings(sentence)
        places = find_places(sentence)
        if not findings:
            return Written() if places else Written(sentence)  # a place with nothing to check it against: dropped
        subject = findings[0]
        found = self.evidence.known(subject)
        negative = re.search(r"\b(no|not|without)\b", sentence.lower()) is not None
        if negative != (not found.present):  # the sentence says what the evidence does not
            if found.present and found.status == "found" and subject not in self.placed and found.place:
                self.placed.add(subject)
                return _sentence_for(found)
            return Written()
        wanted = found.area_places if found.present else []
        if wanted and places:
            self.placed.add(subject)
            for i, (start, end, _) in reversed(list(enumerate(place_spans(sentence)))):
                sentence = sentence[:start] + (wanted[i] if i < len(wanted) else wanted[0]) + sentence[end:]
        out = Written(sentence)
        _cite_words(out, 0, sentence, subject, found)
        return out

    def finish(self) -> Written:
        """A sentence for each placed finding the evidence finds that no sentence placed."""
        out = Written()
        for name in PLACED:
            found = self.evidence.known(name)
            if name not in self.placed and found.status == "found" and found.place:
                _append(out, _sentence_for(found), space=True)
        return out


def check_description(evidence: SlideEvidence, caption: str) -> Written:
    """`caption` as DescriptionCheck shows it."""
    check, out = DescriptionCheck(evidence), Written()
    for sentence in split_sentences(caption):
        _append(out, check.sentence(sentence), space=True)
    _append(out, check.finish(), space=True)
    return out


def _append(out: Written, other: Written, space: bool = False) -> None:
    if space and out.text and other.text:
        out.text += " "
    shift = len(out.text)
    out.text += other.text
    out.citations += [Citation(c.start + shift, c.end + shift, c.evidence) for c in other.citations]


def _cite_words(out: Written, start: int, text: str, subject: str, evidence: FindingEvidence) -> None:
    """Cite the first word of `text` that names `subject`."""
    lower = text.lower()
    for word in FINDING_WORDS[subject]:
        at = lower.find(word)
        if at >= 0:
            end = at + len(word)
            while end < len(text) and text[end].isalpha():
                end += 1
            out.citations.append(Citation(start + at, start + end, evidence))
            return


# -------------------------------------------------------------------------------------------------- streams
class WrittenStream:
    """An answer written (or checked) from evidence, streamed word by word like AnswerStream (the same interface:
    iterate, cancel, result, answer). `write()` gives the answer's parts (Written) one after the other; it runs as
    the stream is read, so the evidence work counts in the first piece's time. `llm`: the AnswerStream a checked
    description reads (cancelled with this one; its timings are the answer's)."""

    def __init__(self, write: Callable[[], Iterable[Written]], on_done: Callable[[ChatAnswer], None] | None = None,
                 option_scores: dict[str, float] | None = None, report_of: Callable[[], object] | None = None):
        self.write, self.on_done, self.option_scores, self.report_of = write, on_done, option_scores, report_of
        self.cancel_event = threading.Event()
        self.llm = None
        self.citations: list[Citation] = []  # of the text written so far
        self.answer: ChatAnswer | None = None
        self._pieces = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def cancel(self) -> None:
        self.cancel_event.set()
        if self.llm is not None:
            self.llm.cancel()

    def result(self) -> ChatAnswer:
        for _ in self:
            pass
        return self.answer

    def _run(self) -> Iterator[str]:
        started = time.perf_counter()
        first, finish = None, "eos"
        written = Written()
        try:
            for part in self.write():
                if self.cancel_event.is_set():
                    break
                shown = len(written.text)
                _append(written, part, space=not part.raw)
                self.citations = list(written.citations)  # before the pieces they cite (the dock links as it reads)
                for piece in re.findall(r"\s*\S+", written.text[shown:]):
                    if self.cancel_event.is_set():
                        written.text = written.text[:shown]  # what was shown is the answer
                        break
                    first = first or time.perf_counter()
                    shown += len(piece)
                    yield piece
            if self.cancel_event.is_set():
                finish = "cancelled"
        finally:
            llm = self.llm.answer if self.llm is not None else None
            report = self.report_of() if self.report_of is not None and finish != "cancelled" else None
            self.answer = ChatAnswer(
                text=written.text, token_ids=llm.token_ids if llm else [],
                finish_reason=llm.finish_reason if llm and finish != "cancelled" else finish,
                prompt_tokens=llm.prompt_tokens if llm else 0, visual_tokens=llm.visual_tokens if llm else 0,
                pooled=llm.pooled if llm else False, notice=llm.notice if llm else None,
                first_token_s=None if first is None else first - started,
                decode_tokens_per_s=llm.decode_tokens_per_s if llm else None, option_scores=self.option_scores,
                citations=[c for c in written.citations if c.end <= len(written.text)], grounded=True, report=report)
        if self.on_done is not None:
            self.on_done(self.answer)


# ------------------------------------------------------------------------------------------------ conversation
class GroundedConversation(Conversation):
    """A Conversation whose answers rest on the slide's evidence (module docstring). `source`: the slide's
    SlideAnalysis (or report.EncodedSlide). stream/ask(..., region=...): the level-0 shape (box, polygon vertices,
    GeoJSON geometry or shapely) a question is about ("what is this?", "is there necrosis here?")."""

    def __init__(self, engine, visual, source):
        super().__init__(engine, visual)
        self.source = source  # kept: the evidence holds it only through a proxy
        self.evidence = SlideEvidence.of(source)

    def _written(self, question: str, write, option_scores=None, report_of=None) -> WrittenStream:
        self._current = WrittenStream(write, self._remember(question), option_scores, report_of)
        return self._current

    def intent(self, question: str) -> Intent:
        return read_question(question, self.engine.config.caption_prompt)

    def needs_region(self, question: str) -> bool:
        """Whether `question` asks about a drawn region ("what is this?", "is there necrosis here?", "how much
        necrosis is in this region?")."""
        try:
            intent = self.intent(question)
        except PathflipError:
            return False
        return intent.here and intent.kind in REGION_KINDS and not intent.place

    def writer(self, intent: Intent, region=None) -> Callable[[], Written] | None:
        """What writes the answer to `intent` from the evidence; None: the LLM answers."""
        evidence = self.evidence
        if not evidence.calls_presence and intent.kind != "where":
            return None  # weights that only rank places: the LLM answers, the where-answer names the best match
        if intent.kind == "what_at" and intent.place:
            return lambda: answer_contents(evidence, evidence.place_patches(intent.place),
                                           f"the {intent.place} part of the section", intent.place)
        if intent.kind == "what_at" and region is not None:
            return lambda: answer_contents(evidence, evidence.patches_in(region), "this region")
        if intent.kind in ("presence", "size", "count") and region is not None:
            return lambda: answer_here(evidence, intent.subject, evidence.patches_in(region))
        writers = {"presence": answer_presence, "where": answer_where, "count": answer_count, "size": answer_size}
        if intent.kind in writers:
            return lambda: writers[intent.kind](evidence.finding(intent.subject))
        if intent.kind == "relation":
            return lambda: answer_relation(evidence, intent.subject, intent.relation)
        return None

    def stream(self, question: str, settings: GenerationSettings | None = None, *, prefix: str = "",
               option_scores: dict[str, float] | None = None, region=None):
        question = (question or "").strip()
        if prefix or option_scores is not None or not question:
            return super().stream(question, settings, prefix=prefix, option_scores=option_scores)
        intent = self.intent(question)
        if intent.kind == "describe":
            return self._describe(question, settings)
        write = self.writer(intent, region)
        if write is None:
            return super().stream(question, settings)
        return self._written(question, lambda: [write()])

    def ask(self, question: str, settings: GenerationSettings | None = None, region=None) -> ChatAnswer:
        return self.stream(question, settings, region=region).result()

    def _describe(self, question: str, settings: GenerationSettings | None) -> WrittenStream:
        turns = [{"role": "user", "content": question}]  # a description is of the slide, not of the conversation

        def write():
            if stream.cancel_event.is_set():
                return
            check = DescriptionCheck(self.evidence) if self.evidence.calls_presence else None
            llm = stream.llm = self.engine.stream(self.visual, turns, settings, cancel=stream.cancel_event)
            buffer = ""
            for piece in llm:
                buffer += piece
                sentences = split_sentences(buffer)
                if check is None:  # nothing to check against: shown as it comes
                    yield Written(piece, raw=True)
                    buffer = ""
                elif len(sentences) > 1:  # the first is complete once the next one starts
                    for sentence in sentences[:-1]:
                        yield check.sentence(sentence)
                    buffer = sentences[-1]
                elif len(buffer) > LONGEST_SENTENCE:  # no end in sight: checked and shown as it stands
                    yield check.sentence(buffer)
                    buffer = ""
            if check is not None:
                for sentence in split_sentences(buffer):
                    yield check.sentence(sentence)
                yield check.finish()

        stream = self._written(question, write, report_of=self.evidence.report)
        return stream

    def stream_choice(self, question: str, options, settings: GenerationSettings | None = None,
                      rule: str | None = None):
        """Multiple choice: the option the evidence picks when the stem's kind decides it (`choose`), with the
        evidence written after it; else Conversation.stream_choice (the LLM)."""
        options = choice_options(options)
        intent = self.intent(question)
        try:
            scores = choose(self.evidence, intent, options)
        except PathflipError:
            scores = None
        if scores is None:
            if (rule or self.engine.config.choice_rule) == "generate":  # the LLM writes the letter: not a question
                return Conversation.stream(self, self.choice_prompt(question, options), settings)  # to read here
            return super().stream_choice(question, options, settings, rule)
        best = max(scores, key=scores.get)
        write = self.writer(intent) if intent.kind in ("where", "count", "relation", "presence") else None

        def parts():
            yield Written(option_answer(best, options[best]))
            if write is not None:
                yield write()

        return self._written(self.choice_prompt(question, options), parts)
