"""One way to run long work on the model's thread: loading, a run, a sweep, a fine-tune session, a cache
save, applying an adapter.

A feature describes the work as a `Task` (a function of the engine and a `TaskState`) and starts it
with `TaskRunner.start`, which hands back the task's `TaskState`. As in Orange, the state is all a
running task may do (`set_status`, `set_progress_value`, `set_partial_result`,
`is_interruption_requested`) and all the GUI hears back (`status_changed`, `progress_changed`,
`partial_result`, then `done` or `failed`).

What the runner does the same for every task, so no feature writes it again:
- an exclusive task claims the studio's busy state (state.py) before it is queued and releases it
  when it ends, BEFORE `done`/`failed` reach the feature: Compare starts its next run from the end
  of the last one, and must find the thread free;
- "no model loaded" when the task needs the engine and there is none;
- whatever the work raises becomes the banner's line through `tasks.banner_text`, and nothing else:
  the same failure reads the same in a run, a sweep, a session or a save;
- Stop sets the task's CancelToken directly (the model's thread is busy, a queued call would wait);
  the token is made with the task, so a Stop pressed before the work begins is never lost;
- the state's public signals are emitted on the GUI thread (the work's calls are queued to it), so
  any slot, a lambda included, may listen.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from PySide6.QtCore import QObject, Signal, Slot

from kvstudio.core.errors import KVStudioError
from kvstudio.core.runtime.session import CancelToken
from kvstudio.gui.tasks import banner_text

PROGRESS_STEP = 1.0  # percent: progress is sent on when it moves by a visible amount, not per call


@dataclass
class Task:
    name: str  # what it is called in the busy state: "run", "evaluation", "fine-tune", "cache save", ...
    work: Callable  # work(engine, state) -> result, called on the model's thread
    exclusive: bool = True  # claims the busy state while it runs (Run, Compare, Evaluate, Load wait for it)
    needs_model: bool = True  # refused with "no model loaded" when no engine is loaded
    explain: dict = field(default_factory=dict)  # banner_text's context: stage, chunk_size, policy, model


class TaskState(QObject):
    """One task's progress and end. The `set_*` methods and `is_interruption_requested` are for the work,
    on the model's thread; `request_interruption` may be called from any thread; the signals reach the
    GUI thread."""

    status_changed = Signal(str)
    progress_changed = Signal(float)  # percent, 0 to 100
    partial_result = Signal(object)  # something the work has finished before the whole (a sweep's cell)
    done = Signal(object)  # the work's return value
    failed = Signal(str)  # the banner's line for what the work raised

    # Sent from the model's thread to this object's slots, which live on the GUI thread (queued):
    # they re-emit the public signals there, in the order the work sent them.
    _status = Signal(str)
    _progress = Signal(float)
    _partial = Signal(object)
    _ended = Signal(object, object)  # result, banner line (None when the work returned)

    def __init__(self, task: Task, on_end: Callable[[TaskState], None]):
        super().__init__()
        self.task = task
        self.cancel = CancelToken()  # handed to the core's loops, which check it between steps
        self.running = True
        self._on_end = on_end
        self._sent_progress: float | None = None
        self._status.connect(self._deliver_status)
        self._progress.connect(self._deliver_progress)
        self._partial.connect(self._deliver_partial)
        self._ended.connect(self._deliver_end)

    # -- for the work, on the model's thread ------------------------------------------------------

    def set_status(self, text: str) -> None:
        self._status.emit(text)

    def set_progress_value(self, percent: float) -> None:
        percent = max(0.0, min(100.0, float(percent)))
        last = self._sent_progress
        if last is None or abs(percent - last) >= PROGRESS_STEP or (percent == 100.0 and last != 100.0):
            self._sent_progress = percent
            self._progress.emit(percent)

    def set_partial_result(self, value) -> None:
        self._partial.emit(value)

    def is_interruption_requested(self) -> bool:
        return self.cancel.cancelled

    # -- from any thread --------------------------------------------------------------------------

    def request_interruption(self) -> None:
        self.cancel.cancel()

    # -- on the GUI thread ------------------------------------------------------------------------

    @Slot(str)
    def _deliver_status(self, text: str) -> None:
        self.status_changed.emit(text)

    @Slot(float)
    def _deliver_progress(self, percent: float) -> None:
        self.progress_changed.emit(percent)

    @Slot(object)
    def _deliver_partial(self, value) -> None:
        self.partial_result.emit(value)

    @Slot(object, object)
    def _deliver_end(self, result, error) -> None:
        self.running = False
        self._on_end(self)  # the busy state is free before anyone hears the task ended
        if error is None:
            self.done.emit(result)
        else:
            self.failed.emit(error)


class TaskExecutor(QObject):
    """Lives on the model's thread and runs each task queued to it, one after the other."""

    def __init__(self, worker):
        super().__init__()
        self.worker = worker  # the StudioWorker: it holds the loaded engine, on this same thread

    @Slot(object)
    def execute(self, state: TaskState) -> None:
        task = state.task
        try:
            if task.needs_model and self.worker.engine is None:
                raise KVStudioError("no model loaded: load one first")
            self.worker.model_thread_ids.add(threading.get_ident())
            result = task.work(self.worker.engine, state)
        except (Exception, SystemExit) as error:  # the studio stays usable whatever a task does
            state._ended.emit(None, banner_text(error, **task.explain))
            return
        state._ended.emit(result, None)


class TaskRunner(QObject):
    """On the GUI thread: starts tasks on the model's thread and keeps the busy state honest."""

    _queue = Signal(object)  # TaskState -> the executor (queued: it lives on the model's thread)

    def __init__(self, state, worker, thread, parent=None):
        super().__init__(parent)
        self.state = state
        self.executor = TaskExecutor(worker)  # no parent: it is moved to the model's thread
        self.executor.moveToThread(thread)
        self._queue.connect(self.executor.execute)
        self.active: list[TaskState] = []  # started and not yet ended, oldest first

    def start(self, task: Task) -> TaskState:
        """Queue `task` on the model's thread. An exclusive task claims the busy state first: check
        `state.busy` before calling (and tell the user why not)."""
        if task.exclusive:
            self.state.claim(task.name)
        running = TaskState(task, self._ended)
        self.active.append(running)
        self._queue.emit(running)
        return running

    def interrupt_all(self) -> None:
        """Ask every task started and not ended to stop (the window is closing)."""
        for running in self.active:
            running.request_interruption()

    def _ended(self, running: TaskState) -> None:
        self.active.remove(running)
        if running.task.exclusive:
            self.state.release(running.task.name)
