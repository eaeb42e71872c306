"""The policy box's storage fields: codec, group size, residual window, tier and recall, and
cross-layer merging (MiniCache: from which layer, retention threshold, interpolation t).

They travel with the policy's parameters as parameters["storage"] (kvstudio.core.storage's
StorageConfig fields), so a run, a comparison and the run history all carry them. A field that does
not apply (greyed: group size and residual under fp, recall under the device tier, the merge
settings with merge none) neither travels nor validates: what it still shows is only remembered for
when it applies again. Validation is StorageConfig's own; its message shows inline like the policy
form's, in the form's words. The fields are remembered between launches (`save_settings` /
`restore_settings`, called by the run form that holds them).
"""

from __future__ import annotations

import json

import torch
from PySide6.QtCore import Signal
from PySide6.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QLabel, QSpinBox, QWidget

from kvstudio.core.errors import KVStudioError
from kvstudio.core.storage import STORAGE_KEY, StorageConfig, available_codecs, codec_class
from kvstudio.gui.widgets.form_words import in_form_words

SPECS = {spec.name: spec for spec in StorageConfig.parameters()}  # each field's declaration: range, help, label
# The CLI's option -> this form's label, where they differ (for messages in the form's words).
OPTION_LABELS = {spec.option.removeprefix("--"): spec.form_label for spec in SPECS.values()
                 if spec.form_label != spec.option.removeprefix("--")}

SETTINGS_KEY = "storage"  # QSettings key: the fields as JSON
# What each remembered field must be to be restored (anything else, e.g. from a hand-edited file, is dropped).
SETTING_TYPES = {"codec": str, "tier": str, "merge": str, "group_size": int, "residual": int, "recall": int,
                 "merge_from": int, "merge_threshold": (int, float), "merge_t": (int, float)}


def codec_unavailable(name: str, device: str) -> str | None:
    """Why codec `name` cannot run on `device` (its own check's words), or None when it can."""
    cls = codec_class(name)
    if cls is None:  # fp: the model's own dtype
        return None
    try:
        cls().check(torch.device(device))
    except KVStudioError as error:
        return in_form_words(str(error), OPTION_LABELS)
    except TypeError:  # a plugin codec that needs options to be made: its run says what it needs
        return None
    return None


class StorageForm(QWidget):
    changed = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.codec = QComboBox()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # until a model says where it runs
        self.group_size = _spin_box(QSpinBox, SPECS["group_size"])
        self.residual = _spin_box(QSpinBox, SPECS["residual"])
        self.tier = QComboBox()
        self.tier.addItems(SPECS["tier"].choices)
        self.recall = _spin_box(QSpinBox, SPECS["recall"])
        self.merge = QComboBox()
        self.merge.addItems(SPECS["merge"].choices)
        self.merge_from = _spin_box(QSpinBox, SPECS["merge_from"])
        self.merge_from.setMinimum(-1)  # below the range: None, merging from half depth
        self.merge_from.setValue(-1)
        self.merge_from.setSpecialValueText("half depth")
        self.merge_threshold = _spin_box(QDoubleSpinBox, SPECS["merge_threshold"], decimals=3, singleStep=0.01)
        self.merge_t = _spin_box(QDoubleSpinBox, SPECS["merge_t"], decimals=2, singleStep=0.05)
        for name in ("codec", "tier", "merge"):
            getattr(self, name).setToolTip(SPECS[name].help)
        self.error = QLabel("")
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #d33;")
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for name in ("codec", "group_size", "residual", "tier", "recall", "merge", "merge_from", "merge_threshold",
                     "merge_t"):
            layout.addRow(SPECS[name].form_label, getattr(self, name))
        layout.addRow(self.error)
        self.set_codecs(list(available_codecs()))
        for spin in (self.group_size, self.residual, self.recall, self.merge_from, self.merge_threshold, self.merge_t):
            spin.valueChanged.connect(self._on_change)
        for combo in (self.codec, self.tier, self.merge):
            combo.currentIndexChanged.connect(self._on_change)
        self._on_change()

    def set_codecs(self, names: list[str]) -> None:
        """The codecs offered (after a plugin reload), keeping the one chosen; those that cannot run on
        the model's device are shown greyed, with the reason."""
        chosen = self.codec.currentText() or "fp"
        self.codec.blockSignals(True)
        self.codec.clear()
        self.codec.addItems(names)
        items = self.codec.model()
        for row, name in enumerate(names):
            reason = codec_unavailable(name, self.device)
            item = items.item(row)
            item.setEnabled(reason is None)
            item.setToolTip(reason or available_codecs().get(name, ""))
            if reason is not None and chosen == name:
                chosen = "fp"
        self.codec.setCurrentText(chosen if chosen in names else "fp")
        self.codec.blockSignals(False)

    def fit_device(self, device: str) -> None:
        """The model's device: codecs that need another (bnb-* on a CPU) are offered greyed, with why."""
        self.device = device
        self.set_codecs([self.codec.itemText(row) for row in range(self.codec.count())])
        self._on_change()

    def config(self) -> StorageConfig:
        """The storage the next run uses: the fields that apply; a greyed field is at its default."""
        return StorageConfig(**self.applicable_fields())

    def fields(self) -> dict:
        """Every field as shown, those greyed out included: what is remembered between launches."""
        return {"codec": self.codec.currentText() or "fp", "group_size": self.group_size.value(),
                "residual": self.residual.value(), "tier": self.tier.currentText(), "recall": self.recall.value(),
                "merge": self.merge.currentText()} | self.merge_fields()

    def merge_fields(self) -> dict:
        """The merge settings as shown, merge on or off: Compare's "h2o+minicache" takes them from here
        (its name turns merging on)."""
        return {"merge_from": None if self.merge_from.value() < 0 else self.merge_from.value(),
                "merge_threshold": round(self.merge_threshold.value(), 3), "merge_t": round(self.merge_t.value(), 2)}

    def applicable_fields(self) -> dict:
        """The fields that apply to the chosen codec, tier and merge; the others are left out (their
        defaults), so a value left in a greyed field can neither travel nor block a run."""
        applies = self._applies()
        return {name: value for name, value in self.fields().items() if applies.get(name, True)}

    def _applies(self) -> dict[str, bool]:
        """Whether each dependent field applies to the codec, tier and merge chosen."""
        quantized = self.codec.currentText() not in ("", "fp")
        merging = self.merge.currentText() != "none"
        return {"group_size": quantized, "residual": quantized, "recall": self.tier.currentText() == "host",
                "merge_from": merging, "merge_threshold": merging, "merge_t": merging}

    def parameters(self) -> dict:
        """{"storage": {...}} to add to the policy's parameters: the fields that apply; empty for the
        default (fp, device)."""
        return {} if self.config() == StorageConfig() else {STORAGE_KEY: self.applicable_fields()}

    def fit_model(self, n_layers: int) -> None:
        """A pair needs the layer after it: merging can start at layer 0 to n_layers - 2 of this model
        (the box refuses more, instead of the run failing later)."""
        self.merge_from.setMaximum(max(n_layers - 2, 0))
        self.merge_from.setToolTip(f"the first merged layer (0 to {n_layers - 2} on this model): pairs (L, L+1), "
                                   "(L+2, L+3), ...")

    def set_parameters(self, values: dict | None) -> None:
        values = values or {}
        defaults = StorageConfig()
        self.codec.setCurrentText(values.get("codec", defaults.codec))
        self.group_size.setValue(values.get("group_size", defaults.group_size))
        self.residual.setValue(values.get("residual", defaults.residual))
        self.tier.setCurrentText(values.get("tier", defaults.tier))
        self.recall.setValue(values.get("recall", defaults.recall))
        self.merge.setCurrentText(values.get("merge", defaults.merge))
        merge_from = values.get("merge_from", defaults.merge_from)
        self.merge_from.setValue(-1 if merge_from is None else merge_from)
        self.merge_threshold.setValue(values.get("merge_threshold", defaults.merge_threshold))
        self.merge_t.setValue(values.get("merge_t", defaults.merge_t))

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
            known = {k: v for k, v in values.items() if isinstance(v, SETTING_TYPES.get(k, ()))}
            self.set_parameters(known)

    def problem(self) -> str | None:
        """What is wrong with the storage fields, in the form's words; None when nothing. Changes
        nothing on screen (a refusal's banner asks it 4 times a second)."""
        try:
            self.config().validate()
        except KVStudioError as error:
            return in_form_words(str(error), OPTION_LABELS)
        return codec_unavailable(self.config().codec, self.device)  # chosen before, or restored from settings

    def validate(self) -> str | None:
        """`problem()`, shown inline (or the inline note cleared)."""
        message = self.problem()
        self.error.setText(message or "")
        return message

    def _on_change(self, *_):
        for name, applies in self._applies().items():  # greyed exactly where config() leaves a field out
            getattr(self, name).setEnabled(applies)
        self.validate()
        self.changed.emit()


def _spin_box(kind, spec, **options):
    """A spin box over the declared range, at the default, with the declaration's help as its tooltip."""
    box = kind(minimum=spec.minimum, maximum=spec.maximum, **options)
    box.setValue(spec.default if spec.default is not None else spec.minimum)
    box.setToolTip(spec.help)
    return box
