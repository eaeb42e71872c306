"""A plot inside a scrolled dock: the mouse wheel scrolls the dock, as it does over the rest of the
page; Ctrl + wheel zooms the plot (pyqtgraph's wheel zoom otherwise swallows every wheel turn over
a plot, and a page of plots cannot be scrolled)."""

from __future__ import annotations

from PySide6.QtCore import QEvent, QObject, Qt
from PySide6.QtWidgets import QApplication, QScrollArea, QWidget


class _WheelToPage(QObject):
    def eventFilter(self, watched, event) -> bool:
        if event.type() != QEvent.Wheel or event.modifiers() & Qt.ControlModifier:
            return False  # Ctrl + wheel: the plot's own zoom
        page = _scroll_area_above(watched)
        if page is None:
            return False  # nothing to scroll: the plot zooms, as before
        QApplication.sendEvent(page.verticalScrollBar(), event)
        return True


_FILTER = None


def wheel_scrolls_page(plot: QWidget) -> None:
    """Over `plot`, the wheel scrolls the scroll area the plot sits in; Ctrl + wheel zooms."""
    global _FILTER
    if _FILTER is None:
        _FILTER = _WheelToPage()
    plot.viewport().installEventFilter(_FILTER)
    plot.setToolTip("Ctrl + wheel zooms the plot; the wheel alone scrolls the page")


def _scroll_area_above(widget: QWidget) -> QScrollArea | None:
    parent = widget.parentWidget()
    while parent is not None:
        if isinstance(parent, QScrollArea) and parent.verticalScrollBar().maximum() > 0:
            return parent
        parent = parent.parentWidget()
    return None
