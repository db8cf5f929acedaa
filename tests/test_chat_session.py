"""ChatSession and the window's state logic against a scripted worker: no model, no worker process."""
from __future__ import annotations

import json
import os
import sqlite3

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6")
from PySide6.QtCore import QObject, Signal  # noqa: E402

from desktop.chat import ChatSession, auto_title  # noqa: E402
from desktop.store import Store, export_filename  # noqa: E402
from desktop.worker_client import WorkerState  # noqa: E402
from engine.protocol import Done, Error, Generate, Load, Loaded, Token  # noqa: E402

MODEL = {"name": "mini", "backend": "native", "speculative_modes": ["off", "mtp"]}


class ScriptedWorker(QObject):
    """The WorkerClient's interface; records requests, and the test plays the worker's events."""
    sig_events = Signal(object)
    sig_state = Signal(object)
    sig_died = Signal(str)

    def __init__(self):
        super().__init__()
        self.state, self.sent, self.stderr_tail = WorkerState.STOPPED, [], []

    def set_state(self, state):
        self.state = state
        self.sig_state.emit(state)

    def start(self):
        self.set_state(WorkerState.STARTING)
        self.set_state(WorkerState.READY)

    restart = start

    def stop(self):
        self.state = WorkerState.STOPPED

    def send(self, request):
        if self.state in (WorkerState.STOPPED, WorkerState.CRASHED):
            return False
        self.sent.append(request)
        if request.type in ("load", "generate"):
            self.set_state(WorkerState.BUSY)
        return True

    def play(self, event):
        if event.type in ("loaded", "done", "error") and self.state == WorkerState.BUSY:
            self.set_state(WorkerState.READY)
        self.sig_events.emit([event])


@pytest.fixture
def session(qapp, tmp_path):
    worker = ScriptedWorker()
    s = ChatSession(Store(tmp_path / "c.db"), worker)
    notices, statuses = [], []
    s.sig_notice.connect(lambda level, text: notices.append((level, text)))
    s.sig_status.connect(statuses.append)
    s.notices, s.statuses = notices, statuses
    return s


def loaded(session, path="/models/mini"):
    session.start(path)
    assert isinstance(session.worker.sent[-1], Load)
    session.worker.play(Loaded(model=dict(MODEL, name=path.rsplit("/", 1)[-1])))
    assert session.model is not None


def test_the_status_says_loading_until_the_model_is_ready(session):
    session.start("/models/mini")
    # `ready` starts the load from inside the state change; the status must not say "ready" meanwhile.
    assert session.loading == "/models/mini" and session.statuses[-1] == "loading mini…"
    assert session.status_text() == "loading mini…"
    session.worker.play(Loaded(model=MODEL))
    assert session.statuses[-1] == "ready" and session.loading is None


def test_sending_without_a_model_stores_nothing_and_says_why(session):
    session.start("/models/mini")  # still loading
    assert session.send("hello") is None
    assert "still loading" in session.notices[-1][1]
    session.worker.play(Error(code="load_failed", message="bad config.json"))
    assert session.model is None and session.send("hello") is None
    assert "No model is loaded" in session.notices[-1][1]
    assert session.store.conversations() == [] and not any(isinstance(r, Generate) for r in session.worker.sent)


def test_a_failed_load_keeps_the_loaded_model(session):
    loaded(session, "/models/good")
    shown = []
    session.sig_model.connect(shown.append)
    session.load_model("/models/garbage")
    assert session.model["name"] == "good" and session.loading == "/models/garbage"
    session.worker.play(Error(code="load_failed", message="config.json is not valid JSON"))
    assert session.model["name"] == "good" and session.model_path == "/models/good" and session.loading is None
    assert shown[-1]["name"] == "good"  # the picker redraws with the model still in use
    assert "garbage" in session.notices[-1][1] and "good stays loaded" in session.notices[-1][1]
    assert session.send("still works?") is not None
    assert session.store.get_setting("recent_models") == ["/models/good"]  # a failed path is not remembered


def test_a_good_load_switches_the_model(session):
    loaded(session, "/models/good")
    session.load_model("/models/other")
    session.worker.play(Loaded(model=dict(MODEL, name="other")))
    assert session.model_path == "/models/other" and session.store.get_setting("last_model") == "/models/other"


def stream_reply(session, pieces, done=True, finish="length"):
    gen = session.worker.sent[-1]
    assert isinstance(gen, Generate)
    for text, accepted in pieces:
        session.worker.play(Token(id=gen.id, text=text, accepted=accepted))
    if done:
        text = "".join(t for t, _ in pieces)
        session.worker.play(Done(id=gen.id, finish_reason=finish, text=text,
                                 stats={"generated_tokens": len(pieces), "decode_tokens_per_s": 50.0}))
    return gen


def test_the_view_gets_only_new_pieces(session):
    loaded(session)
    got = []
    session.sig_stream.connect(lambda mid, pieces: got.append(pieces))
    mid = session.send("hi")
    stream_reply(session, [("Hel", False), ("lo", True)], done=False)
    session.flush_stream()
    stream_reply(session, [(" there", True)], done=False)
    session.flush_stream()
    session.flush_stream()  # nothing new: no update
    assert got == [[("Hel", False), ("lo", True)], [(" there", True)]]
    assert session.stream.accepted == [(3, 5), (5, 11)] and session.stream.message_id == mid


def test_an_interrupted_reply_keeps_its_stats_and_continues(session):
    loaded(session)
    mid = session.send("tell me")
    stream_reply(session, [("Once", False), (" upon", True)], done=False)
    session.worker.state = WorkerState.CRASHED
    session.on_worker_died("The model worker was killed.")
    m = session.store.message(mid)
    assert m["status"] == "interrupted" and m["content"] == "Once upon"
    assert m["stats"]["generated_tokens"] == 2 and m["stats"]["measured_by"] == "gui"
    assert session.can_continue(m)
    assert not session.continue_reply(mid) and "not running" in session.notices[-1][1]
    session.worker.start()
    session.worker.play(Loaded(model=MODEL))
    assert session.continue_reply(mid)
    gen = session.worker.sent[-1]
    assert gen.continue_final_message and gen.messages[-1].role == "assistant"
    assert gen.messages[-1].content == "Once upon"
    stream_reply(session, [(" a", False), (" time", True)])
    m = session.store.message(mid)
    assert m["status"] == "complete" and m["content"] == "Once upon a time"
    assert m["stats"]["generated_tokens"] == 4 and m["stats"]["continued"] and len(m["stats"]["segments"]) == 2
    assert m["stats"]["accepted_spans"] == [[4, 9], [11, 16]]


def test_auto_titles_are_short_and_distinct():
    assert auto_title("How do I read a file with pathlib and then write it back out again?") == \
        "How do I read a file with pathlib and…"
    assert auto_title("  two\n\nlines  ") == "two lines"
    assert auto_title("Explain asyncio", ["Explain asyncio"]) == "Explain asyncio (2)"
    assert auto_title("Explain asyncio", ["Explain asyncio", "Explain asyncio (2)"]) == "Explain asyncio (3)"
    assert auto_title("x" * 100).endswith("…") and len(auto_title("x" * 100)) <= 41


def test_chats_get_distinct_titles(session):
    loaded(session)
    for _ in range(2):
        session.new_conversation()
        session.send("Explain the difference between lists and tuples in Python please")
        stream_reply(session, [("ok", False)])
    titles = sorted(c["title"] for c in session.store.conversations())
    assert titles == ["Explain the difference between lists and…", "Explain the difference between lists and… (2)"]


def test_the_cut_off_chat_opens_after_a_restart(tmp_path, qapp):
    store = Store(tmp_path / "c.db")
    a, b = store.create_conversation("a"), store.create_conversation("b")
    u = store.add_message(a, "user", "hi")
    store.add_message(a, "assistant", "partial", parent=u, status="streaming")
    store.set_setting("last_conversation", b)
    s = ChatSession(store, ScriptedWorker())
    assert s.reopen == a and s.interrupted_at_start == 1
    s2 = ChatSession(store, ScriptedWorker())  # nothing cut off now: the chat open last time
    assert s2.reopen == b


def test_export_marks_cut_off_replies_and_names_files(tmp_path):
    store = Store(tmp_path / "c.db")
    cid = store.create_conversation("How to: read/write files?")
    u = store.add_message(cid, "user", "hi")
    store.add_message(cid, "assistant", "partial", parent=u, status="interrupted")
    md = store.export_markdown(cid)
    assert "partial\n" in md and "*[reply interrupted: the model worker or the app stopped]*" in md
    assert export_filename("How to: read/write files?", "md") == "How to read write files.md"
    assert export_filename("...", "json") == "chat.json" and export_filename("con\x00trol", "md") == "con trol.md"


def test_the_database_stays_sound(tmp_path):
    store = Store(tmp_path / "c.db")
    cid = store.create_conversation()
    store.add_message(cid, "user", "x" * 10000)
    assert sqlite3.connect(tmp_path / "c.db").execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ---- the window over the same scripted worker ----

@pytest.fixture
def window(qtbot, session):
    from desktop.main_window import MainWindow
    w = MainWindow(session)
    qtbot.addWidget(w)
    w.show()
    return w


def test_a_refused_message_stays_in_the_composer(window, session):
    session.start("/models/mini")  # loading
    window.composer.setPlainText("my long question")
    window.send_button.click()
    assert window.composer.toPlainText() == "my long question" and window.banner.isVisible()
    assert "still loading" in window.banner.text.text()
    session.worker.play(Loaded(model=MODEL))
    window.send_button.click()
    assert window.composer.toPlainText() == "" and len(session.store.conversations()) == 1
    thread = session.thread()
    assert [m["role"] for m in thread] == ["user", "assistant"] and thread[0]["content"] == "my long question"


def test_search_results_keep_list_selection_and_open_chat_together(window, session, qtbot):
    loaded(session)
    for text in ("alpha first\nline two", "beta second", "alpha again"):
        session.new_conversation()
        session.send(text)
        stream_reply(session, [("reply\nwith lines", False)])
    window.sidebar.search.setText("alpha")
    lst = window.sidebar.list
    assert lst.count() == 2 and all("\n" not in lst.item(i).text() for i in range(2))
    target = lst.item(1)
    cid = target.data(0x0100)  # Qt.UserRole
    lst.itemClicked.emit(target)
    assert session.conversation_id == cid
    assert window.sidebar.search.text() == "alpha" and lst.count() == 2  # still the search results
    assert lst.currentItem().data(0x0100) == cid  # the highlighted row is the open chat
    window.sidebar.search.setText("")
    assert lst.count() == 3 and lst.currentItem().data(0x0100) == cid


def test_menus_carry_the_actions_and_shortcuts(window):
    menus = {m.title().replace("&", ""): m for m in window.menuBar().findChildren(type(window.menuBar().addMenu("x")))}
    for name in ("File", "Model", "Chat", "View", "Help"):
        assert name in menus
    shortcuts = {a.text().replace("&", ""): a.shortcut().toString() for m in menus.values() for a in m.actions()}
    assert shortcuts["New chat"] == "Ctrl+N" and shortcuts["Compare speed"] == "Ctrl+Shift+C"
    assert shortcuts["Stop"] == "Esc" and shortcuts["Settings panel"] == "Ctrl+,"
    assert "Open .gguf file…" in shortcuts and "Connect" not in shortcuts


def test_the_sidebar_width_is_remembered(window, session, qtbot):
    window.split.moveSplitter(340, 1)
    assert session.store.get_setting("sidebar_width") == 340


def test_compare_dialog_closes(window, qtbot):
    from desktop.compare_view import CompareDialog
    run = {"text": "t", "stats": {"decode_tokens_per_s": 10}, "timeline": [(0.1, 1)]}
    d = CompareDialog({"model": "m", "speedup": 2.0, "identical": True, "off": run, "on": dict(run, mode="mtp")},
                      window)
    d.show()
    from PySide6.QtWidgets import QDialogButtonBox
    box = d.findChild(QDialogButtonBox)
    box.button(QDialogButtonBox.Close).click()
    assert not d.isVisible()


def test_dark_theme_is_legible(window, qapp):
    from PySide6.QtGui import QPalette
    from desktop.theme import apply_theme
    try:
        assert apply_theme(qapp, "dark")
        p = qapp.palette()
        bg, fg = p.color(QPalette.Base), p.color(QPalette.Text)
        assert bg.lightness() < 60 and fg.lightness() > 200
        window.banner.show_notice("error", "x")
        assert "#5a2a30" in window.banner.styleSheet()
    finally:
        assert not apply_theme(qapp, "light")


def test_connecting_to_a_server_remembers_it_without_its_key(session, monkeypatch):
    """Model → Connect to a server…: a remote load with the URL, model and key variable; the server is
    remembered (newest first, never the key), reconnects with the same settings, and a failed connection
    keeps the loaded model."""
    loaded(session)
    monkeypatch.setenv("MOEDESK_TEST_KEY", "sesame")
    session.connect_server("http://10.0.0.5:8000/v1/", model="deepseek-v3", api_key_env="MOEDESK_TEST_KEY",
                           allow_insecure=True)
    req = session.worker.sent[-1]
    assert (req.backend, req.url, req.model, req.api_key_env, req.allow_insecure, req.path) == \
        ("remote", "http://10.0.0.5:8000/v1", "deepseek-v3", "MOEDESK_TEST_KEY", True, None)
    assert session.status_text() == "loading 10.0.0.5:8000…"
    session.worker.play(Error(code="connection_refused", message="cannot connect"))
    assert session.model["name"] == "mini" and "stays loaded" in session.notices[-1][1]
    session.connect_server("http://127.0.0.1:8080/v1")
    session.worker.play(Loaded(model={"name": "tiny", "backend": "remote", "url": "http://127.0.0.1:8080/v1",
                                      "models": ["tiny"], "latency_ms": 2.0, "speculative_modes": ["off"]}))
    assert session.model_path == "http://127.0.0.1:8080/v1" and session.chat_mode() == "off"
    assert [x["url"] for x in session.recent_servers()] == ["http://127.0.0.1:8080/v1", "http://10.0.0.5:8000/v1"]
    stored = json.dumps([session.store.get_setting(k) for k in ("recent_servers", "recent_models", "last_model")])
    assert "sesame" not in stored and "MOEDESK_TEST_KEY" in stored
    session.load_model("http://10.0.0.5:8000/v1")  # from the picker: the remembered settings
    req = session.worker.sent[-1]
    assert (req.model, req.api_key_env, req.allow_insecure) == ("deepseek-v3", "MOEDESK_TEST_KEY", True)


def test_a_key_typed_for_a_server_goes_to_the_os_keyring_only(session, monkeypatch):
    import keyring

    stored = {}
    monkeypatch.setattr(keyring, "set_password", lambda service, user, key: stored.update({(service, user): key}))
    loaded(session)
    session.connect_server("https://gpu.example.org/v1", api_key_keyring=True, key="sesame")
    req = session.worker.sent[-1]
    assert req.api_key_keyring and req.api_key_env is None and "sesame" not in req.to_json()
    assert stored == {("moedesk", "https://gpu.example.org/v1"): "sesame"}
    assert "sesame" not in json.dumps(session.store.get_setting("recent_servers"))


def test_compare_across_backends_loads_the_other_model_for_its_run_and_comes_back(session):
    """Chat → Compare with another model…: the prompt on the local model, then the server loaded and the
    same prompt on it, side by side in one stored comparison; then the local model is loaded back."""
    loaded(session)
    results = []
    session.sig_compare.connect(results.append)
    assert session.compare_models("http://127.0.0.1:8080/v1", prompt="Say hi")
    first = session.worker.sent[-1]
    assert first.type == "generate" and first.messages[-1].content == "Say hi"
    session.worker.play(Token(id=first.id, text="local"))
    session.worker.play(Done(id=first.id, finish_reason="stop", text="local", stats={"decode_tokens_per_s": 100.0}))
    load = session.worker.sent[-1]
    assert load.type == "load" and load.backend == "remote" and load.url == "http://127.0.0.1:8080/v1"
    assert session.cannot_send()  # loading: nothing else runs meanwhile
    session.worker.play(Loaded(model={"name": "tiny", "backend": "remote", "url": load.url, "models": ["tiny"],
                                      "latency_ms": 1.0, "speculative_modes": ["off"]}))
    second = session.worker.sent[-1]
    assert second.type == "generate" and second.messages[-1].content == "Say hi"
    session.worker.play(Done(id=second.id, finish_reason="stop", text="remote", stats={"decode_tokens_per_s": 250.0}))
    back = session.worker.sent[-1]
    assert back.type == "load" and back.path == "/models/mini" and back.backend == "native"
    (r,) = results
    assert r["model"] == "mini · native vs tiny · remote" and r["speedup"] == 2.5
    assert (r["off"]["label"], r["on"]["label"]) == ("mini · native", "tiny · remote")
    assert (r["off"]["text"], r["on"]["text"]) == ("local", "remote")


def test_compare_across_backends_ends_cleanly_when_the_other_model_fails_to_load(session):
    loaded(session)
    assert session.compare_models("/models/broken", prompt="Say hi")
    run = session.worker.sent[-1]
    session.worker.play(Done(id=run.id, finish_reason="stop", text="x", stats={}))
    session.worker.play(Error(code="load_failed", message="bad file"))
    assert session.compare_runs is None and session.model["name"] == "mini" and not session.cannot_send()


def test_the_weights_choice_is_offered_only_for_native_models(window, session):
    """Quantizing while loading is the native engine's; for a GGUF or a server the choice is disabled."""
    win = window
    session.start("/models/mini")
    session.worker.play(Loaded(model={"name": "tiny", "backend": "remote", "url": "http://127.0.0.1:1/v1",
                                      "speculative_modes": ["off"]}))
    assert not win.settings.weights.isEnabled()
    session.worker.play(Loaded(model=dict(MODEL)))
    assert win.settings.weights.isEnabled()
