"""One way to run long work on the model's thread: loading, a run, a sweep, a fine-tune session, a cache
save, applying an adapter.

A feature describes the work as a `Task` (a function of the engine and a `TaskState`) and starts it
with `TaskRunner.start`, which hands back a `RunningTask`. As in Orange, the `TaskState` is all the
work may do (`set_status`, `set_progress_value`, `set_partial_result`, `is_interruption_requested`);
the `RunningTask` is all the GUI hears back (`status_changed`, `progress_changed`, `partial_result`,
then `done` or `failed`) and its Stop (`request_interruption`).

What the runner does the same for every task, so no feature writes it again:
- an exclusive task claims the studio's busy state (state.py) before it is queued and releases it
  when it ends, BEFORE `done`/`failed` reach the feature: Compare starts its next run from the end
  of the last one, and must find the thread free;
- "no model loaded" when the task needs the engine and there is none;
- whatever the work raises becomes the banner's line through `tasks.banner_text`, and nothing else:
  the same failure reads the same in a run, a sweep, a session or a save;
- Stop sets the task's CancelToken directly (the model's thread is busy, a queued call would wait);
  the token is made with the task, so a Stop pressed before the work begins is never lost;
- the RunningTask's signals are emitted on the GUI thread, so any slot, a lambda included, may listen.

Why two objects for one task: the work runs on the model's thread, and a QObject whose last reference
is dropped there is destroyed there, which Qt does not allow for an object of the GUI thread. So the
work gets a plain `TaskState`, which reports through the executor (a QObject that lives as long as
the thread), and only the GUI thread ever holds the `RunningTask`.
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


class TaskState:
    """What the work of a task may do, on the model's thread."""

    def __init__(self, task_id: int, cancel: CancelToken, executor: TaskExecutor):
        self.cancel = cancel  # handed to the core's loops, which check it between steps
        self._id = task_id
        self._executor = executor
        self._sent_progress: float | None = None

    def set_status(self, text: str) -> None:
        self._executor.status.emit(self._id, text)

    def set_progress_value(self, percent: float) -> None:
        percent = max(0.0, min(100.0, float(percent)))
        last = self._sent_progress
        if last is None or abs(percent - last) >= PROGRESS_STEP or (percent == 100.0 and last != 100.0):
            self._sent_progress = percent
            self._executor.progress.emit(self._id, percent)

    def set_partial_result(self, value) -> None:
        self._executor.partial.emit(self._id, value)

    def is_interruption_requested(self) -> bool:
        return self.cancel.cancelled


class RunningTask(QObject):
    """A task started and what the GUI hears of it; lives on the GUI thread only."""

    status_changed = Signal(str)
    progress_changed = Signal(float)  # percent, 0 to 100
    partial_result = Signal(object)  # something the work has finished before the whole (a sweep's cell)
    done = Signal(object)  # the work's return value
    failed = Signal(str)  # the banner's line for what the work raised

    def __init__(self, task: Task):
        super().__init__()  # no parent: it goes when the runner and the feature that started it let go
        self.task = task
        self.cancel = CancelToken()
        self.running = True

    def request_interruption(self) -> None:
        """Ask the work to stop at its next check (safe from any thread: it only sets a token)."""
        self.cancel.cancel()


class TaskExecutor(QObject):
    """Lives on the model's thread and runs each task queued to it, one after the other; its signals
    carry what the work reports to the runner, on the GUI thread (queued, in the order sent)."""

    status = Signal(int, str)
    progress = Signal(int, float)
    partial = Signal(int, object)
    ended = Signal(int, object, object)  # task id, result, banner line (None when the work returned)

    def __init__(self, worker):
        super().__init__()
        self.worker = worker  # the StudioWorker: it holds the loaded engine, on this same thread

    @Slot(int, object, object)
    def execute(self, task_id: int, task: Task, cancel: CancelToken) -> None:
        state = TaskState(task_id, cancel, self)
        try:
            if task.needs_model and self.worker.engine is None:
                raise KVStudioError("no model loaded: load one first")
            self.worker.model_thread_ids.add(threading.get_ident())
            result = task.work(self.worker.engine, state)
        except (Exception, SystemExit) as error:  # the studio stays usable whatever a task does
            self.ended.emit(task_id, None, banner_text(error, **task.explain))
            return
        self.ended.emit(task_id, result, None)


class TaskRunner(QObject):
    """On the GUI thread: starts tasks on the model's thread and keeps the busy state honest."""

    _queue = Signal(int, object, object)  # task id, Task, CancelToken -> the executor (queued: its thread)

    def __init__(self, state, worker, thread, parent=None):
        super().__init__(parent)
        self.state = state
        self.executor = TaskExecutor(worker)  # no parent: it is moved to the model's thread
        self.executor.moveToThread(thread)
        self._queue.connect(self.executor.execute)
        self.executor.status.connect(self._status)
        self.executor.progress.connect(self._progress)
        self.executor.partial.connect(self._partial)
        self.executor.ended.connect(self._ended)
        self.active: dict[int, RunningTask] = {}  # started and not yet ended, oldest first
        self._next_id = 0

    def start(self, task: Task) -> RunningTask:
        """Queue `task` on the model's thread. An exclusive task claims the busy state first: check
        `state.busy` before calling (and tell the user why not)."""
        if task.exclusive:
            self.state.claim(task.name)
        self._next_id += 1
        running = RunningTask(task)
        self.active[self._next_id] = running
        self._queue.emit(self._next_id, task, running.cancel)
        return running

    def interrupt_all(self) -> None:
        """Ask every task started and not ended to stop (the window is closing)."""
        for running in self.active.values():
            running.request_interruption()

    @Slot(int, str)
    def _status(self, task_id: int, text: str) -> None:
        self.active[task_id].status_changed.emit(text)

    @Slot(int, float)
    def _progress(self, task_id: int, percent: float) -> None:
        self.active[task_id].progress_changed.emit(percent)

    @Slot(int, object)
    def _partial(self, task_id: int, value) -> None:
        self.active[task_id].partial_result.emit(value)

    @Slot(int, object, object)
    def _ended(self, task_id: int, result, error) -> None:
        running = self.active.pop(task_id)
        running.running = False
        if running.task.exclusive:  # the thread is free before anyone hears the task ended
            self.state.release(running.task.name)
        if error is None:
            running.done.emit(result)
        else:
            running.failed.emit(error)
