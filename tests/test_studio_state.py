"""The studio's shared state (kvstudio.gui.state): its signals fire when what the features share
changes, and the window's buttons follow them (pytest-qt, offscreen, no model needed)."""

from __future__ import annotations

import pytest

from kvstudio.gui.state import StudioState
from kvstudio.gui.worker import ModelInfo

pytest.importorskip("pytestqt")

INFO = ModelInfo("tiny-llama", "a stand-in model", n_layers=4, n_heads=4, n_kv_heads=2, has_chat_template=False,
                 device="cpu")


def test_claiming_and_releasing_the_model_thread_is_heard(qtbot):
    state = StudioState()
    heard = []
    state.busy_changed.connect(heard.append)
    assert state.busy == ""
    state.claim("evaluation")
    assert state.busy == "evaluation"
    with pytest.raises(RuntimeError, match="'run' cannot start: 'evaluation' holds"):
        state.claim("run")  # a bug, not a user error: callers check `busy` first
    with pytest.raises(RuntimeError, match="'run' released"):
        state.release("run")
    state.release("evaluation")
    assert heard == ["evaluation", ""] and state.busy == ""


def test_a_loaded_model_is_heard(qtbot):
    state = StudioState()
    with qtbot.waitSignal(state.model_changed) as blocker:
        state.set_model(INFO)
    assert blocker.args == [INFO] and state.model_info is INFO


def test_the_buttons_follow_the_busy_state_and_the_model(qtbot, window):
    form, compare, load = window.form, window.compare.view, window.loading.panel.load

    def enabled():
        return {"run": form.run_button.isEnabled(), "stop": form.stop_button.isEnabled(),
                "compare": compare.start.isEnabled(), "load": load.isEnabled(),
                "sweep": window.evaluate.view.start.isEnabled()}

    assert enabled() == {"run": False, "stop": False, "compare": False, "load": True, "sweep": True}
    window.state.set_model(INFO)  # what a finished load does
    assert enabled() == {"run": True, "stop": False, "compare": True, "load": True, "sweep": True}
    window.state.claim("fine-tune")  # what the task runner does for an exclusive task
    assert enabled() == {"run": False, "stop": True, "compare": False, "load": False, "sweep": False}
    window.run.request_run()
    assert "a run is in progress" in window.error_text.text()
    window.state.release("fine-tune")
    assert enabled() == {"run": True, "stop": False, "compare": True, "load": True, "sweep": True}
