"""Starting and stopping runs: Run and Stop, the run's task on the model's thread, what the status bar
says after.

`start()` is the one way a run begins (Run, each policy of a comparison, continuing from a saved
cache). When a run ends, `run_ended` carries its outcome to the other features (history first: it is
installed before the ones that react to a result); the studio is no longer busy by then.
"""

from __future__ import annotations

from functools import partial

from PySide6.QtCore import Signal, Slot

from kvstudio.core.recording.events import Recorder
from kvstudio.core.storage import STORAGE_KEY, cache_label
from kvstudio.gui.feature import Feature
from kvstudio.gui.widgets.form_words import in_form_words
from kvstudio.gui.features.run_summary import describe_run
from kvstudio.gui.features.run_task import RunOutcome, RunRequest, run_task
from kvstudio.gui.task_runner import RunningTask


class RunControl(Feature):
    run_ended = Signal(object)  # RunOutcome, after the studio's state and the views are up to date

    def __init__(self, window):
        super().__init__(window)
        self.task: RunningTask | None = None  # the run in progress, or the last one

    def install(self) -> None:
        window = self.window
        window.form.run_button.clicked.connect(self.request_run)
        window.form.stop_button.clicked.connect(self.stop)

    @Slot()
    def request_run(self) -> None:
        self.window.compare.drop_queue()
        form = self.window.form
        self.start(form.policy.currentText(), form.parameters(), label="")

    def start(self, policy: str, parameters: dict, label: str, start_from: str | None = None,
              follow_up: str = "") -> bool:
        """Start a run; `start_from` a saved cache to restore, `follow_up` text fed after it (else it goes on)."""
        window, form, state = self.window, self.window.form, self.window.state
        # Each refusal with the check that holds while it lasts: its banner goes once it is fixed.
        refusals = (
            ("load a model first", lambda: state.model_info is None),
            ("a run is in progress: stop it first", lambda: bool(state.busy)),
            ("the prompt is empty: type one or drop a document",
             lambda: start_from is None and not window.prompt_area.full_prompt().strip()),
            ("policy parameters: {}", lambda: policy == form.policy.currentText() and form.problem()),
        )
        for message, holds in refusals:
            if found := holds():
                window.show_error(message.format(found), holds=holds)
                return False
        window.hide_error()
        state.recorder = Recorder()
        window.views.follow_new_run(state.recorder)
        request = RunRequest(window.prompt_area.full_prompt(), policy, parameters, form.generation_settings(),
                             state.recorder, label, snapshot_path=window.snapshots.take_armed_path(),
                             start_from=start_from, follow_up=follow_up)
        window.runs.record_start(request)
        outcome = RunOutcome(request)
        self.task = window.runner.start(run_task(outcome))
        self.task.status_changed.connect(window.statusBar().showMessage)
        self.task.done.connect(self.on_run_finished)
        self.task.failed.connect(partial(self._failed, outcome))
        window.statusBar().showMessage(f"running {policy}…")
        window.save_settings()
        return True

    @Slot()
    def stop(self) -> None:
        """Stop the run in progress within a step (safe from any thread: it only sets a token)."""
        self.window.compare.drop_queue()
        if self.task is not None:
            self.task.request_interruption()

    def _failed(self, outcome: RunOutcome, message: str) -> None:
        outcome.error = message
        self.on_run_finished(outcome)

    @Slot(object)
    def on_run_finished(self, outcome: RunOutcome) -> None:
        window = self.window
        window.state.last_outcome = outcome
        window.views.refresh(include_hidden=True)
        window.views.output_view.run_ended()  # "prefill N / N tokens" stayed up after the run
        request = outcome.request
        name = cache_label(request.policy, request.parameters.get(STORAGE_KEY))  # 'full+minicache', 'h2o-int4'
        if outcome.error:
            window.show_error(f"{name}: {in_form_words(outcome.error, window.form.labels())}")
            window.statusBar().showMessage("run failed")
        else:
            window.statusBar().showMessage(describe_run(name, outcome.result))
        self.run_ended.emit(outcome)
