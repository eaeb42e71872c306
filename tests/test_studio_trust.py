"""The studio a researcher can trust (issue 26): no hidden values, views that say what they show.

Each test drives the real window (pytest-qt, offscreen, tiny-llama) as a user would and checks
what the run, the form or the view then says."""

from __future__ import annotations

import json

import numpy as np
import pytest

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QPushButton, QScrollArea

from kvstudio.core.figures.data import UNSEEN
from kvstudio.core.figures.render import FigureRequest, caption
from kvstudio.core.storage import StorageConfig
from kvstudio.gui.views.attention_map import READOUT_HINT

from .test_finetune_gui import set_up
from .test_gui import run

pytest.importorskip("pytestqt")

pytestmark = pytest.mark.studio_model("tiny-llama")


# -- hidden values -------------------------------------------------------------------------------

def test_a_greyed_storage_field_neither_validates_nor_travels(qtbot, window):
    form = window.form.storage_form
    # Host tier with recall 4, then back to the device tier: the greyed recall no longer blocks a run.
    form.tier.setCurrentText("host")
    form.recall.setValue(4)
    assert form.parameters()["storage"]["recall"] == 4
    form.tier.setCurrentText("device")
    assert not form.recall.isEnabled() and form.recall.value() == 4  # still shown, for when it applies again
    assert form.validate() is None and form.error.text() == ""
    assert form.parameters() == {} and form.config() == StorageConfig()
    # MiniCache with threshold 1.01, then merge back to none: nothing of it travels.
    form.merge.setCurrentText("minicache")
    form.merge_threshold.setValue(1.01)
    assert form.parameters()["storage"]["merge_threshold"] == 1.01
    form.merge.setCurrentText("none")
    assert window.form.parameters() == {k: v for k, v in window.form.policy_form.values().items() if v is not None}
    # A quantizing codec's group size travels only with that codec.
    form.group_size.setValue(8)
    assert form.parameters() == {}
    form.codec.setCurrentText("int8")
    assert form.parameters()["storage"] == {"codec": "int8", "group_size": 8, "residual": 0, "tier": "device",
                                            "merge": "none"}
    form.codec.setCurrentText("fp")
    # What is shown is still remembered (greyed fields included) for the next launch.
    assert form.fields()["recall"] == 4 and form.fields()["merge_threshold"] == 1.01


def test_a_run_after_leaving_the_host_tier_is_not_refused(qtbot, window):
    window.prompt_area.prompt.setPlainText("one two three four " * 4)
    window.form.max_new_tokens.setValue(2)
    form = window.form.storage_form
    form.tier.setCurrentText("host")
    form.recall.setValue(4)
    form.tier.setCurrentText("device")
    outcome = run(qtbot, window, policy="h2o", budget=16)
    assert outcome.error is None, outcome.error
    assert outcome.request.parameters.get("storage") is None


def test_compare_minicache_takes_the_forms_merge_settings_with_merge_off(qtbot, window):
    window.form.policy.setCurrentText("h2o")
    form = window.form.storage_form
    form.merge.setCurrentText("minicache")
    form.merge_threshold.setValue(0.5)
    form.merge.setCurrentText("none")
    storage = window.compare.parameters_for("h2o+minicache")["storage"]
    assert storage["merge_threshold"] == 0.5
    assert "storage" not in window.compare.parameters_for("h2o")


def test_the_budget_is_shared_across_policies(qtbot, window):
    window.form.policy.setCurrentText("h2o")
    window.form.policy_form.set_values({"budget": 128})
    window.form.policy.setCurrentText("snapkv")
    assert window.form.policy_form.values()["budget"] == 128
    window.form.policy_form.set_values({"budget": 96})
    window.form.policy.setCurrentText("full")  # no budget: nothing to carry, nothing lost
    window.form.policy.setCurrentText("h2o")
    assert window.form.policy_form.values()["budget"] == 96


# -- fine-tuning and the storage it supports -----------------------------------------------------

def _finetune_set_up(window, tmp_path, steps=1):
    panel = set_up(window, tmp_path, steps, save_every=0)
    window.form.policy.setCurrentText("h2o")  # the budget of 16 comes along (it is shared)
    return panel


def test_finetuning_takes_the_host_tier_refuses_int8_in_words_and_makes_its_folder(qtbot, window, tmp_path):
    panel = _finetune_set_up(window, tmp_path)
    form = window.form.storage_form
    # A merge threshold left greyed is not a parameter the policy is handed (it once failed the start).
    form.merge.setCurrentText("minicache")
    form.merge_threshold.setValue(1.01)
    form.merge.setCurrentText("none")
    form.codec.setCurrentText("int8")
    panel.out_dir.setText(str(tmp_path / "not" / "yet" / "there"))
    assert not window.finetune.start()
    assert "codec int8" in window.error_text.text() and "fp" in window.error_text.text()
    assert not (tmp_path / "not").exists()  # refused before anything was made
    form.codec.setCurrentText("fp")
    form.tier.setCurrentText("host")
    form.recall.setValue(2)
    panel.status.setText("finished: an earlier session's line")
    assert window.finetune.start(), window.error_text.text()
    assert (tmp_path / "not" / "yet" / "there").is_dir()  # made before the session started
    assert "earlier session" not in panel.status.text()
    qtbot.waitUntil(lambda: not window.finetune.running, timeout=120_000)
    outcome = window.finetune.last_outcome
    assert outcome.error is None, outcome.error
    assert "host tier" in outcome.result.policy or outcome.request.parameters["storage"]["tier"] == "host"


def test_an_output_folder_that_cannot_be_made_is_refused_before_starting(qtbot, window, tmp_path):
    panel = _finetune_set_up(window, tmp_path)
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    panel.out_dir.setText(str(blocker / "adapter"))
    assert not window.finetune.start()
    assert not window.finetune.running and "output folder" in window.error_text.text()


def test_stop_before_a_validation_says_so_and_a_new_session_clears_the_axes(qtbot, window, tmp_path):
    panel = _finetune_set_up(window, tmp_path, steps=50)
    panel.out_dir.setText(str(tmp_path / "adapter"))
    curves = window.finetune.curves
    curves.loss_plot.setRange(xRange=(100, 200), yRange=(5, 6), padding=0)  # the last session's zoom
    assert window.finetune.start()
    (x_low, _), (y_low, _) = curves.loss_plot.viewRange()
    assert x_low < 100 and y_low < 5
    # The first validation says what it does while it runs.
    qtbot.waitUntil(lambda: curves.refresh() or "validating at step 0" in curves.summary.text(), timeout=60_000)
    window.finetune.stop()
    qtbot.waitUntil(lambda: not window.finetune.running, timeout=60_000)
    text = panel.status.text()
    assert "- → -" not in text and "-" not in text.split("steps,")[1].split(";")[0]
    assert "validation" in text


# -- views that say what they show ---------------------------------------------------------------

def test_where_it_lives_under_all_layers_reads_every_layer(qtbot, window):
    window.prompt_area.prompt.setPlainText("the quick brown fox " * 4)  # 80 byte tokens
    window.form.max_new_tokens.setValue(4)
    window.form.chunk_size.setValue(16)
    window.form.storage_form.tier.setCurrentText("host")
    outcome = run(qtbot, window, policy="random", budget=8)  # each layer keeps its own tokens
    assert outcome.error is None, outcome.error
    view = window.views.token_view
    view.by_tier.setChecked(True)
    view.layer.setCurrentIndex(0)  # all layers
    tiers = np.array(view.tiers())
    token_map = view.map
    fed = token_map.fed_count
    held_anywhere = np.array([any(token_map.heads_holding(layer)[p] > 0 for layer in range(token_map.n_layers))
                              for p in range(fed)])
    assert set(tiers[:fed][held_anywhere]) <= {"device", "recalled"}
    assert set(tiers[:fed][~held_anywhere]) == {"host"}
    layer_0 = np.array(token_map.tiers(0))
    assert (tiers[:fed] != layer_0[:fed]).any()  # the layers keep different tokens: not layer 0's picture
    assert view.drawn_colours() == view.expected_colours()
    assert "all layers" in view.key.text()
    # A finished run waits for nothing: the newest sampled token is not "not fed yet".
    assert "not fed" not in view.summary.text()


def test_the_attention_map_of_a_long_run_spans_its_context(qtbot, window):
    window.prompt_area.prompt.setPlainText("abcdefghij" * 174)  # 1,740 byte tokens: pooled in pairs
    window.form.max_new_tokens.setValue(2)
    window.form.chunk_size.setValue(512)
    outcome = run(qtbot, window, policy="full", timeout=120_000)
    assert outcome.error is None, outcome.error
    view = window.views.attention_view
    view.layer.setValue(view.layer.value())
    window.views.refresh(include_hidden=True)
    context = view.image_values.shape[1]
    assert context >= 1740
    rect = view.image.boundingRect()
    assert view.image.width() == -(-context // 2)  # pooled in pairs, no padding to 1,600 columns
    assert context <= view.image.mapRectToParent(rect).width() <= context + 1
    last_row = view.image_values[-1]
    assert (last_row == UNSEEN).mean() < 0.01  # the last step has seen everything


def test_file_export_writes_the_run_on_screen(qtbot, window, tmp_path):
    window.form.max_new_tokens.setValue(2)
    window.prompt_area.prompt.setPlainText("first run " * 3)
    first = run(qtbot, window, policy="full")
    window.prompt_area.prompt.setPlainText("second run " * 3)
    second = run(qtbot, window, policy="full")
    assert first.error is None and second.error is None
    window.views.attention_view.readout.setText("step 3 · key position 7 'x' · weight 0.5")  # a hovered cell
    window.runs.reopen(first.request.history_id)
    data = json.loads(window.exports.export_run(tmp_path / "shown.json").read_text())
    assert data["output"] == first.result.text and data["prompt_as_tokens"].startswith("first run")
    assert window.views.attention_view.readout.text() == READOUT_HINT  # not the last run's hovered cell


def test_a_refusal_banner_goes_once_the_problem_is_fixed(qtbot, window):
    window.prompt_area.prompt.setPlainText("")
    window.run.request_run()
    assert window.error_banner.isVisible() and "prompt is empty" in window.error_text.text()
    window.prompt_area.prompt.setPlainText("now there is a prompt")
    qtbot.waitUntil(lambda: not window.error_banner.isVisible(), timeout=2000)
    # A banner that is no refusal (a failure) stays until closed or replaced.
    window.show_error("something failed")
    qtbot.wait(600)
    assert window.error_banner.isVisible()


def test_figure_captions_name_a_policy_without_parameters_plainly(qtbot, window, tmp_path):
    window.form.max_new_tokens.setValue(2)
    window.prompt_area.prompt.setPlainText("caption me " * 3)
    outcome = run(qtbot, window, policy="full")
    run_event = outcome.request.recorder.all("runs")[-1]
    text = caption(run_event, FigureRequest("token-map"))
    assert "full()" not in text and " · full · " in f" · {text} · "


# -- continue and caches ---------------------------------------------------------------------------

def test_continue_feeds_a_follow_up_typed_in_the_prompt_after_the_restored_state(qtbot, window):
    window.prompt_area.prompt.setPlainText("the quick brown fox jumps over the lazy dog " * 2)  # 88 byte tokens
    window.form.chunk_size.setValue(16)
    window.form.max_new_tokens.setValue(4)
    first = run(qtbot, window, policy="h2o", budget=24)
    assert first.error is None, first.error
    view = window.caches.view
    path = view.folder / "question.kvcache"
    assert window.caches.save_last_run(str(path))
    qtbot.waitUntil(lambda: view.table.rowCount() == 1, timeout=10_000)
    follow_up = " and what then?"
    window.prompt_area.prompt.setPlainText(follow_up)
    assert window.caches.continue_from(str(path))
    qtbot.waitUntil(lambda: not window.state.busy, timeout=30_000)
    outcome = window.state.last_outcome
    assert outcome.error is None, outcome.error
    fed = first.result.state.followed_by(window.worker.engine.tokenizer(follow_up, add_special_tokens=False)["input_ids"])
    assert outcome.result.prompt_tokens == len(fed)  # the restored 91 tokens, then the follow-up's 15
    assert outcome.result.restored_tokens == len(first.result.state.token_ids)
    # The same as the CLI's `cache load --then`: one engine call from the same state.
    engine = window.worker.engine
    from kvstudio.core.persist.saved_cache import load_saved_cache
    from kvstudio.core.spec import build_policy

    policy = build_policy("h2o", {"budget": 24})
    _, state, _ = load_saved_cache(path, engine.loaded, policy)
    reference = engine.generate(state.followed_by(engine.tokenizer(follow_up, add_special_tokens=False)["input_ids"]),
                                policy, outcome.request.settings, start=state)
    assert outcome.result.token_ids == reference.token_ids


# -- layout and small things -----------------------------------------------------------------------

def test_bnb_codecs_are_offered_greyed_with_the_reason_on_the_cpu(qtbot, window):
    combo = window.form.storage_form.codec
    names = [combo.itemText(row) for row in range(combo.count())]
    assert "bnb-int8" in names and "int8" in names
    item = combo.model().item(names.index("bnb-int8"))
    assert not item.isEnabled() and "CUDA only" in item.toolTip()
    assert combo.model().item(names.index("int8")).isEnabled()
    combo.setCurrentText("bnb-int8")  # a disabled item can still be set in code: the form says why not
    assert "CUDA only" in window.form.validate()


def test_the_host_tier_curve_has_a_legend_entry_while_it_is_drawn(qtbot, window):
    memory = window.views.memory_view
    names = lambda: [label.text for _, label in memory.cache_legend.items]
    assert names() == ["KV cache"]
    window.prompt_area.prompt.setPlainText("the quick brown fox " * 4)
    window.form.max_new_tokens.setValue(3)
    window.form.chunk_size.setValue(16)
    window.form.storage_form.tier.setCurrentText("host")
    assert run(qtbot, window, policy="h2o", budget=16).error is None
    window.views.refresh(include_hidden=True)
    memory._redraw()
    assert "host tier" in names()


def test_the_wheel_over_a_memory_plot_scrolls_its_dock(qtbot, window):
    from PySide6.QtCore import QPoint, QPointF
    from PySide6.QtGui import QWheelEvent
    from PySide6.QtWidgets import QApplication

    dock = window.docks["Memory"]
    dock.show()
    dock.raise_()
    window.resize(1280, 800)
    memory = window.views.memory_view
    memory.setMinimumHeight(1400)  # taller than its dock: the dock scrolls
    page = dock.widget()
    qtbot.waitUntil(lambda: page.verticalScrollBar().maximum() > 0, timeout=2000)
    before = memory.cache_plot.getViewBox().viewRange()
    viewport = memory.cache_plot.viewport()
    middle = QPointF(viewport.width() / 2, viewport.height() / 2)
    event = QWheelEvent(middle, QPointF(viewport.mapToGlobal(middle.toPoint())), QPoint(0, 0), QPoint(0, -240),
                        Qt.NoButton, Qt.NoModifier, Qt.NoScrollPhase, False)
    QApplication.sendEvent(viewport, event)
    assert page.verticalScrollBar().value() > 0  # the page moved
    assert memory.cache_plot.getViewBox().viewRange() == before  # the plot did not zoom


def test_closing_mid_run_asks_whether_to_stop(qtbot, window):
    window.prompt_area.prompt.setPlainText("long " * 200)
    window.form.max_new_tokens.setValue(5000)
    window.form.policy.setCurrentText("full")
    window.run.request_run()
    assert window.state.busy
    window.close()
    guard = window.close_guard
    assert window.isVisible() and guard.question.isVisible() and window.state.busy
    guard.keep_button.click()
    assert window.isVisible() and window.state.busy  # kept running
    window.close()
    guard.stop_button.click()
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=30_000)
    assert window.thread_.isFinished()  # the run was stopped and the model's thread ended cleanly


# -- the studio as fast as the command line ------------------------------------------------------

def test_views_behind_a_tab_wait_and_catch_up_when_shown(qtbot, window):
    """Docks behind another dock's tab say isVisible(); redrawing them at 25 Hz took the worker's GIL."""
    window.docks["Token map"].raise_()
    occupancy = window.views.occupancy_view
    qtbot.waitUntil(lambda: occupancy.visibleRegion().isEmpty(), timeout=2000)
    assert occupancy.isVisible()  # what the views were asked before: it says yes, behind a tab
    window.prompt_area.prompt.setPlainText("the quick brown fox " * 4)
    window.form.max_new_tokens.setValue(5000)
    window.form.policy.setCurrentText("h2o")
    window.form.policy_form.set_values({"budget": 16})
    window.run.request_run()
    token_view = window.views.token_view
    qtbot.waitUntil(lambda: token_view._cursors.get("steps", 0) > 5, timeout=30_000)  # the timer's ticks
    assert occupancy._cursors.get("steps", 0) == 0  # behind its tab: it waits, the worker keeps the GIL
    window.docks["Occupancy"].raise_()
    qtbot.waitUntil(lambda: occupancy._cursors.get("steps", 0) > 5, timeout=5000)  # on screen: it catches up
    window.run.stop()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=30_000)
    assert len(occupancy.totals) == len(window.state.last_outcome.result.steps)  # nothing lost


@pytest.mark.parametrize("size", [(1280, 800), (1600, 1000)])
def test_the_side_columns_fit_their_dock(qtbot, window, size):
    """Nothing of the Set-up and Fine-tune columns is cut at the dock's right edge (Cancel, Remove,
    the adapter and Check rows added after the column was made)."""
    window.resize(*size)
    for title in ("Set-up", "Fine-tune"):
        window.docks[title].raise_()
        qtbot.wait(100)
        scroll = window.docks[title].findChild(QScrollArea)
        column = scroll.widget()
        assert scroll.viewport().width() >= column.minimumSizeHint().width(), title
        for button in column.findChildren(QPushButton):
            if button.isVisible():
                right = button.mapTo(scroll.viewport(), button.rect().topRight()).x()
                assert right <= scroll.viewport().width(), (title, button.text())


def test_a_fine_tune_refusal_goes_once_the_folder_is_chosen(qtbot, window, tmp_path):
    panel = _finetune_set_up(window, tmp_path)
    panel.out_dir.setText("")
    assert not window.finetune.start()
    assert "output folder" in window.error_text.text() and window.error_banner.isVisible()
    panel.out_dir.setText(str(tmp_path / "adapter"))
    qtbot.waitUntil(lambda: not window.error_banner.isVisible(), timeout=2000)
