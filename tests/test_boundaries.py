"""Nothing escapes, wherever it comes from: each kind of bad input is refused where it is read, in one
line and exit status 2, with its own message (never the last net's "internal error"), and nothing
stored is lost. The last net itself: an unexpected exception is one line and a report file.

Damaged model folders, a damaged run history, destinations that are folders or fail midway, numbers
at their edges, arguments that are not UTF-8, memory snapshots with missing or mistyped fields."""

from __future__ import annotations

import json
import pickle
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvstudio.cli import dispatch
from kvstudio.core.errors import ModelLoadError
from kvstudio.core.models.loading import load_model
from kvstudio.core.models.tiny import build_tiny_model
from kvstudio.core.persist.history import HistoryError, RunHistory
from kvstudio.core.recording.snapshots import SnapshotError, load_snapshot
from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.spec import create_policy

from .conftest import engine_for
from .helpers import run_cli


def _one_clean_line(code: int, err: str, *words: str) -> str:
    """Exit status 2, one line on stderr after the progress notes, naming what it must, not the net's."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[kvstudio]")
             and "%|" not in line]  # transformers' progress bars (loading, saving) are not messages
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("kvstudio: error: "), err
    assert "internal error" not in err and "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# -- damaged model folders ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "good"
    model, tokenizer = build_tiny_model("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _damaged(source: Path, target: Path, damage: str) -> Path:
    import shutil

    shutil.copytree(source, target)
    config = target / "config.json"
    weights = target / "model.safetensors"
    if damage == "config not an object":
        config.write_text("[1, 2, 3]")
    elif damage == "config not JSON":
        config.write_text('{"model_type": "llama",')
    elif damage == "unknown model_type":
        config.write_text(json.dumps(json.loads(config.read_text()) | {"model_type": "nosuchmodel"}))
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage weights":
        weights.write_bytes(b"\x01garbage" * 100)
    elif damage == "no tokenizer":
        for path in target.glob("tokenizer*"):
            path.unlink()
    elif damage == "tokenizer larger than the vocabulary":
        from transformers import LlamaConfig, LlamaForCausalLM

        for path in (config, weights):
            path.unlink()
        small = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=None)
        LlamaForCausalLM(small).save_pretrained(target)
    return target


DAMAGES = {  # the damage -> words its message must hold
    "config not an object": ("config.json holds a JSON list",),
    "config not JSON": ("config.json is not valid JSON",),
    "unknown model_type": ("model_type 'nosuchmodel'",),
    "truncated weights": ("weights in", "are damaged"),
    "garbage weights": ("weights in", "are damaged"),
    "no tokenizer": ("holds no tokenizer",),
    "tokenizer larger than the vocabulary": ("tokenizer has 258 tokens", "embedding only 100 rows"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_model_folder_is_one_line(capsys, tmp_path, model_folder, damage):
    folder = _damaged(model_folder, tmp_path / "model", damage)
    code, _, err = run_cli(capsys, "run", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "1",
                           "--no-history")
    _one_clean_line(code, err, str(folder), *DAMAGES[damage])


def test_the_intact_folder_loads_and_runs(capsys, model_folder):
    code, out, err = run_cli(capsys, "run", "--model", str(model_folder), "--prompt", "hi", "--max-new-tokens", "2",
                             "--no-history")
    assert code == 0, err


@pytest.mark.slow
def test_a_damaged_converted_default_model_is_converted_again(tmp_path, monkeypatch):
    import shutil

    from kvstudio.core.models.default_model import default_model_folder

    original = default_model_folder()
    monkeypatch.setenv("KVSTUDIO_CACHE_DIR", str(tmp_path))
    copy = default_model_folder.__globals__["models_cache_dir"]() / original.name
    shutil.copytree(original, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: what a full disk leaves
    notes = []
    loaded = load_model("default", device="cpu", progress=lambda message, _: notes.append(message))
    assert any("damaged" in note and "converting it again" in note for note in notes), notes
    assert weights.stat().st_size > 10**8 and loaded.n_layers == 30


# -- a damaged run history ------------------------------------------------------------------------------


def test_a_data_folder_that_is_a_file_turns_history_off_with_one_line(capsys, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.write_text("not a folder")
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(data))
    code, _, err = run_cli(capsys, "run", "--model", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "1")
    assert code == 0 and "warning: the run history cannot be kept in" in err and "it is a file" in err
    code, _, err = run_cli(capsys, "runs", "list")
    _one_clean_line(code, err, str(data), "it is a file, not a folder")
    assert data.read_text() == "not a folder"  # nothing of the user's was touched


def test_malformed_json_in_a_row_is_shown_not_fatal(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path))
    for prompt in ("first prompt", "second prompt"):
        assert run_cli(capsys, "run", "--model", "tiny-llama", "--prompt", prompt, "--max-new-tokens", "1")[0] == 0
    with sqlite3.connect(tmp_path / "history.sqlite3") as connection:
        connection.execute("UPDATE runs SET parameters = '{bad', figures = '[1, 2]', steps = 'null' WHERE id = 1")
    code, out, err = run_cli(capsys, "runs", "list")
    assert code == 0 and "second prompt" in out and "'[damaged: parameters, figures] first prompt'" in out, out + err
    code, out, err = run_cli(capsys, "runs", "show", "1")
    shown = json.loads(out)
    assert code == 0 and shown["damaged"] == ["parameters", "figures", "steps"] and shown["prompt_preview"] == \
        "first prompt"
    code, _, err = run_cli(capsys, "runs", "export", "1", str(tmp_path / "first.json"))
    assert code == 0 and json.loads((tmp_path / "first.json").read_text())["output"] == shown["output"]


@pytest.mark.parametrize("run_id", [str(2**63), str(10**20), "-1"])
def test_an_id_beyond_sqlite_integers_is_no_such_run(capsys, run_id):
    for command in (("show", run_id), ("export", run_id, "x.json")):
        code, _, err = run_cli(capsys, "runs", *command)
        _one_clean_line(code, err, f"no run {run_id}")


def test_a_database_changed_under_an_open_history_reads_as_a_history_error(tmp_path):
    """Another program (an sqlite3 shell, a sync tool) changed the database after it was opened."""
    history = RunHistory(tmp_path / "history.sqlite3")
    history.start("tiny-llama", "full", {}, "a prompt")
    with sqlite3.connect(tmp_path / "history.sqlite3") as other:
        other.execute("ALTER TABLE runs RENAME TO kept_runs")
    for read in (lambda: history.list(), lambda: history.get(1)):
        with pytest.raises(HistoryError, match="is unreadable .*no such table: runs.*; history is off"):
            read()


# -- destinations -------------------------------------------------------------------------------------


def test_json_or_export_onto_a_folder_is_refused_before_any_work(capsys, tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    code, _, err = run_cli(capsys, "run", "--model", "tiny-llama", "--prompt", "hi", "--json", str(folder))
    _one_clean_line(code, err, "it is a folder")
    assert "loaded" not in err  # refused before the model loaded
    assert run_cli(capsys, "run", "--model", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "1")[0] == 0
    code, _, err = run_cli(capsys, "runs", "export", "1", str(folder))
    _one_clean_line(code, err, "it is a folder")
    assert list(folder.iterdir()) == []


def test_a_write_that_fails_midway_leaves_the_existing_file(tmp_path):
    """The file-size limit (what a full disk does to a write) stops the --json file part-way."""
    target = tmp_path / "run.json"
    target.write_text("precious")
    script = ("import resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))\n"  # Python ignores SIGXFSZ: EFBIG
              "from kvstudio.cli.dispatch import main\n"
              f"sys.exit(main(['run', '--model', 'tiny-llama', '--prompt', 'hi', '--max-new-tokens', '3', "
              f"'--no-history', '--json', {str(target)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    _one_clean_line(done.returncode, done.stderr, "could not write", "File too large", "the file there is unchanged")
    assert target.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left


# -- numbers at the edges -----------------------------------------------------------------------------


def test_a_tiny_positive_temperature_samples_the_greedy_token():
    engine = engine_for("tiny-llama")
    greedy = engine.generate("abc", create_policy("full"), GenerationSettings(max_new_tokens=6))
    for temperature in (1e-30, 1e-45, 5e-324):
        sampled = engine.generate("abc", create_policy("full"),
                                  GenerationSettings(max_new_tokens=6, temperature=temperature, seed=1))
        assert sampled.token_ids == greedy.token_ids


@pytest.mark.parametrize("option, value, words", [
    ("--seed", str(2**64), "--seed must be between"), ("--seed", str(-(2**63) - 1), "--seed must be between"),
    ("--temperature", "inf", "--temperature must be"), ("--temperature", "nan", "--temperature must be"),
    ("--memory-sample-hz", "1e-300", "--memory-sample-hz must be"), ("--top-p", "nan", "--top-p must be"),
])
def test_numbers_beyond_what_a_run_takes_are_one_line(capsys, option, value, words):
    code, _, err = run_cli(capsys, "run", "--model", "tiny-llama", "--prompt", "hi", "--temperature", "1",
                           "--no-history", option, value)
    _one_clean_line(code, err, words)


def test_the_largest_seed_runs(capsys):
    code, _, err = run_cli(capsys, "run", "--model", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "2",
                           "--temperature", "1", "--seed", str(2**64 - 1), "--no-history")
    assert code == 0, err


def test_a_budget_far_beyond_the_prompt_allocates_only_what_the_run_holds():
    engine = engine_for("tiny-llama")
    policy = create_policy("h2o", budget=10**9)
    cache = engine.new_cache(policy)
    result = engine.generate("a short prompt", policy, GenerationSettings(max_new_tokens=4), cache=cache)
    full = engine.generate("a short prompt", create_policy("full"), GenerationSettings(max_new_tokens=4))
    assert result.token_ids == full.token_ids  # keep everything, as the full cache does
    entries = cache.layers[0].store.entries
    row = entries.row_bytes(entries.tensors)
    allocated = sum(t.numel() * t.element_size() for t in entries.tensors.values())
    assert allocated <= 64 * row, allocated  # the first allocation, not 10^9 entries (119 GiB)


# -- arguments that are not UTF-8 ----------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ("run", "--model", "tiny-llama", "--prompt", "\udcff\udcfehi"),
    ("run", "--model", "/tmp/\udcff"),
    ("runs", "list", "--search", "\udcff"),
])
def test_arguments_that_are_not_utf8_are_named(capsys, argv):
    code, _, err = run_cli(capsys, *argv)
    position = next(i for i, a in enumerate(argv, 1) if "\udcff" in a)
    _one_clean_line(code, err, f"argument {position} (", "is not UTF-8 text")


def test_the_installed_command_names_a_non_utf8_argument():
    done = subprocess.run([sys.executable, "-m", "kvstudio", "run", "--prompt", b"\xff\xfe".decode("utf-8",
                           "surrogateescape")], capture_output=True, timeout=120)
    err = done.stderr.decode("utf-8", "replace")
    _one_clean_line(done.returncode, err, "argument 3 ('\\xff\\xfe') is not UTF-8 text")


# -- memory snapshots shaped like one --------------------------------------------------------------------


GOOD_EVENT = {"action": "alloc", "addr": 16, "size": 64, "time_us": 5, "frames": [{"filename": "a.py", "line": 3,
                                                                                  "name": "f"}]}


@pytest.mark.parametrize("change, words", [
    ({"addr": None}, "addr is missing"), ({"size": "64"}, "size is a str"), ({"time_us": [1]}, "time_us is a list"),
    ({"frames": "x"}, "frames is not a list of frames"), ({"frames": [{"line": "3"}]}, "frames is not a list"),
    ({"action": 3}, "action is a int"), ({"size": 2**70}, "size is a int, not an integer"),
])
def test_a_snapshot_with_missing_or_mistyped_fields_is_one_line(tmp_path, change, words):
    event = {k: v for k, v in (GOOD_EVENT | change).items() if v is not None}
    path = tmp_path / "snap.pickle"
    path.write_bytes(pickle.dumps({"segments": [], "device_traces": [[GOOD_EVENT, event]]}))
    with pytest.raises(SnapshotError, match="shaped like a memory snapshot but device_traces\\[0\\]\\[1\\]") as caught:
        load_snapshot(path)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_the_kvstudio_part_of_a_snapshot_is_checked_too(tmp_path):
    for ours, words in (([], "'kvstudio' entry is a list"), ({"device": 0}, "kvstudio.device is a int"),
                        ({"marks": [{"time_us": "x", "label": "a"}]}, "kvstudio.marks is not a list of marks")):
        path = tmp_path / "snap.pickle"
        path.write_bytes(pickle.dumps({"segments": [], "device_traces": [[GOOD_EVENT]], "kvstudio": ours}))
        with pytest.raises(SnapshotError, match=words):
            load_snapshot(path)


# -- the last net ---------------------------------------------------------------------------------------


def test_an_unexpected_error_in_a_command_is_one_line_and_a_report(capsys, monkeypatch, isolated_user_data):
    def broken(_plugins):
        raise TypeError("a bug in KV Studio\nwith a second line")

    monkeypatch.setattr(dispatch, "command_policies", broken)
    code, _, err = run_cli(capsys, "policies")
    assert code == dispatch.EXIT_INTERNAL and len(err.strip().splitlines()) == 1, err
    assert err.startswith("kvstudio: internal error: TypeError: a bug in KV Studio; details in ")
    report = Path(err.strip().split("; details in ")[1])
    assert report.parent == isolated_user_data / "reports"
    text = report.read_text()
    assert "Traceback" in text and "in broken" in text and "torch: " + torch.__version__.split("+")[0] in text


def test_the_net_writes_its_report_elsewhere_when_the_data_folder_is_a_file(capsys, monkeypatch, tmp_path):
    (tmp_path / "data").write_text("a file")
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(dispatch, "command_policies", lambda _plugins: {}["missing"])
    code, _, err = run_cli(capsys, "policies")
    assert code == dispatch.EXIT_INTERNAL and "internal error: KeyError: 'missing'; details in " in err
    assert Path(err.strip().split("; details in ")[1]).is_file()


def test_the_studio_net_puts_an_escaped_exception_in_the_banner(qtbot, window):
    from kvstudio.gui.app import install_last_net

    previous = sys.excepthook
    install_last_net(window)
    try:
        try:
            raise AttributeError("'NoneType' object has no attribute 'x'")
        except AttributeError as error:
            sys.excepthook(type(error), error, error.__traceback__)
        assert window.error_text.text().startswith("internal error: AttributeError: 'NoneType' object has no "
                                                   "attribute 'x'; details in ")
        try:
            raise ModelLoadError("model folder not found: /nowhere")
        except ModelLoadError as error:
            sys.excepthook(type(error), error, error.__traceback__)
        assert window.error_text.text() == "model folder not found: /nowhere"  # its own line, not the net's
    finally:
        sys.excepthook = previous


# -- the same in the studio ------------------------------------------------------------------------------


def test_the_studio_opens_a_mistyped_snapshot_in_one_line_and_keeps_its_view(qtbot, window, tmp_path):
    path = tmp_path / "snap.pickle"
    path.write_bytes(pickle.dumps({"segments": [], "device_traces": [[GOOD_EVENT | {"size": "64"}]]}))
    view = window.snapshots.view
    assert view.open_path(path) is False
    assert "snap.pickle is shaped like a memory snapshot but device_traces[0][0].size is a str" in view.summary.text()
    path.write_bytes(pickle.dumps({"segments": [], "device_traces": [[GOOD_EVENT]]}))
    assert view.open_path(path) is True and len(view.timelines) == 1  # a good one still opens


def test_the_runs_view_lists_a_damaged_row(qtbot, window):
    history = window.history
    kept = history.start("tiny-llama", "h2o", {"budget": 8}, "a prompt that must not be lost")
    history.finish_figures(kept, "finished", "its output", {"tokens_per_second": 3.0}, [], [])
    with sqlite3.connect(history.path) as connection:
        connection.execute("UPDATE runs SET parameters = 'not json', figures = '7' WHERE id = ?", (kept,))
    window.runs.view.refresh()
    table = window.runs.view.table
    assert table.rowCount() == 1 and table.item(0, 0).text() == str(kept)
    assert "a prompt that must not be lost" in table.item(0, table.columnCount() - 2).text()
