"""The structured report of a slide: for each finding a pathologist checks, present or absent with its probability,
where it lies (one of the nine areas of the section, regions.AREA_NAMES), how large it is (a fraction of the tissue)
and its boxes (the finding areas of its heatmap, level-0 px). What "Describe slide" exports beside the prose
caption, and the evidence the grounded chat cites (`evidence_for`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .analysis import SlideAnalysis, finding_areas, heatmap_grid, patch_values
from .errors import PathflipError
from .model.patch_head import patch_positions
from .model.regions import AREA_NAMES, area_of
from .text import query_text

# finding -> query (or wordings, the best supported one is kept): what a pathologist checks on such slides
# (the grounded chat names them in sentences by chat.grounded.FINDING_WORDS)
FINDINGS: dict[str, str | list[str]] = {"tumour": "tumour nest", "necrosis": "necrosis",
                                        "lymphoid aggregate": "lymphoid aggregate", "lymphocytes": "lymphocytes",
                                        "stroma": "fibrous stroma", "fat": "fat", "normal glands": "normal glands"}
BOXES_LISTED = 5  # boxes per finding the Markdown lists (the JSON holds them all)
# an area counts as a separate occurrence ("how many") when it is at least this share of the largest one's size:
# the thresholded map also leaves fragments of one or two patches beside a finding's edge
COUNTED_SHARE = 0.25


@dataclass(frozen=True)
class EvidenceBox:
    """One finding area: what a citation zooms to."""

    box: tuple[int, int, int, int]  # level-0 (x0, y0, x1, y1)
    probability: float  # the highest heatmap value inside (a probability when calibrated, else a relative score)
    fraction: float  # of the slide's tissue
    place: str | None = None  # AREA_NAMES entry of its probability-weighted centroid


@dataclass
class FindingEvidence:
    """What the slide shows of one finding. An absent finding ("not found") has no place and no boxes, even where
    a map that only ranks (uncalibrated) still paints its best patches."""

    name: str
    query: str  # the text grounded
    presence: float | None  # P(the slide shows it); None with weights that give none
    status: str  # "found", "uncertain", "not found" (encoding.PRESENCE_BANDS) or "ranked only" (no presence)
    calibrated: bool  # box values are probabilities (else scores relative to the slide)
    place: str | None = None  # AREA_NAMES entry of the best area's probability-weighted centroid
    places: dict[str, float] = field(default_factory=dict)  # AREA_NAMES its areas cover -> share of them, largest first
    size: float = 0.0  # fraction of the tissue its areas cover
    boxes: list[EvidenceBox] = field(default_factory=list)  # best first

    @property
    def present(self) -> bool:
        return self.status != "not found"

    @property
    def count(self) -> int:
        """Separate occurrences: areas at least COUNTED_SHARE of the largest one's size (0 when absent)."""
        return len(self.counted)

    @property
    def counted(self) -> list[EvidenceBox]:
        """The areas `count` counts, best first."""
        if not self.present or not self.boxes:
            return []
        largest = max(b.fraction for b in self.boxes)
        return [b for b in self.boxes if b.fraction >= COUNTED_SHARE * largest]

    @property
    def area_places(self) -> list[str]:
        """The places of the counted areas, best first, each once."""
        return list(dict.fromkeys(b.place for b in self.counted if b.place))

    def summary(self) -> str:
        """One line, e.g. "found, p = 0.98, upper left, 8.5% of tissue, 1 area"."""
        p = "" if self.presence is None else f", p = {self.presence:.2f}"
        if not self.present:
            return f"absent{p}"
        where = f", {self.place}" if self.place else ""
        return f"{self.status}{p}{where}, {self.size:.1%} of tissue, {self.count} area{'s' * (self.count != 1)}"

    def to_json(self) -> dict:
        boxes = [{**asdict(b), "box": list(b.box)} for b in self.boxes]
        return {**asdict(self), "boxes": boxes, "count": self.count}

    @classmethod
    def from_json(cls, data: dict) -> FindingEvidence:
        data = {k: v for k, v in data.items() if k != "count"}
        boxes = [EvidenceBox(tuple(b["box"]), b["probability"], b["fraction"], b.get("place"))
                 for b in data.pop("boxes")]
        return cls(**data, boxes=boxes)


@dataclass
class SlideReport:
    slide: str  # path or URL
    weights: str  # content id of the weights (WeightsFolder.id)
    findings: list[FindingEvidence]

    def to_json(self) -> dict:
        """JSON-ready: boxes in level-0 px."""
        return {"slide": self.slide, "weights": self.weights, "findings": [f.to_json() for f in self.findings]}

    @classmethod
    def from_json(cls, data: dict) -> SlideReport:
        return cls(data["slide"], data["weights"], [FindingEvidence.from_json(f) for f in data["findings"]])

    def to_markdown(self) -> str:
        note = (f"Weights `{self.weights}`. Places are areas of the section (3 x 3 over its tissue); sizes are "
                "fractions of the tissue; boxes are level-0 px (x0, y0, x1, y1).")
        header = "| finding | query | status | p | where | size | areas |"
        lines = [f"# Slide report: {self.slide}", "", note, "", header, "| --- " * 7 + "|"]
        for f in self.findings:
            p = "-" if f.presence is None else f"{f.presence:.2f}"
            where = ", ".join(f"{name} {share:.0%}" for name, share in f.places.items())
            where = f"**{f.place}** ({where})" if f.place else "-"
            size = f"{f.size:.1%}" if f.present else "-"
            status = f.status if f.present else "absent"
            lines.append(f"| {f.name} | {f.query} | {status} | {p} | {where} | {size} | {len(f.boxes)} |")
        for f in (f for f in self.findings if f.boxes):
            value = "p" if f.calibrated else "score"
            lines += ["", f"## {f.name}", ""]
            lines += [f"{rank}. ({', '.join(map(str, b.box))}): {value} {b.probability:.2f}, {b.fraction:.1%} of "
                      f"tissue, {b.place}" for rank, b in enumerate(f.boxes[:BOXES_LISTED], 1)]
            if len(f.boxes) > BOXES_LISTED:
                lines.append(f"... and {len(f.boxes) - BOXES_LISTED} more (the JSON report holds them all)")
        return "\n".join(lines) + "\n"


class EncodedSlide:
    """A slide's encoding with the PathFLIP that made it: what evidence needs of a SlideAnalysis (`prepare`,
    `ground`), for slides encoded elsewhere (the evaluation encodes stored features)."""

    def __init__(self, model, encoding):
        self.model, self.encoding = model, encoding

    def prepare(self):
        return self.encoding

    def ground(self, text: str, top_k: int = 5, patch_level: bool = True):
        return self.model.ground(self.encoding, query_text(text), top_k=top_k, patch_level=patch_level)


def evidence_from(source, result, name: str | None = None) -> FindingEvidence:
    """The evidence of a grounding result already computed (`source`: its SlideAnalysis, EncodedSlide or
    SlideEncoding): its finding areas at the default threshold (analysis.finding_areas), where they lie and how
    large they are."""
    from shapely import contains_xy
    from shapely.geometry import shape

    encoding = source.prepare() if hasattr(source, "prepare") else source
    evidence = FindingEvidence(name or result.text, result.text, result.presence, result.status, result.calibrated)
    areas = finding_areas(encoding, result) if evidence.present else []
    if not areas:
        return evidence
    # each patch at the centre of the heatmap cell it is painted in, with its heatmap value and its position within
    # the tissue's extent (as the areas of a section are told)
    values = patch_values(encoding, result)
    positions = patch_positions(encoding.patch_coords, encoding.patch_size_level0)
    cell = heatmap_grid(encoding, result, patch_level=True).cell
    centres = (np.asarray(encoding.patch_coords, dtype=np.int64) // cell + 0.5) * cell
    inside = np.stack([contains_xy(shape({"type": "MultiPolygon", "coordinates": a.outline}), *centres.T)
                       for a in areas])  # [areas, P]
    weights = inside * values[None]  # [areas, P]
    centroids = weights @ positions / np.maximum(weights.sum(1, keepdims=True), 1e-12)
    places = [AREA_NAMES[i] for i in area_of(centroids)]
    evidence.place = places[0]
    shares = np.bincount(area_of(positions[inside.any(0)]), minlength=len(AREA_NAMES)) / inside.any(0).sum()
    evidence.places = {AREA_NAMES[i]: round(float(shares[i]), 4) for i in np.argsort(-shares, kind="stable")
                       if shares[i] > 0}
    evidence.size = float(sum(a.fraction for a in areas))
    evidence.boxes = [EvidenceBox(tuple(int(v) for v in a.box), a.probability, a.fraction, place)
                      for a, place in zip(areas, places)]
    return evidence


def evidence_for(analysis, text: str | list[str], name: str | None = None) -> FindingEvidence:
    """The evidence for one free-text finding on the analysed slide (a SlideAnalysis or an EncodedSlide); several
    wordings: the one whose presence is
    highest (the first without presence probabilities). `name`: what the report calls it (default: the query)."""
    texts = [text] if isinstance(text, str) else list(text)
    if not texts:
        raise PathflipError(f"no query for the finding {name!r}: give it at least one wording, e.g. {name}=necrosis")
    results = [analysis.ground(t) for t in texts]
    result = max(results, key=lambda r: -np.inf if r.presence is None else r.presence)
    return evidence_from(analysis, result, name)


def slide_report(analysis: SlideAnalysis, findings: dict[str, str | list[str]] | None = None) -> SlideReport:
    """Each finding (name -> query or wordings; default FINDINGS) with its evidence on the slide."""
    findings = FINDINGS if findings is None else findings
    if not findings:
        raise PathflipError("no findings to report: name at least one, e.g. necrosis=necrosis")
    return SlideReport(analysis.slide_path, analysis.weights.id,
                       [evidence_for(analysis, query, name) for name, query in findings.items()])
