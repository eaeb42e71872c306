"""The policy box's storage fields: codec, group size, residual window, tier and recall.

They travel with the policy's parameters as parameters["storage"] (kvstudio.core.storage's
StorageConfig fields), so a run, a comparison and the run history all carry them. Validation is
StorageConfig's own; its message shows inline like the policy form's. The fields are remembered
between launches (`save_settings` / `restore_settings`, called by the run form that holds them).
"""

from __future__ import annotations

import json

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QComboBox, QFormLayout, QLabel, QSpinBox, QWidget

from ..core.errors import KVStudioError
from ..core.storage import STORAGE_KEY, StorageConfig, available_codecs
from ..core.storage.base import TIERS

SETTINGS_KEY = "storage"  # QSettings key: the fields as JSON


class StorageForm(QWidget):
    changed = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        defaults = StorageConfig()
        self.codec = QComboBox()
        self.codec.setToolTip("how kept entries are stored: fp is the model's dtype; int8/int4 quantize keys per "
                              "channel and values per token (KIVI); bnb-* need CUDA")
        self.group_size = QSpinBox(minimum=2, maximum=4096, value=defaults.group_size)
        self.group_size.setToolTip("entries per key group and channels per value group")
        self.residual = QSpinBox(minimum=0, maximum=1_000_000, value=defaults.residual)
        self.residual.setToolTip("newest entries kept in full precision until they leave this window")
        self.tier = QComboBox()
        self.tier.addItems(TIERS)
        self.tier.setToolTip("device: evicted entries are dropped; host: they move to host memory and the blocks "
                             "the current query would attend to come back for the step")
        self.recall = QSpinBox(minimum=0, maximum=1_000_000, value=defaults.recall)
        self.recall.setToolTip("host blocks brought back each step (tier host)")
        self.error = QLabel("")
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #d33;")
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for label, editor in (("codec", self.codec), ("group size", self.group_size), ("residual", self.residual),
                              ("tier", self.tier), ("recall blocks", self.recall)):
            layout.addRow(label, editor)
        layout.addRow(self.error)
        self.set_codecs(list(available_codecs()))
        for spin in (self.group_size, self.residual, self.recall):
            spin.valueChanged.connect(self._on_change)
        for combo in (self.codec, self.tier):
            combo.currentIndexChanged.connect(self._on_change)
        self._on_change()

    def set_codecs(self, names: list[str]) -> None:
        """The codecs offered (after a plugin reload), keeping the one chosen."""
        chosen = self.codec.currentText() or "fp"
        self.codec.blockSignals(True)
        self.codec.clear()
        self.codec.addItems(names)
        self.codec.setCurrentText(chosen if chosen in names else "fp")
        self.codec.blockSignals(False)

    def config(self) -> StorageConfig:
        return StorageConfig(codec=self.codec.currentText() or "fp", group_size=self.group_size.value(),
                             residual=self.residual.value(), tier=self.tier.currentText(), recall=self.recall.value())

    def fields(self) -> dict:
        """The StorageConfig fields this form sets."""
        config = self.config()
        return {"codec": config.codec, "group_size": config.group_size, "residual": config.residual,
                "tier": config.tier, "recall": config.recall}

    def parameters(self) -> dict:
        """{"storage": {...}} to add to the policy's parameters; empty for the default (fp, device)."""
        return {} if self.config() == StorageConfig() else {STORAGE_KEY: self.fields()}

    def set_parameters(self, values: dict | None) -> None:
        values = values or {}
        defaults = StorageConfig()
        self.codec.setCurrentText(values.get("codec", defaults.codec))
        self.group_size.setValue(values.get("group_size", defaults.group_size))
        self.residual.setValue(values.get("residual", defaults.residual))
        self.tier.setCurrentText(values.get("tier", defaults.tier))
        self.recall.setValue(values.get("recall", defaults.recall))

    def save_settings(self, settings) -> None:
        settings.setValue(SETTINGS_KEY, json.dumps(self.fields()))

    def restore_settings(self, settings) -> None:
        """The fields as last saved; a value that is not readable leaves the defaults (a codec that is not
        loaded now stays unselected, and an invalid combination shows its message inline, as typed)."""
        saved = settings.value(SETTINGS_KEY)
        try:
            values = json.loads(saved) if isinstance(saved, str) else None
        except ValueError:
            values = None
        if isinstance(values, dict):
            known = {k: v for k, v in values.items() if isinstance(v, str if k in ("codec", "tier") else int)}
            self.set_parameters(known)

    def validate(self) -> str | None:
        try:
            self.config().validate()
        except KVStudioError as error:
            self.error.setText(str(error))
            return str(error)
        self.error.setText("")
        return None

    def _on_change(self, *_):
        self.recall.setEnabled(self.tier.currentText() == "host")
        quantized = self.codec.currentText() not in ("", "fp")
        self.group_size.setEnabled(quantized)
        self.residual.setEnabled(quantized)
        self.validate()
        self.changed.emit()
