"""Notices above the docks: the first-run "what you are looking at" hint and the
"restored N settings from the last session" announcement, each with its buttons
("Quick Guide", "Reset to defaults", ...) and a close button. The bar hides itself
when no notice is left."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QFrame, QHBoxLayout, QLabel, QPushButton, QSizePolicy, QToolBar, QToolButton,
                               QVBoxLayout, QWidget)

STYLES = {
    "info": "background: #e8f1fb; border: 1px solid #9cc3ea; border-radius: 3px;",
    "notice": "background: #fff6dd; border: 1px solid #e3c46b; border-radius: 3px;",
}


class Notice(QFrame):
    def __init__(self, text: str, buttons: Sequence[tuple[str, Callable[[], None]]], kind: str,
                 on_close: Callable[[], None]) -> None:
        super().__init__()
        self.setObjectName("notice")
        self.setStyleSheet(f"QFrame#notice {{ {STYLES.get(kind, STYLES['info'])} }}")
        self.label = QLabel(text)
        self.label.setTextFormat(Qt.TextFormat.RichText)
        # a tool bar sizes its widgets by their size hints, and a wrapping label's hint is far too tall:
        # notices break their own lines (<br>) instead
        self.label.setWordWrap(False)
        self.label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)  # never widens the window
        self.label.setToolTip(text)
        self.buttons: dict[str, QPushButton] = {}
        row = QHBoxLayout(self)
        row.setContentsMargins(8, 4, 4, 4)
        row.addWidget(self.label, 1)
        for text_, callback in buttons:
            button = QPushButton(text_)
            button.clicked.connect(lambda _c=False, cb=callback: cb())
            row.addWidget(button)
            self.buttons[text_] = button
        close = QToolButton()
        close.setText("\u00d7")
        close.setToolTip("Close this notice")
        close.setAutoRaise(True)
        close.clicked.connect(lambda _c=False: on_close())
        row.addWidget(close)
        self.close_button = close


class NoticeBar(QToolBar):
    """A fixed tool bar holding the notices, one per key."""

    def __init__(self, parent=None) -> None:
        super().__init__("Notices", parent)
        self.setObjectName("toolbar_notices")
        self.setMovable(False)
        self.setFloatable(False)
        self.toggleViewAction().setVisible(False)  # not a tool bar the user switches on and off
        holder = QWidget()
        self.column = QVBoxLayout(holder)
        self.column.setContentsMargins(4, 2, 4, 2)
        self.column.setSpacing(3)
        self.addWidget(holder)
        self.notices: dict[str, Notice] = {}
        self.setVisible(False)

    def show_notice(self, key: str, text: str, buttons: Sequence[tuple[str, Callable[[], None]]] = (),
                    kind: str = "info", on_close: Optional[Callable[[], None]] = None) -> Notice:
        """Show (or replace) the notice ``key``; closing it runs ``on_close`` and hides it."""
        self.hide_notice(key)

        def close():
            self.hide_notice(key)
            if on_close is not None:
                on_close()

        notice = Notice(text, buttons, kind, close)
        self.column.addWidget(notice)
        self.notices[key] = notice
        self.setVisible(True)
        return notice

    def hide_notice(self, key: str) -> None:
        notice = self.notices.pop(key, None)
        if notice is not None:
            notice.hide()
            notice.deleteLater()
        self.setVisible(bool(self.notices))

    def texts(self) -> dict[str, str]:
        return {key: notice.label.text() for key, notice in self.notices.items()}
