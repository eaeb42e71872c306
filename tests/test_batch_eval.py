"""`kvstudio eval --batch-size N`: the sweep's cells as batched rows, each cell's record the serial sweep's."""

from __future__ import annotations

import json

from .helpers import run_cli

NEEDLE = ("eval", "needle", "--model", "tiny-llama", "--policies", "full,h2o", "--budgets", "64",
          "--lengths", "400", "--depths", "0,1", "--chunk-size", "128", "--no-history")
VARYING = ("seconds", "run_id")  # a row's time is spent beside its neighbours


def cells(path) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in VARYING} for record in json.loads(path.read_text())]


def test_batched_cells_are_the_serial_cells_and_resume(capsys, tmp_path):
    code, out, err = run_cli(capsys, *NEEDLE, "--store", str(tmp_path / "serial.jsonl"), "--json",
                             str(tmp_path / "serial.json"), "--batch-size", "1")
    assert code == 0, err
    code, out, err = run_cli(capsys, *NEEDLE, "--store", str(tmp_path / "batch.jsonl"), "--json",
                             str(tmp_path / "batch.json"), "--batch-size", "3")
    assert code == 0, err
    serial, batched = cells(tmp_path / "serial.json"), cells(tmp_path / "batch.json")
    assert len(serial) == 4
    assert batched == serial
    assert len({record["output"] for record in serial}) > 1  # outputs differ by cell: a mix-up would show
    code, out, err = run_cli(capsys, *NEEDLE, "--store", str(tmp_path / "batch.jsonl"), "--batch-size", "3")
    assert code == 0 and "4 already stored" in err and "0 cells computed, 4 reused" in err


def test_a_batch_size_below_one_is_refused(capsys, tmp_path):
    code, out, err = run_cli(capsys, *NEEDLE, "--batch-size", "0")
    assert code == 2 and "--batch-size must be at least 1, got 0" in err


def test_without_a_batch_size_it_is_chosen_from_memory_and_said(capsys, tmp_path):
    code, out, err = run_cli(capsys, *NEEDLE, "--store", str(tmp_path / "auto.jsonl"), "--json",
                             str(tmp_path / "auto.json"))
    assert code == 0, err
    assert "[eval] batch size 4: chosen from memory: all 4 missing cells fit together (" in err, err
    assert "free may be used)" in err
    code, out, err = run_cli(capsys, *NEEDLE, "--store", str(tmp_path / "serial.jsonl"), "--json",
                             str(tmp_path / "serial.json"), "--batch-size", "1")
    assert code == 0 and "chosen from memory" not in err
    assert cells(tmp_path / "auto.json") == cells(tmp_path / "serial.json")


def test_the_choice_follows_the_memory_free_and_the_task(llama_engine, tmp_path):
    from kvstudio.core.evaluate.batched_sweep import AUTO_MAX_ROWS, choose_batch_size
    from kvstudio.core.evaluate.language import LanguageOptions
    from kvstudio.core.evaluate.sweep import Sweep, SweepSpec
    from kvstudio.core.evaluate.tasks import TaskOptions

    def sweep(task, **options):
        spec = SweepSpec(task=task, model="tiny-llama", policies=("full", "h2o"), budgets=(64,), chunk_size=128,
                         **options)
        return Sweep(llama_engine, spec, tmp_path / f"{task}.jsonl")

    needle = sweep("needle", task_options=TaskOptions(lengths=(400, 800), depths=(0.0, 0.5, 1.0)))  # 12 cells
    assert choose_batch_size(needle)[0] == AUTO_MAX_ROWS  # plenty free: the cap
    # 400-token needles under full hold ~0.4 MB of cache each (4 layers, 2 KV heads of 16, fp32): a
    # few megabytes free fit a few of them, a few kilobytes none.
    rows, why = choose_batch_size(needle, available_bytes=4_000_000)
    assert 1 < rows < AUTO_MAX_ROWS and f"{rows} of the 12 missing cells fit together" in why, why
    rows, why = choose_batch_size(needle, available_bytes=10_000)
    assert rows == 1 and "not even the largest cell" in why
    rows, why = choose_batch_size(sweep("perplexity", language_options=LanguageOptions(tokens=300, prefix_tokens=100)))
    assert rows == 1 and "perplexity scores one text step by step" in why
