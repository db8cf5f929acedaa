"""The desktop app, offscreen: real worker process, tiny models, the SQLite store underneath."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6")
from safetensors.torch import load_file, save_file  # noqa: E402

from desktop.chat import ChatSession  # noqa: E402
from desktop.main_window import MainWindow  # noqa: E402
from desktop.store import Store  # noqa: E402
from desktop.worker_client import WorkerState  # noqa: E402
from engine.tiny import write_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Tiny, slow enough to stop mid-reply, and never ending a reply by itself (eos logit 0)."""
    path = write_tiny_model(tmp_path_factory.mktemp("gui") / "m", hidden_size=192, intermediate_size=384,
                            moe_intermediate_size=96, num_hidden_layers=4, max_position_embeddings=2048)
    state = load_file(path / "model.safetensors")
    state["lm_head.weight"][1] = 0.0
    save_file(state, str(path / "model.safetensors"))
    return path


@pytest.fixture
def app_window(qtbot, tmp_path, model):
    store = Store(tmp_path / "chats.db")
    session = ChatSession(store)
    window = MainWindow(session)
    qtbot.addWidget(window)
    window.show()
    with qtbot.waitSignal(session.sig_model, timeout=60000, check_params_cb=lambda m: m is not None):
        session.start(str(model))
    yield window, session, store
    session.worker.stop()
    assert session.worker.proc is None  # no worker process left behind


def send(qtbot, window, session, text, max_tokens=12):
    session.settings.max_tokens = max_tokens
    with qtbot.waitSignal(session.sig_busy, timeout=10000, check_params_cb=lambda b: b):
        window.composer.setPlainText(text)
        window.send_button.click()


def test_send_streams_a_reply_and_stores_both_messages(qtbot, app_window):
    window, session, store = app_window
    streamed = []
    session.sig_stream.connect(lambda mid, pieces: streamed.append("".join(t for t, _ in pieces)))
    send(qtbot, window, session, "Hello model", max_tokens=16)
    with qtbot.waitSignal(session.sig_busy, timeout=60000, check_params_cb=lambda b: not b):
        pass
    thread = session.thread()
    assert [m["role"] for m in thread] == ["user", "assistant"]
    reply = thread[1]
    assert reply["status"] == "complete" and reply["content"] and reply["stats"]["generated_tokens"] == 16
    assert reply["stats"]["decode_tokens_per_s"] > 0 and "accepted_spans" in reply["stats"]
    assert streamed and "".join(streamed) == reply["content"]
    assert window.view.widgets[reply["id"]].message["content"] == reply["content"]
    assert store.search("Hello")[0]["conversation_id"] == session.conversation_id


def test_stop_keeps_the_partial_reply(qtbot, app_window):
    window, session, store = app_window
    send(qtbot, window, session, "Talk for a long time", max_tokens=1500)
    qtbot.waitUntil(lambda: session.stream is not None and len(session.stream.text) > 5, timeout=30000)
    with qtbot.waitSignal(session.sig_busy, timeout=30000, check_params_cb=lambda b: not b):
        window.stop_button.click()
    reply = session.thread()[-1]
    assert reply["status"] == "cancelled" and 5 < len(reply["content"])
    assert reply["stats"]["generated_tokens"] < 1500


def test_killed_worker_marks_the_reply_interrupted_and_restart_works(qtbot, app_window):
    window, session, store = app_window
    send(qtbot, window, session, "Keep going", max_tokens=1500)
    qtbot.waitUntil(lambda: session.stream is not None and len(session.stream.text) > 5, timeout=30000)
    with qtbot.waitSignal(session.worker.sig_died, timeout=5000):
        os.kill(session.worker.pid(), signal.SIGKILL)
    reply = session.thread()[-1]
    assert reply["status"] == "interrupted" and reply["content"]
    assert window.isVisible() and window.banner.isVisible() and window.banner.restart.isVisible()
    assert "killed" in window.banner.text.text() or "status" in window.banner.text.text()
    with qtbot.waitSignal(session.sig_model, timeout=60000, check_params_cb=lambda m: m is not None):
        window.banner.restart.click()
    assert session.worker.state == WorkerState.READY
    send(qtbot, window, session, "Are you back?", max_tokens=4)
    with qtbot.waitSignal(session.sig_busy, timeout=60000, check_params_cb=lambda b: not b):
        pass
    assert session.thread()[-1]["status"] == "complete"
    first_pid, second_pid = None, session.worker.pid()
    window.speed_label.setText("12.0 tok/s")  # as a reply left it (a short one may end before any update)
    with qtbot.waitSignal(session.worker.sig_died, timeout=5000):
        os.kill(second_pid, signal.SIGKILL)
    # The banner shows this worker's last lines only, not an earlier worker's; the live speed is cleared.
    assert f"[worker {second_pid}]" in window.banner.text.text()
    assert window.banner.text.text().count("[worker ") == window.banner.text.text().count(f"[worker {second_pid}]")
    assert window.speed_label.text() == "" and window.worker_label.text() == "worker stopped unexpectedly"


def test_continue_finishes_an_interrupted_reply_in_the_same_message(qtbot, app_window):
    window, session, store = app_window
    # Long enough that the kill lands mid-reply however fast the worker decodes (60 tokens took ~40 ms once
    # the engine got faster, and the reply could finish first); no end token, so the total is exact.
    session.settings.ignore_eos = True
    send(qtbot, window, session, "Keep going", max_tokens=900)
    qtbot.waitUntil(lambda: session.stream is not None and len(session.stream.timeline) >= 3, timeout=30000)
    with qtbot.waitSignal(session.worker.sig_died, timeout=5000):
        os.kill(session.worker.pid(), signal.SIGKILL)
    cut = session.thread()[-1]
    assert cut["status"] == "interrupted" and cut["stats"]["generated_tokens"] >= 3
    with qtbot.waitSignal(session.sig_model, timeout=60000, check_params_cb=lambda m: m is not None):
        window.banner.restart.click()
    buttons = [b for b in window.view.widgets[cut["id"]].findChildren(type(window.send_button))
               if b.text() == "Continue"]
    assert buttons
    with qtbot.waitSignal(session.sig_busy, timeout=60000, check_params_cb=lambda b: not b):
        buttons[0].click()
    done = session.thread()[-1]
    assert done["id"] == cut["id"] and done["status"] == "complete" and done["content"].startswith(cut["content"])
    assert len(done["content"]) > len(cut["content"]) and done["stats"]["continued"]
    assert done["stats"]["generated_tokens"] == 900  # the cut-off part and the continuation


def test_regenerate_and_edit_keep_versions(qtbot, app_window):
    window, session, store = app_window
    send(qtbot, window, session, "First", max_tokens=3)
    qtbot.waitUntil(lambda: not session.busy(), timeout=60000)
    first_reply = session.thread()[-1]["id"]
    session.regenerate(first_reply)
    qtbot.waitUntil(lambda: not session.busy(), timeout=60000)
    second_reply = session.thread()[-1]["id"]
    assert second_reply != first_reply and session.versions(second_reply) == (1, 2)
    session.switch_version(second_reply, -1)
    assert session.thread()[-1]["id"] == first_reply
    user = session.thread()[0]["id"]
    session.edit(user, "First, edited")
    qtbot.waitUntil(lambda: not session.busy(), timeout=60000)
    assert session.thread()[0]["content"] == "First, edited" and session.versions(session.thread()[0]["id"]) == (1, 2)


def test_compare_stores_both_runs_with_identical_text(qtbot, app_window):
    window, session, store = app_window
    session.settings.k = 2  # fixed: "auto" may rightly stop drafting with this model's random MTP module
    send(qtbot, window, session, "Compare me", max_tokens=10)
    qtbot.waitUntil(lambda: not session.busy(), timeout=60000)
    with qtbot.waitSignal(session.sig_compare, timeout=120000) as blocker:
        assert session.compare()
    result = blocker.args[0]
    assert result["identical"] and result["off"]["text"] == result["on"]["text"]
    assert result["on"]["stats"]["draft_tokens_proposed"] > 0 and result["speedup"] > 0
    assert len(result["off"]["timeline"]) > 3
    assert store.comparisons()[-1]["id"] == result["id"]
    dialogs = [w for w in window.findChildren(object) if type(w).__name__ == "CompareDialog"]
    assert dialogs and dialogs[-1].isVisible()


def test_screenshot_renders_without_torch(tmp_path):
    shot = tmp_path / "shot.png"
    code = ("import sys, runpy; sys.argv=['desktop','--screenshot',sys.argv[1]]; "
            "from desktop.__main__ import main; rc = main(sys.argv[1:]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); sys.exit(rc)")
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", MOEDESK_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-c", code, str(shot)], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "NO-TORCH" in out.stdout
    from PySide6.QtGui import QImage
    img = QImage(str(shot))
    assert img.width() >= 1000 and img.height() >= 650


def test_choosing_int4_weights_reloads_the_model_quantized(qtbot, app_window):
    window, session, store = app_window
    with qtbot.waitSignal(session.sig_model, timeout=60000, check_params_cb=lambda m: m is not None) as blocker:
        window.settings.weights.setCurrentIndex(window.settings.weights.findData("int4"))
    assert blocker.args[0]["quantization"] == "int4 (group 64)" and session.settings.quant == "int4"
    assert "int4" in window.model_label.text()
    assert store.get_setting("generation")["quant"] == "int4"  # remembered for the next start
    send(qtbot, window, session, "Hello quantized", max_tokens=8)
    with qtbot.waitSignal(session.sig_busy, timeout=60000, check_params_cb=lambda b: not b):
        pass
    assert session.thread()[-1]["status"] == "complete"


def test_gguf_model_chats_with_a_draft_model_and_compares(qtbot, tmp_path, monkeypatch):
    """A .gguf opens in the llama.cpp backend; choosing the draft mode and a draft file reloads the model
    with it; replies and the comparison then run with the draft model, with identical greedy text."""
    pytest.importorskip("llama_cpp")
    from gguf_fixtures import exported_tiny

    monkeypatch.setenv("MOEDESK_LLAMA_THREADS", "1")  # the worker inherits it: one thread on a busy machine
    gguf = exported_tiny(tmp_path)[1]
    draft = exported_tiny(tmp_path, ftype="q8_0")[1]
    store = Store(tmp_path / "chats.db")
    session = ChatSession(store)
    window = MainWindow(session)
    qtbot.addWidget(window)
    window.show()
    with qtbot.waitSignal(session.sig_model, timeout=60000, check_params_cb=lambda m: m is not None) as blocker:
        session.start(str(gguf))
    assert blocker.args[0]["backend"] == "llamacpp" and "llamacpp" in window.model_label.text()
    combo = window.settings.speculation
    offered = [combo.itemData(i)[0] for i in range(combo.count())]
    assert set(offered) == {"off", "lookup", "draft", "mtp"}  # the tiny export carries one MTP layer
    window.settings.set_draft(str(draft))
    with qtbot.waitSignal(session.sig_model, timeout=60000, check_params_cb=lambda m: bool(m and m.get("draft"))):
        combo.setCurrentIndex(offered.index("draft"))
    assert session.settings.speculative == "draft" and store.get_setting("generation")["draft_model"] == str(draft)
    send(qtbot, window, session, "Hello gguf", max_tokens=10)
    qtbot.waitUntil(lambda: not session.busy(), timeout=60000)
    reply = session.thread()[-1]
    assert reply["status"] == "complete" and reply["stats"]["speculative"] == "draft"
    assert reply["stats"]["draft_tokens_proposed"] > 0
    with qtbot.waitSignal(session.sig_compare, timeout=120000) as blocker:
        assert session.compare()
    result = blocker.args[0]
    assert result["on"]["mode"] == "draft" and result["identical"]
    session.worker.stop()


def test_a_hung_worker_is_reported_like_a_crash_with_the_reply_kept(qtbot, app_window):
    """The client's watchdog: a worker that answers no ping for hung_after_s (stopped here with SIGSTOP
    mid-reply, as a deadlock would leave it) is killed and reported; the partial reply is kept as
    interrupted and Restart brings a working worker back."""
    window, session, store = app_window
    worker = session.worker
    worker.hung_after_s = 1.0
    worker.heartbeat.setInterval(200)
    send(qtbot, window, session, "Keep going", max_tokens=1500)
    qtbot.waitUntil(lambda: session.stream is not None and len(session.stream.text) > 5, timeout=30000)
    with qtbot.waitSignal(worker.sig_died, timeout=10000) as died:
        os.kill(worker.pid(), signal.SIGSTOP)
    assert "stopped answering" in died.args[0] and "hung" in died.args[0]
    reply = session.thread()[-1]
    assert reply["status"] == "interrupted" and reply["content"]
    assert window.banner.isVisible() and window.banner.restart.isVisible()
    with qtbot.waitSignal(session.sig_model, timeout=60000, check_params_cb=lambda m: m is not None):
        window.banner.restart.click()
    assert worker.state == WorkerState.READY
