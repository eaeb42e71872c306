"""The studio's storage parts: the policy box's storage fields, the Memory view's host curve, the
token map by tier, and Compare running h2o-fp against h2o-int4."""

from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import Qt

from kvstudio.gui.features.compare import COLUMNS

from .test_gui import load, run

pytest.importorskip("pytestqt")


def test_storage_fields_reach_the_run_and_the_views(qtbot, window):
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("the quick brown fox " * 4)  # 80 byte tokens
    window.form.max_new_tokens.setValue(6)
    window.form.chunk_size.setValue(16)
    form = window.form.storage_form
    form.tier.setCurrentText("host")
    form.recall.setValue(2)
    form.codec.setCurrentText("int8")
    form.group_size.setValue(8)
    outcome = run(qtbot, window, policy="h2o", budget=24)
    assert outcome.error is None, outcome.error
    result = outcome.result
    assert result.policy.startswith("h2o-int8(") and result.storage["tier"] == "host"
    assert result.storage["recalled"] > 0 and result.storage["peak_host_bytes"] > 0
    # Memory view: the host tier's curve beside the device's, from the same readings.
    readings = window.views.memory_view.step_readings()
    assert readings[-1].host_cache_bytes == result.storage["host_bytes_per_layer"][0] * 4 > 0
    assert len(window.views.memory_view.host_curve.getData()[0]) > 0
    assert "host tier" in window.views.memory_view.readout.text()
    # Token map by tier: layer 0's 24 held tokens on the device, the rest of the 85 fed on the host,
    # and what layer 0 recalled at its latest recall shown as recalled.
    view = window.views.token_view
    view.by_tier.setChecked(True)
    view.layer.setCurrentIndex(1)  # layer 0 ("all layers" reads every layer: tests/test_studio_trust.py)
    tiers = np.array(view.tiers())
    recalled = view.recalled[0]
    assert len(recalled) and set(tiers[recalled]) == {"recalled"}
    assert (tiers[:-1] == "device").sum() == 24  # the last sampled token was never fed (nothing evicted it)
    assert (tiers == "host").sum() + len(recalled) == len(tiers) - 25
    # A recall left greyed under the device tier no longer applies: it neither travels nor blocks a run
    # (tests/test_studio_trust.py).
    form.tier.setCurrentText("device")
    assert form.validate() is None and "recall" not in form.parameters().get("storage", {})


def test_compare_h2o_fp_against_h2o_int4(qtbot, window):
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("a b c d e f " * 8)
    window.form.max_new_tokens.setValue(4)
    window.form.policy.setCurrentText("h2o")
    window.form.policy_form.set_values({"budget": 16})
    window.form.storage_form.group_size.setValue(8)
    view = window.compare.view
    for index in range(view.choices.count()):
        item = view.choices.item(index)
        item.setCheckState(Qt.Checked if item.text() in ("h2o-fp", "h2o-int4") else Qt.Unchecked)
    window.compare.request(view.checked())
    qtbot.waitUntil(lambda: view.table.rowCount() == 2 and not window.state.busy, timeout=30_000)
    peak = COLUMNS.index("peak cache MiB")
    rows = {view.table.item(r, 0).text(): float(view.table.item(r, peak).text()) for r in range(2)}
    assert set(rows) == {"h2o-fp", "h2o-int4"}
    assert rows["h2o-int4"] < rows["h2o-fp"]  # peak cache MiB: int4 stores less


def test_storage_fields_are_remembered_between_launches(qtbot, tmp_path, studio_folders):
    from PySide6.QtCore import QSettings

    from kvstudio.gui.main_window import MainWindow

    path = str(tmp_path / "storage.ini")
    first = MainWindow(QSettings(path, QSettings.IniFormat))
    qtbot.addWidget(first)
    form = first.form.storage_form
    form.set_parameters({"codec": "int4", "group_size": 32, "residual": 5, "tier": "host", "recall": 3,
                         "merge": "minicache", "merge_from": 2, "merge_threshold": 0.2, "merge_t": 0.5})
    first.close()
    second = MainWindow(QSettings(path, QSettings.IniFormat))
    qtbot.addWidget(second)
    try:
        assert second.form.storage_form.fields() == {"codec": "int4", "group_size": 32, "residual": 5,
                                                     "tier": "host", "recall": 3, "merge": "minicache",
                                                     "merge_from": 2, "merge_threshold": 0.2, "merge_t": 0.5}
        assert second.form.parameters()["storage"]["codec"] == "int4"  # the next run is stored that way
    finally:
        second.close()
        second.plugins.unload()
    # An unreadable value leaves the defaults.
    QSettings(path, QSettings.IniFormat).setValue("storage", "{not json")
    third = MainWindow(QSettings(path, QSettings.IniFormat))
    qtbot.addWidget(third)
    try:
        assert third.form.storage_form.fields()["codec"] == "fp"
    finally:
        third.close()
        third.plugins.unload()


def test_recall_events_are_stored_and_reopen_with_the_run(qtbot, window):
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("the quick brown fox " * 4)
    window.form.max_new_tokens.setValue(4)
    window.form.chunk_size.setValue(16)
    window.form.storage_form.set_parameters({"tier": "host", "recall": 2})
    outcome = run(qtbot, window, policy="h2o", budget=24)
    assert outcome.error is None, outcome.error
    live = [(r.step, r.layer, r.positions.tolist()) for r in window.state.recorder.all("recalls")]
    assert live
    window.runs.reopen(outcome.request.history_id)
    reopened = window.state.recorder.all("recalls")
    assert [(r.step, r.layer, r.positions.tolist()) for r in reopened] == live
    window.views.refresh(include_hidden=True)
    view = window.views.token_view
    view.by_tier.setChecked(True)
    assert len(view.recalled[0]) and "recalled" in set(view.tiers())
