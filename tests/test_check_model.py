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
    assert all(len(c["attention_output_max_delta"]) == 4 and max(c["attention_output_max_delta"]) < 1e-4
               for c in data["checks"])
    assert "attention output max |delta|" in out
    # fp32 keys and values: 2 x layers x KV heads x head size x 4 bytes per token
    assert data["cache_bytes_per_token"] == 2 * 4 * 2 * data["head_dim"] * 4


def test_a_difference_above_the_tolerance_says_where_and_exits_nonzero(capsys):
    assert main(["check-model", "tiny-llama", "--tolerance", "0", "--decode-steps", "2"]) == 1
    out = capsys.readouterr().out
    assert "differs: max |delta logit|" in out and "(tolerance 0)" in out


def test_bad_arguments_are_one_line(capsys):
    assert main(["check-model", "tiny-llama", "--chunk-size", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_difference_is_traced_to_the_first_layer_whose_attention_output_differs():
    """The engine's own outputs against a reference whose layer 2 was moved by 0.01: the check names
    layer 2, not layer 0 or the logits alone."""
    from kvstudio.core.evaluate.conformance import ModelCheck, compare_with_transformers, reference_logits
    from kvstudio.core.models.loading import load_model
    from kvstudio.core.runtime.engine import Engine

    engine = Engine(load_model("tiny-llama"))
    ids = engine.encode("one two three four five six seven")
    reference = reference_logits(engine.model, ids, 2)
    assert len(reference.layer_outputs) == engine.loaded.n_layers
    exact = compare_with_transformers(engine, ids, 3, 2, reference)
    assert exact.first_layer_over(1e-4) is None and len(exact.layer_max_delta) == engine.loaded.n_layers
    reference.layer_outputs[2] = [t + 0.01 for t in reference.layer_outputs[2]]
    moved = compare_with_transformers(engine, ids, 3, 2, reference)
    assert moved.first_layer_over(1e-4) == 2 and abs(moved.layer_max_delta[2] - 0.01) < 1e-3
    check = ModelCheck([exact, moved], 1e-4, len(ids), 0.0, "float32")
    assert not check.exact and "first in layer 2's attention output" in check.lines()[-1]
