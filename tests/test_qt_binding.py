"""The Qt binding the app runs on must not lose references (PySide6 6.12.0 on Python < 3.12 does)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("PySide6")
from desktop.qt_binding import known_bad, leaks, problem  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROBE = ("import json, sys\n"
         "from PySide6.QtWidgets import QApplication\n"
         "app = QApplication([])\n"
         "from desktop.qt_binding import refcount_probe\n"
         "print(json.dumps(refcount_probe(int(sys.argv[1]))))\n")


def test_the_installed_binding_keeps_none_and_true_alive():
    """A few hundred of the Qt calls a streamed reply makes; in a subprocess, so an abort (what the bad
    binding does once None's count reaches zero) fails this test instead of the test run."""
    out = subprocess.run([sys.executable, "-c", PROBE, "300"], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, QT_QPA_PLATFORM="offscreen"), timeout=120)
    assert out.returncode == 0, f"the Qt probe aborted (exit {out.returncode}): {out.stderr[-2000:]}"
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(probe["none_lost"]) <= 30 and abs(probe["true_lost"]) <= 30, probe
    assert not leaks(probe)


def test_known_bad_pairs_are_refused_with_a_way_out(monkeypatch):
    assert known_bad("6.12.0", (3, 11)) and known_bad("6.12.0", (3, 10))
    assert not known_bad("6.12.0", (3, 12)) and not known_bad("6.11.3", (3, 11))
    import PySide6
    monkeypatch.setattr(PySide6, "__version__", "6.12.0")
    monkeypatch.setattr(sys, "version_info", (3, 11, 7, "final", 0))
    why = problem()
    assert "PySide6 6.12.0" in why and "!=6.12.0" in why and "bootstrap.py" in why
    measured = problem({"calls": 20, "none_lost": 190, "true_lost": 40})
    assert "190/40 in 20 Qt calls" in measured


def test_pyproject_excludes_the_bad_release():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"PySide6>=6.8,!=6.12.0"' in text


def test_the_app_refuses_to_start_on_a_leaking_binding(tmp_path):
    """`python -m desktop` with a probe that reports a leak exits with the message, before any window."""
    code = ("import sys, desktop.qt_binding as q\n"
            "q.immortal_singletons = lambda: False\n"
            "q.refcount_probe = lambda calls: {'calls': calls, 'none_lost': 9 * calls, 'true_lost': 2 * calls}\n"
            "from desktop.__main__ import main\n"
            "sys.exit(main(['--screenshot', sys.argv[1]]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.png")], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, QT_QPA_PLATFORM="offscreen", MOEDESK_HOME=str(tmp_path)),
                         timeout=120)
    assert out.returncode == 3 and "cannot run moedesk" in out.stderr and not (tmp_path / "x.png").exists()
