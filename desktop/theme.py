"""Light and dark palettes. "system" follows the desktop's colour scheme and changes with it."""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication

THEMES = ("system", "light", "dark")


def dark_palette() -> QPalette:
    p = QPalette()
    window, base, text, dim = QColor(45, 45, 48), QColor(30, 30, 32), QColor(225, 225, 225), QColor(130, 130, 130)
    for role, color in ((QPalette.Window, window), (QPalette.WindowText, text), (QPalette.Base, base),
                        (QPalette.AlternateBase, window), (QPalette.ToolTipBase, base), (QPalette.ToolTipText, text),
                        (QPalette.PlaceholderText, dim), (QPalette.Text, text), (QPalette.Button, window),
                        (QPalette.ButtonText, text), (QPalette.BrightText, QColor(255, 90, 90)),
                        (QPalette.Link, QColor(110, 170, 255)), (QPalette.Highlight, QColor(53, 110, 200)),
                        (QPalette.HighlightedText, QColor(255, 255, 255)), (QPalette.Light, QColor(70, 70, 74)),
                        (QPalette.Midlight, QColor(60, 60, 64)), (QPalette.Mid, QColor(40, 40, 42)),
                        (QPalette.Dark, QColor(25, 25, 27)), (QPalette.Shadow, QColor(0, 0, 0))):
        p.setColor(role, color)
    for role in (QPalette.Text, QPalette.WindowText, QPalette.ButtonText):
        p.setColor(QPalette.Disabled, role, dim)
    return p


def system_is_dark(app: QApplication) -> bool:
    scheme = app.styleHints().colorScheme()
    if scheme != Qt.ColorScheme.Unknown:
        return scheme == Qt.ColorScheme.Dark
    return app.style().standardPalette().color(QPalette.Window).lightness() < 128  # a dark platform palette


def apply_theme(app: QApplication, theme: str) -> bool:
    """Set the palette for "system", "light" or "dark"; True when the result is dark."""
    dark = system_is_dark(app) if theme not in ("light", "dark") else theme == "dark"
    if dark:
        app.setStyle("Fusion")  # some native styles ignore the palette; Fusion draws with it everywhere
        app.setPalette(dark_palette())
    else:
        app.setPalette(app.style().standardPalette())
    return dark


def is_dark() -> bool:
    """The application's palette, which widgets take on only when its change event reaches them."""
    return QApplication.palette().color(QPalette.Window).lightness() < 128
