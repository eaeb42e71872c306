"""Starting and stopping runs: Run and Stop, the request to the worker, what the status bar says after.

`start()` is the one way a run begins (Run, each policy of a comparison, continuing from a saved
cache). When a run ends, `run_ended` carries its outcome to the other features (history first: it is
installed before the ones that react to a result).
"""

from __future__ import annotations

from PySide6.QtCore import Signal, Slot

from kvstudio.core.recording.events import Recorder
from kvstudio.core.storage import STORAGE_KEY, cache_label
from kvstudio.gui.feature import Feature
from kvstudio.gui.widgets.form_words import in_form_words
from kvstudio.gui.features.run_summary import describe_run
from kvstudio.gui.worker import RunOutcome, RunRequest


class RunControl(Feature):
    start_run = Signal(object)  # RunRequest -> the worker (queued)
    run_ended = Signal(object)  # RunOutcome, after the window's state and the views are up to date

    def install(self) -> None:
        window = self.window
        self.start_run.connect(window.worker.run)
        window.worker.run_finished.connect(self.on_run_finished)
        window.worker.run_status.connect(window.statusBar().showMessage)
        window.form.run_button.clicked.connect(self.request_run)
        window.form.stop_button.clicked.connect(self.stop)

    @Slot()
    def request_run(self) -> None:
        self.window.compare.drop_queue()
        form = self.window.form
        self.start(form.policy.currentText(), form.parameters(), label="")

    def start(self, policy: str, parameters: dict, label: str, start_from: str | None = None) -> bool:
        window, form = self.window, self.window.form
        problem = None
        if window.model_info is None:
            problem = "load a model first"
        elif window.running:
            problem = "a run is in progress: stop it first"
        elif not window.prompt_area.full_prompt().strip() and start_from is None:
            problem = "the prompt is empty: type one or drop a document"
        elif policy == form.policy.currentText() and (invalid := form.validate()):
            problem = f"policy parameters: {invalid}"
        if problem:
            window.show_error(problem)
            return False
        window.hide_error()
        window.recorder = Recorder()
        window.views.follow_new_run(window.recorder)
        window.running = True
        window.update_buttons()
        window.worker.reset_cancel()
        request = RunRequest(window.prompt_area.full_prompt(), policy, parameters, form.generation_settings(),
                             window.recorder, label, snapshot_path=window.snapshots.take_armed_path(),
                             start_from=start_from)
        window.runs.record_start(request)
        self.start_run.emit(request)
        window.statusBar().showMessage(f"running {policy}…")
        window.save_settings()
        return True

    @Slot()
    def stop(self) -> None:
        self.window.compare.drop_queue()
        self.window.worker.cancel_run()

    @Slot(object)
    def on_run_finished(self, outcome: RunOutcome) -> None:
        window = self.window
        window.running = False
        window.last_outcome = outcome
        window.views.refresh(include_hidden=True)
        request = outcome.request
        name = cache_label(request.policy, request.parameters.get(STORAGE_KEY))  # 'full+minicache', 'h2o-int4'
        if outcome.error:
            window.show_error(f"{name}: {in_form_words(outcome.error, window.form.labels())}")
            window.statusBar().showMessage("run failed")
        else:
            window.statusBar().showMessage(describe_run(name, outcome.result))
        window.update_buttons()
        self.run_ended.emit(outcome)
