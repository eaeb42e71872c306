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
from kvstudio.core.policies.pyramidkv import kvcache_factory_budgets, kvcache_factory_limits, pyramid_budgets

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


def per_kv_head(scores, kv_heads=2, aggregation="mean"):
    """(query_heads, ...) -> (kv_heads, ...): each GQA group's heads (h // group) combined, written out
    head by head so it does not share the policies' code."""
    group = scores.shape[0] // kv_heads
    combined = []
    for kv_head in range(kv_heads):
        heads = [scores[kv_head * group + g] for g in range(group)]
        total = heads[0].clone()
        for head in heads[1:]:
            total = torch.maximum(total, head) if aggregation == "max" else total + head
        combined.append(total / group if aggregation == "mean" else total)
    return torch.stack(combined)


def top(scores, k):
    return sorted(torch.sort(scores, descending=True, stable=True).indices[:k].tolist())


AGGREGATIONS = ["mean", "max", "sum"]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_h2o_keeps_recent_plus_most_accumulated_attention(setting, aggregation):
    kept = kept_after_prefill(setting, create_policy("h2o", budget=BUDGET, recent=6, gqa_aggregation=aggregation))
    for layer, attention in enumerate(setting[2]):
        # column sums: attention received from every query, each group's heads combined
        accumulated = per_kv_head(attention.sum(dim=1), aggregation=aggregation)
        for head in range(2):
            heavy = top(accumulated[head, : N - 6], BUDGET - 6)
            assert kept[layer][head] == heavy + list(range(N - 6, N))


def test_tova_keeps_what_the_last_query_attends_to_averaged_over_all_heads(setting):
    kept = kept_after_prefill(setting, create_policy("tova", budget=BUDGET))
    for layer, attention in enumerate(setting[2]):
        expected = top(attention[:, -1].mean(dim=0), BUDGET)
        assert kept[layer] == [expected, expected]


@pytest.mark.parametrize("aggregation", ["max", "sum"])
def test_tova_combines_each_group_then_averages_the_kv_heads(setting, aggregation):
    kept = kept_after_prefill(setting, create_policy("tova", budget=BUDGET, gqa_aggregation=aggregation))
    changed = False
    for layer, attention in enumerate(setting[2]):
        expected = top(per_kv_head(attention[:, -1], aggregation=aggregation).mean(dim=0), BUDGET)
        assert kept[layer] == [expected, expected]
        changed |= expected != top(attention[:, -1].mean(dim=0), BUDGET)
    assert changed or aggregation == "sum"  # sum ranks as mean does here (equal group sizes); max need not


def _snapkv_reference(attention, budget, window, kernel, pooling, aggregation="mean"):
    votes = per_kv_head(attention[:, -window:, : N - window].sum(dim=1), aggregation=aggregation)
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    pooled = pool(votes.unsqueeze(1), kernel_size=kernel, padding=kernel // 2, stride=1).squeeze(1)
    return [top(pooled[head], budget - window) + list(range(N - window, N)) for head in range(2)]


@pytest.mark.parametrize("pooling, kernel", [("avgpool", 5), ("maxpool", 3), ("avgpool", 1)])
def test_snapkv_keeps_the_windows_pooled_votes_plus_the_window(setting, pooling, kernel):
    kept = kept_after_prefill(setting, create_policy("snapkv", budget=BUDGET, observation_window=4,
                                                     kernel_size=kernel, pooling=pooling))
    for layer, attention in enumerate(setting[2]):
        assert kept[layer] == _snapkv_reference(attention, BUDGET, 4, kernel, pooling)


@pytest.mark.parametrize("aggregation", ["max", "sum"])
def test_snapkv_combines_a_groups_window_votes_before_pooling(setting, aggregation):
    kept = kept_after_prefill(setting, create_policy("snapkv", budget=BUDGET, observation_window=4,
                                                     gqa_aggregation=aggregation))
    for layer, attention in enumerate(setting[2]):
        assert kept[layer] == _snapkv_reference(attention, BUDGET, 4, 5, "avgpool", aggregation)


def test_pyramid_budgets_as_kvcache_factory_computes_them():
    # Hand-computed from PyramidKVCluster.update_kv with C = 40, W = 8, L = 4, beta = 20:
    # s = 32, min = 32 // 20 = 1, max = 2 * 32 - 1 = 63, steps = 62 // 3 = 20: W + 63 - 20 l.
    assert kvcache_factory_budgets(40, 8, 4, 20) == [71, 51, 31, 11]
    assert pyramid_budgets(40, 8, 4, 20) == [71, 51, 31, 11]  # the default schedule
    assert kvcache_factory_budgets(40, 8, 4, 20, prompt_length=200) == [71, 51, 31, 11]
    assert kvcache_factory_budgets(40, 8, 4, 20, prompt_length=71) == [71, 51, 31, 11]  # max = q - W exactly
    # q = 68 >= 2s: max = 63 >= q - W = 60, so max = 60, min = 64 - 60 = 4, steps = 56 // 3 = 18.
    assert kvcache_factory_budgets(40, 8, 4, 20, prompt_length=68) == [68, 50, 32, 14]
    # C <= q = 60 < 2s = 64: every layer keeps C, as SnapKV; q = 30 < C: nothing is compressed.
    assert kvcache_factory_budgets(40, 8, 4, 20, prompt_length=60) == [40] * 4
    assert kvcache_factory_budgets(40, 8, 4, 20, prompt_length=30) == [30] * 4
    # C = 128, W = 32, 30 layers: s = 96, min = 4, max = 188, steps = 184 // 29 = 6: 220, 214, ..., 46.
    assert kvcache_factory_budgets(128, 32, 30, 20) == [220 - 6 * layer for layer in range(30)]
    # The engine's limit is the most a layer keeps over every prompt length: layer 2 keeps 32 at
    # q = 68 and 40 at q = 60 (C everywhere), more than its 31 at long prompts.
    assert kvcache_factory_limits(40, 8, 4, 20) == (71, 51, 40, 40)


def test_even_pyramid_budgets_keep_the_total():
    # Hand-computed: 71, 51, 31, 11 (sum 164); the 4 extra are spread evenly: 70, 50, 30, 10.
    assert pyramid_budgets(40, 8, 4, 20, "even") == [70, 50, 30, 10]
    for budget, window, layers in [(128, 32, 30), (64, 32, 30), (512, 32, 30), (256, 8, 24), (100, 4, 7)]:
        budgets = pyramid_budgets(budget, window, layers, 20, "even")
        assert sum(budgets) == budget * layers
        assert all(a >= b for a, b in zip(budgets, budgets[1:]))
        assert budgets[-1] > window


@pytest.mark.parametrize("schedule, budget, expected", [
    # s = 12, min = 0, max = 24 < N - W = 44: the whole pyramid, W + 24 - 8 l (the top keeps the window).
    ("kvcache-factory", BUDGET, [28, 20, 12, 4]),
    # budget 28: s = 24, 2s = 48 <= N; max = 47 >= N - W = 44, so max 44, min 4, steps 13: 48, 35, 22, 9.
    ("kvcache-factory", 28, [48, 35, 22, 9]),
    ("kvcache-factory", 30, [30] * 4),  # N = 48 < 2s = 52: C on every layer
    ("even", BUDGET, pyramid_budgets(BUDGET, 4, 4, 20, "even")),
])
def test_pyramidkv_selects_like_snapkv_with_its_layer_budgets(setting, schedule, budget, expected):
    kept = kept_after_prefill(setting, create_policy("pyramidkv", budget=budget, observation_window=4,
                                                     schedule=schedule))
    assert [len(k[0]) for k in kept] == expected
    for layer, attention in enumerate(setting[2]):
        if expected[layer] < N:  # (a layer keeping all N compressed nothing)
            assert kept[layer] == _snapkv_reference(attention, expected[layer], 4, 5, "avgpool")


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
