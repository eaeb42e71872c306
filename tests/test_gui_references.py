"""The studio's part of reproducing references: ignore end of text, attention loss, and a row that
says how to run it again."""

from __future__ import annotations

import pytest

from kvstudio.gui.features.run_summary import describe_run

from .test_gui import load, run

pytest.importorskip("pytestqt")
pytestmark = pytest.mark.usefixtures("studio_folders")


def test_a_studio_run_measures_its_loss_and_records_a_command_that_reruns_it(qtbot, window):
    load(qtbot, window)
    window.prompt_area.prompt.setPlainText("the quick brown fox jumps " * 4)
    window.form.max_new_tokens.setValue(5)
    window.form.ignore_eos.setChecked(True)
    window.form.measure_loss.setChecked(True)
    outcome = run(qtbot, window, "window", budget=12)
    result = outcome.result
    assert len(result.token_ids) == 5 and result.attention_loss is not None and result.attention_loss > 0
    assert f"attention loss {result.attention_loss:.3f}" in describe_run("window", result)
    record = window.history.get(outcome.request.history_id)
    provenance = record.settings["provenance"]
    assert provenance["device"] == "cpu" and provenance["dtype"] == "float32"
    assert provenance["command"].startswith("kvstudio run --model tiny-llama --policy window --budget 12 ")
    assert "--ignore-eos --measure-loss --prompt 'the quick brown fox jumps" in provenance["command"]
    # The live curve: one point per step, the mean over layers of what the step measured.
    view = window.views.loss_view
    view.refresh()
    expected = [sum(s.attention_loss) / len(s.attention_loss) for s in result.steps]
    assert view.steps == [s.step for s in result.steps]
    assert view.means == [pytest.approx(m) for m in expected] and max(view.means) > 0
    assert view.latest == result.steps[-1].attention_loss
    # A stored run reopens with its curve: the steps' losses travel with its packed events.
    from kvstudio.core.recording.packing import unpack_events

    stored = unpack_events(window.history.events(outcome.request.history_id))
    window.views.show_stored_run(stored, stored.since("runs", 0)[0][-1])
    assert view.means == [pytest.approx(m) for m in expected]
