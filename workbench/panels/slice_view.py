"""An image view that behaves like a radiology viewer's (3D Slicer, napari): the mouse wheel
moves through slices and Ctrl + wheel zooms, right-drag sets window (left/right) and level
(up/down), left-drag pans. The arithmetic is :mod:`workbench.panels.viewer_model`'s."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal

from workbench.panels.plotting import pg
from workbench.panels.viewer_model import WheelSteps

DRAG_START, DRAG_MOVE, DRAG_FINISH = "start", "move", "finish"


class SliceViewBox(pg.ViewBox):
    #: whole wheel notches turned over the view without Ctrl (positive: away from the user)
    sliceWheel = Signal(int)
    #: a right-drag: phase (start / move / finish), dx and dy in screen pixels from where it started,
    #: and the view's width and height in pixels
    windowDrag = Signal(str, float, float, float, float)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._wheel = WheelSteps()

    def wheelEvent(self, ev, axis=None) -> None:
        if ev.modifiers() & Qt.KeyboardModifier.ControlModifier:
            super().wheelEvent(ev, axis)  # zoom about the cursor; linked views follow (sigRangeChangedManually)
            return
        steps = self._wheel.add(ev.delta())
        if steps:
            self.sliceWheel.emit(steps)
        ev.accept()

    def mouseDragEvent(self, ev, axis=None) -> None:
        if ev.button() != Qt.MouseButton.RightButton:
            super().mouseDragEvent(ev, axis)  # left-drag pans, as before
            return
        ev.accept()
        start, now = ev.buttonDownScreenPos(), ev.screenPos()
        phase = DRAG_START if ev.isStart() else DRAG_FINISH if ev.isFinish() else DRAG_MOVE
        self.windowDrag.emit(phase, now.x() - start.x(), now.y() - start.y(), float(self.width()),
                             float(self.height()))


def image_plot(layout, row: int, col: int, title: str, aspect: bool = True) -> tuple:
    """A titled plot without axes or menu on a :class:`SliceViewBox` in ``layout``, holding one ImageItem."""
    box = SliceViewBox()
    plot = layout.addPlot(row=row, col=col, title=title, viewBox=box)
    plot.hideAxis("left")
    plot.hideAxis("bottom")
    plot.invertY(True)
    plot.setAspectLocked(aspect)
    plot.setMenuEnabled(False)
    item = pg.ImageItem()
    plot.addItem(item)
    return plot, item, box
