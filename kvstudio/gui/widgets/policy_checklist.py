"""A list of policies with a check box each (Compare and Evaluate choose several this way)."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QListWidget, QListWidgetItem

FIRST_CHECKED = {"full", "streaming_llm", "h2o"}  # before the user has chosen: a useful first comparison


def checked_names(choices: QListWidget) -> list[str]:
    return [choices.item(i).text() for i in range(choices.count()) if choices.item(i).checkState() == Qt.Checked]


def offer(choices: QListWidget, names: list[str]) -> None:
    """Offer `names` (after a plugin reload, say), keeping what was checked; at first, FIRST_CHECKED."""
    checked = set(checked_names(choices)) if choices.count() else FIRST_CHECKED
    blocked = choices.blockSignals(True)
    choices.clear()
    for name in names:
        item = QListWidgetItem(name)
        item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
        item.setCheckState(Qt.Checked if name in checked else Qt.Unchecked)
        choices.addItem(item)
    choices.blockSignals(blocked)
