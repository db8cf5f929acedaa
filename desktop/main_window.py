"""The main window: wires the panels and the chat view to the ChatSession; holds no state of its own."""
from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QDockWidget, QFileDialog, QFrame, QHBoxLayout, QInputDialog, QLabel, QMainWindow,
                               QMenu, QMessageBox, QProgressBar, QPushButton, QSplitter, QTabWidget, QVBoxLayout,
                               QWidget)

from dataclasses import replace

from desktop.chat import BUNDLED_MODEL, ChatSession
from desktop.chat_view import ChatView, Composer
from desktop.compare_view import CompareDialog, HistoryDialog
from desktop.panels import OPEN_FOLDER, OPEN_GGUF, ExpertLoadView, SettingsPanel, Sidebar


class Banner(QFrame):
    """An inline notice above the conversation, with a restart button when the worker died."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("banner")
        lay = QHBoxLayout(self)
        self.text = QLabel()
        self.text.setWordWrap(True)
        self.text.setTextFormat(Qt.PlainText)
        self.text.setAccessibleName("notice")
        lay.addWidget(self.text, 1)
        self.restart = QPushButton("Restart worker")
        self.restart.setAccessibleName("restart the model worker")
        lay.addWidget(self.restart)
        close = QPushButton("Dismiss")
        close.setAccessibleName("dismiss notice")
        close.clicked.connect(self.hide)
        lay.addWidget(close)
        self.hide()

    def show_notice(self, level: str, text: str) -> None:
        self.text.setText(text)
        self.restart.setVisible(level == "worker_died")
        self.setStyleSheet("#banner { background: %s; border-radius: 4px; }"
                           % ("#f8d7da" if level in ("error", "worker_died") else "#e2e3f5"))
        self.show()


class MainWindow(QMainWindow):
    def __init__(self, session: ChatSession):
        super().__init__()
        self.session = session
        self.setWindowTitle("moedesk")
        self.resize(1240, 780)
        self.sidebar = Sidebar()
        self.view = ChatView()
        self.composer = Composer()
        self.banner = Banner()
        self.settings = SettingsPanel(session.settings)
        self.experts = ExpertLoadView()
        self.build_layout()
        self.build_status_bar()
        self.build_actions()
        self.connect_signals()
        self.refresh_conversations()
        self.refresh_models()
        self.on_busy(False)
        if session.interrupted_at_start:
            self.banner.show_notice("info", f"{session.interrupted_at_start} reply(s) were cut off when moedesk last "
                                            "stopped; their text is kept and marked interrupted.")

    # ---- building ----

    def build_layout(self) -> None:
        center = QWidget()
        col = QVBoxLayout(center)
        col.addWidget(self.banner)
        col.addWidget(self.view, 1)
        row = QHBoxLayout()
        row.addWidget(self.composer, 1)
        buttons = QVBoxLayout()
        self.send_button = QPushButton("Send")
        self.send_button.setAccessibleName("send message")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setAccessibleName("stop generating")
        buttons.addWidget(self.send_button)
        buttons.addWidget(self.stop_button)
        row.addLayout(buttons)
        col.addLayout(row)
        split = QSplitter()
        split.addWidget(self.sidebar)
        split.addWidget(center)
        split.setSizes([250, 990])
        self.setCentralWidget(split)
        tabs = QTabWidget()
        tabs.addTab(self.settings, "Settings")
        tabs.addTab(self.experts, "Expert load")
        self.dock = QDockWidget("Settings", self)
        self.dock.setObjectName("settingsDock")
        self.dock.setWidget(tabs)
        self.addDockWidget(Qt.RightDockWidgetArea, self.dock)

    def build_status_bar(self) -> None:
        bar = self.statusBar()
        self.model_label = QLabel("No model")
        self.model_label.setAccessibleName("model status")
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(180)
        self.progress.setRange(0, 1000)
        self.progress.setAccessibleName("loading progress")
        self.progress.hide()
        self.speed_label = QLabel("")
        self.speed_label.setAccessibleName("live speed")
        self.worker_label = QLabel("worker: stopped")
        bar.addWidget(self.model_label, 1)
        bar.addPermanentWidget(self.progress)
        bar.addPermanentWidget(self.speed_label)
        bar.addPermanentWidget(self.worker_label)

    def build_actions(self) -> None:
        for text, keys, slot in (("New chat", QKeySequence.New, self.session.new_conversation),
                                 ("Search", QKeySequence.Find, self.sidebar.search.setFocus),
                                 ("Stop", Qt.Key_Escape, self.session.stop),
                                 ("Settings", QKeySequence("Ctrl+,"), self.toggle_settings),
                                 ("Compare speed", QKeySequence("Ctrl+Shift+C"), self.compare)):
            act = QAction(text, self)
            act.setShortcut(keys)
            act.triggered.connect(slot)
            self.addAction(act)

    def connect_signals(self) -> None:
        s = self.session
        self.sidebar.sig_new.connect(s.new_conversation)
        self.sidebar.sig_open.connect(s.open_conversation)
        self.sidebar.sig_search.connect(self.on_search)
        self.sidebar.sig_context.connect(self.conversation_menu)
        self.sidebar.sig_import.connect(self.import_conversation)
        self.composer.sig_submit.connect(self.submit)
        self.send_button.clicked.connect(lambda: self.submit(self.composer.toPlainText()))
        self.stop_button.clicked.connect(s.stop)
        self.view.sig_regenerate.connect(s.regenerate)
        self.view.sig_edit.connect(self.edit_message)
        self.view.sig_version.connect(s.switch_version)
        self.settings.sig_changed.connect(self.on_settings_changed)
        self.settings.sig_model_chosen.connect(self.choose_model)
        self.settings.sig_draft_requested.connect(self.choose_draft)
        self.settings.sig_compare.connect(self.compare)
        self.settings.sig_history.connect(self.show_history)
        self.banner.restart.clicked.connect(self.restart_worker)
        s.sig_conversations.connect(self.refresh_conversations)
        s.sig_thread.connect(self.refresh_thread)
        s.sig_stream.connect(self.view.update_message)
        s.sig_busy.connect(self.on_busy)
        s.sig_model.connect(self.on_model)
        s.sig_progress.connect(self.on_progress)
        s.sig_notice.connect(self.banner.show_notice)
        s.sig_live_speed.connect(lambda v: self.speed_label.setText(f"{v:.1f} tok/s"))
        s.sig_compare.connect(self.show_compare)
        s.sig_expert_load.connect(self.experts.show_load)
        s.worker.sig_state.connect(lambda st: self.worker_label.setText(f"worker: {st.value}"))

    # ---- reactions ----

    def refresh_conversations(self) -> None:
        items = [(c["id"], c["title"], "") for c in self.session.store.conversations()]
        self.sidebar.show_items(items, self.session.conversation_id)

    def refresh_thread(self) -> None:
        self.view.show_thread(self.session.thread(), self.session.versions, self.session.settings.color_accepted)
        self.refresh_conversations()

    def refresh_models(self) -> None:
        paths = [str(BUNDLED_MODEL)] + [p for p in self.session.store.get_setting("recent_models", [])
                                        if p != str(BUNDLED_MODEL)]
        self.settings.show_models(paths, self.session.model_path)

    def on_search(self, text: str) -> None:
        if not text.strip():
            self.refresh_conversations()
            return
        hits = self.session.store.search(text)
        seen, items = set(), []
        for h in hits:
            if h["conversation_id"] not in seen:
                seen.add(h["conversation_id"])
                items.append((h["conversation_id"], f"{h['title']} — {h['snippet']}", h["snippet"]))
        self.sidebar.show_items(items, None)

    def submit(self, text: str) -> None:
        if self.session.busy():
            return
        if self.session.send(text):
            self.composer.clear()

    def on_busy(self, busy: bool) -> None:
        self.stop_button.setEnabled(busy)
        self.send_button.setEnabled(not busy)
        self.settings.compare_button.setEnabled(not busy)

    def on_model(self, info: dict | None) -> None:
        self.progress.hide()
        if info is None:
            self.model_label.setText("No model loaded")
            return
        mem = info.get("memory_bytes")
        mtp = f", {info['mtp_modules']} MTP modules" if info.get("mtp_modules") else ""
        quant = f" · {info['quantization']}" if info.get("quantization") else ""
        draft = f" · draft {info['draft']}" if info.get("draft") else ""
        params = f" · {info['parameters'] / 1e6:.1f}M params" if info.get("parameters") else ""
        where = " · ".join(str(info[k]) for k in ("device", "dtype") if info.get(k))
        self.model_label.setText(f"{info['name']} · {info['backend']}" + (f" · {where}" if where else "")
                                 + f"{quant}{mtp}{draft}{params}" + (f" · {mem / 2**20:.0f} MiB" if mem else ""))
        self.settings.show_speculation(self.session.speculative_modes())
        self.refresh_models()

    def on_progress(self, stage: str, fraction: float) -> None:
        self.progress.show()
        self.progress.setValue(int(1000 * fraction))
        self.progress.setFormat(f"{stage} %p%")

    def on_settings_changed(self) -> None:
        old = replace(self.session.settings)
        self.settings.apply_to(self.session.settings)
        if self.session.settings.speculative == "draft" and not self.session.settings.draft_model:
            self.choose_draft()  # the mode needs a file; choosing it comes back here
            return
        self.session.save_settings()
        if self.session.needs_reload(old):
            self.session.load_model(self.session.model_path)  # quantized while loading; the draft loads beside

    def choose_model(self, path: str) -> None:
        if path == OPEN_FOLDER:
            path = QFileDialog.getExistingDirectory(self, "Open a model folder (config.json + safetensors)")
        elif path == OPEN_GGUF:
            path, _ = QFileDialog.getOpenFileName(self, "Open a GGUF model", "", "GGUF models (*.gguf)")
        if not path:
            self.refresh_models()
            return
        self.session.load_model(path)

    def choose_draft(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a draft model (same vocabulary, smaller)", "",
                                              "GGUF models (*.gguf)")
        if path:
            self.settings.set_draft(path)

    def edit_message(self, mid: str) -> None:
        old = self.session.store.message(mid)["content"]
        text, ok = QInputDialog.getMultiLineText(self, "Edit message", "Your message:", old)
        if ok and text.strip() and text != old:
            self.session.edit(mid, text)

    def conversation_menu(self, cid: str, pos) -> None:
        menu = QMenu(self)
        rename, delete = menu.addAction("Rename…"), menu.addAction("Delete…")
        md, js = menu.addAction("Export as Markdown…"), menu.addAction("Export as JSON…")
        chosen = menu.exec(pos)
        store = self.session.store
        if chosen is rename:
            title, ok = QInputDialog.getText(self, "Rename chat", "Title:", text=store.conversation(cid)["title"])
            if ok:
                self.session.rename_conversation(cid, title)
        elif chosen is delete:
            if QMessageBox.question(self, "Delete chat", "Delete this chat and all its messages? This cannot be undone."
                                    ) == QMessageBox.Yes:
                self.session.delete_conversation(cid)
        elif chosen in (md, js):
            path, _ = QFileDialog.getSaveFileName(self, "Export chat", "chat." + ("md" if chosen is md else "json"))
            if path:
                data = store.export_markdown(cid) if chosen is md else json.dumps(store.export_json(cid), indent=1)
                Path(path).write_text(data, encoding="utf-8")

    def import_conversation(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import chat", "", "moedesk chat (*.json)")
        if path:
            try:
                cid = self.session.store.import_json(json.loads(Path(path).read_text(encoding="utf-8")))
            except (OSError, ValueError, KeyError) as e:
                self.banner.show_notice("error", f"Could not import {path}: {e}")
                return
            self.session.open_conversation(cid)
            self.refresh_conversations()

    def compare(self) -> None:
        if not self.session.compare():
            self.banner.show_notice("info", "Load a model and send a message first; the comparison reruns the "
                                            "last message with speculation off and on.")

    def show_compare(self, result: dict) -> None:
        CompareDialog(result, self).show()

    def show_history(self) -> None:
        HistoryDialog(self.session.store.comparisons(), self).show()

    def restart_worker(self) -> None:
        self.banner.hide()
        self.session.restart_worker()

    def toggle_settings(self) -> None:
        self.dock.setVisible(not self.dock.isVisible())

    def closeEvent(self, e) -> None:
        self.session.stop()
        self.session.worker.stop()
        super().closeEvent(e)
