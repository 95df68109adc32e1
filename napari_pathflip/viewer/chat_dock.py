"""The chat dock: talk with the analysed slide through the chat model beside its PathFLIP weights.

The dock only calls the core (`ChatEngine`, `Conversation`, `SlideAnalysis.prepare`). Model loading and every answer
run in background workers (tasks.run_in_background, as in the other panels; failures read as tasks.user_message says);
the GUI thread only moves text into the transcript. The transcript is kept as a list of turns and rendered as
Markdown, so what is shown, copied and saved is the same text.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections import OrderedDict
from datetime import datetime
from pathlib import Path

from qtpy.QtCore import QTimer, Signal
from qtpy.QtGui import QColor, QTextCharFormat, QTextCursor
from qtpy.QtWidgets import (
    QApplication,
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from ..chat import CONFIG_NAME, ChatEngine, GenerationSettings, ranking_note
from ..errors import PathflipError
from .tasks import MODEL_LOCK, run_in_background, user_message

USER, ASSISTANT = "You", "PathFLIP"
OPTION_LETTERS = "ABCD"
# Qt's default line limit (32,767) would cut a pasted report silently; the engine says when input is too long.
MAX_INPUT_CHARS = 1_000_000
RENDER_INTERVAL_MS = 30  # streamed pieces are coalesced into one repaint per interval (a fast GPU gives ~300/s)
KEPT_CONVERSATIONS = 20  # other slides whose conversation is kept for when they come back
NO_SLIDE_HINT = "Analyse a slide in the PathFLIP workspace to chat about it."
TRAIN_HINT = "train one with `python -m training demo` or pick a chat folder under Chat model"
LINK_COLOUR = "#7cc4ff"  # cited findings: light blue, legible on napari's dark and light themes
ENDINGS = {"cancelled": "*(stopped)*", "length": "*(answer cut at the token limit: raise Max tokens for more)*"}


@dataclasses.dataclass
class Turn:
    role: str  # USER or ASSISTANT
    text: str
    ending: str = ""  # "" while streaming or after a normal end, else a key of ENDINGS
    streaming: bool = False
    note: str = ""  # shown under the answer, not part of the conversation (a ranked choice's option shares)
    citations: list = dataclasses.field(default_factory=list)  # chat.Citation of the findings the answer names
    report: object = None  # a description's SlideReport


def _region_text(region) -> str:
    if len(region) == 4 and not isinstance(region[0], (tuple, list)):
        x0, y0, x1, y1 = region
        return f"x {x0}-{x1}, y {y0}-{y1}"
    return f"a polygon of {len(region)} vertices"


def _quote(text: str) -> str:
    """A user turn as a Markdown block quote with its line breaks kept (hard breaks)."""
    return "\n".join(f"> {line}  " if line.strip() else ">" for line in text.strip().splitlines())


def _linked(turn: Turn, index: int) -> str:
    """The answer's text with each cited finding as a link cite:<turn>:<citation> (the dock's transcript)."""
    text, out, at = turn.text, [], 0
    for number, citation in enumerate(turn.citations):
        if citation.start < at or citation.end > len(text):
            continue
        out += [text[at:citation.start], f"[{text[citation.start:citation.end]}](cite:{index}:{number})"]
        at = citation.end
    return "".join(out) + text[at:]


def evidence_lines(turn: Turn) -> list[str]:
    """One line per cited finding: its evidence and its first boxes (level-0 px), for the exported transcript."""
    from ..chat.grounded import cited_findings, evidence_line

    return [f"- {evidence_line(e, boxes=3)}" for e in cited_findings(turn.citations)]


def report_lines(report) -> list[str]:
    """A description's structured report, one line per finding."""
    return [f"- {f.name}: {f.summary()}" for f in report.findings]


def turns_markdown(turns: list[Turn], cursor: bool = False, links: bool = False) -> str:
    """The transcript as Markdown: with `links` (the dock) cited findings are links; without (exports) each answer
    lists its evidence with boxes."""
    parts = []
    for index, turn in enumerate(turns):
        if turn.role == USER:
            parts.append(f"**{USER}:**\n\n{_quote(turn.text)}")
        else:
            text = _linked(turn, index) if links and turn.citations else turn.text
            body = text.strip() or ("" if turn.streaming else "*(empty answer)*")
            if turn.streaming and cursor:
                body += " \u258d"  # a text cursor while the answer streams
            if turn.ending:
                body = f"{body}\n\n{ENDINGS[turn.ending]}"
            if turn.note:
                body = f"{body}\n\n*{turn.note}*"
            if turn.report is not None:
                body = "\n".join([body, "", "**Report** (PathFLIP evidence):", *report_lines(turn.report)])
            if turn.citations and not links and not turn.streaming:
                body = "\n".join([body, "", "Evidence:", *evidence_lines(turn)])
            parts.append(f"**{ASSISTANT}:**\n\n{body}")
    return "\n\n---\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------- worker functions
def _load_chat(analysis, folder: Path, llm_dir: Path | None, device: str | None, engine: ChatEngine | None):
    """Worker: the engine (reused when given), the slide encoding shared with Localize, a new conversation (grounded
    in the analysis's evidence when the chat config says so)."""
    if engine is None:
        engine = ChatEngine.load(folder, llm_dir=llm_dir, device=device, merge=True)
        if engine.fast:  # compile and capture the CUDA graph now, not on the user's first question
            engine.warmup()
    conversation = engine.conversation(analysis.prepare(), analysis)
    if hasattr(conversation, "evidence"):  # grounded: its groundings share the model with Localize
        conversation.evidence.lock = MODEL_LOCK
    return engine, conversation


def _answer(conversation, prompt: str, settings: GenerationSettings, stop: threading.Event, choice=None,
            region=None):
    """Worker generator: (text piece, citations so far) of one answer, then returns the ChatAnswer. `choice`:
    (question, options) of a multiple-choice question, answered by `Conversation.stream_choice`; `region`: the
    level-0 shape a "here" question is about."""
    if choice:
        stream = conversation.stream_choice(*choice, settings)
    elif region is not None:
        stream = conversation.stream(prompt, settings, region=region)
    else:
        stream = conversation.stream(prompt, settings)
    if stop.is_set():
        stream.cancel()
    for piece in stream:
        if stop.is_set():  # seen before the next token is decoded
            stream.cancel()
        yield piece, list(getattr(stream, "citations", ()))
    return stream.answer


def _unless_deleted(slot):
    """Worker results can arrive after the viewer closed and Qt deleted the dock: drop them then."""
    @functools.wraps(slot)
    def guarded(self, *args):
        try:
            self.objectName()  # raises RuntimeError once the C++ widget is gone
        except RuntimeError:
            return None
        return slot(self, *args)
    return guarded


def _button(text: str, slot, tip: str = "") -> QPushButton:
    button = QPushButton(text)
    button.setToolTip(tip)
    button.clicked.connect(slot)
    return button


def _row(*widgets: QWidget) -> QHBoxLayout:
    row = QHBoxLayout()
    for widget in widgets:
        row.addWidget(widget)
    return row


def _foldable(title: str) -> tuple[QGroupBox, QFormLayout]:
    """A group box whose check box folds its form away (folded at first), so the transcript keeps the room."""
    box, panel = QGroupBox(title), QWidget()
    box.setCheckable(True)
    box.setChecked(False)
    form = QFormLayout(panel)
    form.setContentsMargins(0, 0, 0, 0)
    QVBoxLayout(box).addWidget(panel)
    panel.setVisible(False)
    box.toggled.connect(panel.setVisible)
    return box, form


class ChatDock(QWidget):
    """Multi-turn chat about the analysed slide. `set_analysis(analysis)` when a slide is analysed, None when it goes.

    Signals: `streamed(str)` for each text piece as it arrives, `answered(object)` with the ChatAnswer when an answer
    ends (also when stopped), `ready(bool)` when the dock becomes able (or unable) to answer, `cited(object)` with
    the FindingEvidence of a finding clicked in an answer (the workspace shows its heatmap and zooms to its best box).
    `region_source`: a callable giving the region drawn or picked on the slide (level-0; layers.drawn_region), which
    "here" questions are about.
    """

    streamed = Signal(str)
    answered = Signal(object)
    ready = Signal(bool)
    cited = Signal(object)  # the FindingEvidence of a citation clicked in the transcript

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.generation: GenerationSettings | None = None  # base settings; None = the chat folder's defaults
        self._analysis = None
        self._engine: tuple[tuple, ChatEngine] | None = None  # (key, engine): loaded once per chat folder
        self._conversation = None
        self._chat_folder: Path | None = None
        self._llm_folder: Path | None = None
        self._turns: list[Turn] = []
        self._kept: OrderedDict[tuple, tuple] = OrderedDict()  # slide key -> (conversation, turns) of other slides
        self._load_serial = 0
        self._loading = False
        self._worker = None  # the answer being generated
        self._stop = threading.Event()
        self._reset_when_idle = False
        self.region_source = None
        self._build()
        self._render_timer = QTimer(self)
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(RENDER_INTERVAL_MS)
        self._render_timer.timeout.connect(self._render)
        self._refresh(NO_SLIDE_HINT)

    # ------------------------------------------------------------------------------------------- layout
    def _build(self) -> None:
        layout = QVBoxLayout(self)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.transcript = QTextBrowser()
        self.transcript.setOpenLinks(False)  # cite: links show evidence (_link); others open in the browser
        self.transcript.anchorClicked.connect(self._link)
        self.transcript.setPlaceholderText("The conversation appears here.")
        # follow the newest text unless the user scrolled up, also when the dock's layout resizes the transcript
        self._follow = True
        bar = self.transcript.verticalScrollBar()
        bar.valueChanged.connect(lambda value: setattr(self, "_follow", value >= bar.maximum() - 4))
        bar.rangeChanged.connect(lambda _low, high: bar.setValue(high) if self._follow else None)

        self.question = QLineEdit()
        self.question.setMaxLength(MAX_INPUT_CHARS)
        self.question.returnPressed.connect(self.send)
        self.send_button = _button("Send", self.send)
        self.stop_button = _button("Stop", self.stop, "Stop generating this answer")
        ask_row = _row(self.question, self.send_button, self.stop_button)

        self.describe_button = _button("Describe slide", self.describe,
                                       "Ask the model for a caption: diagnosis and key findings")
        self.new_button = _button("New chat", self.new_chat)
        self.copy_button = _button("Copy", self.copy_transcript, "Copy the transcript (Markdown) to the clipboard")
        self.save_button = _button("Save…", lambda: self.save_transcript(),
                                   "Save the transcript as Markdown, JSON (with the cited evidence) or GeoJSON (the "
                                   "cited boxes, for QuPath)")
        action_row = _row(self.describe_button, self.new_button, self.copy_button, self.save_button)

        self.choice_box, choice_form = _foldable("Multiple choice")
        self.choice_question = QLineEdit()
        self.choice_question.setPlaceholderText("e.g. What is the most likely diagnosis?")
        choice_form.addRow("Question", self.choice_question)
        self.choice_options = {}
        for letter in OPTION_LETTERS:
            self.choice_options[letter] = QLineEdit()
            choice_form.addRow(letter, self.choice_options[letter])
        self.choice_button = _button("Ask (answer starts with the letter)", self.ask_choice)
        choice_form.addRow(self.choice_button)

        self.model_box, model_form = _foldable("Chat model")
        self.chat_folder_edit, chat_row = self._folder_row("default: beside the weights", self.set_chat_folder)
        self.llm_folder_edit, llm_row = self._folder_row("default: llm/ in the chat folder", self.set_llm_folder)
        self.llm_folder_edit.setToolTip("A Hugging Face causal-LM folder (e.g. Qwen3-0.6B) to use instead of the "
                                        "chat folder's llm/; the projector must match its hidden size")
        model_form.addRow("Chat folder", chat_row)
        model_form.addRow("LLM folder", llm_row)
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 8192)
        self.max_tokens.setValue(GenerationSettings().max_new_tokens)
        self.sample = QCheckBox("Sample")
        self.sample.setToolTip("Sample with the chat folder's temperature and top-p instead of greedy decoding")
        model_form.addRow("Max tokens", _row(self.max_tokens, self.sample))

        layout.addWidget(self.status)
        layout.addWidget(self.transcript, stretch=1)
        layout.addLayout(ask_row)
        layout.addLayout(action_row)
        layout.addWidget(self.choice_box)
        layout.addWidget(self.model_box)

    def _folder_row(self, placeholder: str, apply) -> tuple[QLineEdit, QHBoxLayout]:
        edit = QLineEdit()
        edit.setPlaceholderText(placeholder)
        edit.editingFinished.connect(lambda: apply(edit.text().strip() or None))

        def pick():
            folder = QFileDialog.getExistingDirectory(self, "Pick a folder", edit.text())
            if folder:
                edit.setText(folder)
                apply(folder)

        return edit, _row(edit, _button("…", pick, "Pick a folder"))

    # ------------------------------------------------------------------------------------------ state
    @property
    def busy(self) -> bool:
        """An answer is being generated."""
        return self._worker is not None

    @property
    def conversation(self):
        """The current Conversation (None until the chat model and the slide encoding are loaded)."""
        return self._conversation

    @property
    def engine(self) -> ChatEngine | None:
        """The loaded chat engine (kept while the chat folder stays the same)."""
        return self._engine[1] if self._engine is not None else None

    @property
    def is_ready(self) -> bool:
        return self._conversation is not None and not self.busy

    def _refresh(self, status: str | None = None) -> None:
        if status is not None:
            self.status.setText(status)
        can_ask = self.is_ready
        for widget in (self.question, self.send_button, self.describe_button, self.choice_box):
            widget.setEnabled(can_ask)
        self.stop_button.setEnabled(self.busy)
        for widget in (self.copy_button, self.save_button):
            widget.setEnabled(bool(self._turns))
        self.new_button.setEnabled(bool(self._turns) or self.busy)
        default = self._analysis.weights.chat_dir if self._analysis is not None else None
        self.chat_folder_edit.setPlaceholderText(f"default: {default}" if default else "default: beside the weights")
        self.chat_folder_edit.setToolTip(self.chat_folder_edit.placeholderText())
        if self._analysis is None:
            self.question.setPlaceholderText(NO_SLIDE_HINT)
        elif self._conversation is None:
            self.question.setPlaceholderText("The chat model is not loaded.")
        else:
            self.question.setPlaceholderText("Ask about the slide, press Enter")
        self.ready.emit(can_ask)

    # --------------------------------------------------------------------------------- analysis / model
    def set_analysis(self, analysis) -> None:
        """Chat about `analysis` (a SlideAnalysis whose prepare() has run or is cached); None disables the dock.
        Each slide keeps its conversation: coming back to a slide (same file, weights and chat folder), e.g. by
        opening it again from the library, shows its transcript again and goes on with its history."""
        if analysis is self._analysis and (self._conversation is not None or self._loading):
            return
        if self._analysis is not None and self._conversation is not None and not self.busy:
            self._kept[self._slide_key(self._analysis)] = (self._conversation, self._turns)
            while len(self._kept) > KEPT_CONVERSATIONS:
                self._kept.popitem(last=False)
        self._analysis = analysis
        kept = self._kept.pop(self._slide_key(analysis), None) if analysis is not None else None
        if kept is None:
            self._reload()
            return
        self._load_serial += 1  # a conversation still loading for the slide before is not wanted any more
        self._loading = False
        self._conversation, self._turns = kept
        self._render()
        self._refresh(f"Chatting about <b>{Path(analysis.slide_path).name}</b> again: its conversation goes on.")

    def _slide_key(self, analysis) -> tuple:
        return (str(Path(analysis.slide_path).resolve()), analysis.weights.id, str(analysis.device),
                str(self.chat_folder()), str(self._llm_folder))

    def set_chat_folder(self, folder: str | Path | None) -> None:
        """Use this chat folder instead of the one beside the weights (None: back to the default)."""
        self._override("_chat_folder", self.chat_folder_edit, folder)

    def set_llm_folder(self, folder: str | Path | None) -> None:
        """Use this causal-LM folder (e.g. Qwen3-0.6B) instead of the chat folder's llm/ (None: back to it)."""
        self._override("_llm_folder", self.llm_folder_edit, folder)

    def _override(self, attribute: str, edit: QLineEdit, folder: str | Path | None) -> None:
        """Set the folder override `attribute`, show it in `edit` and reload when it changed."""
        folder = Path(folder).expanduser() if folder else None
        if folder != getattr(self, attribute):
            setattr(self, attribute, folder)
            edit.setText(str(folder) if folder else "")
            self._reload()

    def chat_folder(self) -> Path | None:
        """The chat folder in use: the override, else the one beside the analysed slide's weights."""
        if self._chat_folder is not None:
            return self._chat_folder
        return self._analysis.weights.chat_dir if self._analysis is not None else None

    def _reload(self) -> None:
        """A new conversation for the current slide and chat folder (a new slide starts a new transcript)."""
        from napari.utils.notifications import show_error

        self.stop()
        self._conversation = None
        self._load_serial += 1
        self._loading = False
        self._clear_turns()
        if self._analysis is None:
            self._refresh(NO_SLIDE_HINT)
            return
        folder = self.chat_folder()
        if not (folder / CONFIG_NAME).is_file():
            message = f"No chat model in {folder}: {TRAIN_HINT}."
            show_error(message)
            self.model_box.setChecked(True)
            self._refresh(message)
            return
        device = self._analysis.device
        key = (folder.resolve(), self._llm_folder.resolve() if self._llm_folder else None, device)
        engine = self._engine[1] if self._engine is not None and self._engine[0] == key else None
        serial, self._loading = self._load_serial, True
        self._refresh(f"Loading the chat model from {folder}…" if engine is None else "Starting a conversation…")
        run_in_background(_load_chat, self._analysis, folder, self._llm_folder, device, engine,
                          on_done=lambda result: self._loaded(serial, key, result),
                          on_error=lambda exc: self._load_failed(serial, exc),
                          on_finished=lambda: self._load_ended(serial),
                          _progress={"desc": "Loading the PathFLIP chat model"} if engine is None else None)

    @_unless_deleted
    def _load_failed(self, serial: int, exc: Exception) -> None:
        from napari.utils.notifications import show_error

        if serial != self._load_serial:  # the slide or folder changed while loading
            return
        self._loading = False
        message = f"Cannot load the chat model: {user_message(exc)}"
        show_error(message)
        self.model_box.setChecked(True)
        self._refresh(message)

    @_unless_deleted
    def _loaded(self, serial: int, key: tuple, result) -> None:
        from napari.utils.notifications import show_info

        if serial != self._load_serial:  # the slide or folder changed while loading
            return
        self._loading = False
        engine, self._conversation = result
        self._engine = (key, engine)
        base = self.generation or engine.config.generation
        self.max_tokens.setValue(base.max_new_tokens)
        self.sample.setChecked(base.do_sample)
        visual = self._conversation.visual
        llm = type(engine.llm).__name__
        keep = engine.config.history_turns
        memory = ("" if keep is None else " Each question is answered from the slide alone." if keep == 0 else
                  f" Each question is answered with the last {keep} exchange{'s' * (keep > 1)}.")
        self._refresh(f"Chatting about <b>{Path(self._analysis.slide_path).name}</b> with {key[0].name} "
                      f"({llm}, {engine.device.type}, {len(visual)} visual tokens).{memory}")
        if self._conversation.notice:
            show_info(self._conversation.notice)

    @_unless_deleted
    def _load_ended(self, serial: int) -> None:
        if serial == self._load_serial and self._loading:  # cancelled from napari's task list: no result came
            self._loading = False
            self._refresh("Loading the chat model was cancelled; pick the chat folder again to retry.")

    # ------------------------------------------------------------------------------------------ asking
    def settings(self) -> GenerationSettings:
        """The generation settings of the next answer: the base settings with the dock's controls applied."""
        base = self.generation or (self._engine[1].config.generation if self._engine else GenerationSettings())
        return dataclasses.replace(base, max_new_tokens=self.max_tokens.value(), do_sample=self.sample.isChecked())

    def send(self, text: str | None = None, choice: tuple | None = None) -> bool:
        """Ask `text` (default: the input line; for a multiple-choice question the prompt shown, with `choice` its
        (question, options)). Returns whether an answer started."""
        from napari.utils.notifications import show_info

        from_input = text is None or text is False  # Qt's clicked(bool) passes False
        text = (self.question.text() if from_input else text).strip()
        if self._conversation is None:
            show_info(NO_SLIDE_HINT if self._analysis is None else self.status.text())
            return False
        if self.busy:
            show_info("An answer is still being generated: press Stop or wait for it.")
            return False
        if not text:
            show_info("Type a question about the slide first.")
            return False
        region, shown = None, text
        if choice is None and getattr(self._conversation, "needs_region", lambda _: False)(text):
            region = self.region_source() if self.region_source is not None else None
            if region is None:
                show_info("Draw a rectangle or polygon over the slide on a Shapes layer and select it (or select a "
                          "Localize box), then ask again: the question is about that region.")
                return False
            shown = f"{text}\n(about the region {_region_text(region)})"
        elif choice is not None:  # the question and its options as typed, without the instruction the engine adds
            question, options = choice
            shown = "\n".join([question.strip()] + [f"{k}. {v.strip()}" for k, v in options.items() if v.strip()])
        if from_input:
            self.question.clear()
        user, answer = Turn(USER, shown), Turn(ASSISTANT, "", streaming=True)
        self._turns += [user, answer]
        self._stop = stop = threading.Event()
        self.destroyed.connect(stop.set)  # a closed dock stops its answer
        self._worker = run_in_background(_answer, self._conversation, text, self.settings(), stop, choice, region,
                                         on_yielded=lambda piece: self._piece(answer, piece),
                                         on_done=lambda result: self._finished(answer, result),
                                         on_error=lambda exc: self._failed(user, answer, exc),
                                         on_finished=lambda: self._idle(answer))
        self._refresh()
        self._render()
        return True

    def describe(self) -> bool:
        """Ask for the slide's caption (the chat folder's caption prompt)."""
        if self._conversation is None:
            return self.send("")  # explains why nothing happens
        return self.send(self._conversation.engine.config.caption_prompt)

    def ask_choice(self) -> bool:
        """Multiple-choice question from the form: the prompt lists the options and asks for the letter first."""
        from napari.utils.notifications import show_info

        if self._conversation is None:
            return self.send("")
        options = {letter: edit.text() for letter, edit in self.choice_options.items()}
        try:
            prompt = self._conversation.choice_prompt(self.choice_question.text(), options)
        except PathflipError as exc:
            show_info(str(exc))
            return False
        return self.send(prompt, choice=(self.choice_question.text(), options))

    def stop(self) -> None:
        """Stop the answer being generated; the part already streamed stays in the transcript, marked stopped."""
        self._stop.set()

    @_unless_deleted
    def _piece(self, turn: Turn, item) -> None:
        piece, turn.citations = item
        turn.text += piece
        if turn in self._turns:
            self.streamed.emit(piece)
            if not self._render_timer.isActive():
                self._render_timer.start()

    @_unless_deleted
    def _finished(self, turn: Turn, result) -> None:
        from napari.utils.notifications import show_info

        turn.streaming = False
        current = turn in self._turns
        turn.text = result.text  # the final decode (the stream may end inside a multi-byte character)
        turn.ending = result.finish_reason if result.finish_reason in ENDINGS else ""
        turn.citations, turn.report = list(result.citations), result.report
        if result.option_scores:
            turn.note = ranking_note(result.option_scores)
        notice = (result.notice or "").replace(self._conversation.notice or "", "").strip() \
            if self._conversation is not None else ""
        if notice and current:
            show_info(notice)
        if current:
            self.answered.emit(result)

    @_unless_deleted
    def _failed(self, user: Turn, turn: Turn, exc: Exception) -> None:
        from napari.utils.notifications import show_error

        turn.streaming = False
        if turn in self._turns:  # the question was not answered: take it back to the input line to edit it
            self._turns = [t for t in self._turns if t is not user and t is not turn]
            if not self.question.text():
                self.question.setText(user.text)
        show_error(user_message(exc))

    @_unless_deleted
    def _idle(self, turn: Turn) -> None:
        """The answer's worker ended (after `_finished`, or without a result when cancelled from napari's task list)."""
        self._worker = None
        if turn.streaming:
            turn.streaming, turn.ending = False, "cancelled"
        if self._reset_when_idle and self._conversation is not None:
            self._conversation.reset()
        self._reset_when_idle = False
        self._render()
        self._refresh()

    # -------------------------------------------------------------------------------------- transcript
    def _clear_turns(self) -> None:
        self._turns = []
        self._render()

    def new_chat(self) -> None:
        """Forget the conversation (history and transcript); the model and the slide stay loaded."""
        if self.busy:
            self.stop()
            self._reset_when_idle = True  # the answer may still land in the history while it stops
        elif self._conversation is not None:
            self._conversation.reset()
        self._clear_turns()
        self._refresh()

    def transcript_markdown(self, header: bool = True) -> str:
        """The conversation as Markdown; with `header`, a title naming the slide, the models and the date."""
        body = turns_markdown(self._turns)
        if not header:
            return body
        lines = ["# PathFLIP chat", ""]
        if self._analysis is not None:
            lines.append(f"- Slide: `{self._analysis.slide_path}`")
            lines.append(f"- PathFLIP weights: `{self._analysis.weights}`")
        if self.chat_folder() is not None:
            lines.append(f"- Chat model: `{self.chat_folder()}`" + (f", LLM `{self._llm_folder}`"
                                                                     if self._llm_folder else ""))
        lines += [f"- Saved: {datetime.now().isoformat(timespec='seconds')}", "", body]
        return "\n".join(lines)

    def copy_transcript(self) -> None:
        from napari.utils.notifications import show_info

        QApplication.clipboard().setText(self.transcript_markdown())
        show_info("Transcript copied to the clipboard (Markdown).")

    def transcript_json(self) -> dict:
        """The conversation with every answer's citations (evidence, boxes in level-0 px) and reports."""
        turns = []
        for turn in self._turns:
            entry = {"role": "user" if turn.role == USER else "assistant", "text": turn.text}
            if turn.citations:
                entry["citations"] = [c.to_json() for c in turn.citations]
            if turn.report is not None:
                entry["report"] = turn.report.to_json()
            turns.append(entry)
        slide = self._analysis.slide_path if self._analysis is not None else None
        weights = self._analysis.weights.id if self._analysis is not None else None
        return {"slide": slide, "weights": weights, "chat": str(self.chat_folder()),
                "saved": datetime.now().isoformat(timespec="seconds"), "turns": turns}

    def cited_annotations(self) -> list:
        """The boxes of every finding the answers cite, as QuPath annotations (classification: the finding)."""
        from ..chat.grounded import cited_annotations

        return cited_annotations(c for turn in self._turns for c in turn.citations)

    def save_transcript(self, path: str | Path | None = None) -> Path | None:
        """Write the transcript to `path` (asks for a file name when None) by its suffix: .md (Markdown, each answer
        with its evidence), .json (turns with citations and reports) or .geojson (the cited boxes as QuPath
        annotations); returns the path written."""
        import json

        from napari.utils.notifications import show_error, show_info

        from ..heatmap import save_geojson

        if path is None:
            stem = Path(self._analysis.slide_path).stem if self._analysis is not None else "chat"
            path, _ = QFileDialog.getSaveFileName(self, "Save the chat transcript", f"{stem}-chat.md",
                                                  "Markdown (*.md);;JSON with evidence (*.json);;"
                                                  "Cited boxes for QuPath (*.geojson)")
            if not path:
                return None
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".md", ".markdown", ".json", ".geojson"):
            path, suffix = path.with_name(path.name + ".md"), ".md"
        try:
            if suffix == ".json":
                path.write_text(json.dumps(self.transcript_json(), indent=2) + "\n", encoding="utf-8")
            elif suffix == ".geojson":
                annotations = self.cited_annotations()
                if not annotations:
                    show_info("No answer cites a finding with boxes yet: ask where a finding is, then save.")
                    return None
                save_geojson(path, annotations)
            else:
                path.write_text(self.transcript_markdown(), encoding="utf-8")
        except OSError as exc:
            show_error(f"Cannot save the transcript to {path}: {exc}. Pick another folder.")
            return None
        show_info(f"Transcript saved to {path}")
        return path

    def _link(self, url) -> None:
        """A link clicked in the transcript: a citation shows its evidence (`cited`), others open in the browser."""
        from qtpy.QtGui import QDesktopServices

        if url.scheme() != "cite":
            QDesktopServices.openUrl(url)
            return
        try:
            turn, number = (int(v) for v in url.path().split(":"))
            evidence = self._turns[turn].citations[number].evidence
        except (ValueError, IndexError):
            return
        self.cited.emit(evidence)

    def _colour_links(self) -> None:
        """Cited findings in LINK_COLOUR: the Markdown renderer gives links Qt's dark blue, unreadable on napari's
        dark theme, and takes no style sheet."""
        document = self.transcript.document()
        colour = QTextCharFormat()
        colour.setForeground(QColor(LINK_COLOUR))
        block = document.begin()
        while block.isValid():
            fragments = block.begin()
            while not fragments.atEnd():
                fragment = fragments.fragment()
                if fragment.charFormat().isAnchor():
                    cursor = QTextCursor(document)
                    cursor.setPosition(fragment.position())
                    cursor.setPosition(fragment.position() + fragment.length(), QTextCursor.MoveMode.KeepAnchor)
                    cursor.mergeCharFormat(colour)
                fragments += 1
            block = block.next()

    def _render(self) -> None:
        bar = self.transcript.verticalScrollBar()
        follow, position = self._follow, bar.value()
        self.transcript.setMarkdown(turns_markdown(self._turns, cursor=True, links=True) if self._turns else "")
        self._colour_links()
        bar.setValue(bar.maximum() if follow else position)  # follow the answer unless the user scrolled up
        self._follow = follow
