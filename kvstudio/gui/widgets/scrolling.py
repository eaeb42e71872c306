"""Scroll areas that keep the window inside the screen: a part larger than its place scrolls instead
of growing the window (the studio must fit 1280x800)."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QScrollArea, QWidget


def scrolling(widget: QWidget, sideways: bool = True) -> QScrollArea:
    """`widget` in a frameless scroll area; a column (`sideways` off) scrolls down only, as wide as it needs."""
    scroll = QScrollArea(widgetResizable=True)
    scroll.setFrameShape(QScrollArea.NoFrame)
    scroll.setWidget(widget)
    if not sideways:
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        scroll.setMinimumWidth(widget.minimumSizeHint().width() + scroll.verticalScrollBar().sizeHint().width())
    return scroll
