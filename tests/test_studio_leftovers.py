"""Issue 26's leftovers: a saved cache is never filed under the wrong model, the attention map's
colour bar label clears its tick values, and the Evaluate status line shows whole at 1280x800.

Each test drives the real window (pytest-qt, offscreen, tiny-llama)."""

from __future__ import annotations

import pytest

from PySide6.QtCore import QRectF
from PySide6.QtGui import QImage, QPainter

from .test_gui import run

pytest.importorskip("pytestqt")

pytestmark = pytest.mark.studio_model("tiny-llama")


def test_the_last_runs_cache_is_not_saved_under_a_model_loaded_after_it(qtbot, window):
    window.prompt_area.prompt.setPlainText("the quick brown fox " * 3)
    window.form.max_new_tokens.setValue(2)
    first = run(qtbot, window, policy="h2o", budget=24)
    assert first.error is None, first.error
    assert first.result.state is not None
    window.loading.request_load("tiny-qwen2", "cpu", "auto")
    qtbot.waitUntil(lambda: window.state.model_info.spec == "tiny-qwen2", timeout=30_000)
    path = window.caches.view.folder / "wrong-model.kvcache"
    assert not window.caches.save_last_run(str(path))
    message = window.error_text.text()
    assert "tiny-llama" in message and "tiny-qwen2" in message, message  # it says why
    assert first.result.state is None  # the old model's tensors are gone too
    qtbot.wait(200)
    assert not path.exists()
    # A run with the new model can be saved again.
    second = run(qtbot, window, policy="h2o", budget=24)
    assert second.error is None, second.error
    assert window.caches.save_last_run(str(path))
    qtbot.waitUntil(path.exists, timeout=10_000)


def _tick_text_rects(axis) -> list[QRectF]:
    image = QImage(10, 10, QImage.Format_ARGB32)
    painter = QPainter(image)
    try:
        specs = axis.generateDrawSpecs(painter)
    finally:
        painter.end()
    return [rect for rect, _flags, _text in specs[2]]


@pytest.mark.parametrize("log", [False, True])
def test_the_attention_colour_bar_label_clears_its_tick_values(qtbot, window, log):
    window.resize(1280, 800)
    window.prompt_area.prompt.setPlainText("the quick brown fox " * 3)
    window.form.max_new_tokens.setValue(4)
    outcome = run(qtbot, window, policy="full")
    assert outcome.error is None, outcome.error
    window.docks["Attention map"].raise_()
    view = window.views.attention_view
    view.scale.setCurrentIndex(1 if log else 0)
    window.views.refresh(include_hidden=True)
    axis = view.colorbar.axis
    for _ in range(3):  # the axis widens once it has measured its tick text: let the layout follow
        view.plot.grab()
        qtbot.wait(50)
    assert axis.isVisible() and axis.label.isVisible()
    margin = axis.label.document().documentMargin()  # the text item's padding around its words
    label = axis.label.mapRectToParent(axis.label.boundingRect().adjusted(margin, margin, -margin, -margin))
    ticks = _tick_text_rects(axis)
    assert ticks
    for tick in ticks:
        assert not tick.intersects(label), (axis.label.toPlainText(), tick, label)
    assert label.right() <= axis.width() + 6  # the label is on the axis, not past the view's edge


def test_the_evaluate_status_line_shows_whole_at_1280x800(qtbot, window):
    window.resize(1280, 800)
    qtbot.waitUntil(lambda: window.width() == 1280 and window.height() == 800, timeout=2000)
    window.docks["Evaluate"].raise_()
    view = window.evaluate.view
    # After a run the window's status bar holds its line: the dock is that much shorter (733 px).
    window.statusBar().showMessage("h2o: max_new_tokens · 24 tokens · 324.8 tokens/s · peak cache 0.19 MiB")
    view.status.setText("done: 18 cells computed, 0 from the store (/tmp/pytest-of-someone/pytest-1234/"
                        "test_the_evaluate_status_line_0/user_data/evaluations/needle-c70d6f2a6f8bf0fee.jsonl)")
    view.progress_bar.setValue(100)
    qtbot.wait(200)
    status = view.status
    assert status.isVisible()
    needed = status.heightForWidth(status.width())
    assert status.height() >= needed, (status.height(), needed)
    shown = status.visibleRegion().boundingRect()  # what the dock's scroll area leaves in sight
    assert shown.height() >= needed, (shown, needed)
