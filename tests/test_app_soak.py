"""Soak: the real app offscreen streams 20 replies of 256 tokens with accepted-token colouring on, then 20
with it off (tests/app_soak.py, in a process of its own): the GUI survives, every reply is complete and
shown whole, no reference to None/True is lost, and the database passes its integrity check."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("PySide6")
ROOT = Path(__file__).resolve().parent.parent


def test_twenty_streamed_replies_each_way_leave_the_gui_alive_and_the_database_sound(tmp_path):
    out = subprocess.run([sys.executable, "tests/app_soak.py", "--replies", "20", "--tokens", "256"],
                         capture_output=True, text=True, cwd=ROOT, timeout=900,
                         env=dict(os.environ, QT_QPA_PLATFORM="offscreen", MOEDESK_HOME=str(tmp_path)))
    assert out.returncode == 0, f"the app died (exit {out.returncode}): {out.stderr[-3000:]}"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    replies = result["replies"]
    assert [r["colour"] for r in replies] == [True] * 20 + [False] * 20
    assert all(r["status"] == "complete" and r["tokens"] == 256 and r["shown"] for r in replies), replies
    assert result["integrity_check"] == "ok"
    # Widgets and caches hold more references as the chats grow; a leaking binding loses thousands.
    assert result["none_refs_lost"] < 100 and result["true_refs_lost"] < 100, result
