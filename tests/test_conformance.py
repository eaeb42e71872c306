"""Conformance matrix: under `full`, KV Studio computes what transformers computes, for every family.

For a tiny random model of each family (core/models/tiny_families.py: 4 layers, sliding window W=8
where the family has sliding layers, fp32), the logits of every prompt position (40 tokens) and of
every decode step (4, teacher-forced on transformers' greedy tokens) are compared between KV
Studio's engine and transformers' own forward with its own DynamicCache(config=...) and eager
attention: the prompt in one chunk and in chunks of 5. Exact means max |delta logit| <= 1e-4.
A family that cannot be computed exactly must be refused at load with one clear line. Each layer's
attention output is compared too (core/evaluate/conformance.py).

Jamba's Mamba layers are the exception that proves the rule: transformers' own chunked prefill differs
from its one forward by ~4e-4 (its PyTorch scan), so there the engine's chunks are held to transformers'
own chunks.
"""

from __future__ import annotations

import pytest
import torch

from kvstudio.core.errors import ModelLoadError
from kvstudio.core.evaluate.conformance import TOLERANCE, compare_with_transformers, reference_logits
from kvstudio.core.models.layer_kinds import FULL, SLIDING, LayerKind
from kvstudio.core.models.loading import LoadedModel, load_model
from kvstudio.core.models.support import check_supported
from kvstudio.core.models.tiny import byte_tokenizer
from kvstudio.core.models.tiny_families import WINDOW, build_family_model
from kvstudio.core.runtime.cache import PolicyCache
from kvstudio.core.runtime.engine import Engine, GenerationSettings
from kvstudio.core.spec import create_policy

EXACT = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "phi3",
         "olmo2", "cohere2", "exaone4", "granite", "starcoder2", "gpt2", "gpt_neox", "gpt_oss", "deepseek_v3",
         "smollm3", "glm", "lfm2", "qwen3_next")  # the last two: convolution / linear-attention state layers
REFUSED = {"falcon_h1": "layers 0, 1, 2, 3 are hybrid layers", "falcon": "run their own attention code"}
PROMPT = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
DECODE_STEPS = 4


def family_engine(family: str) -> Engine:
    model = build_family_model(family)
    check_supported(model)
    return Engine(LoadedModel(model, byte_tokenizer(), f"tiny {family}", family, torch.device("cpu"), torch.float32))


@pytest.mark.parametrize("family", EXACT)
def test_full_policy_gives_transformers_logits(family):
    engine = family_engine(family)
    reference = reference_logits(engine.model, PROMPT, DECODE_STEPS)
    for chunk in (len(PROMPT), 5):
        result = compare_with_transformers(engine, PROMPT, chunk, DECODE_STEPS, reference)
        assert result.exact(), (f"{family}, chunk {chunk}: prompt max |delta| {result.prompt_max_delta:.2e}, "
                                f"decode {result.decode_max_delta:.2e} (tolerance {TOLERANCE})")
        assert result.first_layer_over(TOLERANCE) is None, result.layer_max_delta


def test_jamba_chunks_are_transformers_own_chunks():
    engine = family_engine("jamba")
    for chunk in (len(PROMPT), 5):
        reference = reference_logits(engine.model, PROMPT, DECODE_STEPS, chunk_size=chunk)
        result = compare_with_transformers(engine, PROMPT, chunk, DECODE_STEPS, reference)
        assert result.exact() and result.first_layer_over(TOLERANCE) is None, (chunk, result)
    # ... and that is a real difference from one forward, not a tolerance too loose to see anything
    one = reference_logits(engine.model, PROMPT, 0)
    assert compare_with_transformers(engine, PROMPT, 5, 0, one).max_delta > TOLERANCE


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_family_that_cannot_be_exact_is_refused_with_one_line(family):
    with pytest.raises(ModelLoadError) as raised:
        check_supported(build_family_model(family))
    message = str(raised.value)
    assert message.startswith(f"{family} is not supported: ") and REFUSED[family] in message and "\n" not in message


def test_refusal_comes_when_a_folder_loads(tmp_path):
    """Not when a run starts: load_model itself says why."""
    build_family_model("falcon").save_pretrained(tmp_path / "falcon")
    byte_tokenizer().save_pretrained(tmp_path / "falcon")
    with pytest.raises(ModelLoadError, match="falcon is not supported"):
        load_model(str(tmp_path / "falcon"), device="cpu")


def test_the_matrix_can_fail_a_window_ignored_is_caught():
    """Mistral's window really bites at W=8 on 40 tokens: run as all-global layers (what KV Studio
    did before it read layer kinds), its logits are far from transformers'."""
    engine = family_engine("mistral")
    engine.loaded.__class__ = type("AllGlobal", (LoadedModel,), {"layer_kinds": property(
        lambda self: [LayerKind(FULL)] * self.n_layers)})
    result = compare_with_transformers(engine, PROMPT, 5, DECODE_STEPS)
    assert result.max_delta > 100 * TOLERANCE


def test_sliding_layers_drop_what_left_the_window_as_their_own_reason():
    engine = family_engine("gemma3_text")  # 3 sliding layers (W=8), 1 global
    kinds = engine.loaded.layer_kinds
    assert [k.kind for k in kinds] == [SLIDING] * 3 + [FULL] and kinds[0].window == WINDOW
    result = engine.generate(PROMPT, create_policy("full"), GenerationSettings(max_new_tokens=5, chunk_size=16,
                                                                               ignore_eos=True))
    assert result.kept_per_layer == [WINDOW - 1] * 3 + [len(PROMPT) + 4]  # transformers keeps W-1 too
    assert result.evictions == 0  # the policy evicted nothing: those entries left the window
    kv_heads = engine.loaded.n_kv_heads  # counted per KV head, as evictions are
    assert sum(step.left_window for step in result.steps) == 3 * kv_heads * (len(PROMPT) + 4 - (WINDOW - 1))
    h2o = engine.generate(PROMPT, create_policy("h2o", budget=12), GenerationSettings(max_new_tokens=5, chunk_size=16,
                                                                                       ignore_eos=True))
    assert h2o.kept_per_layer == [WINDOW - 1] * 3 + [12]  # the policy acts within each layer's window


def test_policy_cache_without_kinds_is_all_global():
    assert PolicyCache(create_policy("full"), n_layers=2).layer_kinds == [LayerKind(FULL)] * 2


def test_run_summary_and_json_name_the_layer_kinds():
    from kvstudio.cli.dispatch import format_summary

    engine = family_engine("gemma2")
    result = engine.generate(PROMPT, create_policy("full"), GenerationSettings(max_new_tokens=2, chunk_size=16))
    assert result.layer_kinds["summary"] == f"4 layers: 2 sliding (window {WINDOW}), 2 global"
    assert result.to_dict()["layer_kinds"]["layers"][0] == {"kind": "sliding", "window": WINDOW}
    summary = format_summary(result)
    assert f"layers: 4 layers: 2 sliding (window {WINDOW}), 2 global" in summary and "left the window: " in summary


def test_rerotate_is_refused_on_layers_without_rope():
    from kvstudio.core.errors import PolicyError

    engine = family_engine("cohere2")  # its global layer has no RoPE
    assert [k.rope for k in engine.loaded.layer_kinds] == [True, True, True, False]
    with pytest.raises(PolicyError, match="use no RoPE"):
        engine.new_cache(create_policy("streaming_llm", budget=12, rerotate=True))
