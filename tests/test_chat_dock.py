"""The chat dock in a real viewer under Xvfb: a real slide, the small random PathFLIP weights and the tiny random chat
model of conftest. Random weights say nothing sensible, so answers are sampled with a fixed seed and a fixed length
(min_new_tokens) to get real vocabulary words of a known count."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from napari.utils.notifications import notification_manager
from qtpy.QtCore import Qt, QThreadPool, QTimer
from qtpy.QtWidgets import QApplication

from napari_pathflip.analysis import SlideAnalysis
from napari_pathflip.chat import CONFIG_NAME, GenerationSettings
from napari_pathflip.viewer.chat_dock import ChatDock

SLIDE = "CMU-1-Small-Region.svs"
ANSWER_WAIT_MS = 30_000


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("chat_dock_cache")


@pytest.fixture(scope="module")
def analysis(wsi_dir, weights, chat_folder, cache_dir):
    analysis = SlideAnalysis(wsi_dir / SLIDE, weights, cache_dir, device="cpu")
    analysis.prepare()  # what the workspace's Analyze does before it hands the analysis to the dock
    return analysis


def fixed_length(tokens: int) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, temperature=1.0,
                              top_p=1.0, seed=0)


@pytest.fixture
def dock(make_napari_viewer):
    viewer = make_napari_viewer()
    dock = ChatDock(viewer)
    viewer.window.add_dock_widget(dock, name="PathFLIP chat", area="right")
    return dock


def start(dock, analysis, qtbot, tokens=12):
    dock.generation = fixed_length(tokens)
    dock.set_analysis(analysis)
    qtbot.waitUntil(lambda: dock.is_ready, timeout=ANSWER_WAIT_MS)


def ask(dock, qtbot, text=None, click=None):
    """Ask through the dock (typed text + Enter, or a button) and return (pieces, answer)."""
    pieces, answers = [], []
    dock.streamed.connect(pieces.append)
    dock.answered.connect(answers.append)
    if click is not None:
        click.click()
    else:
        dock.question.setText(text)
        qtbot.keyClick(dock.question, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: bool(answers) and not dock.busy, timeout=ANSWER_WAIT_MS)
    dock.streamed.disconnect(pieces.append)
    dock.answered.disconnect(answers.append)
    return pieces, answers[0]


def undated(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if not line.startswith("- Saved:")]


def messages_since(count):
    return [str(n.message) for n in notification_manager.records[count:]]


def test_streamed_multi_turn_chat_and_markdown_export(dock, analysis, qtbot, tmp_path):
    start(dock, analysis, qtbot, tokens=200)
    assert SLIDE in dock.status.text() and "2 visual tokens" in dock.status.text()  # slide token + 1 region
    shown = []
    dock.transcript.textChanged.connect(lambda: shown.append(dock.transcript.toPlainText()))

    pieces, first = ask(dock, qtbot, "What is the diagnosis?")
    assert dock.question.text() == ""  # Enter sent it
    assert first.finish_reason == "length" and len(first.token_ids) == 200
    assert len(pieces) > 1 and "".join(pieces) == first.text  # streamed piece by piece
    partial = [text for text in shown if "\u258d" in text and text.split("PathFLIP:")[-1].strip(" \u258d\n")]
    assert partial, "the transcript never showed a partial answer while it streamed"
    final = dock.transcript.toPlainText()
    assert "What is the diagnosis?" in final and "PathFLIP:" in final and "\u258d" not in final
    assert first.text.strip() in dock.transcript_markdown()

    dock.max_tokens.setValue(16)
    _, second = ask(dock, qtbot, "What grade is the tumour?")
    assert len(second.token_ids) == 16
    history = dock.conversation.history
    assert [turn["role"] for turn in history] == ["user", "assistant"] * 2
    assert history[0]["content"] == "What is the diagnosis?" and history[1]["content"] == first.text
    assert history[2]["content"] == "What grade is the tumour?" and history[3]["content"] == second.text

    path = dock.save_transcript(tmp_path / "transcript")
    assert path == tmp_path / "transcript.md"
    saved = path.read_text(encoding="utf-8")
    assert saved.startswith("# PathFLIP chat") and SLIDE in saved
    assert saved.count("**You:**") == 2 and saved.count("**PathFLIP:**") == 2
    for text in ("What is the diagnosis?", "What grade is the tumour?", first.text.strip(), second.text.strip()):
        assert text in saved
    assert "*(answer cut at the token limit" in saved  # fixed-length answers end at the limit, and say so
    assert saved.index("What is the diagnosis?") < saved.index(first.text.strip()) < saved.index("What grade is the")

    dock.copy_button.click()
    assert undated(QApplication.clipboard().text()) == undated(saved)

    engine = dock.engine
    dock.new_button.click()
    assert dock.conversation.history == [] and dock.transcript_markdown(header=False).strip() == ""
    dock.set_analysis(None)
    assert not dock.is_ready and not dock.question.isEnabled() and "Analyse a slide" in dock.status.text()
    start(dock, analysis, qtbot)
    assert dock.engine is engine  # loaded once per chat folder


def test_stop_cancels_while_the_event_loop_keeps_serving(dock, analysis, qtbot):
    start(dock, analysis, qtbot, tokens=3000)
    ticks, marks = [0], {}
    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(lambda: ticks.__setitem__(0, ticks[0] + 1))
    timer.start()
    pieces, answers = [], []
    dock.streamed.connect(pieces.append)
    dock.answered.connect(answers.append)

    assert dock.send("What is the diagnosis? Explain in detail.")
    assert dock.busy and dock.stop_button.isEnabled() and not dock.send_button.isEnabled()
    qtbot.waitUntil(lambda: bool(pieces), timeout=ANSWER_WAIT_MS)
    marks["first"] = ticks[0]
    qtbot.waitUntil(lambda: len(pieces) >= 30, timeout=ANSWER_WAIT_MS)
    marks["stop"] = ticks[0]
    dock.stop_button.click()
    qtbot.waitUntil(lambda: bool(answers) and not dock.busy, timeout=ANSWER_WAIT_MS)
    timer.stop()

    answer = answers[0]
    assert answer.finish_reason == "cancelled" and len(answer.token_ids) < 3000
    assert marks["stop"] > marks["first"]  # the GUI thread kept serving timers while tokens were generated
    assert "(stopped)" in dock.transcript.toPlainText()
    assert dock.conversation.history == []  # a stopped answer is not part of the conversation
    assert dock.is_ready and not dock.stop_button.isEnabled()

    dock.max_tokens.setValue(8)
    _, after = ask(dock, qtbot, "What grade is it?")
    assert after.finish_reason == "length" and len(after.token_ids) == 8


def test_describe_and_multiple_choice_prompts(dock, analysis, qtbot):
    start(dock, analysis, qtbot)
    _, caption = ask(dock, qtbot, click=dock.describe_button)
    config = dock.engine.config
    assert dock.conversation.history[0]["content"] == config.caption_prompt and caption.text

    before = len(notification_manager.records)
    dock.choice_box.setChecked(True)
    dock.choice_button.click()  # no question yet
    assert any("multiple-choice question needs" in m for m in messages_since(before)) and not dock.busy

    dock.choice_question.setText("What is the most likely diagnosis?")
    for letter, text in zip("ABC", ("Adenocarcinoma", "Lymphoma", "Normal tissue")):
        dock.choice_options[letter].setText(text)
    _, choice = ask(dock, qtbot, click=dock.choice_button)
    prompt = dock.conversation.history[2]["content"]
    assert prompt.splitlines() == ["What is the most likely diagnosis?", "A. Adenocarcinoma", "B. Lymphoma",
                                   "C. Normal tissue", config.choice_instruction]
    shown = dock.transcript.toPlainText()
    assert "A. Adenocarcinoma" in shown and "C. Normal tissue" in shown and choice.text.strip()
    assert choice.option_scores is None and "ranks them" not in shown  # this chat's rule: "generate"

    # a chat that ranks the options (the demo chat): the answer starts with the best option, its share shown below
    dock.engine.config.choice_rule = "rank"
    try:
        _, ranked = ask(dock, qtbot, click=dock.choice_button)
    finally:
        dock.engine.config.choice_rule = "generate"
    best = max(ranked.option_scores, key=ranked.option_scores.get)
    options = {"A": "Adenocarcinoma", "B": "Lymphoma", "C": "Normal tissue"}
    assert set(ranked.option_scores) == set(options) and ranked.text.startswith(f"{best}. {options[best]}.")
    assert f"options as the model ranks them: {best} " in dock.transcript.toPlainText()
    assert dock.conversation.history[-1]["content"] == ranked.text  # the note is not part of the conversation


def test_missing_or_broken_chat_folder_notifies_and_the_dock_recovers(dock, analysis, chat_folder, cache_dir,
                                                                      qtbot, tmp_path):
    # the same weights in a folder without a chat model beside them (copy2 keeps the cache key)
    lonely = shutil.copytree(analysis.weights, tmp_path / "models" / "pathflip")
    before = len(notification_manager.records)
    dock.set_analysis(SlideAnalysis(analysis.slide_path, lonely, cache_dir, device="cpu"))
    assert any("python -m training demo" in m for m in messages_since(before))
    assert not dock.is_ready and not dock.question.isEnabled() and "No chat model" in dock.status.text()
    assert dock.model_box.isChecked()  # the folder picker unfolds
    assert dock.send("hello") is False  # explains, does not raise

    broken = tmp_path / "broken_chat"
    broken.mkdir()
    shutil.copy(chat_folder / CONFIG_NAME, broken)
    before = len(notification_manager.records)
    dock.set_chat_folder(broken)
    qtbot.waitUntil(lambda: any("Cannot load the chat model" in m for m in messages_since(before)),
                    timeout=ANSWER_WAIT_MS)
    assert any("projector.safetensors" in m for m in messages_since(before)) and not dock.is_ready

    dock.set_chat_folder(chat_folder)
    assert dock.chat_folder_edit.text() == str(chat_folder)
    qtbot.waitUntil(lambda: dock.is_ready, timeout=ANSWER_WAIT_MS)

    before = len(notification_manager.records)
    assert dock.send("   ") is False
    assert any("Type a question" in m for m in messages_since(before))
    too_long = "necrosis " * 5000  # far more tokens than the 4,096-token context
    assert dock.send(too_long)
    qtbot.waitUntil(lambda: not dock.busy, timeout=ANSWER_WAIT_MS)
    assert any("context holds" in m for m in messages_since(before))
    assert dock.transcript_markdown(header=False).strip() == "" and dock.question.text() == too_long.strip()
    dock.question.clear()
    dock.max_tokens.setValue(4)
    _, answer = ask(dock, qtbot, "Still there?")
    assert len(answer.token_ids) == 4


def test_removing_the_dock_mid_answer_stops_the_answer(dock, analysis, qtbot):
    start(dock, analysis, qtbot, tokens=3000)
    conversation, pieces, deleted = dock.conversation, [], []
    dock.streamed.connect(pieces.append)
    dock.destroyed.connect(lambda: deleted.append(True))
    assert dock.send("What is the diagnosis? Explain in detail.")
    qtbot.waitUntil(lambda: bool(pieces), timeout=ANSWER_WAIT_MS)
    dock.viewer.window.remove_dock_widget(dock)
    dock.deleteLater()
    qtbot.waitUntil(lambda: bool(deleted), timeout=5000)
    assert QThreadPool.globalInstance().waitForDone(ANSWER_WAIT_MS)
    qtbot.wait(50)  # queued results of the worker reach the deleted dock and are dropped, without errors
    assert conversation.history == []  # stopped, not answered to the end (that would be remembered)


def grab(widget) -> np.ndarray:
    image = widget.grab().toImage().convertToFormat(widget.grab().toImage().Format.Format_RGBA8888)
    bits = image.constBits()
    bits.setsize(image.sizeInBytes())
    return np.frombuffer(bits, np.uint8).reshape(image.height(), image.bytesPerLine())[:, :image.width() * 4] \
        .reshape(image.height(), image.width(), 4)


def test_screenshot_of_a_chat_answer(make_napari_viewer, analysis, wsi_dir, cache_dir, qtbot, tmp_path):
    """A streamed answer drawn in the dock. With the shipped demo weights this is the README's screenshot: the demo
    slide described by the demo chat model (greedy) and one multiple-choice question (ranked); without them, the CMU
    slide and the random fixture model."""
    from napari_pathflip.weights import WeightsFolder
    from napari_pathflip.viewer.sample_data import DEMO_SLIDE, sample_data_dir

    viewer = make_napari_viewer(show=True)
    dock = ChatDock(viewer)
    viewer.window.add_dock_widget(dock, name="PathFLIP chat", area="right")
    shipped = WeightsFolder.resolve().path
    if (WeightsFolder(shipped).chat_dir / CONFIG_NAME).is_file():
        slide = sample_data_dir() / DEMO_SLIDE
        viewer.open(str(slide), plugin="napari-pathflip")
        demo = SlideAnalysis(slide, shipped, cache_dir, device="cpu")
        demo.prepare()
        dock.set_analysis(demo)
        qtbot.waitUntil(lambda: dock.is_ready, timeout=ANSWER_WAIT_MS)
        _, answer = ask(dock, qtbot, click=dock.describe_button)
        # then a multiple-choice question from the form: the evidence picks the option and the answer cites it
        from training.synthetic import demo_spec

        question = next(q for q in demo_spec().questions if "centre" in q.question)
        dock.choice_box.setChecked(True)
        dock.choice_question.setText(question.question)
        for letter, text in question.options.items():
            dock.choice_options[letter].setText(text)
        _, choice = ask(dock, qtbot, click=dock.choice_button)
        assert choice.text.startswith(f"{question.answer}. {question.options[question.answer]}.")
        assert choice.grounded and choice.citations and "cite:" in dock.transcript.toHtml()
        assert answer.report is not None and "**Report**" in dock.transcript_markdown()
        assert "answered from the slide alone" not in dock.status.text()  # the demo chat keeps every turn
    else:
        viewer.open(str(wsi_dir / SLIDE), plugin="napari-pathflip")
        start(dock, analysis, qtbot, tokens=40)
        _, answer = ask(dock, qtbot, "What are the key findings on this slide?")
    viewer.window.resize(1500, 950)
    viewer.reset_view()
    folder = Path(os.environ.get("PATHFLIP_SCREENSHOT_DIR", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    shot = viewer.screenshot(str(folder / "chat_answer.png"), canvas_only=False)
    canvas = viewer.screenshot(canvas_only=True)
    assert (folder / "chat_answer.png").is_file() and shot.shape[1] > canvas.shape[1] + dock.width() // 2
    assert dock.isVisible() and grab(dock.transcript)[..., :3].std() > 5  # text drawn, not a blank panel
    assert answer.text.strip() in dock.transcript_markdown()
