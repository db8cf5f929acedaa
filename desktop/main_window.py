"""The main window: wires the panels and the chat view to the ChatSession; holds no state of its own."""
from __future__ import annotations

import json
from pathlib import Path

import re
from dataclasses import replace
from datetime import datetime

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QActionGroup, QKeySequence
from PySide6.QtWidgets import (QApplication, QDialog, QDockWidget, QFileDialog, QFrame, QHBoxLayout, QInputDialog, QLabel,
                               QMainWindow, QMenu, QMessageBox, QProgressBar, QPushButton, QSplitter, QTabWidget,
                               QVBoxLayout, QWidget)

from desktop.chat import BUNDLED_MODEL, ChatSession, model_name
from desktop.chat_view import ChatView, Composer
from desktop.compare_view import CompareDialog, HistoryDialog
from desktop.panels import OPEN_FOLDER, OPEN_GGUF, ExpertLoadView, ServerDialog, SettingsPanel, Sidebar
from desktop.store import documents_dir, export_filename
from desktop.theme import THEMES, apply_theme, is_dark

SIDEBAR_WIDTH = 260


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
        bad = level in ("error", "worker_died")
        if is_dark():
            colors = ("#5a2a30", "#f3d6d9") if bad else ("#2f3454", "#dde0f5")
        else:
            colors = ("#f8d7da", "#58151c") if bad else ("#e2e3f5", "#1f2345")
        self.setStyleSheet("#banner { background: %s; border-radius: 4px; } #banner QLabel { color: %s; }" % colors)
        self.show()


def when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


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
        self.build_menus()
        self.connect_signals()
        self.refresh_models()
        self.on_busy(False)
        if session.reopen:  # the chat a crash cut off, else the one open last time
            session.open_conversation(session.reopen)
        self.refresh_conversations()
        if session.interrupted_at_start:
            n = session.interrupted_at_start
            self.banner.show_notice("info", f"{n} {'reply was' if n == 1 else 'replies were'} cut off when moedesk "
                                            "last stopped; the text is kept and marked interrupted. "
                                            "Continue picks up where it stopped.")

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
        self.split = QSplitter()
        self.split.addWidget(self.sidebar)
        self.split.addWidget(center)
        self.split.setChildrenCollapsible(False)
        self.split.setStretchFactor(1, 1)
        self.sidebar.setMinimumWidth(160)
        width = int(self.session.store.get_setting("sidebar_width", SIDEBAR_WIDTH))
        self.split.setSizes([width, max(400, self.width() - width)])
        self.split.splitterMoved.connect(lambda pos, i: self.session.store.set_setting("sidebar_width", pos))
        self.setCentralWidget(self.split)
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
        self.model_label.setMinimumWidth(120)
        self.progress = QProgressBar()
        self.progress.setFixedWidth(120)
        self.progress.setRange(0, 1000)
        self.progress.setFormat("%p%")
        self.progress.setAccessibleName("loading progress")
        self.progress.hide()
        self.speed_label = QLabel("")
        self.speed_label.setAccessibleName("live speed")
        self.worker_label = QLabel("worker stopped")
        self.worker_label.setAccessibleName("worker status")
        bar.addWidget(self.model_label, 1)
        bar.addPermanentWidget(self.progress)
        bar.addPermanentWidget(self.speed_label)
        bar.addPermanentWidget(self.worker_label)

    def action(self, menu: QMenu, text: str, slot, keys=None, checkable: bool = False) -> QAction:
        act = menu.addAction(text)
        if keys is not None:
            act.setShortcut(QKeySequence(keys))
            act.setShortcutContext(Qt.ApplicationShortcut)
        act.setCheckable(checkable)
        act.triggered.connect(slot)
        return act

    def build_menus(self) -> None:
        s, bar = self.session, self.menuBar()
        file = bar.addMenu("&File")
        self.action(file, "&New chat", s.new_conversation, QKeySequence.New)
        self.action(file, "&Import chat…", self.import_conversation, "Ctrl+I")
        self.action(file, "&Export chat as Markdown…", lambda: self.export(self.session.conversation_id, "md"),
                    "Ctrl+E")
        self.action(file, "Export chat as &JSON…", lambda: self.export(self.session.conversation_id, "json"))
        file.addSeparator()
        self.action(file, "&Quit", self.close, QKeySequence.Quit)
        model = bar.addMenu("&Model")
        self.action(model, "Open model &folder…", lambda: self.choose_model(OPEN_FOLDER), "Ctrl+Shift+O")
        self.action(model, "Open .&gguf file…", lambda: self.choose_model(OPEN_GGUF), QKeySequence.Open)
        self.action(model, "&Bundled model", lambda: self.choose_model(str(BUNDLED_MODEL)))
        self.action(model, "Connect to a &server…", self.connect_server, "Ctrl+Shift+S")
        model.addSeparator()
        self.action(model, "&Restart worker", self.restart_worker)
        chat = bar.addMenu("&Chat")
        self.action(chat, "&Stop", s.stop, Qt.Key_Escape)
        self.action(chat, "&Continue reply", self.continue_last, "Ctrl+Shift+Return")
        self.action(chat, "&Regenerate reply", self.regenerate_last, "Ctrl+R")
        chat.addSeparator()
        self.action(chat, "Re&name chat…", lambda: self.rename(self.session.conversation_id), "F2")
        self.action(chat, "&Delete chat…", lambda: self.delete(self.session.conversation_id))
        self.action(chat, "Searc&h", self.sidebar.search.setFocus, QKeySequence.Find)
        chat.addSeparator()
        self.action(chat, "Compare s&peed", self.compare, "Ctrl+Shift+C")
        self.action(chat, "Compare with another &model…", self.compare_models)
        self.action(chat, "Comparison &history…", self.show_history)
        view = bar.addMenu("&View")
        toggle = self.dock.toggleViewAction()
        toggle.setText("&Settings panel")
        toggle.setShortcut(QKeySequence("Ctrl+,"))
        view.addAction(toggle)
        self.color_action = self.action(view, "&Colour tokens from accepted drafts", self.toggle_color,
                                        checkable=True)
        self.color_action.setChecked(s.settings.color_accepted)
        themes = view.addMenu("&Theme")
        group = QActionGroup(self)
        chosen = s.store.get_setting("theme", "system")
        for name in THEMES:
            act = self.action(themes, name.capitalize(), lambda on, n=name: on and self.set_theme(n), checkable=True)
            act.setChecked(name == chosen)
            group.addAction(act)
        help_menu = bar.addMenu("&Help")
        self.action(help_menu, "&Keyboard shortcuts", self.show_shortcuts, QKeySequence.HelpContents)
        self.action(help_menu, "&About moedesk", self.show_about)

    def connect_signals(self) -> None:
        s = self.session
        self.sidebar.sig_new.connect(s.new_conversation)
        self.sidebar.sig_open.connect(s.open_conversation)
        self.sidebar.sig_context.connect(self.conversation_menu)
        self.sidebar.sig_import.connect(self.import_conversation)
        self.sidebar.sig_search.connect(lambda _: self.refresh_conversations())
        self.composer.sig_submit.connect(self.submit)
        self.send_button.clicked.connect(lambda: self.submit(self.composer.toPlainText()))
        self.stop_button.clicked.connect(s.stop)
        self.view.sig_regenerate.connect(s.regenerate)
        self.view.sig_continue.connect(s.continue_reply)
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
        s.sig_live_speed.connect(lambda v: self.speed_label.setText("" if v is None else f"{v:.1f} tok/s"))
        s.sig_status.connect(self.on_status)
        s.sig_compare.connect(self.show_compare)
        s.sig_expert_load.connect(self.experts.show_load)

    # ---- reactions ----

    def refresh_conversations(self) -> None:
        """The sidebar: search hits while the search box has text, else every chat; the open chat selected."""
        query = self.sidebar.search.text().strip()
        current = self.session.conversation_id
        if not query:
            items = [(c["id"], c["title"], f"{c['title']}\nlast active {when(c['updated_at'])}")
                     for c in self.session.store.conversations()]
            self.sidebar.show_items(items, current)
            return
        seen, items = set(), []
        for h in self.session.store.search(query):
            if h["conversation_id"] not in seen:
                seen.add(h["conversation_id"])
                snippet = re.sub(r"\s+", " ", h["snippet"]).strip()
                items.append((h["conversation_id"], f"{h['title']} — {snippet}", f"{h['title']}\n{snippet}"))
        self.sidebar.show_items(items, current)

    def refresh_thread(self) -> None:
        s = self.session
        self.view.show_thread(s.thread(), s.versions, s.settings.color_accepted, s.can_continue)
        self.refresh_conversations()

    def refresh_models(self) -> None:
        paths = [str(BUNDLED_MODEL)] + [p for p in self.session.store.get_setting("recent_models", [])
                                        if p != str(BUNDLED_MODEL)]
        self.settings.show_models(paths, self.session.model_path)

    def submit(self, text: str) -> None:
        if self.session.send(text):
            self.composer.clear()  # only once it is sent: a refused message stays in the box

    def on_busy(self, busy: bool) -> None:
        self.stop_button.setEnabled(busy)
        self.send_button.setEnabled(not busy)
        self.settings.compare_button.setEnabled(not busy)

    def on_status(self, text: str) -> None:
        self.worker_label.setText(text)
        if not self.session.loading:
            self.progress.hide()
            self.on_model(self.session.model)
        else:
            self.model_label.setText(f"Loading {model_name(self.session.loading)}…")
            self.model_label.setToolTip(self.session.loading)

    def on_model(self, info: dict | None) -> None:
        if self.session.loading:
            return  # the status shows the model that is loading
        self.progress.hide()
        if info is None:
            self.model_label.setText("No model loaded")
            self.refresh_models()
            return
        mem = info.get("memory_bytes")
        mtp = f", {info['mtp_modules']} MTP modules" if info.get("mtp_modules") else ""
        quant = f" · {info['quantization']}" if info.get("quantization") else ""
        draft = f" · draft {info['draft']}" if info.get("draft") else ""
        params = f" · {info['parameters'] / 1e6:.1f}M params" if info.get("parameters") else ""
        where = " · ".join(str(info[k]) for k in ("device", "dtype") if info.get(k))
        if info.get("backend") == "remote":  # the server and the round trip measured when connecting
            where = model_name(info["url"]) + (f" · {info['latency_ms']:.0f} ms" if info.get("latency_ms") is not None else "")
        self.model_label.setText(f"{info['name']} · {info['backend']}" + (f" · {where}" if where else "")
                                 + f"{quant}{mtp}{draft}{params}" + (f" · {mem / 2**20:.0f} MiB" if mem else ""))
        self.model_label.setToolTip(info.get("path") or info["name"])
        self.settings.show_speculation(self.session.speculative_modes())
        self.settings.show_weights(info.get("backend"))
        self.refresh_models()

    def on_progress(self, stage: str, fraction: float) -> None:
        if self.session.loading:
            self.model_label.setText(f"Loading {model_name(self.session.loading)}: {stage}")
        self.progress.show()
        self.progress.setValue(int(1000 * fraction))

    def on_settings_changed(self) -> None:
        old = replace(self.session.settings)
        self.settings.apply_to(self.session.settings)
        if self.session.settings.speculative == "draft" and not self.session.settings.draft_model:
            self.choose_draft()  # the mode needs a file; choosing it comes back here
            return
        self.session.save_settings()
        self.color_action.setChecked(self.session.settings.color_accepted)
        if old.color_accepted != self.session.settings.color_accepted:
            self.refresh_thread()
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

    def connect_server(self) -> None:
        dialog = ServerDialog(self.session.recent_servers(), self)
        if dialog.exec() == QDialog.Accepted and dialog.chosen()["url"]:
            self.session.connect_server(**dialog.chosen())
        else:
            self.refresh_models()

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
        title = menu.addAction(self.session.store.conversation(cid)["title"])  # which chat the menu acts on
        title.setEnabled(False)
        menu.addSeparator()
        opened, rename, delete = menu.addAction("Open"), menu.addAction("Rename…"), menu.addAction("Delete…")
        md, js = menu.addAction("Export as Markdown…"), menu.addAction("Export as JSON…")
        chosen = menu.exec(pos)
        if chosen is opened:
            self.session.open_conversation(cid)
        elif chosen is rename:
            self.rename(cid)
        elif chosen is delete:
            self.delete(cid)
        elif chosen in (md, js):
            self.export(cid, "md" if chosen is md else "json")

    def rename(self, cid: str | None) -> None:
        conv = self.session.store.conversation(cid) if cid else None
        if conv is None:
            return
        title, ok = QInputDialog.getText(self, "Rename chat", "Title:", text=conv["title"])
        if ok:
            self.session.rename_conversation(cid, title)

    def delete(self, cid: str | None) -> None:
        conv = self.session.store.conversation(cid) if cid else None
        if conv is None:
            return
        if QMessageBox.question(self, "Delete chat", f"Delete “{conv['title']}” and all its messages? "
                                "This cannot be undone.") == QMessageBox.Yes:
            self.session.delete_conversation(cid)

    def export(self, cid: str | None, extension: str) -> None:
        store = self.session.store
        conv = store.conversation(cid) if cid else None
        if conv is None:
            self.banner.show_notice("info", "Open a chat to export it.")
            return
        default = str(documents_dir() / export_filename(conv["title"], extension))
        kind = "Markdown (*.md)" if extension == "md" else "moedesk chat (*.json)"
        path, _ = QFileDialog.getSaveFileName(self, "Export chat", default, kind)
        if not path:
            return
        data = store.export_markdown(cid) if extension == "md" else json.dumps(store.export_json(cid), indent=1)
        try:
            Path(path).write_text(data, encoding="utf-8")
        except OSError as e:
            self.banner.show_notice("error", f"Could not write {path}: {e.strerror or e}")

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
            why = self.session.cannot_send() or ("The loaded model has no speculative mode to compare."
                                                 if self.session.compare_mode() is None else
                                                 "Send a message first; the comparison reruns the last message "
                                                 "with speculation off and on.")
            self.banner.show_notice("info", why)

    def last_assistant(self) -> dict | None:
        return next((m for m in reversed(self.session.thread()) if m["role"] == "assistant"), None)

    def continue_last(self) -> None:
        m = self.last_assistant()
        if m is None or not self.session.can_continue(m):
            self.banner.show_notice("info", "Only a reply that was stopped or cut off can be continued.")
            return
        self.session.continue_reply(m["id"])

    def regenerate_last(self) -> None:
        m = self.last_assistant()
        if m is not None:
            self.session.regenerate(m["id"])

    def toggle_color(self, on: bool) -> None:
        self.settings.color.setChecked(on)  # the settings panel applies it, as if clicked there

    def set_theme(self, theme: str) -> None:
        self.session.store.set_setting("theme", theme)
        apply_theme(QApplication.instance(), theme)
        self.refresh_thread()

    def show_shortcuts(self) -> None:
        lines = []
        for menu in self.menuBar().findChildren(QMenu):
            for act in menu.actions():
                if not act.shortcut().isEmpty():
                    lines.append(f"{act.shortcut().toString(QKeySequence.NativeText)}\t{act.text().replace('&', '')}")
        lines.append("Enter\tSend   ·   Shift+Enter\tNew line")
        QMessageBox.information(self, "Keyboard shortcuts", "\n".join(lines))

    def show_about(self) -> None:
        QMessageBox.about(self, "About moedesk", "moedesk — Mixture-of-Experts models, fast, offline.\n"
                          "The model runs in a separate worker process; chats stay on this computer.")

    def compare_models(self) -> None:
        """The last prompt on the loaded model and on another one (a recent model or server)."""
        others = [p for p in self.session.store.get_setting("recent_models", []) if p != self.session.model_path]
        if not others:
            self.banner.show_notice("info", "Open or connect to another model first: it is compared from the recent ones.")
            return
        names = [f"{model_name(p)}  ({p})" for p in others]
        choice, ok = QInputDialog.getItem(self, "Compare with another model", "The same prompt on:", names, 0, False)
        if ok and not self.session.compare_models(others[names.index(choice)]):
            self.banner.show_notice("info", self.session.cannot_send() or "Send a message first: its prompt is compared.")

    def show_compare(self, result: dict) -> None:
        CompareDialog(result, self).show()

    def show_history(self) -> None:
        HistoryDialog(self.session.store.comparisons(), self).show()

    def restart_worker(self) -> None:
        self.banner.hide()
        self.session.restart_worker()


    def closeEvent(self, e) -> None:
        self.session.stop()
        self.session.worker.stop()
        super().closeEvent(e)
