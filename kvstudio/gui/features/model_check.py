"""Check model: a row of the Model box that compares the engine under `full` with transformers on the
loaded model (core/evaluate/conformance.py, what `kvstudio check-model` prints) and says "exact" or
where it differs, with the cache's bytes per token. Runs as a task on the model's thread.
"""

from __future__ import annotations

from PySide6.QtCore import Slot
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QWidget

from kvstudio.core.evaluate.conformance import check_model
from kvstudio.core.units import format_bytes
from kvstudio.gui.feature import Feature
from kvstudio.gui.task_runner import RunningTask, Task


def check_task() -> Task:
    return Task("model check", lambda engine, state: check_model(engine), explain={"stage": "run"})


class ModelCheckRow(QWidget):
    def __init__(self):
        super().__init__()
        self.check = QPushButton("Check model")
        self.check.setToolTip("compare the engine under full with transformers' own forward and cache on this "
                              "model (a short prompt, in one chunk and in chunks): exact, or where it differs")
        self.result = QLabel("not checked")
        self.result.setWordWrap(True)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.check)
        layout.addWidget(self.result, 1)


class ModelCheckFeature(Feature):
    def __init__(self, window):
        super().__init__(window)
        self.row = ModelCheckRow()
        self.task: RunningTask | None = None

    def install(self) -> None:
        self.window.loading.add_row("exact?", self.row)
        self.row.check.clicked.connect(self.start)
        self.window.state.model_changed.connect(lambda _info: self.row.result.setText("not checked"))

    @Slot()
    def start(self) -> None:
        if self.window.state.busy:
            self.window.show_error("a run is in progress: stop it or let it finish, then check the model")
            return
        self.row.result.setText("checking…")
        self.task = self.window.runner.start(check_task())
        self.task.done.connect(self.show_result)
        self.task.failed.connect(self.show_failure)

    @Slot(object)
    def show_result(self, result) -> None:
        lines = result.lines()
        self.row.result.setText(f"{lines[-1].split(':')[0]}; cache {format_bytes(result.bytes_per_token)} per token")
        self.row.result.setToolTip("\n".join(lines))
        if not result.exact:
            self.window.show_error(lines[-1])

    @Slot(str)
    def show_failure(self, message: str) -> None:
        self.row.result.setText("check failed")
        self.window.show_error(message)

    def update_buttons(self) -> None:
        self.row.check.setEnabled(not self.window.state.busy and self.window.state.model_info is not None)
