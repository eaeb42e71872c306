"""The studio window, driven as a user drives it (pytest-qt, offscreen), on real tiny models."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PySide6.QtCore import QMimeData, QSettings, Qt, QUrl

from kvstudio.core.policies import available_policies, register, unregister
from kvstudio.core.policies.base import Policy
from kvstudio.gui.features.compare import COLUMNS
from kvstudio.gui.main_window import MainWindow

pytest.importorskip("pytestqt")


pytestmark = pytest.mark.usefixtures("studio_folders")  # never the real user plugin folder, even without a window


def load(qtbot, win, spec="tiny-llama"):
    win.loading.request_load(spec, "cpu", "auto")
    qtbot.waitUntil(lambda: win.state.model_info is not None and win.state.model_info.spec == spec, timeout=20_000)


def run(qtbot, win, policy="streaming_llm", timeout=30_000, **parameters):
    win.form.policy.setCurrentText(policy)
    win.form.policy_form.set_values(parameters)
    win.run.request_run()
    assert win.state.busy, win.error_text.text()
    qtbot.waitUntil(lambda: not win.state.busy, timeout=timeout)
    win.views.refresh()
    return win.state.last_outcome


def test_a_run_reaches_every_view(qtbot, window):
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("the quick brown fox " * 5)  # 100 byte tokens
    window.form.max_new_tokens.setValue(12)
    window.form.chunk_size.setValue(16)
    outcome = run(qtbot, window, budget=24, sink=4)
    assert outcome.error is None
    result = outcome.result
    assert window.views.output_view.text.toPlainText() == result.text
    assert window.views.occupancy_view.kept_per_layer == result.kept_per_layer == [24] * 4
    assert len(window.views.occupancy_view.totals) == len(result.steps)
    # Token map: 100 prompt + 12 generated tokens; StreamingLLM kept sinks 0-3 and the newest 20
    # of the 111 fed, in every layer, so exactly those are still held by all 4 layers.
    holding = window.views.token_view.layers_holding()
    assert len(holding) == 112
    held = set(np.flatnonzero(holding == 4))
    assert held == set(range(4)) | set(range(91, 112))
    assert set(np.flatnonzero(holding == 0)) == set(range(4, 91))
    # Evictions raster: every eviction of the chosen layer, over its 2 KV heads.
    steps, positions = window.views.evictions_view.raster_points()
    assert len(positions) == result.evictions // 4
    assert set(positions.tolist()) == set(range(4, 91))
    # Attention map: one row per step for the watched layer. A row shows what the query attended
    # to, before that step's eviction: in the last step, positions 0-3 and 90-110 (token 111 was
    # sampled, never fed), and 4-89 already evicted.
    image = window.views.attention_view.image_values
    assert image.shape == (len(result.steps), 111)
    assert (image[-1, 4:90] == -1).all() and (image[-1, 90:] >= 0).all() and (image[-1, :4] >= 0).all()
    # Memory: one sample per step, the cache's bytes as the engine counted them.
    assert [s.cache_bytes for s in window.views.memory_view.step_readings()] == [s.cache_bytes for s in result.steps]


def test_model_code_never_runs_on_the_gui_thread(qtbot, window):
    load(qtbot, window)
    forward_threads = set()
    handle = window.worker.engine.model.register_forward_pre_hook(
        lambda *_: forward_threads.add(threading.get_ident()))
    try:
        window.prompt_area.prompt.setPlainText("hello")
        run(qtbot, window, "full")
    finally:
        handle.remove()
    gui_thread = threading.get_ident()
    assert forward_threads and gui_thread not in forward_threads
    assert gui_thread not in window.worker.model_thread_ids


def test_dropping_a_text_file_adds_it_with_its_token_count(qtbot, window, tmp_path):
    load(qtbot, window)
    notes = tmp_path / "notes.md"
    notes.write_text("twelve bytes", encoding="utf-8")
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(notes))])
    window.prompt_area.handle_drop(mime)
    assert [d.name for d in window.prompt_area.documents.documents.values()] == ["notes.md"]
    qtbot.waitUntil(lambda: window.prompt_area.documents.token_counts.get(0) == 12, timeout=5000)
    assert "notes.md — 12 tokens" == window.prompt_area.documents.list.item(0).text()
    assert window.prompt_area.full_prompt().startswith("twelve bytes")


def test_a_real_drop_event_on_the_window_adds_the_file(qtbot, window, tmp_path):
    from PySide6.QtCore import QPointF, Qt
    from PySide6.QtGui import QDropEvent

    from .test_documents import minimal_pdf

    paper = tmp_path / "paper.pdf"
    paper.write_bytes(minimal_pdf("Heavy hitters collect attention"))
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(paper))])
    event = QDropEvent(QPointF(50, 50), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    # QApplication.sendEvent discards a drop when no drag is in progress (offscreen has none);
    # the window's own event() dispatches the real event to dropEvent as a drag would.
    assert window.event(event)
    assert [d.text for d in window.prompt_area.documents.documents.values()] == ["Heavy hitters collect attention"]


def test_dropping_a_binary_file_is_refused_and_adds_nothing(qtbot, window, tmp_path):
    blob = tmp_path / "weights.txt"
    blob.write_bytes(b"\x00\x01\x02" * 100)
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(blob))])
    window.prompt_area.handle_drop(mime)
    assert window.prompt_area.documents.documents == {}
    assert window.error_banner.isVisible()
    assert "looks binary" in window.error_text.text()
    unsupported = tmp_path / "image.png"
    unsupported.write_bytes(b"\x89PNG")
    mime.setUrls([QUrl.fromLocalFile(str(unsupported))])
    window.prompt_area.handle_drop(mime)
    assert "unsupported file type '.png'" in window.error_text.text() and window.prompt_area.documents.documents == {}


def test_dropped_plain_text_becomes_a_document(qtbot, window):
    mime = QMimeData()
    mime.setText("a pasted paragraph")
    window.prompt_area.handle_drop(mime)
    assert [d.text for d in window.prompt_area.documents.documents.values()] == ["a pasted paragraph"]


def start_long_run(qtbot, window):
    """A run that goes on until stopped (100,000 tokens asked for)."""
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("x" * 50)
    window.form.max_new_tokens.setValue(100_000)
    window.form.policy.setCurrentText("window")
    window.form.policy_form.set_values({"budget": 16})
    window.run.request_run()


def test_stop_cancels_within_a_step(qtbot, window):
    start_long_run(qtbot, window)
    qtbot.waitUntil(lambda: len(window.state.recorder.all("tokens")) >= 5, timeout=10_000)
    window.run.stop()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=5000)
    result = window.state.last_outcome.result
    assert result.stop_reason == "cancelled"
    assert len(result.token_ids) < 100_000
    assert window.form.run_button.isEnabled() and not window.form.stop_button.isEnabled()


def test_loading_during_a_run_is_refused_with_a_reason(qtbot, window):
    start_long_run(qtbot, window)
    assert not window.loading.panel.load.isEnabled()
    window.loading.request_load("tiny-qwen2", "cpu", "auto")
    assert "a run is in progress" in window.error_text.text()
    window.run.stop()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=5000)
    assert window.loading.panel.load.isEnabled() and window.state.model_info.spec == "tiny-llama"


class _Exploding(Policy):
    name = "exploding_for_test"
    summary = "raises in select"

    def select(self, view, state):
        raise RuntimeError("boom at step %d" % view.step)


def test_a_policy_that_raises_shows_a_message_and_leaves_the_window_usable(qtbot, window):
    load(qtbot, window)
    register(_Exploding, source="test_gui.py")  # as a plugin file would: unregistered after
    try:
        window.form.policy.addItem(_Exploding.name)
        window.prompt_area.prompt.setPlainText("hello there")
        outcome = run(qtbot, window, _Exploding.name, budget=4)
    finally:
        unregister(_Exploding.name)
    assert "exploding_for_test" not in available_policies()
    assert "policy 'exploding_for_test' (plugin test_gui.py) raised in layer 0: RuntimeError: boom at step 0" in outcome.error
    assert window.error_banner.isVisible() and "boom" in window.error_text.text()
    ok = run(qtbot, window, "window", budget=4)
    assert ok.error is None and ok.result.token_ids


def test_a_model_that_fails_to_load_shows_why(qtbot, window):
    window.loading.request_load("nobody/no-such-model", "cpu", "auto")
    qtbot.waitUntil(lambda: window.error_banner.isVisible(), timeout=10_000)
    assert "unknown model 'nobody/no-such-model'" in window.error_text.text()
    assert window.loading.panel.load.isEnabled()
    load(qtbot, window)  # still usable


def test_loading_can_be_cancelled(qtbot, window):
    window.loading.request_load("tiny-qwen2", "cpu", "auto")
    window.loading.cancel()
    qtbot.waitUntil(lambda: window.error_banner.isVisible(), timeout=10_000)
    assert "loading cancelled" in window.error_text.text()
    assert window.state.model_info is None and window.worker.engine is None


def test_policy_form_is_generated_from_declared_parameters(qtbot, window):
    window.form.policy.setCurrentText("snapkv")
    editors = window.form.policy_form.editors
    assert {"budget", "rerotate", "observation_window", "kernel_size", "pooling", "compress_every",
            "gqa_aggregation"} == set(editors)
    assert type(editors["gqa_aggregation"][1]).__name__ == "QComboBox"
    assert type(editors["pooling"][1]).__name__ == "QComboBox"
    window.form.policy_form.set_values({"budget": 64, "kernel_size": 4})
    assert "Kernel size must be odd" in window.form.policy_form.error.text()
    window.form.policy_form.set_values({"kernel_size": 5})
    assert window.form.policy_form.error.text() == ""
    assert window.form.policy_form.values()["budget"] == 64
    window.form.policy.setCurrentText("h2o")
    assert window.form.policy_form.values()["recent"] is None  # "auto": half the budget


def test_invalid_parameters_block_the_run_with_the_reason(qtbot, window):
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("hello")
    window.form.policy.setCurrentText("streaming_llm")
    window.form.policy_form.set_values({"budget": 2, "sink": 4})
    window.run.request_run()
    assert not window.state.busy
    assert "larger than the sink" in window.error_text.text()


def test_closing_during_a_run_ends_the_worker_cleanly(qtbot, tmp_path, capfd):
    win = MainWindow(QSettings(str(tmp_path / "s.ini"), QSettings.IniFormat))
    win.show()
    load(qtbot, win)
    win.prompt_area.prompt.setPlainText("y" * 40)
    win.form.max_new_tokens.setValue(100_000)
    win.form.policy.setCurrentText("full")
    win.run.request_run()
    qtbot.waitUntil(lambda: len(win.state.recorder.all("tokens")) >= 3, timeout=10_000)
    win.close()  # asks first (close_guard.py): stop and close
    win.close_guard.stop_button.click()
    assert win.thread_.isFinished()
    assert "Traceback" not in capfd.readouterr().err


def test_settings_persist_across_windows(qtbot, tmp_path):
    path = str(tmp_path / "persist.ini")
    first = MainWindow(QSettings(path, QSettings.IniFormat))
    qtbot.addWidget(first)
    load(qtbot, first, "tiny-gemma")
    first.form.policy.setCurrentText("h2o")
    first.form.policy_form.set_values({"budget": 77, "recent": 11})
    first.form.chunk_size.setValue(99)
    first.close()
    second = MainWindow(QSettings(path, QSettings.IniFormat))
    qtbot.addWidget(second)
    try:
        assert second.form.policy.currentText() == "h2o"
        assert second.form.policy_form.values()["budget"] == 77 and second.form.policy_form.values()["recent"] == 11
        assert second.form.chunk_size.value() == 99
        assert second.loading.panel.spec.itemText(0) == "tiny-gemma"
    finally:
        second.close()


def test_compare_runs_each_policy_and_shows_them_side_by_side(qtbot, window):
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("compare me " * 6)
    window.form.max_new_tokens.setValue(5)
    window.form.policy.setCurrentText("window")
    window.form.policy_form.set_values({"budget": 16})
    window.compare.request(["full", "window", "h2o"])
    qtbot.waitUntil(lambda: window.compare.view.table.rowCount() == 3 and not window.state.busy, timeout=30_000)
    table = window.compare.view.table
    assert [table.item(r, 0).text() for r in range(3)] == ["full", "window", "h2o"]
    evictions = COLUMNS.index("evictions")
    assert int(table.item(0, evictions).text()) == 0 and int(table.item(1, evictions).text()) > 0
    assert len(window.compare.view.map_views) == 3
    assert window.compare.view.map_views[0].layers_holding().min() == 4  # full keeps every token
    assert window.compare.view.map_views[1].layers_holding().min() == 0


def test_changing_the_watched_layer_mid_run_follows_it(qtbot, window):
    load(qtbot, window)
    window.views.attention_view.layer.setValue(1)
    window.prompt_area.prompt.setPlainText("z" * 30)
    outcome = run(qtbot, window, "full")
    assert {e.layer for e in window.state.recorder.all("attention")} == {1}
    window.views.attention_view.layer.setValue(3)
    assert window.state.recorder.watch_layers == frozenset({3})
    assert outcome.error is None


def test_error_banner_for_a_run_without_a_model(qtbot, window):
    window.prompt_area.prompt.setPlainText("hello")
    window.run.request_run()
    assert not window.state.busy and "load a model first" in window.error_text.text()


def test_closing_an_idle_window_stops_its_thread(qtbot, window):
    window.close()
    assert window.thread_.isFinished()


PLUGIN = """
from kvstudio.core.policies.base import Policy, PolicyConfig, keep_all_if_within, parameter
from dataclasses import dataclass
import torch

@dataclass
class NewestConfig(PolicyConfig):
    keep_first: bool = parameter(False, help="keep the first entry too")

class Newest(Policy):
    name = "gui_newest"
    summary = "SUMMARY"
    Config = NewestConfig

    def select(self, view, state):
        if keep_all_if_within(view):
            return None
        return torch.arange(view.n_entries - view.budget, view.n_entries).expand(view.kv_heads, -1)
"""


def test_dropping_a_plugin_installs_it_and_it_runs_without_a_restart(qtbot, window, tmp_path):
    from kvstudio.core.plugins.loader import user_plugin_dir

    load(qtbot, window)
    source = tmp_path / "gui_newest.py"
    source.write_text(PLUGIN.replace("SUMMARY", "the newest entries"))
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(source))])
    window.prompt_area.handle_drop(mime)
    assert window.plugins_feature.offer_bar.isVisible() and "gui_newest.py" in window.plugins_feature.offer_text.text()
    assert window.prompt_area.documents.documents == {}  # nothing added until the user chooses
    qtbot.mouseClick(window.plugins_feature.offer_install, Qt.LeftButton)
    installed = user_plugin_dir() / "gui_newest.py"
    assert installed.read_text() == source.read_text()
    assert window.form.policy.currentText() == "gui_newest"
    assert set(window.form.policy_form.editors) == {"budget", "rerotate", "keep_first"}  # a generated form
    assert "gui_newest" in window.compare.view.checked() or window.compare.view.choices.findItems(
        "gui_newest", Qt.MatchExactly)
    window.prompt_area.prompt.setPlainText("p" * 30)
    outcome = run(qtbot, window, "gui_newest", budget=8)
    assert outcome.error is None and outcome.result.kept_per_layer == [8] * 4
    assert window.views.token_view.layers_holding()[:22].max() == 0  # the token map shows what it dropped


def test_a_dropped_python_file_can_be_a_document_instead(qtbot, window, tmp_path):
    source = tmp_path / "script.py"
    source.write_text("print('hello')\n")
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(source))])
    window.prompt_area.handle_drop(mime)
    qtbot.mouseClick(window.plugins_feature.offer_document, Qt.LeftButton)
    assert [d.text for d in window.prompt_area.documents.documents.values()] == ["print('hello')\n"]
    assert not window.plugins_feature.offer_bar.isVisible()


def test_plugin_manager_lists_sources_errors_and_reloads_edits(qtbot, window, tmp_path):
    from kvstudio.core.plugins.loader import user_plugin_dir
    from kvstudio.core.policies import policy_class

    folder = user_plugin_dir()
    folder.mkdir(parents=True)
    (folder / "gui_newest.py").write_text(PLUGIN.replace("SUMMARY", "version one"))
    (folder / "broken.py").write_text("import nothing_called_this\n")
    view = window.plugins_feature.view
    view.reload_plugins()
    rows = {view.table.item(r, 0).text(): (view.table.item(r, 1).text(), view.table.item(r, 3).text())
            for r in range(view.table.rowCount())}
    assert rows[str(folder / "gui_newest.py")] == ("loaded", "")
    status, error = rows[str(folder / "broken.py")]
    assert status == "error" and "ModuleNotFoundError" in error
    assert any(r.endswith("decayed_h2o.py") for r in rows)  # the repository's examples
    assert "never runs a policy named inside a run file" in view.note.text()
    (folder / "gui_newest.py").write_text(PLUGIN.replace("SUMMARY", "version two"))
    qtbot.mouseClick(view.reload, Qt.LeftButton)
    assert policy_class("gui_newest").summary == "version two"
    window.form.policy.setCurrentText("gui_newest")
    assert window.form.policy_help.text() == "version two"
    (folder / "gui_newest.py").unlink()
    view.reload_plugins()
    assert window.form.policy.findText("gui_newest") == -1


def test_extra_plugin_folders_are_remembered(qtbot, tmp_path):
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "gui_newest.py").write_text(PLUGIN.replace("SUMMARY", "from my folder"))
    path = str(tmp_path / "folders.ini")
    first = MainWindow(QSettings(path, QSettings.IniFormat))
    qtbot.addWidget(first)
    first.plugins_feature.add_plugin_folder(str(folder))
    assert first.form.policy.findText("gui_newest") >= 0
    first.close()
    first.plugins.unload()
    second = MainWindow(QSettings(path, QSettings.IniFormat))
    qtbot.addWidget(second)
    try:
        assert second.form.policy.findText("gui_newest") >= 0
    finally:
        second.close()
        second.plugins.unload()


def test_studio_runs_are_stored_in_the_history(qtbot, window):
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("remember this run")
    outcome = run(qtbot, window, "window", budget=6)
    record = window.history.get(outcome.request.history_id)
    assert (record.policy, record.status, record.output) == ("window", "finished", outcome.result.text)
    assert record.prompt_preview == "remember this run" and record.steps


def test_a_corrupt_history_turns_history_off_and_says_why(qtbot, tmp_path):
    from kvstudio.core.persist.history import default_path

    default_path().parent.mkdir(parents=True, exist_ok=True)
    default_path().write_bytes(b"garbage" * 200)
    win = MainWindow(QSettings(str(tmp_path / "c.ini"), QSettings.IniFormat))
    qtbot.addWidget(win)
    try:
        assert win.history is None
        assert "unreadable" in win.error_text.text()
        load(qtbot, win)
        win.prompt_area.prompt.setPlainText("still runs")
        assert run(qtbot, win, "full").error is None
    finally:
        win.close()
        win.plugins.unload()
        for suffix in ("", "-wal", "-shm"):  # leave a fresh history for the tests after this one
            default_path().with_name(default_path().name + suffix).unlink(missing_ok=True)


def test_exports_from_the_studio(qtbot, window, tmp_path):
    import csv as csv_module
    import json

    assert window.exports.export_run(tmp_path / "nothing.json") is None
    assert "run something first" in window.error_text.text()
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("export me " * 5)
    outcome = run(qtbot, window, "streaming_llm", budget=12, sink=2)
    data = json.loads(window.exports.export_run(tmp_path / "run.json").read_text())
    assert data["output"] == outcome.result.text and data["policy"] == "streaming_llm"
    with window.exports.export_run(tmp_path / "run.csv").open(newline="") as stream:
        assert len(list(csv_module.DictReader(stream))) == len(outcome.result.steps)
    saved = np.load(window.exports.export_attention(tmp_path / "attention.npy"))
    assert np.array_equal(saved, window.views.attention_view.image_values)
    for title in window.exports.plot_views():
        png = window.exports.export_plot(title, tmp_path / f"{title}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        svg = window.exports.export_plot(title, tmp_path / f"{title}.svg")
        assert "<svg" in svg.read_text()
    assert window.exports.export_plot("Memory (cache)", tmp_path / "memory.jpg") is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_runs_view_browses_filters_compares_and_deletes(qtbot, window, tmp_path):
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("first prompt about sinks")
    first = run(qtbot, window, "streaming_llm", budget=8, sink=2).request.history_id
    window.prompt_area.prompt.setPlainText("second prompt about heavy hitters")
    second = run(qtbot, window, "h2o", budget=8).request.history_id
    view = window.runs.view
    assert [int(view.table.item(r, 0).text()) for r in range(view.table.rowCount())][:2] == [second, first]
    view.search.setText("heavy hitters")
    view.refresh()
    assert view.table.rowCount() == 1 and view.table.item(0, 4).text() == "h2o"
    view.search.setText("policy=streaming_llm")
    view.refresh()
    assert [view.table.item(r, 4).text() for r in range(view.table.rowCount())] == ["streaming_llm"]
    view.search.setText("")
    view.refresh()
    from PySide6.QtCore import QItemSelectionModel

    view.table.selectRow(0)
    view.table.selectionModel().select(view.table.model().index(1, 0),
                                       QItemSelectionModel.Select | QItemSelectionModel.Rows)
    view.compare_selected()
    assert f"run {second}: h2o" in view.comparison.text() and f"run {first}: streaming_llm" in view.comparison.text()
    view.table.clearSelection()
    view.table.selectRow(1)
    view.delete_selected()
    assert [int(view.table.item(r, 0).text()) for r in range(view.table.rowCount())][:1] == [second]
    # A restart finds the runs again.
    again = MainWindow(QSettings(str(tmp_path / "restart.ini"), QSettings.IniFormat))
    qtbot.addWidget(again)
    try:
        assert again.runs.view.table.item(0, 0).text() == str(second)
    finally:
        again.close()
        again.plugins.unload()


def test_every_policy_form_starts_valid_on_first_use(qtbot, window):
    for index in range(window.form.policy.count()):
        window.form.policy.setCurrentIndex(index)
        name = window.form.policy.currentText()
        assert window.form.policy_form.validate() is None, name
        assert window.form.policy_form.error.text() == "", name


def test_memory_view_marks_load_prefill_chunks_decode_and_eviction_bursts(qtbot, window):
    load(qtbot, window)
    view = window.views.memory_view
    window.views.refresh(include_hidden=True)
    load_bands = [band for band in view.segment.bands if band[0] == "load"]
    assert len(load_bands) == 1 and load_bands[0][2] > load_bands[0][1]  # the load took some time
    window.prompt_area.prompt.setPlainText("abcdefgh" * 10)  # 80 byte tokens: 5 chunks of 16
    window.form.max_new_tokens.setValue(6)
    window.form.chunk_size.setValue(16)
    outcome = run(qtbot, window, "window", budget=20)
    window.views.refresh(include_hidden=True)
    phases = [band[0] for band in view.segment.bands]
    assert phases == ["prefill"] * 5 + ["decode"]
    # Chunks follow each other without gaps, each ending at its step's reading.
    bands = view.segment.bands
    assert all(bands[i][2] == bands[i + 1][1] for i in range(len(bands) - 1))
    step_x = view.columns["x"][view.columns["run_step"] == 1].tolist()
    assert [band[2] for band in bands[:5]] == step_x[len(step_x) - len(outcome.result.steps):][:5]
    # Bursts, in entries over 4 layers x 2 KV heads: chunk 2 takes 32 held down to 20 (12 tokens, 96),
    # chunks 3-5 evict 16 tokens each (128); decode steps evict 1 token (8), not a burst.
    assert len(view.bursts.data) == 4
    assert [point["data"] for point in view.burst_points] == ["step 1: 96 entries evicted"] + [
        f"step {i}: 128 entries evicted" for i in (2, 3, 4)]
    # The session keeps the load before the run; Clear empties it.
    assert view.columns["x"][0] < view.segment.start and view.last_reading.phase == "decode"
    assert "cache " in view.readout.text() and "process " in view.readout.text()
    view.clear()
    assert view.columns.length == 0 and view.step_readings() == [] and view.band_items == []


def test_record_and_view_a_memory_snapshot_in_the_studio(qtbot, window, tmp_path):
    from kvstudio.core.recording.snapshots import load_snapshot, timelines
    from kvstudio.gui.features.snapshot import LARGEST

    load(qtbot, window)
    path = tmp_path / "studio.pickle"
    window.snapshots.arm(str(path))
    assert "next run will be recorded" in window.statusBar().currentMessage()
    window.prompt_area.prompt.setPlainText("snapshot " * 6)
    window.form.chunk_size.setValue(16)
    window.form.max_new_tokens.setValue(4)
    outcome = run(qtbot, window, "h2o", budget=16)
    assert outcome.error is None and outcome.snapshot is not None
    view = window.snapshots.view
    [timeline] = timelines(load_snapshot(path))
    assert view.timeline.peak_bytes == timeline.peak_bytes and len(view.timeline.allocations) == len(
        timeline.allocations)
    assert view.table.rowCount() == len(view.shown) == min(LARGEST, len(timeline.allocations))
    sizes = [a.size for a in view.shown]
    assert sizes == sorted(sizes, reverse=True)
    view.table.selectRow(0)
    assert "innermost frame first" in view.stack.toPlainText()
    assert view.bar_items[0].opts["brush"].color().getRgb()[:3] == (240, 180, 60)
    assert len(view.mark_lines) == 2 * len(view.timeline.marks) > 0
    assert "studio.pickle" in view.summary.text() and "allocations" in view.summary.text()
    # The next run is not recorded: a snapshot is of one run.
    assert run(qtbot, window, "h2o", budget=16).snapshot is None


def test_opening_a_snapshot_warns_first_and_refuses_what_is_not_one(qtbot, window, tmp_path):
    view = window.snapshots.view
    window.snapshots.offer_file()
    assert view.warning_bar.isVisible() and "pickle" in view.warning_text.text()
    bad = tmp_path / "notes.txt"
    bad.write_text("not a snapshot")
    assert view.open_path(bad) is False
    assert "notes.txt is not a memory snapshot" in view.summary.text() and view.timeline is None
    qtbot.mouseClick(view.dismiss_button, Qt.LeftButton)
    assert not view.warning_bar.isVisible()


def _views_state(window):
    steps, positions = window.views.evictions_view.raster_points()
    return (window.views.output_view.text.toPlainText(), window.views.token_view.layers_holding().tolist(),
            steps.tolist(), positions.tolist(), list(window.views.occupancy_view.kept_per_layer),
            window.views.attention_view.image_values.copy(),
            [s.cache_bytes for s in window.views.memory_view.step_readings()])


def test_a_stored_run_reopens_its_views_after_a_restart(qtbot, window, tmp_path):
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("reopen this run " * 6)
    window.form.max_new_tokens.setValue(8)
    window.form.chunk_size.setValue(16)
    outcome = run(qtbot, window, "h2o", budget=20)
    window.views.refresh(include_hidden=True)
    live = _views_state(window)
    assert live[0] and live[3] and live[4] and live[5].size and len(live[6]) == len(outcome.result.steps)
    run_id = outcome.request.history_id
    window.prompt_area.prompt.setPlainText("something else entirely")
    run(qtbot, window, "window", budget=8)

    # A new window, as after a restart, with no model loaded: the stored run's views come back.
    settings = QSettings(str(tmp_path / "settings2.ini"), QSettings.IniFormat)
    again = MainWindow(settings)
    qtbot.addWidget(again)
    again.show()
    try:
        again.runs.view.refresh()
        row = [int(again.runs.view.table.item(r, 0).text()) for r in range(again.runs.view.table.rowCount())].index(
            run_id)
        again.runs.view.table.selectRow(row)
        qtbot.mouseClick(again.runs.view.open_button, Qt.LeftButton)
        again.views.refresh(include_hidden=True)
        reopened = _views_state(again)
        for index, (before, after) in enumerate(zip(live, reopened)):
            if isinstance(before, np.ndarray):
                assert np.array_equal(before, after), index
            else:
                assert before == after, index
        assert f"showing run {run_id}" in again.statusBar().currentMessage()
        # Looking at another layer and back brings the stored rows back.
        stored_layer = again.views.attention_view.layer.value()
        again.views.attention_view.layer.setValue((stored_layer + 1) % 4)
        again.views.refresh(include_hidden=True)
        assert again.views.attention_view.image_values.size == 0  # that layer was not watched
        again.views.attention_view.layer.setValue(stored_layer)
        again.views.refresh(include_hidden=True)
        assert np.array_equal(again.views.attention_view.image_values, live[5])
    finally:
        again.close()
        again.plugins.unload()


def test_a_run_without_stored_views_says_so(qtbot, window):
    run_id = window.history.start("tiny-llama", "full", {}, "never finished")  # as a crash leaves it
    window.runs.reopen(run_id)
    assert window.error_banner.isVisible() and f"run {run_id} has no stored views" in window.error_text.text()


def test_an_eviction_burst_tells_its_count_on_hover(qtbot, window):
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("abcdefgh" * 10)
    window.form.chunk_size.setValue(16)
    window.form.max_new_tokens.setValue(2)
    run(qtbot, window, "window", budget=20)
    window.views.refresh(include_hidden=True)
    bursts = window.views.memory_view.bursts
    assert bursts.opts["hoverable"]
    point = bursts.points()[0]
    assert bursts.opts["tip"](x=point.pos().x(), y=point.pos().y(), data=point.data()) == \
        "step 1: 96 entries evicted"
