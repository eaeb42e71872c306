"""Runs that can be repeated: versions, device, dtype, git commit and the command, in every row."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import transformers

import kvstudio
from kvstudio.core.persist.history import RunHistory, default_path
from kvstudio.core.persist.provenance import command_line, command_of_record, environment, rerun_command

ROOT = Path(__file__).resolve().parent.parent


def test_the_environment_names_versions_device_dtype_and_commit():
    found = environment("cpu", torch.float32, command="kvstudio run --policy h2o")
    assert found["kvstudio"] == kvstudio.__version__ and found["torch"] == torch.__version__
    assert found["transformers"] == transformers.__version__ and found["python"] == sys.version.split()[0]
    assert (found["device"], found["dtype"], found["command"]) == ("cpu", "float32", "kvstudio run --policy h2o")
    if (ROOT / ".git").exists():  # a checkout (a worktree's .git is a file): the commit it runs from
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert found["git_commit"] == head.strip() and isinstance(found["git_dirty"], bool)


def test_the_command_line_is_the_kvstudio_command_only():
    assert command_line(["/venv/bin/kvstudio", "run", "--prompt", "a b"]) == "kvstudio run --prompt 'a b'"
    assert command_line(["/venv/bin/kvstudio", "--model", "tiny-llama"]) is None  # the studio
    assert command_line(["pytest", "-q"]) is None


def test_a_rerun_command_holds_the_cache_settings_and_prompt():
    command = rerun_command("tiny-llama", "h2o", {"budget": 32, "recent": 16, "gqa_aggregation": "max",
                                                  "storage": {"codec": "int4", "group_size": 32}},
                            {"max_new_tokens": 8, "chunk_size": 64, "ignore_eos": True, "measure_loss": True,
                             "stop_strings": ["\n"]}, "it's a prompt")
    assert command == ("kvstudio run --model tiny-llama --policy h2o --budget 32 --recent 16 --gqa-aggregation max "
                       "--codec int4 --group-size 32 --max-new-tokens 8 --chunk-size 64 --stop '\n' --ignore-eos "
                       "--measure-loss --prompt 'it'\"'\"'s a prompt'")


def test_runs_show_command_prints_what_reruns_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path))
    prompt = "The capital of France is"
    env = dict(os.environ, KVSTUDIO_DATA_DIR=str(tmp_path))
    kvstudio_bin = str(Path(sys.executable).parent / "kvstudio")
    argv = [kvstudio_bin, "run", "--model", "tiny-llama", "--policy", "window", "--budget", "16", "--prompt", prompt,
            "--max-new-tokens", "3", "--ignore-eos", "--memory-sample-hz", "0"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    history = RunHistory(default_path())
    record = history.list(limit=1)[0]
    provenance = history.get(record.id).settings["provenance"]
    assert provenance["device"] == "cpu" and provenance["dtype"] == "float32"
    shown = subprocess.run([kvstudio_bin, "runs", "show", str(record.id), "--command"], capture_output=True,
                           text=True, env=env, timeout=120)
    assert shown.stdout.strip() == ("kvstudio run --model tiny-llama --policy window --budget 16 --prompt "
                                    "'The capital of France is' --max-new-tokens 3 --ignore-eos --memory-sample-hz 0")
    again = subprocess.run([kvstudio_bin, *shlex.split(shown.stdout)[1:], "--no-history"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.stdout.split("--- summary")[0] == done.stdout.split("--- summary")[0]  # the same text


def test_a_row_without_a_recorded_command_gets_one_built_from_it(tmp_path):
    history = RunHistory(tmp_path / "history.sqlite3")
    run_id = history.start("tiny-llama", "window", {"budget": 8}, "short prompt",
                           {"max_new_tokens": 4, "chunk_size": 512, "provenance": {"command": None}})
    command, note = command_of_record(history.get(run_id))
    assert command == ("kvstudio run --model tiny-llama --policy window --budget 8 --max-new-tokens 4 --chunk-size 512 "
                       "--prompt 'short prompt'") and note is None
    long_id = history.start("tiny-llama", "window", {"budget": 8}, "x" * 500, {"max_new_tokens": 4})
    command, note = command_of_record(history.get(long_id))
    assert command.endswith("--prompt-file PROMPT.txt") and "sha256" in note
    assert json.dumps(history.get(run_id).to_dict())  # still plain JSON


def test_a_run_with_an_adapter_reruns_with_it(tmp_path):
    """The rerun command of a LoRA run applies the adapter (--adapter), the model given as its spec."""
    command = rerun_command("tiny-llama", "window", {"budget": 8}, {"max_new_tokens": 4}, "hi",
                            adapter="/data/adapters/passkey/step-000040")
    words = shlex.split(command)
    assert words[words.index("--model") + 1] == "tiny-llama"
    assert words[words.index("--adapter") + 1] == "/data/adapters/passkey/step-000040"
    history = RunHistory(tmp_path / "history.sqlite3")
    run_id = history.start("tiny-llama+lora:passkey/step-000040", "window", {"budget": 8}, "short prompt",
                           {"max_new_tokens": 4, "provenance": {"command": None}})
    command, note = command_of_record(history.get(run_id))
    words = shlex.split(command)
    assert words[words.index("--model") + 1] == "tiny-llama"
    assert words[words.index("--adapter") + 1] == "passkey/step-000040"
    assert "give --adapter that checkpoint's path" in note
