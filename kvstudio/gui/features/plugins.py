"""The plugin manager: what was loaded from where, what failed and why, and a reload."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from PySide6.QtCore import Qt, QUrl, Signal, Slot
from PySide6.QtGui import QColor, QDesktopServices
from PySide6.QtWidgets import (QFileDialog, QHBoxLayout, QLabel, QPushButton, QTableWidget, QTableWidgetItem,
                               QVBoxLayout, QWidget)

from kvstudio.core.plugins.loader import PluginManager, user_plugin_dir
from kvstudio.core.policies import available_policies
from kvstudio.gui.widgets.bars import message_bar
from kvstudio.gui.feature import Feature

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


def saved_plugin_folders(settings) -> list[str]:
    """Plugin folders the user added (they load before the window's features are built)."""
    saved = settings.value("plugin_folders")
    return json.loads(saved) if isinstance(saved, str) else []


class PluginsFeature(Feature):
    """The Plugins dock, the folders plugins come from, and the offer to install a dropped .py file."""

    policies_changed = Signal(list)  # the policy names registered after a reload

    def __init__(self, window):
        super().__init__(window)
        self.view = PluginsView(window.plugins)
        self.offer_text = QLabel("")
        self.offer_install = QPushButton("Install as plugin")
        self.offer_document = QPushButton("Add as a document")
        self.offer_dismiss = QPushButton("Not now")
        self.offer_bar = message_bar("question", self.offer_text, self.offer_install, self.offer_document,
                                     self.offer_dismiss)
        self.offered_plugin: Path | None = None

    def install(self) -> None:
        window = self.window
        window.add_dock("Plugins", self.view, "views")
        window.add_bar(self.offer_bar)
        self.view.reloaded.connect(self._reloaded)
        self.view.folder_added.connect(self.add_plugin_folder)
        self.offer_install.clicked.connect(self.install_offered_plugin)
        self.offer_document.clicked.connect(self._offered_file_as_document)
        self.offer_dismiss.clicked.connect(self.offer_bar.hide)

    def _reloaded(self) -> None:
        names = list(available_policies())
        self.policies_changed.emit(names)
        failed = len(self.window.plugins.errors)
        self.window.statusBar().showMessage(f"plugins reloaded: {len(names)} policies"
                                            + (f"; {failed} plugin(s) failed, see the Plugins view" if failed else ""))

    def add_plugin_folder(self, folder: str) -> None:
        plugins = self.window.plugins
        if folder not in plugins.extra_folders:
            plugins.extra_folders.append(folder)
            self.window.settings.setValue("plugin_folders", json.dumps(plugins.extra_folders))
        self.view.reload_plugins()

    def offer_plugin(self, path: Path) -> None:
        """A dropped .py file: ask (without blocking) whether to install it as a plugin."""
        self.offered_plugin = path
        target = user_plugin_dir() / path.name
        replace = " (replacing the file of that name)" if target.exists() else ""
        self.offer_text.setText(f"{path.name}: install it as a policy plugin in {target.parent}{replace}, or add "
                                "it as a document? Plugins are Python code and run with your rights: install "
                                "only code you trust.")
        self.offer_bar.show()

    @Slot()
    def _offered_file_as_document(self) -> None:
        path, self.offered_plugin = self.offered_plugin, None
        self.offer_bar.hide()
        if path is not None:
            self.window.prompt_area.documents.add_path(path)

    @Slot()
    def install_offered_plugin(self) -> None:
        window = self.window
        path, self.offered_plugin = self.offered_plugin, None
        self.offer_bar.hide()
        if path is None:
            return
        folder = user_plugin_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            staging = folder / f".{path.name}.installing"
            shutil.copyfile(path, staging)
            os.replace(staging, folder / path.name)  # never a half-copied plugin in the folder
        except OSError as error:
            window.show_error(f"could not install {path.name} into {folder}: {error.strerror or error}")
            return
        self.view.reload_plugins()
        record = next((r for r in window.plugins.records if Path(r.source) == folder / path.name), None)
        if record is None or record.error:
            window.show_error(f"installed {path.name}, but it did not load: "
                              f"{record.error if record else 'not found after reload'}")
        elif record.policies:
            window.form.policy.setCurrentText(record.policies[0])
            window.statusBar().showMessage(f"installed {path.name}: {', '.join(record.policies)}")
