"""The studio's merging parts: merge settings in the storage form reach the run and the views
(occupancy's merged bars, the memory view's shared curve, retained tokens on the token map), Compare
across merge settings, and KV groups in the model panel."""

from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import Qt

from .test_gui import load, run

pytest.importorskip("pytestqt")


def test_merge_settings_reach_the_run_and_the_views(qtbot, window):
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("the quick brown fox " * 4)
    window.form.max_new_tokens.setValue(4)
    window.form.chunk_size.setValue(32)
    form = window.form.storage_form
    assert not form.merge_from.isEnabled() and not form.merge_t.isEnabled()  # merge "none": nothing to set
    form.merge.setCurrentText("minicache")
    assert form.merge_from.isEnabled() and form.merge_threshold.isEnabled() and form.merge_t.isEnabled()
    form.merge_from.setValue(2)
    form.merge_threshold.setValue(0.5)
    outcome = run(qtbot, window, policy="full")
    assert outcome.error is None, outcome.error
    result = outcome.result
    assert "+minicache" in result.policy and result.storage["merging"]["pairs"] == [[2, 3]]
    views = window.views
    merged = views.occupancy_view.merged_bars.opts["height"]
    assert merged[0] == merged[1] == 0 and merged[2] > 0  # layers 2 and 3 hold merged entries
    # In bytes, a merged pair's later layer holds less than its partner (magnitudes and links, not rows):
    # the bars are what each layer's store holds, the narrow ones the directions the pair shares.
    occupancy = views.occupancy_view
    occupancy.show_bytes.setChecked(True)
    mib = np.array(occupancy.bars.opts["height"])
    assert mib[3] < mib[2] and abs(mib[0] - mib[1]) < 1e-9
    assert np.allclose(mib * 2**20, occupancy.bytes_per_layer)
    assert occupancy.merged_bars.opts["height"][2] > 0 and "shared with the paired layer" in occupancy.caption.text()
    assert not occupancy.budget_line.isVisible()
    # The explanation wraps in the caption; the title (which cannot wrap) stays within a 1280 px dock.
    assert occupancy.per_layer.getPlotItem().titleLabel.item.boundingRect().width() < 480
    occupancy.show_bytes.setChecked(False)
    assert occupancy.bars.opts["height"] == occupancy.kept_per_layer and occupancy.budget_line.isVisible()
    shared = views.memory_view.shared_curve.getData()[1]
    assert shared is not None and shared[-1] > 0
    assert "shared by merged layers" in views.memory_view.readout.text()
    token_view = views.token_view
    token_view.layer.setCurrentIndex(3)  # layer 2
    token_view.by_tier.setChecked(True)
    tiers = np.array(token_view.tiers())
    assert "retained" in set(tiers) and "device" in set(tiers)
    token_view.layer.setCurrentIndex(1)  # layer 0 is not merged: nothing retained there
    assert "retained" not in set(token_view.tiers())
    # A merge start past this model's last pair cannot be entered (tiny-llama: 4 layers, pairs from 0 to 2).
    assert form.merge_from.maximum() == 2
    form.merge_from.setValue(3)
    assert form.merge_from.value() == 2


def test_the_runs_view_names_a_merged_runs_cache_and_storage(qtbot, window, tmp_path):
    """A minicache run is listed as full+minicache with its merge settings, not as "full", "defaults";
    it reopens, compares with a plain run and exports a figure like any other."""
    from kvstudio.core.figures.render import FigureRequest
    from kvstudio.core.recording.packing import unpack_events

    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("the quick brown fox " * 4)
    window.form.max_new_tokens.setValue(3)
    plain = run(qtbot, window, policy="full").request.history_id
    form = window.form.storage_form
    form.merge.setCurrentText("minicache")
    form.merge_from.setValue(2)
    form.merge_threshold.setValue(0.5)
    merged = run(qtbot, window, policy="full").request.history_id
    view = window.runs.view
    view.refresh()
    cells = {int(view.table.item(r, 0).text()): (view.table.item(r, 4).text(), view.table.item(r, 6).text())
             for r in range(view.table.rowCount())}
    assert cells[merged] == ("full+minicache", "fp, minicache from layer 2 (threshold 0.5, t 0.6)")
    assert cells[plain] == ("full", "defaults")
    view.search.setText("policy=full+minicache")
    view.refresh()
    assert [view.table.item(r, 0).text() for r in range(view.table.rowCount())] == [str(merged)]
    view.search.setText("")
    view.refresh()
    view.table.selectAll()
    view.compare_selected()
    assert f"run {merged}: full+minicache" in view.comparison.text() and f"run {plain}: full<" in view.comparison.text()
    window.runs.reopen(merged)
    assert "+minicache" in window.state.recorder.all("runs")[-1].policy
    stored = unpack_events(window.history.events(merged))
    figure = window.figures.export_figure(stored, FigureRequest("occupancy", title=f"run {merged}"),
                                          tmp_path / "merged.png")
    assert figure is not None and figure.stat().st_size > 0


def test_compare_h2o_against_h2o_merged(qtbot, window):
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("a b c d e f " * 8)
    window.form.max_new_tokens.setValue(4)
    window.form.policy.setCurrentText("h2o")
    window.form.policy_form.set_values({"budget": 16})
    window.form.storage_form.merge_from.setValue(0)
    window.form.storage_form.merge_threshold.setValue(2.0)  # merge every token the pairs both hold
    view = window.compare.view
    for index in range(view.choices.count()):
        item = view.choices.item(index)
        item.setCheckState(Qt.Checked if item.text() in ("h2o", "h2o+minicache") else Qt.Unchecked)
    window.compare.request(view.checked())
    qtbot.waitUntil(lambda: view.table.rowCount() == 2 and not window.state.busy, timeout=30_000)
    rows = {view.table.item(r, 0).text(): float(view.table.item(r, 3).text()) for r in range(2)}
    assert set(rows) == {"h2o", "h2o+minicache"} and all(peak > 0 for peak in rows.values())
    merged = window.state.last_outcome.result  # the last run is the merged one, with the form's merge settings
    assert merged.storage["merge"] == "minicache" and merged.storage["merging"]["pairs"] == [[0, 1], [2, 3]]
    assert sum(merged.storage["merging"]["merged_entries_per_layer"]) > 0


def test_kv_groups_in_the_model_panel_load_a_derived_model(qtbot, window):
    panel = window.loading.panel
    assert panel.spec.findText("default+kv1") >= 0  # offered beside the default model
    panel.spec.setCurrentText("tiny-llama")
    panel.kv_groups.setValue(1)
    panel.load.click()
    qtbot.waitUntil(lambda: window.state.model_info is not None, timeout=20_000)
    assert window.state.model_info.spec == "tiny-llama+kv1" and window.state.model_info.n_kv_heads == 1
    assert "tiny-llama (1 KV group)" in panel.status.text()
    panel.spec.setCurrentText("tiny-llama+kv2")
    panel.load.click()  # two different group counts: refused in the panel, nothing loads
    assert "different KV groups" in panel.status.text()


def test_the_model_box_names_the_model_that_loaded(qtbot, window):
    panel = window.loading.panel
    panel.spec.setCurrentText("default")  # the box says one thing; a load asked elsewhere (a script, --model) wins
    window.loading.request_load("tiny-llama+kv1", "cpu", "auto")
    qtbot.waitUntil(lambda: window.state.model_info is not None, timeout=20_000)
    assert (panel.spec.currentText(), panel.kv_groups.value()) == ("tiny-llama", 1)
    panel.kv_groups.setValue(0)
    panel.load.click()  # what the box now says loads the base model again
    qtbot.waitUntil(lambda: window.state.model_info.spec == "tiny-llama", timeout=20_000)
    assert (panel.spec.currentText(), panel.kv_groups.value()) == ("tiny-llama", 0)
