"""The studio a researcher can trust (issue 26): no hidden values, views that say what they show.

Each test drives the real window (pytest-qt, offscreen, tiny-llama) as a user would and checks
what the run, the form or the view then says."""

from __future__ import annotations

import pytest

from kvstudio.core.storage import StorageConfig

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
