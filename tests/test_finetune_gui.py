"""The studio's fine-tuning, driven as a user drives it (pytest-qt, offscreen, tiny-llama): a
session from the Fine-tune panel reaches its curves and the run history, Stop ends it within a
step keeping the last adapter, a stored session reopens from the Runs view, and the model panel
applies an adapter to generation runs."""

from __future__ import annotations

import threading

import pytest

from kvstudio.core.train import lora

pytest.importorskip("pytestqt")


pytestmark = pytest.mark.studio_model("tiny-llama")


def set_up(window, tmp_path, steps: int, save_every: int = 1, eval_every: int = 0):
    window.form.policy.setCurrentText("window")
    window.form.policy_form.set_values({"budget": 16})
    panel = window.finetune.panel
    panel.seq_len.setValue(128)
    panel.examples.setValue(4)
    panel.chunk_size.setValue(32)
    panel.steps.setValue(steps)
    panel.eval_every.setValue(eval_every)
    panel.save_every.setValue(save_every)
    panel.lr.setValue(0.01)
    panel.out_dir.setText(str(tmp_path / "adapter"))
    return panel


def test_a_session_from_the_panel_reaches_the_curves_and_the_history(qtbot, window, tmp_path):
    panel = set_up(window, tmp_path, steps=2)
    threads = set()
    handle = window.worker.engine.model.register_forward_pre_hook(lambda *_: threads.add(threading.get_ident()))
    try:
        assert window.finetune.start(), window.error_text.text()
        assert window.state.busy and not window.form.run_button.isEnabled() and panel.stop.isEnabled()
        qtbot.waitUntil(lambda: not window.finetune.running, timeout=300_000)
    finally:
        handle.remove()
    outcome = window.finetune.last_outcome
    assert outcome.error is None and outcome.result.status == "finished"
    assert threading.main_thread().ident not in threads  # training ran on the model's thread
    curves = window.finetune.curves
    curves.refresh()
    assert [s.step for s in curves.steps] == [1, 2]
    assert [v.step for v in curves.val] == [0, 2]
    assert curves.train_curve.getData()[1].tolist() == [s.loss for s in outcome.result.steps]
    assert curves.steps[0].evictions > 0  # the window policy evicted during training
    assert {p.phase for p in curves.phases} >= {"forward", "backward", "optimizer", "validation"}
    record = window.history.list(limit=1)[0]
    assert record.kind == "finetune" and record.status == "finished" and record.output == outcome.result.adapter
    # Reopened from the Runs view, the stored session draws the same curves.
    curves.clear()
    window.runs.view.open_requested.emit(record.id)
    assert curves.train_curve.getData()[1].tolist() == [s.loss for s in outcome.result.steps]
    assert "stored session" in curves.summary.text()
    # The adapter row applies the adapter to generation, and Remove goes back to the base model.
    window.finetune.request_adapter(str(tmp_path / "adapter"))
    qtbot.waitUntil(lambda: window.finetune.adapter_row.remove.isEnabled(), timeout=20_000)
    assert window.finetune.adapter_row.label.text().endswith("step-000002")
    assert lora.attached(window.worker.engine.loaded) is not None
    # A run now reruns with it: the history's command applies the checkpoint applied here.
    assert window.state.model_info.adapter_folder == str(tmp_path / "adapter" / "step-000002")
    window.prompt_area.prompt.setPlainText("the quick brown fox")
    window.form.max_new_tokens.setValue(2)
    window.run.request_run()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=30_000)
    ran = window.history.list(limit=1)[0]
    assert ran.kind == "generate" and ran.model.endswith("+lora:adapter/step-000002")
    command = ran.settings["provenance"]["command"]
    assert f"--adapter {tmp_path / 'adapter' / 'step-000002'}" in command, command
    window.finetune.request_base_model()
    qtbot.waitUntil(lambda: not window.finetune.adapter_row.remove.isEnabled(), timeout=20_000)
    assert lora.attached(window.worker.engine.loaded) is None
    assert window.state.model_info.adapter_folder == ""


def test_stop_ends_the_session_within_a_step_and_keeps_the_last_adapter(qtbot, window, tmp_path):
    set_up(window, tmp_path, steps=50)
    assert window.finetune.start()
    qtbot.waitUntil(lambda: len(window.finetune.curves.steps) >= 1, timeout=300_000)
    window.finetune.panel.stop.click()
    qtbot.waitUntil(lambda: not window.finetune.running, timeout=60_000)
    result = window.finetune.last_outcome.result
    assert result.status == "cancelled" and len(result.steps) < 50
    assert lora.resolve(tmp_path / "adapter").name == f"step-{len(result.steps):06d}"
    assert window.history.list(limit=1)[0].status == "cancelled"
    assert window.form.run_button.isEnabled()  # the studio is ready for the next run


def test_bad_input_in_the_panel_is_reported_and_nothing_starts(qtbot, window, tmp_path):
    panel = set_up(window, tmp_path, steps=1)
    panel.out_dir.setText("")
    assert not window.finetune.start()
    assert "output folder" in window.error_text.text() and not window.state.busy
    panel.out_dir.setText(str(tmp_path / "adapter"))
    panel.source.setCurrentText("a file…")
    panel.file.setText(str(tmp_path / "missing.jsonl"))
    assert window.finetune.start()
    qtbot.waitUntil(lambda: not window.finetune.running, timeout=30_000)
    assert "data file not found" in window.error_text.text()
    assert window.history.list(limit=1)[0].status == "failed"


def test_the_panels_micro_batch_trains_as_one_example_at_a_time(qtbot, window, tmp_path):
    """The micro-batch field feeds a step's examples together (core/train/micro_batch.py): the same
    losses as one at a time; it never offers more examples than a step has."""
    panel = set_up(window, tmp_path, steps=2, save_every=0)
    panel.accumulation.setValue(4)
    assert panel.micro_batch.maximum() == 4
    losses = {}
    for micro_batch in (1, 4):
        panel.micro_batch.setValue(micro_batch)
        assert panel.settings().micro_batch == micro_batch
        assert window.finetune.start(), window.error_text.text()
        qtbot.waitUntil(lambda: not window.finetune.running, timeout=300_000)
        outcome = window.finetune.last_outcome
        assert outcome.error is None and outcome.result.status == "finished"
        losses[micro_batch] = [step.loss for step in outcome.result.steps]
    assert len(losses[4]) == 2
    assert max(abs(a - b) for a, b in zip(losses[1], losses[4])) <= 1e-5, losses
    panel.accumulation.setValue(2)  # fewer examples a step: the micro-batch follows
    assert panel.micro_batch.value() == 2 and panel.micro_batch.maximum() == 2
