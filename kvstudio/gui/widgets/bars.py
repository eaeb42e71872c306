"""Message bars: a coloured strip with a text and buttons, shown inline instead of a modal dialog
(nothing blocks, and tests drive them like any widget)."""

from __future__ import annotations

from PySide6.QtWidgets import QHBoxLayout, QLabel, QWidget

STYLES = {"error": "background: #5a1d1d; color: #ffdede; border-radius: 3px;",
          "question": "background: #1d3a5a; color: #e6f0ff; border-radius: 3px;",
          "warning": "background: #5a4a1d; color: #fff3d6; border-radius: 3px;"}


def message_bar(kind: str, text: QLabel, *buttons) -> QWidget:
    """A hidden bar holding `text` (word-wrapped, stretching) and the buttons, in the kind's colours."""
    bar = QWidget()
    bar.setStyleSheet(STYLES[kind])
    text.setWordWrap(True)
    layout = QHBoxLayout(bar)
    layout.addWidget(text, 1)
    for button in buttons:
        layout.addWidget(button)
    bar.hide()
    return bar
