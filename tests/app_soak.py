"""The real app, offscreen, streaming reply after reply: `python tests/app_soak.py --replies 20 --json OUT`
(`--weights int4` to soak the quantized path).

Runs in a process of its own (tests/test_app_soak.py starts it), so a Qt binding that aborts Python fails
the test instead of killing the test run. Each round sends a prompt through the composer's Send button
and waits for the reply, `--replies` times with accepted-token colouring on, then as many with it off,
two replies per chat (the bundled model's context is 1,024 tokens). Prints one JSON object: per reply
the status, tokens and decode tok/s the worker measured, the reference count drift of None/True, and
the database's `PRAGMA integrity_check`.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = ["How do I read a file with pathlib?", "Explain asyncio.gather", "What does json.dumps do?",
           "Write a function that merges two sorted lists", "How do I parse command line arguments?"]


def wait(until, timeout: float) -> bool:
    """Run the event loop, as app.exec() would, until `until()` holds (checked every 20 ms)."""
    from PySide6.QtCore import QEventLoop, QTimer

    loop, timer, end = QEventLoop(), QTimer(), time.monotonic() + timeout
    timer.timeout.connect(lambda: (until() or time.monotonic() > end) and loop.quit())
    timer.start(20)
    if not until():
        loop.exec()
    timer.stop()
    return until()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replies", type=int, default=20, help="replies per colouring setting")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--model", default=None)
    ap.add_argument("--speculative", default="mtp", choices=["off", "mtp"])
    ap.add_argument("--per-chat", type=int, default=2, help="replies per chat (then a new chat)")
    ap.add_argument("--colour", choices=["both", "on", "off"], default="both")
    ap.add_argument("--weights", choices=["none", "int8", "int4"], default="none",
                    help="native weights quantized while loading (the settings panel's Weights)")
    ap.add_argument("--json", default=None, help="write the result here too")
    args = ap.parse_args(argv)

    from PySide6.QtWidgets import QApplication

    from desktop.chat import ChatSession
    from desktop.main_window import MainWindow
    from desktop.store import Store
    from engine.paths import BUNDLED_MODEL

    app = QApplication(sys.argv[:1])
    db = Path(tempfile.mkdtemp()) / "soak.db"
    session = ChatSession(Store(db))
    s = session.settings
    s.max_tokens, s.ignore_eos, s.speculative, s.k, s.temperature = args.tokens, True, args.speculative, "auto", 0.0
    s.quant = args.weights
    window = MainWindow(session)
    window.resize(1240, 780)
    window.show()
    session.start(args.model or str(BUNDLED_MODEL))
    if not wait(lambda: session.model is not None, 120):
        print(json.dumps({"error": "the model did not load", "stderr": list(session.worker.stderr_tail)}))
        return 1
    replies, none0, true0 = [], sys.getrefcount(None), sys.getrefcount(True)
    t0, cpu0 = time.monotonic(), time.process_time()
    for colour in {"both": (True, False), "on": (True,), "off": (False,)}[args.colour]:
        window.settings.color.setChecked(colour)  # as a user clicks it: the panel applies it
        assert session.settings.color_accepted == colour
        for i in range(args.replies):
            if i % args.per_chat == 0:
                session.new_conversation()
            window.composer.setPlainText(PROMPTS[i % len(PROMPTS)])
            window.send_button.click()
            if not wait(lambda: session.busy(), 10) or not wait(lambda: not session.busy(), 300):
                print(json.dumps({"error": f"reply {len(replies)} did not finish", "replies": replies}))
                return 1
            reply = session.thread()[-1]
            st = reply["stats"]
            replies.append({"prompt": PROMPTS[i % len(PROMPTS)], "colour": colour, "status": reply["status"],
                            "tokens": st.get("generated_tokens"), "prefill_s": st.get("prefill_s"),
                            "decode_tokens_per_s": st.get("decode_tokens_per_s"),
                            "time_to_first_token_s": st.get("time_to_first_token_s"),
                            "chars": len(reply["content"]),
                            "shown": window.view.widgets[reply["id"]].message["content"] == reply["content"]})
    elapsed, gui_cpu = time.monotonic() - t0, time.process_time() - cpu0
    none_lost, true_lost = none0 - sys.getrefcount(None), true0 - sys.getrefcount(True)
    window.close()
    session.worker.stop()
    integrity = sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0]
    result = {"replies": replies, "elapsed_s": elapsed, "gui_cpu_s": gui_cpu, "none_refs_lost": none_lost, "true_refs_lost": true_lost,
              "integrity_check": integrity, "python": sys.version.split()[0],
              "pyside6": __import__("PySide6").__version__}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
