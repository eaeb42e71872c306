"""`kvstudio run` and `kvstudio policies`, as a user types them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvstudio.cli.dispatch import main

TINY = ["run", "--model", "tiny-llama"]


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse exits on usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_run_streams_text_and_writes_json(capsys, tmp_path):
    path = tmp_path / "run.json"
    code, out, err = run_cli(capsys, *TINY, "--policy", "streaming_llm", "--budget", "16", "--sink", "2",
                             "--chunk-size", "8", "--prompt", "x" * 40, "--max-new-tokens", "6", "--json", str(path))
    assert code == 0, err
    data = json.loads(path.read_text())
    assert out.startswith(data["text"])
    assert "--- summary" in out and "tokens/s" in out and "evictions: " in out
    for key in ("text", "policy", "model", "prompt_tokens", "kept_per_layer", "peak_kept_per_layer",
                "peak_cache_bytes", "evictions", "steps"):
        assert key in data
    assert data["policy"] == "streaming_llm" and data["model"] == "tiny-llama"
    assert data["prompt_tokens"] == 40
    assert data["kept_per_layer"] == [16] * 4
    # 40 tokens in chunks of 8: the third chunk lands on 16 held entries, 24 before eviction.
    assert data["peak_kept_per_layer"] == [24] * 4
    assert data["evictions"] == sum(step["evicted"] for step in data["steps"]) > 0
    assert [s["phase"] for s in data["steps"]] == ["prefill"] * 5 + ["decode"] * 5
    assert data["peak_cache_bytes"] > 0
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left nothing behind


def test_prompt_file_is_read(capsys, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("a prompt from a file", encoding="utf-8")
    code, out, err = run_cli(capsys, *TINY, "--prompt-file", str(prompt), "--max-new-tokens", "3")
    assert code == 0, err
    assert "prompt 20 tokens" in out


def test_policies_lists_parameters_and_defaults(capsys):
    code, out, _ = run_cli(capsys, "policies")
    assert code == 0
    assert "streaming_llm: attention sinks" in out
    assert "--sink" in out and "default 4" in out


@pytest.mark.parametrize("argv, message", [
    (["--prompt-file", "/no/such/file.txt"], "prompt file not found: /no/such/file.txt"),
    (["--policy", "lru", "--prompt", "hi"], "unknown policy 'lru'"),
    (["--policy", "streaming_llm", "--budget", "4", "--sink", "8", "--prompt", "hi"],
     "must be larger than the sink"),
    (["--policy", "window", "--sink", "2", "--budget", "4", "--prompt", "hi"], "--sink does not apply to policy 'window'"),
    (["--prompt", "hi", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    ([], "no prompt"),
    (["--prompt", "hi", "--json", "/no/such/dir/out.json"], "does not exist"),
    (["--prompt", "hi", "--chunk-size", "0"], "--chunk-size must be at least 1"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, argv, message):
    code, out, err = run_cli(capsys, *TINY, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_binary_prompt_file_is_refused(capsys, tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    code, _, err = run_cli(capsys, *TINY, "--prompt-file", str(binary))
    assert code == 2 and "looks binary" in err
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    code, _, err = run_cli(capsys, *TINY, "--prompt-file", str(latin1))
    assert code == 2 and "not UTF-8" in err


def test_usage_errors_are_one_line(capsys):
    code, _, err = run_cli(capsys, *TINY, "--budget", "many", "--prompt", "hi")
    assert code == 2 and "invalid int value: 'many'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["run", "--model", "tiny-llama", "--policy", "streaming_llm", "--budget", "2", "--sink", "4", "--prompt", "x"],
     "budget must be larger than the sink"),
    (["run", "--model", "nope/nope", "--prompt", "x"], "not in the Hugging Face cache"),
])
def test_the_installed_command_fails_without_a_traceback(argv, message):
    process = subprocess.run([sys.executable, "-m", "kvstudio", *argv], capture_output=True, text=True)
    assert process.returncode == 2
    assert message in process.stderr and "Traceback" not in process.stderr


def test_run_records_a_memory_snapshot_on_cpu(capsys, tmp_path):
    from kvstudio.core.recording.snapshots import load_snapshot, timelines

    path = tmp_path / "run.pickle"
    code, out, err = run_cli(capsys, *TINY, "--policy", "window", "--budget", "16", "--chunk-size", "8",
                             "--prompt", "y" * 30, "--max-new-tokens", "4", "--memory-snapshot", str(path),
                             "--no-history")
    assert code == 0, err
    assert f"wrote memory snapshot {path}" in err
    [timeline] = timelines(load_snapshot(path))
    assert len(timeline.allocations) > 50
    assert [label for _, label in timeline.marks][:4] == [f"chunk {i} end" for i in range(1, 5)]


def test_memory_snapshot_to_a_missing_folder_fails_before_loading(capsys, tmp_path):
    code, _, err = run_cli(capsys, *TINY, "--prompt", "hi", "--memory-snapshot", str(tmp_path / "no" / "s.pickle"))
    assert code != 0
    assert "folder" in err and "does not exist" in err and "loaded" not in err
