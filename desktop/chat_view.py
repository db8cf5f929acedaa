"""The conversation view and the composer. They display and emit; ChatSession decides."""
from __future__ import annotations

import itertools
import json
import re
import time

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QColor, QGuiApplication, QSyntaxHighlighter, QTextCharFormat, QTextCursor, QTextDocument, QTextFormat
from PySide6.QtWidgets import (QFrame, QHBoxLayout, QLabel, QPlainTextEdit, QPushButton, QScrollArea, QSizePolicy,
                               QTextBrowser, QVBoxLayout, QWidget)

MARKDOWN = QTextDocument.MarkdownDialectGitHub | QTextDocument.MarkdownNoHTML  # model output is never live HTML
STREAM_HEADROOM_PX = 96  # a streaming reply's room for the next lines
MARKDOWN_EVERY_S = 0.5  # a streaming reply in Markdown mode is re-rendered at most this often
FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
PY_KEYWORDS = r"\b(def|class|return|import|from|as|if|elif|else|for|while|try|except|finally|with|yield|lambda|None|True|False|and|or|not|in|is|pass|raise|async|await)\b"


class CodeHighlighter(QSyntaxHighlighter):
    """Colours keywords, strings, numbers and comments inside fenced code blocks only."""

    RULES = [(PY_KEYWORDS, "#c678dd"), (r"\b\d+(\.\d+)?\b", "#d19a66"), (r"(\"[^\"]*\"|'[^']*')", "#98c379"),
             (r"#.*$", "#7f848e")]

    def __init__(self, doc: QTextDocument):
        super().__init__(doc)
        self.rules = []
        for pattern, color in self.RULES:
            fmt = QTextCharFormat()
            fmt.setForeground(QColor(color))
            self.rules.append((re.compile(pattern), fmt))

    def highlightBlock(self, text: str) -> None:
        if not self.currentBlock().blockFormat().hasProperty(QTextFormat.BlockCodeFence):
            return
        for rx, fmt in self.rules:
            for m in rx.finditer(text):
                self.setFormat(m.start(), m.end() - m.start(), fmt)


def stats_line(stats: dict) -> str:
    """What users compare, under each reply."""
    parts = []
    if stats.get("time_to_first_token_s") is not None:
        parts.append(f"first token {stats['time_to_first_token_s']:.2f} s")
    if stats.get("decode_tokens_per_s"):
        parts.append(f"{stats['decode_tokens_per_s']:.1f} tok/s")
    if stats.get("generated_tokens") is not None:
        parts.append(f"{stats['generated_tokens']} tokens")
    if stats.get("acceptance_rate") is not None:
        parts.append(f"acceptance {100 * stats['acceptance_rate']:.0f}%")
    if stats.get("mean_accepted_length"):
        parts.append(f"{stats['mean_accepted_length']:.2f} tokens/step")
    if stats.get("expert_bytes_per_token"):  # the routed experts' weights each token cost to read
        parts.append(f"experts {stats['expert_bytes_per_token'] / 2**20:.2f} MiB/token")
    return " · ".join(parts)


class MessageWidget(QFrame):
    """One message. A streaming reply grows by `append`, which costs only the new text: pieces are
    inserted at the end (coloured when they came from accepted drafts); in Markdown mode the whole
    reply is re-rendered only now and then, so that rendering never takes more than ~5% of the time."""
    sig_copy = Signal(str)
    sig_regenerate = Signal(str)
    sig_continue = Signal(str)
    sig_edit = Signal(str)
    sig_version = Signal(str, int)

    def __init__(self, message: dict, version: tuple[int, int], color_accepted: bool, can_continue: bool = False,
                 parent=None):
        super().__init__(parent)
        self.message = message
        self.color_accepted = color_accepted
        self.setObjectName("assistantMessage" if message["role"] == "assistant" else "userMessage")
        self.setFrameShape(QFrame.StyledPanel)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(10, 6, 10, 6)
        head = QHBoxLayout()
        role = QLabel(f"<b>{'You' if message['role'] == 'user' else 'Assistant'}</b>")
        head.addWidget(role)
        if message.get("status") not in (None, "complete"):
            badge = QLabel(message["status"])
            badge.setObjectName("statusBadge")
            badge.setAccessibleName(f"status {message['status']}")
            head.addWidget(badge)
        head.addStretch(1)
        i, n = version
        if n > 1:
            self._button(head, "‹", "previous version", lambda: self.sig_version.emit(message["id"], -1))
            head.addWidget(QLabel(f"{i + 1}/{n}"))
            self._button(head, "›", "next version", lambda: self.sig_version.emit(message["id"], +1))
        self._button(head, "Copy", "copy message", lambda: self.sig_copy.emit(self.message["content"]))
        if FENCE.search(message["content"] or ""):
            self._button(head, "Copy code", "copy the code block",
                         lambda: self.sig_copy.emit(FENCE.findall(self.message["content"])[-1]))
        if message["role"] == "assistant":
            if can_continue:
                self._button(head, "Continue", "continue this reply from where it stopped",
                             lambda: self.sig_continue.emit(message["id"]))
            self._button(head, "Regenerate", "regenerate this reply", lambda: self.sig_regenerate.emit(message["id"]))
        else:
            self._button(head, "Edit", "edit and resend", lambda: self.sig_edit.emit(message["id"]))
        lay.addLayout(head)
        self.body = QTextBrowser()
        self.body.setOpenLinks(False)
        self.body.setFrameShape(QFrame.NoFrame)
        self.body.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.body.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.body.setAccessibleName(f"{message['role']} message text")
        self.highlighter = CodeHighlighter(self.body.document())
        # The text edit wraps at its own width; the widget is as tall as the laid-out text, whenever
        # either changes (appended text, a new width).
        self.body.document().documentLayout().documentSizeChanged.connect(self.fit_height)
        lay.addWidget(self.body)
        self.stats = QLabel(stats_line(message.get("stats") or {}))
        self.stats.setObjectName("statsLine")
        self.stats.setAccessibleName("reply statistics")
        if message["role"] == "assistant":
            lay.addWidget(self.stats)
        self.accepted_format = QTextCharFormat()
        self.accepted_format.setBackground(QColor(120, 200, 120, 90))
        self.plain_format = QTextCharFormat()
        self.placeholder = False
        self.markdown = False
        self.rendered_at, self.render_cost = 0.0, 0.0
        self.render((message.get("stats") or {}).get("accepted_spans", []))

    def _button(self, layout, text, name, slot) -> None:
        b = QPushButton(text)
        b.setFlat(True)
        b.setAccessibleName(name)
        b.setToolTip(name)
        b.clicked.connect(slot)
        layout.addWidget(b)

    def render(self, accepted_spans=()) -> None:
        """Draw the whole text: plain with the accepted spans coloured, or as Markdown."""
        t0 = time.perf_counter()
        text = self.message["content"] or ""
        self.placeholder = not text
        self.markdown = not self.color_accepted and not self.placeholder
        if self.placeholder:
            self.body.setPlainText("…")
        elif self.markdown:
            self.body.document().setMarkdown(text, MARKDOWN)
        else:
            self.body.setPlainText(text)  # token colouring works on the raw text
            cur = QTextCursor(self.body.document())
            for a, b in accepted_spans:
                cur.setPosition(min(a, len(text)))
                cur.setPosition(min(b, len(text)), QTextCursor.KeepAnchor)
                cur.mergeCharFormat(self.accepted_format)
        self.rendered_at, self.render_cost = time.monotonic(), time.perf_counter() - t0

    def append(self, pieces: list[tuple[str, bool]]) -> None:
        """Streamed text: (text, from an accepted draft) pieces, appended in order."""
        added = "".join(text for text, _ in pieces)
        if not added:
            return
        if self.placeholder:
            self.body.clear()
            self.placeholder = False
        cur = QTextCursor(self.body.document())
        cur.movePosition(QTextCursor.End)
        for accepted, run in itertools.groupby(pieces, key=lambda p: p[1] and self.color_accepted):
            cur.insertText("".join(text for text, _ in run), self.accepted_format if accepted else self.plain_format)
        self.message["content"] = (self.message["content"] or "") + added
        if not self.color_accepted and time.monotonic() - self.rendered_at > max(MARKDOWN_EVERY_S, 20 * self.render_cost):
            self.render()

    def fit_height(self, *_) -> None:
        height = int(self.body.document().size().height()) + 8
        if self.message.get("status") == "streaming":
            # Grow in steps of a few lines: a new height re-lays out and repaints the whole view and
            # moves the scroll range; between steps an update repaints only the new text.
            if height <= self.body.height():
                return
            height += STREAM_HEADROOM_PX
        if height != self.body.height():
            self.body.setFixedHeight(height)


class ChatView(QScrollArea):
    """The active branch of a conversation, one MessageWidget per message. Redrawing keeps the widgets
    of unchanged messages, so a reply that starts or ends rebuilds one widget, not the whole chat."""
    sig_regenerate = Signal(str)
    sig_continue = Signal(str)
    sig_edit = Signal(str)
    sig_version = Signal(str, int)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setAccessibleName("conversation")
        self.inner = QWidget()
        self.column = QVBoxLayout(self.inner)
        self.column.addStretch(1)
        self.setWidget(self.inner)
        self.widgets: dict[str, MessageWidget] = {}
        self.keys: dict[str, tuple] = {}
        # Stick to the bottom while the user is there: growing text, a new reply or a banner above keep
        # the newest line in view; scrolling up to read stops following until back at the end.
        self.follow = True
        bar = self.verticalScrollBar()
        bar.rangeChanged.connect(lambda lo, hi: self.follow and bar.setValue(hi))
        bar.valueChanged.connect(lambda v: setattr(self, "follow", v >= bar.maximum() - 40))

    def show_thread(self, messages: list[dict], versions, color_accepted: bool, can_continue=lambda m: False) -> None:
        while self.column.count() > 1:
            self.column.takeAt(0)
        old, self.widgets, old_keys, self.keys = self.widgets, {}, self.keys, {}
        for m in messages:
            key = (m["content"], m.get("status"), json.dumps(m.get("stats") or {}, sort_keys=True),
                   versions(m["id"]), color_accepted, can_continue(m))
            w = old.pop(m["id"], None)
            if w is None or old_keys.get(m["id"]) != key:
                if w is not None:
                    w.deleteLater()
                w = self.message_widget(m, key[3], color_accepted, key[5])
            self.column.insertWidget(self.column.count() - 1, w)
            self.widgets[m["id"]], self.keys[m["id"]] = w, key
        for w in old.values():
            w.deleteLater()
        self.follow = True
        self.scroll_to_end()

    def message_widget(self, m: dict, version, color_accepted: bool, can_continue: bool) -> MessageWidget:
        w = MessageWidget(dict(m), version, color_accepted, can_continue)
        w.sig_copy.connect(lambda text: QGuiApplication.clipboard().setText(text))
        w.sig_regenerate.connect(self.sig_regenerate)
        w.sig_continue.connect(self.sig_continue)
        w.sig_edit.connect(self.sig_edit)
        w.sig_version.connect(self.sig_version)
        return w

    def update_message(self, mid: str, pieces) -> None:
        w = self.widgets.get(mid)
        if w is not None:
            w.append(pieces)

    def scroll_to_end(self) -> None:
        self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())


class Composer(QPlainTextEdit):
    """Enter sends, Shift+Enter starts a new line."""
    sig_submit = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setPlaceholderText("Message the model — Enter to send, Shift+Enter for a new line, Esc to stop")
        self.setAccessibleName("message input")
        self.setFixedHeight(84)

    def keyPressEvent(self, e) -> None:
        if e.key() in (Qt.Key_Return, Qt.Key_Enter) and not (e.modifiers() & Qt.ShiftModifier):
            text = self.toPlainText()
            if text.strip():
                self.sig_submit.emit(text)
            return
        super().keyPressEvent(e)
