#!/usr/bin/env python
"""Render the application icon, resources/icons/equideq.svg, to the PNG sizes desktops ask for
(hicolor 16-512 px) and to a multi-size Windows .ico; the outputs are checked in beside it.

    .venv/bin/python packaging/make_icons.py

Uses PySide6's SVG renderer (offscreen, no display) and Pillow for the .ico.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ICONS = Path(__file__).resolve().parent.parent / "resources" / "icons"
SOURCE = ICONS / "equideq.svg"
SIZES = (16, 32, 48, 64, 128, 256, 512)
ICO_SIZES = (16, 32, 48, 64, 128, 256)  # the largest an .ico holds


def png_path(size: int) -> Path:
    return ICONS / f"equideq-{size}.png"


def render_pngs() -> list[Path]:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QGuiApplication, QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    app = QGuiApplication.instance() or QGuiApplication([sys.argv[0]])  # noqa: F841 - the renderer needs one
    renderer = QSvgRenderer(str(SOURCE))
    if not renderer.isValid():
        raise SystemExit(f"{SOURCE}: not a valid SVG")
    written = []
    for size in SIZES:
        image = QImage(size, size, QImage.Format.Format_ARGB32)
        image.fill(Qt.GlobalColor.transparent)
        painter = QPainter(image)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        renderer.render(painter)
        painter.end()
        if not image.save(str(png_path(size))):
            raise SystemExit(f"could not write {png_path(size)}")
        written.append(png_path(size))
    return written


def write_ico() -> Path:
    from PIL import Image

    target = ICONS / "equideq.ico"
    with Image.open(png_path(max(ICO_SIZES))) as largest:
        largest.save(target, sizes=[(s, s) for s in ICO_SIZES])
    return target


def main() -> int:
    for path in render_pngs() + [write_ico()]:
        print(path.relative_to(ICONS.parent.parent), path.stat().st_size, "bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
