"""Run history (SQLite, migrations, corruption, locks, crashes) and exports (atomic JSON/CSV/npy)."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from kvstudio.cli.dispatch import main
from kvstudio.core.io.atomic import atomic_write
from kvstudio.core.errors import KVStudioError
from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.persist.exports import export_array, export_run
from kvstudio.core.persist.history import MIGRATIONS, SCHEMA_VERSION, HistoryError, RunHistory
from kvstudio.core.spec import create_policy

from .helpers import random_ids


@pytest.fixture
def history(tmp_path):
    store = RunHistory(tmp_path / "history.sqlite3")
    yield store
    store.close()


def stored_run(history, engine, policy="window", prompt="the prompt text", **params):
    params = params or {"budget": 8}
    run_id = history.start(engine.loaded.name, policy, params, prompt, {"max_new_tokens": 6})
    result = engine.generate(prompt, create_policy(policy, **params), GenerationSettings(max_new_tokens=6))
    history.finish(run_id, result)
    return run_id, result


def test_a_run_round_trips_with_its_steps(history, llama_engine):
    run_id, result = stored_run(history, llama_engine)
    record = history.get(run_id)
    assert (record.model, record.policy, record.parameters, record.status) == ("tiny-llama", "window",
                                                                               {"budget": 8}, "finished")
    assert record.output == result.text and record.prompt_preview == "the prompt text"
    assert record.figures["evictions"] == result.evictions and record.figures["generated_tokens"] == 6
    assert [s["step"] for s in record.steps] == [s.step for s in result.steps]
    assert record.steps[-1]["kept_per_layer"] == result.kept_per_layer
    assert history.connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_list_filters_and_delete(history, llama_engine):
    first, _ = stored_run(history, llama_engine, "window", "alpha prompt", budget=8)
    second, _ = stored_run(history, llama_engine, "h2o", "beta prompt", budget=8)
    assert [r.id for r in history.list()] == [second, first]
    assert [r.id for r in history.list(policy="h2o")] == [second]
    assert [r.id for r in history.list(text="alpha")] == [first]
    assert history.list()[0].steps == []  # listing stays light
    assert history.delete(first) and not history.delete(first)
    with pytest.raises(HistoryError, match=f"no run {first}"):
        history.get(first)


def old_database(path, version: int, insert: str):
    """A database as an older KV Studio left it: its schema up to `version`, one row inserted."""
    old = sqlite3.connect(path)
    for each in range(1, version + 1):
        for statement in MIGRATIONS[each]:
            old.execute(statement)
    old.execute(insert)
    old.execute(f"PRAGMA user_version = {version}")
    old.commit()
    old.close()
    return path


def test_a_database_from_an_older_schema_is_migrated(tmp_path):
    path = old_database(
        tmp_path / "old.sqlite3", 1,
        "INSERT INTO runs (created, model, policy, parameters, prompt_sha256, prompt_preview, output, status, "
        "figures) VALUES ('2026-01-01T00:00:00+00:00', 'default', 'h2o', '{\"budget\": 64}', 'abc', "
        "'an old prompt', 'an old answer', 'finished', '{\"evictions\": 5}')")
    history = RunHistory(path)
    try:
        assert history.connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        record = history.list()[0]
        assert (record.output, record.figures, record.parameters) == ("an old answer", {"evictions": 5},
                                                                      {"budget": 64})
        assert history.get(record.id).steps == [] and record.error is None
        assert history.get(record.id).memory == [] and history.events(record.id) is None
    finally:
        history.close()


def test_a_version_2_database_gains_memory_and_events(tmp_path, llama_engine):
    path = old_database(
        tmp_path / "v2.sqlite3", 2,
        "INSERT INTO runs (created, model, policy, parameters, prompt_sha256, prompt_preview, status, steps) "
        "VALUES ('2026-05-01T00:00:00+00:00', 'tiny-llama', 'window', '{}', 'x', 'p', 'finished', "
        "'[{\"step\": 0}]')")
    history = RunHistory(path)
    try:
        [kept] = history.list()
        assert history.get(kept.id).steps == [{"step": 0}]  # nothing stored before is lost
        run_id, result = stored_run(history, llama_engine)  # and the new columns work
        assert history.get(run_id).memory == json.loads(json.dumps(result.memory))
    finally:
        history.close()


def test_a_runs_events_are_stored_and_reopen_into_a_recorder(history, llama_engine):
    from kvstudio.core.recording.events import Recorder
    from kvstudio.core.recording.packing import pack_events, unpack_events

    recorder = Recorder(watch_layers={1})
    prompt = "reopen me " * 8
    run_id = history.start("tiny-llama", "h2o", {"budget": 16}, prompt)
    result = llama_engine.generate(prompt, create_policy("h2o", budget=16), GenerationSettings(max_new_tokens=5),
                                   recorder=recorder)
    history.finish(run_id, result, events=pack_events(recorder))
    reopened = unpack_events(history.events(run_id))
    for kind in ("runs", "tokens", "steps", "memory"):
        assert reopened.all(kind) == recorder.all(kind), kind
    for before, after in zip(recorder.all("evictions"), reopened.all("evictions"), strict=True):
        assert (before.step, before.layer, before.kv_head) == (after.step, after.layer, after.kv_head)
        assert np.array_equal(before.positions, after.positions)
    for before, after in zip(recorder.all("attention"), reopened.all("attention"), strict=True):
        assert before.layer == after.layer == 1
        assert np.array_equal(before.weights, after.weights) and np.array_equal(before.positions, after.positions)
    assert reopened.watch_layers == {1} and reopened.peak_cache_bytes == result.peak_cache_bytes
    assert reopened.evicted_total == result.evictions
    history.delete(run_id)
    assert history.events(run_id) is None


def test_unreadable_stored_events_say_so():
    from kvstudio.core.recording.packing import unpack_events

    with pytest.raises(KVStudioError, match="stored views of this run are unreadable"):
        unpack_events(b"not an npz")


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.sqlite3"
    newer = sqlite3.connect(path)
    newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer.close()
    with pytest.raises(HistoryError, match="written by a newer KV Studio"):
        RunHistory(path)


def test_a_corrupt_database_gives_a_clear_message_and_runs_still_work(capsys):
    from kvstudio.core.persist.history import default_path

    path = default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = path.read_bytes() if path.exists() else None
    path.write_bytes(b"this is not a database" * 100)
    try:
        with pytest.raises(HistoryError, match="unreadable.*Move the file away"):
            RunHistory(path)
        assert main(["run", "--model", "tiny-llama", "--prompt", "still works", "--max-new-tokens", "3"]) == 0
        out, err = capsys.readouterr()
        assert "warning: the run history" in err and "--- summary" in out
        assert main(["runs", "list"]) == 2
        assert "unreadable" in capsys.readouterr().err
    finally:
        path.unlink()
        for suffix in ("-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        if saved is not None:
            path.write_bytes(saved)


def test_a_locked_database_gives_a_clear_message(history):
    blocker = sqlite3.connect(history.path, timeout=0.1)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(HistoryError, match="locked"):
            history.start("m", "p", {}, "prompt")
    finally:
        blocker.rollback()
        blocker.close()
    assert history.start("m", "p", {}, "prompt")  # usable again once free


def test_a_crash_mid_run_loses_nothing_stored(tmp_path):
    """A real process, killed with SIGKILL while generating: earlier runs stay, the killed one shows."""
    env = {**os.environ, "KVSTUDIO_DATA_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "kvstudio", "run", "--model", "tiny-llama", "--prompt", "crash test"]
    subprocess.run(command + ["--max-new-tokens", "3"], env=env, check=True, capture_output=True)
    process = subprocess.Popen(command + ["--max-new-tokens", "1000000"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        process.stdout.read(20)  # it is generating
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    history = RunHistory(tmp_path / "history.sqlite3")
    try:
        records = history.list()
        assert [r.shown_status for r in records] == ["interrupted", "finished"]
        assert records[1].figures["generated_tokens"] == 3
    finally:
        history.close()


# --- exports ---------------------------------------------------------------------------------------

def test_exports_as_json_and_csv(history, llama_engine, tmp_path):
    run_id, result = stored_run(history, llama_engine)
    record = history.get(run_id)
    data = json.loads(export_run(record, tmp_path / "run.json").read_text())
    assert data["output"] == result.text and len(data["steps"]) == len(result.steps)
    with export_run(record, tmp_path / "run.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(r["step"]) for r in rows] == [s.step for s in result.steps]
    assert [int(r["evicted"]) for r in rows] == [s.evicted for s in result.steps]
    assert rows[-1]["kept_per_layer"] == ";".join(map(str, result.kept_per_layer))
    assert int(rows[-1]["kept_total"]) == sum(result.kept_per_layer)
    assert int(rows[0]["process_bytes"]) > 0
    assert rows[0]["phase"] == "prefill" and rows[-1]["phase"] == "decode"
    # Memory: per-layer cache bytes in each row; every reading (timer ones too) in the JSON.
    assert [r["cache_bytes_per_layer"] for r in rows] == [";".join(map(str, s.cache_bytes_per_layer))
                                                         for s in result.steps]
    assert sum(int(b) for b in rows[-1]["cache_bytes_per_layer"].split(";")) == int(rows[-1]["cache_bytes"])
    assert len(data["memory"]) == len(result.memory) >= len(result.steps)
    assert {"cache_bytes", "cache_bytes_per_layer", "process_bytes", "cuda_peak", "device_used", "phase",
            "source"} <= data["memory"][0].keys()


def test_an_interrupted_export_leaves_the_previous_file_intact(history, llama_engine, tmp_path):
    run_id, _ = stored_run(history, llama_engine)
    target = tmp_path / "run.json"
    export_run(history.get(run_id), target)
    before = target.read_bytes()

    def half_then_fail(stream):
        stream.write('{"half": ')
        raise OSError("disk full")

    with pytest.raises(KVStudioError, match="could not write .*run.json: disk full; the file there is unchanged"):
        atomic_write(target, half_then_fail)
    broken = history.get(run_id)
    broken.figures["unserialisable"] = object()  # json.dump fails midway through the export
    with pytest.raises(TypeError):
        export_run(broken, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_arrays_export_as_npy(tmp_path):
    attention = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    assert np.array_equal(np.load(export_array(attention, tmp_path / "attention.npy")), attention)

    with pytest.raises(KVStudioError, match=r"\.npy"):
        export_array(attention, tmp_path / "attention.txt")
    with pytest.raises(KVStudioError, match="does not exist"):
        export_array(attention, tmp_path / "missing" / "a.npy")


def test_cli_runs_list_show_export(capsys, tmp_path):
    assert main(["run", "--model", "tiny-llama", "--policy", "window", "--budget", "4", "--prompt",
                 "listed prompt", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    run_id = int(err.split("stored as run ")[1].split()[0])
    assert main(["runs", "list", "--policy", "window"]) == 0
    assert f"{run_id:>5}" in capsys.readouterr().out
    assert main(["runs", "show", str(run_id)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["policy"] == "window" and shown["parameters"]["budget"] == 4
    assert main(["runs", "export", str(run_id), str(tmp_path / "r.csv")]) == 0
    assert (tmp_path / "r.csv").read_text().startswith("step,phase")
    assert main(["runs", "export", str(run_id), str(tmp_path / "r.xlsx")]) == 2
    assert "use a .json or .csv" in capsys.readouterr().err
    assert main(["run", "--model", "tiny-llama", "--prompt", "unrecorded", "--max-new-tokens", "2",
                 "--no-history"]) == 0
    assert "stored as run" not in capsys.readouterr().err


def stored_id(capsys) -> int:
    return int(capsys.readouterr().err.split("stored as run ")[1].split()[0])


def test_a_runs_storage_is_stored_listed_and_shown(capsys):
    """A merged or quantized run is not listed as its plain policy: its storage is kept and named."""
    prompt = ["--model", "tiny-llama", "--prompt", "stored storage", "--max-new-tokens", "3"]
    assert main(["run", *prompt, "--policy", "full", "--merge", "minicache", "--merge-from", "2",
                 "--merge-threshold", "0.5"]) == 0
    merged = stored_id(capsys)
    assert main(["run", *prompt, "--policy", "h2o", "--budget", "8", "--codec", "int8"]) == 0
    quantized = stored_id(capsys)
    assert main(["run", *prompt, "--policy", "h2o", "--budget", "8"]) == 0
    plain = stored_id(capsys)
    assert main(["runs", "list"]) == 0
    rows = {int(line.split()[0]): line.split()[4] for line in capsys.readouterr().out.splitlines()}
    assert {i: rows[i] for i in (merged, quantized, plain)} == {merged: "full+minicache", quantized: "h2o-int8",
                                                                plain: "h2o"}
    assert main(["runs", "show", str(merged)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["policy"] == "full" and shown["cache"] == "full+minicache"
    assert shown["parameters"]["storage"] == {"merge": "minicache", "merge_from": 2, "merge_threshold": 0.5}
    assert shown["storage"] == "fp, minicache from layer 2 (threshold 0.5, t 0.6)"
    assert shown["figures"]["storage"]["merging"]["pairs"] == [[2, 3]]  # what the run reported, kept too
    assert main(["runs", "show", str(quantized)]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"]["storage"] == {"codec": "int8"}
    assert main(["runs", "show", str(plain)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert "storage" not in shown["parameters"] and "storage" not in shown and shown["cache"] == "h2o"
    # --policy finds a policy's runs whatever their storage, or one cache's by its listed name.
    for name, expected in (("h2o", {quantized, plain}), ("h2o-int8", {quantized}), ("full+minicache", {merged}),
                           ("full", {merged})):
        assert main(["runs", "list", "--policy", name]) == 0
        listed = {int(line.split()[0]) for line in capsys.readouterr().out.splitlines()}
        assert listed & {merged, quantized, plain} == expected, name


def test_a_cache_name_is_stored_as_its_policy_and_storage(history, llama_engine):
    """The studio's Compare runs 'h2o-int4' with the form's storage fields: the row keeps 'h2o' and the codec."""
    form = {"codec": "fp", "group_size": 32, "residual": 0, "tier": "device", "recall": 0, "merge": "none",
            "merge_from": None, "merge_threshold": 0.05, "merge_t": 0.6}
    run_id = history.start("tiny-llama", "h2o-int4", {"budget": 8, "storage": form}, "p")
    record = history.get(run_id)
    assert (record.policy, record.cache) == ("h2o", "h2o-int4")
    assert record.parameters == {"budget": 8, "storage": {"codec": "int4", "group_size": 32}}
    assert [r.id for r in history.list(policy="h2o-int4")] == [run_id] and history.list(policy="h2o-int8") == []


def test_rows_stored_before_the_storage_was_kept_still_list(tmp_path):
    """Version 4 rows: a CLI run without storage, a Compare row named 'h2o-int4', a studio row with every
    storage field of the form."""
    form = ('{"storage": {"codec": "fp", "group_size": 64, "residual": 0, "tier": "device", "recall": 0, '
            '"merge": "minicache", "merge_from": 2, "merge_threshold": 0.5, "merge_t": 0.6}}')
    path = old_database(
        tmp_path / "v4.sqlite3", 4,
        "INSERT INTO runs (created, model, policy, parameters, prompt_sha256, prompt_preview, status) VALUES "
        "('2026-05-01T00:00:00+00:00', 'tiny-llama', 'full', '{}', 'x', 'p', 'finished'), "
        "('2026-05-01T00:00:01+00:00', 'tiny-llama', 'h2o-int4', '{\"budget\": 8}', 'x', 'p', 'finished'), "
        f"('2026-05-01T00:00:02+00:00', 'tiny-llama', 'full', '{form}', 'x', 'p', 'finished')")
    history = RunHistory(path)
    try:
        assert [r.cache for r in history.list()] == ["full+minicache", "h2o-int4", "full"]
        assert [r.id for r in history.list(policy="h2o-int4")] == [2]
        assert "storage" not in history.get(1).to_dict() and history.get(3).to_dict()["storage"].startswith("fp, mini")
    finally:
        history.close()


def test_recall_events_round_trip_and_older_recordings_still_open():
    import io

    from kvstudio.core.recording.events import Recorder, RecallEvent, RunStartedEvent
    from kvstudio.core.recording.packing import pack_events, unpack_events

    recorder = Recorder()
    recorder.record(RunStartedEvent("tiny-llama", "h2o", 4, 2, (8,) * 4, ("a", "b"), 4, "host"))
    recorder.record(RecallEvent(3, 1, np.array([[2, 3, 4], [5, 6, 7]])))
    recorder.record(RecallEvent(4, 0, np.array([[9], [1]])))
    blob = pack_events(recorder)
    reopened = unpack_events(blob)
    assert [(r.step, r.layer, r.positions.tolist()) for r in reopened.all("recalls")] == \
        [(3, 1, [[2, 3, 4], [5, 6, 7]]), (4, 0, [[9], [1]])]
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:  # as written before recalls were stored
        older = {name: data[name] for name in data.files if not name.startswith("recall_")}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **older)
    assert unpack_events(buffer.getvalue()).all("recalls") == [] and unpack_events(buffer.getvalue()).all("runs")
