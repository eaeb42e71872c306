"""The set-up panels: model, documents. Each owns its widgets and says what the user chose."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QListWidget,
                               QListWidgetItem, QPlainTextEdit, QProgressBar, QPushButton, QSpinBox, QSplitter, QStyle,
                               QVBoxLayout)

from kvstudio.core.io.documents import Document, read_document
from kvstudio.core.errors import KVStudioError
from kvstudio.core.models.kv_pooling import split_kv_groups, with_kv_groups
from kvstudio.core.models.tiny import TINY_FAMILIES

# default+kv1: SmolLM2 with its 3 KV heads mean-pooled into 1 (GQA's initialisation; core/models/kv_pooling.py)
BUILTIN_MODELS = ["default", "default+kv1"] + [f"tiny-{family}" for family in TINY_FAMILIES]
PREVIEW_CHARS = 200_000  # of a selected document shown beside the list (a long PDF stays quick to show)


class ModelPanel(QGroupBox):
    load_requested = Signal(str, str, str)  # spec, device, dtype
    cancel_requested = Signal()

    def __init__(self, parent=None):
        super().__init__("Model", parent)
        self.spec = QComboBox(editable=True)
        self.spec.setToolTip("default (SmolLM2-135M-Instruct), a tiny test model, a model folder, "
                             "or a hub id already in the local Hugging Face cache")
        self.browse = QPushButton("Folder…")
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda"])
        self.dtype = QComboBox()
        self.dtype.addItems(["auto", "float32", "bfloat16", "float16"])
        self.kv_groups = QSpinBox(minimum=0, maximum=256)
        self.kv_groups.setSpecialValueText("as the model has")
        self.kv_groups.setToolTip("pool the model's KV heads into G groups at load time (the mean of each group's K/V "
                                  "projections, as GQA's uptraining starts from); G must divide the KV heads. The same "
                                  "as the spec suffix +kvG, e.g. default+kv1")
        self.load = QPushButton("Load")
        self.cancel = QPushButton("Cancel")
        self.cancel.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.hide()
        self.status = QLabel("no model loaded")
        self.status.setWordWrap(True)
        spec_row = QHBoxLayout()
        spec_row.addWidget(self.spec, 1)
        spec_row.addWidget(self.browse)
        buttons = QHBoxLayout()
        buttons.addWidget(self.load)
        buttons.addWidget(self.cancel)
        form = QFormLayout(self)
        form.addRow("model", spec_row)
        form.addRow("device", self.device)
        form.addRow("dtype", self.dtype)
        form.addRow("KV groups", self.kv_groups)
        form.addRow(buttons)
        form.addRow(self.progress)
        form.addRow(self.status)
        self.browse.clicked.connect(self._pick_folder)
        self.load.clicked.connect(self._request_load)
        self.cancel.clicked.connect(self.cancel_requested.emit)
        self.set_recent([])

    def set_recent(self, recent: list[str]) -> None:
        current = self.spec.currentText() or "default"
        self.spec.clear()
        self.spec.addItems(list(dict.fromkeys(recent + BUILTIN_MODELS)))
        self.spec.setCurrentText(current)

    def show_loaded(self, spec: str) -> None:
        """The model box names the model that is loaded (after a load, whoever asked for it); a derived
        spec SPEC+kvG shows as its base model with G in the KV groups box."""
        base, groups = split_kv_groups(spec)
        self.spec.setCurrentText(base)
        self.kv_groups.setValue(groups or 0)

    def _request_load(self) -> None:
        spec = self.spec.currentText().strip()
        if spec and self.kv_groups.value():
            try:
                spec = with_kv_groups(spec, self.kv_groups.value())  # a derived model: SPEC+kvG
            except KVStudioError as error:
                self.status.setText(str(error))
                return
        self.load_requested.emit(spec, self.device.currentText(), self.dtype.currentText())

    def _pick_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a Hugging Face model folder")
        if folder:
            self.spec.setCurrentText(folder)

    def set_loading(self, loading: bool) -> None:
        self.load.setEnabled(not loading)
        self.cancel.setEnabled(loading)
        self.progress.setVisible(loading)
        if loading:
            self.progress.setRange(0, 0)  # busy until the first fraction arrives

    def show_progress(self, message: str, fraction: float) -> None:
        self.status.setText(message)
        if fraction >= 0:
            self.progress.setRange(0, 100)
            self.progress.setValue(int(fraction * 100))


class DocumentList(QGroupBox):
    """Documents that go before the prompt. Checked documents are part of the next run."""

    added = Signal(object, object)  # key, Document
    refused = Signal(str)

    def __init__(self, parent=None):
        super().__init__("Documents", parent)
        self.setToolTip("Drop files or text anywhere on the window; checked documents precede the prompt")
        self.list = QListWidget()
        self.list.setMinimumHeight(48)
        self.list.setWordWrap(True)  # "report.pdf — 1,534 tokens" on two lines rather than cut
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.list.setTextElideMode(Qt.ElideMiddle)  # a name too long even for the widened list keeps both ends
        self.preview = QPlainTextEdit(readOnly=True)  # the selected document's text, to read before a run
        self.preview.setPlaceholderText("Drop files or text anywhere on the window, or Open…: checked documents "
                                        "go before the prompt. Select one to read it here.")
        self.open = QPushButton("Open…")
        self.remove = QPushButton("Remove")
        buttons = QHBoxLayout()
        buttons.addWidget(self.open)
        buttons.addWidget(self.remove)
        buttons.addStretch(1)
        shown = self.shown = QSplitter(Qt.Horizontal)
        shown.addWidget(self.list)
        shown.addWidget(self.preview)
        shown.setStretchFactor(0, 1)
        shown.setStretchFactor(1, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addWidget(shown, 1)
        layout.addLayout(buttons)
        self.list.currentItemChanged.connect(lambda item, _previous: self._show(item))
        self.documents: dict[int, Document] = {}
        self.token_counts: dict[int, int] = {}
        self._next_key = 0
        self.open.clicked.connect(self.open_files)
        self.remove.clicked.connect(self._remove_selected)

    def add_path(self, path: str | Path) -> bool:
        """Read and add a file; on any problem say why and add nothing."""
        try:
            document = read_document(path)
        except KVStudioError as error:
            self.refused.emit(f"not added: {error}")
            return False
        self._add(document)
        return True

    def add_text(self, text: str, name: str = "dropped text") -> bool:
        if not text.strip():
            self.refused.emit("not added: the dropped text is empty")
            return False
        self._add(Document(name, None, text))
        return True

    def _add(self, document: Document, checked: bool = True) -> None:
        key = self._next_key
        self._next_key += 1
        self.documents[key] = document
        item = QListWidgetItem()
        item.setData(Qt.UserRole, key)
        item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
        item.setCheckState(Qt.Checked if checked else Qt.Unchecked)
        self.list.addItem(item)
        self._label(key)
        self.list.setCurrentItem(item)  # its text shows beside the list
        self.added.emit(key, document)

    def _show(self, item) -> None:
        document = self.documents.get(item.data(Qt.UserRole)) if item is not None else None
        if document is None:
            self.preview.clear()
            return
        text = document.text
        if len(text) > PREVIEW_CHARS:
            text = text[:PREVIEW_CHARS] + f"\n… (the first {PREVIEW_CHARS:,} of {len(document.text):,} characters)"
        self.preview.setPlainText(text)

    # -- kept between launches ------------------------------------------------------------------------

    def saved_state(self) -> list[dict]:
        """Each document, in order: a file by its path (read again at the next launch), dropped text
        by its text; and whether it is checked."""
        entries = []
        for row in range(self.list.count()):
            item = self.list.item(row)
            document = self.documents[item.data(Qt.UserRole)]
            entry = {"name": document.name, "checked": item.checkState() == Qt.Checked}
            entry |= {"path": document.path} if document.path else {"text": document.text}
            entries.append(entry)
        return entries

    def restore_state(self, entries: list[dict]) -> list[str]:
        """Add the saved documents back; the names of those that could not be (a file gone or changed
        into something unreadable) are returned, so the user is told."""
        lost = []
        for entry in entries:
            if entry.get("path"):
                try:
                    document = read_document(entry["path"])
                except KVStudioError:
                    lost.append(entry.get("name") or entry["path"])
                    continue
            elif entry.get("text"):
                document = Document(entry.get("name") or "dropped text", None, entry["text"])
            else:
                continue
            self._add(document, checked=bool(entry.get("checked", True)))
        return lost

    def set_token_count(self, key: int, count: int) -> None:
        self.token_counts[key] = count
        self._label(key)

    def _label(self, key: int) -> None:
        item = self._item(key)
        if item is not None:
            count = self.token_counts.get(key)
            tokens = f"{count:,} tokens" if count is not None else "load a model to count tokens"
            document = self.documents[key]
            item.setText(f"{document.name} — {tokens}")
            item.setToolTip(f"{document.path or document.name} — {tokens}")
            self.fit_names()

    def fit_names(self) -> None:
        """Widen the list until each document's name fits on its line (the preview keeps a third):
        at 1280x800 half the box cut "passkey_document.txt" to "passkey_d…"."""
        sizes = self.shown.sizes()
        total = sum(sizes)
        if not total or not self.documents:
            return
        metrics = self.list.fontMetrics()
        style = self.list.style()
        # Beside the name: the check box, the item's margins, the list's frame and its scroll bar.
        around = (style.pixelMetric(QStyle.PM_IndicatorWidth) + 4 * style.pixelMetric(QStyle.PM_FocusFrameHMargin)
                  + 2 * self.list.frameWidth() + self.list.verticalScrollBar().sizeHint().width() + 8)
        needed = max(metrics.horizontalAdvance(d.name) for d in self.documents.values()) + around
        width = min(needed, total * 2 // 3)
        if width > sizes[0]:
            self.shown.setSizes([width, total - width])

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self.fit_names()  # the window was made smaller or larger: the names' room follows

    def _item(self, key: int):
        for row in range(self.list.count()):
            if self.list.item(row).data(Qt.UserRole) == key:
                return self.list.item(row)
        return None

    def checked_text(self) -> str:
        parts = []
        for row in range(self.list.count()):
            item = self.list.item(row)
            if item.checkState() == Qt.Checked:
                parts.append(self.documents[item.data(Qt.UserRole)].text)
        return "\n\n".join(parts)

    def open_files(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Add documents", "",
                                                "Documents (*.txt *.md *.py *.json *.jsonl *.pdf)")
        for path in paths:
            self.add_path(path)

    def _remove_selected(self) -> None:
        for item in self.list.selectedItems():
            key = item.data(Qt.UserRole)
            self.documents.pop(key, None)
            self.token_counts.pop(key, None)
            self.list.takeItem(self.list.row(item))
        self._show(self.list.currentItem())
