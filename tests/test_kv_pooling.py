"""KV-head pooling (GQA's mean-pooled initialisation, core/models/kv_pooling.py): the identity, the pooled
weights, the cache it makes, the derived model's spec and name, and refusals."""

from __future__ import annotations

import pytest
import torch

from kvstudio.core.runtime.engine import Engine, GenerationSettings
from kvstudio.core.errors import ModelLoadError
from kvstudio.core.models.kv_pooling import split_kv_groups, with_kv_groups
from kvstudio.core.models.loading import load_model
from kvstudio.core.models.tiny import build_tiny_model
from kvstudio.core.spec import create_policy
from kvstudio.core.persist.fingerprint import model_fingerprint

from .helpers import random_ids, run_cli

IDS = torch.tensor([random_ids(40, seed=5)])


def _logits(loaded) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(IDS).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_pooling_to_as_many_groups_as_the_model_has_is_the_identity(family):
    base = load_model(f"tiny-{family}", device="cpu")
    same = load_model(f"tiny-{family}+kv2", device="cpu")
    assert torch.equal(_logits(base), _logits(same))


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2's K/V projections have biases
def test_pooled_heads_are_the_mean_of_their_group(family):
    base, _ = build_tiny_model(family)
    pooled = load_model(f"tiny-{family}+kv1", device="cpu").model
    head_dim = 16
    for original, merged in zip(base.model.layers, pooled.model.layers):
        for name in ("k_proj", "v_proj"):
            weight = getattr(original.self_attn, name).weight
            expected = (weight[:head_dim] + weight[head_dim:]) / 2
            assert torch.allclose(getattr(merged.self_attn, name).weight, expected, atol=1e-7)
            bias = getattr(original.self_attn, name).bias
            if bias is not None:
                assert torch.allclose(getattr(merged.self_attn, name).bias, (bias[:head_dim] + bias[head_dim:]) / 2)
        assert torch.equal(merged.self_attn.q_proj.weight, original.self_attn.q_proj.weight)
    assert pooled.config.num_key_value_heads == 1


def test_phi3_fused_projection_pools_only_keys_and_values():
    base, _ = build_tiny_model("phi3")
    pooled = load_model("tiny-phi3+kv1", device="cpu").model
    head_dim, heads = 16, 4
    original = base.model.layers[0].self_attn.qkv_proj.weight
    merged = pooled.model.layers[0].self_attn.qkv_proj.weight
    queries = heads * head_dim
    assert torch.equal(merged[:queries], original[:queries])
    keys = original[queries:queries + 2 * head_dim]
    assert torch.allclose(merged[queries:queries + head_dim], (keys[:head_dim] + keys[head_dim:]) / 2)


def test_cache_bytes_scale_by_groups_over_kv_heads():
    settings = GenerationSettings(max_new_tokens=4, chunk_size=32, memory_sample_hz=0)
    prompt = random_ids(60, seed=1)
    base = Engine(load_model("tiny-llama", device="cpu")).generate(prompt, create_policy("h2o", budget=24), settings)
    pooled_engine = Engine(load_model("tiny-llama+kv1", device="cpu"))
    pooled = pooled_engine.generate(prompt, create_policy("h2o", budget=24), settings)
    assert pooled.peak_cache_bytes * 2 == base.peak_cache_bytes
    assert pooled_engine.loaded.n_kv_heads == 1 and len(pooled.token_ids) == 4


def test_the_derived_model_has_its_own_spec_name_and_fingerprint():
    assert split_kv_groups("default+kv1") == ("default", 1)
    assert split_kv_groups("/models/x") == ("/models/x", None)
    assert with_kv_groups("tiny-llama", 1) == "tiny-llama+kv1"
    with pytest.raises(ModelLoadError, match="different KV groups"):
        with_kv_groups("tiny-llama+kv2", 1)
    base, pooled = load_model("tiny-llama", device="cpu"), load_model("tiny-llama+kv1", device="cpu")
    assert pooled.name == "tiny-llama (1 KV group)" and pooled.spec == "tiny-llama+kv1"
    base_print, pooled_print = model_fingerprint(base), model_fingerprint(pooled)
    assert base_print["config_sha256"] != pooled_print["config_sha256"]
    assert base_print["weights_sha256"] != pooled_print["weights_sha256"]
    assert pooled_print["n_kv_heads"] == 1


def test_groups_that_do_not_divide_the_kv_heads_are_refused(capsys):
    with pytest.raises(ModelLoadError, match="--kv-groups 3: this model has 2 KV heads"):
        load_model("tiny-llama+kv3", device="cpu")
    code, stdout, stderr = run_cli(capsys, "run", "--model", "tiny-llama", "--kv-groups", "3", "--prompt", "hi",
                                   "--no-history")
    assert code == 2 and "choose one of 1, 2, 4" in stderr
    code, stdout, stderr = run_cli(capsys, "run", "--model", "tiny-llama", "--kv-groups", "1", "--prompt", "hi there",
                                   "--max-new-tokens", "2", "--no-history")
    assert code == 0 and "model tiny-llama (1 KV group)" in stdout


def test_expanding_to_the_query_heads_computes_the_same_with_a_cache_per_query_head():
    base, expanded = load_model("tiny-llama", device="cpu"), load_model("tiny-llama+kv4", device="cpu")
    torch.testing.assert_close(_logits(expanded), _logits(base), atol=1e-5, rtol=0)
    assert expanded.n_kv_heads == 4 and expanded.name == "tiny-llama (4 KV groups)"
    settings = GenerationSettings(max_new_tokens=3, chunk_size=64, memory_sample_hz=0)
    prompt = random_ids(48, seed=2)
    policy = create_policy("snapkv", budget=16, observation_window=4)
    engine = Engine(expanded)
    result = engine.generate(prompt, policy, settings, keep_cache=True)
    narrow = Engine(base).generate(prompt, create_policy("snapkv", budget=16, observation_window=4), settings)
    assert result.peak_cache_bytes == 2 * narrow.peak_cache_bytes  # honest bytes: 4 heads held, not 2
    # Each query head selected on its own votes: SnapKV's rule with groups of one, from eager attention.
    base.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = base.model(torch.tensor([prompt]), output_attentions=True).attentions
    finally:
        base.model.set_attn_implementation("sdpa")
    for layer, attention in enumerate(attentions):
        votes = attention[0, :, -4:, :44].float().sum(dim=1)  # (query heads, entries before the window)
        pooled = torch.nn.functional.avg_pool1d(votes.unsqueeze(1), 5, padding=2, stride=1).squeeze(1)
        kept = result.cache.positions(layer)[:, :16].tolist()  # the prompt's entries (decoded ones follow)
        for head in range(4):
            chosen = sorted(torch.sort(pooled[head], descending=True, stable=True).indices[:12].tolist())
            assert kept[head] == chosen + [44, 45, 46, 47]
