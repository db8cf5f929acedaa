"""Speculation off vs on, side by side, with a tokens-over-time chart; and the history of speedups."""
from __future__ import annotations

from html import escape

from PySide6.QtCharts import QChart, QChartView, QDateTimeAxis, QLineSeries, QScatterSeries, QValueAxis
from PySide6.QtCore import QDateTime, QPointF, Qt
from PySide6.QtGui import QPainter
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QGridLayout, QLabel, QTextBrowser, QVBoxLayout

from desktop.chat import MODE_NAMES
from desktop.chat_view import stats_line


def new_chart(title: str, x, y, x_title: str, y_title: str) -> QChart:
    chart = QChart()
    chart.setTitle(title)
    x.setTitleText(x_title)
    y.setTitleText(y_title)
    chart.addAxis(x, Qt.AlignBottom)
    chart.addAxis(y, Qt.AlignLeft)
    return chart


def add_series(chart: QChart, series, name: str, points) -> None:
    series.setName(name)
    for p in points:
        series.append(QPointF(*p))
    chart.addSeries(series)
    for axis in chart.axes():
        series.attachAxis(axis)


def close_button(dialog: QDialog, layout) -> None:
    buttons = QDialogButtonBox(QDialogButtonBox.Close)
    buttons.rejected.connect(dialog.reject)
    layout.addWidget(buttons)


def tokens_chart(runs: dict[str, list]) -> QChartView:
    x, y = QValueAxis(), QValueAxis()
    chart = new_chart("Tokens over time", x, y, "seconds", "tokens")
    xmax, ymax = 0.05, 1.0
    for name, timeline in runs.items():
        add_series(chart, QLineSeries(), name, [(0, 0), *timeline])
        for t, n in timeline:
            xmax, ymax = max(xmax, t), max(ymax, n)
    x.setRange(0, xmax * 1.05)  # the axes fit the runs, however short
    y.setRange(0, ymax * 1.05)
    view = QChartView(chart)
    view.setRenderHint(QPainter.Antialiasing)
    view.setMinimumHeight(220)
    view.setAccessibleName("tokens over time chart")
    return view


class CompareDialog(QDialog):
    def __init__(self, result: dict, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Speculation off vs on")
        self.resize(980, 640)
        off, on = result["off"], result["on"]
        across = "label" in on  # two models (or a model and a server) rather than speculation off and on
        on_name = on["label"] if across else MODE_NAMES.get(on.get("mode", "mtp"), "Speculation on")
        off_name = off["label"] if across else "Speculation off"
        if across:
            self.setWindowTitle("Two models, the same prompt")
        lay = QVBoxLayout(self)
        speed = result.get("speedup")
        what = f"{on_name} against {off_name}" if across else f"speedup with {on_name.lower()}"
        head = QLabel(f"<b>{escape(result['model'])}</b> — {escape(what)}: <b>{speed:.2f}×</b>" if speed
                      else f"<b>{escape(result['model'])}</b>")
        head.setAccessibleName("speedup")
        lay.addWidget(head)
        same = QLabel("Identical text: yes" if result["identical"] else "Identical text: no" if across else
                      "Identical text: no (expected only with temperature > 0)")
        same.setObjectName("identicalLabel")
        lay.addWidget(same)
        grid = QGridLayout()
        for col, (name, run) in enumerate(((off_name, off), (on_name, on))):
            grid.addWidget(QLabel(f"<b>{name}</b>"), 0, col)
            text = QTextBrowser()
            text.setPlainText(run["text"])  # shown as text, never HTML
            text.setAccessibleName(f"{name} reply")
            grid.addWidget(text, 1, col)
            grid.addWidget(QLabel(stats_line(run["stats"]) or "-"), 2, col)
        lay.addLayout(grid)
        lay.addWidget(tokens_chart({off_name if across else "off": off.get("timeline", []), on_name: on.get("timeline", [])}))
        close_button(self, lay)


class HistoryDialog(QDialog):
    """Past comparisons' speedups over time, one series per model."""

    def __init__(self, comparisons: list[dict], parent=None):
        super().__init__(parent)
        self.setWindowTitle("Speedup history")
        self.resize(760, 420)
        lay = QVBoxLayout(self)
        x, y = QDateTimeAxis(), QValueAxis()
        x.setFormat("MMM d hh:mm")
        chart = new_chart("Speedup from speculation per comparison", x, y, "when", "speedup ×")
        by_model: dict[str, list] = {}
        for c in comparisons:
            if c.get("speedup"):
                by_model.setdefault(c["model"], []).append((c["created_at"] * 1000, c["speedup"]))
        lo, hi, tmin, tmax = 0.0, 2.0, None, None
        for model, points in by_model.items():
            add_series(chart, QScatterSeries(), model, points)
            for t, v in points:
                hi = max(hi, v * 1.1)
                tmin, tmax = min(tmin or t, t), max(tmax or t, t)
        y.setRange(lo, hi)
        if tmin is not None:
            x.setRange(QDateTime.fromMSecsSinceEpoch(int(tmin - 60_000)), QDateTime.fromMSecsSinceEpoch(int(tmax + 60_000)))
        view = QChartView(chart)
        view.setRenderHint(QPainter.Antialiasing)
        lay.addWidget(QLabel(f"{len(comparisons)} comparisons saved"))
        lay.addWidget(view)
        close_button(self, lay)
