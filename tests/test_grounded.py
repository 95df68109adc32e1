"""The grounded chat's parts that need no model: reading questions, places and findings in text, the description
check and the written stream, on evidence made by hand (chat/grounded.py). The same parts on the demo slide with
the shipped weights are tested in test_demo.py."""

import pytest

from napari_pathflip.chat.grounded import (
    DescriptionCheck,
    Written,
    WrittenStream,
    answer_count,
    answer_presence,
    answer_where,
    choose,
    find_places,
    named_findings,
    read_question,
)
from napari_pathflip.errors import PathflipError
from napari_pathflip.report import FINDINGS, EvidenceBox, FindingEvidence

CAPTION_PROMPT = "Describe this slide: give the diagnosis and the key pathological findings."


@pytest.mark.parametrize("question, kind, subject", [
    ("Where is the fat?", "where", "fat"),
    ("Where are the immune cells located on this slide?", "where", "immune cells"),
    ("In which part of the section is the tumour nest?", "where", "tumour nest"),
    ("How many tumour nests are there?", "count", "tumour nests"),
    ("How many nests of cancer cells can you see?", "count", "nests of cancer cells"),  # "can" is not "cancer"
    ("Is there necrosis?", "presence", "necrosis"),
    ("Are there any lymphocytes on this slide?", "presence", "lymphocytes"),
    ("Does the slide show dead tissue?", "presence", "dead tissue"),
    ("Is necrosis present?", "presence", "necrosis"),
    ("How large is the necrotic area?", "size", "necrotic area"),
    ("What fraction of the tissue is fat?", "size", "fat"),
    ("What lies at the edge of the tumour nest?", "relation", "tumour nest"),
    ("What is the diagnosis?", "other", ""),
    (CAPTION_PROMPT, "describe", ""),
])
def test_questions_are_read_by_kind_with_the_finding_as_typed(question, kind, subject):
    intent = read_question(question, CAPTION_PROMPT)
    assert (intent.kind, intent.subject) == (kind, subject)


def test_place_and_region_questions():
    assert read_question("What is in the lower left part of the section?").place == "lower left"
    assert read_question("What lies in the centre?").place == "central"
    here = read_question("Is there necrosis here?")
    assert (here.kind, here.subject, here.here) == ("presence", "necrosis", True)
    assert read_question("What is this?").here and read_question("What is this?").place is None
    assert read_question("Which of the following is absent from the section?").kind == "which_absent"
    with pytest.raises(PathflipError, match="empty"):
        read_question("  ?  ")


def test_places_and_findings_named_in_text():
    assert find_places("In the upper left and the right parts") == ["upper left", "right"]
    assert find_places("at the top left, near the middle") == ["upper left", "central"]
    assert find_places("no place here") == []
    assert named_findings("A lymphoid aggregate lies beside benign glands in fat") == ["lymphoid aggregate",
                                                                                        "normal glands", "fat"]
    assert named_findings("Lymphocytes infiltrate the tumour edge.") == ["lymphocytes", "tumour"]


def _evidence(name, presence, place=None, boxes=1, size=0.05):
    status = "found" if presence >= 0.8 else "uncertain" if presence >= 0.5 else "not found"
    found = FindingEvidence(name, name, presence, status, True)
    if status != "not found" and place:
        found.place, found.places, found.size = place, {place: 1.0}, size
        found.boxes = [EvidenceBox((100 * i, 0, 100 * i + 50, 50), 0.9, size / boxes, place) for i in range(boxes)]
    return found


def test_answers_written_from_evidence_start_with_the_answer_and_cite_the_finding():
    fat = _evidence("fat", 0.98, "lower left")
    where = answer_where(fat)
    assert where.text.startswith("Fat is in the lower left part of the section (p = 0.98")
    assert [where.text[c.start:c.end] for c in where.citations] == ["Fat"] and where.citations[0].evidence is fat
    absent = answer_presence(_evidence("granuloma", 0.03))
    assert absent.text == "No. Granuloma is not found on this slide (p = 0.03)."
    unsure = answer_presence(_evidence("immune cells", 0.6, "upper left"))
    assert unsure.text.startswith("Yes, but uncertain. Immune cells are present (p = 0.60)")
    two = answer_count(_evidence("tumour nests", 0.99, "upper left", boxes=2))
    assert two.text.startswith("2. Tumour nests form two separate areas")
    assert answer_count(_evidence("tumour nests", 0.1)).text.startswith("0. No tumour nests are found")


class _Evidence:
    """Evidence by hand: what SlideEvidence gives for each finding of report.FINDINGS and typed texts."""

    calls_presence = True

    def __init__(self, **findings):
        self.findings = findings

    def known(self, name):
        return self.findings.get(name) or _evidence(name, 0.01)

    def finding(self, text, name=None):
        return self.findings.get(text) or _evidence(text, 0.01)


def test_descriptions_keep_the_models_words_and_take_places_from_the_evidence():
    evidence = _Evidence(tumour=_evidence("tumour", 0.99, "upper right"), fat=_evidence("fat", 0.97, "lower left"),
                         stroma=_evidence("stroma", 0.99, "central"))
    check = DescriptionCheck(evidence)
    # the wrong place replaced, the model's words kept
    assert check.sentence("A large tumour nest occupies the upper left part of the section.").text == \
        "A large tumour nest occupies the upper right part of the section."
    assert check.sentence("B. Fibrous stroma surrounds the tumour nest.").text == \
        "Fibrous stroma surrounds the tumour nest."  # a stray option letter goes
    # a finding the slide does not show: the sentence goes
    assert check.sentence("A lymphoid aggregate is present in the upper central part.").text == ""
    # a place with nothing to check it by goes; a sentence without a finding or a place stays
    assert check.sentence("The upper left part of the section consists of tissue.").text == ""
    assert check.sentence("The section is well preserved.").text == "The section is well preserved."
    # a placed finding the caption left out (fat) is added with its place and cited
    end = check.finish()
    assert end.text == "Fat lobules lie in the lower left part of the section."
    assert end.citations[0].evidence.name == "fat"
    assert set(FINDINGS) >= {"tumour", "fat", "stroma", "lymphoid aggregate"}


def test_multiple_choice_by_evidence_for_where_and_how_many_else_left_to_the_model():
    fat = _evidence("fat", 0.98, "lower left")
    nests = _evidence("tumour nests", 0.99, "upper left", boxes=2)
    evidence = _Evidence(fat=fat, **{"tumour nests": nests})
    where = choose(evidence, read_question("Where is the fat located?"),
                   {"A": "In the upper left part", "B": "In the lower left part", "C": "In the right part"})
    assert max(where, key=where.get) == "B"
    count = choose(evidence, read_question("How many tumour nests are present?"),
                   {"A": "None", "B": "One", "C": "Two", "D": "Three"})
    assert max(count, key=count.get) == "C"
    assert choose(evidence, read_question("What is the most likely diagnosis?"), {"A": "x", "B": "y"}) is None
    # options that name no place: not decided by the evidence
    assert choose(evidence, read_question("Where is the fat?"), {"A": "Near the tumour", "B": "Far away"}) is None


def test_written_stream_streams_words_keeps_citations_and_stops():
    fat = _evidence("fat", 0.98, "lower left")
    done = []
    stream = WrittenStream(lambda: [answer_where(fat), Written("Second part.")], on_done=done.append)
    pieces = list(stream)
    assert len(pieces) > 5 and "".join(pieces) == stream.answer.text == done[0].text
    assert stream.answer.text.endswith(" Second part.") and stream.answer.grounded
    assert stream.answer.finish_reason == "eos" and stream.answer.first_token_s is not None
    assert [c.evidence for c in stream.answer.citations] == [fat]

    stopped = WrittenStream(lambda: [answer_where(fat), Written("Never shown.")])
    next(stopped)
    stopped.cancel()
    answer = stopped.result()
    assert answer.finish_reason == "cancelled" and "Never shown" not in answer.text
