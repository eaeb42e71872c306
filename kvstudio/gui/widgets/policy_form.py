"""A form generated from a policy's declared parameters: built-ins and plugins alike.

int -> spin box (None shown as "auto" at the bottom of the range when allowed), float -> double
spin box, bool -> check box, str with choices -> combo box, other str -> line edit. Validation
runs the policy's own config check, and its message is shown inline, in the form's words
(form_words.py: the field labels, not the CLI's flags).
"""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QLabel, QLineEdit, QSpinBox,
                               QWidget)

from kvstudio.core.errors import KVStudioError
from kvstudio.core.policies import policy_class
from kvstudio.core.spec import create_policy
from kvstudio.core.policies.base import ParameterSpec
from kvstudio.gui.widgets.form_words import in_form_words

INT_MAX = 10_000_000


class PolicyForm(QWidget):
    changed = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.layout_ = QFormLayout(self)
        self.layout_.setContentsMargins(0, 0, 0, 0)
        self.error = self._error_label()
        self.policy_name = ""
        self.editors: dict[str, tuple[ParameterSpec, QWidget]] = {}

    def set_policy(self, name: str, values: dict | None = None) -> None:
        """Rebuild the form for `name`, filled with `values` where given, else the defaults."""
        while self.layout_.rowCount():
            self.layout_.removeRow(0)  # deletes the row widgets, the error label among them
        self.error = self._error_label()
        self.policy_name, self.editors = name, {}
        values = values or {}
        for spec in policy_class(name).Config.parameters():
            editor = self._editor(spec)
            self._set_value(spec, editor, values.get(spec.name, spec.default))
            editor.setToolTip(spec.help)
            self.editors[spec.name] = (spec, editor)
            self.layout_.addRow(self.label_for(spec), editor)
        self.layout_.addRow(self.error)
        self.validate()

    @staticmethod
    def label_for(spec: ParameterSpec) -> str:
        return spec.name.replace("_", " ")

    def labels(self) -> dict[str, str]:
        """Option name (as the CLI spells it) -> this form's label, for messages in the form's words."""
        return {spec.option.removeprefix("--"): self.label_for(spec) for spec, _ in self.editors.values()}

    @staticmethod
    def _error_label() -> QLabel:
        label = QLabel("")
        label.setWordWrap(True)
        label.setStyleSheet("color: #d33;")
        return label

    def _editor(self, spec: ParameterSpec) -> QWidget:
        if spec.type is bool:
            editor = QCheckBox()
            editor.toggled.connect(self._on_change)
        elif spec.type is int:
            low = int(spec.minimum) if spec.minimum is not None else -INT_MAX
            editor = QSpinBox(minimum=low - 1 if spec.optional else low,
                              maximum=int(spec.maximum) if spec.maximum is not None else INT_MAX)
            if spec.optional:
                # None keeps everything for the budget; elsewhere it means "derived from the rest".
                editor.setSpecialValueText("none (keep all)" if spec.name == "budget" else "auto")
            editor.valueChanged.connect(self._on_change)
        elif spec.type is float:
            editor = QDoubleSpinBox(minimum=spec.minimum if spec.minimum is not None else -1e9,
                                    maximum=spec.maximum if spec.maximum is not None else 1e9, decimals=4)
            editor.valueChanged.connect(self._on_change)
        elif spec.choices:
            editor = QComboBox()
            editor.addItems([str(c) for c in spec.choices])
            editor.currentIndexChanged.connect(self._on_change)
        else:
            editor = QLineEdit()
            editor.textChanged.connect(self._on_change)
        return editor

    @staticmethod
    def _set_value(spec: ParameterSpec, editor: QWidget, value) -> None:
        if isinstance(editor, QCheckBox):
            editor.setChecked(bool(value))
        elif isinstance(editor, QSpinBox):
            editor.setValue(editor.minimum() if value is None else int(value))
        elif isinstance(editor, QDoubleSpinBox):
            editor.setValue(float(value or 0.0))
        elif isinstance(editor, QComboBox):
            editor.setCurrentText(str(value))
        else:
            editor.setText("" if value is None else str(value))

    def values(self) -> dict:
        """The parameters as typed; None where an optional field says "none"."""
        result = {}
        for name, (spec, editor) in self.editors.items():
            if isinstance(editor, QCheckBox):
                result[name] = editor.isChecked()
            elif isinstance(editor, QSpinBox):
                result[name] = None if spec.optional and editor.value() == editor.minimum() else editor.value()
            elif isinstance(editor, QDoubleSpinBox):
                result[name] = editor.value()
            elif isinstance(editor, QComboBox):
                result[name] = editor.currentText()
            else:
                result[name] = editor.text() or None
        return result

    def set_values(self, values: dict) -> None:
        for name, value in values.items():
            if name in self.editors:
                spec, editor = self.editors[name]
                self._set_value(spec, editor, value)
        self.validate()

    def problem(self) -> str | None:
        """The policy's own error for these values, in the form's words; None when they are valid.
        Changes nothing on screen: a refusal's banner asks it 4 times a second whether it still holds."""
        try:
            create_policy(self.policy_name, **self.values())  # guarded: a plugin's fault shows here too
        except (KVStudioError, TypeError) as error:
            return in_form_words(str(error), self.labels())
        return None

    def validate(self) -> str | None:
        """`problem()`, shown inline (or the inline note cleared)."""
        message = self.problem()
        self.error.setText(message or "")
        return message

    def _on_change(self, *_):
        self.validate()
        self.changed.emit()
