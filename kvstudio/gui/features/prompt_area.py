"""The centre of the window: the documents that precede the prompt, the prompt, and drops onto the window.

A dropped file becomes a document (a .py file is offered as a plugin first: the Plugins feature asks);
dropped text becomes a document. Token counts come from the model's thread once a model is in. The
documents (files by path, dropped text as text) and the prompt come back at the next launch.
"""

from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import Signal, Slot
from PySide6.QtWidgets import QGroupBox, QPlainTextEdit, QVBoxLayout

from kvstudio.gui.feature import Feature
from kvstudio.gui.features.panels import DocumentList


class PromptArea(Feature):
    count_tokens = Signal(object, str)  # document key, text -> the worker

    def __init__(self, window):
        super().__init__(window)
        self.documents = DocumentList()
        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("Type a prompt (it follows the checked documents), or drop files here.")
        prompt_box = QGroupBox("Prompt")
        QVBoxLayout(prompt_box).addWidget(self.prompt)
        self.prompt_box = prompt_box

    def install(self) -> None:
        window = self.window
        window.add_to_centre(self.documents, 1)
        window.add_to_centre(self.prompt_box, 1)
        self.documents.added.connect(self._document_added)
        self.documents.refused.connect(window.show_error)
        self.count_tokens.connect(window.worker.count_tokens)
        window.worker.tokens_counted.connect(self.on_tokens_counted)
        window.state.model_changed.connect(self._count_all)
        window.menu("&File").addAction("Open documents…", self.documents.open_files)
        window.setAcceptDrops(True)  # the window hands its drag and drop events to drag_entered / dropped

    def full_prompt(self) -> str:
        """The checked documents, then the typed prompt."""
        parts = [self.documents.checked_text(), self.prompt.toPlainText()]
        return "\n\n".join(part for part in parts if part.strip())

    # -- kept between launches -----------------------------------------------------------------------

    def restore_settings(self, settings) -> None:
        saved = settings.value("documents")
        lost = self.documents.restore_state(json.loads(saved)) if isinstance(saved, str) else []
        prompt = settings.value("prompt")
        if isinstance(prompt, str):
            self.prompt.setPlainText(prompt)
        if lost:
            self.window.show_error(f"not restored from the last session: {', '.join(lost)} (moved, deleted or "
                                   "no longer readable); open it again to use it")

    def save_settings(self, settings) -> None:
        settings.setValue("documents", json.dumps(self.documents.saved_state()))
        settings.setValue("prompt", self.prompt.toPlainText())

    # -- token counts -------------------------------------------------------------------------------

    def _document_added(self, key, document) -> None:
        if self.window.state.model_info is not None:
            self.count_tokens.emit(key, document.text)

    def _count_all(self, _info) -> None:
        for key, document in self.documents.documents.items():
            self.count_tokens.emit(key, document.text)

    @Slot(object, int)
    def on_tokens_counted(self, key, count: int) -> None:
        self.documents.set_token_count(key, count)

    # -- drops --------------------------------------------------------------------------------------

    def drag_entered(self, event) -> None:
        if event.mimeData().hasUrls() or event.mimeData().hasText():
            event.acceptProposedAction()

    def dropped(self, event) -> None:
        self.handle_drop(event.mimeData())
        event.acceptProposedAction()

    def handle_drop(self, mime) -> None:
        """Files become documents (or are refused with a reason); plain text becomes a document."""
        if mime.hasUrls():
            for url in mime.urls():
                if url.isLocalFile() and url.toLocalFile().endswith(".py") and Path(url.toLocalFile()).is_file():
                    self.window.plugins_feature.offer_plugin(Path(url.toLocalFile()))
                elif url.isLocalFile():
                    self.documents.add_path(url.toLocalFile())
                else:
                    self.window.show_error(f"not added: {url.toString()} is not a local file")
        elif mime.hasText():
            self.documents.add_text(mime.text())
