"""Model loading: the Model box of the set-up column, the load on the worker thread, recent models.

When a model is in, the window's `model_info` is set and `model_loaded` is emitted for the other
features (views take its shape, documents get their token counts, ...).
"""

from __future__ import annotations

import json

from PySide6.QtCore import Signal, Slot

from kvstudio.core.recording.events import Recorder
from kvstudio.gui.feature import Feature
from kvstudio.gui.features.panels import ModelPanel

RECENT_MODELS = 8


class ModelLoading(Feature):
    load_model = Signal(str, str, str)  # to the worker (queued: it lives on the model's thread)
    model_loaded = Signal(object)  # ModelInfo, after the window's model_info is set

    def __init__(self, window):
        super().__init__(window)
        self.panel = ModelPanel()

    def install(self) -> None:
        window, worker = self.window, self.window.worker
        window.form.add_box(self.panel)
        self.panel.load_requested.connect(self.request_load)
        self.panel.cancel_requested.connect(worker.cancel_load)
        self.load_model.connect(worker.load)
        worker.load_progress.connect(self.on_load_progress)
        worker.loaded.connect(self.on_loaded)
        worker.load_failed.connect(self.on_load_failed)

    @Slot(str, str, str)
    def request_load(self, spec: str, device: str, dtype: str) -> None:
        window = self.window
        if not spec:
            window.show_error("give a model: default, a tiny model, a folder or a hub id")
            return
        if window.running:  # the load would wait for the run anyway; say so instead of queueing it
            window.show_error("a run is in progress: stop it or let it finish, then load another model")
            return
        window.hide_error()
        self.panel.set_loading(True)
        self.panel.status.setText(f"loading {spec}…")
        window.worker.reset_load_cancel()
        window.worker.load_recorder = Recorder()  # the memory timeline shows the load
        window.views.memory_view.follow(window.worker.load_recorder)
        self.load_model.emit(spec, device, dtype)

    @Slot(str, float)
    def on_load_progress(self, message: str, fraction: float) -> None:
        self.panel.show_progress(message, fraction)

    @Slot(object)
    def on_loaded(self, info) -> None:
        self.window.model_info = info
        self.panel.set_loading(False)
        self.panel.status.setText(info.description)
        self._remember_model(info.spec)
        self.panel.show_loaded(info.spec)
        self.model_loaded.emit(info)
        self.window.update_buttons()

    @Slot(str)
    def on_load_failed(self, message: str) -> None:
        info = self.window.model_info
        self.panel.set_loading(False)
        self.panel.status.setText("no model loaded" if info is None else info.description)
        self.window.show_error(message)

    def update_buttons(self) -> None:
        self.panel.load.setEnabled(not self.window.running and not self.panel.cancel.isEnabled())

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
