"""Views that never mislead (issue 15, items 1-5 and 7), checked on what is drawn: the token map's
character colours, the attention image and its message, plot ranges, hovers. Real window, real tiny
models, pytest-qt offscreen."""

from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import QPoint, QPointF, QSettings, Qt
from PySide6.QtGui import QMouseEvent
from PySide6.QtWidgets import QToolTip

from kvstudio.core.runtime.engine import CancelToken, GenerationSettings
from kvstudio.core.recording.events import Recorder
from kvstudio.core.figures import colours
from kvstudio.core.figures.data import TokenMap, attention_image
from kvstudio.core.figures.render import FigureRequest
from kvstudio.core.recording.packing import unpack_events
from kvstudio.core.spec import build_policy
from kvstudio.gui.main_window import MainWindow
from kvstudio.gui.views.attention_map import NOTHING_YET, to_lut_indices
from kvstudio.gui.views.colors import attention_lut
from kvstudio.gui.views.token_map import BOUNDARY_MARK, TokenMapView

from .helpers import random_ids, run_cli
from .test_gui import load, run

pytest.importorskip("pytestqt")


@pytest.fixture(autouse=True)
def isolated_user_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path / "user_data"))
    monkeypatch.delenv("KVSTUDIO_PLUGIN_PATH", raising=False)


@pytest.fixture
def window(qtbot, tmp_path):
    win = MainWindow(QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat))
    qtbot.addWidget(win)
    win.show()
    yield win
    win.close()
    win.plugins.unload()


def final_colours(recorder) -> list[str]:
    """The token map a recording ends with, computed from its events alone (not from any view)."""
    token_map = TokenMap.for_run(recorder.all("runs")[-1])
    token_map.add({kind: recorder.all(kind) for kind in ("tokens", "steps", "evictions", "recalls")})
    return [colours.UNFED if np.isnan(f) else colours.held_colour(float(f)) for f in token_map.held_fractions()]


MANY_EVICTIONS = "the quick brown fox jumps over the lazy dog " * 8  # 352 byte tokens


def test_compare_and_reopened_maps_show_the_final_state(qtbot, window, tmp_path):
    """Item 1: the last draw is never dropped by the throttle, in Compare and in Runs > Open views."""
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText(MANY_EVICTIONS)
    window.form.max_new_tokens.setValue(8)
    window.form.chunk_size.setValue(32)
    window.form.policy.setCurrentText("h2o")
    window.form.policy_form.set_values({"budget": 16})
    window.compare.request(["full", "h2o"])
    qtbot.waitUntil(lambda: len(window.compare.view.map_views) == 2 and not window.state.busy, timeout=60_000)
    full_map, h2o_map = window.compare.view.map_views
    for view in (full_map, h2o_map):  # at once, without waiting for a timer or a click
        assert view.drawn_colours() == final_colours(view.recorder)
    red = colours.held_colour(0.0)
    gone = h2o_map.drawn_colours().count(red)
    assert gone > 250 and f"{gone} gone from every layer" in h2o_map.summary.text()
    assert h2o_map.summary.text().startswith("h2o: ")
    assert full_map.drawn_colours().count(red) == 0
    # Reopened from the history: the same final state, drawn without touching "colour by".
    run_id = window.state.last_outcome.request.history_id
    window.runs.view.refresh()
    window.runs.open(run_id)
    stored = unpack_events(window.history.events(run_id))
    assert window.views.token_view.drawn_colours() == final_colours(stored)
    assert window.views.token_view.drawn_colours().count(red) == gone


def test_a_throttled_draw_is_flushed_without_further_events(qtbot, llama_engine):
    """Item 1 at the view level: events that arrive within the throttle are still drawn, by the trailing flush."""
    recorder = Recorder()
    llama_engine.generate(random_ids(120), build_policy("window", {"budget": 16}),
                          GenerationSettings(max_new_tokens=4, chunk_size=16), recorder=recorder)
    view = TokenMapView()
    qtbot.addWidget(view)
    view.follow(recorder)
    view.refresh()  # starts the run (draws the prompt), then its events arrive within the throttle
    expected = final_colours(recorder)
    assert view.drawn_colours() != expected  # held back...
    qtbot.waitUntil(lambda: view.drawn_colours() == expected, timeout=2000)  # ... and drawn, no refresh needed


def test_the_memory_timeline_redraws_at_most_five_times_a_second_and_ends_on_the_last_reading(qtbot, llama_engine):
    """Readings come 20 times a second: the timeline is redrawn at its own pace, never losing the last."""
    from kvstudio.gui.views.memory import MemoryView

    recorder = Recorder()
    llama_engine.generate(random_ids(120), build_policy("window", {"budget": 16}),
                          GenerationSettings(max_new_tokens=6, chunk_size=16), recorder=recorder)
    view = MemoryView()
    qtbot.addWidget(view)
    view.follow(recorder)
    view.refresh()  # right after the view's first (empty) draw: held back
    readings = len(recorder.all("memory"))
    drawn = lambda: int(np.sum(~np.isnan(view.cache_curve.getData()[0]))) if view.cache_curve.getData()[0] is not None else 0
    assert drawn() < readings
    qtbot.waitUntil(lambda: drawn() == readings, timeout=2000)  # the trailing flush, no new event needed
    assert view.last_reading is recorder.all("memory")[-1]


def test_unfed_tokens_are_grey_after_a_stop_mid_prefill(qtbot, llama_engine):
    """Item 2: tokens not fed yet have their own colour; the summary counts them."""
    cancel = CancelToken()
    chunks = []
    hook = llama_engine.model.register_forward_pre_hook(lambda *_: chunks.append(1) or (
        cancel.cancel() if len(chunks) == 2 else None))  # Stop as the second chunk starts: it stops inside it
    recorder = Recorder()
    try:
        result = llama_engine.generate(random_ids(100), build_policy("window", {"budget": 24}),
                                       GenerationSettings(max_new_tokens=5, chunk_size=32), recorder=recorder,
                                       cancel=cancel)
    finally:
        hook.remove()
    assert result.stop_reason == "cancelled" and len(recorder.all("steps")) == 1
    view = TokenMapView()
    qtbot.addWidget(view)
    view.follow(recorder)
    view.refresh()
    view.flush()
    drawn = view.drawn_colours()
    assert drawn[32:] == [colours.UNFED] * 68  # never fed (or half-fed and dropped): not "held" green
    assert colours.UNFED not in drawn[:32] and drawn[:32].count(colours.held_colour(0.0)) == 32 - 24
    assert "68 prompt tokens not fed yet" in view.summary.text()
    assert "not fed yet" in view.key.text()  # the colour key says what grey means


def test_the_prompt_end_is_marked_and_tokens_tell_about_themselves(qtbot, window):
    """Items 2 and 5: the mark between prompt and generated text, and the hover."""
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("abcdefgh" * 6)  # 48 byte tokens
    window.form.max_new_tokens.setValue(6)
    window.form.chunk_size.setValue(16)
    outcome = run(qtbot, window, "window", budget=12)
    view = window.views.token_view
    window.views.refresh(include_hidden=True)
    shown = view.text.toPlainText()
    assert shown.index(BOUNDARY_MARK) == view._ends[47] and shown.count(BOUNDARY_MARK) == 1
    assert view.token_at(view._ends[47]) is None  # the mark is no token
    first = view.hover_text(0)
    assert first.startswith("position 0 (prompt): 'a'") and "held by 0 of 4 layers" in first
    assert "evicted from layers 0, 1, 2, 3 at step" in first
    assert view.hover_text(48).startswith("position 48 (generated)")
    last = view.hover_text(len(view.tokens) - 1)
    assert "sampled, never fed to the model" in last  # the newest sampled token
    assert "not fed" not in view.summary.text()  # the run ended: nothing waits to be fed (issue 26)
    assert outcome.error is None
    # A real mouse move over token 5 shows its hover.
    left, right = (view.text.cursorRect(_cursor_at(view, at)) for at in (view._starts[5], view._ends[5]))
    middle = QPoint((left.x() + right.x()) // 2, left.center().y())  # the middle of token 5's character
    event = QMouseEvent(QMouseEvent.MouseMove, QPointF(middle), QPointF(view.text.viewport().mapToGlobal(middle)),
                        Qt.NoButton, Qt.NoButton, Qt.NoModifier)
    view.eventFilter(view.text.viewport(), event)
    assert QToolTip.text() == view.hover_text(5)


def _cursor_at(view, character):
    from PySide6.QtGui import QTextCursor

    cursor = QTextCursor(view.text.document())
    cursor.setPosition(character)
    return cursor


def test_attention_for_every_layer_or_a_message(qtbot, window):
    """Item 3: record every layer (its cost shown); a layer not recorded says so instead of empty axes."""
    attention = window.views.attention_view
    assert attention.message.text() == NOTHING_YET  # item 4: before data, words, not -0.5..0.5 axes
    assert not attention.plot.getPlotItem().getAxis("left").isVisible()
    load(qtbot, window)
    assert "recording every layer:" in attention.cost.text() and "per step" in attention.cost.text()
    attention.record.setCurrentText("every layer")
    window.prompt_area.prompt.setPlainText("abcdefgh" * 6)
    window.form.max_new_tokens.setValue(4)
    window.form.chunk_size.setValue(16)
    run(qtbot, window, "h2o", budget=20)
    window.views.refresh(include_hidden=True)
    steps = len(window.state.last_outcome.result.steps)
    recorder = window.state.recorder
    for layer in range(4):
        attention.layer.setValue(layer)
        window.views.refresh(include_hidden=True)
        assert attention.message.text() == ""
        assert np.array_equal(attention.image_values, attention_image(recorder.all("attention"), layer, None))
        assert attention.image_values.shape[0] == steps
    # Only the chosen layer recorded: another layer's plot says so.
    attention.record.setCurrentText("this layer")
    attention.layer.setValue(1)
    run(qtbot, window, "h2o", budget=20)
    attention.layer.setValue(2)
    window.views.refresh(include_hidden=True)
    assert attention.image_values.size == 0
    assert "layer 2 was not recorded in this run" in attention.message.text()
    assert "(recorded: layer 1)" in attention.message.text()
    assert not attention.plot.getPlotItem().getAxis("bottom").isVisible()


def test_attention_hover_log_scale_and_unseen_colour(qtbot, window):
    """Item 5: hover names the key token and weight; log scale; "not yet seen" is not a low weight."""
    load(qtbot, window)
    attention = window.views.attention_view
    window.prompt_area.prompt.setPlainText("abcdefgh" * 6)
    window.form.max_new_tokens.setValue(4)
    window.form.chunk_size.setValue(16)
    run(qtbot, window, "full")
    window.views.refresh(include_hidden=True)
    values = attention.image_values
    assert values[0, 20] == -2  # the first chunk (16 tokens) has not seen position 20
    assert attention.describe_cell(0, 20) == "step 0 · key position 20 'e' · not yet seen at this step"
    assert attention.describe_cell(3, 2).startswith("step 3 · key position 2 'c' · weight ")
    # A real hover over cell (row 3, position 2): the readout says the same.
    window.docks["Attention map"].raise_()
    qtbot.waitUntil(attention.plot.isVisible, timeout=2000)
    qtbot.wait(50)
    scene = attention.plot.getPlotItem().vb.mapViewToScene(QPointF(2.5, 3.5))
    attention.plot.scene().sigMouseMoved.emit(scene)
    assert attention.readout.text() == attention.describe_cell(3, 2)
    lut = attention_lut()
    unseen, lowest = lut[1][:3].astype(int), lut[2][:3].astype(int)
    assert np.abs(unseen - lowest).sum() > 300  # near-white against viridis' dark purple
    linear = attention.image.image.copy()
    attention.scale.setCurrentText("log")
    logged = attention.image.image
    held = values >= 0
    assert not np.array_equal(linear[held], logged[held])
    from kvstudio.core.figures.data import scale_attention

    assert np.array_equal(logged, to_lut_indices(scale_attention(values, attention.top_weight(), log=True)))
    assert (logged[~held & (values == -2)] == 1).all()  # unseen stays its own colour under any scale


def test_empty_states_and_ranges(qtbot, window):
    """Item 4: words before data; a flat count is drawn from zero with room; occupancy follows readings."""
    evictions, occupancy, memory = window.views.evictions_view, window.views.occupancy_view, window.views.memory_view
    assert evictions.counts_message.text() == "no steps yet" and evictions.raster_message.text() == "no evictions yet"
    assert memory.messages[0].text().startswith("no memory readings yet")
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("abcdefgh" * 4)
    window.form.max_new_tokens.setValue(12)
    window.form.chunk_size.setValue(32)
    run(qtbot, window, "window", budget=8)  # one prefill step, then 8 entries evicted at every decode step
    window.views.refresh(include_hidden=True)
    counts = evictions.per_step
    assert len(set(counts[2:])) == 1  # flat
    low, high = evictions.counts.getPlotItem().vb.viewRange()[1]
    assert low <= 0 and high >= max(counts) * 1.05
    assert evictions.counts_message.text() == "" and evictions.raster_message.text() == ""
    assert memory.messages[0].text() == ""
    # Occupancy from a reading taken within a step later than the last one finished (a long chunk).
    recorder = window.state.recorder
    last = recorder.all("steps")[-1]
    reading = next(m for m in recorder.all("memory") if m.kept_per_layer)
    from dataclasses import replace

    midway = replace(reading, step=last.step + 1, kept_per_layer=(7, 5, 3, 1))
    occupancy.consume({"steps": [], "memory": [midway]})
    assert occupancy.kept_per_layer == [7, 5, 3, 1]
    assert list(occupancy.bars.opts["height"]) == [7, 5, 3, 1]


def test_figures_from_the_studio_match_the_command_line(qtbot, window, tmp_path, capsys):
    """Item 7: the studio's figure of a stored run is the file `kvstudio runs plot` writes."""
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText(MANY_EVICTIONS[:120])
    window.form.max_new_tokens.setValue(4)
    window.form.chunk_size.setValue(32)
    outcome = run(qtbot, window, "h2o", budget=16)
    run_id = outcome.request.history_id
    request = FigureRequest("token-map", title=f"run {run_id}", width_px=800)
    studio = window.figures.export_figure(window.state.recorder, request, tmp_path / "studio.png")
    code, _, err = run_cli(capsys, "runs", "plot", str(run_id), "--view", "token-map", str(tmp_path / "cli.png"),
                           "--width", "800")
    assert code == 0, err
    assert studio.read_bytes() == (tmp_path / "cli.png").read_bytes()
    assert window.figures.current_request("attention").layer == window.views.attention_view.layer.value()
    # A view the run has no data for: said in the banner, nothing written.
    window.views.attention_view.layer.setValue(0)
    assert window.figures.export_figure(window.state.recorder, FigureRequest("attention", layer=0),
                                        tmp_path / "none.png") is None
    assert "layer 0 was not recorded" in window.error_text.text() and not (tmp_path / "none.png").exists()
    # The screen plots export as PDF too.
    assert window.exports.export_plot("Evictions", tmp_path / "evictions.pdf").read_bytes()[:5] == b"%PDF-"


def test_a_wide_attention_map_keeps_positions_where_they_are(qtbot, llama_engine):
    """Contexts wider than the screen's columns are max-pooled; position p must still be drawn at x = p."""
    from kvstudio.gui.views.attention_map import AttentionMapView, MAX_COLUMNS

    recorder = Recorder(watch_layers=(1,))
    llama_engine.generate(random_ids(1700), build_policy("window", {"budget": 64}),
                          GenerationSettings(max_new_tokens=2, chunk_size=512, memory_sample_hz=0), recorder=recorder)
    view = AttentionMapView()
    qtbot.addWidget(view)
    view.set_model(4, 4)
    view.layer.setValue(1)
    view.follow(recorder)
    view.refresh()
    width = view.image_values.shape[1]
    assert width == 1701 > MAX_COLUMNS
    drawn = view.image.image  # pooled: two positions a column
    bins = 2
    assert drawn.shape[1] == 851  # as many pooled columns as the context fills, not MAX_COLUMNS (issue 26)
    span = view.image.mapRectToParent(view.image.boundingRect()).width()
    assert span == 851 * bins  # one column per `bins` positions: x = position
    # The first step (positions 0-511 seen) ends its seen part at column 511 // 2.
    first = drawn[0]
    assert (first[: 512 // bins] != 1).all() and (first[512 // bins + 1:] == 1).all()


def test_the_figure_dialog_starts_from_what_is_asked_and_runs_offers_it(qtbot, window):
    from kvstudio.core.figures.render import DEFAULT_DPI
    from kvstudio.gui.features.figure_export import FigureDialog

    assert window.runs.view.controls.indexOf(window.figures.runs_button) >= 0  # "Figure…" beside Export
    dialog = FigureDialog(window, 4, 4, FigureRequest("attention", layer=2, head=1, log_scale=True))
    qtbot.addWidget(dialog)
    assert dialog.request("run 3") == FigureRequest("attention", 2, 1, None, DEFAULT_DPI, True, "run 3")
    dialog.view.setCurrentText("token-map")
    dialog.layer.setCurrentIndex(0)
    dialog.width.setValue(1600)
    assert dialog.request("run 3") == FigureRequest("token-map", None, 1, 1600, DEFAULT_DPI, True, "run 3")
    # With nothing shown, the menu action says what to do.
    window.figures.ask_for_shown_run()
    assert "no run is shown" in window.error_text.text()


def test_a_hidden_view_catches_up_the_moment_it_shows(qtbot, llama_engine):
    """Item 1: a view behind another tab is not refreshed; shown, it draws the final state at once."""
    recorder = Recorder()
    llama_engine.generate(random_ids(90), build_policy("window", {"budget": 16}),
                          GenerationSettings(max_new_tokens=3, chunk_size=16), recorder=recorder)
    view = TokenMapView()
    qtbot.addWidget(view)
    view.follow(recorder)
    assert view.drawn_colours() == []  # hidden: nothing read yet
    view.show()
    assert view.drawn_colours() == final_colours(recorder)


def test_a_model_of_another_shape_empties_the_run_views_one_of_the_same_shape_keeps_them(qtbot, window):
    """The last run's maps cannot be read by a model of another shape's layers and heads."""
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("abcdefgh" * 4)
    window.form.max_new_tokens.setValue(3)
    run(qtbot, window, "window", budget=12)
    token_view = window.views.token_view
    assert token_view.map is not None and token_view.drawn_colours()
    load(qtbot, window, "tiny-qwen2")  # 4 layers, 2 KV heads, as tiny-llama: the run stays shown
    assert token_view.map is not None and token_view.drawn_colours()
    load(qtbot, window, "tiny-llama+kv1")  # 1 KV head
    assert token_view.map is None and token_view.drawn_colours() == [] and token_view.text.toPlainText() == ""
    assert window.views.occupancy_view.run is None and window.views.attention_view.run is None
    outcome = run(qtbot, window, "window", budget=12)  # and the next run draws as usual
    assert outcome.error is None and len(token_view.drawn_colours()) == len(token_view.tokens) > 0
