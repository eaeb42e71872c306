"""The studio's shared state: what every feature may read, and signals for when it changes.

The features used to share a mutable window (`window.running` written in five places and polled
wherever a button was enabled). Now one small evented object holds what they share; the window
connects its signals to every feature's `update_buttons`, so buttons follow the state instead of
each writer remembering to refresh them.

- `busy`: the task that holds the model's thread now ("run", "evaluation", "fine-tune"), "" when it
  is free. Only the task runner claims and releases it (task_runner.py), so it can never be left set
  by a path that forgot to clear it.
- `model_info`: the loaded model (ModelInfo), None before the first load.
- `recorder`: the Recorder the live views follow (the run in progress, the last one, or a stored run
  reopened from the history); `last_outcome`: the last run's RunOutcome (what "Save cache" saves).
  Both are written by the feature that owns them (RunControl; Runs for a stored run) and only read by
  the others, when they act: nothing needs to hear that they changed.
"""

from __future__ import annotations

from PySide6.QtCore import QObject, Signal


class StudioState(QObject):
    busy_changed = Signal(str)  # the task that holds the model's thread now; "" when it is free
    model_changed = Signal(object)  # ModelInfo: a model has just been loaded

    def __init__(self, parent=None):
        super().__init__(parent)
        self._busy = ""
        self._model_info = None
        self.recorder = None  # Recorder | None
        self.last_outcome = None  # RunOutcome | None

    @property
    def busy(self) -> str:
        """The task holding the model's thread, or "" (so `if state.busy:` reads as a question)."""
        return self._busy

    @property
    def model_info(self):
        return self._model_info

    def claim(self, task: str) -> None:
        """`task` holds the model's thread from now on. Callers check `busy` first and tell the user why
        not; claiming twice is a bug, not a user error, so it raises."""
        if self._busy:
            raise RuntimeError(f"'{task}' cannot start: '{self._busy}' holds the model's thread")
        self._busy = task
        self.busy_changed.emit(task)

    def release(self, task: str) -> None:
        """`task` has ended; the model's thread is free for the next one."""
        if self._busy != task:
            raise RuntimeError(f"'{task}' released the model's thread, which '{self._busy or 'nothing'}' holds")
        self._busy = ""
        self.busy_changed.emit("")

    def set_model(self, info) -> None:
        self._model_info = info
        self.model_changed.emit(info)
