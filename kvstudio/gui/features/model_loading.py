"""Model loading: the Model box of the set-up column, the load as a task on the model's thread, recent
models.

When a model is in, the studio's state takes it (`state.set_model`), and its `model_changed` tells the
other features (views take its shape, documents get their token counts, ...).
"""

from __future__ import annotations

import json

from PySide6.QtCore import Slot
from PySide6.QtWidgets import QWidget

from kvstudio.core.recording.events import Recorder
from kvstudio.gui.feature import Feature
from kvstudio.gui.features.panels import ModelPanel
from kvstudio.gui.task_runner import RunningTask
from kvstudio.gui.worker import load_task

RECENT_MODELS = 8


class ModelLoading(Feature):
    def __init__(self, window):
        super().__init__(window)
        self.panel = ModelPanel()
        self.task: RunningTask | None = None  # the load in progress, or the last one

    def install(self) -> None:
        self.window.form.add_box(self.panel)
        self.panel.load_requested.connect(self.request_load)
        self.panel.cancel_requested.connect(self.cancel)

    def add_row(self, label: str, widget: QWidget) -> None:
        """A row of the Model box, below the ones there (the fine-tune feature's adapter row)."""
        self.panel.layout().addRow(label, widget)

    @Slot(str, str, str)
    def request_load(self, spec: str, device: str, dtype: str) -> None:
        window = self.window
        if not spec:
            window.show_error("give a model: default, a tiny model, a folder or a hub id")
            return
        if window.state.busy:  # the load would wait for the run anyway; say so instead of queueing it
            window.show_error("a run is in progress: stop it or let it finish, then load another model")
            return
        window.hide_error()
        self.panel.set_loading(True)
        self.panel.status.setText(f"loading {spec}…")
        recorder = Recorder()  # the memory timeline shows the load
        window.views.follow_load(recorder)
        self.task = window.runner.start(load_task(window.worker, spec, device, dtype, recorder))
        self.task.status_changed.connect(self.panel.status.setText)
        self.task.progress_changed.connect(lambda percent: self.panel.show_progress(self.panel.status.text(),
                                                                                    percent / 100))
        self.task.done.connect(self.on_loaded)
        self.task.failed.connect(self.on_load_failed)

    @Slot()
    def cancel(self) -> None:
        """Cancel the load in progress (it stops at its next progress report; the previous model stays)."""
        if self.task is not None:
            self.task.request_interruption()

    @Slot(object)
    def on_loaded(self, info) -> None:
        self.panel.set_loading(False)
        self.panel.status.setText(info.description)
        self._remember_model(info.spec)
        self.panel.show_loaded(info.spec)
        self.window.state.set_model(info)  # the other features hear of it from the state

    @Slot(str)
    def on_load_failed(self, message: str) -> None:
        info = self.window.state.model_info
        self.panel.set_loading(False)
        self.panel.status.setText("no model loaded" if info is None else info.description)
        self.window.show_error(message)

    def update_buttons(self) -> None:
        self.panel.load.setEnabled(not self.window.state.busy and not self.panel.cancel.isEnabled())

    # -- recent models ------------------------------------------------------------------------------

    def _remember_model(self, spec: str) -> None:
        recent = [spec] + [m for m in self._recent_models() if m != spec]
        self.window.settings.setValue("recent_models", json.dumps(recent[:RECENT_MODELS]))
        self.panel.set_recent(recent[:RECENT_MODELS])

    def _recent_models(self) -> list[str]:
        saved = self.window.settings.value("recent_models")
        return json.loads(saved) if isinstance(saved, str) else []

    def restore_settings(self, settings) -> None:
        recent = self._recent_models()
        self.panel.set_recent(recent)
        if recent:
            self.panel.spec.setCurrentText(recent[0])
