"""One error -> banner path for the studio's long work (kvstudio.gui.tasks.banner_text): out of memory
is explained the same in a run and a cache save, an unexpected error is one line, and the studio
is ready again after the failure. pytest-qt, offscreen, tiny-llama."""

from __future__ import annotations

import pytest

from kvstudio.core.runtime.oom import explain
from kvstudio.gui.tasks import banner_text

pytest.importorskip("pytestqt")

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def _raise(error):
    def fail(*_args, **_kwargs):
        raise error
    return fail


def test_unexpected_errors_are_one_line_without_a_traceback():
    text = banner_text(ValueError("first line\nsecond line"))
    assert text == "internal error: ValueError: first line"


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
    assert window.state.last_outcome.error == "internal error: KeyError: 'oops'"
    assert "\n" not in window.error_text.text() and window.form.run_button.isEnabled()
