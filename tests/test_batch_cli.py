"""`kvstudio run` with several prompts: one batched run, each row stored as its own run linked to the batch."""

from __future__ import annotations

import json
import textwrap

import pytest

from kvstudio.core.persist.history import RunHistory

from .helpers import run_cli

TINY = ("--model", "tiny-llama", "--chunk-size", "16", "--max-new-tokens", "6", "--memory-sample-hz", "0")


def prompt_files(tmp_path, *texts):
    paths = []
    for index, text in enumerate(texts):
        path = tmp_path / f"p{index}.txt"
        path.write_text(text)
        paths.append(path)
    return paths


def single_text(capsys, path, *policy) -> str:
    code, out, err = run_cli(capsys, "run", *TINY, *policy, "--prompt-file", str(path), "--no-history")
    assert code == 0, err
    return out.split("\n--- summary")[0].strip("\n")


def test_prompt_files_run_as_one_batch_each_row_its_own_run(tmp_path, studio_folders, capsys):
    paths = prompt_files(tmp_path, "the quick brown fox " * 3, "a much longer prompt about caches " * 6, "hi")
    args = [arg for path in paths for arg in ("--prompt-file", str(path))]
    code, out, err = run_cli(capsys, "run", *TINY, "--policy", "h2o", "--budget", "20", *args,
                             "--json", str(tmp_path / "batch.json"))
    assert code == 0, err
    data = json.loads((tmp_path / "batch.json").read_text())
    assert data["batch"]["rows"] == 3 and data["batch"]["max_rows_in_flight"] == 3
    history = RunHistory()
    records = sorted(history.list(limit=10), key=lambda record: record.id)
    assert len(records) == 3
    assert {record.settings["batch"]["id"] for record in records} == {data["batch"]["id"]}
    assert [record.settings["batch"]["row"] for record in records] == [1, 2, 3]
    for record, path, row in zip(records, paths, data["rows"]):
        assert record.status == "finished" and record.policy == "h2o"
        assert record.output == row["text"] == single_text(capsys, path, "--policy", "h2o", "--budget", "20")
        assert row["run_id"] == record.id
        assert f"=== row {row['row']} ({path.name}): {row['policy']}\n{row['text']}\n" in out
    code, out, err = run_cli(capsys, "runs", "list")
    assert out.count(f"[batch {data['batch']['id']} ") == 3


def test_a_prompts_file_gives_each_row_its_policy(tmp_path, studio_folders, capsys):
    (tmp_path / "long.txt").write_text("words of a long document " * 8)
    lines = [{"prompt": "one short prompt", "label": "short"},
             {"prompt_file": "long.txt", "policy": "h2o-int8", "parameters": {"budget": 16}},
             {"prompt": "one short prompt", "policy": "streaming_llm", "parameters": {"budget": 12, "sink": 2}}]
    prompts = tmp_path / "rows.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    code, out, err = run_cli(capsys, "run", *TINY, "--prompts", str(prompts), "--batch-size", "2",
                             "--json", str(tmp_path / "batch.json"))
    assert code == 0, err
    data = json.loads((tmp_path / "batch.json").read_text())
    assert data["batch"]["max_rows_in_flight"] == 2
    assert [row["policy"].split("(")[0] for row in data["rows"]] == ["full", "h2o-int8", "streaming_llm"]
    assert "sink=2" in data["rows"][2]["policy"]
    assert [row["label"] for row in data["rows"]] == ["short", "rows.jsonl line 2", "rows.jsonl line 3"]
    records = sorted(RunHistory().list(limit=10), key=lambda record: record.id)
    assert [record.cache for record in records] == ["full", "h2o-int8", "streaming_llm"]
    assert records[1].output == single_text(capsys, tmp_path / "long.txt", "--policy", "h2o-int8", "--budget", "16")


@pytest.mark.parametrize("line,message", [
    ("not json", r"rows.jsonl line 1 is not JSON"),
    ('{"text": "x"}', r'rows.jsonl line 1: give exactly one of "prompt" or "prompt_file"'),
    ('{"prompt": "x", "colour": 1}', r"rows.jsonl line 1: unknown field 'colour'"),
    ('{"prompt": "x", "policy": "nope"}', r"rows.jsonl line 1: .*nope"),
    ('{"prompt": "x", "parameters": {"budget": 3}}', r'"parameters" without a "policy"'),
    ('{"prompt": ""}', r"row 1 \(rows.jsonl line 1\) is empty"),
])
def test_bad_rows_are_one_line_naming_the_row(tmp_path, studio_folders, capsys, line, message):
    import re

    prompts = tmp_path / "rows.jsonl"
    prompts.write_text(line + "\n")
    code, out, err = run_cli(capsys, "run", *TINY, "--prompts", str(prompts))
    assert code == 2
    [error] = err.strip().splitlines()[-1:]
    assert error.startswith("kvstudio: error:") and re.search(message, error), err
    assert "Traceback" not in err
    assert not RunHistory().list(limit=5)  # refused before any work: nothing half-stored


def test_an_empty_prompt_file_names_its_row(tmp_path, studio_folders, capsys):
    paths = prompt_files(tmp_path, "some text", "")
    code, out, err = run_cli(capsys, "run", *TINY, "--prompt-file", str(paths[0]), "--prompt-file", str(paths[1]))
    assert code == 2
    assert "empty" in err and ("p1.txt" in err), err


@pytest.mark.parametrize("option", [("--measure-loss",), ("--memory-snapshot", "snap.pickle")])
def test_an_option_made_for_one_run_is_refused_with_a_batch_before_any_work(tmp_path, studio_folders, capsys, option):
    paths = prompt_files(tmp_path, "some text", "other text")
    code, out, err = run_cli(capsys, "run", *TINY, *option, "--prompt-file", str(paths[0]), "--prompt-file",
                             str(paths[1]))
    assert code == 2 and f"{option[0]} works with one prompt, not a batch" in err, err
    assert "a batch of" not in err  # refused before the model loaded


FAILING_PLUGIN = '''
from kvstudio.core.policies.base import Policy


class BreaksLater(Policy):
    name = "breaks_later"
    summary = "raises at its third step"
    requires_budget = False

    def select(self, view, state):
        if view.step == 2:
            raise RuntimeError("scores went NaN")
        return None
'''


def test_a_failing_policy_ends_its_row_and_the_others_finish(tmp_path, studio_folders, capsys):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "breaks_later.py").write_text(textwrap.dedent(FAILING_PLUGIN))
    prompts = tmp_path / "rows.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "first row text " * 3}, {"prompt": "second row text " * 3, "policy": "breaks_later"},
        {"prompt": "third row " * 4}]))
    code, out, err = run_cli(capsys, "run", *TINY, "--plugins", str(plugins), "--prompts", str(prompts))
    assert code == 2
    [error] = [line for line in err.splitlines() if line.startswith("kvstudio: error:")]
    assert error.startswith("kvstudio: error: row 2 (rows.jsonl line 2): policy 'breaks_later' (plugin")
    assert "scores went NaN" in error and "Traceback" not in err
    records = sorted(RunHistory().list(limit=10), key=lambda record: record.id)
    assert [record.status for record in records] == ["finished", "failed", "finished"]
    assert "scores went NaN" in records[1].error
    assert "=== row 1 " in out and "=== row 3 " in out and "=== row 2 " not in out
