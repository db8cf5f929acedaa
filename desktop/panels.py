"""Side panels: conversations and search, generation settings with the model picker, expert load."""
from __future__ import annotations

from PySide6.QtCore import QRectF, Qt, Signal
from PySide6.QtGui import QColor, QPainter
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLineEdit,
                               QListWidget, QListWidgetItem, QPlainTextEdit, QPushButton, QSpinBox, QVBoxLayout,
                               QWidget)

from desktop.chat import model_name

WEIGHT_CHOICES = [("Full precision", "none"), ("int8 (weight-only)", "int8"), ("int4 (weight-only, group 64)", "int4")]
SPECULATION_CHOICES = [("Off", "off", "auto"), ("MTP, auto", "mtp", "auto"), ("MTP, k=1", "mtp", 1),
                       ("MTP, k=2", "mtp", 2), ("MTP, k=3", "mtp", 3), ("MTP, k=4", "mtp", 4),
                       ("Prompt lookup", "lookup", "auto"), ("Draft model", "draft", "auto")]


class Sidebar(QWidget):
    sig_new = Signal()
    sig_open = Signal(str)
    sig_search = Signal(str)
    sig_context = Signal(str, object)  # conversation id, global position
    sig_import = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        row = QHBoxLayout()
        self.new_button = QPushButton("New chat")
        self.new_button.setAccessibleName("new chat")
        self.new_button.clicked.connect(self.sig_new)
        row.addWidget(self.new_button)
        imp = QPushButton("Import…")
        imp.setAccessibleName("import a conversation")
        imp.clicked.connect(self.sig_import)
        row.addWidget(imp)
        lay.addLayout(row)
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search all messages")
        self.search.setAccessibleName("search messages")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(self.sig_search)
        lay.addWidget(self.search)
        self.list = QListWidget()
        self.list.setAccessibleName("conversations")
        self.list.setTextElideMode(Qt.ElideRight)  # the full title is in the tooltip; the sidebar resizes
        self.list.setWordWrap(False)
        self.list.setUniformItemSizes(True)
        self.list.setContextMenuPolicy(Qt.CustomContextMenu)
        self.list.itemActivated.connect(lambda it: self.sig_open.emit(it.data(Qt.UserRole)))
        self.list.itemClicked.connect(lambda it: self.sig_open.emit(it.data(Qt.UserRole)))
        self.list.customContextMenuRequested.connect(self._context)
        lay.addWidget(self.list)

    def show_items(self, items: list[tuple[str, str, str]], current: str | None) -> None:
        """items: (conversation id, title, tooltip); the row of `current` (the open chat) is selected."""
        self.list.blockSignals(True)
        self.list.clear()
        self.list.clearSelection()
        for cid, title, tip in items:
            it = QListWidgetItem(title)
            it.setData(Qt.UserRole, cid)
            it.setToolTip(tip)
            self.list.addItem(it)
            if cid == current:
                self.list.setCurrentItem(it)
        self.list.blockSignals(False)

    def _context(self, pos) -> None:
        it = self.list.itemAt(pos)
        if it is not None:
            self.sig_context.emit(it.data(Qt.UserRole), self.list.mapToGlobal(pos))


OPEN_FOLDER, OPEN_GGUF = "", "?gguf"


WEIGHTS_TIP = "Quantize the model's weights while loading: less memory, faster decoding"


class SettingsPanel(QWidget):
    sig_changed = Signal()
    sig_model_chosen = Signal(str)  # a path, or OPEN_FOLDER / OPEN_GGUF to open a dialog
    sig_draft_requested = Signal()  # choose the draft .gguf
    sig_compare = Signal()
    sig_history = Signal()

    def __init__(self, settings, parent=None):
        super().__init__(parent)
        outer = QVBoxLayout(self)
        form = QFormLayout()
        outer.addLayout(form)
        outer.addStretch(1)
        self.model = QComboBox()
        self.model.setAccessibleName("model")
        self.model.activated.connect(self._model_activated)
        form.addRow("Model", self.model)
        self.weights = QComboBox()
        self.weights.setAccessibleName("weight quantization")
        self.weights.setToolTip(WEIGHTS_TIP)
        for label, value in WEIGHT_CHOICES:
            self.weights.addItem(label, value)
        self.weights.setCurrentIndex(next((i for i, (_, v) in enumerate(WEIGHT_CHOICES) if v == settings.quant), 0))
        self.weights.currentIndexChanged.connect(self.sig_changed)
        form.addRow("Weights", self.weights)
        self.system = QPlainTextEdit(settings.system_prompt)
        self.system.setAccessibleName("system prompt")
        self.system.setFixedHeight(70)
        self.system.textChanged.connect(self.sig_changed)
        form.addRow("System prompt", self.system)
        self.temperature = self._spin(QDoubleSpinBox(), 0, 2, settings.temperature, "temperature", 0.1)
        form.addRow("Temperature", self.temperature)
        self.top_p = self._spin(QDoubleSpinBox(), 0.01, 1, settings.top_p, "top p", 0.05)
        form.addRow("Top-p", self.top_p)
        self.max_tokens = self._spin(QSpinBox(), 1, 32768, settings.max_tokens, "maximum tokens", 64)
        form.addRow("Max tokens", self.max_tokens)
        self.seed = self._spin(QSpinBox(), 0, 2**31 - 1, settings.seed, "seed", 1)
        form.addRow("Seed", self.seed)
        self.speculation = QComboBox()
        self.speculation.setAccessibleName("speculative decoding")
        self.speculation.currentIndexChanged.connect(self.sig_changed)
        self.chosen_speculation = (settings.speculative, settings.k)  # kept while a model lacks that mode
        form.addRow("Speculation", self.speculation)
        draft_row = QHBoxLayout()
        self.draft = QLineEdit(settings.draft_model)
        self.draft.setReadOnly(True)
        self.draft.setPlaceholderText("a smaller .gguf with the same vocabulary")
        self.draft.setAccessibleName("draft model file")
        draft_row.addWidget(self.draft, 1)
        choose_draft = QPushButton("Choose…")
        choose_draft.setAccessibleName("choose the draft model")
        choose_draft.clicked.connect(self.sig_draft_requested)
        draft_row.addWidget(choose_draft)
        self.draft_row = QWidget()
        self.draft_row.setLayout(draft_row)
        draft_row.setContentsMargins(0, 0, 0, 0)
        form.addRow("Draft model", self.draft_row)
        self.form = form
        self.show_speculation(["off", "mtp", "lookup", "draft"])
        self.color = QCheckBox("Colour tokens from accepted drafts")
        self.color.setAccessibleName("colour accepted draft tokens")
        self.color.setChecked(settings.color_accepted)
        self.color.toggled.connect(self.sig_changed)
        form.addRow(self.color)
        self.compare_button = QPushButton("Compare speed: speculation off vs on")
        self.compare_button.setAccessibleName("compare speed with speculation off and on")
        self.compare_button.clicked.connect(self.sig_compare)
        form.addRow(self.compare_button)
        history = QPushButton("Comparison history…")
        history.setAccessibleName("comparison history")
        history.clicked.connect(self.sig_history)
        form.addRow(history)

    def _spin(self, w, lo, hi, value, name, step):
        w.setRange(lo, hi)
        w.setSingleStep(step)
        w.setValue(value)
        w.setAccessibleName(name)
        w.valueChanged.connect(self.sig_changed)
        return w

    def show_weights(self, backend: str) -> None:
        """Quantizing while loading is the native engine's: a GGUF carries its own types, a server its own."""
        self.weights.setEnabled(backend == "native")
        self.weights.setToolTip(WEIGHTS_TIP if backend == "native" else f"Set by the {backend} model itself")

    def show_speculation(self, modes: list[str]) -> None:
        """Offer only the modes the loaded model has (MTP for native models, lookup and draft for GGUF)."""
        self.speculation.blockSignals(True)
        self.speculation.clear()
        for label, mode, k in SPECULATION_CHOICES:
            if mode in modes:
                self.speculation.addItem(label, (mode, k))
        mode, k = self.chosen_speculation
        index = next((i for i in range(self.speculation.count())
                      if self.speculation.itemData(i)[0] == mode and (mode != "mtp" or self.speculation.itemData(i)[1] == k)),
                     0)
        self.speculation.setCurrentIndex(index)
        self.speculation.blockSignals(False)
        self.form.setRowVisible(self.draft_row, "draft" in modes)

    def set_draft(self, path: str) -> None:
        self.draft.setText(path)
        self.sig_changed.emit()

    def apply_to(self, s) -> None:
        s.system_prompt = self.system.toPlainText()
        s.temperature, s.top_p = self.temperature.value(), self.top_p.value()
        s.max_tokens, s.seed = self.max_tokens.value(), self.seed.value()
        if self.speculation.currentData() is not None:
            s.speculative, s.k = self.chosen_speculation = self.speculation.currentData()
        s.draft_model = self.draft.text()
        s.color_accepted = self.color.isChecked()
        s.quant = self.weights.currentData()

    def show_models(self, paths: list[str], current: str | None) -> None:
        self.model.blockSignals(True)
        self.model.clear()
        for p in paths:
            self.model.addItem(model_name(p), p)
            self.model.setItemData(self.model.count() - 1, p, Qt.ToolTipRole)
        self.model.addItem("Open model folder…", OPEN_FOLDER)
        self.model.addItem("Open .gguf file…", OPEN_GGUF)
        if current in paths:
            self.model.setCurrentIndex(paths.index(current))
        self.model.blockSignals(False)

    def _model_activated(self, index: int) -> None:
        self.sig_model_chosen.emit(self.model.itemData(index))


class ExpertLoadView(QWidget):
    """A heatmap: one row per MoE layer, one column per expert, shade = tokens routed there."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.load: list[list[int]] = []
        self.setMinimumHeight(140)
        self.setAccessibleName("expert load per layer")

    def show_load(self, load: list[list[int]]) -> None:
        self.load = load or []
        total = sum(map(sum, self.load))
        self.setToolTip(f"{len(self.load)} MoE layers, {total} routed token choices in the last reply")
        self.update()

    def paintEvent(self, e) -> None:
        p = QPainter(self)
        p.fillRect(self.rect(), self.palette().base())
        if not self.load:
            p.drawText(self.rect(), Qt.AlignCenter, "Expert load appears after a reply")
            return
        rows, cols = len(self.load), max(len(r) for r in self.load)
        left, top = 28, 4
        cw, ch = (self.width() - left - 4) / cols, (self.height() - top - 4) / rows
        peak = max(max(r) for r in self.load) or 1
        for i, row in enumerate(self.load):
            p.drawText(QRectF(0, top + i * ch, left - 4, ch), Qt.AlignRight | Qt.AlignVCenter, str(i + 1))
            for j, v in enumerate(row):
                shade = int(255 * v / peak)
                p.fillRect(QRectF(left + j * cw, top + i * ch, cw - 1, ch - 1), QColor(255 - shade // 2, 240 - shade, 255 - shade // 3))
        p.end()


class ServerDialog(QDialog):
    """Model → Connect to a server…: an OpenAI-compatible server's URL (recent ones offered), the model
    (empty: the server's first) and the environment variable holding its API key. Plain http to
    another machine needs the box ticked. It only collects the choice: `chosen()` after exec()."""

    def __init__(self, recent: list[dict], parent=None):
        super().__init__(parent)
        self.setWindowTitle("Connect to a server")
        self.recent = recent
        self.url = QComboBox()
        self.url.setEditable(True)
        self.url.addItems([r["url"] for r in recent] or ["http://127.0.0.1:8000/v1"])
        self.url.setAccessibleName("server URL")
        self.model = QLineEdit()
        self.model.setPlaceholderText("the server's first model")
        self.key_source = QComboBox()
        self.key_source.addItems(["No key", "Environment variable", "OS keyring"])
        self.key_env = QLineEdit()
        self.key_env.setPlaceholderText("e.g. OPENAI_API_KEY")
        self.key_env.setToolTip("The name of an environment variable holding the API key: moedesk reads the key "
                                "from it when connecting and never stores it")
        self.key = QLineEdit()
        self.key.setEchoMode(QLineEdit.Password)
        self.key.setPlaceholderText("stored in the OS keyring; empty: the one stored before")
        self.insecure = QCheckBox("Allow plain http to another machine (the conversation travels unencrypted)")
        form = QFormLayout(self)
        form.addRow("Server URL", self.url)
        form.addRow("Model", self.model)
        form.addRow("API key", self.key_source)
        form.addRow("Variable", self.key_env)
        form.addRow("Key", self.key)
        self.key_source.currentIndexChanged.connect(self.show_key_fields)
        form.addRow(self.insecure)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.button(QDialogButtonBox.Ok).setText("Connect")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)
        self.url.currentTextChanged.connect(self.fill_from_recent)
        self.fill_from_recent(self.url.currentText())
        self.show_key_fields()

    def show_key_fields(self) -> None:
        self.key_env.setEnabled(self.key_source.currentIndex() == 1)
        self.key.setEnabled(self.key_source.currentIndex() == 2)

    def fill_from_recent(self, url: str) -> None:
        known = next((r for r in self.recent if r["url"] == url), None)
        if known:
            self.model.setText(known.get("model") or "")
            self.key_env.setText(known.get("api_key_env") or "")
            self.key_source.setCurrentIndex(2 if known.get("api_key_keyring") else 1 if known.get("api_key_env") else 0)
            self.insecure.setChecked(bool(known.get("allow_insecure")))

    def chosen(self) -> dict:
        source = self.key_source.currentIndex()
        return {"url": self.url.currentText().strip(), "model": self.model.text().strip() or None,
                "api_key_env": (self.key_env.text().strip() or None) if source == 1 else None,
                "api_key_keyring": source == 2, "key": (self.key.text() or None) if source == 2 else None,
                "allow_insecure": self.insecure.isChecked()}
