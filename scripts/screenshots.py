"""Refresh the README's screenshots with the real app and the bundled model (offscreen):
`QT_QPA_PLATFORM=offscreen .venv/bin/python scripts/screenshots.py`."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ["MOEDESK_HOME"] = tempfile.mkdtemp()  # never the user's chats
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PySide6.QtCore import QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from desktop.chat import ChatSession  # noqa: E402
from desktop.main_window import MainWindow  # noqa: E402
from desktop.store import Store  # noqa: E402
from desktop.theme import apply_theme  # noqa: E402

PROMPT = "What does `json.dumps` do?"


def main() -> int:
    app = QApplication([])
    apply_theme(app, "light")
    session = ChatSession(Store())
    window = MainWindow(session)
    window.resize(1240, 780)
    window.show()
    steps = iter(["send", "compare", "done"])

    def next_step(*_):
        step = next(steps)
        if step == "send":
            session.settings.max_tokens = 96
            session.send(PROMPT)
        elif step == "compare":
            window.grab().save(str(ROOT / "docs" / "screenshot.png"))
            session.compare()
        else:
            dialogs = [w for w in window.findChildren(object) if type(w).__name__ == "CompareDialog"]
            for _ in range(10):
                app.processEvents()
            dialogs[-1].grab().save(str(ROOT / "docs" / "compare.png"))
            dialogs[-1].close()
            apply_theme(app, "dark")
            session.sig_thread.emit()  # redrawn in the dark palette
            for _ in range(10):
                app.processEvents()
            window.grab().save(str(ROOT / "docs" / "screenshot-dark.png"))
            app.quit()

    session.sig_model.connect(lambda m: m and QTimer.singleShot(200, next_step))
    session.sig_busy.connect(lambda busy: None if busy or session.compare_runs else QTimer.singleShot(300, next_step)
                             if session.thread() and not session.store.comparisons() else None)
    session.sig_compare.connect(lambda r: QTimer.singleShot(300, next_step))
    QTimer.singleShot(180_000, app.quit)
    session.start()
    app.exec()
    session.worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
