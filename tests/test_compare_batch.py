"""The studio's Compare as one batched pass (gui/features/compare_batch.py): one row per policy, the live
views following one row through the row chooser, each row its own run in the history linked to the
batch; models a batch cannot run compare one after the other, saying why. Real tiny models, real window."""

from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import Qt

from kvstudio.core.models.tiny import byte_tokenizer
from kvstudio.core.models.tiny_families import build_family_model
from kvstudio.gui.features.compare import COLUMNS

pytest.importorskip("pytestqt")

pytestmark = pytest.mark.usefixtures("studio_folders")

POLICIES = ["full", "window", "h2o"]


def load(qtbot, win, spec="tiny-llama"):
    win.loading.request_load(spec, "cpu", "auto")
    qtbot.waitUntil(lambda: win.state.model_info is not None and win.state.model_info.spec == spec, timeout=30_000)


def compare(qtbot, win, policies, batched=True):
    """Compare `policies`; the outputs and the number of forward passes the model made."""
    win.compare.view.batched.setChecked(batched)
    forwards = []
    handle = win.worker.engine.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        win.compare.request(policies)
        assert win.state.busy, win.error_text.text()
        qtbot.waitUntil(lambda: not win.state.busy and win.compare.total == 0, timeout=60_000)
    finally:
        handle.remove()
    columns = win.compare.view.columns
    return {c.policy: c.output.toPlainText() for c in columns}, len(forwards)


def set_up(win, text="compare me as a batch " * 3):
    win.prompt_area.prompt.setPlainText(text)
    win.form.max_new_tokens.setValue(6)
    win.form.chunk_size.setValue(16)
    win.form.policy.setCurrentText("window")
    win.form.policy_form.set_values({"budget": 16})


def test_compare_runs_its_policies_as_one_batch_each_row_a_run_linked_to_it(qtbot, window):
    load(qtbot, window)
    set_up(window)
    serial, serial_forwards = compare(qtbot, window, POLICIES, batched=False)
    batched, batch_forwards = compare(qtbot, window, POLICIES)
    # Each row is its single run: the same text under each policy, from one pass over the rows together.
    assert batched == serial and all(batched.values())
    assert batch_forwards * 2 < serial_forwards, (batch_forwards, serial_forwards)
    status = window.compare.view.status.text()
    assert "3 of 3 done in one batched pass" in status, status
    # The summary table: one line per row, its figures the row's own result's, as a single run's.
    table = window.compare.view.table
    assert sorted(table.item(r, 0).text() for r in range(3)) == sorted(POLICIES)
    for outcome in window.compare.batch_outcomes:
        row = [table.item(r, 0).text() for r in range(3)].index(outcome.request.policy)
        assert table.item(row, COLUMNS.index("tokens/s")).text() == f"{outcome.result.tokens_per_second:.1f}"
        assert table.item(row, COLUMNS.index("evictions")).text() == str(outcome.result.evictions)
        assert outcome.result.decode_seconds > 0 and outcome.result.prefill_seconds > 0
    # The history: three runs of one batch, rows 1-3 in the policies' order, each with its own output.
    records = [window.history.get(o.request.history_id) for o in window.compare.batch_outcomes]
    links = [record.settings["batch"] for record in records]
    assert len({link["id"] for link in links}) == 1
    assert [(link["row"], link["rows"], record.policy) for link, record in zip(links, records)] == [
        (1, 3, "full"), (2, 3, "window"), (3, 3, "h2o")]
    assert [record.status for record in records] == ["finished"] * 3
    assert [record.output for record in records] == [o.result.text for o in window.compare.batch_outcomes]


def test_the_row_chooser_makes_the_live_views_follow_that_row(qtbot, window):
    load(qtbot, window)
    set_up(window)
    compare(qtbot, window, POLICIES)
    chooser = window.compare.view.rows
    assert chooser.isVisible()
    assert [chooser.itemText(i) for i in range(chooser.count())] == ["row 1: full", "row 2: window@16",
                                                                     "row 3: h2o@16"]
    maps = window.compare.view.map_views
    for index in (1, 2, 0):
        chooser.setCurrentIndex(index)
        outcome = window.compare.batch_outcomes[index]
        assert window.state.recorder is outcome.request.recorder
        window.views.refresh(include_hidden=True)
        assert window.views.output_view.text.toPlainText() == outcome.result.text
        assert np.array_equal(window.views.token_view.layers_holding(), maps[index].layers_holding())
        assert window.views.occupancy_view.kept_per_layer == outcome.result.kept_per_layer
    # window and full keep different entries: the views really changed rows
    assert not np.array_equal(maps[0].layers_holding(), maps[1].layers_holding())


def test_a_model_batches_cannot_run_compares_one_after_the_other_and_says_why(qtbot, window, tmp_path):
    folder = tmp_path / "tiny-mla"
    build_family_model("deepseek_v3").save_pretrained(folder)  # MLA: keys re-projected after the cache
    byte_tokenizer().save_pretrained(folder)
    load(qtbot, window, str(folder))
    assert "MLA" in window.state.model_info.batch_refusal
    set_up(window)
    outputs, _ = compare(qtbot, window, ["full", "window"])
    assert all(outputs.values())
    status = window.compare.view.status.text()
    assert "2 of 2 done" in status and "one after the other" in status and "MLA" in status, status
    assert not window.compare.view.rows.isVisible()
    assert window.history.list()[0].settings.get("batch") is None


def test_comparing_with_the_attention_loss_measured_runs_one_after_the_other(qtbot, window):
    load(qtbot, window)
    set_up(window)
    window.form.measure_loss.setChecked(True)
    compare(qtbot, window, ["full", "h2o"])
    assert "attention loss" in window.compare.view.status.text()
    assert all(c.output.toPlainText() for c in window.compare.view.columns)


def test_compare_refusals_show_banners_that_go_once_fixed(qtbot, window):
    """As Run's refusals: each banner holds while its problem lasts and goes by itself once fixed."""
    window.prompt_area.prompt.setPlainText("x" * 3000)
    window.compare.request(["full"])
    assert not window.state.busy and window.error_text.text() == "load a model first"
    load(qtbot, window)
    window._check_problem()  # the banner's timer, at once
    assert not window.error_banner.isVisible()

    choices = window.compare.view.choices
    for i in range(choices.count()):
        choices.item(i).setCheckState(Qt.Unchecked)
    window.compare.view.start.click()
    assert window.error_text.text() == "check at least one policy to compare"
    choices.item(0).setCheckState(Qt.Checked)
    window._check_problem()
    assert not window.error_banner.isVisible()

    window.form.max_new_tokens.setValue(400)
    window.form.ignore_eos.setChecked(True)
    window.run.request_run()
    assert window.state.busy
    window.compare.request(["full"])
    assert window.error_text.text() == "a run is in progress: stop it first"
    window.run.stop()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=30_000)
    window._check_problem()
    assert not window.error_banner.isVisible()

    window.prompt_area.prompt.setPlainText("")
    window.compare.request(["full"])
    assert not window.state.busy and "the prompt is empty" in window.error_text.text()
    window.prompt_area.prompt.setPlainText("now there is a prompt")
    window._check_problem()
    assert not window.error_banner.isVisible()
