"""The one task runner for the studio's long work (kvstudio.gui.task_runner) and its one error ->
banner path (kvstudio.gui.tasks.banner_text): progress and partial results reach the GUI thread,
Stop interrupts, a failure is the banner's line, the busy state is free before anyone hears a task
ended; out of memory is explained the same in a run and a cache save, an unexpected error is one
line, and the studio is ready again after the failure. pytest-qt, offscreen, tiny-llama."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from PySide6.QtCore import QThread

from kvstudio.core.errors import KVStudioError
from kvstudio.core.runtime.oom import explain
from kvstudio.gui.state import StudioState
from kvstudio.gui.task_runner import Task, TaskRunner
from kvstudio.gui.tasks import banner_text
from kvstudio.gui.worker import StudioWorker

pytest.importorskip("pytestqt")

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def _raise(error):
    def fail(*_args, **_kwargs):
        raise error
    return fail


def _report_of(line: str) -> str:
    """The report file an internal error's line names: its traceback and the versions."""
    return Path(line.split("; details in ", 1)[1]).read_text()


def test_unexpected_errors_are_one_line_without_a_traceback():
    try:
        raise ValueError("first line\nsecond line")
    except ValueError as error:
        text = banner_text(error)
    assert text.startswith("internal error: ValueError: first line; details in ") and "\n" not in text
    report = _report_of(text)
    assert "Traceback" in report and "ValueError: first line" in report and "torch: " in report


@pytest.mark.studio_model("tiny-llama")
def test_out_of_memory_in_a_run_and_a_save_reads_the_same(qtbot, window, monkeypatch, tmp_path):
    window.prompt_area.prompt.setPlainText("hello")
    window.form.max_new_tokens.setValue(2)
    window.form.policy.setCurrentText("full")
    window.run.request_run()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=30_000)
    assert window.state.last_outcome.error is None
    expected = explain(RuntimeError(OOM), "run", studio=True)
    assert "out of memory during the run (it tried to allocate 2.00 GiB)" in expected
    import kvstudio.core.persist.saved_cache as saved_cache
    monkeypatch.setattr(saved_cache, "write_saved_cache", _raise(RuntimeError(OOM)))
    window.caches.save_last_run(str(tmp_path / "x.kvcache"))
    qtbot.waitUntil(lambda: "not saved" in window.caches.view.status.text(), timeout=10_000)
    assert expected in window.error_text.text()
    monkeypatch.setattr(window.worker.engine, "generate", _raise(RuntimeError(OOM)))
    window.run.request_run()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=30_000)
    assert expected in window.error_text.text() and expected in window.state.last_outcome.error
    monkeypatch.setattr(window.worker.engine, "generate", _raise(KeyError("oops")))
    window.run.request_run()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=30_000)
    assert window.state.last_outcome.error.startswith("internal error: KeyError: 'oops'; details in ")
    assert "\n" not in window.error_text.text() and window.form.run_button.isEnabled()


# -- the runner on its own: a model thread, no model, no window -------------------------------------


@pytest.fixture
def runner(qtbot):
    thread = QThread()
    worker = StudioWorker()
    worker.moveToThread(thread)
    thread.start()
    runner = TaskRunner(StudioState(), worker, thread)
    yield runner
    runner.interrupt_all()
    thread.quit()
    thread.wait()


def _listen(running) -> list:
    """Where `running`'s end will be: [(result, None)] or [(None, banner line)]."""
    outcome = []
    running.done.connect(lambda result: outcome.append((result, None)))
    running.failed.connect(lambda error: outcome.append((None, error)))
    return outcome


def _ended(qtbot, running, outcome=None):
    """Wait for `running` to end (listened to before, or from now): its (result, error)."""
    outcome = _listen(running) if outcome is None else outcome
    qtbot.waitUntil(lambda: bool(outcome), timeout=10_000)
    return outcome[0]


def test_progress_status_and_partial_results_reach_the_gui_thread_in_order(qtbot, runner):
    def work(_engine, state):
        for percent in (0, 0.5, 1, 50, 50.4, 100):  # only visible moves are sent on
            state.set_progress_value(percent)
        state.set_status("half way")
        state.set_partial_result("a cell")
        state.set_partial_result("another cell")
        return threading.get_ident()

    running = runner.start(Task("evaluation", work, needs_model=False))
    heard, threads = [], set()
    for signal in (running.progress_changed, running.status_changed, running.partial_result):
        signal.connect(lambda value: (heard.append(value), threads.add(threading.get_ident())))
    model_thread, error = _ended(qtbot, running)
    assert error is None and model_thread != threading.get_ident()
    assert heard == [0.0, 1.0, 50.0, 100.0, "half way", "a cell", "another cell"]
    assert threads == {threading.get_ident()}  # a lambda may listen: the signals come on the GUI thread
    assert not running.running and not runner.active


def test_stop_interrupts_the_work_and_a_stop_before_it_begins_is_kept(qtbot, runner):
    started = threading.Event()

    def work(_engine, state):
        started.set()
        while not state.is_interruption_requested():
            threading.Event().wait(0.005)
        return "stopped"

    running = runner.start(Task("run", work, needs_model=False))
    assert started.wait(10)
    running.request_interruption()
    assert _ended(qtbot, running) == ("stopped", None)
    # Stopped while still queued behind another task: the work sees it as soon as it starts.
    blocker = threading.Event()
    first = runner.start(Task("load", lambda _e, _s: blocker.wait(10), exclusive=False, needs_model=False))
    second = runner.start(Task("run", lambda _e, state: state.is_interruption_requested(), needs_model=False))
    first_end, second_end = _listen(first), _listen(second)
    second.request_interruption()
    blocker.set()
    assert _ended(qtbot, first, first_end) == (True, None)
    assert _ended(qtbot, second, second_end) == (True, None)


def test_a_failure_is_the_banners_line_and_nothing_else(qtbot, runner):
    def raises(error):
        def work(_engine, _state):
            raise error
        return work

    result, line = _ended(qtbot, runner.start(Task("run", raises(ValueError("first line\nsecond")), needs_model=False)))
    assert result is None and line.startswith("internal error: ValueError: first line; details in ")
    assert "Traceback" in _report_of(line)  # the traceback goes to the report file, never to the banner
    assert _ended(qtbot, runner.start(Task("run", raises(KVStudioError("the budget is too small")),
                                           needs_model=False))) == (None, "the budget is too small")
    assert _ended(qtbot, runner.start(Task("run", raises(SystemExit(3)), needs_model=False)))[1] \
        .startswith("internal error: SystemExit")  # a plugin's sys.exit does not end the studio
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert _ended(qtbot, runner.start(Task("cache save", raises(oom), explain={"stage": "run"}))) \
        == (None, "no model loaded: load one first")  # it needs the engine: refused before its work
    assert _ended(qtbot, runner.start(Task("run", raises(oom), needs_model=False, explain={"chunk_size": 64}))) \
        == (None, banner_text(oom, chunk_size=64))
    assert runner.state.busy == ""


def test_the_busy_state_is_free_before_done_and_failed_are_heard(qtbot, runner):
    state = runner.state
    seen, chained = [], []
    running = runner.start(Task("run", lambda _e, _s: "first", needs_model=False))
    assert state.busy == "run"

    def next_run(_result):  # as Compare does: the next run starts from the end of the last
        seen.append(state.busy)
        chained.append(runner.start(Task("run", lambda _e, _s: 1 / 0, needs_model=False)))
        chained[0].failed.connect(lambda _error: seen.append(state.busy))

    running.done.connect(next_run)
    qtbot.waitUntil(lambda: len(seen) == 2, timeout=10_000)
    assert seen == ["", ""] and state.busy == ""


def test_a_task_that_is_not_exclusive_leaves_the_busy_state_alone(qtbot, runner):
    heard = []
    runner.state.busy_changed.connect(heard.append)
    running = runner.start(Task("cache save", lambda _e, _s: "saved", exclusive=False, needs_model=False))
    assert runner.state.busy == ""
    assert _ended(qtbot, running) == ("saved", None) and heard == []
