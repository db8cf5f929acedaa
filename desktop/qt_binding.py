"""Is the installed Qt binding safe to run? Standard library at import; PySide6 only inside the probe.

PySide6 6.12.0 on Python 3.10/3.11 drops a reference to `None` on every call of a Qt method that
returns nothing (QLabel.setText, QWidget.update, QTextCursor.setPosition, ...) and to `True` on every
emit of Signal(bool). A streamed reply makes thousands of such calls, and when `None`'s count reaches
zero Python aborts ("Fatal Python error: none_dealloc"). From Python 3.12 on, None/True/False are
immortal, so the same binding is harmless there. `refcount_probe` measures the leak itself, so a
release with the same bug that is not in KNOWN_BAD is caught too.
"""
from __future__ import annotations

import sys

KNOWN_BAD = {"6.12.0"}  # PySide6 versions that leak None/True references on mortal-None Pythons
PROBE_CALLS = 300


def immortal_singletons() -> bool:
    """Python 3.12+ (PEP 683): reference counts of None/True never reach zero."""
    return sys.version_info >= (3, 12)


def known_bad(version: str, python: tuple[int, int] | None = None) -> bool:
    python = python or sys.version_info[:2]
    return version in KNOWN_BAD and python < (3, 12)


def refcount_probe(calls: int = PROBE_CALLS) -> dict[str, int]:
    """Call the Qt methods the app calls while streaming `calls` times each and return how much the
    reference counts of None and True fell (0 on a sound binding). Needs a QApplication."""
    from PySide6.QtCore import QCoreApplication, QObject, QTimer, Signal
    from PySide6.QtGui import QColor, QTextCharFormat, QTextCursor
    from PySide6.QtWidgets import QLabel, QProgressBar, QTextBrowser

    class Emitter(QObject):
        flag = Signal(bool)
        text = Signal(str, str, object)

    label, bar, browser, emitter = QLabel(), QProgressBar(), QTextBrowser(), Emitter()
    fmt = QTextCharFormat()
    fmt.setBackground(QColor(120, 200, 120, 90))
    browser.setPlainText("x" * 64)
    def ignore(*args) -> None:
        pass

    emitter.flag.connect(ignore)
    emitter.text.connect(ignore)
    QCoreApplication.processEvents()
    none0, true0 = sys.getrefcount(None), sys.getrefcount(True)
    for i in range(calls):
        label.setText(f"{i} tok/s")
        label.update()
        bar.setValue(i % 100)
        cur = QTextCursor(browser.document())
        cur.setPosition(i % 32)
        cur.setPosition(i % 32 + 8, QTextCursor.KeepAnchor)
        cur.mergeCharFormat(fmt)
        cur.movePosition(QTextCursor.End)
        cur.insertText("y", fmt)
        browser.setFixedHeight(100 + i % 3)
        browser.verticalScrollBar().setValue(0)
        emitter.flag.emit(True)
        emitter.text.emit("id", "text", [(0, 1)])
        QTimer.singleShot(0, ignore)
    QCoreApplication.processEvents()  # the single-shot timers fire and let go of what they hold
    none1, true1 = sys.getrefcount(None), sys.getrefcount(True)
    return {"calls": calls, "none_lost": none0 - none1, "true_lost": true0 - true1}


def leaks(probe: dict[str, int]) -> bool:
    # A sound binding may shift a count by a few (caches warming up); the bug loses one per call.
    return probe["none_lost"] > probe["calls"] // 4 or probe["true_lost"] > probe["calls"] // 4


def problem(probe: dict[str, int] | None = None) -> str | None:
    """Why this PySide6 must not run the app, or None. Pass a probe result to include the measurement."""
    import PySide6
    version = PySide6.__version__
    py = ".".join(map(str, sys.version_info[:3]))
    if probe is not None and not immortal_singletons() and leaks(probe):
        why = (f"it loses references to None/True ({probe['none_lost']}/{probe['true_lost']} in "
               f"{probe['calls']} Qt calls), which aborts Python within minutes of streaming")
    elif known_bad(version):
        why = "it has a reference-counting bug on this Python that aborts the app within minutes"
    else:
        return None
    return (f"PySide6 {version} cannot run moedesk on Python {py}: {why}.\n"
            f"Install a sound release, e.g.:  {sys.executable} -m pip install 'PySide6>=6.8,!=6.12.0'\n"
            f"(or run `python3 bootstrap.py app`, which installs one), or use Python 3.12 or newer.")
