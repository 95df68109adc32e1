"""The structured report (napari_pathflip.report, `pathflip report`) on the demo slide with the bundled weights."""

import json
from pathlib import Path

import numpy as np
import pytest

from napari_pathflip.analysis import SlideAnalysis
from napari_pathflip.commands import main
from napari_pathflip.errors import PathflipError
from napari_pathflip.model.encoding import GroundingResult
from napari_pathflip.report import FINDINGS, SlideReport, evidence_for, evidence_from, slide_report
from training.synthetic import demo_spec, layout_places

ROOT = Path(__file__).resolve().parents[1]
SLIDE, WEIGHTS = ROOT / "sample_data" / "demo_slide.tiff", ROOT / "sample_data" / "weights" / "pathflip"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def analysis(cache):
    return SlideAnalysis(SLIDE, WEIGHTS, cache_dir=cache, device="cpu")


@pytest.fixture(scope="module")
def report(analysis):
    return slide_report(analysis)


def _truth(encoding, name: str) -> np.ndarray:
    """[P] bool: the encoding's patches inside the demo slide's finding `name`."""
    spec = demo_spec()
    cells = encoding.patch_coords // spec.config.patch_size
    return np.any([f.mask[cells[:, 1], cells[:, 0]] for f in spec.findings if f.name == name], axis=0)


def _result(scores, presence: float, calibrated: bool = True) -> GroundingResult:
    return GroundingResult("made up", np.zeros(1), np.zeros(1, dtype=np.int64), np.zeros((1, 5)),
                           np.asarray(scores, dtype=np.float32), presence=presence, calibrated=calibrated)


def test_report_names_every_demo_finding_in_its_place(report):
    """Every finding of the demo slide is found, its best box on it, and each finding the layout places
    (training.synthetic.layout_places: the tumour nest, the fat lobules, the glands) in its area."""
    spec = demo_spec()
    by_name = {f.name: f for f in report.findings}
    assert list(by_name) == list(FINDINGS)
    for finding in spec.findings:
        evidence = by_name[finding.name.replace("_", " ")]
        assert evidence.status == "found" and evidence.place and evidence.boxes, evidence
        x0, y0, x1, y1 = evidence.boxes[0].box
        bx, by, bw, bh = finding.bbox
        assert x0 < bx + bw and bx < x1 and y0 < by + bh and by < y1, (finding.name, evidence.boxes[0], finding.bbox)
    placed = layout_places(spec.layout)
    assert placed == {"tumour@upper left", "fat@lower left", "normal glands@right"}
    misplaced = {fact: by_name[fact.split("@")[0]].place for fact in placed
                 if by_name[fact.split("@")[0]].place != fact.split("@")[1]}
    assert misplaced == {}, misplaced


def test_place_is_the_best_areas_centroid_and_places_share_all_areas(analysis):
    """A calibrated map painting the fat (p 0.9) and a smaller patch of the upper right (p 0.6): placed by its best
    area, sized and shared over both, its boxes best first."""
    encoding = analysis.prepare()
    fat = _truth(encoding, "fat")
    extent = encoding.patch_coords.max(0)
    other = (encoding.patch_coords[:, 0] >= 0.85 * extent[0]) & (encoding.patch_coords[:, 1] <= 0.25 * extent[1])
    other &= ~fat
    assert other.sum() >= 2
    evidence = evidence_from(encoding, _result(np.where(fat, 0.9, np.where(other, 0.6, 0.0)), 0.99), "fat")
    assert evidence.status == "found" and evidence.place == "lower left"
    assert evidence.boxes[0].probability == pytest.approx(0.9) and evidence.count >= 2
    assert evidence.boxes[-1].probability == pytest.approx(0.6)
    assert evidence.size == pytest.approx((fat | other).sum() / len(fat))
    assert sum(evidence.places.values()) == pytest.approx(1.0, abs=1e-3)
    assert next(iter(evidence.places)) == "lower left" and "upper right" in evidence.places
    assert list(evidence.places.values()) == sorted(evidence.places.values(), reverse=True)


def test_a_finding_not_on_the_slide_is_absent_with_no_place_or_boxes(analysis):
    evidence = evidence_for(analysis, "calcification")
    assert evidence.status == "not found" and not evidence.present, evidence
    assert evidence.place is None and evidence.boxes == [] and evidence.places == {} and evidence.size == 0
    assert evidence.summary() == f"absent, p = {evidence.presence:.2f}"
    # a map that only ranks paints its best patches on every slide: they do not show an absent finding
    scores = np.linspace(0, 1, len(analysis.prepare().patch_coords))
    for calibrated in (True, False):
        made = evidence_from(analysis, _result(scores, 0.1, calibrated))
        assert made.status == "not found" and made.boxes == [] and made.place is None
    wordings = ["adipose tissue", "fat lobules"]
    report = slide_report(analysis, {"calcification": "calcification", "fat": wordings})
    markdown = report.to_markdown()
    assert f"| calcification | calcification | absent | {evidence.presence:.2f} | - | - | 0 |" in markdown
    assert "## calcification" not in markdown
    # of several wordings the best supported one
    assert report.findings[1].query == max(wordings, key=lambda text: analysis.ground(text).presence)


def test_json_round_trips_and_markdown_names_each_finding_with_p_and_place(report):
    data = json.loads(json.dumps(report.to_json()))
    assert data == report.to_json() and SlideReport.from_json(data) == report
    assert data["slide"] == str(SLIDE) and len(data["weights"]) == 16
    for finding in data["findings"]:
        # separate occurrences: the areas at least a quarter of the largest one's size
        assert finding["count"] == sum(b["fraction"] >= 0.25 * max(c["fraction"] for c in finding["boxes"])
                                       for b in finding["boxes"])
        assert all(isinstance(v, int) for box in finding["boxes"] for v in box["box"])
    lines = report.to_markdown().splitlines()
    absent = [f for f in report.findings if not f.present]
    assert [f.name for f in absent] == ["lymphoid aggregate"]  # the demo slide has lymphocytes at the tumour edge
    for f in report.findings:
        row = next(line for line in lines if line.startswith(f"| {f.name} | {f.query} |"))
        if f in absent:
            assert row.endswith(f"| absent | {f.presence:.2f} | - | - | 0 |") and not f.boxes, row
            continue
        assert f"| {f.presence:.2f} |" in row and f"**{f.place}**" in row, row
        x0, y0, x1, y1 = f.boxes[0].box
        assert f"1. ({x0}, {y0}, {x1}, {y1}): " in lines[lines.index(f"## {f.name}") + 2]


def test_no_findings_or_no_wording_is_an_error_that_says_what_to_do(analysis):
    with pytest.raises(PathflipError, match="name at least one"):
        slide_report(analysis, {})
    with pytest.raises(PathflipError, match="at least one wording"):
        evidence_for(analysis, [], "fat")


def test_cli_prints_the_report_and_writes_markdown_and_json(cache, tmp_path, capsys):
    common = [str(SLIDE), "--weights", str(WEIGHTS), "--cache", str(cache), "--device", "cpu",
              "--finding", "fat=adipose tissue|fat", "--finding", "calcification=calcification"]
    assert main(["report", *common, "--out", str(tmp_path / "report.md")]) == 0
    printed = capsys.readouterr().out
    written = (tmp_path / "report.md").read_text()
    assert printed == written + f"wrote {tmp_path / 'report.md'}\n"
    assert "| fat | " in written and "| calcification | calcification | absent |" in written
    assert main(["report", *common, "--out", str(tmp_path / "report.json")]) == 0
    capsys.readouterr()
    data = json.loads((tmp_path / "report.json").read_text())
    assert [f["name"] for f in data["findings"]] == ["fat", "calcification"]
    assert SlideReport.from_json(data).to_markdown() == written
    for bad in (["--out", str(tmp_path / "report.txt")], ["--finding", "fat="]):
        with pytest.raises(SystemExit) as exit_:
            main(["report", *common, *bad])
        assert exit_.value.code == 2
    assert "use a .md or .json" in capsys.readouterr().err


def test_cli_chat_prints_the_cited_boxes_and_writes_them_for_qupath(cache, tmp_path, capsys):
    """`pathflip chat` answers from the evidence, prints each cited finding's boxes in level-0 px, and writes them
    as Markdown, JSON and GeoJSON (QuPath annotations, read back by the project's GeoJSON reader); --region asks
    about a box only."""
    from napari_pathflip.annotations import read_geojson

    common = [str(SLIDE), "--weights", str(WEIGHTS), "--cache", str(cache), "--device", "cpu"]
    assert main(["chat", *common, "Where is the fat?", "--out", str(tmp_path / "fat.geojson")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Fat is in the lower left part of the section")
    cited = next(line for line in printed.splitlines() if line.startswith("[1] fat ('fat'): found"))
    box = tuple(int(v) for v in cited.rsplit(": ", 1)[1].strip("()").split(", "))
    shapes = read_geojson(tmp_path / "fat.geojson").items
    assert [s.classification for s in shapes] == ["fat"] and shapes[0].name == "fat cited area #1"
    assert shapes[0].bounds == box

    assert main(["chat", *common, "Where is the fat?", "--out", str(tmp_path / "fat.json")]) == 0
    capsys.readouterr()
    data = json.loads((tmp_path / "fat.json").read_text())
    assert data["citations"][0]["evidence"]["boxes"][0]["box"] == list(box)
    assert main(["chat", *common, "What is this?", "--region", "5700", "3600", "6800", "4300"]) == 0
    assert capsys.readouterr().out.startswith("This region shows normal glands")
