"""Scroll areas that keep the window inside the screen: a part larger than its place scrolls instead
of growing the window (the studio must fit 1280x800)."""

from __future__ import annotations

from PySide6.QtCore import QEvent, QObject, Qt
from PySide6.QtWidgets import QScrollArea, QWidget


class _FitWidth(QObject):
    """Keeps a down-only scroll area as wide as its column needs, as boxes and rows are added to the
    column after the area was made (the Model box's adapter and Check rows came later, and Cancel,
    Remove and the field labels were cut at the dock's right edge)."""

    def __init__(self, scroll: QScrollArea, widget: QWidget):
        super().__init__(scroll)
        self.scroll, self.widget = scroll, widget

    def fit(self) -> None:
        self.scroll.setMinimumWidth(self.widget.minimumSizeHint().width()
                                    + self.scroll.verticalScrollBar().sizeHint().width())

    def eventFilter(self, watched, event) -> bool:
        if event.type() == QEvent.LayoutRequest:
            self.fit()
        return False


def scrolling(widget: QWidget, sideways: bool = True) -> QScrollArea:
    """`widget` in a frameless scroll area; a column (`sideways` off) scrolls down only, as wide as it needs."""
    scroll = QScrollArea(widgetResizable=True)
    scroll.setFrameShape(QScrollArea.NoFrame)
    scroll.setWidget(widget)
    if not sideways:
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        fitting = _FitWidth(scroll, widget)
        fitting.fit()
        widget.installEventFilter(fitting)
    return scroll
