"""The log panel: info / warning / error messages with time stamps."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass

from PySide6.QtWidgets import QHBoxLayout, QLabel, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget

MAX_ENTRIES = 5000
LEVEL_COLOURS = {"info": "#222222", "warning": "#b36b00", "error": "#c62828", "debug": "#777777"}


@dataclass
class LogEntry:
    time: float
    level: str
    message: str


class LogModel:
    def __init__(self) -> None:
        self.entries: list[LogEntry] = []
        self.counts = {"info": 0, "warning": 0, "error": 0}

    def add(self, level: str, message: str) -> LogEntry:
        level = level if level in LEVEL_COLOURS else "info"
        entry = LogEntry(time.time(), level, str(message))
        self.entries.append(entry)
        del self.entries[:-MAX_ENTRIES]
        self.counts[level] = self.counts.get(level, 0) + 1
        return entry

    def messages(self, level: str | None = None) -> list[str]:
        return [e.message for e in self.entries if level is None or e.level == level]


class LogPanel(QWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.model = LogModel()
        self.view = QPlainTextEdit()
        self.view.setReadOnly(True)
        self.view.setMaximumBlockCount(MAX_ENTRIES)
        self.counts = QLabel("")
        clear = QPushButton("Clear")
        clear.clicked.connect(self.view.clear)
        top = QHBoxLayout()
        top.addWidget(self.counts, 1)
        top.addWidget(clear)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addLayout(top)
        lay.addWidget(self.view)
        self._update_counts()

    def add(self, level: str, message: str) -> None:
        e = self.model.add(level, message)
        stamp = time.strftime("%H:%M:%S", time.localtime(e.time))
        colour = LEVEL_COLOURS[e.level]
        text = html.escape(e.message).replace("\n", "<br>&nbsp;&nbsp;")
        self.view.appendHtml(f"<span style='color:#888'>{stamp}</span> "
                             f"<span style='color:{colour}'><b>{e.level}</b>: {text}</span>")
        self._update_counts()

    def _update_counts(self) -> None:
        c = self.model.counts
        self.counts.setText(f"{c.get('info', 0)} info · {c.get('warning', 0)} warnings · {c.get('error', 0)} errors")
