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
                             str(tmp_path / "serial.json"))
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
