"""Saved caches in the studio: save after a run, the Caches view lists it, continuing from it gives
what one uninterrupted run gives, bad files are refused in the error banner, delete removes."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QSettings

from kvstudio.gui.main_window import MainWindow

pytest.importorskip("pytestqt")


@pytest.fixture
def window(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path / "user_data"))
    monkeypatch.delenv("KVSTUDIO_PLUGIN_PATH", raising=False)
    win = MainWindow(QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat))
    qtbot.addWidget(win)
    win.show()
    win.request_load("tiny-llama", "cpu", "auto")
    qtbot.waitUntil(lambda: win.model_info is not None, timeout=20_000)
    win.prompt.setPlainText("the quick brown fox jumps over the lazy dog " * 2)
    win.chunk_size.setValue(16)
    win.temperature.setValue(0.7)
    win.seed.setValue(5)
    yield win
    win.close()
    win.plugins.unload()


def _run(qtbot, win, new_tokens: int):
    win.max_new_tokens.setValue(new_tokens)
    win.policy.setCurrentText("h2o")
    win.policy_form.set_values({"budget": 24})
    win.request_run()
    qtbot.waitUntil(lambda: not win.running, timeout=30_000)
    assert win.last_outcome.error is None, win.last_outcome.error
    return win.last_outcome.result


def test_save_list_continue_and_delete(qtbot, window):
    whole = _run(qtbot, window, 9)
    _run(qtbot, window, 4)
    view = window.caches_view
    path = view.folder / "first.kvcache"
    assert window.caches.save_last_run(str(path))
    qtbot.waitUntil(lambda: view.table.rowCount() == 1, timeout=10_000)
    assert view.table.item(0, 0).text() == "first.kvcache" and "h2o(budget=24, recent=12)" in view.table.item(0, 3).text()
    assert view.table.item(0, 4).text() == str(88 + 3)  # 88 byte tokens, and 3 of the 4 generated fed

    window.max_new_tokens.setValue(5)
    window.temperature.setValue(0.0)  # the cache's own sampling comes back with it
    view.table.selectRow(0)
    view.restore_button.click()
    qtbot.waitUntil(lambda: not window.running, timeout=30_000)
    outcome = window.last_outcome
    assert outcome.error is None, outcome.error
    assert window.temperature.value() == pytest.approx(0.7)
    assert outcome.result.token_ids == whole.token_ids[4:]
    assert [s.logprob for s in outcome.result.steps if s.token_id is not None] == \
        [s.logprob for s in whole.steps if s.token_id is not None][4:]
    assert "restored 91 tokens in" in view.status.text() and "their prefill took" in view.status.text()
    assert window.output_view.text.toPlainText() == outcome.result.text

    view.table.selectRow(0)
    view.delete_button.click()
    assert view.table.rowCount() == 0 and not path.exists()


def test_a_quantized_cache_continues_under_the_storage_it_was_saved_with(qtbot, window):
    window.storage_form.set_parameters({"codec": "int4", "group_size": 8, "tier": "host", "recall": 1})
    whole = _run(qtbot, window, 7)
    _run(qtbot, window, 3)
    path = window.caches_view.folder / "int4.kvcache"
    assert window.caches.save_last_run(str(path))
    qtbot.waitUntil(lambda: window.caches_view.table.rowCount() == 1, timeout=10_000)
    window.storage_form.set_parameters({})  # back to fp: continuing sets the cache's storage again
    window.max_new_tokens.setValue(4)
    assert window.caches.continue_from(str(path)), window.error_text.text()
    qtbot.waitUntil(lambda: not window.running, timeout=30_000)
    outcome = window.last_outcome
    assert outcome.error is None, outcome.error
    assert window.storage_form.codec.currentText() == "int4" and window.storage_form.tier.currentText() == "host"
    assert outcome.result.token_ids == whole.token_ids[3:]
    assert outcome.result.storage["recalled"] == whole.storage["recalled"]


def test_a_corrupt_cache_is_refused_and_the_studio_stays_usable(qtbot, window):
    _run(qtbot, window, 2)
    path = window.caches_view.folder / "bad.kvcache"
    window.caches.save_last_run(str(path))
    qtbot.waitUntil(lambda: path.exists(), timeout=10_000)
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))
    window.caches.continue_from(str(path))
    qtbot.waitUntil(lambda: not window.running, timeout=30_000)
    assert "is corrupt: its checksum does not match" in window.error_text.text()
    assert window.error_banner.isVisible()
    assert _run(qtbot, window, 2).token_ids  # a plain run still works
    window.last_outcome = None
    assert not window.caches.save_last_run(str(path))
    assert "nothing to save yet" in window.error_text.text()
