"""The Set-up column: the policy with its parameters and storage, the generation settings, Run and Stop.

It says what the next run is (`parameters()`, `generation_settings()`) and remembers it between
launches; RunControl starts and stops runs. Other features add their boxes to the column
(`add_box`: the Model box goes first).
"""

from __future__ import annotations

import json

from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                               QPushButton, QSpinBox, QVBoxLayout, QWidget)

from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.policies import available_policies
from kvstudio.core.storage import available_codecs
from kvstudio.gui.feature import Feature
from kvstudio.gui.widgets.scrolling import scrolling
from kvstudio.gui.widgets.policy_form import PolicyForm
from kvstudio.gui.widgets.storage_form import OPTION_LABELS, StorageForm

DEFAULT_BUDGET = 256  # what a policy's form starts with before the user sets one


class RunForm(Feature):
    def __init__(self, window):
        super().__init__(window)
        self.column = QWidget()
        self.column_layout = QVBoxLayout(self.column)
        self.column_layout.addStretch(1)

        self.shared_budget: int | None = None  # the budget of the last evicting policy shown, carried to the next
        self.policy_box = QGroupBox("Policy")
        self.policy = QComboBox()
        self.policy.addItems(list(available_policies()))
        self.policy_help = QLabel("")
        self.policy_help.setWordWrap(True)
        self.policy_help.setStyleSheet("color: #888;")
        self.policy_form = PolicyForm()
        self.chunk_size = QSpinBox(minimum=1, maximum=65536, value=512)
        self.chunk_size.setToolTip("prefill chunk size: the policy evicts between chunks")
        policy_layout = QFormLayout(self.policy_box)
        policy_layout.addRow("policy", self.policy)
        policy_layout.addRow(self.policy_help)
        policy_layout.addRow(self.policy_form)
        self.storage_form = StorageForm()  # codec, group size, residual, tier, recall (kvstudio.core.storage)
        policy_layout.addRow(self.storage_form)
        policy_layout.addRow("chunk size", self.chunk_size)

        self.generation_box = QGroupBox("Generation")
        self.max_new_tokens = QSpinBox(minimum=1, maximum=100_000, value=64)
        self.temperature = QDoubleSpinBox(minimum=0.0, maximum=5.0, singleStep=0.1, decimals=2, value=0.0)
        self.temperature.setToolTip("0 is greedy")
        self.seed = QSpinBox(minimum=0, maximum=2**31 - 1, value=0)
        self.chat = QCheckBox("use the chat template")
        self.ignore_eos = QCheckBox("ignore end of text (exactly max new tokens)")
        self.ignore_eos.setToolTip("go on generating past the model's end-of-text token (benchmarks)")
        self.measure_loss = QCheckBox("measure attention loss")
        self.measure_loss.setToolTip("the attention mass that falls on evicted entries, per layer and step, against "
                                     "a shadow cache of every key: it costs a full cache of keys beside the policy's")
        self.run_button = QPushButton("Run")
        self.run_button.setStyleSheet("font-weight: bold;")
        self.stop_button = QPushButton("Stop")
        generation = QFormLayout(self.generation_box)
        generation.addRow("max new tokens", self.max_new_tokens)
        generation.addRow("temperature", self.temperature)
        generation.addRow("seed", self.seed)
        generation.addRow(self.chat)
        generation.addRow(self.ignore_eos)
        generation.addRow(self.measure_loss)
        # Run and Stop sit below the column, outside its scroll area: always in reach at 800 px.
        self.dock_widget = QWidget()
        self.dock_layout = QVBoxLayout(self.dock_widget)
        self.dock_layout.setContentsMargins(0, 0, 0, 0)
        buttons = QHBoxLayout()
        buttons.setContentsMargins(8, 2, 8, 4)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.stop_button)
        self.dock_layout.addLayout(buttons)

    def install(self) -> None:
        self.add_box(self.policy_box)
        self.add_box(self.generation_box)
        # Scrolled once its boxes are in: the column is as wide as they need.
        self.dock_layout.insertWidget(0, scrolling(self.column, sideways=False), 1)
        self.window.add_dock("Set-up", self.dock_widget, "side", object_name="setup", scrolls=False)
        self.policy.currentTextChanged.connect(self._policy_chosen)
        self.window.state.model_changed.connect(self._model_loaded)
        self.window.plugins_feature.policies_changed.connect(self._policies_changed)

    def add_box(self, box: QWidget) -> None:
        """A box in the set-up column, below the ones already there."""
        self.column_layout.insertWidget(self.column_layout.count() - 1, box)  # above the closing stretch

    # -- what the next run is -----------------------------------------------------------------------

    def parameters(self) -> dict:
        """The policy's parameters as set (None left out), with the storage fields."""
        return {k: v for k, v in self.policy_form.values().items() if v is not None} | self.storage_form.parameters()

    def generation_settings(self) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens.value(), temperature=self.temperature.value(),
            seed=self.seed.value(), chunk_size=self.chunk_size.value(),
            chat_template=self.chat.isChecked() and self.chat.isEnabled(),
            ignore_eos=self.ignore_eos.isChecked(), measure_loss=self.measure_loss.isChecked(),
        )

    def validate(self) -> str | None:
        """The form's own message when the policy or storage fields are not valid, shown inline."""
        return self.policy_form.validate() or self.storage_form.validate()

    def problem(self) -> str | None:
        """That message without touching the inline notes (they follow each change already)."""
        return self.policy_form.problem() or self.storage_form.problem()

    def labels(self) -> dict[str, str]:
        """The CLI's option names -> this column's labels, for messages in the form's words."""
        return self.policy_form.labels() | OPTION_LABELS

    def update_buttons(self) -> None:
        state = self.window.state
        self.run_button.setEnabled(not state.busy and state.model_info is not None)
        self.stop_button.setEnabled(bool(state.busy))

    # -- policies -----------------------------------------------------------------------------------

    def _policy_chosen(self, name: str) -> None:
        """The new policy's form: its own parameters as last set, with the budget carried over from the
        policy shown before (between policies that need one), so policies are compared at one budget."""
        policy = available_policies()[name]
        previous = self.policy_form.policy_name
        if previous and previous in available_policies():
            values_before = self.policy_form.values()
            self.window.settings.setValue(f"policy_parameters/{previous}", json.dumps(values_before))
            if available_policies()[previous].requires_budget and values_before.get("budget") is not None:
                self.shared_budget = values_before["budget"]
        saved = self.window.settings.value(f"policy_parameters/{name}")
        if isinstance(saved, str):
            values = json.loads(saved)
        else:  # first use: a policy that needs a budget starts with one, so the form starts valid
            values = {"budget": DEFAULT_BUDGET} if policy.requires_budget else {}
        if policy.requires_budget and self.shared_budget is not None:
            values = values | {"budget": self.shared_budget}  # full keeps everything, whatever was set
        self.policy_form.set_policy(name, values)
        self.policy_help.setText(policy.summary)

    def _policies_changed(self, names: list) -> None:
        """After a plugin reload: offer what is registered now, keeping the choice if it survived."""
        current = self.policy.currentText()
        self.policy.blockSignals(True)
        self.policy.clear()
        self.policy.addItems(names)
        self.policy.blockSignals(False)
        self.policy.setCurrentText(current if current in names else "streaming_llm")
        self._policy_chosen(self.policy.currentText())
        self.storage_form.set_codecs(list(available_codecs()))  # plugins may add codecs too

    def _model_loaded(self, info) -> None:
        self.storage_form.fit_model(info.n_layers)
        self.storage_form.fit_device(info.device)
        self.chat.setEnabled(info.has_chat_template)
        if not info.has_chat_template:
            self.chat.setChecked(False)

    # -- settings -----------------------------------------------------------------------------------

    def restore_settings(self, settings) -> None:
        policy = settings.value("policy", "streaming_llm")
        self.policy.setCurrentText(policy if policy in available_policies() else "streaming_llm")
        self._policy_chosen(self.policy.currentText())
        for key, widget in (("chunk_size", self.chunk_size), ("max_new_tokens", self.max_new_tokens),
                            ("seed", self.seed)):
            value = settings.value(key)
            if value is not None:
                widget.setValue(int(value))
        if settings.value("temperature") is not None:
            self.temperature.setValue(float(settings.value("temperature")))
        self.storage_form.restore_settings(settings)

    def save_settings(self, settings) -> None:
        name = self.policy.currentText()
        settings.setValue("policy", name)
        settings.setValue(f"policy_parameters/{name}", json.dumps(self.policy_form.values()))
        settings.setValue("chunk_size", self.chunk_size.value())
        settings.setValue("max_new_tokens", self.max_new_tokens.value())
        settings.setValue("temperature", self.temperature.value())
        settings.setValue("seed", self.seed.value())
        self.storage_form.save_settings(settings)
