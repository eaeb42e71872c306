"""The studio's layout as a person reads it (issue 15, items 9-13), checked on what is drawn: the Runs
table's parameters and Compare two; Compare at 1280x800 and 1920x1080; the window at 1280x800 (room
for the output, whole tab labels, a document's text on select, documents and prompt back after a
relaunch); form messages in the form's words; the status after a short or stopped run; prefill
progress within a chunk. pytest-qt, offscreen, tiny-llama."""

from __future__ import annotations

import html
import re

import pyqtgraph as pg
import pytest
from PySide6.QtCore import QMimeData, QSettings, Qt, QUrl
from PySide6.QtWidgets import QTabBar

from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.errors import PolicyConfigError
from kvstudio.core.recording.events import Recorder
from kvstudio.core.spec import create_policy
from kvstudio.gui.features.compare import COLUMNS as COMPARE_COLUMNS
from kvstudio.gui.main_window import MainWindow
from kvstudio.gui.features.runs import COLUMNS as RUNS_COLUMNS
from kvstudio.gui.views.output import OutputView

from .test_gui import run

pytest.importorskip("pytestqt")

pytestmark = pytest.mark.studio_model("tiny-llama")


def cell(table, row: int, columns, name: str) -> str:
    item = table.item(row, columns.index(name))
    return item.text() if item is not None else ""


# -- 9: parameters in the Runs table, outputs and parameters in Compare two ------------------------


def test_runs_table_shows_the_parameters_and_compare_two_the_outputs(qtbot, window):
    window.prompt_area.prompt.setPlainText("the quick brown fox " * 4)
    window.form.max_new_tokens.setValue(6)
    window.form.chunk_size.setValue(16)
    first = run(qtbot, window, "streaming_llm", budget=24, sink=4).result
    window.form.storage_form.codec.setCurrentText("int8")
    window.form.storage_form.group_size.setValue(8)
    second = run(qtbot, window, "h2o", budget=32).result
    view = window.runs.view
    view.refresh()
    table = view.table
    assert [cell(table, r, RUNS_COLUMNS, "policy") for r in range(2)] == ["h2o-int8", "streaming_llm"]  # newest first; the cache
    assert [cell(table, r, RUNS_COLUMNS, "budget") for r in range(2)] == ["32", "24"]
    assert "int8, group 8, residual" in cell(table, 0, RUNS_COLUMNS, "parameters")
    assert "sink 4" in cell(table, 1, RUNS_COLUMNS, "parameters")
    assert "chunk_size: 16" in table.item(1, RUNS_COLUMNS.index("parameters")).toolTip()  # and the settings
    table.selectAll()
    view.compare_selected()
    shown = view.comparison.text()
    for expected in ("budget", "24", "32", "sink 4", "int8", "output"):
        assert expected in shown
    # Both outputs, whole (HTML-escaped as drawn).
    assert html.escape(first.text).replace("\n", "<br>") in shown
    assert html.escape(second.text).replace("\n", "<br>") in shown


# -- 10: Compare readable at 1280x800 and 1920x1080 ------------------------------------------------


@pytest.mark.parametrize("size", [(1280, 800), (1920, 1080)])
def test_compare_is_readable_with_tall_maps_outputs_and_progress(qtbot, window, size):
    window.resize(*size)
    window.prompt_area.prompt.setPlainText("the quick brown fox jumps over the lazy dog " * 40)  # 1,760 tokens
    window.form.max_new_tokens.setValue(4)
    window.form.chunk_size.setValue(256)
    window.form.policy.setCurrentText("h2o")
    window.form.policy_form.set_values({"budget": 48})
    view = window.compare.view
    statuses = set()

    def finished():
        statuses.add(view.status.text())
        return view.table.rowCount() == 3 and not window.state.busy

    window.compare.request(["full", "window", "h2o"])
    qtbot.waitUntil(finished, timeout=60_000)
    assert "running 3 policies as one batch, one row each…" in statuses  # one batched pass, one row each
    assert view.status.text().startswith("3 of 3 done in one batched pass"), view.status.text()
    assert view.isVisible()  # Compare came to the front when it started
    # The table: figures and parameters, no clipped output column.
    assert "output" not in COMPARE_COLUMNS
    assert [cell(view.table, r, COMPARE_COLUMNS, "budget") for r in range(3)] == ["all", "48", "48"]
    # Every map gets real height, and all three sit side by side within the view.
    viewport = view.maps_scroll.viewport()
    for column in view.columns:
        assert column.map.text.viewport().height() >= 250, column.map.text.viewport().height()
        left = column.mapTo(viewport, column.rect().topLeft()).x()
        assert 0 <= left and left + column.width() <= viewport.width()
    # Each output in full, under its map: what the history stored for that run.
    outputs = {record.policy.split("(")[0]: record.output for record in window.history.list(limit=3)}
    for column in view.columns:
        assert column.output.toPlainText() == (outputs[column.policy].strip() or "(no text)")
        assert column.output.verticalScrollBar().maximum() == 0 or column.output.height() >= 60
    # The maps scroll together: the first to its end takes the others to theirs.
    bars = [column.map.text.verticalScrollBar() for column in view.columns]
    assert all(bar.maximum() > 0 for bar in bars)
    bars[0].setValue(bars[0].maximum())
    assert [bar.value() for bar in bars] == [bar.maximum() for bar in bars]
    bars[2].setValue(0)
    assert [bar.value() for bar in bars] == [0, 0, 0]


# -- 11: the window at 1280x800 ---------------------------------------------------------------------


def test_the_window_fits_1280x800_gives_the_output_room_and_shows_whole_tab_labels(qtbot, window):
    window.resize(1280, 800)
    qtbot.waitUntil(lambda: window.width() == 1280 and window.height() == 800, timeout=2000)
    documents = window.prompt_area.documents
    output_box = window.views.output_view.parentWidget()
    assert documents.documents == {}
    assert output_box.height() >= 2 * documents.height()  # the empty list does not take the room
    assert window.views.output_view.text.height() >= 300
    assert window.form.run_button.isVisible() and window.form.run_button.visibleRegion().boundingRect().height() > 0
    bars = [bar for bar in window.findChildren(QTabBar) if bar.count() > 1 and bar.isVisible()]
    assert bars  # the views' tabs, the set-up column's tabs
    for bar in bars:
        assert bar.elideMode() == Qt.ElideNone
        for index in range(bar.count()):
            needed = bar.fontMetrics().horizontalAdvance(bar.tabText(index))
            assert bar.tabRect(index).width() >= needed, bar.tabText(index)


def test_the_token_map_fits_its_dock_at_1280_with_a_long_summary(qtbot, window):
    """The summary line and the colour key wrap (and the attention map's cost line): unwrapped, they
    widened the view past its dock, so the view itself scrolled sideways."""
    window.resize(1280, 800)
    qtbot.waitUntil(lambda: window.width() == 1280, timeout=2000)
    view = window.views.token_view
    window.docks["Token map"].raise_()
    view.summary.setText("570 tokens (546 prompt, 24 generated) · 83 gone from every layer · 0 not fed yet · "
                         "a summary far longer than the dock is wide, as a long run's is")
    qtbot.waitUntil(lambda: view.isVisible(), timeout=2000)
    qtbot.wait(300)  # the layout settles
    scroll = window.docks["Token map"].widget()
    assert view.minimumSizeHint().width() <= scroll.viewport().width()
    assert not scroll.horizontalScrollBar().isVisible()
    # The attention map's cost line ("recording every layer: … per step …") is as long on a deep model.
    attention = window.views.attention_view
    window.docks["Attention map"].raise_()
    attention.cost.setText("recording every layer: 1.3 MiB per step at 1,000 held entries (30 layers × 9 query "
                           "heads × 4 B + 1 KV heads × 8 B per entry); this layer alone: 43.0 KiB")
    qtbot.waitUntil(lambda: attention.isVisible(), timeout=2000)
    qtbot.wait(300)
    scroll = window.docks["Attention map"].widget()
    assert attention.minimumSizeHint().width() <= scroll.viewport().width()
    assert not scroll.horizontalScrollBar().isVisible()


def test_no_view_scrolls_sideways_at_1280(qtbot, window):
    """Every tabbed view fits its dock at 1280x800: Evaluate's export buttons, the Runs and Caches button
    rows and the attention map's controls once made their docks scroll sideways. The docks there are
    about 575 px wide beside the set-up column and the prompt (measured on the real window, xcb); the
    test window's docks may be wider, so each view's minimum is held to that width, not its dock's."""
    dock_width_at_1280 = 560
    from PySide6.QtWidgets import QScrollArea

    window.resize(1280, 800)
    qtbot.waitUntil(lambda: window.width() == 1280, timeout=2000)
    checked = []
    for name, dock in window.docks.items():
        scroll = dock.widget()
        if not isinstance(scroll, QScrollArea) or scroll.horizontalScrollBarPolicy() == Qt.ScrollBarAlwaysOff:
            continue  # the set-up column scrolls down only, by design
        dock.raise_()
        qtbot.waitUntil(lambda: scroll.isVisible(), timeout=2000)
        qtbot.wait(100)  # the layout settles
        assert scroll.widget().minimumSizeHint().width() <= dock_width_at_1280, name
        assert not scroll.horizontalScrollBar().isVisible(), name
        # A plot's title does not wrap: a long one widens the plot past its view and cuts the data
        # off (occupancy's merged-bars title hid layers 25-29 of 30).
        for plot in scroll.widget().findChildren(pg.PlotWidget):
            title = plot.getPlotItem().titleLabel.item.boundingRect().width()
            assert title <= dock_width_at_1280 - 80, (name, plot.getPlotItem().titleLabel.text)
        checked.append(name)
    assert "Evaluate" in checked and "Token map" in checked


def test_a_selected_document_shows_its_text_and_documents_and_prompt_come_back(qtbot, tmp_path, window):
    notes = tmp_path / "notes.md"
    notes.write_text("Heavy hitters collect attention.", encoding="utf-8")
    gone = tmp_path / "gone.md"
    gone.write_text("soon deleted", encoding="utf-8")
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(notes)), QUrl.fromLocalFile(str(gone))])
    window.prompt_area.handle_drop(mime)
    window.prompt_area.documents.add_text("a pasted paragraph")
    documents = window.prompt_area.documents
    documents.list.setCurrentRow(0)
    assert documents.preview.toPlainText() == "Heavy hitters collect attention."
    documents.list.setCurrentRow(2)
    assert documents.preview.toPlainText() == "a pasted paragraph"
    documents.list.item(1).setCheckState(Qt.Unchecked)
    window.prompt_area.prompt.setPlainText("What do heavy hitters collect?")
    window.close()
    gone.unlink()
    again = MainWindow(QSettings(window.settings.fileName(), QSettings.IniFormat))
    qtbot.addWidget(again)
    try:
        restored = again.prompt_area.documents
        assert [d.name for d in restored.documents.values()] == ["notes.md", "dropped text"]
        assert [d.text for d in restored.documents.values()] == ["Heavy hitters collect attention.",
                                                                "a pasted paragraph"]
        assert again.prompt_area.prompt.toPlainText() == "What do heavy hitters collect?"
        assert again.prompt_area.full_prompt() == ("Heavy hitters collect attention.\n\na pasted paragraph\n\n"
                                                   "What do heavy hitters collect?")
        assert "gone.md" in again.error_text.text() and again.error_banner.isVisibleTo(again)
    finally:
        again.close()
        again.plugins.unload()


# -- 12: the form's words; the status after a short or stopped run ---------------------------------


def test_form_messages_name_the_form_labels_and_the_cli_keeps_its_flags(qtbot, window):
    window.form.policy.setCurrentText("h2o")
    window.form.policy_form.set_values({"budget": 128, "recent": 200})
    assert window.form.policy_form.error.text() == "Recent 200 is larger than budget 128"
    storage = window.form.storage_form
    storage.recall.setValue(2)  # the tier is still "device": a greyed field, no message (issue 26)
    assert storage.error.text() == ""
    storage.codec.setCurrentText("bnb-int8")  # on this CPU: refused in the form's words
    assert storage.error.text().startswith("Codec bnb-int8 runs on CUDA only")
    assert "--" not in window.form.policy_form.error.text() + storage.error.text()
    window.prompt_area.prompt.setPlainText("hello")
    window.run.request_run()
    assert not window.state.busy
    assert window.error_text.text() == "policy parameters: Recent 200 is larger than budget 128"
    with pytest.raises(PolicyConfigError, match="--recent 200 is larger than --budget 128"):
        create_policy("h2o", budget=128, recent=200)  # the CLI's words stay


def test_the_status_counts_tokens_in_words_and_gives_a_measured_rate(qtbot, window):
    window.prompt_area.prompt.setPlainText("x" * 50)
    window.form.max_new_tokens.setValue(1)
    outcome = run(qtbot, window, "window", budget=16)
    status = window.statusBar().currentMessage()
    assert outcome.result.token_ids and len(outcome.result.token_ids) == 1
    assert " · 1 token · prefill 50 tokens at " in status and "tokens/s" in status
    # Word boundaries: a rate such as "651 tokens/s" holds the text "1 tokens" without being a count.
    assert not re.search(r"(?<![\d.])0\.0 tokens/s", status) and not re.search(r"(?<![\d,.])1 tokens(?!/s)", status)
    # Stopped mid-generation: whatever count it reached, its plural is right and its rate was measured.
    window.form.max_new_tokens.setValue(100_000)
    window.run.request_run()
    qtbot.waitUntil(lambda: len(window.state.recorder.all("tokens")) >= 1, timeout=10_000)
    window.run.stop()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=10_000)
    result = window.state.last_outcome.result
    status = window.statusBar().currentMessage()
    count = len(result.token_ids)
    assert result.stop_reason == "cancelled" and f" · {count:,} token{'' if count == 1 else 's'} · " in status
    rate = re.search(r"([\d.]+) tokens/s", status)
    assert rate and float(rate.group(1)) > 0


# -- 13: prefill progress within a chunk -------------------------------------------------------------


def test_the_prefill_bar_moves_within_a_chunk(qtbot, window):
    recorder = Recorder()
    window.worker.engine.generate("the quick brown fox " * 8, create_policy("full"),
                                  GenerationSettings(max_new_tokens=1, chunk_size=160),
                                  recorder=recorder)
    view = OutputView()
    qtbot.addWidget(view)
    replay = Recorder()
    view.follow(replay)
    replay.record(recorder.all("runs")[0])
    halfway = next(p for p in recorder.all("prefill") if p.layers_done == 2)  # 2 of 4 layers of the chunk
    replay.record(halfway)
    view.refresh()
    assert view.prefill.maximum() == 160 and view.prefill.value() == 80  # half the chunk's layers: half its tokens
    assert view.prefill.format() == "prefill 0 / 160 tokens · layer 2/4"
    replay.record(recorder.all("prefill")[-1])
    view.refresh()
    assert view.prefill.value() == 160 and view.prefill.format() == "prefill 160 / 160 tokens"


def test_stop_inside_a_prefill_chunk_ends_the_run_there_and_says_so(qtbot, window):
    from kvstudio.core.runtime.layer_hooks import decoder_layers

    window.prompt_area.prompt.setPlainText("x" * 400)
    window.form.chunk_size.setValue(400)  # the whole prompt in one chunk
    window.form.max_new_tokens.setValue(5)
    layers = decoder_layers(window.worker.engine.model, 4)
    # Stop arrives while the chunk is at layer 2 (what the Stop button does, from the model's thread here).
    handle = layers[2].register_forward_pre_hook(lambda *_: window.run.stop())
    try:
        outcome = run(qtbot, window, "window", budget=16)
    finally:
        handle.remove()
    assert outcome.result.stop_reason == "cancelled" and outcome.result.steps == []
    assert window.statusBar().currentMessage().startswith(
        "window: cancelled · 0 tokens · stopped before the first prefill chunk was through · peak cache ")
    bar = window.views.output_view.prefill
    assert bar.value() == 100 and bar.format() == "prefill 0 / 400 tokens · layer 1/4"  # where it stopped
    assert window.history.list(limit=1)[0].shown_status == "cancelled"
