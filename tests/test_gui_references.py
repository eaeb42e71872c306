"""The studio's part of reproducing references: ignore end of text, attention loss, and a row that
says how to run it again."""

from __future__ import annotations

import pytest

from kvstudio.gui.features.run_summary import describe_run

from .test_gui import load, run

pytest.importorskip("pytestqt")
pytestmark = pytest.mark.usefixtures("studio_folders")


def test_a_studio_run_measures_its_loss_and_records_a_command_that_reruns_it(qtbot, window):
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("the quick brown fox jumps " * 4)
    window.form.max_new_tokens.setValue(5)
    window.form.ignore_eos.setChecked(True)
    window.form.measure_loss.setChecked(True)
    outcome = run(qtbot, window, "window", budget=12)
    result = outcome.result
    assert len(result.token_ids) == 5 and result.attention_loss is not None and result.attention_loss > 0
    assert f"attention loss {result.attention_loss:.3f}" in describe_run("window", result)
    record = window.history.get(outcome.request.history_id)
    provenance = record.settings["provenance"]
    assert provenance["device"] == "cpu" and provenance["dtype"] == "float32"
    assert provenance["command"].startswith("kvstudio run --model tiny-llama --policy window --budget 12 ")
    assert "--ignore-eos --measure-loss --prompt 'the quick brown fox jumps" in provenance["command"]
    # The live curve: one point per step, the mean over layers of what the step measured.
    view = window.views.loss_view
    view.refresh()
    expected = [sum(s.attention_loss) / len(s.attention_loss) for s in result.steps]
    assert view.steps == [s.step for s in result.steps]
    assert view.means == [pytest.approx(m) for m in expected] and max(view.means) > 0
    assert view.latest == result.steps[-1].attention_loss
    # A stored run reopens with its curve: the steps' losses travel with its packed events.
    from kvstudio.core.recording.packing import unpack_events

    stored = unpack_events(window.history.events(outcome.request.history_id))
    window.views.show_stored_run(stored, stored.since("runs", 0)[0][-1])
    assert view.means == [pytest.approx(m) for m in expected]


def test_the_token_maps_hover_says_what_an_evicted_token_would_have_received(qtbot, window):
    """With attention loss measured, hovering an evicted token tells the share of the chosen layer's
    attention it would have received at the latest step (core/runtime/attention_loss.py records it)."""
    from PySide6.QtCore import QPoint, QPointF, Qt
    from PySide6.QtGui import QMouseEvent, QTextCursor
    from PySide6.QtWidgets import QToolTip

    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("abcdefgh" * 6)  # 48 byte tokens
    window.form.max_new_tokens.setValue(6)
    window.form.chunk_size.setValue(16)
    window.form.ignore_eos.setChecked(True)
    window.form.measure_loss.setChecked(True)
    result = run(qtbot, window, "window", budget=12).result
    view = window.views.token_view
    window.views.refresh(include_hidden=True)
    view.layer.setCurrentIndex(2)  # layer 1
    last = result.steps[-1]
    position, share = last.evicted_attention[1][0]  # the evicted token layer 1 would have attended most
    assert share >= 0.001 and view.held_fractions()[position] == 0
    expected = f"would have received {share:.1%} of layer 1's attention at step {last.step}"
    assert expected in view.hover_text(position)
    kept = len(view.tokens) - 3  # among the newest 12: held, so nothing lost
    assert "would have received" not in view.hover_text(kept)
    view.layer.setCurrentIndex(0)  # all layers: the layer that would have given it the most
    assert "would have received" in view.hover_text(position)
    view.layer.setCurrentIndex(2)
    # A real mouse move over the token shows it.
    cursor = QTextCursor(view.text.document())
    rects = []
    for at in (view._starts[position], view._ends[position]):
        cursor.setPosition(at)
        rects.append(view.text.cursorRect(cursor))
    middle = QPoint((rects[0].x() + rects[1].x()) // 2, rects[0].center().y())
    event = QMouseEvent(QMouseEvent.MouseMove, QPointF(middle), QPointF(view.text.viewport().mapToGlobal(middle)),
                        Qt.NoButton, Qt.NoButton, Qt.NoModifier)
    view.eventFilter(view.text.viewport(), event)
    assert expected in QToolTip.text()
    # A reopened run's token map says the same: the figures travel with its packed events.
    from kvstudio.core.recording.packing import unpack_events

    stored = unpack_events(window.history.events(window.state.last_outcome.request.history_id))
    window.views.show_stored_run(stored, stored.since("runs", 0)[0][-1])
    window.views.refresh(include_hidden=True)
    window.views.token_view.layer.setCurrentIndex(2)
    assert expected in window.views.token_view.hover_text(position)
