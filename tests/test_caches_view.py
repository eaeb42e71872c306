"""Saved caches in the studio: save after a run, the Caches view lists it, continuing from it gives
what one uninterrupted run gives, bad files are refused in the error banner, delete removes."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")


pytestmark = pytest.mark.studio_model("tiny-llama")


@pytest.fixture
def window(window):
    window.prompt_area.prompt.setPlainText("the quick brown fox jumps over the lazy dog " * 2)
    window.form.chunk_size.setValue(16)
    window.form.temperature.setValue(0.7)
    window.form.seed.setValue(5)
    return window


def _run(qtbot, win, new_tokens: int):
    win.form.max_new_tokens.setValue(new_tokens)
    win.form.policy.setCurrentText("h2o")
    win.form.policy_form.set_values({"budget": 24})
    win.run.request_run()
    qtbot.waitUntil(lambda: not win.state.busy, timeout=30_000)
    assert win.state.last_outcome.error is None, win.state.last_outcome.error
    return win.state.last_outcome.result


def test_save_list_continue_and_delete(qtbot, window):
    whole = _run(qtbot, window, 9)
    _run(qtbot, window, 4)
    view = window.caches.view
    path = view.folder / "first.kvcache"
    assert window.caches.save_last_run(str(path))
    qtbot.waitUntil(lambda: view.table.rowCount() == 1, timeout=10_000)
    assert view.table.item(0, 0).text() == "first.kvcache" and "h2o(budget=24, recent=12)" in view.table.item(0, 3).text()
    assert view.table.item(0, 4).text() == str(88 + 3)  # 88 byte tokens, and 3 of the 4 generated fed

    window.form.max_new_tokens.setValue(5)
    window.form.temperature.setValue(0.0)  # the cache's own sampling comes back with it
    view.table.selectRow(0)
    view.restore_button.click()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=30_000)
    outcome = window.state.last_outcome
    assert outcome.error is None, outcome.error
    assert window.form.temperature.value() == pytest.approx(0.7)
    assert outcome.result.token_ids == whole.token_ids[4:]
    assert [s.logprob for s in outcome.result.steps if s.token_id is not None] == \
        [s.logprob for s in whole.steps if s.token_id is not None][4:]
    assert "restored 91 tokens in" in view.status.text() and "their prefill took" in view.status.text()
    assert window.views.output_view.text.toPlainText() == outcome.result.text

    view.table.selectRow(0)
    view.delete_button.click()
    assert view.table.rowCount() == 0 and not path.exists()


@pytest.mark.parametrize("storage", [
    {"codec": "int4", "group_size": 8, "tier": "host", "recall": 1},
    {"merge": "minicache", "merge_from": 0, "merge_threshold": 2.0},  # the later layers link (storage/linked.py)
])
def test_a_stored_cache_continues_under_the_storage_it_was_saved_with(qtbot, window, storage):
    storage_form = window.form.storage_form
    storage_form.set_parameters(storage)
    whole = _run(qtbot, window, 7)
    _run(qtbot, window, 3)
    view = window.caches.view
    path = view.folder / "stored.kvcache"
    assert window.caches.save_last_run(str(path))
    qtbot.waitUntil(lambda: view.table.rowCount() == 1, timeout=10_000)
    storage_form.set_parameters({})  # back to fp: continuing sets the cache's storage again
    window.form.max_new_tokens.setValue(4)
    assert window.caches.continue_from(str(path)), window.error_text.text()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=30_000)
    outcome = window.state.last_outcome
    assert outcome.error is None, outcome.error
    assert storage_form.codec.currentText() == storage.get("codec", "fp")
    assert storage_form.tier.currentText() == storage.get("tier", "device")
    assert storage_form.merge.currentText() == storage.get("merge", "none")
    assert outcome.result.token_ids == whole.token_ids[3:]
    assert outcome.result.storage["recalled"] == whole.storage["recalled"]
    assert outcome.result.peak_cache_bytes == whole.peak_cache_bytes


def test_a_corrupt_cache_is_refused_and_the_studio_stays_usable(qtbot, window):
    _run(qtbot, window, 2)
    path = window.caches.view.folder / "bad.kvcache"
    window.caches.save_last_run(str(path))
    qtbot.waitUntil(lambda: path.exists(), timeout=10_000)
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))
    window.caches.continue_from(str(path))
    qtbot.waitUntil(lambda: not window.state.busy, timeout=30_000)
    assert "is corrupt: its checksum does not match" in window.error_text.text()
    assert window.error_banner.isVisible()
    # the studio computes nothing again: the banner says what the user can do here, the status what happened
    assert "computed again" not in window.error_text.text()
    assert "delete it (select it in the Caches view, then Delete) and save a run's cache again" in \
        window.error_text.text()
    assert window.caches.view.status.text().startswith("bad.kvcache was not restored: ")
    assert "is corrupt" in window.caches.view.status.text()
    assert _run(qtbot, window, 2).token_ids  # a plain run still works
    window.state.last_outcome = None
    assert not window.caches.save_last_run(str(path))
    assert "nothing to save yet" in window.error_text.text()


def test_a_bnb_runs_cache_says_why_it_cannot_be_saved():
    """bnb runs need CUDA, so the studio keeps no state for them; Save says why (checked without a GPU)."""
    from types import SimpleNamespace

    from kvstudio.gui.features.caches import _unsaveable

    assert "codec 'bnb-int8' are not saved" in _unsaveable(SimpleNamespace(policy="h2o-bnb-int8", parameters={}))
    assert "codec 'bnb-int4'" in _unsaveable(SimpleNamespace(policy="h2o", parameters={"storage": {"codec": "bnb-int4"}}))
    assert _unsaveable(SimpleNamespace(policy="h2o-int4", parameters={"budget": 8})) is None


def test_a_continued_run_says_its_prefill_was_restored_not_a_rate(qtbot, window):
    _run(qtbot, window, 2)
    path = window.caches.view.folder / "one.kvcache"
    window.caches.save_last_run(str(path))
    qtbot.waitUntil(lambda: path.exists(), timeout=10_000)
    window.form.max_new_tokens.setValue(1)  # one token: no decode speed, so the prefill's would be shown
    assert window.caches.continue_from(str(path))
    qtbot.waitUntil(lambda: not window.state.busy, timeout=30_000)
    assert window.state.last_outcome.error is None, window.state.last_outcome.error
    message = window.statusBar().currentMessage()
    assert "prefill restored from the cache in" in message and "tokens/s" not in message


def test_follow_up_questions_restore_one_saved_context_each(qtbot, window):
    from kvstudio.core.persist.saved_cache import load_saved_cache, policy_from_header
    from kvstudio.core.runtime.engine import GenerationSettings
    from kvstudio.core.runtime.run_state import follow_up_ids

    from .conftest import engine_for

    window.form.temperature.setValue(0.0)
    _run(qtbot, window, 1)
    view = window.caches.view
    path = view.folder / "context.kvcache"
    assert window.caches.save_last_run(str(path))
    qtbot.waitUntil(lambda: view.table.rowCount() == 1, timeout=10_000)
    window.form.max_new_tokens.setValue(4)
    answers = []
    for question in (" Who jumps?", " Over what?"):
        view.table.selectRow(0)
        view.question.setText(question)
        view.ask_button.click()
        qtbot.waitUntil(lambda: not window.state.busy, timeout=30_000)
        outcome = window.state.last_outcome
        assert outcome.error is None, outcome.error
        result = outcome.result
        assert result.restored_tokens == 88  # the context was restored, not prefilled again
        assert "answered the question in 4 tokens" in view.status.text()
        engine = engine_for("tiny-llama")  # the same tiny model, outside the studio's thread
        header, state, _ = load_saved_cache(str(path), engine.loaded, None)
        policy = policy_from_header(header)
        ids = follow_up_ids(state, engine.tokenizer, question)
        # Only the question (and the token sampled before the save) was prefilled.
        assert [s.input_tokens for s in result.steps if s.phase == "prefill"] == [len(ids) - 88]
        assert ids[-len(question):] == list(engine.tokenizer(question, add_special_tokens=False)["input_ids"])
        direct = engine.generate(ids, policy,
                                 GenerationSettings(max_new_tokens=4, chunk_size=16, memory_sample_hz=0), start=state)
        assert result.token_ids == direct.token_ids
        answers.append(result.token_ids)
    assert len(answers) == 2
    view.question.setText("")
    view.ask_button.click()
    assert "type a question" in view.status.text()
