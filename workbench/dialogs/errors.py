"""Error reporting: readable messages, never a crash, never a blocking dialog in tests.

The main window calls ``window.error_dialog(title, message)``; the default shows
a non-modal QMessageBox. Tests pass their own callable (e.g. a list's append).
"""

from __future__ import annotations

from PySide6.QtWidgets import QMessageBox, QWidget


class ErrorDialogs:
    """Shows errors in non-modal message boxes parented to a window (one at a time per title)."""

    def __init__(self, parent: QWidget) -> None:
        self.parent = parent
        self.open_boxes: dict[str, QMessageBox] = {}

    def __call__(self, title: str, message: str) -> None:
        old = self.open_boxes.pop(title, None)
        if old is not None:
            old.close()
        box = QMessageBox(QMessageBox.Icon.Warning, title, message, QMessageBox.StandardButton.Ok, self.parent)
        box.setModal(False)
        box.finished.connect(lambda _r, t=title: self.open_boxes.pop(t, None))
        self.open_boxes[title] = box
        box.show()

    def dismiss(self, title: str) -> None:
        """Close the box of ``title`` if it is open (its message no longer holds)."""
        box = self.open_boxes.pop(title, None)
        if box is not None:
            box.close()


def ask_yes_no(parent: QWidget, title: str, question: str) -> bool:
    """A blocking yes/no question (only for user-initiated actions like closing)."""
    answer = QMessageBox.question(parent, title, question,
                                  QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                  QMessageBox.StandardButton.No)
    return answer == QMessageBox.StandardButton.Yes
