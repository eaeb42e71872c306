"""Each scoring policy keeps what its paper's rule says, checked against plain references.

References are computed here from transformers' own eager attention (full matrices, no shortcuts)
on one prefill chunk covering the prompt. Within one chunk every layer sees the same attention as
with a full cache (a layer evicts only after its own attention), so the eager matrices are the
exact inputs of the rule.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.spec import create_policy
from kvstudio.core.policies.base import LayerState, LayerView
from kvstudio.core.policies.pyramidkv import pyramid_budgets

from .helpers import random_ids

N, BUDGET = 48, 16


@pytest.fixture(scope="module")
def setting():
    from .conftest import engine_for

    engine = engine_for("tiny-llama")
    prompt = random_ids(N, seed=21)
    model = engine.model
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = [a[0].float() for a in model(torch.tensor([prompt]), output_attentions=True).attentions]
    finally:
        model.set_attn_implementation("kvstudio")
    full = engine.generate(prompt, create_policy("full"), GenerationSettings(max_new_tokens=0, chunk_size=N),
                           keep_cache=True)
    return engine, prompt, attentions, full.cache


def kept_after_prefill(setting, policy):
    engine, prompt, _, _ = setting
    result = engine.generate(prompt, policy, GenerationSettings(max_new_tokens=0, chunk_size=N), keep_cache=True)
    return [result.cache.positions(layer).tolist() for layer in range(engine.loaded.n_layers)]


def per_kv_head(scores, kv_heads=2):
    """(query_heads, ...) -> (kv_heads, ...): mean over each GQA group."""
    return scores.view(kv_heads, scores.shape[0] // kv_heads, *scores.shape[1:]).mean(dim=1)


def top(scores, k):
    return sorted(torch.sort(scores, descending=True, stable=True).indices[:k].tolist())


def test_h2o_keeps_recent_plus_most_accumulated_attention(setting):
    kept = kept_after_prefill(setting, create_policy("h2o", budget=BUDGET, recent=6))
    for layer, attention in enumerate(setting[2]):
        accumulated = per_kv_head(attention.sum(dim=1))  # column sums: attention received from every query
        for head in range(2):
            heavy = top(accumulated[head, : N - 6], BUDGET - 6)
            assert kept[layer][head] == heavy + list(range(N - 6, N))


def test_tova_keeps_what_the_last_query_attends_to_averaged_over_all_heads(setting):
    kept = kept_after_prefill(setting, create_policy("tova", budget=BUDGET))
    for layer, attention in enumerate(setting[2]):
        expected = top(attention[:, -1].mean(dim=0), BUDGET)
        assert kept[layer] == [expected, expected]


def _snapkv_reference(attention, budget, window, kernel, pooling):
    votes = per_kv_head(attention[:, -window:, : N - window].sum(dim=1))
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    pooled = pool(votes.unsqueeze(1), kernel_size=kernel, padding=kernel // 2, stride=1).squeeze(1)
    return [top(pooled[head], budget - window) + list(range(N - window, N)) for head in range(2)]


@pytest.mark.parametrize("pooling, kernel", [("avgpool", 5), ("maxpool", 3), ("avgpool", 1)])
def test_snapkv_keeps_the_windows_pooled_votes_plus_the_window(setting, pooling, kernel):
    kept = kept_after_prefill(setting, create_policy("snapkv", budget=BUDGET, observation_window=4,
                                                     kernel_size=kernel, pooling=pooling))
    for layer, attention in enumerate(setting[2]):
        assert kept[layer] == _snapkv_reference(attention, BUDGET, 4, kernel, pooling)


def test_pyramid_budgets_follow_kvcache_factory_and_keep_the_total():
    # Hand-computed: s = 40 - 8 = 32, min = 32 // 20 = 1, max = 63, step = 62 // 3 = 20:
    # 71, 51, 31, 11 (sum 164); the 4 extra are spread evenly: 70, 50, 30, 10.
    assert pyramid_budgets(40, 8, 4, 20) == [70, 50, 30, 10]
    for budget, window, layers in [(128, 32, 30), (64, 32, 30), (512, 32, 30), (256, 8, 24), (100, 4, 7)]:
        budgets = pyramid_budgets(budget, window, layers, 20)
        assert sum(budgets) == budget * layers
        assert all(a >= b for a, b in zip(budgets, budgets[1:]))
        assert budgets[-1] > window


def test_pyramidkv_selects_like_snapkv_with_its_layer_budgets(setting):
    kept = kept_after_prefill(setting, create_policy("pyramidkv", budget=BUDGET, observation_window=4))
    budgets = pyramid_budgets(BUDGET, 4, 4, 20)
    assert [len(k[0]) for k in kept] == budgets
    for layer, attention in enumerate(setting[2]):
        assert kept[layer] == _snapkv_reference(attention, budgets[layer], 4, 5, "avgpool")


def test_knorm_keeps_the_lowest_key_norms(setting):
    kept = kept_after_prefill(setting, create_policy("knorm", budget=BUDGET))
    full_cache = setting[3]
    for layer in range(4):
        norms = full_cache.layers[layer].keys[0].norm(dim=-1)  # (kv_heads, N)
        assert kept[layer] == [top(-norms[head], BUDGET) for head in range(2)]


def test_random_is_seeded_and_per_head(setting):
    first = kept_after_prefill(setting, create_policy("random", budget=BUDGET, random_seed=3))
    again = kept_after_prefill(setting, create_policy("random", budget=BUDGET, random_seed=3))
    other = kept_after_prefill(setting, create_policy("random", budget=BUDGET, random_seed=4))
    assert first == again and first != other
    assert first[0][0] != first[0][1]  # heads draw independently


# --- across steps: what makes H2O different from TOVA -------------------------------------------

def _view(attention_rows, n_new, budget, phase="decode"):
    attention = torch.tensor(attention_rows, dtype=torch.float32)  # (heads=1, queries, n)
    n = attention.shape[-1]
    return LayerView(0, 1, 0, phase, keys=torch.zeros(1, n, 2), values=torch.zeros(1, n, 2),
                     positions=torch.arange(n)[None], n_new=n_new, budget=budget, attention=attention)


def test_h2o_accumulates_across_steps_and_tova_does_not():
    h2o, tova = create_policy("h2o", budget=2, recent=1), create_policy("tova", budget=2)
    h2o_state, tova_state = LayerState(), LayerState()
    # Step 1: entries 0, 1 arrive; entry 0 gets heavy attention.
    step1 = _view([[[1.0, 0.0], [0.9, 0.1]]], n_new=2, budget=2, phase="prefill")
    assert h2o.select(step1, h2o_state) is None
    assert torch.allclose(h2o_state.per_entry["accumulated"], torch.tensor([[1.9, 0.1]]))
    # Step 2: entry 2 arrives; now the current query prefers entry 1 over entry 0.
    step2 = _view([[[0.2, 0.5, 0.3]]], n_new=1, budget=2)
    kept_h2o = h2o.select(step2, h2o_state)
    kept_tova = tova.select(step2, tova_state)
    # H2O: accumulated 2.1, 0.6, 0.3 -> heavy hitter 0, plus the recent entry 2.
    assert kept_h2o.tolist() == [[0, 2]]
    # TOVA: only this step counts: 0.5 (entry 1) and 0.3 (entry 2).
    assert kept_tova.tolist() == [[1, 2]]
    h2o_state.keep(kept_h2o)
    assert torch.allclose(h2o_state.per_entry["accumulated"], torch.tensor([[2.1, 0.3]]))
