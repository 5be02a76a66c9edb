"""Pan/zoom linking for side-by-side image views.

pyqtgraph's setXLink/setYLink line linked views up by *screen position* when
they overlap on screen, which shifts side-by-side image views against each
other, and combined with aspect locking makes them drift. This linker copies
the view rectangle of the view the user moved to the others instead.
"""

from __future__ import annotations


class ViewLinker:
    def __init__(self, plots) -> None:
        self.views = [p.getViewBox() if hasattr(p, "getViewBox") else p for p in plots]
        self._busy = False
        for v in self.views:
            v.sigRangeChangedManually.connect(lambda *_a, v=v: self.sync_from(v))

    def sync_from(self, source) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            rect = source.viewRect()
            for v in self.views:
                if v is not source:
                    v.setRange(rect=rect, padding=0.0)
        finally:
            self._busy = False

    def reset(self) -> None:
        """Fit every view to its own data (after the image shape changed)."""
        for v in self.views:
            fit_to_data(v)


def fit_to_data(view) -> None:
    """Fit ``view`` (a ViewBox) to its items at its next paint, not now: a view on a page not shown yet
    has no size, and fitting it now would keep the previous image's range (until the user pans or zooms)."""
    view.setDefaultPadding(0.0)
    view.enableAutoRange()
