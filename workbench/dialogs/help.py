"""Help > Quick Guide (a resource page in a browser dialog) and Help > About (the versions of
the app, torch, deepinv, PySide6 / Qt and the device in use)."""

from __future__ import annotations

import html
from typing import Optional

from PySide6.QtCore import Qt, qVersion
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QLabel, QTextBrowser, QVBoxLayout, QWidget

from engine.resources import resource_path
from workbench import backend

QUICK_GUIDE = resource_path("help", "quick_guide.html")


def quick_guide_html() -> str:
    try:
        return QUICK_GUIDE.read_text(encoding="utf-8")
    except OSError as exc:
        return f"<p>The Quick Guide ({html.escape(str(QUICK_GUIDE))}) could not be read: {html.escape(str(exc))}</p>"


def about_rows(device: str) -> list[tuple[str, str]]:
    """(name, version) of the app and what it runs on, then the device the engine uses."""
    rows = list(backend.versions().items())
    at = next((i for i, (name, _v) in enumerate(rows) if name == "PySide6"), len(rows) - 1)
    rows.insert(at + 1, ("Qt", qVersion()))
    rows.append(("Device", device or "not probed yet"))
    return rows


def about_html(device: str) -> str:
    rows = "".join(f"<tr><td><b>{html.escape(name)}</b></td><td>&nbsp;&nbsp;{html.escape(version)}</td></tr>"
                   for name, version in about_rows(device))
    return ("<h3>EquiDEQ Workbench</h3><p>Deep equilibrium reconstruction for sparse-view CT and accelerated "
            "MRI, trained without ground truth by Equivariant Imaging.</p>"
            f"<table>{rows}</table>")


class _Dialog(QDialog):
    def __init__(self, title: str, body: QWidget, parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle(title)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.close)
        lay = QVBoxLayout(self)
        lay.addWidget(body, 1)
        lay.addWidget(buttons)


class QuickGuideDialog(_Dialog):
    def __init__(self, parent=None) -> None:
        self.browser = QTextBrowser()
        self.browser.setOpenExternalLinks(True)
        self.browser.setHtml(quick_guide_html())
        super().__init__("Quick Guide", self.browser, parent)
        self.resize(760, 720)


class AboutDialog(_Dialog):
    def __init__(self, device: str, parent=None) -> None:
        self.label = QLabel(about_html(device))
        self.label.setTextFormat(Qt.TextFormat.RichText)
        super().__init__("About EquiDEQ Workbench", self.label, parent)

    def text(self) -> str:
        return self.label.text()


class HelpDialogs:
    """The window's help dialogs, non-modal and made once each."""

    def __init__(self, parent) -> None:
        self.parent = parent
        self.guide: Optional[QuickGuideDialog] = None
        self.about: Optional[AboutDialog] = None

    def show_quick_guide(self) -> QuickGuideDialog:
        if self.guide is None:
            self.guide = QuickGuideDialog(self.parent)
        self._raise(self.guide)
        return self.guide

    def show_about(self, device: str) -> AboutDialog:
        if self.about is not None:
            self.about.close()
        self.about = AboutDialog(device, self.parent)  # the device may have been probed since
        self._raise(self.about)
        return self.about

    @staticmethod
    def _raise(dialog: QDialog) -> None:
        dialog.show()
        dialog.raise_()
        dialog.activateWindow()

    def close(self) -> None:
        for dialog in (self.guide, self.about):
            if dialog is not None:
                dialog.close()
