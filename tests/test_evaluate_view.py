"""The Evaluate view, driven as a user drives it (pytest-qt, offscreen), on tiny-llama."""

from __future__ import annotations

import json

import pytest
from PySide6.QtCore import Qt

pytest.importorskip("pytestqt")


pytestmark = pytest.mark.studio_model("tiny-llama")


def _choose(view, task="needle", policies=("full", "streaming_llm"), budgets="32", lengths="400", depths="0,1"):
    view.task.setCurrentText(task)
    for i in range(view.policies.count()):
        item = view.policies.item(i)
        item.setCheckState(Qt.Checked if item.text() in policies else Qt.Unchecked)
    view.budgets.setText(budgets)
    view.lengths.setText(lengths)
    view.depths.setText(depths)
    view.chunk_size.setValue(64)


def test_a_needle_sweep_fills_heatmaps_and_table_and_opens_a_cell_as_a_run(qtbot, window, tmp_path):
    view = window.evaluate.view
    _choose(view)
    view.start.click()
    assert window.state.busy and not window.form.run_button.isEnabled()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=120_000)
    assert "done: 4 cells computed" in view.status.text(), view.status.text()
    assert view.table.rowCount() == 4 and len(view.records) == 4
    # Heatmaps: one per series, every cell drawn (0 would mean "not run yet").
    assert set(view.heatmap_items) == {"full", "streaming_llm @ 32"}
    for label in view.heatmap_items:
        values = view.heatmap_values(label)
        assert values.shape == (2, 1) and (values >= 1).all()  # 2 depths (rows) x 1 length (columns)
        for record in (r for r in view.records if (r["policy"] == "full") == (label == "full")):
            row = [0.0, 1.0].index(record["depth"])
            assert values[row, 0] == 1 + round(record["score"] * 254)
        # As drawn: lengths along x (its "context tokens" axis), depths down y, in the studio's
        # row-major setting and in pyqtgraph's default alike (a swap once drew lengths down y).
        image = view.heatmap_items[label]
        assert (image.width(), image.height()) == (1, 2)
    # Score vs budget (a log axis): ticks at the swept budgets, as numbers.
    ticks = view.by_budget.getAxis("bottom")._tickLevels
    assert [label for _, label in ticks[0]] == ["32"]
    # Open a cell: its run from the history shows in the live views.
    run_id = view.records[1]["run_id"]
    assert run_id is not None
    view.table.selectRow(1)
    view.open_button.click()
    assert window.views.showing_stored_run and f"showing run {run_id}" in window.statusBar().currentMessage()
    assert window.state.recorder.all("runs")[-1].policy.startswith("streaming_llm(budget=32")
    # Exports.
    assert view.export_cells_to(tmp_path / "cells.json") is not None
    assert len(json.loads((tmp_path / "cells.json").read_text())) == 4
    assert view.export_figure_to(tmp_path / "heat.svg") is not None
    assert "<svg" in (tmp_path / "heat.svg").read_text()[:400]


def test_stop_keeps_finished_cells_and_the_next_sweep_resumes(qtbot, window):
    view = window.evaluate.view
    _choose(view, depths="0,0.5,1")
    stop_after_a_cell_then_resume(qtbot, window, view, cells=6)


def stop_after_a_cell_then_resume(qtbot, window, view, cells: int) -> None:
    """Run sweep, Stop once a cell is in, Run sweep again: only the missing cells are computed."""
    view.start.click()
    qtbot.waitUntil(lambda: len(view.records) >= 1, timeout=120_000)
    view.stop.click()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=60_000)
    assert view.status.text().startswith("stopped:"), view.status.text()
    done = len(view.records)
    assert 1 <= done < cells
    view.start.click()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=120_000)
    assert f"{cells - done} cells computed, {done} from the store" in view.status.text(), view.status.text()
    assert len(view.records) == cells


def test_bad_options_are_reported_and_nothing_starts(qtbot, window):
    view = window.evaluate.view
    _choose(view, depths="0,2")
    view.start.click()
    assert not window.state.busy
    assert "depths must be fractions" in window.error_text.text()
    _choose(view, budgets="x")
    view.start.click()
    assert not window.state.busy and "budgets: give comma-separated numbers" in view.status.text()


def test_perplexity_curves_fill_in(qtbot, window):
    view = window.evaluate.view
    _choose(view, task="perplexity", policies=("full", "window"), budgets="16")
    view.tokens.setValue(160)
    view.prefix_tokens.setValue(40)
    view.stride.setValue(8)
    view.start.click()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=120_000)
    assert len(view.records) == 2, view.status.text()
    # The data set on the curves (getData() is what survives clipping to a view that, in a dock
    # tabbed behind others, may never have been laid out).
    curve = view.curves[("kl", "window @ 16")]
    x, y = curve.xData, curve.yData
    assert len(x) == 120 and y.max() > 0
    full_kl = view.curves[("kl", "full")].yData
    assert full_kl.max() < 1e-4


def test_the_heatmaps_say_what_they_show_as_the_cli_figure_does(qtbot, window):
    """Issue 26: a colour scale, each cell's score written in it and on hover, the cells table with
    depth and score in view, the legend clear of the points, words (not a black panel) before a run."""
    import pyqtgraph as pg

    from kvstudio.gui.features.evaluate import NO_SWEEP_YET, TABLE_COLUMNS

    view = window.evaluate.view
    labels = [item.text for item in view.heatmaps.ci.items if isinstance(item, pg.LabelItem)]
    assert NO_SWEEP_YET in labels
    _choose(view)
    view.start.click()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=120_000)
    assert any(isinstance(item, pg.ColorBarItem) for item in view.heatmaps.ci.items)
    for record in view.records:
        label = "full" if record["policy"] == "full" else "streaming_llm @ 32"
        row = [0.0, 1.0].index(record["depth"])
        written = view.heatmap_cell_text(label, row, 0)
        assert written is not None and abs(float(written) - record["score"]) < 0.006
        assert f"score {record['score']:.2f}" in view.describe_heatmap_cell(label, row, 0)
        assert "depth" in view.describe_heatmap_cell(label, row, 0)
    assert TABLE_COLUMNS.index("depth") < 4 and TABLE_COLUMNS.index("score") < 5  # in view at 1280 px
    assert view.table.item(0, TABLE_COLUMNS.index("depth")).text().endswith("%")
    legend = view.by_bytes.getPlotItem().legend
    assert legend.offset[0] > 0  # anchored top left, where no top-score point sits


def test_the_form_chooses_the_protocol_and_the_loss_for_tasks_with_a_question(qtbot, window):
    view = window.evaluate.view
    _choose(view)
    assert view.protocol.currentText() == "bounded"  # the default, stated in the form
    view.protocol.setCurrentText("question-agnostic")
    view.measure_loss.setChecked(True)
    spec = view.build_spec("tiny-llama")
    assert (spec.protocol, spec.measure_loss) == ("question-agnostic", True)
    view.task.setCurrentText("perplexity")  # a text, no question: the rows are off and the spec plain
    assert not view.protocol.isEnabled() and not view.measure_loss.isEnabled()
    spec = view.build_spec("tiny-llama")
    assert (spec.protocol, spec.measure_loss) == ("bounded", False)
