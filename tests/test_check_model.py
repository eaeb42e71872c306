"""`kvstudio check-model`: the engine under `full` against transformers on the user's model."""

from __future__ import annotations

import json

from kvstudio.cli.dispatch import main


def test_a_tiny_model_is_reported_exact_with_its_shape(tmp_path, capsys):
    report = tmp_path / "check.json"
    assert main(["check-model", "tiny-qwen2", "--chunk-size", "5", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "exact: every logit within 0.0001" in out and "chunks of 5" in out and "one chunk" in out
    data = json.loads(report.read_text())
    assert data["exact"] and data["model"] == "tiny-qwen2" and data["n_kv_heads"] == 2
    assert data["layer_kinds"]["summary"].startswith("4 layers")
    assert [c["chunk_size"] for c in data["checks"]] == [data["prompt_tokens"], 5]
    assert all(c["prompt_max_delta"] < 1e-4 and c["decode_max_delta"] < 1e-4 for c in data["checks"])
    # fp32 keys and values: 2 x layers x KV heads x head size x 4 bytes per token
    assert data["cache_bytes_per_token"] == 2 * 4 * 2 * data["head_dim"] * 4


def test_a_difference_above_the_tolerance_says_where_and_exits_nonzero(capsys):
    assert main(["check-model", "tiny-llama", "--tolerance", "0", "--decode-steps", "2"]) == 1
    out = capsys.readouterr().out
    assert "differs: max |delta logit|" in out and "> 0" in out


def test_bad_arguments_are_one_line(capsys):
    assert main(["check-model", "tiny-llama", "--chunk-size", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
