"""bootstrap.py: what it installs when, and the advice it gives before Qt would fail to open a window."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bootstrap  # noqa: E402


def test_a_test_install_satisfies_the_app(tmp_path, monkeypatch):
    monkeypatch.setattr(bootstrap, "STAMP", tmp_path / "stamp")
    assert bootstrap.need_install("") and bootstrap.need_install("[test]")
    (tmp_path / "stamp").write_text(bootstrap.install_key("[test]") + "\n")
    assert not bootstrap.need_install("") and not bootstrap.need_install("[test]")
    (tmp_path / "stamp").write_text(bootstrap.install_key("") + "\n")  # the app's install lacks the test tools
    assert not bootstrap.need_install("") and bootstrap.need_install("[test]")


def test_missing_qt_libraries_come_with_the_install_command():
    advice = bootstrap.qt_library_advice(["libxcb-cursor.so.0", "libxcb-icccm.so.4", "libxcb-keysyms.so.1"])
    assert "sudo apt-get install -y libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1" in advice
    odd = bootstrap.qt_library_advice(["libweird.so.9"])
    assert "libweird.so.9" in odd and "apt-get install" not in odd


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the xcb plugin is Linux's")
def test_the_check_reads_the_installed_plugin(monkeypatch):
    monkeypatch.setattr(bootstrap, "PY", Path(sys.executable))
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    missing = bootstrap.missing_qt_libraries()
    assert isinstance(missing, list) and all(".so" in m for m in missing)
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert bootstrap.missing_qt_libraries() == []  # headless needs none of them
