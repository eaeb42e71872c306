"""The plugin manager: what was loaded from where, what failed and why, and a reload."""

from __future__ import annotations

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import QColor, QDesktopServices
from PySide6.QtWidgets import (QFileDialog, QHBoxLayout, QLabel, QPushButton, QTableWidget, QTableWidgetItem,
                               QVBoxLayout, QWidget)

from ..core.plugins import PluginManager, user_plugin_dir

PROBLEM_STATUSES = ("error", "broken")
SAFETY_NOTE = ("Plugins are Python code and run with your rights. KV Studio loads only the files in the "
               "folders listed here and packages you installed; it never runs a policy named inside a run "
               "file, a cache file or a prompt.")


class PluginsView(QWidget):
    reloaded = Signal()
    folder_added = Signal(str)

    def __init__(self, manager: PluginManager, parent=None):
        super().__init__(parent)
        self.manager = manager
        self.note = QLabel(SAFETY_NOTE)
        self.note.setWordWrap(True)
        self.folders = QLabel("")
        self.folders.setWordWrap(True)
        self.folders.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["plugin", "status", "policies", "error"])
        self.table.horizontalHeader().setStretchLastSection(True)
        self.open_folder = QPushButton("Open plugins folder")
        self.add_folder = QPushButton("Add folder…")
        self.reload = QPushButton("Reload plugins")
        buttons = QHBoxLayout()
        for button in (self.open_folder, self.add_folder, self.reload):
            buttons.addWidget(button)
        buttons.addStretch(1)
        layout = QVBoxLayout(self)
        layout.addWidget(self.note)
        layout.addWidget(self.folders)
        layout.addWidget(self.table)
        layout.addLayout(buttons)
        self.open_folder.clicked.connect(self.open_user_folder)
        self.add_folder.clicked.connect(self._choose_folder)
        self.reload.clicked.connect(self.reload_plugins)
        self.show_records()

    def reload_plugins(self) -> None:
        self.manager.load()
        self.show_records()
        self.reloaded.emit()

    def show_records(self) -> None:
        self.folders.setText("Folders searched: " + " · ".join(str(f) for f in self.manager.folders))
        records = self.manager.records
        self.table.setRowCount(len(records))
        for row, record in enumerate(records):
            for column, value in enumerate((record.source, record.status, ", ".join(record.policies),
                                            record.error or "")):
                item = QTableWidgetItem(value)
                item.setToolTip(value)
                if record.status in PROBLEM_STATUSES:
                    item.setForeground(QColor("#d33"))
                self.table.setItem(row, column, item)
            if record.status == "broken":  # loaded, but some policy in it cannot be offered
                self.table.item(row, 1).setToolTip(f"not offered: {', '.join(record.broken)} cannot describe "
                                                   "its options (see the error)")
        self.table.resizeColumnsToContents()

    def open_user_folder(self) -> bool:
        folder = user_plugin_dir()
        folder.mkdir(parents=True, exist_ok=True)
        return QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))

    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Load policy plugins from this folder")
        if folder:
            self.folder_added.emit(folder)
